"""Build the C++ CPU path (csrc/) as ``bioclip_fast._C`` and ship the Triton kernels (kernels/) as
``bioclip_fast.kernels``.

The extension is plain pybind11 over raw ``data_ptr()`` buffers (no ``<torch/extension.h>``), so it builds in
seconds and needs no torch at build time. Set ``BIOCLIP_FAST_PORTABLE=1`` to build without ``-march=native``.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

cflags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
if os.environ.get("BIOCLIP_FAST_PORTABLE", "0") != "1":
    cflags.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "bioclip_fast._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        extra_compile_args=cflags,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
]

setup(
    packages=[
        "bioclip_fast",
        "bioclip_fast.kernels",
        "bioclip_fast.ops",
        "bioclip_fast.integrations",
        "bioclip_fast.data",
        "bioclip_fast.train",
        "bioclip_fast.eval",
        "bioclip_fast.analysis",
    ],
    package_dir={"bioclip_fast.kernels": "kernels"},
    package_data={"bioclip_fast": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
