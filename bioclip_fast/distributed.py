"""torch.distributed helpers below the losses and the trainer: a process's rank info (`DistInfo`, from the launcher's
environment), rank/world queries, the small collectives by which ranks agree (rank 0's object on every rank, every
rank's object on every rank, the first rank's error on every rank) and feature all-gathers with open_clip semantics.

The agreement helpers take a `DistInfo` and are no-ops (no collective) for a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Rank info as set by torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


# ------------------------------------------------------------------------------------------ agreement (no-ops alone)
def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def first_error(error: str | None, info: DistInfo) -> str | None:
    """Collective: the first rank's error (None when no rank has one), the same on every rank, so that every rank
    stops alike and none is left waiting in the next collective."""
    errors = [e for e in all_gather_objects(error, info) if e]
    return errors[0] if errors else None


def any_rank(flag: bool, info: DistInfo, device: "torch.device | str" = "cpu") -> bool:
    """Collective: True on every rank when `flag` is True on any rank (one all-reduce of one number)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if info.distributed:
        dist.all_reduce(t)
    return bool(t.item() > 0)


def rank0_value(value: float, info: DistInfo, device: "torch.device | str" = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """Collective: rank 0's `value` on every rank (e.g. rank 0's clock decides a time budget for everyone)."""
    t = torch.tensor([value], dtype=dtype)
    if info.distributed:
        t = t.to(device)
        dist.broadcast(t, src=0)
    return float(t.item())


# ------------------------------------------------------------------------------------------ queries and gathers
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def _check(t: torch.Tensor, name: str, world_size: int) -> None:
    if not is_initialized():
        raise RuntimeError(f"gathering {name} across world_size={world_size} needs torch.distributed initialized")
    actual = dist.get_world_size()
    if actual != world_size:
        raise ValueError(f"world_size={world_size} but the default process group has {actual} ranks")


# torch >= 2.12 names the single-tensor collectives *_single (the *_into_tensor / *_tensor names warn)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 into one tensor; backward reduce-scatters (sums) the gradient to each rank's slice.

    The same gradients as ``torch.distributed.nn.functional.all_gather`` (deprecated, warns on every call): NCCL
    reduce-scatters; backends without reduce-scatter (gloo) exchange the slices all-to-all and sum them in rank
    order, as that function does."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        out = t.new_empty((world_size * t.shape[0], *t.shape[1:]))
        _all_gather_single(out, t)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            return reduce_scatter_sum(grad, ctx.world_size), None
        return all_to_all_sum(grad, ctx.world_size), None


def reduce_scatter_sum(grad: torch.Tensor, world_size: int) -> torch.Tensor:
    """This rank's dim-0 slice of the sum over ranks of `grad` (one reduce-scatter)."""
    out = grad.new_empty((grad.shape[0] // world_size, *grad.shape[1:]))
    _reduce_scatter_single(out, grad)
    return out


def all_to_all_sum(grad: torch.Tensor, world_size: int) -> torch.Tensor:
    """The same as :func:`reduce_scatter_sum` for backends without reduce-scatter: slice r of every rank's `grad`
    arrives at rank r (all-to-all) and is summed in rank order."""
    parts = torch.empty_like(grad)
    dist.all_to_all_single(parts, grad)
    return parts.view(world_size, -1, *grad.shape[1:]).sum(dim=0)


def all_gather_with_grad(t: torch.Tensor, *, name: str = "tensor", world_size: int | None = None) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0; backward reduce-scatters (sums) the gradient back to each
    rank's slice, as open_clip's ``gather_with_grad=True`` (``torch.distributed.nn.functional.all_gather``)."""
    world_size = get_world_size() if world_size is None else world_size
    if world_size == 1:
        return t
    _check(t, name, world_size)
    return _AllGatherWithGrad.apply(t.contiguous(), world_size)


def all_gather_no_grad(
    t: torch.Tensor, *, rank: int, world_size: int, keep_local_grad: bool = True, name: str = "tensor"
) -> torch.Tensor:
    """Concatenate ``t`` from every rank without autograd through the collective.

    With ``keep_local_grad`` the local slice is the input tensor itself, so gradients still reach this rank's own
    features (open_clip's ``gather_with_grad=False`` without ``local_loss``); otherwise the whole result is
    detached (open_clip's ``gather_with_grad=False`` with ``local_loss``).
    """
    if world_size == 1:
        return t
    _check(t, name, world_size)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    if keep_local_grad:
        parts[rank] = t
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``gather_features`` (torch.distributed flavour), same gradient semantics."""
    if gather_with_grad:
        return (
            all_gather_with_grad(image_features, name="image_features", world_size=world_size),
            all_gather_with_grad(text_features, name="text_features", world_size=world_size),
        )
    keep = not local_loss
    return (
        all_gather_no_grad(image_features, rank=rank, world_size=world_size, keep_local_grad=keep, name="image_features"),
        all_gather_no_grad(text_features, rank=rank, world_size=world_size, keep_local_grad=keep, name="text_features"),
    )
