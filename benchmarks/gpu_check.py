"""One prepared GPU check: everything a GPU session should run first, time-boxed to finish in under 8 minutes.

    benchmarks/gpu_check.sh OUTDIR [--site DIR] [--budget-s 450] [--only STEP ...] [--dry-run]

Runs, each step in its own process with its own time box (a step that overruns is killed and recorded as such,
the others still run):

  env       GPU, driver, torch / triton / Python versions, which optional packages import
  pytest    ``pytest -m gpu`` (the GPU tests of the whole suite: kernels vs float64 with flash-attention's rule,
            memory bounds, both backward strategies)
  loss      the loss ladder ours vs open_clip vs Inf-CL, B = 4k ... 1M, D = 768, bf16 and "fp32-train" (fp32 features
            as the trainer hands them; every implementation under bf16 autocast, ours with compute_dtype auto)
  kernels   the Triton kernels alone with both backward strategies (fused, gemm) at B = 16k, 32k
  decode    DALI vs PIL decode throughput (only when nvidia.dali imports)
  train     a short ViT-L/14 training benchmark (torch engine when DeepSpeed is absent)

Needs on the host: Python >= 3.10, torch with CUDA, triton >= 3.6. No package index: pure-Python packages (pytest,
open_clip_torch, inf-cl, webdataset, ...) come in ``--site DIR``, a folder of wheels (``*.whl`` are put on
``PYTHONPATH`` as zip archives) and/or unpacked package trees (``DIR`` itself goes on ``PYTHONPATH``; see
/work/shared/tools/device-pack.sh). The repository is used in place: if ``bioclip_fast`` is not installed, a
symlink tree maps ``kernels/`` to ``bioclip_fast.kernels`` as setup.py does.

Writes ``OUTDIR/gpu_check.json`` (environment, per step: command, exit code, seconds, timed out, log, outputs) and
``OUTDIR/gpu_check.png`` (step status and time), plus each step's own JSON/PNG under ``OUTDIR/<step>/`` and logs
under ``OUTDIR/logs/``. Without a CUDA GPU it exits with status 3 and a one-line message (``--dry-run`` prints the
plan instead).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_EXIT = 3

# (name, share of the time budget, description). Shares sum to 1; unused time of a step is given to the next ones.
STEPS = [
    ("env", 0.02, "versions and GPU"),
    ("pytest", 0.26, "pytest -m gpu"),
    ("loss", 0.38, "loss ladder ours vs open_clip vs Inf-CL, B 4k-1M, bf16 + fp32-train"),
    ("kernels", 0.14, "Triton kernels at B = 32k: fused, gemm and (fp32 features, bf16 products) gemm2d backward"),
    ("decode", 0.08, "DALI / PIL decode (when DALI imports)"),
    ("train", 0.12, "short ViT-L/14 training benchmark"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory (created)")
    ap.add_argument("--site", action="append", default=[],
                    help="folder of pure-Python wheels and/or unpacked packages to import from (repeatable)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="total time box in seconds (default 450: < 8 min)")
    ap.add_argument("--only", nargs="+", choices=[s[0] for s in STEPS], help="run only these steps")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (commands and time boxes); run nothing")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    return ap.parse_args(argv)


def site_paths(sites: list[str]) -> list[str]:
    """PYTHONPATH entries for ``--site`` folders: each folder, plus every wheel in it (pure-Python wheels import
    straight from the zip archive)."""
    out = []
    for s in sites:
        p = Path(s).expanduser().resolve()
        if not p.is_dir():
            raise SystemExit(f"gpu_check: error: --site {s}: not a directory")
        out.append(str(p))
        out += sorted(str(w) for w in p.glob("*.whl"))
    return out


def package_root(python: str, env: dict) -> tuple[str | None, str]:
    """A directory to put on PYTHONPATH so that ``bioclip_fast`` and ``bioclip_fast.kernels`` import from this
    checkout: none when it already imports, else a symlink tree (setup.py maps kernels/ -> bioclip_fast.kernels)."""
    probe = subprocess.run([python, "-c", "import bioclip_fast.kernels._pairwise, bioclip_fast.loss"], env=env,
                           capture_output=True, text=True, cwd=str(ROOT))
    if probe.returncode == 0:
        return None, "installed"
    tree = Path(tempfile.mkdtemp(prefix="bioclip_fast_src_"))
    pkg = tree / "bioclip_fast"
    pkg.mkdir()
    for entry in (ROOT / "bioclip_fast").iterdir():
        (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(ROOT / "kernels")
    return str(tree), "symlink tree"


def plan(args, out: Path) -> dict[str, list[str]]:
    py = args.python
    loss_common = [py, "-m", "bioclip_fast.cli", "bench-loss", "--device", "cuda", "--dims", "768",
                   "--impls", "ours", "open_clip", "inf_cl", "--repeats", "2", "--warmup", "1", "--time-budget", "6"]
    return {
        "env": [py, str(ROOT / "benchmarks" / "gpu_check.py"), "--_env", str(out / "env.json")],
        "pytest": [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                   f"--junitxml={out / 'pytest' / 'junit.xml'}", str(ROOT / "tests")],
        "loss": loss_common + ["--batch-sizes", "4096", "16384", "65536", "262144", "1048576",
                               "--dtypes", "bf16", "fp32-train", "--out", str(out / "loss")],
        "kernels": [py, str(ROOT / "benchmarks" / "bench_kernels.py"), "--B", "32768", "--D", "768",
                    "--dtype", "bf16", "fp32-bf16", "--kinds", "sym", "dir", "--bwd", "fused", "gemm", "gemm2d",
                    "--rep", "100",
                    "--out", str(out / "kernels")],
        "decode": [py, str(ROOT / "benchmarks" / "bench_decode.py"), "--images", "1500", "--backends", "all",
                   "--out", str(out / "decode")],
        "train": [py, str(ROOT / "benchmarks" / "bench_train.py"), "--modes", "plain", "--batch-sizes", "64",
                  "--steps", "8", "--warmup", "3", "--out", str(out / "train" / "bench_train.json")],
    }


def write_env(path: str) -> int:
    """The ``env`` step (runs in the child interpreter, with the step's PYTHONPATH)."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                        cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    except Exception as exc:  # noqa: BLE001 - reported
        info["torch_error"] = repr(exc)
    for mod in ("triton", "open_clip", "inf_cl", "deepspeed", "nvidia.dali", "webdataset", "pytest", "matplotlib"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"absent ({type(exc).__name__})"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def preflight(python: str, env: dict) -> dict:
    code = ("import json, sys, platform\n"
            "r = {'python': platform.python_version()}\n"
            "try:\n import torch; r['torch'] = torch.__version__; r['cuda'] = torch.cuda.is_available()\n"
            "except Exception as e: r['torch_error'] = repr(e)\n"
            "try:\n import triton; r['triton'] = triton.__version__\n"
            "except Exception as e: r['triton_error'] = repr(e)\n"
            "for m in ('nvidia.dali', 'deepspeed', 'pytest', 'open_clip', 'inf_cl'):\n"
            " try: __import__(m); r[m] = True\n"
            " except Exception: r[m] = False\n"
            "print(json.dumps(r))\n")
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stderr or proc.stdout)[-500:]}


def summary_png(result: dict, path: Path) -> str:
    """Step status / time bars (matplotlib when it imports, else a dependency-free PNG of the same bars)."""
    steps = result["steps"]
    names = [s["name"] for s in steps]
    secs = [s.get("seconds", 0.0) for s in steps]
    colors = [{"ok": "#2a9d8f", "failed": "#e76f51", "timeout": "#f4a261"}.get(s["status"], "#bbbbbb") for s in steps]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.barh(names, secs, color=colors)
        for i, s in enumerate(steps):
            ax.text(secs[i], i, f" {s['status']} ({s.get('seconds', 0):.0f}s / box {s['box_s']:.0f}s)",
                    va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(f"gpu_check on {result['environment'].get('gpu', 'no GPU')} ({result['total_seconds']:.0f} s)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    except Exception:  # noqa: BLE001 - fall back to a plain PNG
        _plain_bars_png(path, secs, colors)
        return "plain (matplotlib unavailable; labels in gpu_check.json)"


def _plain_bars_png(path: Path, values: list[float], colors: list[str], width=600, row=28) -> None:
    import struct
    import zlib

    h = row * max(1, len(values)) + 10
    vmax = max(values + [1e-9])
    px = [[(255, 255, 255)] * width for _ in range(h)]
    for i, (v, c) in enumerate(zip(values, colors)):
        rgb = tuple(int(c[j:j + 2], 16) for j in (1, 3, 5))
        w = int((width - 20) * v / vmax)
        for y in range(5 + i * row + 4, 5 + (i + 1) * row - 4):
            for x in range(10, 10 + max(w, 1)):
                px[y][x] = rgb
    raw = b"".join(b"\x00" + bytes(ch for p in line for ch in p) for line in px)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_env"]:
        return write_env(argv[1])
    args = parse_args(argv)
    out = Path(args.out).resolve()
    env = dict(os.environ)
    paths = site_paths(args.site)
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TRITON_INTERPRET", "0")
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    steps = [s for s in STEPS if not args.only or s[0] in args.only]
    commands = plan(args, out)

    if args.dry_run:
        print(f"gpu_check plan (budget {args.budget_s:.0f} s, PYTHONPATH={env['PYTHONPATH']}):")
        total_share = sum(s[1] for s in steps)
        for name, share, desc in steps:
            print(f"  {name:8s} box {args.budget_s * share / total_share:5.0f} s  {desc}\n"
                  f"           {' '.join(commands[name])}")
        return 0

    pre = preflight(args.python, env)
    if not pre.get("cuda"):
        why = pre.get("torch_error") or pre.get("error") or "torch.cuda.is_available() is False"
        print(f"gpu_check: no CUDA GPU on this host ({why}); nothing to check. `--dry-run` prints the plan.",
              file=sys.stderr)
        return NO_GPU_EXIT
    if "triton" not in pre or _version_tuple(pre["triton"]) < (3, 6):
        print(f"gpu_check: error: triton >= 3.6 is needed, found {pre.get('triton', pre.get('triton_error'))}",
              file=sys.stderr)
        return 2
    root, how = package_root(args.python, env)
    if root:
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for name, _, _ in steps:
        (out / name).mkdir(exist_ok=True)

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    result = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "budget_s": args.budget_s,
              "package": how, "preflight": pre, "environment": {}, "steps": []}
    remaining_share = sum(s[1] for s in steps)
    for name, share, desc in steps:
        now = time.monotonic()
        box = max(5.0, (deadline - now) * share / remaining_share)
        remaining_share -= share
        rec = {"name": name, "what": desc, "command": commands[name], "box_s": round(box, 1)}
        skip = None
        if name == "decode" and not pre.get("nvidia.dali"):
            skip = "nvidia.dali does not import"
        if name == "pytest" and not pre.get("pytest"):
            skip = "pytest does not import (pass it in --site)"
        if name == "loss" and not pre.get("open_clip"):
            rec["note"] = "open_clip absent: its rows are recorded as skipped"
        if name == "train" and not pre.get("deepspeed"):
            rec["note"] = "DeepSpeed absent: the training benchmark runs with the torch engine"
        if deadline - now < 5.0:
            skip = "time budget exhausted"
        if skip:
            rec.update(status="skipped", reason=skip, seconds=0.0)
            result["steps"].append(rec)
            print(f"[gpu_check] {name}: skipped ({skip})", flush=True)
            continue
        step_env = dict(env)
        if name == "loss":
            # default configs only: autotuning every power-of-two bucket up to 1M (a full sweep per trial) would not
            # fit the box; the kernels step autotunes at 16k / 32k
            step_env["BIOCLIP_FAST_AUTOTUNE"] = "0"
            rec["note"] = (rec.get("note", "") + " ours runs its default (spill-free) configs: BIOCLIP_FAST_AUTOTUNE=0").strip()
        log = out / "logs" / f"{name}.log"
        print(f"[gpu_check] {name}: {desc} (box {box:.0f} s)", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as fh:
            proc = subprocess.Popen(commands[name], stdout=fh, stderr=subprocess.STDOUT, env=step_env, cwd=str(ROOT),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=box)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                rc, status = None, "timeout"
        rec.update(status=status, returncode=rc, seconds=round(time.monotonic() - t0, 1), log=str(log),
                   outputs=sorted(str(Path(p).relative_to(out)) for p in glob.glob(str(out / name / "**" / "*"),
                                                                                    recursive=True)
                                  if Path(p).is_file()))
        rec["log_tail"] = log.read_text(errors="replace")[-1500:]
        result["steps"].append(rec)
        print(f"[gpu_check] {name}: {status} in {rec['seconds']:.0f} s", flush=True)
        if name == "env" and (out / "env.json").exists():
            result["environment"] = json.loads((out / "env.json").read_text())
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    result["png_renderer"] = summary_png(result, out / "gpu_check.png")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    if root:
        shutil.rmtree(root, ignore_errors=True)
    failed = [s["name"] for s in result["steps"] if s["status"] in ("failed", "timeout")]
    print(f"[gpu_check] done in {result['total_seconds']:.0f} s; results in {out}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
