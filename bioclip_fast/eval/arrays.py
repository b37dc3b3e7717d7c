"""Checks of the arrays the evaluation and analysis metrics take: image features as a finite N x D float64 matrix,
labels as a vector of one value per image; each failure a ValueError naming the argument."""
from __future__ import annotations

from typing import Any

import numpy as np


def as_feature_matrix(x: Any, name: str = "features", *, normalize: bool = False) -> np.ndarray:
    """``x`` (array or tensor, bf16/fp16 included) as a finite, non-empty N x D float64 array, rows L2-normalized when
    ``normalize``; ValueError naming ``name`` otherwise."""
    a = np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty N x D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    if normalize:
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return a


def as_label_vector(y: Any, n: int, name: str) -> np.ndarray:
    """``y`` as a 1-D array of ``n`` labels; ValueError naming ``name`` otherwise."""
    a = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of {n} labels, got shape {a.shape}")
    return a
