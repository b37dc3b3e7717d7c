"""The three loss backends agree (C++ vs torch reference vs Triton under TRITON_INTERPRET=1 on CPU), dispatch and
the BIOCLIP_FAST_BACKEND override work, the custom ops pass torch.library.opcheck and compile with
fullgraph=True, and bad input raises a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

from bioclip_fast import FusedClipLoss, FusedSigLipLoss, fused_clip_loss, fused_siglip_loss
from bioclip_fast.ops import cpp, dispatch, reference
from bioclip_fast.ops.clip_loss import clip_dir_fwd_op, clip_dir_loss, clip_sym_fwd_op
from bioclip_fast.ops.siglip_loss import siglip_fwd_op, siglip_loss

# (Bq, Bk, D): odd sizes straddle the kernels' tile edges (C++: 6x16 micro-tiles, 96-row blocks).
SHAPES = [(1, 1, 1), (5, 9, 3), (17, 17, 16), (100, 131, 40), (203, 203, 33)]
TRITON_SHAPES = [(1, 1, 1), (5, 9, 3), (70, 70, 24)]  # the interpreter is slow


def _inputs(Bq, Bk, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(Bq, D, generator=g), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(Bk, D, generator=g), dim=-1).to(dtype)
    return q, k, torch.tensor([7.5]), torch.tensor([-2.0])


def _compare(got, want, rtol=2e-5, atol=2e-6):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"output {i}: expected None"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        # normwise: elementwise rtol is meaningless near 0, and a gradient element's rounding error scales with the
        # tensor's magnitude (long sums), not with that element
        bound = atol + rtol * b.detach().abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=bound, msg=lambda m: f"output {i}: {m}")


def _all_primitives(mod, q, k, s, b, offset):
    """Run all six primitives of a backend module; the backward ones get the reference LSEs."""
    sym = reference.clip_sym_fwd(q[: k.shape[0]], k[: q.shape[0]], s, b)
    dr = reference.clip_dir_fwd(q, k, s, b, offset)
    g = torch.tensor(0.7)
    qs, ks = q[: k.shape[0]], k[: q.shape[0]]
    return {
        "clip_sym_fwd": mod.clip_sym_fwd(qs, ks, s, b),
        "clip_sym_bwd": mod.clip_sym_bwd(qs, ks, s, b, sym[1], sym[2], g),
        "clip_dir_fwd": mod.clip_dir_fwd(q, k, s, b, offset),
        "clip_dir_bwd": mod.clip_dir_bwd(q, k, s, b, dr[1], offset, g),
        "siglip_fwd": (mod.siglip_fwd(q, k, s, b, offset),),
        "siglip_bwd": mod.siglip_bwd(q, k, s, b, offset, g),
        "siglip_fwd_allneg": (mod.siglip_fwd(q, k, s, None, k.shape[0]),),
        "siglip_bwd_allneg": mod.siglip_bwd(q, k, s, None, k.shape[0], g),
    }


@pytest.mark.parametrize("Bq,Bk,D", SHAPES)
def test_cpp_matches_reference(Bq, Bk, D):
    q, k, s, b = _inputs(Bq, Bk, D, seed=Bq + D)
    offset = Bk - Bq
    got = _all_primitives(cpp, q, k, s, b, offset)
    want = _all_primitives(reference, q, k, s, b, offset)
    for name in want:
        _compare(got[name], want[name])


def test_cpp_low_precision_inputs_return_input_dtype():
    q, k, s, b = _inputs(30, 30, 20, seed=1, dtype=torch.bfloat16)
    dq, dk, ds, db = cpp.clip_sym_bwd(q, k, s, b, *cpp.clip_sym_fwd(q, k, s, b)[1:], torch.tensor(1.0))
    assert dq.dtype == dk.dtype == torch.bfloat16 and ds.dtype == db.dtype == torch.float32
    want = reference.clip_sym_bwd(q, k, s, b, *reference.clip_sym_fwd(q, k, s, b)[1:], torch.tensor(1.0))
    _compare((dq, dk, ds, db), want, rtol=1e-2, atol=1e-4)


def test_cpp_thread_count_does_not_change_results():
    q, k, s, b = _inputs(300, 300, 24, seed=4)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.clip_sym_fwd(q, k, s, b)
        torch.set_num_threads(2)
        two = cpp.clip_sym_fwd(q, k, s, b)
    finally:
        torch.set_num_threads(n)
    _compare(one, two, rtol=1e-6, atol=1e-6)




@pytest.mark.parametrize("Bq,Bk,D", TRITON_SHAPES)
def test_triton_interpreter_matches_reference(Bq, Bk, D):
    if not dispatch.available("triton"):
        pytest.skip(f"Triton kernels unavailable: {dispatch._load('triton')!r}")
    q, k, s, b = _inputs(Bq, Bk, D, seed=Bq * 3 + D)
    offset = Bk - Bq
    got = _all_primitives(dispatch.get("triton"), q, k, s, b, offset)
    want = _all_primitives(reference, q, k, s, b, offset)
    for name in want:
        _compare(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_backend_triton_on_cpu_through_the_module():
    if not dispatch.available("triton"):
        pytest.skip("Triton kernels unavailable")
    q, k, s, b = _inputs(19, 19, 8, seed=9)
    losses, grads = [], []
    for backend in ("triton", "torch"):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        ss = s.clone().requires_grad_()
        loss = FusedClipLoss(backend=backend)(qq, kk, ss) + FusedSigLipLoss(backend=backend)(qq, kk, ss, b)
        loss.backward()
        losses.append(loss.detach())
        grads.append((qq.grad, kk.grad, ss.grad))
    _compare(losses[:1], losses[1:], rtol=1e-5, atol=1e-5)
    _compare(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_dispatch_auto_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve("auto", cpu) == "cpp"
    assert dispatch.resolve("torch", cpu) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve("auto", cpu) == "torch"
    assert dispatch.resolve("cpp", cpu) == "cpp"  # an explicit argument wins over the environment
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.resolve("auto", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedClipLoss(backend="cuda")
    with pytest.raises(ValueError, match="CPU tensors only"):
        dispatch.resolve("cpp", torch.device("meta"))


def test_env_override_changes_the_backend_used(monkeypatch):
    """Same loss through the env-selected backend; a broken backend name in the env is an error, not ignored."""
    q, k, s, _ = _inputs(10, 10, 4, seed=2)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    a = fused_clip_loss(q, k, s)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    c = fused_clip_loss(q, k, s)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="nope"):
        fused_clip_loss(q, k, s)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_opcheck(backend):
    """Schema, fake (meta) impls and autograd registration of every custom op."""
    q, k, s, b = _inputs(7, 11, 5, seed=3)
    q.requires_grad_()
    k.requires_grad_()
    s.requires_grad_()
    torch.library.opcheck(clip_sym_fwd_op, (q, k[:7], s, b, backend))
    torch.library.opcheck(clip_sym_fwd_op, (q, k[:7], s, None, backend))
    torch.library.opcheck(clip_dir_fwd_op, (q, k, s, b, 3, backend))
    torch.library.opcheck(siglip_fwd_op, (q, k, s, b, 2, backend))
    torch.library.opcheck(siglip_fwd_op, (q, k, s, None, 11, backend))


def test_torch_compile_fullgraph():
    q, k, s, b = _inputs(24, 24, 8, seed=5)

    def step(img, txt, scale, bias):
        # check_finite stays on: under compile it becomes an async assert, not a graph break.
        return fused_clip_loss(img, txt, scale, bias) + 0.5 * fused_siglip_loss(img, txt, scale, bias)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (compiled, step):
        leaves = [t.clone().requires_grad_() for t in (q, k, s, b)]
        loss = fn(*leaves)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])
    _compare(outs[0], outs[1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ validation
def _bad(match, fn, *args, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_input_validation_errors_name_the_argument():
    q, k, s, b = _inputs(4, 4, 3, seed=0)
    _bad("image_features must be 2-D", fused_clip_loss, q[0], k, s)
    _bad("text_features must be 2-D", fused_clip_loss, q, k[None], s)
    _bad("batch sizes differ", fused_clip_loss, q, k[:3], s)
    _bad("feature dims differ", fused_clip_loss, q, k[:, :2], s)
    _bad("empty batch", fused_clip_loss, q[:0], k[:0], s)
    _bad("text_features has dtype torch.bfloat16", fused_clip_loss, q, k.bfloat16(), s, exc=TypeError)
    _bad("supported: float32, bfloat16, float16, float64", fused_clip_loss, q.int(), k.int(), s, exc=TypeError)
    _bad("compute_dtype must be", fused_clip_loss, q, k, s, compute_dtype="int8")
    _bad("must be a torch.Tensor", fused_clip_loss, q.numpy(), k, s, exc=TypeError)
    _bad("logit_scale must be a 0-dim or 1-element", fused_clip_loss, q, k, torch.ones(2))
    _bad("logit_scale must be a tensor or a real number", fused_clip_loss, q, k, "14", exc=TypeError)
    _bad("logit_bias must be a 0-dim", fused_siglip_loss, q, k, s, torch.ones(1, 1))
    _bad("logit_scale is on meta", fused_clip_loss, q, k, torch.ones((), device="meta"))
    _bad("is on cpu but text_features is on meta", fused_clip_loss, q, torch.ones(4, 3, device="meta"), s)
    _bad("rank must be in", fused_clip_loss, q, k, s, rank=2, world_size=2)
    _bad("world_size must be >= 1", FusedClipLoss, world_size=0)
    _bad("use_horovod=True is not supported", FusedClipLoss, use_horovod=True)
    _bad("dist_impl must be one of", FusedSigLipLoss, dist_impl="ring")
    _bad("offset must be >= 0", clip_dir_loss, q, k, s, None, -1)
    _bad("exceeds the 4 columns", clip_dir_loss, q, k, s, None, 1)
    _bad("offset must be an int", siglip_loss, q, k, s, None, 1.5, exc=TypeError)


@pytest.mark.parametrize("where", ["image_features", "text_features", "logit_scale", "logit_bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(where, value):
    q, k, s, b = _inputs(4, 4, 3, seed=0)
    t = {"image_features": q, "text_features": k, "logit_scale": s, "logit_bias": b}[where]
    t.view(-1)[0] = value
    with pytest.raises(ValueError, match=f"non-finite values.*{where}"):
        fused_clip_loss(q, k, s, b)
    with pytest.raises(ValueError, match=f"non-finite values.*{where}"):
        FusedSigLipLoss()(q, k, s, b)
    # The check can be switched off for speed: then the non-finite value propagates (no silent finite answer).
    assert not torch.isfinite(fused_clip_loss(q, k, s, b, check_finite=False, backend="torch"))


# ------------------------------------------------------------------------------------------------ CUDA (Triton)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_auto_dispatches_to_triton_and_matches_reference(dtype):
    dev = torch.device("cuda")
    assert dispatch.resolve("auto", dev) == "triton"
    q, k, s, b = (t.to(dev) for t in _inputs(1000, 1000, 768, seed=7))
    q, k = q.to(dtype), k.to(dtype)
    outs = []
    for backend in ("auto", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, s, b)]
        loss = fused_clip_loss(*leaves, backend=backend) + fused_siglip_loss(*leaves, backend=backend)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
    _compare(outs[0], outs[1], **tol)


@pytest.mark.gpu
def test_cuda_torch_compile_fullgraph():
    dev = torch.device("cuda")
    q, k, s, b = (t.to(dev) for t in _inputs(512, 512, 256, seed=8))
    fn = torch.compile(lambda *a: fused_clip_loss(*a), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, s, b)]
    fn(*leaves).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, s, b)]
    fused_clip_loss(*ref).backward()
    _compare([t.grad for t in leaves], [t.grad for t in ref], rtol=1e-5, atol=1e-6)
