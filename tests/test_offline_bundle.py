"""The offline GPU-host bundle (`make offline-bundle`, tools/pack_offline_host.py) as docs/gpu-host.md shows it: the
documented commands run (the make target with its groups shrunk to `test`: a few small wheels from pip's cache or
PyPI), and what it packs installs with pip's index switched off and imports."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "pack_offline_host.py"
PAGE = REPO / "docs" / "gpu-host.md"


def _documented(prefix: str) -> list[str]:
    """The command of docs/gpu-host.md's bash blocks that starts with ``prefix``, as argv (comment dropped)."""
    text = PAGE.read_text(encoding="utf-8")
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for ln in block.splitlines()]
    found = [shlex.split(ln, comments=True) for ln in lines if ln.startswith(prefix)]
    assert len(found) == 1, f"docs/gpu-host.md shows {len(found)} commands starting {prefix!r}"
    return found[0]


def _env() -> dict[str, str]:
    # under `make test` the environment carries MAKELEVEL/MAKEFLAGS; a nested make would print directory lines
    return {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}


def test_list_as_documented_pins_every_group():
    argv = _documented("python tools/pack_offline_host.py")
    assert argv[1:] == ["tools/pack_offline_host.py", "--list"]
    res = subprocess.run([sys.executable, *argv[1:], "--python", sys.executable], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    groups = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())
    assert list(groups) == ["base", "deepspeed", "test", "project", "dali"]
    # bare names are pinned to what this environment (the one the tests run in) has installed
    assert f"pytest=={importlib.metadata.version('pytest')}" in groups["test"].split()
    assert f"open_clip_torch=={importlib.metadata.version('open_clip_torch')}" in groups["base"].split()
    assert f"deepspeed=={importlib.metadata.version('deepspeed')}" == groups["deepspeed"]
    assert "nvidia-dali-cuda130==2.4.0" in groups["dali"].split()  # an explicit pin is kept as written


def test_make_offline_bundle_as_documented_installs_with_no_index(tmp_path):
    argv = _documented("make offline-bundle")
    assert argv[:2] == ["make", "offline-bundle"] and any(a.startswith("BUNDLE_GROUPS=") for a in argv)
    # the documented command with its groups shrunk to `test` (pytest and its dependencies), a temp folder and the
    # fastest xz level
    out = tmp_path / "bundle"
    cmd = ["make", "--no-print-directory"] + [("BUNDLE_GROUPS=test" if a.startswith("BUNDLE_GROUPS=") else a)
                                              for a in argv[1:]] + [f"BUNDLE_DIR={out}", "BUNDLE_XZ_PRESET=1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resolves from wheels/ with no index" in res.stdout

    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["groups"] == ["test"] and manifest["python_version"] == "3.12"
    reqs = (out / "requirements.txt").read_text().split()
    assert reqs == manifest["requirements"] and f"pytest=={importlib.metadata.version('pytest')}" in reqs
    for rel, meta in manifest["files"].items():  # every file recorded with its size and digest
        data = (out / rel).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], rel
    assert {"requirements.txt", "site.tar.xz"} <= set(manifest["files"])
    assert len([r for r in manifest["files"] if r.startswith("wheels/")]) == len(reqs)
    with tarfile.open(out / "site.tar.xz") as tar:
        names = tar.getnames()
    assert "pytest" in names and "_pytest" in names and "pluggy" in names

    # a run that fails (here: a requirement no wheel satisfies) leaves the previous bundle as it was
    before = (out / "bundle.json").read_bytes()
    res = subprocess.run([sys.executable, str(SCRIPT), "--groups", "test", "--package", "pytest<0", "--out", str(out),
                          "--python", sys.executable], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "extra" in res.stderr, res.stderr
    assert (out / "bundle.json").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["bundle"]

    # on the host: pip with the index off, from the bundle alone (here into a folder, for this Python)
    target = tmp_path / "host"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                          str(out / "wheels"), "--target", str(target), "-r", str(out / "requirements.txt")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    probe = subprocess.run([sys.executable, "-c", "import pytest; print(pytest.__file__, pytest.__version__)"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(target)))
    path, version = probe.stdout.split()
    assert Path(path).is_relative_to(target) and version == importlib.metadata.version("pytest")


def test_bad_usage_is_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args, "--python", sys.executable],
                              capture_output=True, text=True, timeout=60)

    res = run("--groups", "base,nope", "--list")
    assert res.returncode == 2 and "unknown group(s) ['nope']" in res.stderr and "Traceback" not in res.stderr
    res = run("--python-version", "312", "--list")
    assert res.returncode == 2 and "expected X.Y" in res.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = run("--groups", "test", "--out", str(busy))  # never empties a folder that is not a bundle
    assert res.returncode == 2 and "not a bundle" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and (busy / "keep.txt").read_text() == "mine"
