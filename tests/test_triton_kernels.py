"""The Triton kernels of the fused contrastive losses against dense float64 references.

On CPU (CI) they run under TRITON_INTERPRET=1 (set in conftest.py) with tiny tiles, fp32 only: the interpreter's
bf16/fp16 ``tl.dot`` is not meaningful, and the kernels do not upcast (bf16/fp16 operands feed the tensor cores
directly), so low-precision checks are GPU tests. GPU tests follow flash-attention's rule: the kernel's error
against float64 must be at most twice the error of a same-dtype dense torch implementation (plus a small atol).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from bioclip_fast.kernels import autotune, backward_fused, backward_gemm, planner
from bioclip_fast.kernels import clip_loss as CL
from bioclip_fast.kernels import siglip_loss as SL

# ----------------------------------------------------------------------------------------------------------------
# Dense references (float64 autograd)
# ----------------------------------------------------------------------------------------------------------------


def _leaf(t):
    return None if t is None else t.detach().double().requires_grad_()


def _logits(q, k, s, b):
    S = s * (q @ k.T)
    return S + b if b is not None else S


def ref_clip_sym(q, k, s, b, grad=1.0):
    q, k, s, b = map(_leaf, (q, k, s, b))
    S = _logits(q, k, s, b)
    lr, lc, d = S.logsumexp(1), S.logsumexp(0), S.diagonal()
    loss = 0.5 * ((lr - d).mean() + (lc - d).mean())
    (loss * grad).backward()
    return dict(loss=loss, lse_row=lr, lse_col=lc, dq=q.grad, dk=k.grad, dscale=s.grad,
                dbias=None if b is None else b.grad)


def ref_clip_dir(q, k, s, b, offset, grad=1.0):
    q, k, s, b = map(_leaf, (q, k, s, b))
    S = _logits(q, k, s, b)
    i = torch.arange(S.shape[0])
    lse = S.logsumexp(1)
    loss = (lse - S[i, i + offset]).mean()
    (loss * grad).backward()
    return dict(loss=loss, lse=lse, dq=q.grad, dk=k.grad, dscale=s.grad, dbias=None if b is None else b.grad)


def ref_siglip(q, k, s, b, offset, grad=1.0):
    q, k, s, b = map(_leaf, (q, k, s, b))
    S = _logits(q, k, s, b)
    Bq, Bk = S.shape
    z = -torch.ones_like(S)
    i = torch.arange(Bq, device=S.device)
    ok = (i + offset >= 0) & (i + offset < Bk)
    z[i[ok], (i + offset)[ok]] = 1.0
    loss = -F.logsigmoid(z * S).sum() / Bq
    (loss * grad).backward()
    return dict(loss=loss, dq=q.grad, dk=k.grad, dscale=s.grad, dbias=None if b is None else b.grad)


def _check(name, out, ref, rtol=2e-5, atol=1e-6):
    """Normwise check: max |out - ref| <= atol + rtol * max |ref| (elementwise rtol is meaningless near 0)."""
    assert out is not None, name
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().double()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    err = (out64 - ref.detach().double()).abs().max().item()
    bound = atol + rtol * ref.detach().abs().max().item()
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def _features(B, D, gen, normalize=True):
    x = torch.randn(B, D, generator=gen, dtype=torch.float32)
    return F.normalize(x, dim=-1) if normalize else x


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter tiles of 16 with a 16-wide, one-accumulator backward: exercises the D-sliced backward
    (several programs along D, logits recomputed per slice) and the multi-chunk D loop at tiny D."""
    monkeypatch.setitem(autotune.INTERPRET_FWD_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(autotune.INTERPRET_FWD_CONFIG, "BLOCK_N", 16)
    monkeypatch.setitem(autotune.INTERPRET_FWD_CONFIG, "BLOCK_D", 16)
    for key, val in (("BLOCK_X", 16), ("BLOCK_Y", 16), ("BLOCK_D", 16), ("BLOCK_DO", 16), ("NUM_ACC", 1)):
        monkeypatch.setitem(autotune.INTERPRET_BWD_CONFIG, key, val)
    monkeypatch.setattr(autotune, "INTERPRET_TARGET_PROGRAMS", 9)


needs_interpreter_or_gpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU",
)


def _device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# ----------------------------------------------------------------------------------------------------------------
# fp32 parity (interpreter on CPU, compiled on GPU)
# ----------------------------------------------------------------------------------------------------------------

# B in {1, 3, 37, 130} x D in {1, 16, 70}: odd sizes, none a multiple of the tiles; bias on half of them (the
# interpreter is slow, so the largest shape runs once).
SHAPES = [(1, 1, False), (1, 70, True), (3, 16, True), (3, 1, False), (37, 1, True), (37, 16, False),
          (37, 70, True), (130, 16, True), (130, 1, False), (130, 70, False)]


@needs_interpreter_or_gpu
@pytest.mark.parametrize("B,D,with_bias", SHAPES)
def test_clip_sym_matches_float64(B, D, with_bias):
    gen = torch.Generator().manual_seed(1000 * B + D + with_bias)
    q, k = _features(B, D, gen), _features(B, D, gen)
    scale = torch.tensor(14.3)  # exp(2.66), open_clip's init
    bias = torch.tensor([-2.0]) if with_bias else None
    dev = _device()
    args = [t.to(dev) if t is not None else None for t in (q, k, scale, bias)]
    loss, lse_row, lse_col = CL.clip_sym_fwd(*args)
    dq, dk, dscale, dbias = CL.clip_sym_bwd(*args, lse_row, lse_col, torch.tensor(0.75, device=dev))
    ref = ref_clip_sym(q, k, scale, bias, grad=0.75)
    lr, lc = ref["lse_row"] * 1.4426950408889634, ref["lse_col"] * 1.4426950408889634
    assert max(lr.max() - lr.min(), lr.max() - lc.min()) <= 60  # every tile on sym_prob_sum's one-exp2 path
    assert loss.dtype == lse_row.dtype == lse_col.dtype == dscale.dtype == torch.float32
    assert dq.dtype == dk.dtype == torch.float32
    _check("loss", loss.cpu(), ref["loss"])
    _check("lse_row", lse_row.cpu(), ref["lse_row"])
    _check("lse_col", lse_col.cpu(), ref["lse_col"])
    _check("dq", dq.cpu(), ref["dq"])
    _check("dk", dk.cpu(), ref["dk"])
    _check("dscale", dscale.cpu(), ref["dscale"])
    if with_bias:
        assert dbias.shape == bias.shape
        _check("dbias", dbias.cpu(), ref["dbias"], atol=1e-5)  # exactly 0 in exact arithmetic
    else:
        assert dbias is None


@needs_interpreter_or_gpu
def test_clip_sym_large_logits_and_sliced_backward(small_tiles):
    """Unnormalized features with a large scale (|S| up to ~300): online LSE must not overflow; 16-wide tiles
    force several D chunks, several D slices in the backward and several row groups per program."""
    gen = torch.Generator().manual_seed(7)
    B, D = 45, 40
    q, k = _features(B, D, gen, normalize=False), _features(B, D, gen, normalize=False)
    scale = torch.tensor([8.0])
    bias = torch.tensor([3.0])
    dev = _device()
    args = [t.to(dev) for t in (q, k, scale, bias)]
    loss, lse_row, lse_col = CL.clip_sym_fwd(*args)
    dq, dk, dscale, dbias = CL.clip_sym_bwd(*args, lse_row, lse_col, torch.tensor(1.0, device=dev))
    ref = ref_clip_sym(q, k, scale, bias)
    assert ref["lse_row"].abs().max() > 100
    # Tiles here take the two-exp2 path of sym_prob_sum (LSE spread > 60 in log2 units); the normalized-feature
    # tests take the one-exp2 path.
    lr, lc = ref["lse_row"] * 1.4426950408889634, ref["lse_col"] * 1.4426950408889634
    assert max(lr.max() - lr.min(), lr.max() - lc.min()) > 60
    for name, out in dict(loss=loss, lse_row=lse_row, lse_col=lse_col, dq=dq, dk=dk, dscale=dscale,
                          dbias=dbias).items():
        _check(name, out.cpu(), ref[name], atol=1e-5)
    assert dscale.shape == (1,)


@needs_interpreter_or_gpu
def test_clip_sym_column_far_below_its_rows():
    """A column whose logits all sit ~180 nats under the rows' maxima: the forward's column sums from the row
    exponentials would underflow, so those tiles must take the direct path (else lse_col = -inf)."""
    gen = torch.Generator().manual_seed(9)
    B, D = 40, 8
    e1 = torch.zeros(D)
    e1[0] = 1.0
    q = F.normalize(torch.randn(B, D, generator=gen) * 0.1 + e1, dim=-1)
    k = F.normalize(torch.randn(B, D, generator=gen) * 0.1 + e1, dim=-1)
    k[5] = -e1  # column 5: cos(q_i, k_5) ~ -0.95 for every row
    scale = torch.tensor(100.0)
    dev = _device()
    args = [t.to(dev) for t in (q, k, scale)] + [None]
    loss, lse_row, lse_col = CL.clip_sym_fwd(*args)
    dq, dk, dscale, _ = CL.clip_sym_bwd(*args, lse_row, lse_col, 1.0)
    ref = ref_clip_sym(q, k, scale, None)
    assert (ref["lse_row"].min() - ref["lse_col"][5]) > 150
    for name, out in dict(loss=loss, lse_row=lse_row, lse_col=lse_col, dq=dq, dk=dk, dscale=dscale).items():
        _check(name, out.cpu(), ref[name], atol=1e-5)


@needs_interpreter_or_gpu
@pytest.mark.parametrize("Bq,world,D", [(1, 1, 16), (3, 3, 70), (37, 2, 16), (20, 4, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_dir_matches_float64(Bq, world, D, with_bias):
    """Local rows against all-gathered columns, positive of row i at i + rank * Bq, for every rank."""
    gen = torch.Generator().manual_seed(31 * Bq + D + world)
    Bk = Bq * world
    q, k = _features(Bq, D, gen), _features(Bk, D, gen)
    scale, bias = torch.tensor(20.0), (torch.tensor(-5.0) if with_bias else None)
    dev = _device()
    for rank in sorted({0, world - 1}):
        offset = rank * Bq
        args = [t.to(dev) if t is not None else None for t in (q, k, scale, bias)]
        loss, lse = CL.clip_dir_fwd(*args, offset)
        dq, dk, dscale, dbias = CL.clip_dir_bwd(*args, lse, offset, torch.tensor(1.5, device=dev))
        ref = ref_clip_dir(q, k, scale, bias, offset, grad=1.5)
        for name, out in dict(loss=loss, lse=lse, dq=dq, dk=dk, dscale=dscale).items():
            _check(f"{name}[rank={rank}]", out.cpu(), ref[name])
        if with_bias:
            _check("dbias", dbias.cpu(), ref["dbias"], atol=1e-5)  # exactly 0 in exact arithmetic
        else:
            assert dbias is None


@needs_interpreter_or_gpu
@pytest.mark.parametrize("Bq,Bk,D", [(1, 1, 1), (3, 3, 16), (37, 37, 70), (20, 130, 16), (130, 37, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_siglip_matches_float64(Bq, Bk, D, with_bias):
    gen = torch.Generator().manual_seed(17 * Bq + Bk + D)
    q, k = _features(Bq, D, gen), _features(Bk, D, gen)
    scale, bias = torch.tensor([10.0]), (torch.tensor([-10.0]) if with_bias else None)  # SigLIP's init
    dev = _device()
    # Diagonal, a rank offset, an "all negatives" neighbour chunk, and a partially overlapping negative offset.
    offsets = sorted({0, min(Bq, max(Bk - Bq, 0)), Bk, -2})
    for offset in offsets:
        args = [t.to(dev) if t is not None else None for t in (q, k, scale, bias)]
        loss = SL.siglip_fwd(*args, offset)
        dq, dk, dscale, dbias = SL.siglip_bwd(*args, offset, torch.tensor(2.0, device=dev))
        ref = ref_siglip(q, k, scale, bias, offset, grad=2.0)
        assert loss.dtype == torch.float32 and loss.ndim == 0
        for name, out in dict(loss=loss, dq=dq, dk=dk, dscale=dscale).items():
            _check(f"{name}[offset={offset}]", out.cpu(), ref[name])
        if with_bias:
            _check(f"dbias[offset={offset}]", dbias.cpu(), ref["dbias"])
            assert dbias.shape == bias.shape
        else:
            assert dbias is None


@needs_interpreter_or_gpu
def test_siglip_extreme_logits_stable(small_tiles):
    """|S| ~ 1e3: logsigmoid and sigmoid must stay finite and exact (no exp overflow)."""
    gen = torch.Generator().manual_seed(3)
    q, k = _features(21, 24, gen, normalize=False), _features(33, 24, gen, normalize=False)
    scale, bias = torch.tensor(100.0), torch.tensor(-10.0)
    dev = _device()
    args = [t.to(dev) for t in (q, k, scale, bias)]
    loss = SL.siglip_fwd(*args, 5)
    dq, dk, dscale, dbias = SL.siglip_bwd(*args, 5, 1.0)
    ref = ref_siglip(q, k, scale, bias, 5)
    for name, out in dict(loss=loss, dq=dq, dk=dk, dscale=dscale, dbias=dbias).items():
        _check(name, out.cpu(), ref[name], atol=1e-5)


@needs_interpreter_or_gpu
def test_results_are_deterministic_and_inputs_untouched():
    """No atomics: two runs agree bit for bit; non-contiguous inputs are accepted and left unmodified."""
    gen = torch.Generator().manual_seed(5)
    dev = _device()
    q = _features(40, 48, gen).to(dev)
    k_t = _features(48, 40, gen).to(dev).T  # non-contiguous view [40, 48]
    scale = torch.tensor(10.0, device=dev)
    q0, k0 = q.clone(), k_t.clone()
    runs = []
    for _ in range(2):
        loss, lr, lc = CL.clip_sym_fwd(q, k_t, scale, None)
        runs.append((loss, lr, lc, *CL.clip_sym_bwd(q, k_t, scale, None, lr, lc, 1.0)[:3]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.equal(q, q0) and torch.equal(k_t, k0)
    ref = ref_clip_sym(q.cpu(), k_t.cpu(), scale.cpu(), None)
    _check("loss", runs[0][0].cpu(), ref["loss"])
    _check("dk", runs[0][4].cpu(), ref["dk"])


@pytest.fixture
def gemm_backward(monkeypatch):
    """The GEMM-assisted backward with 16-column chunks (several chunks and a ragged last one)."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "gemm")
    monkeypatch.setattr(planner, "BWD_MEMORY_BYTES", 1)
    monkeypatch.setattr(planner, "MIN_CHUNK", 16)


@needs_interpreter_or_gpu
@pytest.mark.parametrize("kind", ["sym", "dir", "siglip"])
def test_gemm_backward_matches_float64(kind, gemm_backward):
    gen = torch.Generator().manual_seed(11)
    Bq, Bk, D = (45, 45, 40) if kind == "sym" else (23, 69, 40)
    offset = 0 if kind == "sym" else 46
    q, k = _features(Bq, D, gen), _features(Bk, D, gen)
    scale = torch.tensor(14.3)
    bias = torch.tensor([-3.0]) if kind != "dir" else None
    dev = _device()
    args = [t.to(dev) if t is not None else None for t in (q, k, scale, bias)]
    if kind == "sym":
        _, lr, lc = CL.clip_sym_fwd(*args)
        dq, dk, ds, db = CL.clip_sym_bwd(*args, lr, lc, torch.tensor(0.5, device=dev))
        ref = ref_clip_sym(q, k, scale, bias, grad=0.5)
    elif kind == "dir":
        _, lse = CL.clip_dir_fwd(*args, offset)
        dq, dk, ds, db = CL.clip_dir_bwd(*args, lse, offset, torch.tensor(0.5, device=dev))
        ref = ref_clip_dir(q, k, scale, bias, offset, grad=0.5)
    else:
        dq, dk, ds, db = SL.siglip_bwd(*args, offset, torch.tensor(0.5, device=dev))
        ref = ref_siglip(q, k, scale, bias, offset, grad=0.5)
    for name, out in dict(dq=dq, dk=dk, dscale=ds).items():
        _check(name, out.cpu(), ref[name])
    if bias is not None:
        _check("dbias", db.cpu(), ref["dbias"], atol=1e-5)
        assert db.shape == bias.shape
    else:
        assert db is None


@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("D", [64, 256, 512, 768, 1024])
def test_default_backward_fits_64mb_at_every_batch(D, elem, monkeypatch):
    """The chooser (a pure function of B, D, dtype size and the budget) keeps the default backward's extra memory
    within BIOCLIP_FAST_BWD_MEMORY_MB (64 MiB) from B = 1 to B = 1M, and uses the one-recompute GEMM backward where
    that fits (mid-size B at wide D)."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "auto")
    monkeypatch.setattr(planner, "interpreting", lambda: False)
    budget = 64 * 2**20
    picked = set()
    for B in [1, 17, 1000, 4096, 16384, 32768, 65536, 262144, 1 << 20]:
        strategy, chunk = planner.bwd_plan(B, B, D, elem, "cuda", budget=budget)
        extra = (planner.gemm_extra_bytes(B, B, D, elem, chunk) if strategy == "gemm"
                 else planner.fused_extra_bytes(B, B, D))
        assert extra <= budget, (B, D, elem, strategy, chunk, extra / 2**20)
        if strategy == "gemm":
            assert chunk >= min(B, planner.MIN_CHUNK)
        picked.add(strategy)
    assert "fused" in picked  # B = 1M never fits a fp32 [B, D] accumulator
    if D > 128:
        assert "gemm" in picked, D
    assert planner.bwd_plan(32768, 32768, 768, 2, "cpu")[0] == "fused"  # Triton on CPU: interpreter only
    # The old floor (256 columns) alone was a 512 MiB workspace at B = 1M; a forced gemm still honours it.
    s, c = planner.bwd_plan(1 << 20, 1 << 20, 768, 2, "cuda", budget=budget, choice="gemm")
    assert s == "gemm" and c == 256


_PLANNER_ALONE = r"""
import json, sys


class NoTritonNoTorch:  # the planner must import and plan on a machine that has neither
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton", "torch"):
            raise ImportError(f"{name} is not importable here")


sys.meta_path.insert(0, NoTritonNoTorch())
from bioclip_fast.kernels import planner

plans = []
for B, D, elem, fp32 in json.loads(sys.argv[1]):
    plans.append([planner.bwd_plan(B, B, D, elem, "cuda", 64 * 2**20, grads_fp32=fp32, cast=fp32 and elem == 2),
                  planner.fwd_chunks(B, B, D, elem, True, 64 * 2**20), planner.pairwise_flops(B, B, D)])
print(json.dumps(plans))
"""


_GUARDED_BWD = r"""
import ctypes, mmap, sys
import torch
from bioclip_fast.kernels.backward_fused import pairwise_bwd
from bioclip_fast.kernels.operands import positive_dots
from bioclip_fast.kernels.tiles import MODE_CLIP_DIR, MODE_CLIP_SYM, MODE_SIGLIP

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []


def guarded(t):
    # a copy of t whose last byte is followed by a page that cannot be read (PROT_NONE): a read past it segfaults
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE) + 1
    m = mmap.mmap(-1, pages * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(addr + (pages - 1) * PAGE, PAGE, 0) == 0, ctypes.get_errno()
    g = torch.frombuffer(m, dtype=t.dtype, count=t.numel(), offset=(pages - 1) * PAGE - nbytes).view(t.shape)
    g.copy_(t)
    keep.append(m)
    return g


B, D = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(3)
q = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1)
k = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1)
scale, grad = torch.tensor(10.0), torch.tensor(1.0)
S = scale * q @ k.T
lr, lc, cen = S.logsumexp(1), S.logsumexp(0), positive_dots(q, k, 0)
cases = [(MODE_CLIP_SYM, True, lr, lc, True), (MODE_CLIP_SYM, False, lc, lr, False),
         (MODE_CLIP_DIR, True, lr, None, True), (MODE_CLIP_DIR, False, None, lr, False),
         (MODE_SIGLIP, True, None, None, True)]
for mode, rows, lx, ly, scalars in cases:
    def run(a, b):
        X, Y = (a, b) if rows else (b, a)
        return pairwise_bwd(X, Y, scale, torch.tensor(-5.0) if mode == MODE_SIGLIP else None, lx, ly, grad,
                            offset=0, inv_n=1.0 / B, mode=mode, x_is_rows=rows, scalar_grads=scalars,
                            cen_x=cen if scalars else None, cen_y=cen if mode == MODE_CLIP_SYM and scalars else None)
    plain, fenced = run(q, k), run(guarded(q), guarded(k))
    for a, b in zip(plain, fenced):
        assert (a is None and b is None) or torch.equal(a, b), (mode, rows)

# the whole losses, forward and every backward strategy
import os
from bioclip_fast.kernels import clip_loss as CL, siglip_loss as SL

def losses(a, b):
    bias = torch.tensor(-5.0)
    _, lr, lc = out = CL.clip_sym_fwd(a, b, scale)
    yield from out
    yield from CL.clip_sym_bwd(a, b, scale, None, lr, lc, grad)
    loss, lse = out = CL.clip_dir_fwd(a, b, scale, None, 0)
    yield from out
    yield from CL.clip_dir_bwd(a, b, scale, None, lse, 0, grad)
    yield SL.siglip_fwd(a, b, scale, bias, 0)
    yield from SL.siglip_bwd(a, b, scale, bias, 0, grad)

qg, kg = guarded(q), guarded(k)
for strategy in ("fused", "gemm", "gemm2d"):
    os.environ["BIOCLIP_FAST_BWD"] = strategy
    for i, (a, b) in enumerate(zip(losses(q, k), losses(qg, kg))):
        assert (a is None and b is None) or torch.equal(a, b), (strategy, i)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix", reason="mprotect guard pages: POSIX only")
@pytest.mark.parametrize("B,D,gpu_configs", [(50, 32, False), (40, 640, True)])
def test_fused_backward_reads_nothing_past_its_operands(B, D, gpu_configs):
    """The fused backward's D slices (``NUM_ACC * BLOCK_DO`` columns per program) overhang D where they do not
    divide it: the interpreter's 2 x 32 at D = 32, the GPU's 3 x 128 per program at D = 640. Those slices must
    mask their columns (``tiles.load_slice``): unmasked they read the next row and, for the last row, past the
    tensor (an illegal address on a GPU, a segfault here). Every mode runs on operands that end right before an
    unreadable page, under the interpreter (the GPU's first config with ``gpu_configs``), and must give exactly
    the results it gives on ordinary tensors; so must every loss's forward and each backward strategy."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", BIOCLIP_FAST_AUTOTUNE="0",
               BIOCLIP_FAST_INTERPRET_AUTOTUNED="1" if gpu_configs else "0")
    proc = subprocess.run([sys.executable, "-c", _GUARDED_BWD, str(B), str(D)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
        f"exit {proc.returncode} (-11: a read past the operands)\n{proc.stderr[-3000:]}")


def test_memory_planner_plans_without_triton_or_torch(monkeypatch):
    """``kernels.planner`` is pure Python: in a process where importing triton or torch fails it imports and makes
    the same plans (strategy, chunks, forward chunks, FLOPs) as here, where both are loaded."""
    import json
    import subprocess
    import sys

    import triton

    cases = [[B, D, elem, fp32] for B in (1, 1000, 32768, 1 << 20) for D in (64, 768) for elem in (2, 4)
             for fp32 in (False, True)]
    env = dict(os.environ, TRITON_INTERPRET="0", BIOCLIP_FAST_BWD="auto")
    env.pop("BIOCLIP_FAST_BWD_MEMORY_MB", None)
    proc = subprocess.run([sys.executable, "-c", _PLANNER_ALONE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "auto")
    monkeypatch.setattr(planner, "interpreting", lambda: False)
    want = [[list(planner.bwd_plan(B, B, D, elem, "cuda", 64 * 2**20, grads_fp32=fp32, cast=fp32 and elem == 2)),
             list(planner.fwd_chunks(B, B, D, elem, True, 64 * 2**20)), planner.pairwise_flops(B, B, D)]
            for B, D, elem, fp32 in cases]
    got = [[[s, list(c) if isinstance(c, list) else c], f, n] for (s, c), f, n in json.loads(proc.stdout)]
    want = [[[s, list(c) if isinstance(c, tuple) else c], f, n] for (s, c), f, n in want]
    assert got == want
    assert {p[0][0] for p in got} == {"fused", "gemm", "gemm2d"}  # the grid reaches every strategy
    for a in range(0, 600, 7):
        for b in (1, 16, 128, 129):
            assert planner.cdiv(a, b) == triton.cdiv(a, b)


def test_backward_strategy_choice(monkeypatch):
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "fused")
    assert planner.bwd_strategy(768, torch.device("cuda")) == "fused"
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "gemm")
    assert planner.bwd_strategy(16, torch.device("cpu")) == "gemm"
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "auto")
    assert planner.bwd_strategy(64, torch.device("cpu")) == "fused"
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "fast")
    with pytest.raises(ValueError, match="BIOCLIP_FAST_BWD"):
        planner.bwd_strategy(64, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Launcher validation (no kernel launch needed)
# ----------------------------------------------------------------------------------------------------------------


def test_launchers_reject_bad_input():
    q, k, s = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="2-D"):
        CL.clip_sym_fwd(q[None], k, s, None)
    with pytest.raises(ValueError, match="feature dims differ"):
        CL.clip_sym_fwd(q, torch.randn(4, 9), s, None)
    with pytest.raises(TypeError, match="dtypes differ"):
        CL.clip_sym_fwd(q, k.double().float().half(), s, None)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        SL.siglip_fwd(q.double(), k.double(), s, None, 0)
    with pytest.raises(ValueError, match="non-empty"):
        CL.clip_sym_fwd(q[:0], k[:0], s, None)
    with pytest.raises(ValueError, match="as many rows"):
        CL.clip_sym_fwd(q, torch.randn(5, 8), s, None)
    with pytest.raises(ValueError, match="scale must have shape"):
        CL.clip_sym_fwd(q, k, torch.ones(2), None)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        SL.siglip_fwd(q, k, s, 1.0, 0)
    with pytest.raises(ValueError, match="offset=3"):
        CL.clip_dir_fwd(q, torch.randn(6, 8), s, None, 3)
    with pytest.raises(ValueError, match="offset=-1"):
        CL.clip_dir_bwd(q, k, s, None, torch.zeros(4), -1, 1.0)
    with pytest.raises(TypeError, match="offset must be an int"):
        SL.siglip_fwd(q, k, s, None, 1.5)
    with pytest.raises(ValueError, match="lse_col must be a 1-D tensor of length 4"):
        CL.clip_sym_bwd(q, k, s, None, torch.zeros(4), torch.zeros(3), 1.0)


def test_flops_helpers():
    assert CL.flops(4096, 4096, 768, backward=False) == 2 * 4096 * 4096 * 768
    assert CL.flops(4096, 4096, 768) == 8 * 4096**2 * 768
    assert SL.flops(100, 300, 64) == 8 * 100 * 300 * 64


def test_autotune_config_lists_cover_every_width():
    """Every D gets at least one config; backward configs cover D within <= 4 register accumulators."""
    for D in (1, 16, 70, 128, 200, 256, 512, 768, 1024, 2048):
        fwd, bwd = autotune.fwd_configs(D), autotune.bwd_configs(D)
        assert fwd and bwd, D
        for c in fwd:
            assert c.kwargs["BLOCK_D"] >= 16 and c.kwargs["BLOCK_D"] & (c.kwargs["BLOCK_D"] - 1) == 0
        for c in bwd:
            assert 1 <= c.kwargs["NUM_ACC"] <= 4
            assert (c.kwargs["NUM_ACC"] - 1) * c.kwargs["BLOCK_DO"] < D  # no accumulator that is all padding


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 / fp32 at realistic sizes (flash-attention tolerance rule)
# ----------------------------------------------------------------------------------------------------------------


def _dense_same_dtype(kind, q, k, s, b, offset=0):
    """What a plain torch user would write, in the input dtype (logits materialized)."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    s = s.detach().to(q.dtype).requires_grad_()
    b = None if b is None else b.detach().to(q.dtype).requires_grad_()
    S = _logits(q, k, s, b)
    if kind == "sym":
        labels = torch.arange(S.shape[0], device=S.device)
        loss = 0.5 * (F.cross_entropy(S, labels) + F.cross_entropy(S.T, labels))
    elif kind == "dir":
        labels = torch.arange(S.shape[0], device=S.device) + offset
        loss = F.cross_entropy(S, labels)
    else:
        z = -torch.ones_like(S)
        i = torch.arange(S.shape[0], device=S.device)
        ok = (i + offset >= 0) & (i + offset < S.shape[1])
        z[i[ok], (i + offset)[ok]] = 1
        loss = -F.logsigmoid(z * S).sum() / S.shape[0]
    loss.backward()
    return dict(loss=loss, dq=q.grad, dk=k.grad, dscale=s.grad, dbias=None if b is None else b.grad)


def _ours(kind, q, k, s, b, offset=0):
    if kind == "sym":
        loss, lr, lc = CL.clip_sym_fwd(q, k, s, b)
        dq, dk, ds, db = CL.clip_sym_bwd(q, k, s, b, lr, lc, 1.0)
    elif kind == "dir":
        loss, lse = CL.clip_dir_fwd(q, k, s, b, offset)
        dq, dk, ds, db = CL.clip_dir_bwd(q, k, s, b, lse, offset, 1.0)
    else:
        loss = SL.siglip_fwd(q, k, s, b, offset)
        dq, dk, ds, db = SL.siglip_bwd(q, k, s, b, offset, 1.0)
    return dict(loss=loss, dq=dq, dk=dk, dscale=ds, dbias=db)


def _reference64(kind, q, k, s, b, offset=0):
    fn = dict(sym=lambda: ref_clip_sym(q, k, s, b), dir=lambda: ref_clip_dir(q, k, s, b, offset),
              siglip=lambda: ref_siglip(q, k, s, b, offset))[kind]
    return fn()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,D", [(4096, 768), (1000, 1024)])
@pytest.mark.parametrize("kind", ["sym", "dir", "siglip"])
def test_gpu_error_within_twice_dense_torch(kind, B, D, dtype, strategy, monkeypatch):
    monkeypatch.setenv("BIOCLIP_FAST_BWD", strategy)
    gen = torch.Generator(device="cuda").manual_seed(B + D)
    Bq = B if kind == "sym" else B // 2
    offset = 0 if kind == "sym" else B - Bq
    q = F.normalize(torch.randn(Bq, D, device="cuda", generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1).to(dtype)
    # Correlate positives so the loss is not at its random-init plateau.
    k[offset:offset + Bq] = F.normalize(k[offset:offset + Bq].float() + q.float(), dim=-1).to(dtype)
    scale = torch.tensor(50.0, device="cuda")
    bias = torch.tensor(-10.0, device="cuda") if kind == "siglip" else None
    ref = _reference64(kind, q, k, scale, bias, offset)
    dense = _dense_same_dtype(kind, q, k, scale, bias, offset)
    ours = _ours(kind, q, k, scale, bias, offset)
    for name in ("loss", "dq", "dk", "dscale", "dbias"):
        if ref[name] is None:
            continue
        r = ref[name].double()
        err_ours = (ours[name].double() - r).abs().max().item()
        err_dense = (dense[name].double() - r).abs().max().item()
        atol = 1e-6 * max(r.abs().max().item(), 1e-3) + (1e-7 if dtype == torch.float32 else 1e-5)
        assert err_ours <= 2 * err_dense + atol, f"{kind} {name}: ours {err_ours:.3e} vs dense {err_dense:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "gemm"])
def test_gpu_memory_is_linear_in_batch(strategy, monkeypatch):
    """B = 65,536 (a B x B fp32 logits matrix would be 16 GiB): forward + backward peak stays O(B*D). The fused
    backward needs O(B) extra (within the 64 MiB default budget); a forced GEMM-assisted one its workspace plus an
    fp32 dQ accumulator (``gemm_extra_bytes``)."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", strategy)
    B, D = 65536, 768
    q = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(torch.bfloat16)
    k = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(torch.bfloat16)
    scale = torch.tensor(14.3, device="cuda")
    CL.clip_sym_fwd(q, k, scale, None)  # autotune / compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, lr, lc = CL.clip_sym_fwd(q, k, scale, None)
    dq, dk, ds, _ = CL.clip_sym_bwd(q, k, scale, None, lr, lc, 1.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - dq.nbytes - dk.nbytes
    chunk = planner.bwd_plan(B, B, D, 2, "cuda", choice=strategy)[1]
    budget = 16 * 2**20 + (planner.gemm_extra_bytes(B, B, D, 2, chunk) if strategy == "gemm"
                           else planner.BWD_MEMORY_BYTES)
    assert extra < budget, f"extra memory {extra / 2**20:.1f} MiB"
    assert torch.isfinite(loss) and torch.isfinite(dq.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("B", [32768, 65536])
def test_gpu_trainer_path_one_recompute_within_64mb(B):
    """The trainer's call (fp32 features, compute_dtype bf16) at B = 32k / 64k, D = 768: the op casts per chunk
    and the gemm2d backward accumulates into the fp32 gradients, so forward + backward use at most the 64 MiB
    budget beyond the features and their gradients (+ 16 MiB for the loss / LSE vectors and allocator rounding),
    and the gradients match the cast-before-the-op path to bf16 rounding."""
    from bioclip_fast.ops.clip_loss import clip_sym_loss

    D = 768
    assert planner.bwd_plan(B, B, D, 2, "cuda", grads_fp32=True, cast=True)[0] == "gemm2d"
    gen = torch.Generator(device="cuda").manual_seed(3)
    q0 = F.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1)
    k0 = F.normalize(q0 + 0.3 * torch.randn(B, D, device="cuda", generator=gen), dim=-1)
    scale = torch.tensor(30.0, device="cuda")
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    clip_sym_loss(q, k, scale, compute_dtype="bf16").backward()  # autotune / compile outside the measurement
    q.grad = k.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = clip_sym_loss(q, k, scale, compute_dtype="bf16")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - q.grad.nbytes - k.grad.nbytes
    assert extra <= planner.BWD_MEMORY_BYTES + 16 * 2**20, f"extra memory {extra / 2**20:.1f} MiB"
    assert q.grad.dtype == torch.float32
    qb, kb = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss_b = CL.clip_sym_fwd(qb.bfloat16(), kb.bfloat16(), scale)[0]
    assert abs(loss.item() - loss_b.item()) <= 1e-3 * abs(loss_b.item())
    ref = clip_sym_loss(qb.double(), kb.double(), scale.double())  # torch reference in float64
    ref.backward()
    for got, want in ((q.grad, qb.grad), (k.grad, kb.grad)):
        err = (got.double() - want).abs().max().item()
        assert err <= 2e-2 * want.abs().max().item(), err  # bf16 products of G and the features


# ----------------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile for sm_90 with triton's bundled ptxas
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_configs_compile_for_hopper_without_spills(tmp_path):
    """The interpreter never runs Triton's GPU compiler: compile every kernel's default config (the first of each
    autotune list; what BIOCLIP_FAST_AUTOTUNE=0 runs) for sm_90a at D = 768 bf16 with triton's bundled ptxas, so
    code-generation errors show up in CPU CI; fail if one spills, misses the Hopper tensor cores (wgmma) or the
    async loads, or has local-memory traffic in its main loop (SASS via nvdisasm)."""
    import json
    import subprocess
    import sys

    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bindir, t)) for t in ("ptxas", "nvdisasm")):
        pytest.skip("triton's bundled ptxas/nvdisasm are not available")
    out = tmp_path / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "bioclip_fast.kernels._aot", "--D", "768", "--dtype", "bf16",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert len(reports) == 12  # 3 forward + 3 gradient-tile + 6 backward kernels
    for rep in reports:
        assert rep["registers"] and rep["registers"] <= 255, rep
        assert rep["spill_store_bytes"] == 0 and rep["spill_load_bytes"] == 0, rep
        assert rep["ldl"] == 0 and rep["stl"] == 0, rep
        assert rep["wgmma"] and rep["cp_async"] and rep["hgmma"] > 0, rep
    # one exp2 per logit in the forward's fast path: MUFU.EX2 per logit (both paths counted) stays small
    fwd = [r for r in reports if r["kernel"].startswith("clip_fwd dir")]
    assert fwd and fwd[0]["mufu_ex2_per_logit"] <= 1.5, fwd
    assert autotune.fwd_configs(768)[0].kwargs["BLOCK_M"] == 64  # the spill-free default


# ----------------------------------------------------------------------------------------------------------------
# fp32 features: chunked forward, one-recompute (row x column)-chunked backward into the fp32 gradients (gemm2d),
# products in a half-precision compute dtype on per-chunk casts
# ----------------------------------------------------------------------------------------------------------------


def _problem(kind, gen):
    Bq, Bk, D = (70, 70, 48) if kind == "sym" else (37, 111, 48)
    offset = 0 if kind == "sym" else (41 if kind == "dir" else 90)  # siglip: some rows without a positive
    q, k = _features(Bq, D, gen), _features(Bk, D, gen)
    return q, k, torch.tensor(14.3), (torch.tensor([-3.0]) if kind == "siglip" else None), offset


def _run(kind, q, k, scale, bias, offset, grad, compute=None, fwd_chunks=None):
    """(loss, dq, dk, dscale, dbias) through the Triton launchers."""
    if kind == "siglip":
        loss = SL.siglip_fwd(q, k, scale, bias, offset, compute=compute, chunks=fwd_chunks)
        return (loss, *SL.siglip_bwd(q, k, scale, bias, offset, grad, compute=compute))
    if kind == "sym":
        lr, lc, pos = CL._clip_fwd(q, k, scale, bias, 0, True, op_dtype=compute, chunks=fwd_chunks)
        loss = 0.5 * ((lr - pos).mean() + (lc - pos).mean())
        return (loss, *CL.clip_sym_bwd(q, k, scale, bias, lr, lc, grad, compute=compute))
    lse, _, pos = CL._clip_fwd(q, k, scale, bias, offset, False, op_dtype=compute, chunks=fwd_chunks)
    return ((lse - pos).mean(), *CL.clip_dir_bwd(q, k, scale, bias, lse, offset, grad, compute=compute))


def _ref(kind, q, k, scale, bias, offset, grad):
    if kind == "sym":
        return ref_clip_sym(q, k, scale, bias, grad=grad)
    if kind == "dir":
        return ref_clip_dir(q, k, scale, bias, offset, grad=grad)
    return ref_siglip(q, k, scale, bias, offset, grad=grad)


@pytest.fixture
def gemm2d_backward(monkeypatch):
    """The (row x column)-chunked backward with ragged chunks smaller than the interpreter's 32-wide tiles' sums:
    several chunks on both axes, positives crossing chunk borders."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "gemm2d")
    real = planner.gemm2d_chunks
    monkeypatch.setattr(planner, "gemm2d_chunks", lambda *a, **kw: (24, 40))
    return real


@needs_interpreter_or_gpu
@pytest.mark.parametrize("kind", ["sym", "dir", "siglip"])
def test_chunked_forward_and_gemm2d_backward_match_float64(kind, gemm2d_backward):
    gen = torch.Generator().manual_seed(5)
    q, k, scale, bias, offset = _problem(kind, gen)
    dev = _device()
    args = [t.to(dev) if t is not None else None for t in (q, k, scale, bias)]
    before = [t.clone() for t in args if t is not None]
    out = _run(kind, *args, offset, torch.tensor(0.5, device=dev), fwd_chunks=(24, 40))
    assert all(torch.equal(a, b) for a, b in zip([t for t in args if t is not None], before)), "inputs changed"
    ref = _ref(kind, q, k, scale, bias, offset, 0.5)
    _check("loss", out[0].cpu(), ref["loss"])
    for name, got in zip(("dq", "dk", "dscale"), out[1:4]):
        assert got.dtype == torch.float32
        _check(name, got.cpu(), ref[name])
    if bias is not None:
        _check("dbias", out[4].cpu(), ref["dbias"], atol=1e-5)
    # the same numbers as one launch / the fused kernels, to rounding
    whole = _run(kind, *args, offset, torch.tensor(0.5, device=dev), fwd_chunks=(10 ** 6, 10 ** 6))
    _check("loss vs one launch", out[0].cpu(), whole[0].cpu(), rtol=1e-6)


@needs_interpreter_or_gpu
@pytest.mark.parametrize("kind", ["sym", "dir", "siglip"])
def test_half_compute_casts_per_chunk_and_returns_fp32_gradients(kind, gemm2d_backward):
    """compute=fp16 on fp32 features: each chunk is cast inside the launchers, the gradients come back fp32 and
    equal (to fp16-operand rounding of G) the float64 gradients of the fp16-rounded features."""
    gen = torch.Generator().manual_seed(6)
    q, k, scale, bias, offset = _problem(kind, gen)
    dev = _device()
    args = [t.to(dev) if t is not None else None for t in (q, k, scale, bias)]
    out = _run(kind, *args, offset, torch.tensor(1.0, device=dev), compute=torch.float16, fwd_chunks=(24, 40))
    ref = _ref(kind, q.half().float(), k.half().float(), scale, bias, offset, 1.0)
    _check("loss", out[0].cpu(), ref["loss"], rtol=1e-5)
    for name, got in zip(("dq", "dk", "dscale"), out[1:4]):
        assert got.dtype == torch.float32, name
        _check(name, got.cpu(), ref[name], rtol=2e-3)  # G and the features enter the products as fp16
    with pytest.raises(ValueError, match="fp32 features"):
        SL.siglip_fwd(q.half().to(dev), k.half().to(dev), args[2], None, 0, compute=torch.bfloat16)


@needs_interpreter_or_gpu
def test_ops_take_the_compute_dtype_and_autograd_gives_fp32_gradients():
    """The custom op with compute="fp16" (what clip_sym_loss passes for fp32 features under bf16/fp16 compute on
    the Triton backend): fp32 gradients out of autograd, close to the cast-before-the-op path."""
    from bioclip_fast.ops.clip_loss import clip_sym_fwd_op

    gen = torch.Generator().manual_seed(7)
    dev = _device()
    q0, k0 = _features(50, 32, gen).to(dev), _features(50, 32, gen).to(dev)
    s = torch.tensor(10.0, device=dev)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    clip_sym_fwd_op(q, k, s, None, "triton", "fp16")[0].backward()
    qh, kh = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    clip_sym_fwd_op(qh.half(), kh.half(), s, None, "triton")[0].backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32
    _check("dq", q.grad.cpu(), qh.grad.cpu(), rtol=2e-3)
    _check("dk", k.grad.cpu(), kh.grad.cpu(), rtol=2e-3)
    torch.library.opcheck(clip_sym_fwd_op, (q0, k0, s, None, "triton", "fp16"))


def test_in_op_compute_choice():
    """fp32 features with bf16/fp16 products on the Triton backend stay fp32 (cast per chunk in the op); every
    other combination is cast before the op (or not at all)."""
    from bioclip_fast.ops.precision import in_op_compute

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert in_op_compute(f32, f32, bf16, "triton") == "bf16"
    assert in_op_compute(f32, f32, f16, "triton") == "fp16"
    assert in_op_compute(f32, f32, f32, "triton") == ""
    assert in_op_compute(bf16, bf16, bf16, "triton") == ""
    assert in_op_compute(f32, f32, bf16, "torch") == ""
    assert in_op_compute(f32, bf16, bf16, "triton") == ""


@pytest.mark.parametrize("cast", [True, False])
@pytest.mark.parametrize("D", [64, 256, 512, 768, 1024])
def test_fp32_gradients_get_one_recompute_within_64mb_at_every_batch(D, cast, monkeypatch):
    """With fp32 gradients (the trainer's fp32 features; bf16 products when ``cast``) the chooser takes the
    one-recompute gemm2d backward at every B from 1 to 1M for D > 128, its extra memory within 64 MiB, with chunks
    of at least 256 rows and columns; the forward's per-chunk casts fit the same budget."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "auto")
    monkeypatch.setattr(planner, "interpreting", lambda: False)
    budget = 64 * 2**20
    elem = 2 if cast else 4
    for Bq, Bk in [(1, 1), (17, 17), (1000, 1000), (4096, 4096), (16384, 16384), (32768, 32768), (65536, 65536),
                   (1 << 20, 1 << 20), (2816, 32 * 2816), (320, 1 << 20)]:
        strategy, chunks = planner.bwd_plan(Bq, Bk, D, elem, "cuda", budget=budget, grads_fp32=True, cast=cast)
        if strategy == "gemm2d":
            rows, cols = chunks
            assert rows >= min(Bq, 256) and cols >= min(Bk, 256), (Bq, D, chunks)
            extra = planner.gemm2d_extra_bytes(Bq, Bk, D, elem, cast, rows, cols)
        else:
            assert D <= 128 and strategy == "fused", (Bq, D, strategy)
            extra = planner.fused_extra_bytes(Bq, Bk, D) + ((Bq + Bk) * D * elem if cast else 0)
        assert extra <= budget, (Bq, Bk, D, strategy, chunks, extra / 2**20)
        if D > 128:
            assert strategy == "gemm2d", (Bq, D, strategy)
        rows, cols = planner.fwd_chunks(Bq, Bk, D, elem, cast, budget)
        fwd_extra = planner.fwd_extra_bytes(Bq, Bk, D, elem, cast, rows, cols) if cast else 0
        assert fwd_extra <= budget, (Bq, Bk, D, rows, cols)
        if cast and Bq >= 16384 and D >= 768:  # no launch smaller than ~4k x 4k at the scales that chunk
            assert min(rows, cols) >= 4096, (Bq, D, rows, cols)
    # bf16 gradients keep the old rule (no fp32 accumulator fits at B = 32k, D = 768)
    assert planner.bwd_plan(32768, 32768, 768, 2, "cuda", budget=budget)[0] == "fused"
    assert planner.bwd_plan(32768, 32768, 768, 2, "cuda", budget=budget, choice="gemm2d")[0] == "gemm"


# ----------------------------------------------------------------------------------------------------------------
# The launch path a GPU takes: the autotuned wrappers with the GPU's config lists, pruning and benchmarking
# ----------------------------------------------------------------------------------------------------------------

_TUNED = (("clip_fwd", CL.clip_fwd_tuned), ("siglip_fwd", SL.siglip_fwd_tuned),
          ("bwd", backward_fused.pairwise_bwd_tuned), ("grad_tile", backward_gemm.grad_tile_tuned))


def _tile_programs(config, n=130):
    """Programs along the tiled batch axis of a config on ``n`` rows (the fewer, the more partial-sum slots a
    config with more programs leaves behind)."""
    k = config.kwargs
    return -(-n // k.get("BLOCK_M", k.get("BLOCK_X", 1)))


@pytest.fixture
def autotuned_launches(monkeypatch):
    """Every launch goes through the autotuned wrapper (``BIOCLIP_FAST_INTERPRET_AUTOTUNED=1``) with autotuning
    on and an empty cache, as on a GPU's first call: each pruned config runs on the real buffers. The benchmark
    is made deterministic so that a *non-first* config wins: among the configs after the default, the one with
    the fewest row programs and the largest tile (other configs with more programs have then written partial-sum
    slots it does not). Returns {kernel: [(benchmarked configs, winner), ...]} per launch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's launch path (on a GPU the real autotuner runs)")
    monkeypatch.setenv("BIOCLIP_FAST_INTERPRET_AUTOTUNED", "1")
    monkeypatch.setenv("BIOCLIP_FAST_AUTOTUNE", "1")
    record: dict[str, list] = {}
    for name, tuned in _TUNED:
        monkeypatch.setattr(tuned, "cache", {})
        real_bench, real_run = tuned._bench, tuned.run

        def bench(*args, config, _tuned=tuned, _real=real_bench, _name=name, **meta):
            _real(*args, config=config, **meta)  # the config runs on the launch's real buffers
            first = _tuned.early_config_prune(_tuned.configs, _tuned.nargs, **meta)[0]
            record[_name][-1][0].append(config)
            k = config.kwargs
            area = k.get("BLOCK_M", k.get("BLOCK_X")) * k.get("BLOCK_N", k.get("BLOCK_Y"))
            is_first = (config.kwargs, config.num_warps, config.num_stages) == (first.kwargs, first.num_warps,
                                                                                first.num_stages)
            t = float("inf") if is_first else _tile_programs(config) - area / 1e6
            return [t, t, t]

        def run(*args, _real=real_run, _tuned=tuned, _name=name, **kwargs):
            record.setdefault(_name, []).append(([], None))
            out = _real(*args, **kwargs)
            record[_name][-1] = (record[_name][-1][0], _tuned.best_config)
            return out

        monkeypatch.setattr(tuned, "_bench", bench)
        monkeypatch.setattr(tuned, "run", run)
    return record


@pytest.mark.parametrize("kind,bwd", [("sym", "fused"), ("dir", "fused"), ("siglip", "fused"), ("sym", "gemm"),
                                      ("dir", "gemm"), ("siglip", "gemm"), ("dir", "gemm2d"), ("sym", "gemm2d"),
                                      ("siglip", "gemm2d")])
def test_first_autotuned_call_is_correct_with_a_non_first_config_winning(kind, bwd, autotuned_launches,
                                                                          monkeypatch):
    """The first call of every autotune key, through the launchers exactly as the ops call them (constexprs as
    keywords), with several configs benchmarked on the real output buffers and a non-first one winning: loss,
    dq, dk, dscale and dbias match float64. Before: KeyError 'D' in the prune functions, then partial sums left
    by other configs (dscale for every kind, SigLIP loss and dbias, one-direction dQ under gemm / gemm2d)."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", bwd)
    monkeypatch.setattr(planner, "MIN_CHUNK", 16)
    if bwd == "gemm":
        monkeypatch.setattr(planner, "BWD_MEMORY_BYTES", 1)  # several column chunks
    if bwd == "gemm2d":
        monkeypatch.setattr(planner, "gemm2d_chunks", lambda *a, **kw: (96, 100))
    gen = torch.Generator().manual_seed(17)
    Bq, Bk = (130, 130) if kind != "dir" else (130, 260)
    offset = 0 if kind == "sym" else (130 if kind == "dir" else 5)
    D = 32
    q, k = _features(Bq, D, gen), _features(Bk, D, gen)
    scale = torch.tensor(12.5)
    bias = torch.tensor([-2.0]) if kind != "dir" else None
    out = _run(kind, q, k, scale, bias, offset, torch.tensor(0.5))
    ref = _ref(kind, q, k, scale, bias, offset, 0.5)
    _check("loss", out[0], ref["loss"])
    for name, got in zip(("dq", "dk", "dscale"), out[1:4]):
        _check(name, got, ref[name])
    if bias is not None:
        _check("dbias", out[4], ref["dbias"], atol=1e-5)
    launches = [(name, benched, best) for name, runs in autotuned_launches.items() for benched, best in runs]
    used = {name for name, _, _ in launches}
    assert used >= ({"clip_fwd"} if kind != "siglip" else {"siglip_fwd"}) | (
        {"bwd"} if bwd == "fused" else {"grad_tile"}), used
    for name in used:  # the first launch of each key benchmarks; later ones with the same key use the cache
        assert any(len(benched) >= 2 for n, benched, _ in launches if n == name), name
    for name, benched, best in launches:
        assert best is not None
        if benched:
            assert best is not benched[0] and best in benched, f"{name}: the default config won"


_DK_ONLY = r"""
import os, sys, torch
from bioclip_fast.kernels import clip_loss as CL, planner
planner.MIN_CHUNK = 16
os.environ["BIOCLIP_FAST_BWD"] = sys.argv[1]
if sys.argv[1] == "gemm2d":
    planner.gemm2d_chunks = lambda *a, **kw: (48, 64)
else:
    planner.BWD_MEMORY_BYTES = 1
g = torch.Generator().manual_seed(3)
q = torch.nn.functional.normalize(torch.randn(100, 24, generator=g), dim=-1)
k = torch.nn.functional.normalize(torch.randn(200, 24, generator=g), dim=-1)
s = torch.tensor(11.0)
_, lse = CL.clip_dir_fwd(q, k, s, None, 100)
full = CL.clip_dir_bwd(q, k, s, None, lse, 100, 1.0)
dq, dk, ds, _ = CL.clip_dir_bwd(q, k, s, None, lse, 100, 1.0, need_q=False)
assert dq is None
assert torch.equal(dk, full[1]) and torch.equal(ds, full[2]), ((dk - full[1]).abs().max(), ds, full[2])
print("OK")
"""


@pytest.mark.parametrize("bwd", ["gemm", "gemm2d"])
def test_one_direction_without_dq_writes_no_row_sums(bwd):
    """One-direction CLIP with ``need_q=False`` under the GEMM backwards: the row sums of P (only dQ's
    renormalization needs them) are not written into the one-element placeholder (before: an out-of-bounds store
    of every row, ``munmap_chunk(): invalid pointer`` under the interpreter). In a child process: heap damage
    must fail this test, not the test session."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter check (the GPU tests cover need_q=False on CUDA)")
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", MALLOC_CHECK_="3")
    proc = subprocess.run([sys.executable, "-c", _DK_ONLY, bwd], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_logits_tile_does_not_depend_on_operand_order(dtype, monkeypatch):
    """The fused dK kernel forms its logits tile as K @ Q^T on CUDA (``backward_fused.qk_order``): that must round
    every logit exactly as the forward's Q @ K^T does (each MMA / FMA entry accumulates over D in the same k order
    whichever operand comes first), or the column softmax no longer sums to 1 against the forward's LSEs. Checked
    bitwise against the kernel forced to the forward's order."""
    monkeypatch.setenv("BIOCLIP_FAST_BWD", "fused")
    monkeypatch.setenv("BIOCLIP_FAST_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(23)
    q = _features(1000, 768, gen).to("cuda", dtype)
    k = _features(1000, 768, gen).to("cuda", dtype)
    scale = torch.tensor(100.0, device="cuda")
    _, lr, lc = CL.clip_sym_fwd(q, k, scale, None)
    out = []
    for order in (False, True):
        monkeypatch.setattr(backward_fused, "qk_order", lambda dev, o=order: o)
        out.append(CL.clip_sym_bwd(q, k, scale, None, lr, lc, 1.0)[1])
    assert torch.equal(out[0], out[1])


class _LiveBytes:
    """Peak bytes of the tensors created inside the ``with`` block that are alive at once (storages created by
    torch ops, freed when their last reference goes; the inputs made before the block are not counted), overall
    and per dtype. CPU tensors have no allocator statistics; this measures what a CUDA allocator would hold."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._see(out)
                return out

        self.mode = Mode()
        self.refs: dict = {}
        self.before: set = set()
        self.peak = 0
        self.peak_by_dtype: dict = {}

    def _see(self, out):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in self.before and (key not in self.refs or self.refs[key][0].expired()):
                    self.refs[key] = (StorageWeakRef(st), st.nbytes(), t.dtype)
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n, _ in self.refs.values()))
        for dt in {d for _, _, d in self.refs.values()}:
            live = sum(n for _, n, d in self.refs.values() if d == dt)
            self.peak_by_dtype[dt] = max(self.peak_by_dtype.get(dt, 0), live)

    def __call__(self, *inputs):
        self.before = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
        return self

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@needs_interpreter_or_gpu
def test_chunked_casts_and_partials_stay_within_the_memory_plan(monkeypatch):
    """Per-chunk casts (fp32 features, bf16 products): at most one cast row chunk and one cast column chunk alive
    (before: the previous chunk was still referenced while the next was cast, twice the plan: 96 against 56 MiB
    in the forward, 25.5 against 12.8 MiB in gemm2d), and the forward's whole extra memory within
    ``fwd_extra_bytes``, which ``fwd_chunks`` fits to the budget."""
    if _device() != "cpu":
        pytest.skip("CPU measurement (on a GPU test_gpu_trainer_path_one_recompute_within_64mb measures the allocator)")
    gen = torch.Generator().manual_seed(8)
    B, D = 300, 64
    q, k = _features(B, D, gen), _features(B, D, gen)
    scale = torch.tensor(10.0)
    splits = 2  # the interpreter's (G, H) grid: INTERPRET_TARGET_PROGRAMS = 4
    monkeypatch.setattr(planner, "REDUCE_COLS", 64)
    budget = 80_000
    rows, cols = planner.fwd_chunks(B, B, D, 2, True, budget, splits=splits)
    assert rows < B and cols < B  # several launches
    plan = planner.fwd_extra_bytes(B, B, D, 2, True, rows, cols, splits=splits)
    assert plan <= budget
    with _LiveBytes()(q, k, scale) as fwd:
        lr, lc, _ = CL._clip_fwd(q, k, scale, None, 0, True, op_dtype=torch.bfloat16, chunks=(rows, cols))
    outputs = 4 * (lr.numel() + lc.numel())
    assert fwd.peak_by_dtype[torch.bfloat16] <= (rows + cols) * D * 2, (fwd.peak_by_dtype, rows, cols)
    assert fwd.peak <= plan + outputs, (fwd.peak, plan, fwd.peak_by_dtype)

    monkeypatch.setenv("BIOCLIP_FAST_BWD", "gemm2d")
    r2, c2 = 96, 100
    monkeypatch.setattr(planner, "gemm2d_chunks", lambda *a, **kw: (r2, c2))
    with _LiveBytes()(q, k, scale, lr, lc) as bwd:
        CL.clip_sym_bwd(q, k, scale, None, lr, lc, 1.0, compute=torch.bfloat16)
    # the products' operands: one cast row chunk, one cast column chunk and the gradient tile workspace
    assert bwd.peak_by_dtype[torch.bfloat16] <= (r2 + c2) * D * 2 + r2 * c2 * 2, bwd.peak_by_dtype
