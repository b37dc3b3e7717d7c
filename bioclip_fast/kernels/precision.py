"""Precision of the kernels' products: the ``tl.dot`` input precision of an operand dtype, whether the logits are
summed in a fixed order (the interpreter) and the power of two the fp16 gradient tiles are scaled by. Imports
torch only (no triton): ``bioclip_fast.ops.precision`` builds the losses' compute-dtype plan on it.
"""
from __future__ import annotations

import torch

from bioclip_fast.kernels.settings import interpret_tl_dot


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``: "" for bf16/fp16 (tensor cores, fp32 accumulation),
    for fp32 the mode ``torch.set_float32_matmul_precision`` selects, like torch's own fp32 matmuls."""
    if dtype != torch.float32:
        return ""
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}.get(torch.get_float32_matmul_precision(), "ieee")


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core mode of the kernels' fp32 products, following ``torch.set_float32_matmul_precision`` like
    torch's own fp32 matmuls: "highest" (torch's default) -> exact fp32 ("ieee", CUDA cores), "high" -> 3xTF32
    (about fp32 accuracy on tensor cores), "medium" -> TF32. "" for bf16/fp16 (always tensor cores). The losses
    cast fp32 features to bf16 first under autocast or ``compute_dtype`` (``bioclip_fast.ops.precision``)."""
    return input_precision(dtype)


def fixed_order_logits(device: torch.device) -> bool:
    """Whether the kernels form their logits tiles with ``tiles.fixed_order_dot`` (``FIXED_ORDER``) instead of
    ``tl.dot``: off CUDA, i.e. under the interpreter, whose ``tl.dot`` is numpy's BLAS and rounds an entry by the
    product's shape and operand order, so the forward and backward kernels (different tiles under the autotuned
    configs) would see different logits. On CUDA each entry of an MMA / FMA tile accumulates over D in the same
    k order whatever the tile shape, BLOCK_D or operand order: ``tl.dot`` there. ``BIOCLIP_FAST_INTERPRET_TL_DOT=1``
    keeps ``tl.dot`` under the interpreter too, so the GPU's code path is tested on CPU as well."""
    return device.type != "cuda" and not interpret_tl_dot()


def grad_prescale(dtype: torch.dtype) -> float:
    """Power of two the gradient tile is multiplied by before its cast to the operand dtype: fp16 only (its
    normal range starts at 6e-5, probabilities at B = 1M are ~1e-6); exact to undo on the fp32 accumulator."""
    return 16384.0 if dtype == torch.float16 else 1.0
