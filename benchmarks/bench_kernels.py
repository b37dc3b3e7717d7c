"""Kernel-level timing of the fused loss kernels on a CUDA GPU (the loss-level comparison with open_clip and Inf-CL
is ``bioclip-fast bench-loss``).

    python benchmarks/bench_kernels.py --B 4096 16384 32768 --D 768 --dtype bf16 --kinds sym dir siglip \
        --bwd fused gemm

For each (kind, B, D, dtype): forward, backward and forward+backward medians (``triton.testing.do_bench``, CUDA
events, autotuning and compilation excluded), TFLOP/s in the reported convention (8*B^2*D for fwd+bwd, 2*B^2*D for
fwd) and in executed FLOPs (gemm backward: 8*B^2*D, one recompute; fused: 2 + 2*(1 + slices)*... see
``executed_flops``: each of the dQ / dK kernels recomputes the logits once per D slice), the same-shape bf16/fp32
``q @ k^T`` matmul rate as the ceiling to compare with, extra peak memory beyond inputs and gradients, the
autotuner's picks, and a float64 spot check of the loss. Writes JSON + PNG under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F


def _dtype(name):
    """Feature dtype; "fp32-bf16" = fp32 features with bf16 products (the trainer's path: cast per chunk inside
    the launchers, fp32 gradients, the one-recompute gemm2d backward)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-bf16": torch.float32}[name]


def _compute(name):
    return torch.bfloat16 if name == "fp32-bf16" else None


DEVICE = "cuda"  # "cpu" only under TRITON_INTERPRET=1 (gpu_check --rehearse: the plumbing, not a measurement)


def _inputs(kind, B, D, dtype, gen):
    Bq = B if kind == "sym" else B // 2
    offset = 0 if kind == "sym" else B - Bq
    q = F.normalize(torch.randn(Bq, D, device=DEVICE, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, D, device=DEVICE, generator=gen), dim=-1).to(dtype)
    return q, k, offset


def _time_ms(fn, args):
    """Median ms: triton's do_bench (CUDA events) on a GPU; one wall-clock run on CPU (rehearsal)."""
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_extra(fn):
    """(output, peak bytes allocated beyond what existed before) on CUDA; (output, None) on CPU."""
    if DEVICE != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def _fns(kind, q, k, scale, bias, offset, compute=None):
    from bioclip_fast.kernels import clip_loss as CL
    from bioclip_fast.kernels import siglip_loss as SL

    if kind == "sym":
        def fwd():
            return CL.clip_sym_fwd(q, k, scale, bias, compute=compute)
        saved = fwd()

        def bwd():
            return CL.clip_sym_bwd(q, k, scale, bias, saved[1], saved[2], 1.0, compute=compute)
    elif kind == "dir":
        def fwd():
            return CL.clip_dir_fwd(q, k, scale, bias, offset, compute=compute)
        saved = fwd()

        def bwd():
            return CL.clip_dir_bwd(q, k, scale, bias, saved[1], offset, 1.0, compute=compute)
    else:
        def fwd():
            return SL.siglip_fwd(q, k, scale, bias, offset, compute=compute)
        saved = fwd()

        def bwd():
            return SL.siglip_bwd(q, k, scale, bias, offset, 1.0)
    return fwd, bwd, saved


def _loss64(kind, q, k, scale, bias, offset, chunk=1024):
    """float64 loss in chunks of 1024 rows / columns (no B x B allocation)."""
    q64, k64 = q.double(), k.double()
    s, b = scale.double(), (bias.double() if bias is not None else 0.0)
    Bq, Bk = q.shape[0], k.shape[0]
    total = 0.0
    for r0 in range(0, Bq, chunk):
        S = s * q64[r0:r0 + chunk] @ k64.T + b
        rows = torch.arange(r0, min(r0 + chunk, Bq), device=q.device)
        cols = rows + offset
        if kind == "siglip":
            z = -torch.ones_like(S)
            ok = (cols >= 0) & (cols < Bk)
            z[(rows - r0)[ok], cols[ok]] = 1
            total += (-F.logsigmoid(z * S)).sum().item()
        else:
            total += (S.logsumexp(1) - S[rows - r0, cols]).sum().item()
    loss = total / Bq
    if kind == "sym":  # text -> image direction: column log-sum-exp
        col = 0.0
        for c0 in range(0, Bk, chunk):
            S = s * q64 @ k64[c0:c0 + chunk].T + b
            idx = torch.arange(c0, min(c0 + chunk, Bk), device=q.device)
            col += (S.logsumexp(0) - S[idx, idx - c0]).sum().item()
        loss = 0.5 * (loss + col / Bk)
    return loss


def run_case(kind, B, D, dtype_name, bwd_strategy, args):
    from bioclip_fast.kernels import backward_fused, clip_loss, planner, siglip_loss

    os.environ["BIOCLIP_FAST_BWD"] = bwd_strategy
    dtype = _dtype(dtype_name)
    gen = torch.Generator(device=DEVICE).manual_seed(B * 7 + D)
    q, k, offset = _inputs(kind, B, D, dtype, gen)
    scale = torch.tensor(14.3, device=DEVICE)
    bias = torch.tensor(-10.0, device=DEVICE) if kind == "siglip" else None
    t0 = time.perf_counter()
    compute = _compute(dtype_name)
    fwd, bwd, saved = _fns(kind, q, k, scale, bias, offset, compute)
    bwd()
    _sync()
    tune_s = time.perf_counter() - t0

    def both():
        fwd()
        bwd()

    t_fwd = _time_ms(fwd, args)
    t_bwd = _time_ms(bwd, args)
    t_all = _time_ms(both, args)
    Bq, Bk = q.shape[0], k.shape[0]
    mm_a, mm_b = (q, k.T) if compute is None else (q.to(compute), k.T.to(compute))
    t_mm = _time_ms(lambda: mm_a @ mm_b, args)

    out, extra_bwd = _peak_extra(bwd)
    if extra_bwd is not None:
        extra_bwd -= out[0].nbytes + out[1].nbytes
    _, extra_fwd = _peak_extra(fwd)

    flop_fwd = 2 * Bq * Bk * D
    loss = saved[0] if isinstance(saved, tuple) else saved
    op_elem = 2 if compute is not None else q.element_size()
    actual = planner.bwd_plan(Bq, Bk, D, op_elem, q.device.type, grads_fp32=q.dtype == torch.float32,
                                cast=compute is not None)[0]
    cfgs = list(backward_fused.pairwise_bwd_tuned.cache.values())
    slices = max((-(-D // (c.kwargs["NUM_ACC"] * c.kwargs["BLOCK_DO"])) for c in cfgs), default=1)
    rec = {
        "kind": kind, "bwd": bwd_strategy, "B": B, "Bq": Bq, "Bk": Bk, "D": D, "dtype": dtype_name,
        "fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwd_bwd_ms": t_all, "matmul_ms": t_mm,
        "tflops_fwd": flop_fwd / t_fwd * 1e-9,
        "tflops_fwd_bwd_reported": 4 * flop_fwd / t_all * 1e-9,
        "bwd_actual": actual,
        "bwd_slices": slices,
        "tflops_fwd_bwd_executed": executed_flops(Bq, Bk, D, actual, slices) / t_all * 1e-9,
        "tflops_matmul": flop_fwd / t_mm * 1e-9,
        "extra_mem_fwd_mb": None if extra_fwd is None else extra_fwd / 2**20,
        "extra_mem_bwd_mb": None if extra_bwd is None else extra_bwd / 2**20,
        "autotune_and_compile_s": tune_s,
        "fwd_config": str(getattr(clip_loss.clip_fwd_tuned if kind != "siglip" else siglip_loss.siglip_fwd_tuned,
                                  "best_config", None)),
        "bwd_configs": sorted({str(c) for c in backward_fused.pairwise_bwd_tuned.cache.values()}),
        "loss": float(loss),
    }
    if B <= args.check_max_b:
        ref = _loss64(kind, q, k, scale, bias, offset)
        rec["loss_ref_fp64"] = ref
        rec["loss_rel_err"] = abs(float(loss) - ref) / max(abs(ref), 1e-12)
    return rec


def executed_flops(Bq: int, Bk: int, D: int, strategy: str, slices: int = 1) -> int:
    """FLOPs the GPU executes for forward + backward: forward 2; gemm backward: tile recompute 2 + two cuBLAS
    products 4; fused backward: per kernel (dQ, dK) the logits once per D slice (2 * slices) + its product 2."""
    unit = Bq * Bk * D
    if strategy in ("gemm", "gemm2d"):
        return 8 * unit
    return 2 * unit + 2 * (2 * slices + 2) * unit


def cases_for(args) -> list[tuple]:
    """(kind, B, D, dtype, bwd) cases; gemm2d needs fp32 features (for bf16/fp16 ones it would run gemm again)."""
    return [(kd, B, D, dt, bw) for kd in args.kinds for D in args.D for dt in args.dtype for bw in args.bwd
            for B in args.B if not (bw == "gemm2d" and not dt.startswith("fp32"))]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--D", type=int, nargs="+", default=[768])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32", "fp32-bf16"],
                    help="feature dtype; fp32-bf16 = fp32 features, bf16 products (the trainer's path)")
    ap.add_argument("--kinds", nargs="+", default=["sym"], choices=["sym", "dir", "siglip"])
    ap.add_argument("--bwd", nargs="+", default=["fused", "gemm"], choices=["auto", "fused", "gemm", "gemm2d"],
                    help="backward strategies to time (BIOCLIP_FAST_BWD)")
    ap.add_argument("--warmup", type=int, default=25, help="ms (do_bench)")
    ap.add_argument("--rep", type=int, default=200, help="ms (do_bench)")
    ap.add_argument("--check-max-b", type=int, default=16384, help="float64 loss check up to this B")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: under TRITON_INTERPRET=1 only (rehearses the run; the timings mean nothing)")
    return ap


def main(argv=None) -> int:
    global DEVICE
    args = build_parser().parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_kernels: --device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from tqdm import tqdm

    cases = cases_for(args)
    rows = []
    meta = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1 rehearsal)", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "python": platform.python_version()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_kernels.json")
    for case in tqdm(cases, desc="bench kernels"):
        try:
            rows.append(run_case(*case, args))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"kind": case[0], "B": case[1], "D": case[2], "dtype": case[3], "bwd": case[4],
                         "error": f"OOM: {exc}"})
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - recorded as a failed case; the run exits 1
            rows.append({"kind": case[0], "B": case[1], "D": case[2], "dtype": case[3], "bwd": case[4],
                         "error": f"{type(exc).__name__}: {exc}"[:500], "failed": True})
        with open(path + ".tmp", "w") as f:  # after every case: a time-boxed run (gpu_check.sh) keeps what it has
            json.dump({"meta": meta, "results": rows, "complete": len(rows) == len(cases)}, f, indent=1)
        os.replace(path + ".tmp", path)
    print(f"\n{meta['device']}  {meta['date_utc']}  -> {path}")
    print(f"{'kind':6s} {'bwd':5s} {'dtype':5s} {'B':>7s} {'D':>5s} {'fwd ms':>8s} {'bwd ms':>8s} {'f+b ms':>8s} "
          f"{'TF/s rep':>8s} {'TF/s exe':>8s} {'mm TF/s':>8s} {'xMB f/b':>12s} {'relerr':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:6s} {r['bwd']:5s} {r['dtype']:5s} {r['B']:7d} {r['D']:5d}  {r['error'][:60]}")
            continue
        print(f"{r['kind']:6s} {r['bwd']:5s} {r['dtype']:5s} {r['B']:7d} {r['D']:5d} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} "
              f"{r['fwd_bwd_ms']:8.3f} {r['tflops_fwd_bwd_reported']:8.1f} {r['tflops_fwd_bwd_executed']:8.1f} "
              f"{r['tflops_matmul']:8.1f} {r['extra_mem_fwd_mb'] or 0:5.1f}/{r['extra_mem_bwd_mb'] or 0:5.1f} "
              f"{r.get('loss_rel_err', float('nan')):8.1e}")
    failed = [r for r in rows if r.get("failed")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted({(r["kind"], r["D"], r["dtype"], r["bwd"]) for r in rows if "error" not in r}):
            sel = [r for r in rows if "error" not in r and (r["kind"], r["D"], r["dtype"], r["bwd"]) == key]
            ax.plot([r["B"] for r in sel], [r["tflops_fwd_bwd_reported"] for r in sel], "o-",
                    label=f"{key[0]} D={key[1]} {key[2]} bwd={key[3]}")
            ax.plot([r["B"] for r in sel], [r["tflops_matmul"] for r in sel], "k:", alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch B")
        ax.set_ylabel("TFLOP/s (8·B²·D per fwd+bwd); dotted: q@kᵀ matmul")
        ax.set_title(f"fused loss kernels, {meta['device']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_kernels.png"), dpi=120)
    except Exception as exc:  # noqa: BLE001 - the JSON is the result; the plot is a convenience
        print(f"plot skipped: {exc!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
