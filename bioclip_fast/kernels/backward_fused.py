"""The fused backward of the pairwise losses: one Triton kernel, launched twice per loss, that recomputes each logits
tile and accumulates ``G @ Y`` in registers.

It is launched once with the Q rows as its fixed "outer" block (streaming K, giving dQ) and once with the K rows as
the outer block (streaming Q, giving dK). Each program owns its output rows, so there are no atomics and results
are deterministic. The output width D is covered by ``NUM_ACC`` register accumulators of ``BLOCK_DO`` columns;
when D is wider than ``NUM_ACC * BLOCK_DO`` the grid gets a second axis over D slices and each slice recomputes the
logits tile (the autotuner weighs that recompute against register pressure for wide D; see
``autotune.bwd_configs``). O(B) extra memory (``planner.fused_extra_bytes``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bioclip_fast.kernels.autotune import INTERPRET_BWD_CONFIG, autotuned, bwd_configs, launch, prune_bwd, size_bucket
from bioclip_fast.kernels.precision import dot_precision, fixed_order_logits, grad_prescale
from bioclip_fast.kernels.tiles import fixed_order_dot, load_rows, load_slice, mma, row_probs, sym_probs, tile_dot


@triton.jit
def _acc_slice(acc, g, Y, offs_y, mask_y, d0, D: tl.constexpr, BLOCK_DO: tl.constexpr, PREC: tl.constexpr,
               EXACT: tl.constexpr):
    # g arrives pre-scaled (GSCALE) and already cast to the operand dtype.
    y = load_slice(Y, offs_y, mask_y, d0, D, BLOCK_DO, EXACT)
    return mma(g, y, acc, PREC)


@triton.jit
def _store_slice(DX, acc, offs_x, mask_x, d0, factor, D: tl.constexpr, BLOCK_DO: tl.constexpr):
    offs_d = d0 + tl.arange(0, BLOCK_DO)
    ptrs = DX + offs_x.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(ptrs, (acc * factor).to(DX.dtype.element_ty), mask=mask_x[:, None] & (offs_d[None, :] < D))


@triton.jit
def _recentre_slice(acc, corr, Y, offs_pos, mask_x, d0, D: tl.constexpr, BLOCK_DO: tl.constexpr,
                    EXACT: tl.constexpr):
    ypos = load_slice(Y, offs_pos, mask_x, d0, D, BLOCK_DO, EXACT).to(tl.float32)
    return acc + corr[:, None] * ypos


@triton.jit
def _normalize_slice(acc, inv_rs, Y, offs_pos, mask_x, d0, D: tl.constexpr, BLOCK_DO: tl.constexpr,
                     EXACT: tl.constexpr):
    """acc / rowsum - Y[positive rows]: the row softmax renormalized, then its -onehot (see RENORM)."""
    ypos = load_slice(Y, offs_pos, mask_x, d0, D, BLOCK_DO, EXACT).to(tl.float32)
    return acc * inv_rs[:, None] - ypos


@triton.jit
def pairwise_bwd_kernel(
    X, Y, SCALE, BIAS, LSE_X, LSE_Y, CEN_X, CEN_Y, GRAD, DX, DS_PART, DB_PART,
    Bx, By, offset, inv_n,
    B_BUCKET,  # autotune key only
    D: tl.constexpr, MODE: tl.constexpr, X_IS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALAR_GRADS: tl.constexpr, PREC: tl.constexpr, GSCALE: tl.constexpr, QK_ORDER: tl.constexpr,
    FIXED_ORDER: tl.constexpr,
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
    # Whether the programs' D slices tile D exactly; if not, the last program's last slices start at or past D and
    # their loads mask the columns (tiles.load_slice; their accumulators are never stored).
    SLICES_EXACT: tl.constexpr = D % (NUM_ACC * BLOCK_DO) == 0
    if SINGLE_D and not FIXED_ORDER:  # FIXED_ORDER forms the logits from X itself (tiles.fixed_order_dot)
        x_tile = load_rows(X, offs_x, mask_x, 0, D, BLOCK_D)
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
        # FIXED_ORDER (the interpreter) goes further: every kernel, whatever its tile shape and BLOCK_D, sums each
        # logit in one order (tiles.fixed_order_dot; its products are symmetric in the operands, so X @ Y^T is the
        # forward's Q @ K^T entry for entry), and QK_ORDER makes no difference.
        if SINGLE_D:
            y_tile = load_rows(Y, offs_y, mask_y, 0, D, BLOCK_D)
        if FIXED_ORDER:
            t = fixed_order_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D, BLOCK_X, BLOCK_Y)
        elif SINGLE_D:
            if QK_ORDER and not X_IS_ROWS:
                t = tl.trans(mma(y_tile, tl.trans(x_tile), tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32), PREC))
            else:
                t = mma(x_tile, tl.trans(y_tile), tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32), PREC)
        elif QK_ORDER and not X_IS_ROWS:
            t = tl.trans(tile_dot(Y, X, offs_y, mask_y, offs_x, mask_x, D, BLOCK_Y, BLOCK_X, BLOCK_D, PREC, False))
        else:
            t = tile_dot(X, Y, offs_x, mask_x, offs_y, mask_y, D, BLOCK_X, BLOCK_Y, BLOCK_D, PREC, False)
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
            acc0 = _acc_slice(acc0, gq, Y, offs_y, mask_y, d_base, D, BLOCK_DO, PREC, SLICES_EXACT)
            if NUM_ACC > 1:
                acc1 = _acc_slice(acc1, gq, Y, offs_y, mask_y, d_base + BLOCK_DO, D, BLOCK_DO, PREC, SLICES_EXACT)
            if NUM_ACC > 2:
                acc2 = _acc_slice(acc2, gq, Y, offs_y, mask_y, d_base + 2 * BLOCK_DO, D, BLOCK_DO, PREC, SLICES_EXACT)
            if NUM_ACC > 3:
                acc3 = _acc_slice(acc3, gq, Y, offs_y, mask_y, d_base + 3 * BLOCK_DO, D, BLOCK_DO, PREC, SLICES_EXACT)

    factor = scale * coef / GSCALE
    if RENORM:
        inv_rs = 1.0 / (tl.where(mask_x, rs_acc, 1.0) * GSCALE)
        offs_pos = offs_x + offset
        acc0 = _normalize_slice(acc0, inv_rs, Y, offs_pos, mask_x, d_base, D, BLOCK_DO, SLICES_EXACT) * GSCALE
        if NUM_ACC > 1:
            acc1 = _normalize_slice(acc1, inv_rs, Y, offs_pos, mask_x,
                                    d_base + BLOCK_DO, D, BLOCK_DO, SLICES_EXACT) * GSCALE
        if NUM_ACC > 2:
            acc2 = _normalize_slice(acc2, inv_rs, Y, offs_pos, mask_x,
                                    d_base + 2 * BLOCK_DO, D, BLOCK_DO, SLICES_EXACT) * GSCALE
        if NUM_ACC > 3:
            acc3 = _normalize_slice(acc3, inv_rs, Y, offs_pos, mask_x,
                                    d_base + 3 * BLOCK_DO, D, BLOCK_DO, SLICES_EXACT) * GSCALE
        if SCALAR_GRADS:
            ds_acc = ds_acc / tl.where(mask_x, rs_acc, 1.0) - tp_acc
    if RECENTRE:
        corr = tl.where(mask_x, 0.5 * GSCALE * (1.0 / tl.where(mask_x, rs_acc, 1.0) - 1.0), 0.0)
        if X_IS_ROWS:
            offs_pos = offs_x + offset
        else:
            offs_pos = offs_x - offset
        acc0 = _recentre_slice(acc0, corr, Y, offs_pos, mask_x, d_base, D, BLOCK_DO, SLICES_EXACT)
        if NUM_ACC > 1:
            acc1 = _recentre_slice(acc1, corr, Y, offs_pos, mask_x, d_base + BLOCK_DO, D, BLOCK_DO, SLICES_EXACT)
        if NUM_ACC > 2:
            acc2 = _recentre_slice(acc2, corr, Y, offs_pos, mask_x, d_base + 2 * BLOCK_DO, D, BLOCK_DO, SLICES_EXACT)
        if NUM_ACC > 3:
            acc3 = _recentre_slice(acc3, corr, Y, offs_pos, mask_x, d_base + 3 * BLOCK_DO, D, BLOCK_DO, SLICES_EXACT)
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


pairwise_bwd_tuned = autotuned(
    pairwise_bwd_kernel, configs=bwd_configs(64),  # placeholder: prune_bwd builds the list for the call's D
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
                PREC=dot_precision(X.dtype), GSCALE=grad_prescale(X.dtype), QK_ORDER=qk_order(X.device),
                FIXED_ORDER=fixed_order_logits(X.device))

    def grid(META):
        return (triton.cdiv(Bx, META["BLOCK_X"]), triton.cdiv(D, META["NUM_ACC"] * META["BLOCK_DO"]))

    launch(pairwise_bwd_kernel, pairwise_bwd_tuned, grid, args, meta, INTERPRET_BWD_CONFIG, X.device)
    if scalar_grads:
        return dx, ds_part.sum(), db_part.sum()
    return dx, None, None
