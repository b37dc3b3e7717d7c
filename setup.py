"""Build the C++ CPU path (csrc/) as ``bioclip_fast._C``; the Triton kernels ship in the package
(``bioclip_fast/kernels/``).

The extension is plain pybind11 over raw ``data_ptr()`` buffers (no ``<torch/extension.h>``), so it builds in
seconds and needs no torch at build time. It is built once per instruction set and chosen at run time (cpuid), never
with ``-march=native`` (a build shared through a cluster filesystem or a wheel must run on every CPU it reaches):
``bioclip_fast._C`` for baseline x86-64 (or the host ISA elsewhere) and, on x86-64, ``bioclip_fast._C_avx2``
(``-mavx2 -mfma``, the 8-wide FMA micro-kernel).
"""
import glob
import platform

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

cflags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
x86 = platform.machine().lower() in ("x86_64", "amd64")
# (module name, extra flags): the baseline variant must run on any CPU of the architecture.
variants = [("_C", ["-mtune=generic"] if x86 else [])]
if x86:
    variants.append(("_C_avx2", ["-mavx2", "-mfma", "-mtune=haswell"]))

ext_modules = [
    Pybind11Extension(
        f"bioclip_fast.{name}",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        define_macros=[("BF_MODULE_NAME", name)],
        extra_compile_args=cflags + flags,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
    for name, flags in variants
]

setup(
    packages=find_packages(include=["bioclip_fast", "bioclip_fast.*"]),  # every package, eval.beyond included
    package_data={"bioclip_fast": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
