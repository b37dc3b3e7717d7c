"""`--device` values of the commands (eval, analyze, predict, embed, bench-loss): one resolver, checked before any
work, so a device that is not there is one line (`--device cuda: no CUDA GPU is available here ...`), never a
traceback from the first tensor moved to it."""
from __future__ import annotations

from typing import Any

from bioclip_fast.errors import UsageError


def resolve_device(spec: Any = None, *, flag: str = "--device", local_rank: int | None = None
                   ) -> "torch.device":  # noqa: F821
    """The torch.device `spec` names (None or "auto": cuda when available, else cpu); UsageError naming the flag for
    a malformed value or a device this machine does not have.

    `local_rank` (a process of a multi-GPU job): a CUDA device without an index ("auto", "cuda") is that rank's GPU,
    ``cuda:<local_rank>``; an explicit index is kept."""
    import torch

    if spec is None or str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {spec}: not a device (use cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"{flag} {spec}: MPS is not available here; use {flag} cpu")
    elif dev.type != "cpu":
        raise UsageError(f"{flag} {spec}: not supported (use cpu, cuda, cuda:N, mps or auto)")
    return dev
