#!/usr/bin/env python3
"""Pack the Python packages an offline GPU host lacks into one folder to carry over (``make offline-bundle``).

A GPU host often has Python, torch and triton but no package index. This script downloads (from PyPI, through pip
and its cache) the wheels such a host needs for the target Python and platform, builds the ones that ship only as
source (DeepSpeed, without prebuilt ops; this project, with its C++ CPU extension), and writes to ``--out``:

  wheels/*.whl      every wheel: ``pip install --no-index --find-links OUT/wheels -r OUT/requirements.txt``
  requirements.txt  the pinned requirements of the packed groups (what that pip command installs)
  site.tar.xz       the same packages unpacked, ready to import (``tar -xJf site.tar.xz -C SITE``, then
                    ``PYTHONPATH=SITE`` or ``benchmarks/gpu_check.sh OUT --site SITE``); DALI is not in it
  dali/part-NN      the DALI group unpacked, xz-compressed and split into ``--part-mb`` parts for size-limited
                    transfers (``cat dali/part-* | xz -dc | tar -x -C SITE``)
  bundle.json       what was packed: groups, pinned requirements, target, date, and each file's size and sha256

Groups (``--groups``, default all; ``--list`` prints them with the pins they would get):

  base       open_clip_torch, webdataset, Inf-CL, prettytable and the dependencies of those and of DeepSpeed
             that a host with torch, torchvision, triton, numpy, tqdm and open_clip's hub dependencies
             (huggingface_hub, safetensors, timm, regex) lacks; ``--package REQ`` adds more (to group ``extra``)
  deepspeed  DeepSpeed built as a pure-Python wheel (``DS_BUILD_OPS=0``: ops are JIT-compiled on the host)
  test       pytest and its dependencies (for ``pytest -m gpu`` / ``benchmarks/gpu_check.sh``)
  project    bioclip_fast itself, built from this checkout as a wheel for the target Python
  dali       NVIDIA DALI for CUDA 13 with nvimgcodec, nvcomp, nvjpeg and its Python dependencies (~190 MB)

Unpinned names are pinned to the version installed in ``--python``'s environment (the project's ``.venv``: the
versions the test suite ran with) where it has them. Building DeepSpeed's wheel imports torch, so ``--python`` must
have torch (default: the project's ``.venv``); the project's wheel contains a compiled extension, so it is built with
a Python of the target version (``--build-python``, default: pyenv's or ``python3.X`` on PATH). After packing, the
bundle is checked: every pinned requirement must resolve from ``wheels/`` alone, with pip's index switched off, for the
target Python and platform. Expected failures are one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GROUPS: dict[str, list[str]] = {
    "base": ["open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand", "pyyaml", "inf-cl", "prettytable",
             "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "einops", "msgpack",
             "ninja", "psutil", "py-cpuinfo"],
    "deepspeed": ["deepspeed"],
    "test": ["pytest", "pluggy", "iniconfig", "packaging", "pygments"],
    "project": ["bioclip_fast"],
    "dali": ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0", "nvidia-libnvcomp-cu13==5.3.0.16",
             "nvidia-nvjpeg", "astunparse", "gast", "optree", "nvtx", "makefun", "libcst~=1.8"],
}
SOURCE_BUILT = {"deepspeed", "project"}  # groups built here rather than downloaded as wheels
DEFAULT_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64", "manylinux1_x86_64"]


class PackError(Exception):
    """An expected failure: one line, exit 2."""


def usage_error(msg: str):
    print(f"pack_offline_host: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def find_build_python(version: str) -> str | None:
    """A Python of the target version for the project's wheel (it has a compiled extension)."""
    cands = []
    pyenv = shutil.which("pyenv")
    if pyenv:
        r = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        cands += sorted(Path(r.stdout.strip(), "versions").glob(f"{version}.*/bin/python{version}"), reverse=True)
    cands += [shutil.which(f"python{version}") or ""]
    for c in cands:
        if c and Path(c).exists():
            return str(c)
    return None


def installed_versions(python: str, names: list[str]) -> dict[str, str]:
    """Versions of ``names`` installed in ``python``'s environment (absent ones left out)."""
    code = ("import json, sys, importlib.metadata as m\nout = {}\nfor n in sys.argv[1:]:\n    try: out[n] = "
            "m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    r = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    if r.returncode != 0:
        raise PackError(f"--python {python} does not run: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def pinned(groups: list[str], python: str) -> dict[str, list[str]]:
    """Each group's requirements; a bare name gets ``==`` the version ``python`` has installed, if any."""
    names = sorted({_name(r) for g in groups for r in GROUPS[g] if g != "project"})
    have = installed_versions(python, names) if names else {}
    out = {}
    for g in groups:
        if g == "project":
            out[g] = ["bioclip_fast"]
            continue
        out[g] = [f"{r}=={have[r]}" if _name(r) == r and r in have else r for r in GROUPS[g]]
    return out


def _platform_args(py_version: str, platforms: list[str]) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", py_version, "--implementation", "cp"]
    for p in platforms:
        args += ["--platform", p]
    return args


def _run(cmd: list[str], what: str, env: dict | None = None, quiet: bool = False) -> None:
    if not quiet:
        print(f"[offline-bundle] {what}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:]
        raise PackError(f"{what} failed (exit {r.returncode}): {last[0] if last else shlex.join(cmd)}")


def unpack_wheels(wheels: list[Path], dest: Path, py_version: str) -> None:
    """Unzip wheels into one importable tree; keep only the target Python's compiled extension modules."""
    tag = "cpython-" + py_version.replace(".", "")
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(dest)
    for f in dest.rglob("*.cpython-*"):
        if f.is_file() and tag not in f.name:
            f.unlink()


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_xz(tree: Path, dest: Path, preset: int) -> None:
    with tarfile.open(dest, "w:xz", preset=preset) as tar:
        for p in sorted(tree.iterdir()):
            tar.add(p, arcname=p.name)


def split_file(src: Path, folder: Path, part_mb: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    parts, size = [], part_mb << 20
    with open(src, "rb") as fh:
        for i, chunk in enumerate(iter(lambda: fh.read(size), b"")):
            parts.append(folder / f"part-{i:02d}")
            parts[-1].write_bytes(chunk)
    return parts


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pack_offline_host.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".devpack" / "bundle"), help="output folder (emptied first)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    ap.add_argument("--python-version", default="3.12", help="the host's Python, X.Y (default 3.12)")
    ap.add_argument("--platform", action="append", default=None,
                    help="pip platform tag of the host (repeatable; default: manylinux x86_64 tags)")
    ap.add_argument("--python", default=None, help="a Python with torch for DeepSpeed's build and the version pins "
                    "(default: the project's .venv)")
    ap.add_argument("--build-python", default=None, help="a Python of the target version for the project's wheel")
    ap.add_argument("--package", action="append", default=[], metavar="REQ",
                    help="another requirement to pack (repeatable; a wheel for the host must exist), group 'extra'")
    ap.add_argument("--part-mb", type=int, default=40, help="size of each dali/part-NN (default 40)")
    ap.add_argument("--xz-preset", type=int, default=6, choices=range(10), metavar="0-9",
                    help="xz compression level of site.tar.xz and the DALI parts (default 6; lower is faster)")
    ap.add_argument("--list", action="store_true", help="print the groups and their pinned requirements, do nothing")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        usage_error(f"--groups: unknown group(s) {unknown or '(none given)'}; choose from {', '.join(GROUPS)}")
    if not re.fullmatch(r"3\.\d+", args.python_version):
        usage_error(f"--python-version {args.python_version!r}: expected X.Y, e.g. 3.12")
    if args.part_mb <= 0:
        usage_error("--part-mb must be positive")
    if args.package:
        GROUPS["extra"] = list(args.package)
        groups.append("extra")
    args.groups = groups
    args.platform = args.platform or DEFAULT_PLATFORMS
    args.python = args.python or default_python()
    return args


def pack(args) -> dict:
    reqs = pinned(args.groups, args.python)
    build_py = None
    if "project" in args.groups:
        build_py = args.build_python or find_build_python(args.python_version)
        if not build_py:
            raise PackError(f"the project's wheel needs a Python {args.python_version} to build it (its C++ "
                            "extension is compiled per Python): pass --build-python, or leave out --groups project")
        ver = subprocess.run([build_py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
        if ver != args.python_version:
            raise PackError(f"--build-python {build_py} is Python {ver or '?'}, the host's is {args.python_version}")
    if "deepspeed" in args.groups:
        r = subprocess.run([args.python, "-c", "import torch"], capture_output=True)
        if r.returncode != 0:
            raise PackError(f"DeepSpeed's wheel build imports torch, which {args.python} lacks: make install first, "
                            "or pass --python")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "bundle.json").exists():
        raise PackError(f"--out {out} is a non-empty folder that is not a bundle; refusing to empty it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # beside --out: renamed into place
    tmp = Path(tempfile.mkdtemp(prefix="offline_bundle_"))
    try:
        wheels = {g: tmp / "wheels" / g for g in args.groups}
        plat = _platform_args(args.python_version, args.platform)
        for g in args.groups:
            wheels[g].mkdir(parents=True)
            if g == "deepspeed":
                src = tmp / "src"
                _run([args.python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(src),
                      *reqs[g]], "deepspeed: source download")
                sdists = sorted(src.glob("deepspeed-*"))
                _run([args.python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                      str(wheels[g]), *map(str, sdists)], "deepspeed: pure-Python wheel (DS_BUILD_OPS=0)",
                     env=dict(os.environ, DS_BUILD_OPS="0"))
            elif g == "project":
                _run([build_py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels[g]), str(ROOT)],
                     f"project: wheel of this checkout for Python {args.python_version}")
            else:
                _run([args.python, "-m", "pip", "download", "-q", "--no-deps", *plat, "-d", str(wheels[g]),
                      *reqs[g]], f"{g}: {len(reqs[g])} wheel(s)")
        (stage / "wheels").mkdir()
        for g in args.groups:
            for w in wheels[g].glob("*.whl"):
                shutil.copy2(w, stage / "wheels" / w.name)
        requirements = [r for g in args.groups for r in reqs[g]]
        check_plat = list(plat)
        if "project" in args.groups:  # the wheel built here is the one pinned; its platform tag is the build host's
            built = next((stage / "wheels").glob("bioclip_fast-*.whl"))
            requirements[requirements.index("bioclip_fast")] = f"bioclip_fast=={built.name.split('-')[1]}"
            check_plat += ["--platform", built.name[:-len(".whl")].split("-")[-1]]
        (stage / "requirements.txt").write_text("\n".join(requirements) + "\n")
        site_groups = [g for g in args.groups if g != "dali"]
        if site_groups:
            tree = tmp / "site"
            tree.mkdir()
            unpack_wheels([w for g in site_groups for w in sorted(wheels[g].glob("*.whl"))], tree, args.python_version)
            print("[offline-bundle] site.tar.xz", flush=True)
            write_xz(tree, stage / "site.tar.xz", args.xz_preset)
        if "dali" in args.groups:
            tree = tmp / "site-dali"
            tree.mkdir()
            unpack_wheels(sorted(wheels["dali"].glob("*.whl")), tree, args.python_version)
            print(f"[offline-bundle] dali/part-NN ({args.part_mb} MB each)", flush=True)
            write_xz(tree, tmp / "dali.tar.xz", args.xz_preset)
            split_file(tmp / "dali.tar.xz", stage / "dali", args.part_mb)
        # the check: every pinned requirement resolves from wheels/ alone, for the host's Python and platform
        _run([args.python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(stage / "wheels"),
              "--no-deps", "--dry-run", "--ignore-installed", "--target", str(tmp / "check"), *check_plat,
              "-r", str(stage / "requirements.txt")], "check: requirements.txt resolves from wheels/ with no index")
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        manifest = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python_version": args.python_version, "platforms": args.platform, "groups": args.groups,
            "requirements": requirements,
            "files": {str(p.relative_to(stage)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        (stage / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
        # only a complete, checked bundle replaces the previous one (a failed run leaves that intact)
        stage.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.list:
            for g, rs in pinned(args.groups, args.python).items():
                print(f"{g}: {' '.join(rs)}")
            return 0
        manifest = pack(args)
    except PackError as exc:
        print(f"pack_offline_host: error: {exc}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"[offline-bundle] {args.out}: {len(manifest['files'])} files, {total / 1e6:.1f} MB, groups "
          f"{', '.join(manifest['groups'])}, Python {manifest['python_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
