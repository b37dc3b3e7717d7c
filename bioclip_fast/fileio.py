"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer in the package that replaces a file goes through here. The new content is written to a temporary file
in the same directory (so ``os.replace`` is a rename on one filesystem), and the temporary file is removed if the
write fails. ``durable=True`` also fsyncs the file before the rename and the directory after it, so the new content
survives a power loss once the call returns (checkpoints, run metadata); without it the write is atomic but may be
lost to a crash of the machine, which is fine for caches and reports that can be rebuilt.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_path", "replace_file"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(path: str | os.PathLike, save: Callable[[Path], Any], *, durable: bool = False,
                mkdir: bool = True) -> Path:
    """Replace ``path`` by what ``save(tmp)`` writes to a temporary path beside it (``torch.save``, ``np.save`` …).

    The new file gets the mode a plain ``open(path, "w")`` would (0666 less the umask). ``save`` must write
    exactly the path it is given: numpy's savers add ``.npy`` / ``.npz`` to a name without it, so for those two
    suffixes the temporary name keeps it. Every other temporary name ends in ``.tmp``, so a file left by a killed
    job is never taken for a finished one by a scan by extension (a directory of ``.tar`` shards).
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would make every index, manifest and checkpoint unreadable to the other
    # users of a shared cluster filesystem. O_EXCL with 0666 & ~umask gives what a plain open() would.
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{_kept_suffix(path)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        save(tmp)
        replace_file(tmp, path, durable=durable)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _kept_suffix(path: Path) -> str:
    return path.suffix if path.suffix in (".npy", ".npz") else ""


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike, *, durable: bool = False) -> Path:
    """Rename the finished temporary file ``tmp`` (in ``path``'s directory) over ``path``: the last step of
    :func:`atomic_save`, for writers that stream into a temporary file of their own over a long job (a memmap, parquet
    row groups) and replace the file once at the end. ``durable`` fsyncs the file before and the directory after."""
    path = Path(path)
    if durable:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False, mkdir: bool = True) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_bytes(data), durable=durable, mkdir=mkdir)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False, mkdir: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable, mkdir=mkdir)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, durable: bool = False, mkdir: bool = True,
                      **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` written atomically (a trailing newline when ``indent`` is given)."""
    text = json.dumps(obj, **dumps_kwargs)
    if dumps_kwargs.get("indent") is not None:
        text += "\n"
    return atomic_write_text(path, text, durable=durable, mkdir=mkdir)
