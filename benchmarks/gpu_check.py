"""One prepared GPU check: everything a GPU session should run first, time-boxed to finish in 7 minutes
including imports and compiles.

    benchmarks/gpu_check.sh OUTDIR [--site DIR] [--budget-s 400] [--only STEP ...] [--dry-run] [--rehearse]

Runs, each step in its own process with its own time box (a step that overruns is killed and recorded as such,
the others still run):

  env       GPU, driver, torch / triton / Python versions, which optional packages import, where bioclip_fast and
            bioclip_fast.kernels import from
  pytest    ``pytest -v -m gpu`` with ``BIOCLIP_FAST_AUTOTUNE=0`` (the default configs, no autotuning
            benchmarks), the kernel test files first; fails when it collects no test
  loss      the loss ladder ours vs open_clip vs Inf-CL, B = 4k ... 1M, D = 768, bf16 and "fp32-train"; rows
            ordered by B so the comparison points at 4k-64k finish before 1M; a row of ours that ran anything
            but the Triton kernels fails (``--expect-backend triton``)
  kernels   the Triton kernels alone with the backward strategies (fused, gemm, gemm2d) at B = 32k (autotuned)
  decode    DALI vs PIL decode throughput (only when nvidia.dali imports)
  train     a short ViT-L/14 training benchmark (torch engine when DeepSpeed is absent)

Every step runs with a scratch folder as its working directory (never the repository root) and a package tree
first on ``PYTHONPATH`` holding this checkout's ``bioclip_fast/`` (the Triton kernels included), so an installed
copy of another version is never the one measured; the repository root comes after it (for ``tests``). Needs on
the host: Python >= 3.10, torch with CUDA, triton >= 3.6. No package index: pure-Python packages (pytest,
open_clip_torch, inf-cl, ...) come in ``--site DIR`` (``*.whl`` go on ``PYTHONPATH`` as zip archives, ``DIR``
itself too).

Output, at most 5 files directly in OUTDIR, rewritten after every step (a run cut short keeps what it has):
``gpu_check.json`` (environment, per step: command, exit code, seconds, status, log tail, outputs),
``gpu_check.png`` (step status and time), ``gpu_check.tar.gz`` (every step's JSON / PNG / junit and the full
logs), and copies of the loss ladder's and the kernel benchmark's PNGs. Without a CUDA GPU it exits with status 3
and a one-line message; ``--dry-run`` prints the plan; ``--rehearse`` runs every step on CPU (Triton under the
interpreter on the GPU's launch path, tiny sizes) with the same processes, working directories, environment and
packaging, to prove the plumbing before any GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_EXIT = 3

# (name, share of the time budget, description). Shares sum to 1; unused time of a step is given to the next ones.
STEPS = [
    ("env", 0.06, "versions, GPU, package paths"),
    ("pytest", 0.27, "pytest -v -m gpu, default configs (no autotuning), kernel tests first"),
    ("loss", 0.34, "loss ladder ours vs open_clip vs Inf-CL, B 4k-1M by size, bf16 + fp32-train"),
    ("kernels", 0.15, "Triton kernels at B = 32k: fused, gemm and (fp32 features, bf16 products) gemm2d backward"),
    ("decode", 0.06, "DALI / PIL decode (when DALI imports)"),
    ("train", 0.12, "short ViT-L/14 training benchmark"),
]
KILL_GRACE_S = 10  # SIGTERM -> SIGKILL for a step past its box
MAX_TOTAL_S = 420  # the whole run, imports and compiles included, must fit 7 minutes of GPU time
OUT_FILES = ("gpu_check.json", "gpu_check.png", "gpu_check.tar.gz", "loss.png", "kernels.png")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory (created)")
    ap.add_argument("--site", action="append", default=[],
                    help="folder of pure-Python wheels and/or unpacked packages to import from (repeatable)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help=f"total time box in seconds (default 400; at most {MAX_TOTAL_S} with the kill grace)")
    ap.add_argument("--only", nargs="+", choices=[s[0] for s in STEPS], help="run only these steps")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (commands and time boxes); run nothing")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    ap.add_argument("--rehearse", action="store_true",
                    help="run every step on CPU (interpreter, tiny sizes) with the same process layout and packaging")
    args = ap.parse_args(argv)
    if args.budget_s <= 0 or args.budget_s + KILL_GRACE_S > MAX_TOTAL_S:
        ap.error(f"--budget-s must be in (0, {MAX_TOTAL_S - KILL_GRACE_S}]: the run must fit 7 minutes")
    return args


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


def package_tree() -> str:
    """A folder to put first on PYTHONPATH in which ``bioclip_fast`` is this checkout's source (its kernels in
    ``bioclip_fast/kernels/``): symlinks, so a built ``_C`` extension comes along."""
    tree = Path(tempfile.mkdtemp(prefix="bioclip_fast_src_"))
    pkg = tree / "bioclip_fast"
    pkg.mkdir()
    for entry in (ROOT / "bioclip_fast").iterdir():
        (pkg / entry.name).symlink_to(entry)
    return str(tree)


def package_root(python: str, env: dict) -> tuple[str | None, str]:
    """(tree, how): the check always puts ``package_tree`` first (an installed copy could be another version)."""
    return package_tree(), "symlink tree"


def probe_package(python: str, env: dict, cwd: str) -> dict:
    """Where ``bioclip_fast`` and ``bioclip_fast.kernels`` import from in a step's environment and working folder."""
    code = ("import json, bioclip_fast, bioclip_fast.kernels.clip_loss as p\n"
            "print(json.dumps({'bioclip_fast': bioclip_fast.__file__, 'kernels': p.__file__}))\n")
    proc = subprocess.run([python, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]}
    checkout = (ROOT / "bioclip_fast" / "kernels").resolve()
    info["kernels_from_checkout"] = Path(info["kernels"]).resolve().is_relative_to(checkout)
    return info


def plan(args, out: Path) -> dict[str, list[str]]:
    """The command of each step. ``out`` is the folder the steps write into (a scratch folder that is packed into
    OUTDIR/gpu_check.tar.gz). ``--rehearse``: the same steps on CPU at tiny sizes."""
    py = args.python
    tests = [str(ROOT / "tests" / "test_triton_kernels.py"), str(ROOT / "tests" / "test_loss_precision.py"),
             str(ROOT / "tests")]  # kernel tests first (pytest drops the duplicates)
    pytest_cmd = [py, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", "--rootdir", str(ROOT),
                  "-c", str(ROOT / "pyproject.toml"), f"--junitxml={out / 'pytest' / 'junit.xml'}"] + tests
    if args.rehearse:
        return {
            "env": [py, str(ROOT / "benchmarks" / "gpu_check.py"), "--_env", str(out / "env.json")],
            "pytest": pytest_cmd,
            "loss": [py, "-m", "bioclip_fast.cli", "bench-loss", "--device", "cpu", "--dims", "32", "--impls", "ours",
                     "open_clip", "--repeats", "1", "--warmup", "0", "--batch-sizes", "64", "128", "--dtypes",
                     "fp32", "--order", "size", "--expect-backend", "triton", "--out", str(out / "loss")],
            "kernels": [py, str(ROOT / "benchmarks" / "bench_kernels.py"), "--device", "cpu", "--B", "64", "--D",
                        "32", "--dtype", "fp32", "--kinds", "sym", "--bwd", "fused", "gemm2d", "--out",
                        str(out / "kernels")],
            "decode": [py, str(ROOT / "benchmarks" / "bench_decode.py"), "--images", "8", "--backends", "all",
                       "--out", str(out / "decode")],
            "train": [py, str(ROOT / "benchmarks" / "bench_train.py"), "--cpu-smoke", "--engine", "torch",
                      "--modes", "plain", "--batch-sizes", "4", "--steps", "1", "--warmup", "0",
                      "--out", str(out / "train" / "bench_train.json")],
        }
    loss_common = [py, "-m", "bioclip_fast.cli", "bench-loss", "--device", "cuda", "--dims", "768",
                   "--impls", "ours", "open_clip", "inf_cl", "--repeats", "2", "--warmup", "1", "--time-budget", "6",
                   "--order", "size", "--expect-backend", "triton"]
    return {
        "env": [py, str(ROOT / "benchmarks" / "gpu_check.py"), "--_env", str(out / "env.json")],
        "pytest": pytest_cmd,
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


def step_env(name: str, env: dict, rehearse: bool) -> dict:
    """The environment of one step: the GPU run's, or (``--rehearse``) the same plus the interpreter on the GPU's
    launch path (autotuned wrappers, config lists, pruning) and the Triton backend forced for ``ours``."""
    e = dict(env)
    if name in ("pytest", "loss"):
        # default configs only: pytest must not spend its box benchmarking configs; the ladder would autotune
        # every power-of-two bucket up to 1M (a full sweep per trial). The kernels step autotunes at 32k.
        e["BIOCLIP_FAST_AUTOTUNE"] = "0"
    if rehearse:
        e.update(TRITON_INTERPRET="1", BIOCLIP_FAST_INTERPRET_AUTOTUNED="1", BIOCLIP_FAST_BACKEND="triton",
                 CUDA_VISIBLE_DEVICES="")
    return e


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
    try:
        import bioclip_fast
        import bioclip_fast.kernels.clip_loss as kp

        info["bioclip_fast"] = bioclip_fast.__file__
        info["bioclip_fast.kernels"] = kp.__file__
    except Exception as exc:  # noqa: BLE001 - reported
        info["bioclip_fast_error"] = repr(exc)
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


def _junit_counts(path: Path) -> dict | None:
    """tests / failures / errors / skipped of a pytest junit file (None when it does not exist)."""
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    return {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}


def step_verdict(name: str, rc: int | None, work: Path, rehearse: bool) -> tuple[str, str | None]:
    """(status, reason): a step is ok only if its process exited 0 and it did what it is for."""
    if rc is None:
        return "timeout", None
    if rc != 0:
        return "failed", f"exit code {rc}"
    if name == "pytest":
        counts = _junit_counts(work / "pytest" / "junit.xml")
        if not counts or counts["tests"] == 0:
            return "failed", "pytest collected no tests (a module failed to import?)"
        if not rehearse and counts["tests"] == counts["skipped"]:
            return "failed", "every GPU test was skipped on a GPU host"
    return "ok", None


def pack(out: Path, work: Path, result: dict, final: bool = False) -> None:
    """Write OUTDIR's files from the scratch folder: gpu_check.json, the tarball of everything, the summary PNG and
    copies of the ladder's / kernel benchmark's PNGs. Atomic per file (a run killed mid-write keeps the last)."""
    import tarfile

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(str(work), arcname="gpu_check")
    os.replace(tmp, out / "gpu_check.tar.gz")
    for name, pattern in (("loss.png", "loss/*.png"), ("kernels.png", "kernels/*.png")):
        found = sorted(work.glob(pattern))
        if found:
            shutil.copyfile(found[-1], out / name)
    result["outdir_files"] = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    if final or result["steps"]:
        try:
            result["png_renderer"] = summary_png(result, out / "gpu_check.png")
        except Exception as exc:  # noqa: BLE001 - the JSON is the result
            result["png_error"] = repr(exc)
    (out / ".gpu_check.json.tmp").write_text(json.dumps(result, indent=1))
    os.replace(out / ".gpu_check.json.tmp", out / "gpu_check.json")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_env"]:
        return write_env(argv[1])
    args = parse_args(argv)
    out = Path(args.out).resolve()
    env = dict(os.environ)
    paths = site_paths(args.site)
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_INTERPRET"] = "0"
    env.pop("BIOCLIP_FAST_BACKEND", None)
    env.pop("BIOCLIP_FAST_INTERPRET_AUTOTUNED", None)
    steps = [s for s in STEPS if not args.only or s[0] in args.only]

    if args.dry_run:
        commands = plan(args, Path("<scratch>"))
        print(f"gpu_check plan (budget {args.budget_s:.0f} s{', rehearsal on CPU' if args.rehearse else ''}; "
              f"PYTHONPATH=<package tree>:{os.pathsep.join(paths + [str(ROOT)])}; each step's cwd = its scratch "
              f"folder; OUTDIR gets {', '.join(OUT_FILES)}):")
        total_share = sum(s[1] for s in steps)
        for name, share, desc in steps:
            print(f"  {name:8s} box {args.budget_s * share / total_share:5.0f} s  {desc}\n"
                  f"           {' '.join(commands[name])}")
        return 0

    base_pp = paths + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    probe_env = dict(env, PYTHONPATH=os.pathsep.join(base_pp))
    if args.rehearse:
        probe_env.update(TRITON_INTERPRET="1")
    pre = preflight(args.python, probe_env)
    if not args.rehearse:
        if not pre.get("cuda"):
            why = pre.get("torch_error") or pre.get("error") or "torch.cuda.is_available() is False"
            print(f"gpu_check: no CUDA GPU on this host ({why}); nothing to check. `--dry-run` prints the plan, "
                  f"`--rehearse` runs it on CPU.", file=sys.stderr)
            return NO_GPU_EXIT
        if "triton" not in pre or _version_tuple(pre["triton"]) < (3, 6):
            print(f"gpu_check: error: triton >= 3.6 is needed, found {pre.get('triton', pre.get('triton_error'))}",
                  file=sys.stderr)
            return 2
    tree = package_tree()
    env["PYTHONPATH"] = os.pathsep.join([tree] + base_pp)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    commands = plan(args, work)
    (work / "logs").mkdir()
    for name, _, _ in steps:
        (work / name).mkdir(exist_ok=True)
    package = probe_package(args.python, step_env("env", env, args.rehearse), str(work / "env"))
    if not package.get("kernels_from_checkout"):
        print(f"gpu_check: error: bioclip_fast.kernels does not import from {ROOT / 'bioclip_fast' / 'kernels'}: {package}",
              file=sys.stderr)
        shutil.rmtree(tree, ignore_errors=True)
        return 2

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    result = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "budget_s": args.budget_s,
              "rehearsal": args.rehearse, "package": package, "preflight": pre, "environment": {}, "steps": [],
              "complete": False}
    current: dict = {}

    def on_signal(signum, frame):  # the outer time limit: stop the step, keep what exists
        proc = current.get("proc")
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        result["interrupted"] = f"signal {signum} during {current.get('name')}"
        result["total_seconds"] = round(time.monotonic() - t_start, 1)
        pack(out, work, result, final=True)
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pack(out, work, result)
    remaining_share = sum(s[1] for s in steps)
    for name, share, desc in steps:
        now = time.monotonic()
        box = max(5.0, (deadline - now) * share / remaining_share)
        remaining_share -= share
        rec = {"name": name, "what": desc, "command": commands[name], "box_s": round(box, 1),
               "cwd": str(work / name)}
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
            pack(out, work, result)
            continue
        senv = step_env(name, env, args.rehearse)
        if senv.get("BIOCLIP_FAST_AUTOTUNE") == "0":
            rec["note"] = (rec.get("note", "") + " default (spill-free) configs: BIOCLIP_FAST_AUTOTUNE=0").strip()
        log = work / "logs" / f"{name}.log"
        print(f"[gpu_check] {name}: {desc} (box {box:.0f} s)", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as fh:
            proc = subprocess.Popen(commands[name], stdout=fh, stderr=subprocess.STDOUT, env=senv,
                                    cwd=str(work / name), start_new_session=True)
            current.update(proc=proc, name=name)
            try:
                rc = proc.wait(timeout=box)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = None
            current.clear()
        status, reason = step_verdict(name, rc, work, args.rehearse)
        rec.update(status=status, returncode=rc, seconds=round(time.monotonic() - t0, 1), log=f"logs/{name}.log",
                   outputs=sorted(str(Path(p).relative_to(work)) for p in glob.glob(str(work / name / "**" / "*"),
                                                                                     recursive=True)
                                  if Path(p).is_file()))
        if reason:
            rec["reason"] = reason
        if name == "pytest":
            rec["junit"] = _junit_counts(work / "pytest" / "junit.xml")
        rec["log_tail"] = log.read_text(errors="replace")[-1500:]
        result["steps"].append(rec)
        print(f"[gpu_check] {name}: {status} in {rec['seconds']:.0f} s" + (f" ({reason})" if reason else ""),
              flush=True)
        if name == "env" and (work / "env.json").exists():
            result["environment"] = json.loads((work / "env.json").read_text())
        result["total_seconds"] = round(time.monotonic() - t_start, 1)
        pack(out, work, result)
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    result["complete"] = True
    pack(out, work, result, final=True)
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    failed = [s["name"] for s in result["steps"] if s["status"] in ("failed", "timeout")]
    print(f"[gpu_check] done in {result['total_seconds']:.0f} s; results in {out}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
