"""Tolerances that scale with what is compared, so a comparison passes on any machine (other BLAS, thread count,
summation order) and still catches real differences.

Two float32 computations of the same gradient along different summation orders (chunked vs whole batch, deduplicated
vs repeated captions, 1 vs 2 threads) differ by rounding: for a sum of n terms, about sqrt(n)·eps times the
magnitude of the terms (n·eps at worst). An element that is a long sum (the end-of-text token row of the embedding
gradient sums over every sequence) therefore carries an absolute error proportional to the tensor's largest values,
not a fixed 1e-6.
"""
from __future__ import annotations

import math

import torch


def scaled_atol(want: torch.Tensor, n_terms: int = 1, ulps: float = 4.0) -> float:
    """`ulps` x eps(dtype) x sqrt(n_terms) x max|want|: the rounding noise of length-n_terms sums of that size."""
    eps = torch.finfo(want.dtype if want.is_floating_point() else torch.float32).eps
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    return ulps * eps * math.sqrt(max(1, n_terms)) * scale


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, *, n_terms: int, rtol: float = 1e-4, msg: str = ""):
    """Elementwise |got - want| <= rtol·|want| + scaled_atol(want, n_terms)."""
    atol = scaled_atol(want, n_terms)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{msg} (atol {atol:.2e}): {m}")


def assert_normwise_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float = 0.0, msg: str = ""):
    """Elementwise |got - want| <= atol + rtol·max|want| (elementwise rtol is meaningless near 0)."""
    bound = atol + rtol * (want.detach().abs().max().item() if want.numel() else 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=lambda m: f"{msg} (bound {bound:.2e}): {m}")
