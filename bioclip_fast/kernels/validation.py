"""Host-side validation shared by the launchers: cheap checks (no device sync) of the features, scalars and vectors
they are handed, and of the compute dtype."""
from __future__ import annotations

import torch

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


def check_loss_inputs(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """A launcher's features and scalars checked: contiguous q, k and fp32 scale, bias (None stays None)."""
    q, k = check_features(q, k)
    scale32 = check_scalar(scale, "scale", q.device)
    bias32 = check_scalar(bias, "bias", q.device, optional=True)
    return q, k, scale32, bias32


def grad_loss_tensor(grad_loss, device: torch.device) -> torch.Tensor:
    """The upstream gradient of a loss as an fp32 one-element tensor on ``device`` (a Python number is accepted)."""
    if not isinstance(grad_loss, torch.Tensor):
        return torch.tensor(float(grad_loss), device=device, dtype=torch.float32)
    return check_scalar(grad_loss, "grad_loss", device)


def compute_operand(q: torch.Tensor, compute: torch.dtype | None) -> torch.dtype | None:
    """The products' dtype when it differs from the features': only fp32 features are cast (per chunk)."""
    if compute is None or compute == q.dtype:
        return None
    if q.dtype != torch.float32 or compute not in (torch.bfloat16, torch.float16):
        raise ValueError(f"compute={compute} needs fp32 features and a bf16/fp16 compute dtype, got {q.dtype}")
    return compute
