"""Which precision the loss's products run in: the compute dtype of the features and the ``tl.dot`` input precision.

open_clip's loss under autocast multiplies in bf16 with fp32 accumulation; a trainer that hands the loss fp32
features (``f["image"].float()``) would otherwise get ``input_precision="ieee"`` on CUDA: exact fp32 FMAs on the
CUDA cores, ~15x below the bf16 tensor-core rate. So the fused losses take a ``compute_dtype``:

* ``"auto"`` (default): the autocast dtype when autocast is on for the features' device (like every autocast op),
  else the features' own dtype;
* ``torch.bfloat16`` / ``torch.float16`` (or "bf16" / "fp16"): the products run on the tensor cores in that dtype
  with fp32 accumulation (features are cast once, O(B*D), differentiably: gradients come back in the input dtype);
* ``torch.float32`` (or "fp32"): exact fp32 products on request (``input_precision`` then follows
  ``torch.set_float32_matmul_precision``: "highest" -> "ieee", "high" -> "tf32x3", "medium" -> "tf32").

The cast applies where the products run on tensor cores (CUDA); the CPU backends compute in fp32 whatever the input
dtype, so casting there would only lose precision. float64 features never take a low-precision path: they go to
the torch reference in float64.
"""
from __future__ import annotations

import torch

from bioclip_fast.kernels.precision import input_precision

_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}
_ALLOWED = (torch.bfloat16, torch.float16, torch.float32)


def check_compute_dtype(compute_dtype) -> str | torch.dtype:
    """``"auto"`` or one of bf16/fp16/fp32 (dtype or name); raises ValueError naming the value otherwise."""
    if compute_dtype is None or compute_dtype == "auto":
        return "auto"
    if isinstance(compute_dtype, str):
        if compute_dtype.lower() not in _NAMES:
            raise ValueError(f"compute_dtype must be 'auto', 'bf16', 'fp16', 'fp32' or a torch dtype, got "
                             f"{compute_dtype!r}")
        return _NAMES[compute_dtype.lower()]
    if compute_dtype not in _ALLOWED:
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
    return compute_dtype


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # device type without autocast support
        return None
    return None


def operand_dtype(input_dtype: torch.dtype, device_type: str, compute_dtype="auto",
                  autocast_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the features are multiplied in. ``autocast_dtype`` overrides the autocast state (for tests)."""
    cd = check_compute_dtype(compute_dtype)
    if input_dtype == torch.float64 or device_type != "cuda":
        return input_dtype
    if cd == "auto":
        ac = autocast_dtype if autocast_dtype is not None else _autocast_dtype(device_type)
        cd = ac if ac in _ALLOWED else input_dtype
    return cd


def cuda_plan(input_dtype: torch.dtype, compute_dtype="auto", autocast_dtype: torch.dtype | None = None) -> dict:
    """What the CUDA (Triton) dispatch does with features of ``input_dtype``: ``{"operand_dtype",
    "input_precision", "tensor_cores"}``."""
    op = operand_dtype(input_dtype, "cuda", compute_dtype, autocast_dtype)
    prec = input_precision(op)
    return {"operand_dtype": op, "input_precision": prec, "tensor_cores": prec != "ieee"}


def cast_features(q: torch.Tensor, k: torch.Tensor, compute_dtype="auto"):
    """``(q, k)`` in the operand dtype for their device (a no-op when it already matches)."""
    op = operand_dtype(q.dtype, q.device.type, compute_dtype)
    if q.dtype != op:
        q = q.to(op)
    if k.dtype != op:
        k = k.to(op)
    return q, k


_COMPUTE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def operands(q: torch.Tensor, k: torch.Tensor, compute_dtype="auto", backend: str = "auto"):
    """``(q, k, compute)`` for the loss ops. fp32 features whose products run in bf16/fp16 on the Triton backend
    stay fp32 and the op casts them per chunk (``compute`` = "bf16"/"fp16"): the gradients are then fp32 and
    accumulate in place (one recompute of each logits tile at every B within the backward's memory budget), and
    no full-size copy of the features in the compute dtype exists. Otherwise the features are cast here as
    ``cast_features`` does and ``compute`` is ""."""
    op = operand_dtype(q.dtype, q.device.type, compute_dtype)
    if op == q.dtype and op == k.dtype:
        return q, k, ""
    if q.dtype == torch.float32 and k.dtype == torch.float32 and op in _COMPUTE_NAMES:
        from bioclip_fast.ops import dispatch

        compute = in_op_compute(q.dtype, k.dtype, op, dispatch.resolve(backend, q.device, q.dtype))
        if compute:
            return q, k, compute
    q, k = cast_features(q, k, compute_dtype)
    return q, k, ""


def in_op_compute(q_dtype: torch.dtype, k_dtype: torch.dtype, op: torch.dtype, backend: str) -> str:
    """"bf16"/"fp16" where the op casts per chunk (fp32 features, half-precision products, Triton backend), else
    "" (the features are cast before the op, or not at all)."""
    if backend == "triton" and q_dtype == k_dtype == torch.float32 and op in _COMPUTE_NAMES:
        return _COMPUTE_NAMES[op]
    return ""


def compute_kw(compute: str) -> dict:
    """Keyword arguments for a backend call: ``{"compute": dtype}`` when the op casts per chunk (Triton only)."""
    if not compute:
        return {}
    if compute not in ("bf16", "fp16"):
        raise ValueError(f"compute must be '', 'bf16' or 'fp16', got {compute!r}")
    return {"compute": _NAMES[compute]}
