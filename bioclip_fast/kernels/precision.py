"""Precision of the kernels' products: the ``tl.dot`` input precision of an operand dtype. Imports torch only (no
triton): ``bioclip_fast.ops.precision`` builds the losses' compute-dtype plan on it.
"""
from __future__ import annotations

import torch


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``: "" for bf16/fp16 (tensor cores, fp32 accumulation),
    for fp32 the mode ``torch.set_float32_matmul_precision`` selects, like torch's own fp32 matmuls."""
    if dtype != torch.float32:
        return ""
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}.get(torch.get_float32_matmul_precision(), "ieee")
