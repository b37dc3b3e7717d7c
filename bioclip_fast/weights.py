"""Weight files read without unpickling arbitrary objects (``.safetensors``, or ``torch.load(weights_only=True)``),
the one-line reasons a file is refused, and the plain containers a checkpoint's metadata is stored as.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def plain_data(obj: Any) -> Any:
    """Meta as plain containers and scalars, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    if isinstance(obj, Mapping):
        return {str(k): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(plain_data(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalar
        return obj.item()
    if hasattr(obj, "to_dict"):
        return plain_data(obj.to_dict())
    return str(obj)  # Path, Enum, ...: their text


def read_weights_file(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """A weights file as a dict, never unpickling arbitrary objects: ``.safetensors`` via safetensors, anything else
    through ``torch.load(weights_only=True)`` (tensors, plain containers and scalars only)."""
    from bioclip_fast.errors import CheckpointError

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a weights file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"could not read {path}: {_first_line(e)}") from e
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - unsafe pickle, truncated zip, garbage bytes, ...
        if mmap and not isinstance(e, pickle.UnpicklingError):  # e.g. a legacy (non-zip) torch.save file
            return read_weights_file(path, mmap=False)
        raise CheckpointError(_unreadable_weights(path, e)) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def unpickled_objects(e: BaseException) -> str | None:
    """For torch.load(weights_only=True)'s refusal of a pickle that holds objects other than tensors: the object's
    name (or ""); None when the error says something else (random bytes, text, a truncated archive)."""
    import re

    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    if "unrecognized function" in text or "Unsupported class" in text:
        return ""
    return None


def pickled_objects_in(path: str | os.PathLike) -> str | None:
    """For a file torch's weights-only loader could not parse: when it is a complete pickle stream (read with
    pickletools, which executes nothing), the first global it imports outside torch/collections (or ""); None when it
    is not a pickle at all (random bytes, text)."""
    import pickletools

    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # PROTO: every pickle of protocol >= 2 (torch.save's) starts with it
                return None
            f.seek(0)
            strings: list[str] = []
            names: list[str] = []
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - not a (complete) pickle
        return None
    foreign = [n for n in names if not n.startswith(("torch.", "collections."))]
    return foreign[0] if foreign else ""


def _unreadable_weights(path: Path, e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file: objects it will not unpickle (named), or not a weights file
    at all (random bytes, text, a truncated archive)."""
    import re

    text = str(e)
    found = unpickled_objects(e)
    if found is None:
        found = pickled_objects_in(path)
    if found is not None:
        what = f" ({found})" if found else ""
        return (f"refusing to load {path}: it holds Python objects other than tensors and plain containers{what}, and "
                f"weights are never unpickled blindly; re-save it as a state dict or .safetensors")
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = reason.group(1).strip() if reason else _first_line(e)
    try:
        size = f"{path.stat().st_size} bytes"
    except OSError:
        size = "size unknown"
    return (f"{path} is not a readable checkpoint or weights file (not a torch.save archive of tensors, nor "
            f".safetensors; {size}; torch.load: {type(e).__name__}: {reason})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
