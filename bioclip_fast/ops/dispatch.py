"""Backend choice for the loss primitives.

``auto``: CUDA tensors -> Triton, CPU tensors -> the C++ OpenMP kernels (``bioclip_fast._C``); where the preferred
backend cannot load, the torch chunked reference (with one warning saying why). ``triton`` (CUDA, or CPU under
``TRITON_INTERPRET=1``), ``cpp`` (CPU only) and ``torch`` (the reference, any device) force one backend.
The environment variable ``BIOCLIP_FAST_BACKEND`` replaces ``auto`` when set, so a run can be switched without
code changes.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections import Counter
from types import SimpleNamespace

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
ENV_VAR = "BIOCLIP_FAST_BACKEND"
PRIMITIVES = ("clip_sym_fwd", "clip_sym_bwd", "clip_dir_fwd", "clip_dir_bwd", "siglip_fwd", "siglip_bwd")

_cache: dict[str, SimpleNamespace | Exception] = {}
# Concrete backends the ops ran, with call counts (one per primitive call): a benchmark resets it and reads which
# implementation it timed, so a fallback is never labelled as the kernel it replaced.
CALLS: Counter = Counter()
_warned: set[str] = set()


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _load(name: str) -> SimpleNamespace:
    """Import one backend's six primitives; the exception is cached so a missing backend is probed once."""
    if name not in _cache:
        try:
            if name == "torch":
                from bioclip_fast.ops import reference as mod

                _cache[name] = SimpleNamespace(**{p: getattr(mod, p) for p in PRIMITIVES})
            elif name == "cpp":
                from bioclip_fast.ops import cpp as mod

                mod.check_available()
                _cache[name] = SimpleNamespace(**{p: getattr(mod, p) for p in PRIMITIVES})
            elif name == "triton":
                clip = importlib.import_module("bioclip_fast.kernels.clip_loss")
                sig = importlib.import_module("bioclip_fast.kernels.siglip_loss")
                fns = {p: getattr(sig if p.startswith("siglip") else clip, p) for p in PRIMITIVES}
                _cache[name] = SimpleNamespace(**fns)
            else:  # pragma: no cover - guarded by check_backend
                raise ValueError(name)
        except Exception as exc:  # noqa: BLE001 - reported to the caller below
            _cache[name] = exc
    return _cache[name]


def available(name: str) -> bool:
    return not isinstance(_load(name), Exception)


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for ``backend`` on ``device`` (``auto`` honours ``BIOCLIP_FAST_BACKEND``).

    float64 features always take the torch reference (it computes in float64; the kernels are fp32 at most), so
    open_clip users passing float64 features get float64 results rather than an error.
    """
    check_backend(backend)
    if dtype == torch.float64:
        return "torch"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend != "auto":
        if backend == "cpp" and device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors only, got tensors on {device}")
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return backend
    preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
    if preferred != "torch" and not available(preferred):
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(
                f"bioclip_fast: {preferred} loss backend unavailable ({_load(preferred)!r}); "
                "falling back to the torch chunked reference",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    return preferred


def get(backend: str) -> SimpleNamespace:
    """The primitives of a concrete backend (raises with the import error if it cannot load)."""
    impl = _load(backend)
    if isinstance(impl, Exception):
        raise RuntimeError(f"bioclip_fast: loss backend {backend!r} is unavailable: {impl!r}") from impl
    CALLS[backend] += 1
    return impl
