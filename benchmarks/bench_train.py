"""Training throughput benchmark: ViT-L/14 @ 224 px, bf16, DeepSpeed ZeRO-2, the largest per-GPU batch that fits.

For each mode — plain, gradient checkpointing, gradient caching (GradCache chunks) — the per-GPU batch is doubled
until it no longer fits (each try runs in its own process, so an OOM cannot poison the next one), then the
largest fitting batch is timed. Reports img/s per GPU, model TFLOP/s, MFU and HFU (FLOPs formula in
bioclip_fast/train/metrics.py), data-wait fraction and peak memory; writes JSON + a PNG.

    python benchmarks/bench_train.py                                  # one GPU, synthetic on-device batches
    python benchmarks/bench_train.py --data '/data/tol/shard-{000000..000999}.tar'   # + real data (DALI)
    torchrun --nproc-per-node 8 benchmarks/bench_train.py --modes plain
    python benchmarks/bench_train.py --cpu-smoke                      # tiny model on CPU: checks the pipeline only

Synthetic batches measure the model + optimizer + loss alone (data wait 0 by construction); `--data` measures the
whole input pipeline too. CPU-smoke numbers say nothing about GPU speed and are labelled as such in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
OOM_EXIT = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-L-14")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--engine", default="auto", choices=("auto", "deepspeed", "torch"),
                   help="auto: DeepSpeed when it imports, else the plain torch engine (bf16 autocast + AdamW)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--modes", default="plain,grad_checkpointing,grad_cache",
                   help="comma list of plain, grad_checkpointing, grad_cache")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="per-GPU batches to try (default: doubling from --start-batch until OOM)")
    p.add_argument("--start-batch", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8192)
    p.add_argument("--grad-cache-chunk", type=int, default=128, help="chunk size for the grad_cache mode")
    p.add_argument("--grad-cache-batch", type=int, default=None,
                   help="per-GPU contrastive batch in grad_cache mode (default: 4x the largest plain batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, cuDNN autotune)")
    p.add_argument("--data", default=None, help="real shards (default: synthetic batches on the device)")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bench_train_<device>.json)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, fp32: verifies the benchmark itself")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine == "auto":
        try:
            import deepspeed  # noqa: F401
            args.engine = "deepspeed"
        except Exception:  # noqa: BLE001 - any import failure means: no DeepSpeed here
            args.engine = "torch"
    if args.cpu_smoke:
        args.model, args.precision = "bioclip-micro", "fp32"
        args.batch_sizes = args.batch_sizes or [8, 16]
        args.grad_cache_chunk, args.grad_cache_batch = 4, 32
        args.steps, args.warmup, args.num_workers = 3, 1, 0
        args.data = args.data or "bundled"
    return args


# ------------------------------------------------------------------------------------------------ one measurement
def run_one(args, mode: str, batch: int) -> dict:
    """Time `args.steps` steps of one (mode, per-GPU batch) in this process."""
    import torch

    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.trainer import Trainer
    from bioclip_fast.train.metrics import ThroughputMeter, peak_memory_gb

    world = int(os.environ.get("WORLD_SIZE", 1))
    over = {
        "model": args.model, "precision": args.precision, "engine": args.engine,
        # ZeRO is DeepSpeed's: the torch engine (no DeepSpeed on the host) takes no stage
        "zero_stage": args.zero_stage if args.engine == "deepspeed" else None,
        "batch_size": batch * world, "max_steps": 10**6, "schedule_clock": "steps", "warmup_steps": 10,
        "lr": 1e-5, "progress": False, "eval_at_end": False, "out": str(Path(args.tmp) / f"{mode}_{batch}"),
        "grad_checkpointing": mode == "grad_checkpointing", "num_workers": args.num_workers,
        "data": [args.data] if args.data else ["bundled"],
    }
    if mode == "grad_cache":
        over["grad_cache_chunk"] = args.grad_cache_chunk
    tr = Trainer(resolve_config(over), build_data=bool(args.data))
    dev = tr.device
    if args.data:
        it = iter(tr.loader)

        def next_inputs(step):
            nonlocal it
            try:
                b = next(it)
            except StopIteration:
                it = iter(tr.loader)
                b = next(it)
            return tr.batch_inputs(b, step)[0]
    else:
        gen = torch.Generator(device=dev).manual_seed(0)
        s = tr.image_size
        images = torch.randn(batch, 3, s, s, device=dev, generator=gen)
        ctx = tr.clip.context_length
        # distinct captions: the worst case for text de-duplication (TreeOfLife batches have ~all-distinct species)
        text = torch.randint(1, 49000, (batch, ctx), device=dev, generator=gen)
        text[:, -1] = 49407

        def next_inputs(step):
            return {"image": images, "text": text}

    meter = ThroughputMeter(tr.flops, global_batch=batch * world, world_size=world, peak_tflops=tr.meter.peak_tflops,
                            grad_checkpointing=mode == "grad_checkpointing", grad_cache=mode == "grad_cache",
                            window=args.steps)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rates, losses = None, []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        inputs = next_inputs(step)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        losses.append(tr.train_step(inputs)["loss"])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        if step >= args.warmup:
            rates = meter.record(t1 - t0, t2 - t1, tr.module.last_text_fraction)
    mem, mem_kind = peak_memory_gb(dev)
    return {"mode": mode, "batch_per_gpu": batch, "world_size": world, **rates, "peak_mem_gb": mem,
            "peak_mem_kind": mem_kind, "final_loss": losses[-1],
            "grad_cache_chunk": args.grad_cache_chunk if mode == "grad_cache" else None,
            "train_flops_per_sample": tr.flops.train_per_sample(batch * world, world)}


def child_main(args) -> int:
    import torch

    mode, batch = args._child.split(":")
    try:
        res = run_one(args, mode, int(batch))
    except torch.OutOfMemoryError:
        return OOM_EXIT
    except RuntimeError as e:  # DeepSpeed sometimes re-raises OOM as a plain RuntimeError
        if "out of memory" in str(e).lower():
            return OOM_EXIT
        raise
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.result).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------------ orchestration
def measure(args, mode: str, batch: int) -> dict | None:
    """Run one measurement in a fresh process; None on OOM."""
    result = Path(args.tmp) / f"result_{mode}_{batch}.json"
    cmd = [sys.executable, __file__, "--_child", f"{mode}:{batch}", *args.passthrough]
    env = {**os.environ, "BENCH_RESULT": str(result), "BENCH_TMP": args.tmp}
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode == OOM_EXIT:
        print(f"  {mode:20s} batch {batch:5d}: out of memory", flush=True)
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {mode}:{batch} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(result.read_text())
    mfu = f"{100 * res['mfu']:.1f}%" if res.get("mfu") is not None else "n/a"
    print(f"  {mode:20s} batch {batch:5d}: {res['img_s_per_rank']:8.1f} img/s/GPU  "
          f"{res['tflops_per_rank']:7.2f} TFLOP/s  MFU {mfu}  data wait {100 * res['data_wait_frac']:.0f}%  "
          f"peak {res['peak_mem_gb']:.1f} GB  ({time.time() - t:.0f} s)", flush=True)
    return res


def largest_batch(args, mode: str) -> tuple[dict | None, list[dict]]:
    tried = []
    sizes = args.batch_sizes or [args.start_batch * 2**i for i in range(20)
                                 if args.start_batch * 2**i <= args.max_batch]
    best = None
    for b in sizes:
        res = measure(args, mode, b)
        if res is None:
            tried.append({"mode": mode, "batch_per_gpu": b, "oom": True})
            if args.batch_sizes is None:
                break
            continue
        tried.append(res)
        best = res
    return best, tried


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.get("oom")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in ok):
        rs = sorted((r for r in ok if r["mode"] == mode), key=lambda r: r["batch_per_gpu"])
        xs = [r["batch_per_gpu"] for r in rs]
        a1.plot(xs, [r["img_s_per_rank"] for r in rs], "o-", label=mode)
        if all(r.get("mfu") is not None for r in rs):
            a2.plot(xs, [100 * r["mfu"] for r in rs], "o-", label=f"{mode} MFU")
            a2.plot(xs, [100 * r["hfu"] for r in rs], "x--", label=f"{mode} HFU")
        else:
            a2.plot(xs, [r["tflops_per_rank"] for r in rs], "o-", label=f"{mode} TFLOP/s")
    a1.set_xscale("log", base=2)
    a2.set_xscale("log", base=2)
    a1.set(xlabel="per-GPU batch", ylabel="images / s / device", title="throughput")
    a2.set(xlabel="per-GPU batch", ylabel="% of peak bf16 (or TFLOP/s)", title="utilization")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args._child:
        args.result, args.tmp = os.environ["BENCH_RESULT"], os.environ["BENCH_TMP"]
        return child_main(args)
    import tempfile

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_train: no CUDA GPU; use --cpu-smoke to check the pipeline on CPU", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    args.passthrough = argv
    name = device_name()
    tag = "cpu_smoke" if args.cpu_smoke else name.replace(" ", "_").replace("/", "_")
    out = Path(args.out) if args.out else HERE / "results" / f"bench_train_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"plain", "grad_checkpointing", "grad_cache"}
    if unknown:
        print(f"bench_train: unknown modes {sorted(unknown)}", file=sys.stderr)
        return 2
    print(f"bench_train: {args.model} {args.precision} ZeRO-{args.zero_stage} on {name}"
          f"{' (CPU SMOKE: not a GPU measurement)' if args.cpu_smoke else ''}", flush=True)
    results, best = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for mode in modes:
            if mode == "grad_cache":
                continue
            b, tried = largest_batch(args, mode)
            results += tried
            best[mode] = b
        if "grad_cache" in modes:
            plain = best.get("plain")
            gc_batch = args.grad_cache_batch or (4 * plain["batch_per_gpu"] if plain else 4 * args.start_batch)
            res = measure(args, "grad_cache", gc_batch)
            results.append(res or {"mode": "grad_cache", "batch_per_gpu": gc_batch, "oom": True})
            best["grad_cache"] = res
    if args.engine == "deepspeed":
        import deepspeed

        ds_version = deepspeed.__version__
    else:
        ds_version = None

    report = {
        "label": "CPU SMOKE TEST of the benchmark pipeline - not a GPU measurement" if args.cpu_smoke
        else "GPU measurement",
        "device": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "precision": args.precision, "zero_stage": args.zero_stage,
        "data": args.data or "synthetic (on-device tensors)",
        "torch": torch.__version__, "engine": args.engine, "deepspeed": ds_version,
        "steps": args.steps, "warmup_steps": args.warmup,
        "best": {m: r for m, r in best.items() if r},
        "results": results,
    }
    out.write_text(json.dumps(report, indent=1))
    png = out.with_suffix(".png")
    plot(results, png, f"{args.model} {args.precision} ZeRO-{args.zero_stage} · {name} · {report['date'][:10]}"
         + (" · CPU SMOKE" if args.cpu_smoke else ""))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
