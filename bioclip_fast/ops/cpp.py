"""The C++/OpenMP CPU backend (``bioclip_fast._C``, sources in ``csrc/``) behind the reference's signatures.

The kernels compute in fp32 over raw fp32 buffers: bf16/fp16 features are upcast here once (O(B·D) extra memory,
negligible next to the O(B²·D) work), and ``dq``/``dk`` are cast back to the input dtype. The scale and bias are
read as Python floats (free on CPU tensors). Thread count follows ``torch.get_num_threads()``, so
``torch.set_num_threads`` governs both torch and these kernels (they link their own OpenMP runtime).

ISA variants: ``bioclip_fast._C`` (baseline x86-64) and ``bioclip_fast._C_avx2`` (AVX2 + FMA) are built from the
same sources; the AVX2 one is loaded only when cpuid says the CPU has both features (``BIOCLIP_FAST_CPU_ISA=
baseline`` forces the baseline). float64 features never reach this backend (dispatch sends them to the reference).
"""
from __future__ import annotations

import importlib
import os

import torch

_C = None
ISA_ENV = "BIOCLIP_FAST_CPU_ISA"


def select_module(base, forced: str | None = None):
    """The fastest kernel module this CPU can run: ``_C_avx2`` when cpuid reports AVX2 and FMA, else ``base``."""
    forced = (forced if forced is not None else os.environ.get(ISA_ENV, "auto")).strip().lower()
    if forced not in ("auto", "baseline", "avx2"):
        raise ValueError(f"{ISA_ENV} must be auto, baseline or avx2, got {forced!r}")
    if forced == "baseline":
        return base
    if base.cpu_supports("avx2") and base.cpu_supports("fma"):
        try:
            return importlib.import_module("bioclip_fast._C_avx2")
        except ImportError:
            if forced == "avx2":
                raise
            return base
    if forced == "avx2":
        raise ImportError("BIOCLIP_FAST_CPU_ISA=avx2 but this CPU lacks AVX2/FMA (cpuid)")
    return base


def check_available() -> None:
    global _C
    if _C is None:
        from bioclip_fast import _C as base

        if not hasattr(base, "clip_sym_fwd") or not hasattr(base, "cpu_supports"):
            raise ImportError("bioclip_fast._C is out of date or was built without the loss kernels; run `make build`")
        _C = select_module(base)


def isa() -> str:
    """Instruction set of the loaded kernels ("avx2+fma", "x86-64" or "generic")."""
    check_available()
    return _C.isa()


def _f32(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"the C++ backend needs CPU tensors, got {x.device}")
    return x.detach().to(torch.float32).contiguous()


def _sb(scale: torch.Tensor, bias: torch.Tensor | None) -> tuple[float, float]:
    return float(scale.reshape(())), (0.0 if bias is None else float(bias.reshape(())))


def _threads() -> int:
    return torch.get_num_threads()


def _grads(q, k, scale, bias, dq, dk, ds, db):
    dscale = torch.tensor(ds, dtype=torch.float32).reshape(scale.shape)
    dbias = None if bias is None else torch.tensor(db, dtype=torch.float32).reshape(bias.shape)
    return (None if dq is None else dq.to(q.dtype)), (None if dk is None else dk.to(k.dtype)), dscale, dbias


def clip_sym_fwd(q, k, scale, bias):
    check_available()
    qf, kf = _f32(q), _f32(k)
    B, D = qf.shape
    s, b = _sb(scale, bias)
    lse_row = torch.empty(B, dtype=torch.float32)
    lse_col = torch.empty(B, dtype=torch.float32)
    loss = _C.clip_sym_fwd(qf.data_ptr(), kf.data_ptr(), B, D, s, b, lse_row.data_ptr(), lse_col.data_ptr(), _threads())
    return torch.tensor(loss, dtype=torch.float32), lse_row, lse_col


def _outs(qf, kf, need_q, need_k):
    dq = torch.empty_like(qf) if need_q else None
    dk = torch.empty_like(kf) if need_k else None
    return dq, dk, (dq.data_ptr() if need_q else 0), (dk.data_ptr() if need_k else 0)


def clip_sym_bwd(q, k, scale, bias, lse_row, lse_col, grad_loss, need_q: bool = True, need_k: bool = True):
    check_available()
    qf, kf = _f32(q), _f32(k)
    B, D = qf.shape
    s, b = _sb(scale, bias)
    lr, lc = lse_row.float().contiguous(), lse_col.float().contiguous()
    dq, dk, pq, pk = _outs(qf, kf, need_q, need_k)
    ds, db = _C.clip_sym_bwd(
        qf.data_ptr(), kf.data_ptr(), B, D, s, b, lr.data_ptr(), lc.data_ptr(), float(grad_loss), pq, pk, _threads(),
        need_q, need_k,
    )
    return _grads(q, k, scale, bias, dq, dk, ds, db)


def clip_dir_fwd(q, k, scale, bias, offset):
    check_available()
    qf, kf = _f32(q), _f32(k)
    (Bq, D), Bk = qf.shape, kf.shape[0]
    s, b = _sb(scale, bias)
    lse = torch.empty(Bq, dtype=torch.float32)
    loss = _C.clip_dir_fwd(qf.data_ptr(), kf.data_ptr(), Bq, Bk, D, s, b, int(offset), lse.data_ptr(), _threads())
    return torch.tensor(loss, dtype=torch.float32), lse


def clip_dir_bwd(q, k, scale, bias, lse, offset, grad_loss, need_q: bool = True, need_k: bool = True):
    check_available()
    qf, kf = _f32(q), _f32(k)
    (Bq, D), Bk = qf.shape, kf.shape[0]
    s, b = _sb(scale, bias)
    lse = lse.float().contiguous()
    dq, dk, pq, pk = _outs(qf, kf, need_q, need_k)
    ds, db = _C.clip_dir_bwd(
        qf.data_ptr(), kf.data_ptr(), Bq, Bk, D, s, b, lse.data_ptr(), int(offset), float(grad_loss), pq, pk,
        _threads(), need_q, need_k,
    )
    return _grads(q, k, scale, bias, dq, dk, ds, db)


def siglip_fwd(q, k, scale, bias, offset):
    check_available()
    qf, kf = _f32(q), _f32(k)
    (Bq, D), Bk = qf.shape, kf.shape[0]
    s, b = _sb(scale, bias)
    loss = _C.siglip_fwd(qf.data_ptr(), kf.data_ptr(), Bq, Bk, D, s, b, int(offset), _threads())
    return torch.tensor(loss, dtype=torch.float32)


def siglip_bwd(q, k, scale, bias, offset, grad_loss, need_q: bool = True, need_k: bool = True):
    check_available()
    qf, kf = _f32(q), _f32(k)
    (Bq, D), Bk = qf.shape, kf.shape[0]
    s, b = _sb(scale, bias)
    dq, dk, pq, pk = _outs(qf, kf, need_q, need_k)
    ds, db = _C.siglip_bwd(
        qf.data_ptr(), kf.data_ptr(), Bq, Bk, D, s, b, int(offset), float(grad_loss), pq, pk, _threads(), need_q,
        need_k,
    )
    return _grads(q, k, scale, bias, dq, dk, ds, db)
