"""CLIP (InfoNCE) loss ops: ``torch.library.custom_op`` wrappers with fake impls and autograd.

``bioclip_fast::clip_sym_fwd`` / ``clip_sym_bwd`` (square batch, both directions from one sweep) and
``bioclip_fast::clip_dir_fwd`` / ``clip_dir_bwd`` (one direction, rows vs a wider set of columns, positives at
``i + offset``). The ops are opaque to ``torch.compile`` (``fullgraph=True`` works) and dispatch at run time to
Triton / C++ / the torch reference (see ``dispatch.py``). Inputs reach the ops as given dtype features and fp32
scale/bias tensors; the public helpers below do the conversion and validation.
"""
from __future__ import annotations

from typing import Optional

import torch

from bioclip_fast.ops.backend_call import backend_impl, call_bwd, dbias_out, fake_grad, grad_out, out_dtype
from bioclip_fast.ops.precision import compute_kw, operands
from bioclip_fast.ops.validate import prepare_loss_inputs


# ------------------------------------------------------------------------------------------------ symmetric
@torch.library.custom_op("bioclip_fast::clip_sym_fwd", mutates_args=())
def clip_sym_fwd_op(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], backend: str,
    compute: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, lse_row, lse_col = backend_impl(backend, q).clip_sym_fwd(q.contiguous(), k.contiguous(), scale, bias,
                                                                   **compute_kw(compute))
    return loss.reshape(()), lse_row, lse_col


@clip_sym_fwd_op.register_fake
def _(q, k, scale, bias, backend, compute=""):
    B, dt = q.shape[0], out_dtype(q)
    return q.new_empty((), dtype=dt), q.new_empty(B, dtype=dt), q.new_empty(B, dtype=dt)


@torch.library.custom_op("bioclip_fast::clip_sym_bwd", mutates_args=())
def clip_sym_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    grad_loss: torch.Tensor,
    backend: str,
    need_q: bool = True,
    need_k: bool = True,
    compute: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, ds, db = call_bwd(backend_impl(backend, q).clip_sym_bwd, q.contiguous(), k.contiguous(), scale, bias,
                              lse_row, lse_col, grad_loss.to(out_dtype(q)), need_q=need_q, need_k=need_k,
                              compute=compute)
    return grad_out(dq, q, need_q), grad_out(dk, k, need_k), ds, dbias_out(db, scale)


@clip_sym_bwd_op.register_fake
def _(q, k, scale, bias, lse_row, lse_col, grad_loss, backend, need_q=True, need_k=True, compute=""):
    return (fake_grad(q, need_q), fake_grad(k, need_k), torch.empty_like(scale),
            torch.empty_like(scale if bias is None else bias))


def _sym_setup(ctx, inputs, output):
    q, k, scale, bias, backend, compute = inputs
    _, lse_row, lse_col = output
    ctx.backend, ctx.compute = backend, compute
    ctx.has_bias = bias is not None
    ctx.save_for_backward(q, k, scale, bias, lse_row, lse_col)


def _sym_backward(ctx, grad_loss, _grad_lse_row, _grad_lse_col):
    q, k, scale, bias, lse_row, lse_col = ctx.saved_tensors
    nq, nk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dk, ds, db = clip_sym_bwd_op(q, k, scale, bias, lse_row, lse_col, grad_loss, ctx.backend, nq, nk,
                                     ctx.compute)
    return (dq if nq else None), (dk if nk else None), ds, (db if ctx.has_bias else None), None, None


clip_sym_fwd_op.register_autograd(_sym_backward, setup_context=_sym_setup)


# ------------------------------------------------------------------------------------------------ one direction
@torch.library.custom_op("bioclip_fast::clip_dir_fwd", mutates_args=())
def clip_dir_fwd_op(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], offset: int, backend: str,
    compute: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, lse = backend_impl(backend, q).clip_dir_fwd(q.contiguous(), k.contiguous(), scale, bias, offset,
                                                      **compute_kw(compute))
    return loss.reshape(()), lse


@clip_dir_fwd_op.register_fake
def _(q, k, scale, bias, offset, backend, compute=""):
    dt = out_dtype(q)
    return q.new_empty((), dtype=dt), q.new_empty(q.shape[0], dtype=dt)


@torch.library.custom_op("bioclip_fast::clip_dir_bwd", mutates_args=())
def clip_dir_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    offset: int,
    grad_loss: torch.Tensor,
    backend: str,
    need_q: bool = True,
    need_k: bool = True,
    compute: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, ds, db = call_bwd(backend_impl(backend, q).clip_dir_bwd, q.contiguous(), k.contiguous(), scale, bias, lse,
                              offset, grad_loss.to(out_dtype(q)), need_q=need_q, need_k=need_k, compute=compute)
    return grad_out(dq, q, need_q), grad_out(dk, k, need_k), ds, dbias_out(db, scale)


@clip_dir_bwd_op.register_fake
def _(q, k, scale, bias, lse, offset, grad_loss, backend, need_q=True, need_k=True, compute=""):
    return (fake_grad(q, need_q), fake_grad(k, need_k), torch.empty_like(scale),
            torch.empty_like(scale if bias is None else bias))


def _dir_setup(ctx, inputs, output):
    q, k, scale, bias, offset, backend, compute = inputs
    ctx.backend, ctx.offset, ctx.has_bias, ctx.compute = backend, offset, bias is not None, compute
    ctx.save_for_backward(q, k, scale, bias, output[1])


def _dir_backward(ctx, grad_loss, _grad_lse):
    q, k, scale, bias, lse = ctx.saved_tensors
    nq, nk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dk, ds, db = clip_dir_bwd_op(q, k, scale, bias, lse, ctx.offset, grad_loss, ctx.backend, nq, nk,
                                     ctx.compute)
    return (dq if nq else None), (dk if nk else None), ds, (db if ctx.has_bias else None), None, None, None


clip_dir_fwd_op.register_autograd(_dir_backward, setup_context=_dir_setup)


# ------------------------------------------------------------------------------------------------ public helpers
def clip_sym_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scale,
    bias=None,
    *,
    backend: str = "auto",
    check_finite_inputs: bool = True,
    q_name: str = "image_features",
    k_name: str = "text_features",
    compute_dtype="auto",
) -> torch.Tensor:
    """½(CE(S, diag) + CE(Sᵀ, diag)) with S = scale·q@kᵀ + bias, never materializing S. Differentiable in all.
    ``compute_dtype``: dtype of the products on CUDA (see ``bioclip_fast.ops.precision``)."""
    scale_t, bias_t, _ = prepare_loss_inputs(q, k, scale, bias, backend=backend,
                                             check_finite_inputs=check_finite_inputs, q_name=q_name, k_name=k_name,
                                             same_batch=True)
    q, k, compute = operands(q, k, compute_dtype, backend)
    return clip_sym_fwd_op(q, k, scale_t, bias_t, backend, compute)[0]


def clip_dir_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scale,
    bias=None,
    offset: int = 0,
    *,
    backend: str = "auto",
    check_finite_inputs: bool = True,
    q_name: str = "q",
    k_name: str = "k",
    compute_dtype="auto",
) -> torch.Tensor:
    """mean_i CE(S_i, i+offset) with S = scale·q@kᵀ + bias (q: local rows, k: e.g. all-gathered columns)."""
    scale_t, bias_t, offset = prepare_loss_inputs(q, k, scale, bias, backend=backend,
                                                  check_finite_inputs=check_finite_inputs, q_name=q_name,
                                                  k_name=k_name, same_batch=False, offset=offset)
    q, k, compute = operands(q, k, compute_dtype, backend)
    return clip_dir_fwd_op(q, k, scale_t, bias_t, offset, backend, compute)[0]
