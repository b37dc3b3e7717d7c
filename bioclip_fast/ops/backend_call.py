"""What the loss custom ops share: the concrete backend a call runs on, the backward call every backend takes, and
the dtypes and placeholders of the ops' outputs (custom op outputs cannot be None)."""
from __future__ import annotations

from typing import Optional

import torch

from bioclip_fast.ops import dispatch
from bioclip_fast.ops.precision import compute_kw


def backend_impl(backend: str, q: torch.Tensor):
    """The primitives of the backend ``backend`` resolves to for features ``q`` (see ``dispatch.resolve``)."""
    return dispatch.get(dispatch.resolve(backend, q.device, q.dtype))


def out_dtype(q: torch.Tensor) -> torch.dtype:
    """Losses / LSEs are fp32, float64 for float64 features (the reference computes those in float64)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def dbias_out(dbias: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    # custom_op outputs cannot be None: without a bias, return zeros (autograd drops them).
    return torch.zeros_like(scale) if dbias is None else dbias


def grad_out(g: Optional[torch.Tensor], like: torch.Tensor, needed: bool) -> torch.Tensor:
    # A feature gradient autograd does not need is skipped by the backend; the op returns an empty placeholder.
    if not needed:
        return like.new_empty(0)
    return g


def fake_grad(like: torch.Tensor, needed: bool) -> torch.Tensor:
    return torch.empty_like(like) if needed else like.new_empty(0)


def call_bwd(impl_fn, *args, need_q: bool, need_k: bool, compute: str = ""):
    """Call a backend's backward; every backend skips the product of a feature gradient nobody needs."""
    return impl_fn(*args, need_q=need_q, need_k=need_k, **compute_kw(compute))
