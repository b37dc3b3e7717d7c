"""`bioclip-fast bench-loss`: forward+backward time, peak extra memory and TFLOP/s of the contrastive loss.

Implementations: ``ours`` (FusedClipLoss, backend auto: Triton on CUDA, C++ on CPU), ``reference`` (our torch
chunked reference), ``open_clip`` (open_clip.ClipLoss, dense B×B logits; skipped when its logits would not fit),
``inf_cl`` (Inf-CL's ``cal_inf_loss`` called for both directions; CUDA only). FLOPs are counted as 8·B²·D (forward
GEMM + backward recompute + dQ + dK) for every implementation, so TFLOP/s compares wall time on equal work.
Peak extra memory: CUDA ``max_memory_allocated`` above the inputs; CPU peak RSS (VmHWM, reset through
/proc/self/clear_refs) above the RSS before the call.

Writes ``<out>/loss_<device>_<date>.json`` (device name, versions, every measurement) and a PNG plot.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

from bioclip_fast.errors import UsageError
from bioclip_fast.fileio import atomic_write_text

IMPLS = ("ours", "reference", "open_clip", "inf_cl")
# "fp32-train": fp32 features as a trainer hands them, every implementation called under bf16 autocast (open_clip's
# training setup; ours follows autocast through compute_dtype="auto", so its products run in bf16 on tensor cores).
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32-train": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="B values (default: CUDA 4096..1048576 doubling until OOM; CPU 4096 8192)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="D values (default: CUDA 512 768 1024; CPU 512)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default: CUDA bf16 fp32; CPU fp32")
    parser.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                        help="default: CUDA ours open_clip inf_cl; CPU ours reference open_clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs per point (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--max-dense-gb", type=float, default=None,
                        help="skip open_clip when its B×B logits (x4 live copies) exceed this (default: 60%% of "
                             "free GPU memory / 25%% of RAM)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop growing B for an implementation once one fwd+bwd took longer than this many "
                             "seconds (default: 20 on CUDA, none on CPU)")
    parser.add_argument("--quick", action="store_true", help="small CPU sizes (~1 minute): B 1024 2048 4096, D 512")
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--order", default="impl", choices=["impl", "size"],
                        help="impl: each implementation through all B in turn; size: every implementation at a B "
                             "before the next B (the comparison points at small B finish first)")
    parser.add_argument("--expect-backend", default=None, choices=["triton", "cpp", "torch"],
                        help="fail a row of ours whose ops ran another backend (e.g. the torch reference after a "
                             "failed Triton import) instead of labelling it ours")


# ------------------------------------------------------------------------------------------------ measuring
def _rss(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _fix_mmap_threshold() -> None:
    """Make glibc serve every buffer >= 1 MiB with mmap and give it back on free: otherwise freed tensors stay
    resident and later, smaller peaks are invisible to the RSS high-water mark."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed value also disables the dynamic threshold)


def _reset_cpu_peak() -> bool:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _loss_fn(impl: str):
    import torch

    if impl == "ours":
        from bioclip_fast.loss import FusedClipLoss

        mod = FusedClipLoss(check_finite=False)
        return lambda i, t, s: mod(i, t, s)
    if impl == "reference":
        from bioclip_fast.loss import FusedClipLoss

        mod = FusedClipLoss(backend="torch", check_finite=False)
        return lambda i, t, s: mod(i, t, s)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        mod = ClipLoss()
        return lambda i, t, s: mod(i, t, s)
    if impl == "inf_cl":
        from inf_cl import cal_inf_loss

        def inf(i, t, s):
            s = s.reshape(())
            return 0.5 * (cal_inf_loss(i, t, scale=s) + cal_inf_loss(t, i, scale=s))

        return inf
    raise ValueError(f"unknown implementation {impl!r}")


def measure(impl: str, B: int, D: int, dtype_name: str, device, repeats: int, warmup: int) -> dict:
    """Median fwd+bwd seconds and peak extra bytes of one implementation at one size."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    g = torch.Generator(device="cpu").manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype)
    txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(14.285, device=device, requires_grad=True)
    fn = _loss_fn(impl)
    cuda = device.type == "cuda"
    from bioclip_fast.ops import dispatch

    dispatch.CALLS.clear()

    autocast = dtype_name == "fp32-train"

    def step():
        img.grad = txt.grad = scale.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(img, txt, scale)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    times, cpu_times, peak = [], [], 0
    loss_val = None
    for _ in range(repeats):
        img.grad = txt.grad = scale.grad = None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            loss = step()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            reset = _reset_cpu_peak()
            base = _rss("VmRSS")
            c0, t0 = time.process_time(), time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            hwm = _rss("VmHWM")
            if reset and base is not None and hwm is not None:
                peak = max(peak, hwm - base)
            else:
                peak = None
        loss_val = float(loss.detach())
    t = statistics.median(times)
    row = {
        "impl": impl, "B": B, "D": D, "dtype": dtype_name, "seconds": t, "seconds_min": min(times),
        "seconds_all": times, "tflops": 8 * B * B * D / t / 1e12, "peak_extra_bytes": peak, "loss": loss_val,
    }
    if impl in ("ours", "reference"):
        row["backend"] = sorted(dispatch.CALLS)  # which implementation the ops actually ran
    if cpu_times:
        # CPU seconds of all threads: on a shared machine this is steadier than wall time (time-slicing by other
        # jobs does not count), so speedups are also reported on it.
        row["cpu_seconds"] = min(cpu_times)
    return row


def _fits_dense(B: int, D: int, dtype_name: str, device, max_gb: float | None) -> bool:
    import torch

    elem = 4 if dtype_name == "fp32" else 2
    need = 4 * B * B * elem  # logits per image + per text + softmax grads (open_clip keeps ~4 live B×B copies)
    if max_gb is not None:
        return need <= max_gb * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need <= 0.6 * free
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need <= 0.25 * total


def environment(device) -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        from bioclip_fast.sysinfo import cpu_name

        info["device_name"] = cpu_name()
        info["threads"] = torch.get_num_threads()
        info["cpu_count"] = os.cpu_count()
        try:
            info["loadavg_before"] = os.getloadavg()
        except OSError:
            pass
    return info


# ------------------------------------------------------------------------------------------------ plotting
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["measurements"] if "seconds" in r]
    combos = sorted({(r["D"], r["dtype"]) for r in rows})
    if not combos:
        return
    fig, axes = plt.subplots(2, len(combos), figsize=(5 * len(combos), 8), squeeze=False)
    for col, (D, dt) in enumerate(combos):
        for impl in IMPLS:
            pts = sorted((r["B"], r["seconds"], r["peak_extra_bytes"]) for r in rows
                         if r["impl"] == impl and r["D"] == D and r["dtype"] == dt)
            if not pts:
                continue
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                axes[1][col].plot([m[0] for m in mem], [max(m[1], 1) / 2**20 for m in mem], "o-", label=impl)
        axes[0][col].set(xscale="log", yscale="log", title=f"fwd+bwd time, D={D} {dt}", xlabel="B", ylabel="s")
        axes[1][col].set(xscale="log", yscale="log", title=f"peak extra memory, D={D} {dt}", xlabel="B",
                         ylabel="MiB")
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    env = results["environment"]
    fig.suptitle(f"contrastive loss fwd+bwd on {env['device_name']} ({env['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ driver
def run(args) -> int:
    import torch
    from tqdm import tqdm

    from bioclip_fast.devices import resolve_device

    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: bench-loss runs on cpu or cuda")
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--dims", args.dims)):
        bad = [v for v in values or () if v < 1]
        if bad:
            raise UsageError(f"{flag}: {bad[0]} is not a positive size")
    cuda = device.type == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if not cuda:
        _fix_mmap_threshold()
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    if args.quick:
        sizes, dims, dtypes = [1024, 2048, 4096], [512], ["fp32"]
    elif cuda:
        sizes = [4096 * 2**i for i in range(9)]  # up to 1,048,576
        dims, dtypes = [512, 768, 1024], ["bf16", "fp32"]
    else:
        sizes, dims, dtypes = [4096, 8192], [512], ["fp32"]
    sizes = args.batch_sizes or sizes
    dims = args.dims or dims
    dtypes = args.dtypes or dtypes
    impls = list(dict.fromkeys(args.impls or (["ours", "open_clip", "inf_cl"] if cuda else
                                               ["ours", "reference", "open_clip"])))
    if args.time_budget is None and cuda:
        args.time_budget = 20.0
    notes = []
    if not cuda and "inf_cl" in impls:
        impls.remove("inf_cl")
        notes.append("inf_cl skipped: Inf-CL's kernels need CUDA")
    if not cuda and any(d != "fp32" for d in dtypes):
        notes.append("CPU: bf16/fp16 inputs are upcast to fp32 by the C++ path; timing them measures the same kernels")

    results = {"environment": environment(device), "notes": notes, "measurements": []}
    points = [(D, dt, impl, B) for D in dims for dt in dtypes for impl in impls for B in sorted(sizes)]
    if args.order == "size":  # all implementations at each B before the next B (then dtype, D)
        points.sort(key=lambda p: (p[3], p[1] != dtypes[0], dims.index(p[0]), dtypes.index(p[1]),
                                   impls.index(p[2])))
    stopped: set[tuple] = set()
    for D, dt, impl, B in tqdm(points, desc="bench-loss", unit="pt"):
        key = (D, dt, impl)
        row = {"impl": impl, "B": B, "D": D, "dtype": dt}
        if key in stopped:
            row["skipped"] = "a smaller B already failed or exceeded the time budget"
        elif impl == "open_clip" and not _fits_dense(B, D, dt, device, args.max_dense_gb):
            row["skipped"] = "dense B×B logits would not fit"
        else:
            try:
                row = measure(impl, B, D, dt, device, args.repeats, args.warmup)
                if impl == "ours" and args.expect_backend and row.get("backend") != [args.expect_backend]:
                    row = {"impl": impl, "B": B, "D": D, "dtype": dt, "backend": row.get("backend"),
                           "failed": f"ours ran {row.get('backend')}, expected {args.expect_backend}: not timed as ours",
                           "unlabelled_seconds": row["seconds"]}
                    stopped.add(key)
                if "seconds" in row and args.time_budget is not None and row["seconds"] > args.time_budget:
                    stopped.add(key)
            except torch.cuda.OutOfMemoryError as exc:  # noqa: PERF203
                row["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
                stopped.add(key)
            except (RuntimeError, ImportError) as exc:
                # ours must run: its error fails the row (a competitor that cannot run here is skipped)
                row["failed" if impl == "ours" else "skipped"] = (
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                stopped.add(key)
            finally:
                if cuda:
                    torch.cuda.empty_cache()
        results["measurements"].append(row)
        _write_partial(args, results, device)  # a killed run (time box) keeps what it measured
        if "seconds" in row:
            mem = row["peak_extra_bytes"]
            tqdm.write(f"{impl:>10} B={B:>8} D={D:>5} {dt}: {row['seconds'] * 1e3:10.1f} ms  "
                       f"{row['tflops']:7.3f} TFLOP/s  peak extra "
                       f"{'n/a' if mem is None else f'{mem / 2**20:.1f} MiB'}")
        else:
            tqdm.write(f"{impl:>10} B={B:>8} D={D:>5} {dt}: {'FAILED' if 'failed' in row else 'skipped'} "
                       f"({row.get('failed') or row.get('skipped')})")

    # Speedups of ours over every other implementation at the same point.
    by_key = {(r["impl"], r["B"], r["D"], r["dtype"]): r for r in results["measurements"] if "seconds" in r}
    speedups = []
    for (impl, B, D, dt), r in by_key.items():
        if impl == "ours":
            continue
        ours = by_key.get(("ours", B, D, dt))
        if ours:
            sp = {"vs": impl, "B": B, "D": D, "dtype": dt, "speedup": r["seconds"] / ours["seconds"],
                  "speedup_best_wall": r["seconds_min"] / ours["seconds_min"]}
            if "cpu_seconds" in r and "cpu_seconds" in ours:
                sp["speedup_cpu_time"] = r["cpu_seconds"] / ours["cpu_seconds"]
            speedups.append(sp)
    results["speedup_of_ours"] = speedups
    for s in speedups:
        extra = f", best wall {s['speedup_best_wall']:.2f}x" + (
            f", CPU time {s['speedup_cpu_time']:.2f}x" if "speedup_cpu_time" in s else "")
        tqdm.write(f"ours vs {s['vs']:>10} B={s['B']} D={s['D']} {s['dtype']}: median wall {s['speedup']:.2f}x{extra}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = results["environment"]["date"][:10]
    stem = f"loss_{device.type}_{date}{('_' + args.tag) if args.tag else ''}"
    atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=2))
    (out / f"{stem}.partial.json").unlink(missing_ok=True)
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    failed = [r for r in results["measurements"] if "failed" in r]
    if failed:
        print(f"bench-loss: {len(failed)} row(s) failed: {failed[0]['failed']}")
        return 1
    return 0


def _write_partial(args, results: dict, device) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = results["environment"]["date"][:10]
    stem = f"loss_{device.type}_{date}{('_' + args.tag) if args.tag else ''}"
    atomic_write_text(out / f"{stem}.partial.json", json.dumps(results, indent=2))  # a kill mid-write keeps the last

