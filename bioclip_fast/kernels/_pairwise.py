"""Shared pieces of the pairwise-loss Triton kernels (CLIP softmax losses and the SigLIP sigmoid loss).

Everything here works on two row-major feature matrices, ``Q`` [Bq, D] ("rows") and ``K`` [Bk, D] ("columns"),
and the logits ``S = scale * Q @ K^T + bias`` that are never materialized: kernels compute ``BLOCK x BLOCK`` tiles
of ``Q @ K^T`` with fp32 accumulation (looping over D in ``BLOCK_D`` chunks), use them, and drop them.

The backward kernel is shared by all three losses. It is launched twice per loss: once with the Q rows as its
fixed "outer" block (streaming K, giving dQ) and once with the K rows as the outer block (streaming Q, giving dK).
Each program owns its output rows, so there are no atomics and results are deterministic. The output width D is
covered by ``NUM_ACC`` register accumulators of ``BLOCK_DO`` columns; when D is wider than ``NUM_ACC * BLOCK_DO``
the grid gets a second axis over D slices and each slice recomputes the logits tile (the autotuner weighs that
recompute against register pressure for wide D; see ``bwd_configs``).

For wide D there is a second backward (``pairwise_bwd_gemm``): gradient tiles written to a bounded workspace and
cuBLAS products, each logits tile computed once; ``bwd_plan`` picks one from B, D, the dtype and the memory budget
(see clip_loss.py's docstring).

Uses only Triton APIs present from 3.0 through 3.8 (run here on 3.8; 3.6 not run): tl.dot(input_precision=),
tl.debug_barrier, triton.autotune(restore_value=, prune_configs_by={"early_config_prune"}) whose callback is called
as (configs, named_args) or (configs, named_args, **kwargs) depending on the version.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from bioclip_fast.kernels.precision import input_precision

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# MODE values of the shared backward kernel.
MODE_CLIP_SYM = 0  # G = (0.5 * (P_row + P_col) - onehot)        (single-GPU symmetric CLIP)
MODE_CLIP_DIR = 1  # G = P_row - onehot                          (one direction, multi-GPU local loss)
MODE_SIGLIP = 2  # G = -z * sigmoid(-z * S), z = +1 on positives else -1


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core mode of the kernels' fp32 products, following ``torch.set_float32_matmul_precision`` like
    torch's own fp32 matmuls: "highest" (torch's default) -> exact fp32 ("ieee", CUDA cores), "high" -> 3xTF32
    (about fp32 accuracy on tensor cores), "medium" -> TF32. "" for bf16/fp16 (always tensor cores). The losses
    cast fp32 features to bf16 first under autocast or ``compute_dtype`` (``bioclip_fast.ops.precision``)."""
    return input_precision(dtype)


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU tensors, numpy semantics, slow: use tiny tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tile configuration used under the interpreter instead of autotuning. Tests may change these dicts (e.g. to
# exercise the multi-slice backward path); keys are the kernels' constexpr meta-parameters.
INTERPRET_FWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32}
INTERPRET_BWD_CONFIG = {"BLOCK_X": 32, "BLOCK_Y": 32, "BLOCK_D": 32, "BLOCK_DO": 32, "NUM_ACC": 2}
# Programs a sweep aims for under the interpreter (small, but > 1 so the multi-program reductions are exercised).
INTERPRET_TARGET_PROGRAMS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a multi-block sweep should launch: a few waves of the GPU's SMs."""
    if interpreting() or device.type != "cuda":
        return INTERPRET_TARGET_PROGRAMS
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def size_bucket(n: int) -> int:
    """Autotune key for a batch size: its power-of-two bucket (tile choice depends on the order of magnitude)."""
    return triton.next_power_of_2(max(int(n), 1))


def interpret_autotuned() -> bool:
    """Under the interpreter, take the launch path a GPU takes (``BIOCLIP_FAST_INTERPRET_AUTOTUNED=1``): the
    autotuned wrapper with the GPU's config lists, pruning and (unless ``BIOCLIP_FAST_AUTOTUNE=0``) benchmarking,
    instead of the fixed ``INTERPRET_*_CONFIG`` tiles. Slow (GPU-sized tiles in numpy): tests and the gpu_check
    rehearsal use it on tiny problems."""
    return interpreting() and os.environ.get("BIOCLIP_FAST_INTERPRET_AUTOTUNED", "0").strip() == "1"


def launch(kernel, tuned, grid, args, meta, interpret_config, device: torch.device):
    """Launch ``tuned`` (autotuned) on ``device``, or ``kernel`` with the fixed interpreter config."""
    if interpreting() and not interpret_autotuned():
        kernel[grid](*args, **meta, **interpret_config)
    elif device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device, not the tensors' one
            tuned[grid](*args, **meta)
    elif interpreting():
        tuned[grid](*args, **meta)
    else:
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def _d_block(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def fwd_configs(D: int) -> list[triton.Config]:
    """Forward (logits-tile + reduction) configs for feature width D: a GEMM main loop plus an epilogue.

    D <= 128 keeps the whole Q block in registers/SMEM (one BLOCK_D chunk); wider D streams 64- or 128-wide
    chunks through the software pipeline like a GEMM's K loop. (128 x 128 tiles need 8 warps: with 4 the
    column-statistics epilogue spills, per ptxas on sm_90a.)
    """
    if D <= 128:
        bd = _d_block(D)
        shapes = ((128, 128, bd, 8, 3), (128, 64, bd, 4, 3), (64, 128, bd, 4, 3), (64, 64, bd, 4, 4))
    else:
        # First = default (BIOCLIP_FAST_AUTOTUNE=0): 64 x 128 with 8 warps, spill-free at D = 768 under triton 3.6
        # (the GPU host's: 188 registers) and 3.8 (166). With 4 warps the symmetric forward spills 20 B under
        # 3.6 (255 registers; none under 3.8); the 128-row tiles spill 8-12 B of the column-statistics epilogue
        # (kernels/NOTES.md). The autotuner still tries the 4-warp tile.
        shapes = ((64, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                  (128, 64, 64, 4, 4), (128, 128, 128, 8, 2))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bm, bn, bd, w, st in shapes]


def grad_configs(D: int) -> list[triton.Config]:
    """Gradient-tile kernel (GEMM backward): the forward's shapes, but 64 x 64 / 4 warps first (default): its
    symmetric epilogue holds both softmaxes and the centred scale-gradient terms, and spills at 64 x 128 / 4 warps
    (468 B) and 128 x 128 / 8 warps (184 B) per ptxas on sm_90a."""
    bd = _d_block(D) if D <= 128 else 64
    first = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": bd}, num_warps=4, num_stages=3)
    return [first] + [c for c in fwd_configs(D) if c.kwargs != first.kwargs or c.num_warps != 4]


def bwd_configs(D: int) -> list[triton.Config]:
    """Backward configs: logits tile recompute, then ``acc[BLOCK_X, NUM_ACC*BLOCK_DO] += G @ Y[:, slice]``.

    For D <= 128 the whole dX row block stays in registers; up to D = 512 too (64-row blocks). For wider D: two D
    slices with BLOCK_X = 64 (logits recomputed twice, no spills) and 128-row blocks with 128/256-wide slices
    (the largest MMA tiles, logits recomputed D / BLOCK_DO times). The first config is the default.
    """
    def cfg(bx, by, bd, bdo, nacc, warps, stages):
        return triton.Config({"BLOCK_X": bx, "BLOCK_Y": by, "BLOCK_D": bd, "BLOCK_DO": bdo, "NUM_ACC": nacc},
                             num_warps=warps, num_stages=stages)

    if D <= 128:
        bd = _d_block(D)
        return [cfg(128, 64, bd, bd, 1, 8, 2), cfg(64, 64, bd, bd, 1, 4, 3), cfg(128, 128, bd, bd, 1, 8, 2),
                cfg(64, 128, bd, bd, 1, 8, 2)]
    out = []
    n128 = triton.cdiv(D, 128)
    if n128 <= 4:  # D <= 512: everything in registers with 128-wide accumulators
        out.append(cfg(64, 64, 64, 128, n128, 8, 2))
        # 128-row blocks: all of D in registers up to 256, else two 256-wide slices.
        out.append(cfg(128, 64, 64, 128, n128, 8, 2) if D <= 256 else cfg(128, 64, 64, 256, 1, 8, 2))
    else:
        # All of D in registers (64 rows x 768 fp32) spills 600-800 B per thread at 8 and at 16 warps (ptxas,
        # sm_90a), so it is not offered: two D slices (the logits recomputed twice per kernel) are the widest
        # spill-free tiling. Where memory allows, bwd_plan takes the GEMM backward instead (one recompute).
        half = triton.cdiv(triton.cdiv(D, 2), 128)
        if half <= 4:  # two slices
            out.append(cfg(64, 64, 64, 128, half, 8, 2))
        out += [cfg(128, 64, 64, 256, 1, 8, 2), cfg(128, 128, 64, 128, 1, 8, 2)]
    if not out or triton.cdiv(D, 256) > 4:  # very wide D: sliced only
        out.append(cfg(64, 64, 64, 256, 1, 4, 2))
    return out


def autotune_enabled() -> bool:
    """``BIOCLIP_FAST_AUTOTUNE=0`` runs the first (default) config of each list without benchmarking the others:
    for huge B (each autotune trial is a full sweep) or reproducible timing of the defaults."""
    return os.environ.get("BIOCLIP_FAST_AUTOTUNE", "1").strip() != "0"


def _launch_width(named_args: dict, kwargs: dict) -> int:
    """The feature width D of the launch being pruned. Triton calls ``early_config_prune(configs, named_args,
    **kwargs)`` with only the *positional* arguments in ``named_args`` (3.6 and 3.8 alike) and the keywords in
    ``kwargs``; the launchers pass the constexprs (D among them) as keywords. Either place is accepted."""
    for src in (kwargs, named_args):
        if "D" in src:
            return int(src["D"])
    raise KeyError(f"autotune pruning: no feature width D among the launch arguments "
                   f"{sorted(named_args) + sorted(kwargs)}")


def prune_fwd(configs, named_args, **kwargs):
    out = fwd_configs(_launch_width(named_args, kwargs))
    return out if autotune_enabled() else out[:1]


def prune_grad(configs, named_args, **kwargs):
    out = grad_configs(_launch_width(named_args, kwargs))
    return out if autotune_enabled() else out[:1]


def prune_bwd(configs, named_args, **kwargs):
    out = bwd_configs(_launch_width(named_args, kwargs))
    return out if autotune_enabled() else out[:1]


def _interpreter_bench(kernel_call, quantiles=None, **_):
    """Wall-clock time of one interpreted run (ms): the autotuner's benchmarker under ``TRITON_INTERPRET=1``, where
    triton's own needs a GPU. Only the launch path is exercised; the timings say nothing about a GPU."""
    import time

    t0 = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def autotuned(kernel, *, key: list[str], prune, configs: list, reset_to_zero: list[str] | None = None,
              restore_value: list[str] | None = None):
    """``triton.autotune`` of ``kernel`` with the config list built per launch by ``prune`` (from the call's D).

    Autotuning runs every pruned config on the *real* arguments. Buffers a config reads before writing
    (``restore_value``) are restored after each trial; buffers whose slots only some configs write (per-program
    partial sums: a config with fewer programs leaves the slots of a config with more) are zeroed before each trial
    and again before the winning config's run (``reset_to_zero``; triton 3.6 and 3.8 both call the reset after
    benchmarking). ``configs`` is a placeholder list of more than one entry: triton prunes only then."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero, restore_value=restore_value,
                           do_bench=_interpreter_bench if interpreting() else None)(kernel)


# ----------------------------------------------------------------------------------------------------------------
# JIT helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    # PREC: "" for bf16/fp16 operands, else the fp32 input precision ("ieee" = exact fp32 products).
    if PREC == "":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_rows(ptr, offs_r, mask_r, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``offs_r`` x columns ``d0 : d0 + BLOCK_D`` of a row-major [*, D] matrix, zero-padded."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :]
    if D % BLOCK_D == 0:
        return tl.load(ptrs, mask=mask_r[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=mask_r[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def tile_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
             BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """fp32 tile ``X[offs_x] @ Y[offs_y]^T`` [BLOCK_X, BLOCK_Y], looping over D in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_rows(X, offs_x, mask_x, d0, D, BLOCK_D)
        y = _load_rows(Y, offs_y, mask_y, d0, D, BLOCK_D)
        acc = mma(x, tl.trans(y), acc, PREC)
    return acc


@triton.jit
def row_probs(t, scale, bias, lse):
    """``exp(S - lse)`` with ``S = t * scale + bias`` rounded exactly as the forward rounds it (natural units), and
    only the small difference scaled to log2 units for exp2: the probabilities then sum to 1 against the forward's
    LSE up to rounding (``exp2(s2 - lse2)`` in log2 units would round at |s2| ~ 144 and differently from the
    forward: a systematic per-row error that near-duplicate batches amplify)."""
    s = t * scale + bias
    return tl.exp2(tl.minimum(s - lse, 0.0) * 1.4426950408889634)


@triton.jit
def _exp_vec(x):
    """exp(x) for a per-row / per-column vector, compensating the rounding of x * log2(e): with |x| up to ~40 that
    rounding alone is a ~2e-6 relative error shared by a whole row or column of probabilities, which near-duplicate
    batches amplify. Vectors only (BLOCK entries per tile), so the extra FMAs are free next to the tile's exp2s."""
    xl = x * 1.4426950408889634
    r = tl.fma(x, 1.4426950408889634, -xl) + x * 1.925963033500011e-08  # exact residual + log2(e)'s low part
    return tl.exp2(xl) * (1.0 + r * 0.6931471805599453)


@triton.jit
def sym_probs(t, scale, bias, la, lb):
    """``(exp(S - la[:, None]), exp(S - lb[None, :]))``, S = scale * t + bias, la/lb natural-log LSEs, with one
    exp2 per element.

    ``exp(S - lb_j) = exp(S - la_i) * exp2(la2_i - c) * exp2(c - lb2_j)`` with c = max(la2) (log2 units): two
    vector exp2s instead of a second tile of them (the epilogue is MUFU-bound). Exact to fp32 precision when the
    tile's LSEs are within 2^60 of each other (no factor over/underflows, and an underflowed first term implies a
    second term below 2^-66); otherwise the tile takes the direct two-exp2 path. The two directions are returned
    separately so the scale gradient can centre each on its own positive (see ``_pairwise_bwd_kernel``).
    """
    c = tl.max(la, 0)
    pr = row_probs(t, scale, bias, la[:, None])
    # 41.6 = 60 * ln 2. The differences are taken in natural units before scaling: la*log2(e) rounded at |la| ~ 100
    # would put a systematic error of ~5e-6 into a whole row / column of probabilities.
    if (c - tl.min(la, 0) <= 41.58883083359672) and (c - tl.min(lb, 0) <= 41.58883083359672):
        a = _exp_vec(la - c)
        b = _exp_vec(c - lb)
        pc = pr * (a[:, None] * b[None, :])
    else:
        # min(., 0): s <= lse for every real entry; padding rows/columns (masked later) must not overflow.
        pc = row_probs(t, scale, bias, lb[None, :])
    return pr, pc


@triton.jit
def _acc_slice(acc, g, Y, offs_y, mask_y, d0, D: tl.constexpr, BLOCK_DO: tl.constexpr, PREC: tl.constexpr):
    # g arrives pre-scaled (GSCALE) and already cast to the operand dtype.
    y = _load_rows(Y, offs_y, mask_y, d0, D, BLOCK_DO)
    return mma(g, y, acc, PREC)


@triton.jit
def _store_slice(DX, acc, offs_x, mask_x, d0, factor, D: tl.constexpr, BLOCK_DO: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_DO)
    ptrs = DX + offs_x.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(ptrs, (acc * factor).to(DX.dtype.element_ty), mask=mask_x[:, None] & (offs_d[None, :] < D))


@triton.jit
def _recentre_slice(acc, corr, Y, offs_pos, mask_x, d0, D: tl.constexpr, BLOCK_DO: tl.constexpr):
    ypos = _load_rows(Y, offs_pos, mask_x, d0, D, BLOCK_DO).to(tl.float32)
    return acc + corr[:, None] * ypos


@triton.jit
def _normalize_slice(acc, inv_rs, Y, offs_pos, mask_x, d0, D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """acc / rowsum - Y[positive rows]: the row softmax renormalized, then its -onehot (see RENORM)."""
    ypos = _load_rows(Y, offs_pos, mask_x, d0, D, BLOCK_DO).to(tl.float32)
    return acc * inv_rs[:, None] - ypos


@triton.jit
def _pairwise_bwd_kernel(
    X, Y, SCALE, BIAS, LSE_X, LSE_Y, CEN_X, CEN_Y, GRAD, DX, DS_PART, DB_PART,
    Bx, By, offset, inv_n,
    B_BUCKET,  # autotune key only
    D: tl.constexpr, MODE: tl.constexpr, X_IS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALAR_GRADS: tl.constexpr, PREC: tl.constexpr, GSCALE: tl.constexpr, QK_ORDER: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    NUM_ACC: tl.constexpr,
):
    """dX for one BLOCK_X row block of X (and one D slice), streaming all rows of Y.

    The logits tile is computed as ``X @ Y^T``; when X holds the loss's rows (X_IS_ROWS) element (a, b) is
    S[a, b], otherwise it is S[b, a]. ``LSE_X``/``LSE_Y`` are the log-sum-exp vectors indexed by X's / Y's rows.
    The gradient tile is kept as ``G / coef`` (values in [-1, 1]) and ``coef = grad_loss * inv_n`` is applied once
    at the end. For fp16 operands it is multiplied by ``GSCALE = 2^14`` before the cast (at B = 1M the
    probabilities are ~1e-6, subnormal in fp16; 2^14 keeps them normal and |G| <= 2^14 below fp16's max), and the
    fp32 accumulator is divided by it at the end (exact: a power of two).

    Scale gradient (SCALAR_GRADS, rows only), cancellation-free: each softmax direction's G sums to zero along its
    row (column), so ``sum G*t = sum G*(t - c)`` with ``c`` that row's (column's) positive dot product ``CEN``;
    on near-duplicate batches (t ~ 1 everywhere) the plain sum loses all digits. SigLIP adds ``c_i * sum_j G_ij``.
    """
    pid_x = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_x = offs_x < Bx

    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * 1.4426950408889634
    else:
        bias2 = 0.0
    coef = tl.load(GRAD).to(tl.float32) * inv_n
    if SCALAR_GRADS:
        cx = tl.load(CEN_X + offs_x, mask=mask_x, other=0.0)

    # Log-sum-exp of X's rows, in log2 units (row LSE when X holds rows; column LSE for the symmetric loss).
    if HAS_BIAS:
        bias = tl.load(BIAS).to(tl.float32)
    else:
        bias = 0.0
    if MODE == 0:
        lx = tl.load(LSE_X + offs_x, mask=mask_x, other=0.0)
    elif MODE == 1:
        if X_IS_ROWS:
            lx = tl.load(LSE_X + offs_x, mask=mask_x, other=0.0)

    SINGLE_D: tl.constexpr = D <= BLOCK_D
    # One-direction rows (the multi-GPU local loss's dQ): accumulate P @ Y without the -onehot and the row sums of P,
    # then dX = (P @ Y) / rowsum - Y[positive]. The row softmax then sums to 1 to rounding whatever the rounding of
    # the stored LSE (fp32 at |lse| ~ 100 is off by up to 4e-6 relative, the same for the whole row); on
    # near-duplicate columns (Y rows ~ one vector) that systematic error is amplified by the cancellation in G @ Y.
    RENORM: tl.constexpr = (MODE == 1) and X_IS_ROWS
    # Symmetric loss: the owned direction's softmax (pa) gets the first-order version of the same correction,
    # dX += 0.5 * (1/rowsum - 1) * Y[positive]: exact when the softmax-weighted mean of Y is its positive (the
    # near-duplicate case, where the error matters), never larger than the error it corrects otherwise.
    RECENTRE: tl.constexpr = MODE == 0
    REUSE_Y: tl.constexpr = SINGLE_D and (BLOCK_DO == BLOCK_D) and (NUM_ACC == 1)
    if SINGLE_D:
        x_tile = _load_rows(X, offs_x, mask_x, 0, D, BLOCK_D)
    d_base = pid_s * (NUM_ACC * BLOCK_DO)

    acc0 = tl.zeros([BLOCK_X, BLOCK_DO], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_X, BLOCK_DO], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_X, BLOCK_DO], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_X, BLOCK_DO], dtype=tl.float32)
    ds_acc = tl.zeros([BLOCK_X], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_X], dtype=tl.float32)
    rs_acc = tl.zeros([BLOCK_X], dtype=tl.float32)
    tp_acc = tl.zeros([BLOCK_X], dtype=tl.float32)

    for y0 in range(0, By, BLOCK_Y):
        offs_y = y0 + tl.arange(0, BLOCK_Y)
        mask_y = offs_y < By
        # QK_ORDER (the dK kernel under the interpreter): form the tile as (Y @ X^T)^T, i.e. Q @ K^T as the forward
        # does. The interpreter's tl.dot is numpy's BLAS, whose per-element summation order depends on the
        # operands' order (OpenBLAS's Haswell/Zen sgemm): K @ Q^T then rounds the logits differently from the
        # forward that produced the column LSEs (kernels/NOTES.md, "Logits rounded identically in both passes").
        if SINGLE_D:
            y_tile = _load_rows(Y, offs_y, mask_y, 0, D, BLOCK_D)
            if QK_ORDER and not X_IS_ROWS:
                t = tl.trans(mma(y_tile, tl.trans(x_tile), tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32), PREC))
            else:
                t = mma(x_tile, tl.trans(y_tile), tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32), PREC)
        elif QK_ORDER and not X_IS_ROWS:
            t = tl.trans(tile_dot(Y, X, offs_y, mask_y, offs_x, mask_x, D, BLOCK_Y, BLOCK_X, BLOCK_D, PREC))
        else:
            t = tile_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D, BLOCK_X, BLOCK_Y, BLOCK_D, PREC)
        s2 = t * scale2 + bias2

        if X_IS_ROWS:
            is_pos = offs_y[None, :] == (offs_x[:, None] + offset)
        else:
            is_pos = offs_x[:, None] == (offs_y[None, :] + offset)
        onehot = tl.where(is_pos, 1.0, 0.0)

        valid = mask_x[:, None] & mask_y[None, :]
        if MODE == 0:
            ly = tl.load(LSE_Y + offs_y, mask=mask_y, other=0.0)
            pa, pb = sym_probs(t, scale, bias, lx, ly)
            g = 0.5 * (pa + pb) - onehot
            rs_acc += tl.sum(tl.where(valid, pa, 0.0), 1)
            if SCALAR_GRADS:  # X rows: pa is the row softmax (centre c_i), pb the column softmax (centre c_j)
                cy = tl.load(CEN_Y + offs_y, mask=mask_y, other=0.0)
                u = t - cx[:, None]
                v = t - cy[None, :]
                ds_acc += tl.sum(tl.where(valid, (pa - onehot) * u + (pb - onehot) * v, 0.0), 1) * 0.5
        elif MODE == 1:
            if X_IS_ROWS:
                g = row_probs(t, scale, bias, lx[:, None])  # the -onehot is applied after renormalizing
                rs_acc += tl.sum(tl.where(valid, g, 0.0), 1)
            else:
                ly = tl.load(LSE_Y + offs_y, mask=mask_y, other=0.0)
                g = row_probs(t, scale, bias, ly[None, :]) - onehot
        else:
            # d/dS of -logsigmoid(z*S) = -z * sigmoid(-z*S): sigmoid(S) on negatives, -sigmoid(-S) on positives.
            # Clamp so exp2 stays finite (2^126 -> sigmoid ~1e-38, i.e. 0 to fp32 working precision).
            zs2 = tl.minimum(tl.where(is_pos, s2, -s2), 126.0)
            g = (1.0 - 2.0 * onehot) / (1.0 + tl.exp2(zs2))
        g = tl.where(valid, g, 0.0)

        if SCALAR_GRADS:
            if MODE != 0:
                ds_acc += tl.sum(g * (t - cx[:, None]), 1)
            if RENORM:
                tp_acc += tl.sum(tl.where(is_pos & valid, t - cx[:, None], 0.0), 1)
            if MODE == 2:
                db_acc += tl.sum(g, 1)

        gq = (g * GSCALE).to(X.dtype.element_ty)
        if REUSE_Y:
            acc0 = mma(gq, y_tile, acc0, PREC)
        else:
            acc0 = _acc_slice(acc0, gq, Y, offs_y, mask_y, d_base, D, BLOCK_DO, PREC)
            if NUM_ACC > 1:
                acc1 = _acc_slice(acc1, gq, Y, offs_y, mask_y, d_base + BLOCK_DO, D, BLOCK_DO, PREC)
            if NUM_ACC > 2:
                acc2 = _acc_slice(acc2, gq, Y, offs_y, mask_y, d_base + 2 * BLOCK_DO, D, BLOCK_DO, PREC)
            if NUM_ACC > 3:
                acc3 = _acc_slice(acc3, gq, Y, offs_y, mask_y, d_base + 3 * BLOCK_DO, D, BLOCK_DO, PREC)

    factor = scale * coef / GSCALE
    if RENORM:
        inv_rs = 1.0 / (tl.where(mask_x, rs_acc, 1.0) * GSCALE)
        offs_pos = offs_x + offset
        acc0 = _normalize_slice(acc0, inv_rs, Y, offs_pos, mask_x, d_base, D, BLOCK_DO) * GSCALE
        if NUM_ACC > 1:
            acc1 = _normalize_slice(acc1, inv_rs, Y, offs_pos, mask_x, d_base + BLOCK_DO, D, BLOCK_DO) * GSCALE
        if NUM_ACC > 2:
            acc2 = _normalize_slice(acc2, inv_rs, Y, offs_pos, mask_x, d_base + 2 * BLOCK_DO, D, BLOCK_DO) * GSCALE
        if NUM_ACC > 3:
            acc3 = _normalize_slice(acc3, inv_rs, Y, offs_pos, mask_x, d_base + 3 * BLOCK_DO, D, BLOCK_DO) * GSCALE
        if SCALAR_GRADS:
            ds_acc = ds_acc / tl.where(mask_x, rs_acc, 1.0) - tp_acc
    if RECENTRE:
        corr = tl.where(mask_x, 0.5 * GSCALE * (1.0 / tl.where(mask_x, rs_acc, 1.0) - 1.0), 0.0)
        if X_IS_ROWS:
            offs_pos = offs_x + offset
        else:
            offs_pos = offs_x - offset
        acc0 = _recentre_slice(acc0, corr, Y, offs_pos, mask_x, d_base, D, BLOCK_DO)
        if NUM_ACC > 1:
            acc1 = _recentre_slice(acc1, corr, Y, offs_pos, mask_x, d_base + BLOCK_DO, D, BLOCK_DO)
        if NUM_ACC > 2:
            acc2 = _recentre_slice(acc2, corr, Y, offs_pos, mask_x, d_base + 2 * BLOCK_DO, D, BLOCK_DO)
        if NUM_ACC > 3:
            acc3 = _recentre_slice(acc3, corr, Y, offs_pos, mask_x, d_base + 3 * BLOCK_DO, D, BLOCK_DO)
    _store_slice(DX, acc0, offs_x, mask_x, d_base, factor, D, BLOCK_DO)
    if NUM_ACC > 1:
        _store_slice(DX, acc1, offs_x, mask_x, d_base + BLOCK_DO, factor, D, BLOCK_DO)
    if NUM_ACC > 2:
        _store_slice(DX, acc2, offs_x, mask_x, d_base + 2 * BLOCK_DO, factor, D, BLOCK_DO)
    if NUM_ACC > 3:
        _store_slice(DX, acc3, offs_x, mask_x, d_base + 3 * BLOCK_DO, factor, D, BLOCK_DO)
    if SCALAR_GRADS:
        if pid_s == 0:
            if MODE == 2:
                ds_acc += cx * db_acc
            tl.store(DS_PART + pid_x, tl.sum(ds_acc, 0) * coef)
            tl.store(DB_PART + pid_x, tl.sum(db_acc, 0) * coef)


_pairwise_bwd_tuned = autotuned(
    _pairwise_bwd_kernel, configs=bwd_configs(64),  # placeholder: prune_bwd builds the list for the call's D
    key=["B_BUCKET", "D", "MODE", "X_IS_ROWS", "PREC"], prune=prune_bwd,
    reset_to_zero=["DS_PART", "DB_PART"],  # one slot per X row block: configs with more blocks write more slots
)


def qk_order(device: torch.device) -> bool:
    """Whether the dK kernel forms its logits tile in the forward's operand order (Q @ K^T, then transposed) rather
    than as K @ Q^T. Needed where the per-element summation order of a product depends on the operands' order:
    the interpreter, whose tl.dot is numpy's BLAS (OpenBLAS's Haswell / Zen sgemm round A @ B^T and (B @ A^T)^T
    differently in ~20 % of the entries). Not on CUDA: each entry of an MMA / FMA tile is accumulated over D in
    the same k order whichever operand comes first, so the transposition would only cost a shuffle
    (``test_gpu_logits_tile_does_not_depend_on_operand_order`` checks this on the GPU)."""
    return device.type != "cuda"


def grad_prescale(dtype: torch.dtype) -> float:
    """Power of two the gradient tile is multiplied by before its cast to the operand dtype: fp16 only (its
    normal range starts at 6e-5, probabilities at B = 1M are ~1e-6); exact to undo on the fp32 accumulator."""
    return 16384.0 if dtype == torch.float16 else 1.0


def positive_dots(q: torch.Tensor, k: torch.Tensor, offset: int, rows: int = 1024) -> torch.Tensor:
    """Centres of the scale gradient: ``c_i = <q_i, k_{i+offset}>`` (fp32) where row i's positive exists, else 0.

    Any centre is exact in exact arithmetic (see ``_pairwise_bwd_kernel``); the positive's dot makes the centred
    terms small on near-duplicate batches. Chunked so the temporaries stay a few MB at any B.
    """
    Bq, Bk = q.shape[0], k.shape[0]
    c = torch.zeros(Bq, device=q.device, dtype=torch.float32)
    lo, hi = max(0, -offset), min(Bq, Bk - offset)
    for r0 in range(lo, hi, rows):
        r1 = min(hi, r0 + rows)
        c[r0:r1] = (q[r0:r1].float() * k[r0 + offset:r1 + offset].float()).sum(1)
    return c


def pairwise_bwd(X: torch.Tensor, Y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 lse_x: torch.Tensor | None, lse_y: torch.Tensor | None, grad: torch.Tensor, *, offset: int,
                 inv_n: float, mode: int, x_is_rows: bool, scalar_grads: bool,
                 cen_x: torch.Tensor | None = None, cen_y: torch.Tensor | None = None):
    """dX (input dtype) and, if ``scalar_grads``, (dscale, dbias) partial sums for one side of a pairwise loss.
    ``cen_x`` / ``cen_y``: the scale gradient's centres for X's / Y's rows (needed with ``scalar_grads``)."""
    Bx, D = X.shape
    By = Y.shape[0]
    dx = torch.empty_like(X)
    n_part = triton.cdiv(Bx, 16)  # >= the number of X row blocks for every config (smallest BLOCK_X is 16)
    ds_part = torch.zeros(n_part if scalar_grads else 1, device=X.device, dtype=torch.float32)
    db_part = torch.zeros_like(ds_part)
    dummy = ds_part
    if scalar_grads and cen_x is None:
        raise ValueError("scalar_grads needs the centres cen_x (and cen_y for the symmetric loss)")
    args = (X, Y, scale, bias if bias is not None else dummy, lse_x if lse_x is not None else dummy,
            lse_y if lse_y is not None else dummy, cen_x if cen_x is not None else dummy,
            cen_y if cen_y is not None else dummy, grad, dx, ds_part, db_part, Bx, By, int(offset), float(inv_n),
            size_bucket(max(Bx, By)))
    meta = dict(D=D, MODE=mode, X_IS_ROWS=x_is_rows, HAS_BIAS=bias is not None, SCALAR_GRADS=scalar_grads,
                PREC=dot_precision(X.dtype), GSCALE=grad_prescale(X.dtype), QK_ORDER=qk_order(X.device))

    def grid(META):
        return (triton.cdiv(Bx, META["BLOCK_X"]), triton.cdiv(D, META["NUM_ACC"] * META["BLOCK_DO"]))

    launch(_pairwise_bwd_kernel, _pairwise_bwd_tuned, grid, args, meta, INTERPRET_BWD_CONFIG, X.device)
    if scalar_grads:
        return dx, ds_part.sum(), db_part.sum()
    return dx, None, None


# ----------------------------------------------------------------------------------------------------------------
# GEMM-assisted backward for wide D: a Triton kernel writes the gradient tile G for a chunk of columns into a
# bounded workspace, cuBLAS does dQ += G K_c and dK_c = G^T Q. Executes 6*Bq*Bk*D FLOPs (the fused path: 8, more
# with D slices) with 2/3 of them in cuBLAS; costs a [Bq, chunk] workspace and an fp32 [Bq, D] dQ accumulator.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_tile_kernel(
    Q, K, SCALE, BIAS, LSE_R, LSE_C, CEN_R, CEN_C, W, DS_PART, DB_PART, RS_PART,
    Bq, Bk, c0, C, offset,
    B_BUCKET,  # autotune key only
    D: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, GSCALE: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """W[i, j - c0] = GSCALE * G[i, j] / coef for rows i of one block and columns j in [c0, c0 + C) of one block,
    plus centred partial sums for dscale / dbias (see ``_pairwise_bwd_kernel``). One-direction CLIP also writes
    the block's row sums of P to ``RS_PART[pid_n, i]``: the host renormalizes dQ with them (as the fused dQ kernel
    does), since G leaves the tile before its row is complete; only with ``ROW_SUMS`` (dQ needed: otherwise
    RS_PART is a one-element dummy)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the chunk
    offs_n = c0 + offs_w
    mask_m = offs_m < Bq
    mask_n = (offs_w < C) & (offs_n < Bk)
    t = tile_dot(Q, K, offs_m, mask_m, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, PREC)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * 1.4426950408889634
    else:
        bias2 = 0.0
    s2 = t * scale2 + bias2
    is_pos = offs_n[None, :] == (offs_m[:, None] + offset)
    onehot = tl.where(is_pos, 1.0, 0.0)
    valid = mask_m[:, None] & mask_n[None, :]
    cr = tl.load(CEN_R + offs_m, mask=mask_m, other=0.0)
    if MODE == 2:
        zs2 = tl.minimum(tl.where(is_pos, s2, -s2), 126.0)
        g = tl.where(valid, (1.0 - 2.0 * onehot) / (1.0 + tl.exp2(zs2)), 0.0)
        rows = tl.sum(g, 1)
        ds = tl.sum(tl.sum(g * (t - cr[:, None]), 1) + cr * rows, 0)
        db = tl.sum(rows, 0)
    else:
        scale = tl.load(SCALE).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS).to(tl.float32)
        else:
            bias = 0.0
        lr = tl.load(LSE_R + offs_m, mask=mask_m, other=0.0)
        if MODE == 0:
            lc = tl.load(LSE_C + offs_n, mask=mask_n, other=0.0)
            pa, pb = sym_probs(t, scale, bias, lr, lc)
            g = tl.where(valid, 0.5 * (pa + pb) - onehot, 0.0)
            cc = tl.load(CEN_C + offs_n, mask=mask_n, other=0.0)
            ds = tl.sum(tl.sum(tl.where(valid, (pa - onehot) * (t - cr[:, None]) + (pb - onehot) * (t - cc[None, :]),
                                        0.0), 1), 0) * 0.5
        else:
            p = tl.where(valid, row_probs(t, scale, bias, lr[:, None]), 0.0)
            g = p - tl.where(valid, onehot, 0.0)
            ds = tl.sum(tl.sum(g * (t - cr[:, None]), 1), 0)
            if ROW_SUMS:
                tl.store(RS_PART + pid_n.to(tl.int64) * Bq + offs_m, tl.sum(p, 1), mask=mask_m)
        db = 0.0  # CLIP: sum G = 0 exactly (a logit shift changes neither softmax)
    w_ptrs = W + offs_m.to(tl.int64)[:, None] * C + offs_w[None, :]
    tl.store(w_ptrs, (g * GSCALE).to(W.dtype.element_ty), mask=mask_m[:, None] & (offs_w[None, :] < C))
    pid = pid_m * tl.num_programs(1) + pid_n
    tl.store(DS_PART + pid, ds)
    tl.store(DB_PART + pid, db)


_grad_tile_tuned = autotuned(
    _grad_tile_kernel, configs=grad_configs(64),  # placeholder: prune_grad builds the list for the call's D
    key=["B_BUCKET", "D", "MODE", "ROW_SUMS", "PREC"], prune=prune_grad,
    reset_to_zero=["DS_PART", "DB_PART", "RS_PART"],  # per-program partials: the host sums every slot
)

# Extra device memory the backward may use beyond its inputs and outputs (bytes); the strategy is chosen to fit.
BWD_MEMORY_BYTES = int(os.environ.get("BIOCLIP_FAST_BWD_MEMORY_MB", "64")) * 2**20
_MIN_CHUNK = 256  # narrower chunks make skinny GEMMs: below this the GEMM backward is not worth it
_CENTRE_ROWS = 1024  # positive_dots' chunk (3 fp32 [rows, D] temporaries: 9 MB at D = 768)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and fp32 output (cuBLAS out_dtype for half inputs on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def fused_extra_bytes(Bq: int, Bk: int, D: int) -> int:
    """Extra memory of the fused backward: scale-gradient partials and centres (O(B)), plus the chunked
    temporaries of ``positive_dots``."""
    return 4 * (2 * triton.cdiv(Bq, 16) + 2 * max(Bq, Bk)) + 3 * 4 * min(Bq, _CENTRE_ROWS) * D


def gemm_extra_bytes(Bq: int, Bk: int, D: int, elem: int, chunk: int) -> int:
    """Extra memory of the GEMM-assisted backward with a ``chunk``-column workspace: the [Bq, chunk] gradient
    tiles, the fp32 dQ accumulator (every dtype: cuBLAS accumulates into it), two fp32 [chunk, D] dK temporaries,
    per-program partials and the centres."""
    chunk = min(chunk, Bk)
    parts = 2 * triton.cdiv(Bq, 16) * triton.cdiv(chunk, 16) + triton.cdiv(chunk, 16) * Bq  # + row-sum partials
    return (Bq * chunk * elem + 4 * Bq * D + 2 * 4 * chunk * D + 4 * parts + 8 * Bq
            + fused_extra_bytes(Bq, Bk, D))


def bwd_plan(Bq: int, Bk: int, D: int, elem: int, device_type: str, budget: int | None = None,
             choice: str | None = None, *, grads_fp32: bool = False, cast: bool = False):
    """(strategy, chunk) of the backward for a [Bq, D] x [Bk, D] problem whose features are ``elem`` bytes each.

    ``gemm`` (one recompute of the logits: a gradient-tile kernel + cuBLAS, 6*Bq*Bk*D FLOPs) wherever its extra
    memory (``gemm_extra_bytes``) fits ``budget`` with at least ``_MIN_CHUNK`` columns per chunk, on CUDA for
    D > 128 (below that the fused kernels keep all of dX in registers and the tile recompute is cheap); the widest
    chunk that fits (fewer read-modify-writes of the dQ accumulator). Otherwise ``fused`` (two Triton kernels,
    O(B) extra memory: the logits are recomputed in the dQ and in the dK kernel). With the 64 MiB default at
    D = 768 bf16 that is gemm up to B ~ 18k and fused above, so the default stays within budget at every B.

    With fp32 gradients (``grads_fp32``: fp32 features, whatever the compute dtype; ``cast``: the products run
    in another dtype, ``elem`` bytes, on per-chunk casts) the gradients themselves are the accumulators:
    ``gemm2d`` (one recompute, (row x column)-chunked, ``gemm2d_extra_bytes``) fits the budget at every B and is
    the default on CUDA for D > 128, and for any D where the fused kernels' full casts of q and k would not fit.

    ``choice`` (default: ``BIOCLIP_FAST_BWD``, auto|fused|gemm|gemm2d) forces a strategy; a forced gemm takes the
    widest chunk within the budget, but at least ``_MIN_CHUNK`` columns (the caller asked for it); a forced gemm2d
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
            return "gemm2d", chunks2d or (min(Bq, _MIN_CHUNK), min(Bk, _MIN_CHUNK))
        if choice == "auto" and device_type == "cuda" and not interpreting() and chunks2d is not None:
            copies = (Bq + Bk) * D * elem if cast else 0  # what the other strategies' full casts would add
            if D > 128 or fused_extra_bytes(Bq, Bk, D) + copies > budget:
                return "gemm2d", chunks2d
    elif choice == "gemm2d":
        choice = "gemm"
    fixed = gemm_extra_bytes(Bq, Bk, D, elem, 0)
    per_col = Bq * elem + 8 * D + 4 * 2 * triton.cdiv(Bq, 16) // 16 + Bq // 4 + 8
    fit = max(0, budget - fixed) // per_col
    chunk = min(Bk, fit // 128 * 128 if fit < Bk else Bk)
    while chunk > 0 and gemm_extra_bytes(Bq, Bk, D, elem, chunk) > budget:  # rounding in the estimate above
        chunk = max(0, chunk - 128)
    if choice == "fused":
        return "fused", 0
    if choice == "gemm":
        return "gemm", max(chunk, min(Bk, _MIN_CHUNK))
    ok = device_type == "cuda" and not interpreting() and D > 128 and chunk >= min(Bk, _MIN_CHUNK)
    return ("gemm", chunk) if ok else ("fused", 0)


# Upper bound of the forward's G row groups / H column splits (``clip_loss._grid_split``: G <= isqrt(T),
# H <= cdiv(T, G), T = 4 x SMs): 26 covers GPUs up to ~170 SMs (H100 / H200: 132 -> G = 22, H = 24).
FWD_SPLITS = 26


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
    s = max(128, _floor128(avail // (2 * per)))
    rows, cols = min(Bq, s), min(Bk, s)
    if rows == Bq:
        cols = min(Bk, max(cols, _floor128(max(0, avail - Bq * per) // per)))
    elif cols == Bk:
        rows = min(Bq, max(rows, _floor128(max(0, avail - Bk * per) // per)))
    return rows, cols


def _clamp_chunks(chunks: tuple[int, int], Bq: int, Bk: int) -> tuple[int, int]:
    return max(1, min(chunks[0], Bq)), max(1, min(chunks[1], Bk))


def chunk_pairs(q: torch.Tensor, k: torch.Tensor, chunks: tuple[int, int], op: torch.dtype):
    """``(r0, q_r, c0, k_c)`` for every (row chunk, column chunk) pair, the chunks cast to ``op`` (views when the
    features already are ``op``). Row i of ``q_r`` is global row r0 + i, so a positive at global column i + offset
    is local column i + (offset + r0 - c0) of ``k_c``.

    The casts go into one row buffer and one column buffer, reused (a single column chunk is cast once): at most
    one cast row chunk and one cast column chunk exist at any time, as ``fwd_extra_bytes`` / ``gemm2d_extra_bytes``
    plan (``q[...].to(op)`` per chunk would hold the previous chunk, still referenced by the caller's loop
    variables, while casting the next: twice the plan). The yielded chunks are valid until the next pair."""
    Bq, Bk = q.shape[0], k.shape[0]
    rows, cols = _clamp_chunks(chunks, Bq, Bk)
    if op == q.dtype and op == k.dtype:
        for r0 in range(0, Bq, rows):
            for c0 in range(0, Bk, cols):
                yield r0, q[r0:r0 + rows], c0, k[c0:c0 + cols]
        return
    k_whole = k.to(op) if cols >= Bk else None
    q_buf = q.to(op) if rows >= Bq else torch.empty((rows, q.shape[1]), device=q.device, dtype=op)
    k_buf = None if k_whole is not None else torch.empty((cols, k.shape[1]), device=k.device, dtype=op)
    for r0 in range(0, Bq, rows):
        if rows >= Bq:
            q_r = q_buf
        else:
            q_r = q_buf[:min(rows, Bq - r0)]
            q_r.copy_(q[r0:r0 + rows])
        for c0 in range(0, Bk, cols):
            if k_whole is not None:
                k_c = k_whole
            else:
                k_c = k_buf[:min(cols, Bk - c0)]
                k_c.copy_(k[c0:c0 + cols])
            yield r0, q_r, c0, k_c


def bwd_strategy(D: int, device: torch.device, Bq: int = 32768, Bk: int | None = None, elem: int = 2) -> str:
    """The strategy ``bwd_plan`` picks (kept for callers that only ask for the name)."""
    return bwd_plan(Bq, Bk or Bq, D, elem, device.type)[0]


class _GradTiles:
    """What the GEMM backwards share: the gradient-tile launches over (row range, column range) blocks of the
    problem, with their scalar-gradient sums and one-direction row sums of P, in one ``rows x cols`` workspace
    reused by every launch.

    ``sweep(q_r, k_c, r0, c0)`` launches ``_grad_tile_kernel`` on rows r0.. x columns c0.. (``q_r`` / ``k_c`` the
    operands of those rows / columns, in the compute dtype) and returns the [R, C] tile ``gscale * G / coef``."""

    def __init__(self, q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int, op,
                 rows: int, cols: int, cen_r, need_q: bool):
        Bq = q.shape[0]
        dev = q.device
        self.scale, self.bias, self.lse_r, self.lse_c = scale, bias, lse_r, lse_c
        self.offset, self.bucket = int(offset), size_bucket(max(Bq, k.shape[0]))
        self.cen_r = positive_dots(q, k, offset) if cen_r is None else cen_r
        self.cen_c = self.cen_r if mode == MODE_CLIP_SYM else None
        self.op = op
        self.gscale = grad_prescale(op)
        self.coef = grad.to(torch.float32) * inv_n
        self.factor = scale.to(torch.float32) * self.coef / self.gscale  # on device: no host sync
        self.w = torch.empty(rows * cols, device=dev, dtype=op)
        n_part = triton.cdiv(rows, 16) * triton.cdiv(cols, 16)  # >= programs per launch for every config
        self.ds_part = torch.zeros(n_part, device=dev, dtype=torch.float32)
        self.db_part = torch.zeros_like(self.ds_part)
        self.ds = torch.zeros((), device=dev, dtype=torch.float32)
        self.db = torch.zeros((), device=dev, dtype=torch.float32)
        self.renorm = mode == MODE_CLIP_DIR and need_q
        self.rs_part = torch.zeros((triton.cdiv(cols, 16), rows) if self.renorm else 1, device=dev,
                                   dtype=torch.float32)
        self.rs = torch.zeros(Bq if self.renorm else 0, device=dev, dtype=torch.float64)
        self.meta = dict(D=q.shape[1], MODE=mode, HAS_BIAS=bias is not None, PREC=dot_precision(op),
                         GSCALE=self.gscale, ROW_SUMS=self.renorm)

    def sweep(self, q_r, k_c, r0: int, c0: int) -> torch.Tensor:
        R, C = q_r.shape[0], k_c.shape[0]
        dummy = self.ds_part
        wc = self.w[:R * C].view(R, C)
        self.ds_part.zero_()
        self.db_part.zero_()
        if self.renorm:
            self.rs_part.zero_()
        # Local row / column indices: row i of the block is global row r0 + i, so its positive (global column
        # r0 + i + offset) is local column i + (offset + r0 - c0).
        args = (q_r, k_c, self.scale, self.bias if self.bias is not None else dummy,
                self.lse_r[r0:r0 + R] if self.lse_r is not None else dummy,
                self.lse_c[c0:c0 + C] if self.lse_c is not None else dummy, self.cen_r[r0:r0 + R],
                self.cen_c[c0:c0 + C] if self.cen_c is not None else dummy, wc, self.ds_part, self.db_part,
                self.rs_part, R, C, 0, C, self.offset + r0 - c0, self.bucket)

        def grid(META):
            return (triton.cdiv(R, META["BLOCK_M"]), triton.cdiv(C, META["BLOCK_N"]))

        launch(_grad_tile_kernel, _grad_tile_tuned, grid, args, self.meta, INTERPRET_FWD_CONFIG, q_r.device)
        self.ds += self.ds_part.sum()
        self.db += self.db_part.sum()
        if self.renorm:  # the kernel's row stride is this block's R
            n_cb = self.rs_part.shape[0]
            self.rs[r0:r0 + R] += self.rs_part.view(-1)[:n_cb * R].view(n_cb, R).sum(0, dtype=torch.float64)
        return wc

    def finish_dq(self, acc: torch.Tensor, k: torch.Tensor, offset: int) -> torch.Tensor:
        """acc (fp32, in place) -> dQ: renormalized one-direction rows, times scale * coef / gscale."""
        if self.renorm:
            renormalize_rows(acc, self.rs, k, offset, self.gscale, self.op)
        return acc.mul_(self.factor)

    def scalars(self):
        return self.ds * self.coef, self.db * self.coef


def pairwise_bwd_gemm(q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int,
                      chunk: int | None = None, cen_r=None, need_q: bool = True, need_k: bool = True):
    """(dq, dk, dscale_sum, dbias_sum) of a pairwise loss through gradient-tile chunks and cuBLAS products.

    The logits are computed once per tile (in ``_grad_tile_kernel``); G goes through a [Bq, chunk] workspace:
    ``dQ += G k_c`` into an fp32 accumulator, ``dK_c = G^T q`` whole per chunk. ``need_q`` / ``need_k`` = False
    skip that product (and return None for it)."""
    Bq, D = q.shape
    Bk = k.shape[0]
    if chunk is None:
        chunk = bwd_plan(Bq, Bk, D, q.element_size(), q.device.type, choice="gemm")[1]
    chunk = max(1, min(chunk, Bk))
    tiles = _GradTiles(q, k, scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n, mode=mode, op=q.dtype,
                       rows=Bq, cols=chunk, cen_r=cen_r, need_q=need_q)
    dq_acc = torch.zeros((Bq, D), device=q.device, dtype=torch.float32) if need_q else None
    dk = torch.empty_like(k) if need_k else None
    for c0 in range(0, Bk, chunk):
        kc = k[c0:c0 + chunk]
        wc = tiles.sweep(q, kc, 0, c0)
        if need_q:  # accumulate in place in fp32: no [Bq, D] temporary per chunk
            _addmm_f32(dq_acc, wc, kc)
        if need_k:
            dk[c0:c0 + chunk] = _mm_f32(wc.T, q).mul_(tiles.factor).to(k.dtype)
    dq = tiles.finish_dq(dq_acc, k, offset).to(q.dtype) if need_q else None
    return (dq, dk, *tiles.scalars())


def renormalize_rows(acc: torch.Tensor, rs: torch.Tensor, k: torch.Tensor, offset: int, gscale: float,
                     op: torch.dtype, rows: int = 1024) -> None:
    """One-direction CLIP dQ with its row softmax renormalized, in place: ``acc`` holds ``sum_j gscale * (P_ij -
    onehot_ij) k_j`` with P from the stored LSE, whose rows sum to ``rs`` = 1 + (rounding of the LSE) instead of
    1; near-duplicate columns turn that per-row error into a large one in ``P k``. The renormalized row is
    ``(acc_i + gscale k_pos) / rs_i - gscale k_pos``, exactly what the fused dQ kernel computes. Chunked over
    rows: a few MB of temporaries at any B. ``k_pos`` is rounded to ``op``, the dtype the products used."""
    inv = (1.0 / rs).to(torch.float32)
    for r0 in range(0, acc.shape[0], rows):
        r1 = min(acc.shape[0], r0 + rows)
        kpos = k[r0 + offset:r1 + offset].to(op).to(torch.float32, copy=True)  # never a view of the caller's k
        c = inv[r0:r1, None]
        acc[r0:r1].mul_(c).add_(kpos.mul_(c - 1.0).mul_(gscale))


# ----------------------------------------------------------------------------------------------------------------
# One-recompute backward with bounded memory at every B: (row chunk x column chunk) gradient tiles, accumulated in
# place into fp32 gradients by cuBLAS. Needs fp32 gradients (fp32 features: the trainer's path and open_clip's
# normalized features), which are then the accumulators; the products run in the compute dtype (bf16 on the tensor
# cores) on per-chunk casts, so no [B, D] copy in another dtype exists either.
# ----------------------------------------------------------------------------------------------------------------


def _floor128(n: int) -> int:
    return n // 128 * 128


def gemm2d_extra_bytes(Bq: int, Bk: int, D: int, op_elem: int, cast: bool, rows: int, cols: int) -> int:
    """Extra memory of ``pairwise_bwd_gemm2d`` with ``rows x cols`` chunks: the gradient tile workspace, the casts of
    one row chunk and one column chunk (when the compute dtype differs from the features'), per-program partials
    and the centres. The fp32 gradients it accumulates into are its outputs."""
    rows, cols = min(rows, Bq), min(cols, Bk)
    parts = 2 * 4 * triton.cdiv(rows, 16) * triton.cdiv(cols, 16) + 4 * triton.cdiv(cols, 16) * rows + 8 * Bq
    casts = (rows + cols) * D * op_elem if cast else 0
    return rows * cols * op_elem + casts + parts + fused_extra_bytes(Bq, Bk, D)


def gemm2d_chunks(Bq: int, Bk: int, D: int, op_elem: int, cast: bool, budget: int,
                  min_chunk: int | None = None) -> tuple[int, int] | None:
    """Largest (rows, cols) chunks, about square (the read-modify-write traffic of the fp32 gradients goes as
    1/rows + 1/cols), whose ``gemm2d_extra_bytes`` fits ``budget``; None when even ``min_chunk`` x ``min_chunk``
    does not fit. The shorter side is taken whole when it fits (one chunk: its cast is made once)."""
    floor = _MIN_CHUNK if min_chunk is None else min_chunk
    avail = budget - fused_extra_bytes(Bq, Bk, D)
    d_term = D * op_elem if cast else 0

    def fill(fixed: int, long: int) -> int:  # chunk of the long side given the short side's chunk
        per = fixed * op_elem + d_term + 8 * triton.cdiv(fixed, 16) // 16 + fixed // 4 + 8
        n = max(0, avail - fixed * d_term) // per
        return long if n >= long else _floor128(n) if n >= 128 else n

    # about square: s * s * op_elem + 2 * s * d_term <= avail
    s = int(((d_term ** 2 + op_elem * avail) ** 0.5 - d_term) / op_elem) if avail > 0 else 0
    s = _floor128(s) if s >= 128 else s
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


def pairwise_bwd_gemm2d(q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int,
                        op_dtype: torch.dtype | None = None, chunks: tuple[int, int] | None = None, cen_r=None,
                        need_q: bool = True, need_k: bool = True):
    """(dq, dk, dscale_sum, dbias_sum) of a pairwise loss with fp32 features, each logits tile computed once.

    For every (row chunk r, column chunk c): ``_grad_tile_kernel`` writes G_rc (compute dtype) into a [rows, cols]
    workspace, then ``dq[r] += G_rc k_c`` and ``dk[c] += G_rc^T q_r`` accumulate in place in the fp32 gradients
    (cuBLAS, fp32 accumulation). ``op_dtype`` (bf16/fp16) casts q_r and k_c per chunk; None computes in fp32 (the
    matmul precision torch is set to). Extra memory: ``gemm2d_extra_bytes``, bounded at every B."""
    Bq, D = q.shape
    Bk = k.shape[0]
    if q.dtype != torch.float32:
        raise ValueError(f"the chunked GEMM backward accumulates into fp32 gradients; got {q.dtype} features")
    op = op_dtype or q.dtype
    cast = op != q.dtype
    if chunks is None:
        chunks = gemm2d_chunks(Bq, Bk, D, op.itemsize, cast, BWD_MEMORY_BYTES)
        if chunks is None:
            chunks = (min(Bq, _MIN_CHUNK), min(Bk, _MIN_CHUNK))
    rows, cols = _clamp_chunks(chunks, Bq, Bk)
    tiles = _GradTiles(q, k, scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n, mode=mode, op=op,
                       rows=rows, cols=cols, cen_r=cen_r, need_q=need_q)
    dq = torch.zeros((Bq, D), device=q.device, dtype=torch.float32) if need_q else None
    dk = torch.zeros((Bk, D), device=q.device, dtype=torch.float32) if need_k else None
    for r0, q_r, c0, k_c in chunk_pairs(q, k, (rows, cols), op):
        wc = tiles.sweep(q_r, k_c, r0, c0)
        if need_q:
            _addmm_f32(dq[r0:r0 + rows], wc, k_c)
        if need_k:
            _addmm_f32(dk[c0:c0 + cols], wc.T, q_r)
    if need_q:
        tiles.finish_dq(dq, k, offset)
    if need_k:
        dk.mul_(tiles.factor)
    return (dq, dk, *tiles.scalars())


# What this torch offers for fp32-output half-precision products on CUDA: addmm(out_dtype=) (torch >= 2.8) until a
# call fails, then mm(out_dtype=); "warned" once the last resort (a rounded product) has been reported.
_F32_MATMUL = {"addmm": True, "warned": False}


def _addmm_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in place, out fp32, a/b in the compute dtype (fp32 accumulation, no temporary on CUDA).
    Without ``addmm(out_dtype=)`` (older torch): ``mm(out_dtype=)`` plus an add (a [rows, D] fp32 temporary),
    else the half-precision product rounded once per chunk, with one warning."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
        return
    if not a.is_cuda:
        out += a.float() @ b.float()
        return
    if _F32_MATMUL["addmm"]:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError):
            _F32_MATMUL["addmm"] = False
    try:
        out += torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        if not _F32_MATMUL["warned"]:
            _F32_MATMUL["warned"] = True
            import warnings

            warnings.warn("bioclip_fast: this torch has no fp32-output half-precision matmul (addmm/mm out_dtype); "
                          f"the GEMM backward rounds each chunk's products to {a.dtype}", RuntimeWarning,
                          stacklevel=2)
        out += (a @ b).float()


def pairwise_bwd_both(q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int,
                      need_q: bool = True, need_k: bool = True, op_dtype: torch.dtype | None = None):
    """(dq, dk, dscale_sum, dbias_sum) by the strategy ``bwd_plan`` picks; a gradient not needed is None and
    its product is skipped (the dQ kernel still runs for the scalar gradients). ``op_dtype``: the dtype the
    products run in when it differs from the features' (fp32 features, bf16/fp16 compute)."""
    Bq, D = q.shape
    Bk = k.shape[0]
    op = op_dtype or q.dtype
    cast = op != q.dtype
    strategy, chunk = bwd_plan(Bq, Bk, D, op.itemsize, q.device.type, grads_fp32=q.dtype == torch.float32,
                               cast=cast)
    cen = positive_dots(q, k, offset)
    if strategy == "gemm2d":
        return pairwise_bwd_gemm2d(q, k, scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n, mode=mode,
                                   op_dtype=op, chunks=chunk, cen_r=cen, need_q=need_q, need_k=need_k)
    if cast:  # the other strategies read whole operands: full copies in the compute dtype, grads cast back
        out = pairwise_bwd_both(q.to(op), k.to(op), scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n,
                                mode=mode, need_q=need_q, need_k=need_k)
        return (out[0].to(q.dtype) if out[0] is not None else None,
                out[1].to(k.dtype) if out[1] is not None else None, out[2], out[3])
    if strategy == "gemm":
        return pairwise_bwd_gemm(q, k, scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n, mode=mode,
                                 chunk=chunk, cen_r=cen, need_q=need_q, need_k=need_k)
    if mode == MODE_CLIP_SYM:
        lx_q, ly_q, lx_k, ly_k = lse_r, lse_c, lse_c, lse_r
    elif mode == MODE_CLIP_DIR:
        lx_q, ly_q, lx_k, ly_k = lse_r, None, None, lse_r
    else:
        lx_q = ly_q = lx_k = ly_k = None
    dq, ds, db = pairwise_bwd(q, k, scale, bias, lx_q, ly_q, grad, offset=offset, inv_n=inv_n, mode=mode,
                              x_is_rows=True, scalar_grads=True, cen_x=cen,
                              cen_y=cen if mode == MODE_CLIP_SYM else None)
    dk = None
    if need_k:
        dk, _, _ = pairwise_bwd(k, q, scale, bias, lx_k, ly_k, grad, offset=offset, inv_n=inv_n, mode=mode,
                                x_is_rows=False, scalar_grads=False)
    return (dq if need_q else None), dk, ds, db


# ----------------------------------------------------------------------------------------------------------------
# Host-side validation shared by the launchers
# ----------------------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_features(q: torch.Tensor, k: torch.Tensor, q_name: str = "q", k_name: str = "k"):
    """Cheap checks (no device sync); returns contiguous views."""
    for name, t in ((q_name, q), (k_name, k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"feature dims differ: {q_name} has D={q.shape[1]}, {k_name} has D={k.shape[1]}")
    if q.dtype != k.dtype:
        raise TypeError(f"dtypes differ: {q_name} is {q.dtype}, {k_name} is {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"devices differ: {q_name} on {q.device}, {k_name} on {k.device}")
    return q.contiguous(), k.contiguous()


def check_scalar(t: torch.Tensor | None, name: str, device: torch.device, optional: bool = False):
    """``scale`` / ``bias`` / ``grad_loss``: a one-element tensor on the features' device, returned as fp32."""
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [] or [1], got {type(t).__name__}")
    if t.numel() != 1 or t.ndim > 1:
        raise ValueError(f"{name} must have shape [] or [1], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.detach().to(torch.float32).contiguous()


def check_vector(t: torch.Tensor, name: str, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {n}, got {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    return t.detach().to(torch.float32).contiguous()


def compute_operand(q: torch.Tensor, compute: torch.dtype | None) -> torch.dtype | None:
    """The products' dtype when it differs from the features': only fp32 features are cast (per chunk)."""
    if compute is None or compute == q.dtype:
        return None
    if q.dtype != torch.float32 or compute not in (torch.bfloat16, torch.float16):
        raise ValueError(f"compute={compute} needs fp32 features and a bf16/fp16 compute dtype, got {q.dtype}")
    return compute


_REDUCE_COLS = 4096  # reduce_lse's chunk: its float64 temporaries stay ~_REDUCE_TEMPS * 8 * S * 4096 bytes
_REDUCE_TEMPS = 6  # float64 [S, chunk] temporaries alive at once in reduce_lse (conversions, log, sum, logsumexp)


def reduce_lse(m: torch.Tensor, l: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Combine per-split (max, sum of exp below it) partials [S, N] (natural units) into the LSE [N], in float64
    so the fp32 result is rounded once (``dtype=torch.float64``: not rounded, for a chunked forward that merges
    several launches). Chunked over N: the float64 temporaries are bounded (``reduce_lse_bytes``) at any B."""
    out = torch.empty(m.shape[1], device=m.device, dtype=dtype)
    for c0 in range(0, m.shape[1], _REDUCE_COLS):
        c1 = min(m.shape[1], c0 + _REDUCE_COLS)
        part = m[:, c0:c1].double() + torch.log(l[:, c0:c1].double())
        out[c0:c1] = torch.logsumexp(part, dim=0)
    return out


def reduce_lse_bytes(splits: int, n: int) -> int:
    """Peak temporaries of ``reduce_lse`` on [splits, n] partials."""
    return _REDUCE_TEMPS * 8 * splits * min(n, _REDUCE_COLS)


def pairwise_flops(Bq: int, Bk: int, D: int, backward: bool = True) -> int:
    """Model FLOPs of a fused pairwise loss, the count the benchmarks report: forward 2*Bq*Bk*D (the logits
    GEMM); forward + backward 8*Bq*Bk*D (logits, the backward's recompute, dQ, dK).

    Executed: forward 2*Bq*Bk*D; the GEMM backwards (gemm, gemm2d) 6*Bq*Bk*D (one recompute of each logits tile); the fused
    backward 4*Bq*Bk*D plus 2*Bq*Bk*D per D slice in each of its two kernels (benchmarks/bench_kernels.py's
    ``executed_flops``).
    """
    return (8 if backward else 2) * Bq * Bk * D
