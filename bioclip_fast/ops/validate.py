"""Input checks shared by the loss ops: every error names the offending argument and what is wrong with it."""
from __future__ import annotations

import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: the torch reference


def as_scalar_tensor(value, name: str, like: torch.Tensor, *, optional: bool = False) -> torch.Tensor | None:
    """Turn a logit scale / bias (Python number, 0-dim or [1] tensor) into a fp32 tensor on ``like``'s device.

    A tensor keeps its autograd history (the fp32 cast is differentiable), so gradients reach the parameter.
    """
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a tensor or a number, got None")
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, numbers.Real)):
        raise TypeError(f"{name} must be a tensor or a real number, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a 0-dim or 1-element [1] tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def check_features(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_name: str = "image_features",
    k_name: str = "text_features",
    same_batch: bool = True,
) -> None:
    """Shape / dtype / device checks for a (rows, columns) feature pair."""
    for t, name in ((q, q_name), (k, k_name)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16, float64")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)})")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has feature dimension 0 (shape {tuple(t.shape)})")
    if q.device != k.device:
        raise ValueError(f"{q_name} is on {q.device} but {k_name} is on {k.device}")
    if q.dtype != k.dtype:
        raise TypeError(f"{q_name} has dtype {q.dtype} but {k_name} has dtype {k.dtype}; cast them to one dtype")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"feature dims differ: {q_name} has D={q.shape[1]}, {k_name} has D={k.shape[1]}")
    if same_batch and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: {q_name} has B={q.shape[0]}, {k_name} has B={k.shape[0]}")


def check_finite(**tensors: torch.Tensor | None) -> None:
    """One fused reduction per tensor. On CPU a ValueError naming the tensors; on an accelerator an asynchronous
    device-side assert (no device->host sync per step: the step is not stalled waiting for the flag).

    Pass ``check_finite=False`` to the losses to skip it (it costs one read of each tensor).
    """
    names = [n for n, t in tensors.items() if t is not None]
    if not names:
        return
    flags = torch.stack([torch.isfinite(tensors[n]).all() for n in names])
    if torch.compiler.is_compiling() or flags.device.type != "cpu":
        # No host sync: an async device-side assert (RuntimeError at the next sync) instead.
        torch._assert_async(flags.all(), f"non-finite values (NaN or Inf) in one of {', '.join(names)}")
        return
    if bool(flags.all()):
        return
    bad = [n for n, ok in zip(names, flags.tolist()) if not ok]
    raise ValueError(f"non-finite values (NaN or Inf) in {', '.join(bad)}")


def check_offset(offset, n_rows: int, n_cols: int, *, need_all_positives: bool) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if need_all_positives and offset + n_rows > n_cols:
        raise ValueError(
            f"offset {offset} + {n_rows} rows exceeds the {n_cols} columns: every row needs its positive column"
        )
    return offset


def prepare_loss_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale,
    bias,
    *,
    backend: str,
    check_finite_inputs: bool,
    q_name: str,
    k_name: str,
    same_batch: bool,
    offset=None,
    need_all_positives: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None]:
    """The checks every public loss op runs: backend, features, offset, scale/bias as fp32 tensors, finiteness.

    Returns (scale tensor, bias tensor or None, validated offset or None).
    """
    from bioclip_fast.ops import dispatch

    dispatch.check_backend(backend)
    check_features(q, k, q_name=q_name, k_name=k_name, same_batch=same_batch)
    if offset is not None:
        offset = check_offset(offset, q.shape[0], k.shape[0], need_all_positives=need_all_positives)
    scale_t = as_scalar_tensor(scale, "logit_scale", q)
    bias_t = as_scalar_tensor(bias, "logit_bias", q, optional=True)
    if check_finite_inputs:
        check_finite(**{q_name: q, k_name: k, "logit_scale": scale_t, "logit_bias": bias_t})
    return scale_t, bias_t, offset
