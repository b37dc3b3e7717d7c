"""The prepared GPU check (benchmarks/gpu_check.sh) on a machine without a GPU: its plan, its clean refusal, its
package plumbing and its outputs' writers; plus the bench-loss "fp32-train" point it relies on (run on CPU)."""
from __future__ import annotations

import importlib.util
import os
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=300):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))


def _site(tmp_path):
    """A --site folder as `make offline-bundle` makes them (site.tar.xz unpacked): an unpacked package tree plus a pure-Python wheel."""
    site = tmp_path / "site"
    (site / "tinypkg").mkdir(parents=True)
    (site / "tinypkg" / "__init__.py").write_text("VALUE = 1\n")
    with zipfile.ZipFile(site / "wheelpkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("wheelpkg/__init__.py", "VALUE = 2\n")
    return site


def test_readme_dry_run_prints_the_time_boxed_plan(tmp_path):
    site = _site(tmp_path)
    proc = _run(str(tmp_path / "gpu"), "--site", str(site), "--dry-run")  # docs/gpu-host.md: gpu_check.sh OUT --site DIR --dry-run
    assert proc.returncode == 0, proc.stderr
    for step in ("pytest", "loss", "kernels", "decode", "train"):
        assert f"  {step}" in proc.stdout
    assert "-m gpu" in proc.stdout and "fp32-train" in proc.stdout and "--bwd fused gemm" in proc.stdout
    assert "1048576" in proc.stdout  # the ladder reaches B = 1M
    assert "--order size" in proc.stdout and "--expect-backend triton" in proc.stdout
    pytest_line = next(ln for ln in proc.stdout.splitlines() if " -m pytest " in ln)
    last = [Path(a).name for a in pytest_line.split()[-3:]]
    assert " -v " in pytest_line and last == ["test_triton_kernels.py", "test_loss_precision.py", "tests"], last
    boxes = [float(line.split("box")[1].split()[0]) for line in proc.stdout.splitlines() if " box " in line]
    gc = _load_gpu_check()
    # every step time-boxed; with each step's kill grace the run fits 7 minutes of GPU time
    assert sum(boxes) + gc.KILL_GRACE_S <= 7 * 60
    assert "wheelpkg-1.0-py3-none-any.whl" in proc.stdout  # wheels go on PYTHONPATH
    assert _run(str(tmp_path / "gpu"), "--budget-s", "900", "--dry-run").returncode == 2  # would not fit


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: the check would run for real")
def test_readme_command_without_gpu_exits_3_with_one_line(tmp_path):
    proc = _run(str(tmp_path / "gpu"), "--site", str(_site(tmp_path)))  # docs/gpu-host.md: gpu_check.sh OUT --site DIR
    assert proc.returncode == 3
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "gpu").exists()  # validated before doing any work


def test_bad_site_and_usage_are_one_line_errors(tmp_path):
    proc = _run(str(tmp_path / "gpu"), "--site", str(tmp_path / "missing"), "--dry-run")
    assert proc.returncode != 0 and "--site" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run()
    assert proc.returncode == 2 and "gpu_check.sh OUTDIR" in proc.stdout


def test_site_wheels_import_and_source_tree_holds_the_kernels(tmp_path):
    gc = _load_gpu_check()
    paths = gc.site_paths([str(_site(tmp_path))])
    code = "import tinypkg, wheelpkg; print(tinypkg.VALUE + wheelpkg.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "3", out.stderr
    # Without an installed bioclip_fast (here: an isolated interpreter), a symlink tree holds the checkout's source.
    iso = tmp_path / "iso.sh"
    iso.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages: nothing installed
    iso.chmod(0o755)
    tree, how = gc.package_root(str(iso), {"PATH": "/usr/bin:/bin"})
    if tree is None:
        pytest.skip("bioclip_fast imports even in isolated mode (installed into the interpreter itself)")
    assert how == "symlink tree"
    assert (Path(tree) / "bioclip_fast" / "kernels" / "clip_loss.py").exists()
    assert (Path(tree) / "bioclip_fast" / "loss.py").exists()


def test_summary_png_without_matplotlib_is_a_valid_png(tmp_path):
    gc = _load_gpu_check()
    path = tmp_path / "bars.png"
    gc._plain_bars_png(path, [3.0, 10.0, 0.0], ["#2a9d8f", "#e76f51", "#bbbbbb"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-12:]
    res = {"steps": [{"name": "pytest", "status": "ok", "seconds": 3.0, "box_s": 100.0}],
           "environment": {}, "total_seconds": 3.0}
    assert gc.summary_png(res, tmp_path / "s.png") and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_loss_fp32_train_point_runs_on_cpu(tmp_path):
    """The ladder's fp32-train dtype: fp32 features, every implementation under bf16 autocast."""
    from bioclip_fast.cli import main

    out = tmp_path / "loss"
    rc = main(["bench-loss", "--device", "cpu", "--batch-sizes", "32", "--dims", "16", "--dtypes", "fp32-train",
               "--impls", "ours", "open_clip", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    (result,) = [p for p in out.glob("loss_cpu_*.json") if not p.name.endswith(".partial.json")]
    rows = json.loads(result.read_text())["measurements"]
    assert {r["dtype"] for r in rows} == {"fp32-train"} and all("seconds" in r for r in rows), rows
    ours, ref = (next(r for r in rows if r["impl"] == i) for i in ("ours", "open_clip"))
    assert abs(ours["loss"] - ref["loss"]) < 0.05 * abs(ref["loss"])  # open_clip multiplies in bf16 here
    assert not list(out.glob("*.partial.json"))


def test_kernel_step_cases_parse_and_skip_gemm2d_without_fp32_features(tmp_path):
    """gpu_check's kernel step: its arguments parse in bench_kernels.py, time fused / gemm on bf16 features and
    fused / gemm / gemm2d on fp32 features with bf16 products (the trainer's path), never gemm2d on bf16 (it would
    run gemm again)."""
    gc = _load_gpu_check()
    cmd = gc.plan(gc.parse_args([str(tmp_path / "gpu")]), tmp_path / "gpu")["kernels"]
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    cases = bk.cases_for(bk.build_parser().parse_args(cmd[2:]))  # cmd = [python, script, args...]
    pairs = {(dt, bw) for _, _, _, dt, bw in cases}
    assert pairs == {("bf16", "fused"), ("bf16", "gemm"), ("fp32-bf16", "fused"), ("fp32-bf16", "gemm"),
                     ("fp32-bf16", "gemm2d")}
    assert len(cases) == 10


@pytest.mark.slow  # ~1.5 min on 2 cores: the whole suite's collection, the interpreter, a training step
@pytest.mark.timeout(900)
def test_rehearsal_runs_every_step_on_cpu_and_packs_the_results(tmp_path):
    """``gpu_check.sh OUT --rehearse``: every step on CPU (Triton under the interpreter on the GPU's launch path,
    tiny sizes) with the GPU run's processes, working folders, environment and packaging. Before: the steps ran
    in the repository root, where ``python -m`` imported the source ``bioclip_fast/`` (then without its kernels): pytest
    collected nothing and the ladder timed the torch reference as "ours"."""
    import tarfile

    out = tmp_path / "gpu"
    proc = _run(str(out), "--rehearse", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"gpu_check.json", "gpu_check.png", "gpu_check.tar.gz"} <= set(files)
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["rehearsal"] and res["complete"] and res["package"]["kernels_from_checkout"], res["package"]
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert all(v == "ok" for k, v in status.items() if k != "decode"), status
    for step in res["steps"]:
        if "cwd" in step:
            assert Path(step["cwd"]).resolve() != ROOT.resolve()
    pyt = next(s for s in res["steps"] if s["name"] == "pytest")
    assert pyt["junit"]["tests"] > 0 and pyt["junit"]["errors"] == 0, pyt
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        loss = next(n for n in names if n.startswith("gpu_check/loss/") and n.endswith(".json"))
        rows = json.loads(tar.extractfile(loss).read())["measurements"]
    assert any(n.endswith("logs/pytest.log") for n in names) and any("kernels/bench_kernels.json" in n for n in names)
    ours = [r for r in rows if r["impl"] == "ours"]
    assert ours and all(r.get("backend") == ["triton"] and "seconds" in r for r in ours), ours


def test_bench_loss_fails_a_row_of_ours_that_ran_another_backend(tmp_path):
    """A benchmark must never label a fallback as the kernel: on CPU ours runs the C++ path, so a ladder that
    expects the Triton kernels fails the row (and exits 1) instead of timing it as ours."""
    from bioclip_fast.cli import main

    out = tmp_path / "loss"
    rc = main(["bench-loss", "--device", "cpu", "--batch-sizes", "32", "--dims", "16", "--dtypes", "fp32",
               "--impls", "ours", "--repeats", "1", "--warmup", "0", "--expect-backend", "triton", "--out", str(out)])
    assert rc == 1
    (result,) = [p for p in out.glob("loss_cpu_*.json") if not p.name.endswith(".partial.json")]
    (row,) = json.loads(result.read_text())["measurements"]
    assert "seconds" not in row and "expected triton" in row["failed"] and row["backend"] == ["cpp"]
    rc = main(["bench-loss", "--device", "cpu", "--batch-sizes", "32", "--dims", "16", "--dtypes", "fp32",
               "--impls", "ours", "--repeats", "1", "--warmup", "0", "--expect-backend", "cpp", "--out", str(out)])
    assert rc == 0


def test_a_kernel_failure_is_never_replaced_by_the_reference(monkeypatch):
    """No GPU-path failure falls back silently: an error inside the Triton launchers propagates out of the loss
    (nothing catches it and retries with the torch reference), and a Triton backend that cannot load is reported
    by a warning and recorded in ``dispatch.CALLS`` as the torch backend that ran."""
    from bioclip_fast import fused_clip_loss
    from bioclip_fast.ops import dispatch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU tensors needs the interpreter")
    from bioclip_fast.kernels import clip_loss as CL

    def broken(*a, **kw):
        raise KeyError("D")

    monkeypatch.setattr(CL, "_clip_fwd_launch", broken)
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    with pytest.raises(KeyError):
        fused_clip_loss(q, q.clone(), 10.0, backend="triton")
    monkeypatch.setenv("BIOCLIP_FAST_BACKEND", "triton")
    with pytest.raises(KeyError):
        fused_clip_loss(q, q.clone(), 10.0)
    # an import failure on a CUDA device: warned, and what runs is recorded as "torch"
    monkeypatch.delenv("BIOCLIP_FAST_BACKEND")
    monkeypatch.setattr(dispatch, "_cache", {"triton": ImportError("no triton")})
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert dispatch.resolve("auto", torch.device("cuda")) == "torch"
    dispatch.CALLS.clear()
    fused_clip_loss(q, q.clone(), 10.0, backend="torch")
    assert set(dispatch.CALLS) == {"torch"}
