"""Numerics of every loss backend on near-duplicate batches, and the precision / memory / dtype plumbing.

TreeOfLife batches hold many images of one species and so identical captions: near-duplicate text columns. At logit
scale 100 every logit is ~100 and the scale gradient sum_ij G_ij <q_i, k_j> cancels catastrophically; the stored
fp32 LSE (rounded at |lse| ~ 100) is a systematic per-row error that near-duplicate columns amplify in G @ K. Each
backend must meet flash-attention's rule against a float64 truth: error <= 2 x the error of the same computation
written in plain torch fp32 (what open_clip does), plus the rounding of the reference's own magnitude.
"""
from __future__ import annotations

import os
import subprocess
import types

import pytest
import torch
import torch.nn.functional as F

from bioclip_fast import FusedClipLoss, fused_clip_loss, fused_siglip_loss
from bioclip_fast.ops import cpp, precision, reference

B, D, SCALE = 130, 64, 100.0
Bq_DIR, OFFSET = 65, 40  # one direction: 65 local rows against 130 gathered columns


def near_duplicate_batch(seed: int, image_noise: float):
    """Texts = one vector + 1e-3 noise (one species' caption); images = that vector + ``image_noise`` noise."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(D, generator=g), dim=0)
    k = F.normalize(v + 1e-3 * torch.randn(B, D, generator=g), dim=-1)
    q = F.normalize(v + image_noise * torch.randn(B, D, generator=g), dim=-1)
    return q, k


def dense(kind, q, k, s, b, offset, dtype):
    """The loss as a torch user writes it (logits materialized), in ``dtype``; autograd for the gradients."""
    q, k = q.to(dtype).detach().requires_grad_(), k.to(dtype).detach().requires_grad_()
    s = s.to(dtype).detach().requires_grad_()
    b = None if b is None else b.to(dtype).detach().requires_grad_()
    S = s * (q @ k.T) + (b if b is not None else 0)
    i = torch.arange(S.shape[0])
    if kind == "sym":
        loss = 0.5 * (F.cross_entropy(S, i) + F.cross_entropy(S.T, i))
    elif kind == "dir":
        loss = F.cross_entropy(S, i + offset)
    else:
        z = -torch.ones_like(S)
        ok = i + offset < S.shape[1]
        z[i[ok], (i + offset)[ok]] = 1
        loss = -F.logsigmoid(z * S).sum() / S.shape[0]
    loss.backward()
    return dict(loss=loss, dq=q.grad, dk=k.grad, dscale=s.grad, dbias=None if b is None else b.grad)


def run_backend(mod, kind, q, k, s, b, offset):
    g = torch.tensor(1.0)
    if kind == "sym":
        loss, lr, lc = mod.clip_sym_fwd(q, k, s, b)
        dq, dk, ds, db = mod.clip_sym_bwd(q, k, s, b, lr, lc, g)
    elif kind == "dir":
        loss, lse = mod.clip_dir_fwd(q, k, s, b, offset)
        dq, dk, ds, db = mod.clip_dir_bwd(q, k, s, b, lse, offset, g)
    else:
        loss = mod.siglip_fwd(q, k, s, b, offset)
        dq, dk, ds, db = mod.siglip_bwd(q, k, s, b, offset, g)
    return dict(loss=loss, dq=dq, dk=dk, dscale=ds, dbias=db)


def _triton_backend():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (GPU: see test_triton_kernels)")
    from bioclip_fast.kernels import clip_loss as CL
    from bioclip_fast.kernels import siglip_loss as SL

    return types.SimpleNamespace(clip_sym_fwd=CL.clip_sym_fwd, clip_sym_bwd=CL.clip_sym_bwd,
                                 clip_dir_fwd=CL.clip_dir_fwd, clip_dir_bwd=CL.clip_dir_bwd,
                                 siglip_fwd=SL.siglip_fwd, siglip_bwd=SL.siglip_bwd)


def _backend(name):
    if name == "torch":
        return reference
    if name == "cpp":
        cpp.check_available()
        return cpp
    return _triton_backend()


def assert_flash_attention_rule(kind, name, ours, truth, torch32):
    for key in ("loss", "dq", "dk", "dscale", "dbias"):
        if truth[key] is None:
            continue
        t = truth[key].double()
        err_ours = (ours[key].double() - t).abs().max().item()
        err_torch = (torch32[key].double() - t).abs().max().item()
        # plus a few fp32 ulps of the reference's own magnitude (flash-attention adds the rounding of its values;
        # for a single scalar like dscale that is luck-dependent, so a fixed 2^-21 relative is used)
        atol = 2.0**-21 * t.abs().max().item()
        assert err_ours <= 2 * err_torch + atol, (
            f"{name} {kind} {key}: error {err_ours:.3e} > 2 x torch fp32 error {err_torch:.3e} + {atol:.1e}")


def _force_gemm_backward(monkeypatch, strategy):
    """The Triton GEMM-assisted backwards (the CUDA defaults for wide D) with small ragged chunks: ``gemm`` (column
    chunks, fp32 dQ accumulator) or ``gemm2d`` (row x column chunks into the fp32 gradients)."""
    from bioclip_fast.kernels import planner

    monkeypatch.setenv("BIOCLIP_FAST_BWD", strategy)
    monkeypatch.setattr(planner, "BWD_MEMORY_BYTES", 1)
    monkeypatch.setattr(planner, "MIN_CHUNK", 48)
    monkeypatch.setattr(planner, "gemm2d_chunks", lambda *a, **kw: (48, 56))


@pytest.mark.parametrize("image_noise", [0.05, 10.0], ids=["near-dup-images", "random-images"])
@pytest.mark.parametrize("kind", ["sym", "dir", "siglip"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "triton-gemm", "triton-gemm2d"])
def test_near_duplicate_batch_flash_attention_rule(backend, kind, image_noise, monkeypatch):
    if backend.startswith("triton-"):
        _force_gemm_backward(monkeypatch, backend.split("-")[1])
        backend = "triton"
    mod = _backend(backend)
    q, k = near_duplicate_batch(seed=3, image_noise=image_noise)
    offset = 0
    if kind != "sym":
        q, offset = q[:Bq_DIR], OFFSET
    s = torch.tensor(SCALE)
    b = torch.tensor(-10.0) if kind == "siglip" else torch.tensor(2.0)
    truth = dense(kind, q, k, s, b, offset, torch.float64)
    torch32 = dense(kind, q, k, s, b, offset, torch.float32)
    assert_flash_attention_rule(kind, backend, run_backend(mod, kind, q, k, s, b, offset), truth, torch32)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_clip_bias_gradient_is_exactly_zero(backend):
    """A constant shift of all logits changes neither softmax: CLIP's dbias is 0, returned as 0 (not noise)."""
    mod = _backend(backend)
    q, k = near_duplicate_batch(seed=1, image_noise=0.05)
    out = run_backend(mod, "sym", q, k, torch.tensor(SCALE), torch.tensor(3.0), 0)
    assert out["dbias"].item() == 0.0


def test_cpp_two_pass_backward_matches_one_pass(monkeypatch):
    """BIOCLIP_FAST_CPU_BWD_MEMORY_MB=0 forbids per-thread dK partials: the sweep runs in two passes (dQ by row
    blocks, dK by column blocks) with memory independent of the thread count, and agrees with the one-pass sweep."""
    cpp.check_available()
    q, k = near_duplicate_batch(seed=2, image_noise=0.3)
    s, b = torch.tensor(20.0), torch.tensor(-1.0)
    torch.set_num_threads(2)
    one = run_backend(cpp, "siglip", q, k, s, b, 7)
    monkeypatch.setenv("BIOCLIP_FAST_CPU_BWD_MEMORY_MB", "0")
    two = run_backend(cpp, "siglip", q, k, s, b, 7)
    sym_two = run_backend(cpp, "sym", q, k, s, None, 0)
    monkeypatch.delenv("BIOCLIP_FAST_CPU_BWD_MEMORY_MB")
    sym_one = run_backend(cpp, "sym", q, k, s, None, 0)
    for key in ("dq", "dk", "dscale", "dbias"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7)
    for key in ("dq", "dk", "dscale"):
        torch.testing.assert_close(sym_two[key], sym_one[key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ CPU ISA variants
def test_cpu_isa_variants_are_selected_by_cpuid(monkeypatch):
    cpp.check_available()
    from bioclip_fast import _C as base

    assert base.isa() in ("x86-64", "generic")  # the baseline module must run on any CPU of the architecture
    chosen = cpp.select_module(base)
    if base.cpu_supports("avx2") and base.cpu_supports("fma"):
        assert chosen.isa() == "avx2+fma"
    else:
        assert chosen is base
    assert cpp.select_module(base, "baseline") is base
    with pytest.raises(ValueError, match="BIOCLIP_FAST_CPU_ISA"):
        cpp.select_module(base, "avx9")
    # Both variants compute the same thing.
    q, k = near_duplicate_batch(seed=4, image_noise=0.5)
    s = torch.tensor(30.0)
    results = []
    for mod in {base, chosen}:
        monkeypatch.setattr(cpp, "_C", mod)
        results.append(run_backend(cpp, "sym", q, k, s, None, 0))
    for r in results[1:]:
        for key in ("loss", "dq", "dk", "dscale"):
            torch.testing.assert_close(r[key], results[0][key], rtol=1e-5, atol=1e-7)


def test_baseline_cpu_module_has_no_avx_instructions():
    """No -march=native: the baseline extension must not contain AVX (ymm) instructions, or it dies with SIGILL on
    an older CPU sharing the filesystem."""
    from bioclip_fast import _C as base

    if base.isa() != "x86-64":
        pytest.skip("not an x86-64 build")
    try:
        out = subprocess.run(["objdump", "-d", base.__file__], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("objdump is not available")
    assert "ymm" not in out and "zmm" not in out


# ------------------------------------------------------------------------------------------------ float64
def test_float64_features_go_through_the_reference_in_float64():
    """open_clip's ClipLoss accepts float64 features; so do the fused losses (the torch reference in float64)."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    q, k = near_duplicate_batch(seed=5, image_noise=0.2)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    s64 = torch.tensor(50.0, dtype=torch.float64, requires_grad=True)
    ours = fused_clip_loss(q64, k64, s64)
    assert ours.dtype == torch.float64
    ours.backward()
    got = [q64.grad.clone(), k64.grad.clone(), s64.grad.clone()]
    for t in (q64, k64, s64):
        t.grad = None
    ref = open_clip_loss.ClipLoss()(q64, k64, s64)
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-12
    for a, b in zip(got, [q64.grad, k64.grad, s64.grad]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    sig = fused_siglip_loss(q.double(), k.double(), torch.tensor(10.0, dtype=torch.float64),
                            torch.tensor(-5.0, dtype=torch.float64))
    assert sig.dtype == torch.float64


# ------------------------------------------------------------------------------------------------ needs_input_grad
def test_backward_skips_feature_gradients_nobody_needs(monkeypatch):
    """With gather_with_grad=False the gathered columns need no gradient: the backend is asked not to compute dK."""
    calls = []
    real = reference.clip_dir_bwd

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(reference, "clip_dir_bwd", spy)
    from bioclip_fast.ops import dispatch

    monkeypatch.setattr(dispatch, "_cache", {})
    q, k = near_duplicate_batch(seed=6, image_noise=0.5)
    q = q.clone().requires_grad_()
    from bioclip_fast.ops.clip_loss import clip_dir_loss

    loss = clip_dir_loss(q, k, 10.0, None, 0, backend="torch")  # k: no grad
    loss.backward()
    assert calls and calls[-1]["need_q"] is True and calls[-1]["need_k"] is False
    torch.testing.assert_close(q.grad, dense("dir", q.detach(), k, torch.tensor(10.0), None, 0, torch.float64)["dq"].float(),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ compute dtype
def test_trainer_call_gets_bf16_tensor_cores_on_cuda():
    """The trainer hands the loss fp32 features outside autocast; with precision=bf16 the CUDA dispatch must still
    multiply in bf16 (tensor cores, fp32 accumulation), like open_clip under autocast. With precision=fp32 exact
    fp32 ("ieee") stays available."""
    from bioclip_fast.train.config import TrainConfig
    from bioclip_fast.train.engine import DistInfo
    from bioclip_fast.train.trainer import make_loss

    info = DistInfo(rank=0, world_size=1, local_rank=0)
    loss_bf16 = make_loss(TrainConfig(precision="bf16"), info)
    plan = loss_bf16.precision_plan(torch.float32)  # the trainer's call: f["image"].float()
    assert plan == {"operand_dtype": torch.bfloat16, "input_precision": "", "tensor_cores": True}
    loss_fp32 = make_loss(TrainConfig(precision="fp32"), info)
    assert loss_fp32.precision_plan(torch.float32)["input_precision"] == "ieee"
    # "auto" follows autocast like every autocast-aware op, and otherwise the input dtype
    auto = FusedClipLoss()
    assert auto.precision_plan(torch.float32, autocast_dtype=torch.bfloat16)["operand_dtype"] == torch.bfloat16
    assert auto.precision_plan(torch.float32)["input_precision"] == "ieee"
    assert auto.precision_plan(torch.float16)["input_precision"] == ""
    # CPU backends compute in fp32 whatever the compute dtype: no lossy cast there
    assert precision.operand_dtype(torch.float32, "cpu", "bf16") == torch.float32
    assert precision.operand_dtype(torch.float64, "cuda", "bf16") == torch.float64
    with pytest.raises(ValueError, match="compute_dtype"):
        FusedClipLoss(compute_dtype="fp8")


def test_triton_dot_precision_follows_the_operand_dtype(monkeypatch):
    triton = pytest.importorskip("triton")  # noqa: F841
    from bioclip_fast.kernels import precision as kernel_precision

    assert kernel_precision.dot_precision(torch.bfloat16) == ""
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert kernel_precision.dot_precision(torch.float32) == "tf32x3"


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_trainer_features_reach_the_kernels_in_bf16(monkeypatch):
    """The trainer's fp32 features with compute_dtype="bf16": the op takes them as fp32 with a bf16 compute dtype,
    every kernel launch reads bf16 chunk casts (tensor cores), the gradients come back fp32."""
    from bioclip_fast.kernels import clip_loss as CL

    ops, launches = [], []
    real_fwd, real_launch = CL._clip_fwd, CL._clip_fwd_launch

    def spy_fwd(q, k, *a, **kw):
        ops.append((q.dtype, k.dtype, kw.get("op_dtype")))
        return real_fwd(q, k, *a, **kw)

    def spy_launch(q, k, *a, **kw):
        launches.append((q.dtype, k.dtype))
        return real_launch(q, k, *a, **kw)

    monkeypatch.setattr(CL, "_clip_fwd", spy_fwd)
    monkeypatch.setattr(CL, "_clip_fwd_launch", spy_launch)
    q = F.normalize(torch.randn(512, 768, device="cuda"), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(512, 768, device="cuda"), dim=-1).requires_grad_()
    loss = FusedClipLoss(compute_dtype="bf16")(q, k, torch.tensor(14.3, device="cuda"))
    loss.backward()
    assert ops == [(torch.float32, torch.float32, torch.bfloat16)]
    assert launches and all(d == (torch.bfloat16, torch.bfloat16) for d in launches)
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


@pytest.mark.gpu
def test_gpu_finite_check_does_not_sync(monkeypatch):
    q = F.normalize(torch.randn(1024, 256, device="cuda"), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(1024, 256, device="cuda"), dim=-1).requires_grad_()
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    fused_clip_loss(q, k, s).backward()  # compile / autotune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_clip_loss(q, k, s, check_finite=True).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "gemm"])
def test_gpu_fp16_gradients_at_large_batch_are_not_subnormal(strategy, monkeypatch):
    """B = 65,536: probabilities ~1.5e-5 are subnormal in fp16 without the 2^14 pre-scale of the gradient tile."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", strategy)
    from bioclip_fast.kernels import clip_loss as CL

    g = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(65536, 128, device="cuda", generator=g), dim=-1)
    k = F.normalize(q + 0.5 * torch.randn(65536, 128, device="cuda", generator=g), dim=-1)
    s = torch.tensor(10.0, device="cuda")
    outs = {}
    for dt in (torch.float16, torch.float32):
        _, lr, lc = CL.clip_sym_fwd(q.to(dt), k.to(dt), s)
        outs[dt] = CL.clip_sym_bwd(q.to(dt), k.to(dt), s, None, lr, lc, 1.0)
    for i in (0, 1):
        ref = outs[torch.float32][i].double()
        err = (outs[torch.float16][i].double() - ref).norm() / ref.norm()
        assert err < 2e-3, (i, err.item())


def test_finite_check_on_an_accelerator_never_reads_the_flag_on_the_host(monkeypatch):
    """On a non-CPU device the check is an async device-side assert: a host read of the flag (a sync per step)
    would fail on meta tensors, which have no data. On CPU it stays a ValueError naming the tensor."""
    from bioclip_fast.ops.validate import check_finite

    x = torch.empty(8, 4, device="meta")
    check_finite(image_features=x, text_features=x)  # must not call bool()/.item() on the flags
    with pytest.raises(ValueError, match="text_features"):
        check_finite(image_features=torch.zeros(2, 2), text_features=torch.tensor([[float("nan")]]))


def test_triton_backward_skips_the_dk_kernel_when_k_needs_no_grad(monkeypatch):
    """gather_with_grad=False hands the loss columns without grad: only the dQ kernel runs (it also yields dscale)."""
    _triton_backend()
    from bioclip_fast.kernels import backward

    calls = []
    real = backward.pairwise_bwd

    def spy(X, Y, *a, **kw):
        calls.append(kw["x_is_rows"])
        return real(X, Y, *a, **kw)

    monkeypatch.setattr(backward, "pairwise_bwd", spy)
    q, k = near_duplicate_batch(seed=7, image_noise=0.5)
    q = q[:20].clone().requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    from bioclip_fast.ops.clip_loss import clip_dir_loss

    clip_dir_loss(q, k[:40], s, None, 5, backend="triton").backward()
    assert calls == [True]
    ref = dense("dir", q.detach(), k[:40], torch.tensor(10.0), None, 5, torch.float64)
    torch.testing.assert_close(q.grad.double(), ref["dq"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), ref["dscale"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("coretype,launch", [
    ("Haswell", "interpreter-tiles"), ("Haswell", "gpu-configs"), ("Zen", "interpreter-tiles"), ("Zen", "gpu-configs"),
    # The GPU's own code (tl.dot for the logits, not fixed_order_dot) with the GPU's configs, where numpy's BLAS
    # rounds an entry the same whatever the product's shape: the tl.dot branch stays tested under the interpreter.
    ("Prescott", "gpu-configs-tl-dot")])
def test_near_duplicate_rule_holds_with_other_blas_kernels(coretype, launch):
    """The interpreter's tl.dot is numpy's OpenBLAS, whose Haswell / Zen sgemm kernels round an entry differently by
    the product's operand order (A @ B^T against (B @ A^T)^T) and shape (a 64 x 64 block of a 128 x 128 product):
    the Triton symmetric dK (logits formed as K @ Q^T against the forward's Q @ K^T LSEs) was 6x torch's error
    there (1.3e-6 against 2 x 2.2e-7 + 2e-7), and with the GPU's configs (``gpu-configs``: the autotuned launch
    path with the default tiles, forward 128 x 128, fused backward 128 x 64, gradient tile 64 x 64) fused, gemm
    and gemm2d were 4x (7.9e-7 to 9.4e-7) until every kernel summed its logits in one fixed order
    (``tiles.fixed_order_dot``). Run in a child process with those kernels forced, whatever this machine's CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter check (on a GPU the kernels do not use numpy's BLAS)")
    import platform
    import sys

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("OPENBLAS_CORETYPE names x86 kernels")
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype, TRITON_INTERPRET="1",
               BIOCLIP_FAST_INTERPRET_AUTOTUNED="1" if launch.startswith("gpu-configs") else "0",
               BIOCLIP_FAST_INTERPRET_TL_DOT="1" if launch.endswith("tl-dot") else "0")
    if launch.startswith("gpu-configs"):
        env["BIOCLIP_FAST_AUTOTUNE"] = "0"  # the default (first) config of each list: deterministic, no benchmarking
    which = "triton" if launch.endswith("tl-dot") else "triton and sym and random"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           f"test_near_duplicate_batch_flash_attention_rule and {which}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:]
