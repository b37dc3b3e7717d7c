"""Parity of FusedClipLoss / FusedSigLipLoss with open_clip's ClipLoss / SigLipLoss: loss and gradients of both
feature tensors, logit_scale and logit_bias, across batch sizes, feature dims and dtypes, on the CPU backends.

Tolerance rule (flash-attention's): with `truth` = open_clip in fp64 on the same (rounded) inputs,
    |ours - truth| <= 2 * |open_clip_same_dtype - truth| + atol,   atol = ATOL[dtype] * max(1, |truth|_max)
so low-precision inputs are judged against what open_clip itself achieves in that dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from bioclip_fast import FusedClipLoss, FusedSigLipLoss, fused_clip_loss, fused_siglip_loss

ATOL = {torch.float32: 5e-6, torch.bfloat16: 1e-3, torch.float16: 2e-4}
BACKENDS = ["cpp", "torch"]


def make_inputs(B, D, dtype, seed=0, scale=1 / 0.07, bias=None, shape=(1,)):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    # Make the positives a bit more similar than chance so the loss is not trivially log(B).
    txt = torch.nn.functional.normalize((txt.double() + 0.5 * img.double()), dim=-1).to(dtype)
    s = torch.full(shape, float(scale), dtype=torch.float32)
    b = None if bias is None else torch.full(shape, float(bias), dtype=torch.float32)
    return img, txt, s, b


def loss_and_grads(fn, img, txt, scale, bias, dtype=None):
    """Run fn on leaf copies (features in `dtype` if given, scale/bias in `scale`'s dtype or `dtype`)."""
    dtype = dtype or img.dtype
    leaves = [img.to(dtype).clone().requires_grad_(), txt.to(dtype).clone().requires_grad_()]
    sdt = torch.float64 if dtype == torch.float64 else scale.dtype
    leaves.append(scale.to(sdt).clone().requires_grad_())
    leaves.append(None if bias is None else bias.to(sdt).clone().requires_grad_())
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves if t is not None]


def oc_same_dtype(oc_fn, img, txt, scale, bias):
    """open_clip in the features' dtype, the way a pure low-precision model runs it (0-dim scale/bias in that
    dtype, so the logits stay low precision)."""
    dt = img.dtype
    leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.to(dt).clone().requires_grad_()]
    leaves.append(None if bias is None else bias.to(dt).clone().requires_grad_())
    loss = oc_fn(leaves[0], leaves[1], leaves[2].reshape(()), None if bias is None else leaves[3].reshape(()))
    loss.backward()
    return [loss.detach().double()] + [t.grad.double().reshape(-1) if t.dim() == 0 else t.grad.double() for t in leaves if t is not None]


def assert_parity(ours, oc, truth, dtype, names, logit_scale):
    for o, r, t, name in zip(ours, oc, truth, names):
        o, r = o.reshape(t.shape), r.reshape(t.shape)
        err_ours = (o - t).abs().max().item()
        err_oc = (r - t).abs().max().item()
        # The loss is a difference of logit-sized terms (lse - S_pos): its rounding scales with the logits.
        mag = max(t.abs().max().item(), float(logit_scale.max()) if name == "loss" else 0.0)
        atol = ATOL[dtype] * max(1.0, mag)
        assert math.isfinite(err_ours), f"{name}: non-finite result"
        assert err_ours <= 2 * err_oc + atol, (
            f"{name} ({dtype}): |ours-truth|={err_ours:.3g} > 2*|open_clip-truth|={2 * err_oc:.3g} + atol={atol:.3g}"
        )


CASES = [(B, D) for B in (1, 3, 257, 1000) for D in (1, 64, 768)]


def _lowp_affordable(B, D, dtype):
    # open_clip in bf16/fp16 on CPU is slow at B=1000, D=768 (no native low-precision GEMM); one big fp32 case
    # covers that size.
    return dtype == torch.float32 or B * B * D <= 257 * 257 * 768


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,D", CASES, ids=[f"B{b}-D{d}" for b, d in CASES])
def test_clip_parity(B, D, dtype, backend):
    if not _lowp_affordable(B, D, dtype):
        pytest.skip("covered in fp32; low-precision open_clip is too slow on CPU at this size")
    bias = -1.5 if B % 2 else None  # exercise logit_bias on odd batches
    img, txt, s, b = make_inputs(B, D, dtype, seed=B * 7 + D, bias=bias)
    oc = ClipLoss()
    truth = loss_and_grads(lambda i, t, sc, bi: oc(i, t, sc, bi), img.double(), txt.double(), s, b, torch.float64)
    ours = loss_and_grads(FusedClipLoss(backend=backend), img, txt, s, b)
    ref = oc_same_dtype(oc, img, txt, s, b)
    names = ["loss", "d_image", "d_text", "d_logit_scale"] + (["d_logit_bias"] if b is not None else [])
    assert_parity(ours, ref, truth, dtype, names, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,D", CASES, ids=[f"B{b}-D{d}" for b, d in CASES])
def test_siglip_parity(B, D, dtype, backend):
    if not _lowp_affordable(B, D, dtype):
        pytest.skip("covered in fp32; low-precision open_clip is too slow on CPU at this size")
    img, txt, s, b = make_inputs(B, D, dtype, seed=B * 11 + D, scale=10.0, bias=-10.0)
    oc = SigLipLoss()
    truth = loss_and_grads(lambda i, t, sc, bi: oc(i, t, sc, bi), img.double(), txt.double(), s, b, torch.float64)
    ours = loss_and_grads(FusedSigLipLoss(backend=backend), img, txt, s, b)
    ref = oc_same_dtype(oc, img, txt, s, b)
    assert_parity(ours, ref, truth, dtype, ["loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias"], s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_without_bias(backend):
    img, txt, s, _ = make_inputs(37, 16, torch.float32, seed=3, scale=5.0)
    oc = SigLipLoss()
    truth = loss_and_grads(lambda i, t, sc, bi: oc(i, t, sc, None), img.double(), txt.double(), s, None, torch.float64)
    ours = loss_and_grads(FusedSigLipLoss(backend=backend), img, txt, s, None)
    ref = oc_same_dtype(oc, img, txt, s, None)
    assert_parity(ours, ref, truth, torch.float32, ["loss", "d_image", "d_text", "d_logit_scale"], s)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0dim", "1elem"])
def test_logit_scale_shapes_and_float(shape):
    """0-dim and [1] scales give the same value, grads keep the parameter's shape; a Python float works too."""
    img, txt, s, b = make_inputs(20, 8, torch.float32, seed=1, bias=0.25, shape=shape)
    s.requires_grad_()
    b.requires_grad_()
    loss = fused_clip_loss(img, txt, s, b)
    loss.backward()
    assert s.grad.shape == s.shape and b.grad.shape == b.shape
    expected = ClipLoss()(img, txt, s.detach().reshape(()), b.detach().reshape(()))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    sf, bf = float(s.detach()), float(b.detach())
    torch.testing.assert_close(fused_clip_loss(img, txt, sf, bf), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_siglip_loss(img, txt, sf, bf), SigLipLoss()(img, txt, sf, bf), rtol=1e-6, atol=1e-6)


def test_output_dict_and_low_precision_scale_grad_dtype():
    img, txt, _, _ = make_inputs(10, 8, torch.bfloat16, seed=2)
    s = torch.tensor(10.0, dtype=torch.bfloat16, requires_grad=True)
    out = FusedClipLoss()(img, txt, s, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dtype == torch.float32
    out["contrastive_loss"].backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == ()
    out = FusedSigLipLoss()(img, txt, s, torch.tensor(-5.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}


def test_extreme_logits_stay_finite():
    """Large scale (logits ~ ±100 after the usual clamp) and unnormalized features: online LSE must not overflow."""
    g = torch.Generator().manual_seed(5)
    img = 3 * torch.randn(64, 32, generator=g)
    txt = 3 * torch.randn(64, 32, generator=g)
    s = torch.tensor(100.0)
    for backend in BACKENDS:
        loss = fused_clip_loss(img, txt, s, backend=backend)
        ref = ClipLoss()(img.double(), txt.double(), s.double())
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
        loss = fused_siglip_loss(img, txt, s, -10.0, backend=backend)
        ref = SigLipLoss()(img.double(), txt.double(), s.double(), torch.tensor(-10.0, dtype=torch.float64))
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
