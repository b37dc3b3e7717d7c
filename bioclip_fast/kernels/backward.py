"""The backward of the pairwise losses: ``pairwise_bwd_both`` picks a strategy (``planner.bwd_plan``: fused, gemm or
gemm2d, from B, D, the dtypes and the memory budget) and runs it (``backward_fused`` / ``backward_gemm``).
"""
from __future__ import annotations

import torch

from bioclip_fast.kernels.backward_fused import pairwise_bwd
from bioclip_fast.kernels.backward_gemm import pairwise_bwd_gemm, pairwise_bwd_gemm2d
from bioclip_fast.kernels.operands import positive_dots
from bioclip_fast.kernels.planner import bwd_plan
from bioclip_fast.kernels.tiles import MODE_CLIP_DIR, MODE_CLIP_SYM


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
