"""Fused SigLIP (pairwise sigmoid) loss: Triton forward/backward kernels and host launchers. No autograd here.

``loss = -(1/Bq) * sum_ij logsigmoid(z_ij * S_ij)``, ``S = scale * q @ k^T + bias``, ``z_ij = +1`` iff
``j == i + offset`` else -1. The loss is elementwise in S, so the forward is one tiled sweep that keeps a running
sum (no LSE vectors) and the backward recomputes each tile: ``dS_ij = -z_ij * sigmoid(-z_ij * S_ij) / Bq``.

``offset`` may be anything: positives exist only where ``0 <= i + offset < Bk``; ``offset >= Bk`` makes every pair
a negative (open_clip's neighbour-exchange chunks).

FLOPs (``flops()``): forward 2*Bq*Bk*D; forward + backward reported as 8*Bq*Bk*D (executed: 10*Bq*Bk*D, the dQ
and dK kernels each recompute the logits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bioclip_fast.kernels.autotune import (INTERPRET_FWD_CONFIG, autotuned, fwd_configs, launch, prune_fwd, size_bucket,
                                           target_programs)
from bioclip_fast.kernels.backward import pairwise_bwd_both
from bioclip_fast.kernels.operands import chunk_pairs
from bioclip_fast.kernels.planner import fwd_chunks, pairwise_flops
from bioclip_fast.kernels.precision import dot_precision, fixed_order_logits
from bioclip_fast.kernels.tiles import MODE_SIGLIP, mma, tile_dot
from bioclip_fast.kernels.validation import check_loss_inputs, compute_operand, grad_loss_tensor

__all__ = ["siglip_fwd", "siglip_bwd", "flops"]


@triton.jit
def siglip_fwd_kernel(
    Q, K, SCALE, BIAS, PART,
    Bq, Bk, offset, n_splits,
    B_BUCKET,  # autotune key only
    D: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, FIXED_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block m, column split h) writes sum over its tiles of -logsigmoid(z * S) to PART[m, h]."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_cb = tl.cdiv(Bk, BLOCK_N)
    cb_start = pid_h * n_cb // n_splits
    cb_end = (pid_h + 1) * n_cb // n_splits

    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * 1.4426950408889634
    else:
        bias2 = 0.0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Bq
    if D <= BLOCK_D and not FIXED_ORDER:
        q_tile = tl.load(Q + offs_m.to(tl.int64)[:, None] * D + tl.arange(0, BLOCK_D)[None, :],
                         mask=mask_m[:, None] & (tl.arange(0, BLOCK_D)[None, :] < D), other=0.0)
    tgt = offs_m + offset
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for cb in range(cb_start, cb_end):
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Bk
        if D <= BLOCK_D and not FIXED_ORDER:
            k_tile = tl.load(K + offs_n.to(tl.int64)[:, None] * D + tl.arange(0, BLOCK_D)[None, :],
                             mask=mask_n[:, None] & (tl.arange(0, BLOCK_D)[None, :] < D), other=0.0)
            t = mma(q_tile, tl.trans(k_tile), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC)
        else:
            t = tile_dot(Q, K, offs_m, mask_m, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, PREC, FIXED_ORDER)
        s2 = t * scale2 + bias2
        # -logsigmoid(x) = softplus(-x) = max(-x, 0) + log(1 + exp(-|x|)), x = z * S (log2 units for exp2).
        x2 = tl.where(offs_n[None, :] == tgt[:, None], s2, -s2)
        e = tl.exp2(-tl.abs(x2))
        log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))  # log1p without cancellation
        val = tl.maximum(-x2, 0.0) * 0.6931471805599453 + log1p_e
        val = tl.where(mask_m[:, None] & mask_n[None, :], val, 0.0)
        acc += tl.sum(val, 1)
    tl.store(PART + pid_m * n_splits + pid_h, tl.sum(acc, 0))


siglip_fwd_tuned = autotuned(
    siglip_fwd_kernel, configs=fwd_configs(64),  # placeholder: prune_fwd builds the list for the call's D
    key=["B_BUCKET", "D", "PREC"], prune=prune_fwd,
    reset_to_zero=["PART"],  # one slot per (row block, split): configs with more row blocks write more slots
)


def _check_offset(offset):
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")


def _siglip_fwd_launch(q, k, scale32, bias32, offset: int) -> torch.Tensor:
    """One launch over q [Bq, D] x k [Bk, D] (operands as given): the float64 sum of its loss terms."""
    Bq, D = q.shape
    Bk = k.shape[0]
    dev = q.device
    min_bm = 16  # smallest BLOCK_M of any config: PART is sized for it
    rows_blocks = triton.cdiv(Bq, 128)
    H = min(triton.cdiv(Bk, 128), max(1, triton.cdiv(target_programs(dev), rows_blocks)))
    part = torch.zeros((triton.cdiv(Bq, min_bm), H), device=dev, dtype=torch.float32)
    args = (q, k, scale32, bias32 if bias32 is not None else scale32, part, Bq, Bk, int(offset), H,
            size_bucket(max(Bq, Bk)))
    meta = dict(D=D, HAS_BIAS=bias32 is not None, PREC=dot_precision(q.dtype), FIXED_ORDER=fixed_order_logits(dev))

    def grid(META):
        return (triton.cdiv(Bq, META["BLOCK_M"]), H)

    launch(siglip_fwd_kernel, siglip_fwd_tuned, grid, args, meta, INTERPRET_FWD_CONFIG, dev)
    # Partials are O(B/BLOCK_M * H) numbers: sum them in float64 so the total does not depend on the split.
    return part.double().sum()


def siglip_fwd(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               offset: int = 0, compute: torch.dtype | None = None,
               chunks: tuple[int, int] | None = None) -> torch.Tensor:
    """SigLIP loss of rows q [Bq, D] against columns k [Bk, D] (fp32 scalar tensor). ``compute``: the products'
    dtype when it differs from the features' (fp32 features, bf16/fp16 products): q and k are cast per (row x
    column) chunk within the memory budget (``fwd_chunks``), one launch per chunk pair."""
    q, k, scale32, bias32 = check_loss_inputs(q, k, scale, bias)
    _check_offset(offset)
    Bq, D = q.shape
    Bk = k.shape[0]
    op = compute_operand(q, compute) or q.dtype
    if chunks is None:
        chunks = fwd_chunks(Bq, Bk, D, op.itemsize, op != q.dtype)
    total = torch.zeros((), device=q.device, dtype=torch.float64)
    for r0, q_r, c0, k_c in chunk_pairs(q, k, chunks, op):
        total += _siglip_fwd_launch(q_r, k_c, scale32, bias32, offset + r0 - c0)
    return (total / Bq).to(torch.float32)


def siglip_bwd(q, k, scale, bias, offset: int, grad_loss, need_q: bool = True, need_k: bool = True,
               compute: torch.dtype | None = None):
    """Gradients of ``siglip_fwd``'s loss: ``(dq, dk, dscale, dbias_or_None)``, with
    ``dS_ij = -z_ij * sigmoid(-z_ij * S_ij) / Bq * grad_loss``, ``dscale = sum dS * (q k^T)``, ``dbias = sum dS``."""
    q, k, scale32, bias32 = check_loss_inputs(q, k, scale, bias)
    _check_offset(offset)
    Bq = q.shape[0]
    g = grad_loss_tensor(grad_loss, q.device)
    dq, dk, ds, db = pairwise_bwd_both(q, k, scale32, bias32, None, None, g, offset=offset, inv_n=1.0 / Bq,
                                       mode=MODE_SIGLIP, need_q=need_q, need_k=need_k,
                                       op_dtype=compute_operand(q, compute))
    dscale = ds.reshape(scale.shape).to(torch.float32)
    dbias = db.reshape(bias.shape).to(torch.float32) if bias is not None else None
    return dq, dk, dscale, dbias


def flops(Bq: int, Bk: int, D: int, backward: bool = True) -> int:
    """Reported FLOPs: forward 2*Bq*Bk*D, forward + backward 8*Bq*Bk*D."""
    return pairwise_flops(Bq, Bk, D, backward)
