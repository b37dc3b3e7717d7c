"""SigLIP (sigmoid) loss ops: ``bioclip_fast::siglip_fwd`` / ``siglip_bwd`` custom ops with fake impls and autograd.

Rows ``q`` against columns ``k`` with the positive of row i at column ``i + offset`` (an offset ≥ ``k.shape[0]``
makes every pair a negative, which is how open_clip scores the other ranks' text chunks). Elementwise in S, so no
LSE is saved: backward recomputes S tile by tile.
"""
from __future__ import annotations

from typing import Optional

import torch

from bioclip_fast.ops.backend_call import backend_impl, call_bwd, dbias_out, fake_grad, grad_out, out_dtype
from bioclip_fast.ops.precision import compute_kw, operands
from bioclip_fast.ops.validate import prepare_loss_inputs


@torch.library.custom_op("bioclip_fast::siglip_fwd", mutates_args=())
def siglip_fwd_op(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], offset: int, backend: str,
    compute: str = "",
) -> torch.Tensor:
    return backend_impl(backend, q).siglip_fwd(q.contiguous(), k.contiguous(), scale, bias, offset,
                                               **compute_kw(compute)).reshape(())


@siglip_fwd_op.register_fake
def _(q, k, scale, bias, offset, backend, compute=""):
    return q.new_empty((), dtype=out_dtype(q))


@torch.library.custom_op("bioclip_fast::siglip_bwd", mutates_args=())
def siglip_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    offset: int,
    grad_loss: torch.Tensor,
    backend: str,
    need_q: bool = True,
    need_k: bool = True,
    compute: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, ds, db = call_bwd(backend_impl(backend, q).siglip_bwd, q.contiguous(), k.contiguous(), scale, bias,
                              offset, grad_loss.to(out_dtype(q)), need_q=need_q, need_k=need_k, compute=compute)
    return grad_out(dq, q, need_q), grad_out(dk, k, need_k), ds, dbias_out(db, scale)


@siglip_bwd_op.register_fake
def _(q, k, scale, bias, offset, grad_loss, backend, need_q=True, need_k=True, compute=""):
    return (fake_grad(q, need_q), fake_grad(k, need_k), torch.empty_like(scale),
            torch.empty_like(scale if bias is None else bias))


def _setup(ctx, inputs, output):
    q, k, scale, bias, offset, backend, compute = inputs
    ctx.backend, ctx.offset, ctx.has_bias, ctx.compute = backend, offset, bias is not None, compute
    ctx.save_for_backward(q, k, scale, bias)


def _backward(ctx, grad_loss):
    q, k, scale, bias = ctx.saved_tensors
    nq, nk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dk, ds, db = siglip_bwd_op(q, k, scale, bias, ctx.offset, grad_loss, ctx.backend, nq, nk, ctx.compute)
    return (dq if nq else None), (dk if nk else None), ds, (db if ctx.has_bias else None), None, None, None


siglip_fwd_op.register_autograd(_backward, setup_context=_setup)


def siglip_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scale,
    bias=None,
    offset: int = 0,
    *,
    backend: str = "auto",
    check_finite_inputs: bool = True,
    q_name: str = "image_features",
    k_name: str = "text_features",
    compute_dtype="auto",
) -> torch.Tensor:
    """−(1/Bq)·Σ_ij logsigmoid(z_ij·(scale·q_i·k_j + bias)), z = +1 iff j == i + offset; never materializes S."""
    scale_t, bias_t, offset = prepare_loss_inputs(
        q, k, scale, bias, backend=backend, check_finite_inputs=check_finite_inputs, q_name=q_name, k_name=k_name,
        same_batch=False, offset=offset, need_all_positives=False,
    )
    q, k, compute = operands(q, k, compute_dtype, backend)
    return siglip_fwd_op(q, k, scale_t, bias_t, offset, backend, compute)
