"""Atomic, verified, resumable training checkpoints for both engines: the on-disk format, writing, verification,
selection and loading. When to save, what to keep and what to resume from is the run's
:class:`~bioclip_fast.train.checkpointer.Checkpointer`.

Layout of a run directory::

    checkpoints/step_00000100/     one complete checkpoint (only ever created by a rename)
        state.pt                   torch engine: model, optimizer, scheduler
        <DeepSpeed tag files>      deepspeed engine: engine.save_checkpoint(..., tag) output (per-rank shards)
        trainer_rank{r}.pt         step, epoch, data-loader position, RNG states, elapsed time (one per rank)
        meta.json                  step, engine, world size, config, run fingerprint
        manifest.json              size and sha256 of every other file; written last
    checkpoints/latest             name of the newest complete checkpoint (replaced atomically; a hint for people)
    checkpoints/corrupt-step_…     checkpoints that failed verification on resume (kept, never read again)

Writing goes to ``checkpoints/.tmp-step_…``: every rank writes its files, the ranks agree that all writes
succeeded, the files are hashed (each rank hashes a share), ``manifest.json`` is written, everything is fsync'ed,
then the directory is renamed into place and ``latest`` is rewritten with ``os.replace``. A crash at any point
leaves either the previous checkpoint or the new one complete — never a half-written one under a ``step_`` name.
Before writing, the free space is checked against the expected size (the previous checkpoint's, or an estimate);
a write that fails (ENOSPC, ...) removes its temp directory and raises :class:`CheckpointError` naming the path and
the bytes needed. Stale ``.tmp-*`` directories are removed when a run starts (:func:`remove_stale_temp`).

Resuming picks the newest checkpoint by step whose files match its manifest (:func:`select_checkpoint`), naming
each one it skips and why.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bioclip_fast.distributed import all_gather_objects, broadcast_object, first_error
from bioclip_fast.errors import CheckpointError
from bioclip_fast.fileio import atomic_write_text, fsync_path

LATEST = "latest"
PREFIX = "step_"
MANIFEST = "manifest.json"
META = "meta.json"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"
SUPERSEDED_PREFIX = "superseded-"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 8 << 20
_SPACE_MARGIN = 1.10  # need the expected size plus 10%: sizes vary a little (pickled RNG states, metadata)


def ckpt_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def ckpt_step(path: str | os.PathLike) -> int | None:
    """The step of a ``step_NNNNNNNN`` directory name, or None for any other name."""
    name = Path(path).name
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


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


# ------------------------------------------------------------------------------------------ collectives (no-ops alone)
def _agree(info, error: str | None) -> None:
    """Collective: raise the first rank's error on every rank (so no rank is left waiting in the next collective)."""
    error = first_error(error, info)
    if error:
        from bioclip_fast.train.failures import mark_every_rank

        raise mark_every_rank(CheckpointError(error))


# ------------------------------------------------------------------------------------------ sizes, hashes, disk space
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(root: Path, names: list[str], info) -> dict[str, str]:
    """sha256 of `names` under `root`; rank r hashes every world_size-th file (a sharded checkpoint is hashed in
    parallel). Collective; returns the full map on every rank. Unreadable files map to an 'error: …' string."""
    mine: dict[str, str] = {}
    for i, name in enumerate(names):
        if i % info.world_size == info.rank:
            try:
                mine[name] = file_sha256(root / name)
            except OSError as e:
                mine[name] = f"error: {e.strerror or e}"
    out: dict[str, str] = {}
    for part in all_gather_objects(mine, info):
        out.update(part)
    return out


def _list_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def check_free_space(root: Path, name: str, expected_bytes: int | None) -> str | None:
    """None if `root` has room for a checkpoint of `expected_bytes`; else the one-line reason."""
    if not expected_bytes:
        return None
    need = int(expected_bytes * _SPACE_MARGIN)
    free = free_bytes(root)
    if free >= need:
        return None
    return (f"not enough free space for checkpoint {name} in {root}: needs ~{_fmt_bytes(need)} ({need} bytes), "
            f"{_fmt_bytes(free)} free (ENOSPC). Free some space or lower --keep-checkpoints, then continue with "
            f"--resume auto; the previous checkpoint is intact")


def file_size_limit() -> int | None:
    """The process's file size limit in bytes (`ulimit -f`, RLIMIT_FSIZE), None when unlimited."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _write_error(path: Path, exc: BaseException, expected_bytes: int | None) -> str:
    """One line for a failed checkpoint write; a full disk (ENOSPC, or torch's opaque stream errors on a disk with
    too little room) names the path and the bytes needed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    limit = file_size_limit()
    if (isinstance(exc, OSError) and exc.errno == errno.EFBIG) or (limit is not None and _size(path) >= limit):
        # torch's writer says "[enforce fail at inline_container.cc] unexpected pos ..." for this (Python ignores
        # SIGXFSZ, so the write fails with EFBIG instead of killing the process)
        cap = f" of {_fmt_bytes(limit)} ({limit} bytes)" if limit is not None else ""
        return (f"file size limit{cap} reached writing checkpoint file {path} (EFBIG; `ulimit -f`, RLIMIT_FSIZE): "
                f"raise the limit for the job. The partial checkpoint was removed and the previous one is intact; "
                f"continue with --resume auto")
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and expected_bytes:
        try:
            full = free_bytes(path.parent) < int(expected_bytes * _SPACE_MARGIN)
        except OSError:
            pass
    if full:
        need = int((expected_bytes or 0) * _SPACE_MARGIN)
        hint = f"; the checkpoint needs ~{_fmt_bytes(need)} ({need} bytes)" if need else ""
        return (f"no space left on device writing checkpoint file {path} (ENOSPC){hint}, "
                f"{_fmt_bytes(free_bytes(path.parent))} free. The partial checkpoint was removed and the previous "
                f"one is intact: free some space, then continue with --resume auto")
    return f"writing checkpoint file {path} failed: {text}"


def estimate_state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: the size of a torch.save of it, less a little metadata."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(estimate_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(estimate_state_bytes(v) for v in obj)
    return 0


# ------------------------------------------------------------------------------------------ writing
def save_checkpoint(
    ckpt_root: str | os.PathLike,
    engine,
    *,
    step: int,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
    expected_bytes: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it). Returns the final directory.

    `expected_bytes`: the checkpoint's expected size, checked against the free space before anything is written.
    Raises CheckpointError (on every rank) when there is no room or a write fails; nothing partial is left behind.
    """
    root = Path(ckpt_root)
    info = engine.info
    name = ckpt_name(step)
    tmp_name = f"{TMP_PREFIX}{name}"
    tmp = root / tmp_name
    final = root / name
    err = None
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            err = check_free_space(root, name, expected_bytes)
            if err is None:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
        except OSError as e:
            err = _write_error(tmp, e, expected_bytes)
    _agree(info, err)

    # every rank writes its files; a failure on any rank is raised on all of them (no rank hangs in a collective)
    current = tmp
    err = None
    try:
        if engine.kind == "deepspeed":
            # DeepSpeed writes its own per-rank shards into <root>/<tag>; our `latest` replaces its pointer.
            engine.engine.save_checkpoint(str(root), tag=tmp_name, save_latest=False)
        elif info.is_main:
            current = tmp / "state.pt"
            torch.save(engine.state_dict(), current)
        current = tmp / f"trainer_rank{info.rank}.pt"
        torch.save({**trainer_state, "rng": rng_state()}, current)
        if info.is_main:
            current = tmp / META
            current.write_text(json.dumps({**meta, "step": step, "engine": engine.kind,
                                           "world_size": info.world_size}, indent=1, default=str))
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError('... iostream error')
        err = _write_error(current, e, expected_bytes)
    try:
        _agree(info, err)
    except CheckpointError:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    # sizes and checksums of every file, then the manifest (last), fsync, rename, `latest`, retention
    names = broadcast_object(_list_files(tmp) if info.is_main else None, info)
    digests = _hash_files(tmp, names, info)
    err = None
    if info.is_main:
        try:
            files = {n: {"size": (tmp / n).stat().st_size, "sha256": digests[n]} for n in names}
            bad = [n for n, d in digests.items() if d.startswith("error:")]
            if bad:
                raise OSError(errno.EIO, f"cannot read back {bad[0]}: {digests[bad[0]]}", str(tmp / bad[0]))
            manifest = {"format": MANIFEST_FORMAT, "step": step, "algorithm": "sha256",
                        "total_bytes": sum(f["size"] for f in files.values()), "files": files}
            current = tmp / MANIFEST
            current.write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(root)
            atomic_write_text(root / LATEST, name + "\n", durable=True)
            _prune(root, keep, final)
        except (OSError, RuntimeError) as e:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            err = _write_error(current, e, expected_bytes)
    _agree(info, err)
    return final


def checkpoint_bytes(ckpt_dir: str | os.PathLike) -> int | None:
    """Total size recorded in a checkpoint's manifest (None when it has none)."""
    try:
        return int(json.loads((Path(ckpt_dir) / MANIFEST).read_text())["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-by-name checkpoint directories under `root`, newest step first (ordered by step, not by name)."""
    root = Path(root)
    found = [(s, d) for d in root.glob(f"{PREFIX}*") if d.is_dir() and (s := ckpt_step(d)) is not None]
    return [d for _, d in sorted(found, key=lambda t: t[0], reverse=True)]


def _prune(root: Path, keep: int, just_written: Path | None = None) -> None:
    """Keep the `keep` newest checkpoints by step; never the one just written."""
    for d in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)
    done = list_checkpoints(root)
    if just_written is not None:
        done = [d for d in done if d != just_written]
        keep -= 1
    for d in done[max(keep, 0):]:
        shutil.rmtree(d, ignore_errors=True)


def remove_stale_temp(root: str | os.PathLike) -> list[Path]:
    """Remove the temp directories/files of checkpoint writes that never finished (run at start, rank 0 only)."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in sorted(root.glob(f"{TMP_PREFIX}*")) + sorted(root.glob(f".{LATEST}.*tmp*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------ verification & selection
def _cheap_check(d: Path) -> tuple[str | None, list[str], dict[str, Any] | None]:
    """(reason it is unusable or None, files to hash, manifest) from existence, JSON and sizes alone."""
    meta_p = d / META
    if not meta_p.is_file():
        return f"{META} is missing", [], None
    man_p = d / MANIFEST
    if not man_p.is_file():
        # the manifest is written last, so a checkpoint without one never finished (or lost it): nothing in it can be
        # verified, and one rank's files may be unusable while another's load. Skipped like a bad checksum.
        return f"{MANIFEST} is missing (an incomplete checkpoint: its files cannot be verified)", [], None
    try:
        man = json.loads(man_p.read_text())
        files = man["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({' '.join(str(e).split())})", [], None
    for name, rec in sorted(files.items()):
        p = d / name
        if not p.is_file():
            return f"{name} is missing", [], None
        size = p.stat().st_size
        if size != rec.get("size"):
            what = "truncated" if size < rec.get("size", 0) else "longer than written"
            return f"{name} is {size} bytes, the manifest says {rec.get('size')} ({what})", [], None
    return None, sorted(files), man


def verify_checkpoint(d: str | os.PathLike, info=None) -> str | None:
    """None if every file of checkpoint `d` has the size and sha256 its manifest records; else the reason.

    Collective when `info` describes several ranks (each hashes a share)."""
    from bioclip_fast.distributed import DistInfo

    info = info or DistInfo()
    d = Path(d)
    reason, names, man = broadcast_object(_cheap_check(d) if info.is_main else None, info)
    if reason or not names:
        return reason
    digests = _hash_files(d, names, info)
    for n in names:
        want = man["files"][n].get("sha256")
        if digests.get(n) != want:
            got = digests.get(n, "")
            return (f"{n} cannot be read ({got[7:]})" if got.startswith("error:")
                    else f"{n} does not match its checksum (sha256 {got[:12]}…, the manifest says {str(want)[:12]}…)")
    return None


def select_checkpoint(spec: str | os.PathLike, info=None, *, log: Callable[[str], None] | None = None
                      ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint under a run dir, a checkpoints dir or a checkpoint dir, and the ones skipped.

    Returns (checkpoint or None when there is none at all, [(skipped dir, why)]). A checkpoint dir given directly is
    the only candidate. Collective (every rank calls it; the answer is the same on all).
    """
    from bioclip_fast.distributed import DistInfo

    info = info or DistInfo()
    p = Path(spec)
    if ckpt_step(p) is not None and p.is_dir():
        cands = [p]
    else:
        cands = []
        for root in (p / "checkpoints", p):
            cands = list_checkpoints(root)
            if cands:
                break
    cands = broadcast_object([str(c) for c in cands] if info.is_main else None, info)
    skipped: list[tuple[Path, str]] = []
    for c in map(Path, cands):
        reason = verify_checkpoint(c, info)
        if reason is None:
            return c, skipped
        skipped.append((c, reason))
        if log is not None:
            log(f"skipping checkpoint {c}: {reason}")
    return None, skipped


def find_checkpoint(spec: str | os.PathLike) -> Path | None:
    """Resolve a run dir, a checkpoints dir or a checkpoint dir to the newest checkpoint by step that has a
    meta.json (no checksum verification; see :func:`select_checkpoint`), or None."""
    p = Path(spec)
    if (p / META).is_file() and ckpt_step(p) is not None:
        return p
    for root in (p / "checkpoints", p):
        done = [d for d in list_checkpoints(root) if (d / META).is_file()]
        if done:
            return done[0]
    return None


def read_meta(d: str | os.PathLike) -> dict[str, Any]:
    path = Path(d) / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d}: cannot read {META}: {' '.join(str(e).split())}") from e


def _torch_load(path: Path, map_location) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {path}") from e
    except Exception as e:  # a corrupt pickle/zip surfaces as many exception types
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from e


def load_checkpoint(ckpt_dir: str | os.PathLike, engine) -> dict[str, Any]:
    """Restore engine state (model, optimizer, scheduler) and return this rank's trainer state (RNG restored).

    Collective: a rank that cannot load raises its error on every rank (no rank trains on from a checkpoint another
    rank could not read)."""
    err, state = None, None
    try:
        state = _load_checkpoint(Path(ckpt_dir), engine)
    except CheckpointError as e:
        err = f"rank {engine.info.rank}: {e}" if engine.info.distributed else str(e)
    _agree(engine.info, err)
    return state


def _load_checkpoint(d: Path, engine) -> dict[str, Any]:
    meta = read_meta(d)
    info = engine.info
    if meta.get("engine") != engine.kind:
        raise CheckpointError(f"checkpoint {d} was written by the {meta.get('engine')} engine; this run uses "
                              f"{engine.kind}")
    if meta.get("world_size") != info.world_size:
        raise CheckpointError(
            f"checkpoint {d} was written with world size {meta.get('world_size')}; this run has {info.world_size} "
            f"(exact resume needs the same world size and data sharding)"
        )
    if engine.kind == "deepspeed":
        try:
            load_path, _ = engine.engine.load_checkpoint(str(d.parent), tag=d.name)
        except Exception as e:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {d}: {' '.join(str(e).split())[:300]}") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {d}")
    else:
        state = _torch_load(d / "state.pt", engine.device)
        try:
            engine.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {d / 'state.pt'} does not fit this model/optimizer: "
                                  f"{' '.join(str(e).split())[:300]}") from e
    trainer = _torch_load(d / f"trainer_rank{info.rank}.pt", "cpu")
    if not isinstance(trainer, dict) or "rng" not in trainer or "step" not in trainer:
        raise CheckpointError(f"checkpoint file {d / f'trainer_rank{info.rank}.pt'} is not a trainer state")
    set_rng_state(trainer.pop("rng"))
    return trainer
