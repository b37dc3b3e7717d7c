"""Triton JIT helpers shared by the pairwise-loss kernels (CLIP softmax losses and the SigLIP sigmoid loss).

Everything works on two row-major feature matrices, ``Q`` [Bq, D] ("rows") and ``K`` [Bk, D] ("columns"), and the
logits ``S = scale * Q @ K^T + bias`` that are never materialized: kernels compute ``BLOCK x BLOCK`` tiles of
``Q @ K^T`` with fp32 accumulation (looping over D in ``BLOCK_D`` chunks), use them, and drop them. Here: the
tile product (``mma``, ``load_rows``, ``load_slice``, ``tile_dot``, ``fixed_order_dot``), the softmax probabilities
of a tile against stored log-sum-exps (``row_probs``, ``sym_probs``) and the gradient forms (``MODE_*``) of the
backward kernels.

Uses only Triton APIs present from 3.0 through 3.8: tl.dot(input_precision=), tl.debug_barrier.
"""
from __future__ import annotations

import triton
import triton.language as tl

# MODE values of the shared backward kernel.
MODE_CLIP_SYM = 0  # G = (0.5 * (P_row + P_col) - onehot)        (single-GPU symmetric CLIP)
MODE_CLIP_DIR = 1  # G = P_row - onehot                          (one direction, multi-GPU local loss)
MODE_SIGLIP = 2  # G = -z * sigmoid(-z * S), z = +1 on positives else -1


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    # PREC: "" for bf16/fp16 operands, else the fp32 input precision ("ieee" = exact fp32 products).
    if PREC == "":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_block(ptr, offs_r, mask_r, d0, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_COLS: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :]
    if MASK_COLS:
        return tl.load(ptrs, mask=mask_r[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        return tl.load(ptrs, mask=mask_r[:, None], other=0.0)


@triton.jit
def load_rows(ptr, offs_r, mask_r, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``offs_r`` x columns ``d0 : d0 + BLOCK_D`` of a row-major [*, D] matrix, zero-padded. For blocks that
    start below D: the columns are left unmasked when BLOCK_D divides D."""
    return _load_block(ptr, offs_r, mask_r, d0, D, BLOCK_D, D % BLOCK_D != 0)


@triton.jit
def load_slice(ptr, offs_r, mask_r, d0, D: tl.constexpr, BLOCK_D: tl.constexpr, SLICES_EXACT: tl.constexpr):
    """``load_rows`` for a column block that may start at or past D: the fused backward's D slices
    (``NUM_ACC * BLOCK_DO`` columns per program) overhang D when they do not divide it, e.g. D = 640 with three
    128-wide slices per program, or the interpreter's 2 x 32 slices at D = 32. ``load_rows``' unmasked columns would
    there read the next row (and, for the last row, past the tensor's end), so the columns are masked unless
    ``SLICES_EXACT`` (the slices tile D exactly), where this is ``load_rows``."""
    return _load_block(ptr, offs_r, mask_r, d0, D, BLOCK_D, (D % BLOCK_D != 0) or (not SLICES_EXACT))


@triton.jit
def fixed_order_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D: tl.constexpr, BLOCK_X: tl.constexpr,
                    BLOCK_Y: tl.constexpr):
    """fp32 tile ``X[offs_x] @ Y[offs_y]^T`` with every entry summed in one order that depends on neither the tile
    shape, nor BLOCK_D, nor which operand comes first: 16-wide chunks of D in order, each the sum of its 16 fp32
    products (``tl.sum``), added to the running entry. For the interpreter (``FIXED_ORDER``), whose ``tl.dot`` is
    numpy's BLAS: OpenBLAS rounds an entry differently by the product's shape and operand order (Haswell / Zen:
    ~10-20 % of the entries of a 64 x 64 block of a 128 x 128 product; SkylakeX: at 32 x 32), so kernels with
    different tiles (the autotuned configs) would round the same logit differently in forward and backward
    (kernels/NOTES.md, "Logits rounded identically in both passes"). Never used on a GPU."""
    CHUNK: tl.constexpr = 16
    acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
    for d0 in range(0, D, CHUNK):
        x = load_rows(X, offs_x, mask_x, d0, D, CHUNK).to(tl.float32)
        y = load_rows(Y, offs_y, mask_y, d0, D, CHUNK).to(tl.float32)
        acc += tl.sum(x[:, None, :] * y[None, :, :], 2)
    return acc


@triton.jit
def tile_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
             BLOCK_D: tl.constexpr, PREC: tl.constexpr, FIXED_ORDER: tl.constexpr):
    """fp32 tile ``X[offs_x] @ Y[offs_y]^T`` [BLOCK_X, BLOCK_Y], looping over D in BLOCK_D chunks
    (``fixed_order_dot`` with ``FIXED_ORDER``)."""
    if FIXED_ORDER:
        acc = fixed_order_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D, BLOCK_X, BLOCK_Y)
    else:
        acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            x = load_rows(X, offs_x, mask_x, d0, D, BLOCK_D)
            y = load_rows(Y, offs_y, mask_y, d0, D, BLOCK_D)
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
    separately so the scale gradient can centre each on its own positive (see ``backward_fused.pairwise_bwd_kernel``).
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
