"""Atomic, resumable training checkpoints for both engines.

Layout of a run directory::

    checkpoints/step_00000100/     one complete checkpoint (only ever created by a rename)
        state.pt                   torch engine: model, optimizer, scheduler
        <DeepSpeed tag files>      deepspeed engine: engine.save_checkpoint(..., tag) output (per-rank shards)
        trainer_rank{r}.pt         step, epoch, data-loader position, RNG states, elapsed time (one per rank)
        meta.json                  step, engine, world size, config
    checkpoints/latest             name of the newest complete checkpoint (replaced atomically)

Writing goes to ``checkpoints/.tmp-step_…``; every file and the directory are fsync'ed, then the directory is
renamed into place and ``latest`` is rewritten with ``os.replace``. A crash at any point leaves either the previous
checkpoint as ``latest`` or the new one — never a half-written one. Leftover ``.tmp-*`` directories are ignored
(and removed by the next save).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
PREFIX = "step_"


def ckpt_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_file(path.parent)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(info) -> None:
    if info.distributed:
        torch.distributed.barrier()


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    engine,
    *,
    step: int,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it). Returns the final directory."""
    root = Path(ckpt_root)
    info = engine.info
    name = ckpt_name(step)
    tmp_name = f".tmp-{name}"
    tmp = root / tmp_name
    final = root / name
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(info)
    if engine.kind == "deepspeed":
        # DeepSpeed writes its own per-rank shards into <root>/<tag>; our `latest` replaces its pointer.
        engine.engine.save_checkpoint(str(root), tag=tmp_name, save_latest=False)
    elif info.is_main:
        torch.save(engine.state_dict(), tmp / "state.pt")
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{info.rank}.pt")
    _barrier(info)
    if info.is_main:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "engine": engine.kind,
                                                   "world_size": info.world_size}, indent=1, default=str))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_file(root)
        _atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep)
    _barrier(info)
    return final


def _prune(root: Path, keep: int) -> None:
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    done = sorted(d for d in root.glob(f"{PREFIX}*") if d.is_dir())
    for d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def find_checkpoint(spec: str | os.PathLike) -> Path | None:
    """Resolve a run dir, a checkpoints dir or a checkpoint dir to the newest complete checkpoint (or None)."""
    p = Path(spec)
    if (p / "meta.json").is_file() and p.name.startswith(PREFIX):
        return p
    for root in (p / "checkpoints", p):
        latest = root / LATEST
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / "meta.json").is_file():
                return cand
        done = sorted(d for d in root.glob(f"{PREFIX}*") if (d / "meta.json").is_file())
        if done:
            return done[-1]
    return None


def load_checkpoint(ckpt_dir: str | os.PathLike, engine) -> dict[str, Any]:
    """Restore engine state (model, optimizer, scheduler) and return this rank's trainer state (RNG restored)."""
    d = Path(ckpt_dir)
    meta = json.loads((d / "meta.json").read_text())
    info = engine.info
    if meta.get("engine") != engine.kind:
        raise ValueError(f"checkpoint {d} was written by the {meta.get('engine')} engine; this run uses {engine.kind}")
    if meta.get("world_size") != info.world_size:
        raise ValueError(
            f"checkpoint {d} was written with world size {meta.get('world_size')}; this run has {info.world_size} "
            f"(exact resume needs the same world size and data sharding)"
        )
    if engine.kind == "deepspeed":
        load_path, _ = engine.engine.load_checkpoint(str(d.parent), tag=d.name)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {d}")
    else:
        engine.load_state_dict(torch.load(d / "state.pt", map_location=engine.device, weights_only=False))
    trainer = torch.load(d / f"trainer_rank{info.rank}.pt", map_location="cpu", weights_only=False)
    set_rng_state(trainer.pop("rng"))
    return trainer
