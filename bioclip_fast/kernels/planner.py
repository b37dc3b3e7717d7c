"""Memory plans and FLOP counts of the pairwise losses: pure Python, no triton or torch, so a plan can be checked
(and tested) on any machine.

Every function here is a closed form in B, D and element sizes: the extra device memory of each backward strategy
(``fused_extra_bytes``, ``gemm_extra_bytes``, ``gemm2d_extra_bytes``) and of a forward in chunks
(``fwd_extra_bytes``), the strategy and chunking chosen to fit ``BWD_MEMORY_BYTES`` (``bwd_plan``, ``fwd_chunks``,
``gemm2d_chunks``), and the FLOPs the benchmarks report (``pairwise_flops``). The launchers
(``backward``, ``backward_gemm``, ``clip_loss``, ``siglip_loss``) read the budget and chunk floor from this module
at call time.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bioclip_fast.kernels.settings import interpreting

if TYPE_CHECKING:
    import torch


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints (``triton.cdiv``)."""
    return (a + b - 1) // b


# Extra device memory the backward may use beyond its inputs and outputs (bytes); the strategy is chosen to fit.
BWD_MEMORY_BYTES = int(os.environ.get("BIOCLIP_FAST_BWD_MEMORY_MB", "64")) * 2**20
MIN_CHUNK = 256  # narrower chunks make skinny GEMMs: below this the GEMM backward is not worth it
CENTRE_ROWS = 1024  # positive_dots' chunk (3 fp32 [rows, D] temporaries: 9 MB at D = 768)
REDUCE_COLS = 4096  # reduce_lse's chunk: its float64 temporaries stay ~REDUCE_TEMPS * 8 * S * 4096 bytes
REDUCE_TEMPS = 6  # float64 [S, chunk] temporaries alive at once in reduce_lse (conversions, log, sum, logsumexp)

# Upper bound of the forward's G row groups / H column splits (``clip_loss._grid_split``: G <= isqrt(T),
# H <= cdiv(T, G), T = 4 x SMs): 26 covers GPUs up to ~170 SMs (H100 / H200: 132 -> G = 22, H = 24).
FWD_SPLITS = 26


def floor128(n: int) -> int:
    """``n`` rounded down to a multiple of 128 (the largest tile)."""
    return n // 128 * 128


def clamp_chunks(chunks: tuple[int, int], Bq: int, Bk: int) -> tuple[int, int]:
    """(rows, cols) chunks within [1, Bq] x [1, Bk]."""
    return max(1, min(chunks[0], Bq)), max(1, min(chunks[1], Bk))


def fused_extra_bytes(Bq: int, Bk: int, D: int) -> int:
    """Extra memory of the fused backward: scale-gradient partials and centres (O(B)), plus the chunked
    temporaries of ``positive_dots``."""
    return 4 * (2 * cdiv(Bq, 16) + 2 * max(Bq, Bk)) + 3 * 4 * min(Bq, CENTRE_ROWS) * D


def gemm_extra_bytes(Bq: int, Bk: int, D: int, elem: int, chunk: int) -> int:
    """Extra memory of the GEMM-assisted backward with a ``chunk``-column workspace: the [Bq, chunk] gradient
    tiles, the fp32 dQ accumulator (every dtype: cuBLAS accumulates into it), two fp32 [chunk, D] dK temporaries,
    per-program partials and the centres."""
    chunk = min(chunk, Bk)
    parts = 2 * cdiv(Bq, 16) * cdiv(chunk, 16) + cdiv(chunk, 16) * Bq  # + row-sum partials
    return (Bq * chunk * elem + 4 * Bq * D + 2 * 4 * chunk * D + 4 * parts + 8 * Bq
            + fused_extra_bytes(Bq, Bk, D))


def bwd_plan(Bq: int, Bk: int, D: int, elem: int, device_type: str, budget: int | None = None,
             choice: str | None = None, *, grads_fp32: bool = False, cast: bool = False):
    """(strategy, chunk) of the backward for a [Bq, D] x [Bk, D] problem whose features are ``elem`` bytes each.

    ``gemm`` (one recompute of the logits: a gradient-tile kernel + cuBLAS, 6*Bq*Bk*D FLOPs) wherever its extra
    memory (``gemm_extra_bytes``) fits ``budget`` with at least ``MIN_CHUNK`` columns per chunk, on CUDA for
    D > 128 (below that the fused kernels keep all of dX in registers and the tile recompute is cheap); the widest
    chunk that fits (fewer read-modify-writes of the dQ accumulator). Otherwise ``fused`` (two Triton kernels,
    O(B) extra memory: the logits are recomputed in the dQ and in the dK kernel). With the 64 MiB default at
    D = 768 bf16 that is gemm up to B ~ 18k and fused above, so the default stays within budget at every B.

    With fp32 gradients (``grads_fp32``: fp32 features, whatever the compute dtype; ``cast``: the products run
    in another dtype, ``elem`` bytes, on per-chunk casts) the gradients themselves are the accumulators:
    ``gemm2d`` (one recompute, (row x column)-chunked, ``gemm2d_extra_bytes``) fits the budget at every B and is
    the default on CUDA for D > 128, and for any D where the fused kernels' full casts of q and k would not fit.

    ``choice`` (default: ``BIOCLIP_FAST_BWD``, auto|fused|gemm|gemm2d) forces a strategy; a forced gemm takes the
    widest chunk within the budget, but at least ``MIN_CHUNK`` columns (the caller asked for it); a forced gemm2d
    without fp32 gradients runs gemm. Returns (strategy, chunk): chunk is the column count for gemm, the (rows,
    cols) pair for gemm2d, 0 for fused.
    """
    if choice is None:
        choice = os.environ.get("BIOCLIP_FAST_BWD", "auto").strip().lower()
    if choice not in ("auto", "fused", "gemm", "gemm2d"):
        raise ValueError(f"BIOCLIP_FAST_BWD must be auto, fused, gemm or gemm2d, got {choice!r}")
    budget = BWD_MEMORY_BYTES if budget is None else int(budget)
    if grads_fp32:
        chunks2d = gemm2d_chunks(Bq, Bk, D, elem, cast, budget)
        if choice == "gemm2d":
            return "gemm2d", chunks2d or (min(Bq, MIN_CHUNK), min(Bk, MIN_CHUNK))
        if choice == "auto" and device_type == "cuda" and not interpreting() and chunks2d is not None:
            copies = (Bq + Bk) * D * elem if cast else 0  # what the other strategies' full casts would add
            if D > 128 or fused_extra_bytes(Bq, Bk, D) + copies > budget:
                return "gemm2d", chunks2d
    elif choice == "gemm2d":
        choice = "gemm"
    fixed = gemm_extra_bytes(Bq, Bk, D, elem, 0)
    per_col = Bq * elem + 8 * D + 4 * 2 * cdiv(Bq, 16) // 16 + Bq // 4 + 8
    fit = max(0, budget - fixed) // per_col
    chunk = min(Bk, fit // 128 * 128 if fit < Bk else Bk)
    while chunk > 0 and gemm_extra_bytes(Bq, Bk, D, elem, chunk) > budget:  # rounding in the estimate above
        chunk = max(0, chunk - 128)
    if choice == "fused":
        return "fused", 0
    if choice == "gemm":
        return "gemm", max(chunk, min(Bk, MIN_CHUNK))
    ok = device_type == "cuda" and not interpreting() and D > 128 and chunk >= min(Bk, MIN_CHUNK)
    return ("gemm", chunk) if ok else ("fused", 0)


def bwd_strategy(D: int, device: torch.device, Bq: int = 32768, Bk: int | None = None, elem: int = 2) -> str:
    """The strategy ``bwd_plan`` picks (kept for callers that only ask for the name)."""
    return bwd_plan(Bq, Bk or Bq, D, elem, device.type)[0]


def fwd_extra_bytes(Bq: int, Bk: int, D: int, op_elem: int, cast: bool, rows: int, cols: int,
                    splits: int = FWD_SPLITS) -> int:
    """Extra memory of a forward in ``rows x cols`` launches: one row chunk's and one column chunk's cast (only
    while casting; ``chunk_pairs`` reuses one buffer of each), the launch's (max, sum) partials (fp32, <= ``splits``
    per row and per column) and their float64 reduction (``reduce_lse_bytes``; the launch's float64 LSEs, 8 B a
    row / column), the running float64 LSEs and the positive logits (12 B per row, 8 per column)."""
    rows, cols = min(rows, Bq), min(cols, Bk)
    casts = (rows + cols) * D * op_elem if cast else 0
    parts = 8 * splits * (rows + cols) + 8 * (rows + cols) + reduce_lse_bytes(splits, max(rows, cols))
    return casts + parts + 12 * Bq + 8 * Bk


def fwd_chunks(Bq: int, Bk: int, D: int, op_elem: int, cast: bool, budget: int | None = None,
               splits: int = FWD_SPLITS) -> tuple[int, int]:
    """(rows, cols) per forward launch. Without a cast the kernels read q and k as they are: one launch. With one
    (fp32 features, bf16/fp16 products), ``fwd_extra_bytes`` must fit ``budget``: all of q and k at once where
    they do, else about square chunks (each launch is still a (G x H) grid over thousands of tiles)."""
    if not cast:
        return Bq, Bk
    budget = BWD_MEMORY_BYTES if budget is None else int(budget)
    per = D * op_elem + 8 * splits + 8  # a cast row + its share of the partials and of the launch's LSEs
    avail = max(0, budget - 12 * Bq - 8 * Bk - reduce_lse_bytes(splits, max(Bq, Bk)))
    if (Bq + Bk) * per <= avail:
        return Bq, Bk
    s = max(128, floor128(avail // (2 * per)))
    rows, cols = min(Bq, s), min(Bk, s)
    if rows == Bq:
        cols = min(Bk, max(cols, floor128(max(0, avail - Bq * per) // per)))
    elif cols == Bk:
        rows = min(Bq, max(rows, floor128(max(0, avail - Bk * per) // per)))
    return rows, cols


def gemm2d_extra_bytes(Bq: int, Bk: int, D: int, op_elem: int, cast: bool, rows: int, cols: int) -> int:
    """Extra memory of ``pairwise_bwd_gemm2d`` with ``rows x cols`` chunks: the gradient tile workspace, the casts of
    one row chunk and one column chunk (when the compute dtype differs from the features'), per-program partials
    and the centres. The fp32 gradients it accumulates into are its outputs."""
    rows, cols = min(rows, Bq), min(cols, Bk)
    parts = 2 * 4 * cdiv(rows, 16) * cdiv(cols, 16) + 4 * cdiv(cols, 16) * rows + 8 * Bq
    casts = (rows + cols) * D * op_elem if cast else 0
    return rows * cols * op_elem + casts + parts + fused_extra_bytes(Bq, Bk, D)


def gemm2d_chunks(Bq: int, Bk: int, D: int, op_elem: int, cast: bool, budget: int,
                  min_chunk: int | None = None) -> tuple[int, int] | None:
    """Largest (rows, cols) chunks, about square (the read-modify-write traffic of the fp32 gradients goes as
    1/rows + 1/cols), whose ``gemm2d_extra_bytes`` fits ``budget``; None when even ``min_chunk`` x ``min_chunk``
    does not fit. The shorter side is taken whole when it fits (one chunk: its cast is made once)."""
    floor = MIN_CHUNK if min_chunk is None else min_chunk
    avail = budget - fused_extra_bytes(Bq, Bk, D)
    d_term = D * op_elem if cast else 0

    def fill(fixed: int, long: int) -> int:  # chunk of the long side given the short side's chunk
        per = fixed * op_elem + d_term + 8 * cdiv(fixed, 16) // 16 + fixed // 4 + 8
        n = max(0, avail - fixed * d_term) // per
        return long if n >= long else floor128(n) if n >= 128 else n

    # about square: s * s * op_elem + 2 * s * d_term <= avail
    s = int(((d_term ** 2 + op_elem * avail) ** 0.5 - d_term) / op_elem) if avail > 0 else 0
    s = floor128(s) if s >= 128 else s
    if Bq <= Bk:
        rows = min(Bq, max(s, min(Bq, floor)))
        cols = fill(rows, Bk)
    else:
        cols = min(Bk, max(s, min(Bk, floor)))
        rows = fill(cols, Bq)
    while rows > 0 and cols > 0 and gemm2d_extra_bytes(Bq, Bk, D, op_elem, cast, rows, cols) > budget:
        if rows >= cols:
            rows = max(1, rows - 128)
        else:
            cols = max(1, cols - 128)
        if rows == 1 or cols == 1:
            break
    if rows < min(Bq, floor) or cols < min(Bk, floor) or \
            gemm2d_extra_bytes(Bq, Bk, D, op_elem, cast, rows, cols) > budget:
        return None
    return rows, cols


def reduce_lse_bytes(splits: int, n: int) -> int:
    """Peak temporaries of ``reduce_lse`` on [splits, n] partials."""
    return REDUCE_TEMPS * 8 * splits * min(n, REDUCE_COLS)


def pairwise_flops(Bq: int, Bk: int, D: int, backward: bool = True) -> int:
    """Model FLOPs of a fused pairwise loss, the count the benchmarks report: forward 2*Bq*Bk*D (the logits
    GEMM); forward + backward 8*Bq*Bk*D (logits, the backward's recompute, dQ, dK).

    Executed: forward 2*Bq*Bk*D; the GEMM backwards (gemm, gemm2d) 6*Bq*Bk*D (one recompute of each logits tile);
    the fused backward 4*Bq*Bk*D plus 2*Bq*Bk*D per D slice in each of its two kernels (benchmarks/bench_kernels.py's
    ``executed_flops``).
    """
    return (8 if backward else 2) * Bq * Bk * D
