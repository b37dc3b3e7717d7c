"""Run-directory safety and resume guards.

- :func:`validate_run_dir`: a non-empty ``--out`` is refused unless the run is continued (``--resume auto``) or
  deliberately replaced (``--overwrite``); ``--out`` naming a file or an unwritable place is refused up front.
- :func:`prepare_run_dir` (rank 0, at start): ``--overwrite`` removes the previous run's outputs; temp directories of
  checkpoint writes that never finished are removed.
- :func:`truncate_jsonl`: on resume ``metrics.jsonl`` / ``evals.jsonl`` are cut back to the checkpoint's step, so
  every step appears once.
- :func:`config_fingerprint` / :func:`data_fingerprint`: everything that changes a run (model, data shard identities
  and class index, optimizer and schedule settings, batch, seed, text types, preset, engine/ZeRO stage); stored in
  each checkpoint's ``meta.json`` and compared on resume (:func:`fingerprint_changes`). A difference is refused
  with the list of changed keys unless named in ``--allow-changed`` (e.g. a longer ``--max-steps``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bioclip_fast.distributed import DistInfo, broadcast_object
from bioclip_fast.errors import one_line
from bioclip_fast.fileio import atomic_write_json, atomic_write_text
from bioclip_fast.train import checkpoint as ckpt
from bioclip_fast.train import runlock
from bioclip_fast.train.config import ConfigError, TrainConfig
from bioclip_fast.train.failures import mark_every_rank

log = logging.getLogger("bioclip_fast.train")

# Files a run writes into its --out (what --overwrite removes; anything else there is left alone).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "evals.jsonl", "results.json", "model.pt", "loss.png", "config.json",
               "tensorboard", "wandb", "wandb_run_id")

# Settings that may differ between a checkpoint and the run that resumes it: where and how often things are written,
# evaluation, logging, threads/workers and devices, and memory/speed options that do not change the numbers.
# `data`, `replay_data` (+ `*_files`) and `deepspeed_config` are compared by identity/content rather than by path.
RUNTIME_KEYS = frozenset({
    "out", "resume", "overwrite", "allow_changed", "save_every", "keep_checkpoints", "log_every", "eval_at_end",
    "eval_every", "eval_text_types", "eval_templates", "val_data", "peak_tflops", "progress", "threads",
    "num_workers", "device", "nonfinite", "max_nonfinite_skips", "collapse_window", "grad_checkpointing",
    "channels_last", "pretrained", "data", "replay_data", "deepspeed_config", "engine", "zero_stage", "max_minutes",
    "max_bad_fraction", "report_to", "wandb_project",
})


def fingerprint_keys() -> set[str]:
    """Keys compared on resume (what --allow-changed accepts)."""
    keys = {f.name for f in fields(TrainConfig)} - RUNTIME_KEYS
    return keys | {"engine", "zero_stage", "max_minutes", "deepspeed_config", *DATA_KEYS}


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_fingerprint(cfg: dict[str, Any], engine_kind: str) -> dict[str, Any]:
    """The config part of the run fingerprint (known before any model or data is built)."""
    fp = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    fp["engine"] = engine_kind
    fp["zero_stage"] = (cfg.get("zero_stage") if cfg.get("zero_stage") is not None else 2) \
        if engine_kind == "deepspeed" else None
    if cfg.get("schedule_clock") == "time":  # the time budget is the schedule's length; otherwise just a stop rule
        fp["max_minutes"] = cfg.get("max_minutes")
    ds = cfg.get("deepspeed_config")
    if ds:
        try:
            fp["deepspeed_config"] = _sha256_text(Path(ds).read_text())
        except OSError:
            fp["deepspeed_config"] = f"unreadable: {ds}"
    else:
        fp["deepspeed_config"] = None
    return json.loads(json.dumps(fp, default=str))  # JSON-normalized (tuples -> lists), as stored in meta.json


def _shard_identity(source) -> str:
    """sha256 over each shard's name, sample count and file size, and the class index (labels in order).

    O(number of shards) stat calls and O(classes) hashing: no shard is read. Shards regenerated with the same names
    and counts but other content differ in size (JPEG bytes) or classes."""
    h = hashlib.sha256()
    for p, n in zip(source.paths, source.counts):
        try:
            size = os.stat(p).st_size
        except OSError:  # remote (pipe:, s3://) shards: name and count only
            size = -1
        h.update(f"{os.path.basename(p)}\t{int(n)}\t{size}\n".encode())
    for c in getattr(source, "classes", None) or []:
        h.update(f"{getattr(c, 'label', c)}\n".encode())
    return h.hexdigest()


def _shard_files(source) -> str:
    """sha256 over each shard's name and content token (size and a digest of its first tar header,
    `ShardSet.content_tokens`): a shard rewritten in place with another of the same size differs here, a shard
    restored with its old content does not. A stat per shard; no shard is read unless it changed since indexing."""
    h = hashlib.sha256()
    for p, token in zip(source.paths, source.content_tokens()):
        h.update(f"{os.path.basename(p)}\t{token}\n".encode())
    return h.hexdigest()


# the data keys of the fingerprint (compared once the loader is built); `*_files` are absent from the checkpoints of
# older versions, which are then compared on the other keys only
DATA_KEYS = ("data", "replay_data", "data_files", "replay_data_files")


def data_fingerprint(loader) -> dict[str, Any]:
    """The data part of the run fingerprint (needs the built loader)."""
    if loader is None:
        return {}
    replay = getattr(loader, "replay_source", None)
    return {"data": _shard_identity(loader.source), "replay_data": _shard_identity(replay) if replay else None,
            "data_files": _shard_files(loader.source), "replay_data_files": _shard_files(replay) if replay else None}


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:16] + "…" + s[-8:]


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys present in both fingerprints whose values differ, sorted."""
    return sorted(k for k in old.keys() & new.keys() if old[k] != new[k])


def describe_changes(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    parts = []
    for k in keys:
        if k in ("data", "replay_data"):
            parts.append(f"{k} (shard names, sample counts, sizes or classes differ)")
        elif k in ("data_files", "replay_data_files"):
            parts.append(f"{k} (shard files were rewritten with other content: their first tar headers differ)")
        elif k == "deepspeed_config":
            parts.append(f"{k} (file content differs)")
        else:
            parts.append(f"{k} {_short(old[k])} -> {_short(new[k])}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ --out checks
def _inside(path: str | os.PathLike, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _describe_run(out: Path) -> str:
    ckpts = ckpt.list_checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else []
    bits = []
    if ckpts:
        bits.append(f"checkpoint {ckpts[0].name}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        bits.append("metrics.jsonl")
    if (out / "model.pt").is_file():
        bits.append("model.pt")
    if not bits:
        names = sorted(p.name for p in out.iterdir())
        bits.append(", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    return ", ".join(bits)


def validate_run_dir(cfg: TrainConfig) -> None:
    """Refuse an --out that is a file, cannot be written, or already holds something (unless resuming/overwriting).

    Runs on every rank before the process group exists, so no rank can have written into --out yet; every rank
    asks whether another run holds its lock, so all refuse alike. (A job's previous Trainer in the same process
    released its lock on rank 0 before its last barrier: ``Trainer._end_run``.)"""
    if cfg.out is None:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file, not a directory; give a directory for the run's outputs")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"out: cannot create {out}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out: cannot write {out}: {probe} is not writable")
    if not out.is_dir():
        return
    runlock.check(out)  # another run still owns it: say so (not "already holds a run")
    if not any(p.name != runlock.LOCK_NAME for p in out.iterdir()):  # empty, or only a stale lock
        return
    if cfg.overwrite or cfg.resume == "auto" or (cfg.resume and _inside(cfg.resume, out)):
        return
    raise ConfigError(
        f"out: {out} already holds a run ({_describe_run(out)}); continue it with --resume auto, start over with "
        f"--overwrite (deletes its checkpoints, metrics and model), or choose another --out"
    )


def open_run_dir(cfg: TrainConfig, info: DistInfo) -> tuple[Path, Path | None]:
    """The run directory, on every rank: --out, or runs/<UTC time> as rank 0 names it. Rank 0 creates it, takes its
    lock (one run per run directory, :mod:`runlock`, before anything is written into it), removes what --overwrite
    replaces and stale temp files, and writes config.json. A failure to create or lock it is raised on every rank
    alike (no rank waits in a collective). Returns (run dir, the lock's path on rank 0, else None)."""
    lock_path: Path | None = None
    out = cfg.out
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = broadcast_object(str(Path("runs") / stamp), info)
    run_dir = Path(out)
    err = None
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # one run per run directory, taken before anything is written into it (runlock.py)
            lock_path, notes = runlock.acquire(run_dir)
            for note in notes:
                log.warning("%s", note)
        except (ConfigError, OSError) as e:
            err = one_line(e)
    err = broadcast_object(err, info)  # every rank stops alike: no rank waits in a collective
    if err is not None:
        raise mark_every_rank(ConfigError(err))
    if info.is_main:
        done = prepare_run_dir(run_dir, cfg)
        if done["overwritten"]:
            log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(done["overwritten"]),
                        run_dir)
        if done["stale_temp"]:
            log.warning("removed %d unfinished checkpoint write(s) left by an interrupted run: %s",
                        len(done["stale_temp"]), ", ".join(done["stale_temp"]))
        # atomic and durable: a job killed here leaves the previous config.json or the new one, never half of one
        atomic_write_json(run_dir / "config.json", cfg.to_dict(), durable=True, indent=1)
    return run_dir, lock_path


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> dict[str, list[str]]:
    """Rank 0, before anything is written: --overwrite cleanup and removal of stale checkpoint temp dirs."""
    done: dict[str, list[str]] = {"overwritten": [], "stale_temp": []}
    if cfg.overwrite:
        for name in RUN_OUTPUTS:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
                done["overwritten"].append(name)
            elif p.exists():
                p.unlink()
                done["overwritten"].append(name)
    done["stale_temp"] = [str(p) for p in ckpt.remove_stale_temp(run_dir / "checkpoints")]
    for name in RUN_OUTPUTS:  # temporary files of atomic writes a killed run left (fileio: .<name>.<pid>-<hex>.tmp)
        for p in run_dir.glob(f".{name}.*tmp*"):
            if p.is_file():
                p.unlink(missing_ok=True)
    return done


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep the records of `path` with step <= `step` (and drop lines cut by a crash); atomic. Returns lines dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped
