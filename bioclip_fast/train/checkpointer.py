"""The checkpoint policy of one training run: when to save, what to keep, which checkpoint to resume from, and whether
the run may resume from it. The training loop asks; :mod:`bioclip_fast.train.checkpoint` does the writing, the
verification and the loading (the on-disk format).

- cadence: :meth:`Checkpointer.should_save` (every ``--save-every`` steps; ``final=True`` at the end of the loop,
  after a stop signal or the data's stop, unless this step is saved already);
- retention: the ``--keep-checkpoints`` newest by step are kept (pruned by each save, never the one just written);
  checkpoints that failed verification, and newer ones of an abandoned timeline, are moved aside on resume
  (``corrupt-…``, ``superseded-…``): kept, never read or counted again;
- verification: every save is atomic with a manifest of sizes and sha256 checksums; resume verifies them;
- resume selection: :meth:`Checkpointer.select_for_resume` picks the newest intact checkpoint (naming each one it
  skips and why), the same on every rank;
- the change check: the run fingerprint (config, engine, data shard identities, :mod:`bioclip_fast.train.rundir`)
  is stored in each checkpoint and compared on resume; a difference is refused unless named in ``--allow-changed``.

    checkpointer = Checkpointer(cfg, info, run_dir, engine_kind)
    found = checkpointer.select_for_resume(cfg.resume)     # before the model is built: verified, settings compared
    ...                                                    # model, data, engine
    checkpointer.set_data(loader)                          # the data part of the fingerprint
    state = checkpointer.load_for_resume(found, engine)    # engine restored; this rank's trainer state
    if checkpointer.should_save(step): checkpointer.save(engine, step=step, trainer_state=...)
"""
from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bioclip_fast.distributed import DistInfo
from bioclip_fast.errors import CheckpointError, ConfigError
from bioclip_fast.train import checkpoint as ckpt
from bioclip_fast.train import rundir
from bioclip_fast.train.config import TrainConfig
from bioclip_fast.train.failures import mark_every_rank

log = logging.getLogger("bioclip_fast.train")


class Checkpointer:
    """Owns the checkpoints of the run in `run_dir` (``<run_dir>/checkpoints``). Its collectives (save, resume
    selection, load) are called by every rank at the same point."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, run_dir: Path, engine_kind: str):
        self.cfg, self.info = cfg, info
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.config_fingerprint = rundir.config_fingerprint(cfg.to_dict(), engine_kind)
        self.fingerprint: dict[str, Any] = dict(self.config_fingerprint)  # + the data part, see set_data
        self.last_saved_step = -1
        self.last_checkpoint: Path | None = None
        self.expected_bytes: int | None = None  # size of the last checkpoint: the next one's expected size
        self.resume_skipped: list[tuple[Path, str]] = []
        self._resume_fingerprint: dict[str, Any] = {}  # the fingerprint stored in the checkpoint selected

    # ------------------------------------------------------------------------------------------------ saving
    def should_save(self, step: int, *, final: bool = False) -> bool:
        """Is `step` a step to save at? Every --save-every steps; with `final` (the loop is over: its end, a stop
        signal, the data's stop) whenever the step is not saved yet."""
        if final:
            return self.last_saved_step != step
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    def save(self, engine, *, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (collective, atomic, verified; the oldest beyond --keep-checkpoints removed)."""
        meta = {"config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                "time": datetime.now(timezone.utc).isoformat()}
        path = ckpt.save_checkpoint(self.root, engine, step=step, trainer_state=trainer_state, meta=meta,
                                    keep=self.cfg.keep_checkpoints,
                                    expected_bytes=self.expected_bytes or self.estimate_bytes(engine))
        self.last_saved_step = step
        self.last_checkpoint = path
        if self.info.is_main:
            self.expected_bytes = ckpt.checkpoint_bytes(path)
        return path

    def estimate_bytes(self, engine) -> int:
        """Expected size of the first checkpoint: weights + AdamW moments (+ fp32 master weights under DeepSpeed)."""
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
        if engine.kind == "deepspeed":
            return n * ((2 if self.cfg.precision == "bf16" else 4) + 12)
        return n * 12

    # ------------------------------------------------------------------------------------------------ resuming
    def set_data(self, loader) -> None:
        """Add the data part of the fingerprint (shard identities; needs the built loader)."""
        self.fingerprint = {**self.config_fingerprint, **rundir.data_fingerprint(loader)}

    def select_for_resume(self, spec: str) -> Path | None:
        """The checkpoint to resume from: the newest intact one (skipping corrupt ones, each named with its reason),
        whose settings match this run's. Collective; None for `--resume auto` in a directory without checkpoints."""
        where = self.run_dir if spec == "auto" else Path(spec)
        found, skipped = ckpt.select_checkpoint(
            where, self.info, log=(lambda m: log.warning("%s", m)) if self.info.is_main else None)
        if found is None:
            if skipped:
                listed = "; ".join(f"{d.name}: {why}" for d, why in skipped)
                raise mark_every_rank(CheckpointError(
                    f"resume: no intact checkpoint under {where} ({listed}); start over with --overwrite or another "
                    f"--out"))
            if spec == "auto":
                return None
            raise mark_every_rank(ConfigError(f"resume: no complete checkpoint under {spec}"))
        self.resume_skipped = skipped
        meta = ckpt.read_meta(found)
        old = meta.get("fingerprint") or rundir.config_fingerprint(meta.get("config") or {}, meta.get("engine"))
        self.check_changes(old, self.config_fingerprint, found)
        self._resume_fingerprint = old
        root = self.root
        if self.info.is_main and found.parent.resolve() == root.resolve():
            # corrupt ones, and newer ones of an abandoned timeline (an explicit older --resume), are moved aside:
            # kept, but never resumed from or counted by retention again
            step = ckpt.ckpt_step(found)
            aside = [(d, ckpt.CORRUPT_PREFIX) for d, _ in skipped]
            aside += [(d, ckpt.SUPERSEDED_PREFIX) for d in ckpt.list_checkpoints(root)
                      if ckpt.ckpt_step(d) > step and d not in {s for s, _ in skipped}]
            for d, prefix in aside:
                target = d.with_name(prefix + d.name)
                k = 1
                while target.exists():
                    target, k = d.with_name(f"{prefix}{d.name}.{k}"), k + 1
                os.rename(d, target)
                log.warning("moved %s aside to %s", d.name, target.name)
        return found

    def check_changes(self, old: dict[str, Any], new: dict[str, Any], found: Path) -> list[str]:
        """The fingerprint keys that differ; ConfigError (every rank) for those not named in --allow-changed."""
        changed = rundir.fingerprint_changes(old, new)
        allowed = {k.replace("-", "_") for k in (self.cfg.allow_changed or [])}
        refused = [k for k in changed if k not in allowed]
        if refused:
            raise mark_every_rank(ConfigError(
                f"resume: checkpoint {found} was written with other settings: "
                f"{rundir.describe_changes(old, new, refused)}. Exact resume needs the same settings; to change them "
                f"on purpose add --allow-changed {' '.join(refused)}, or start a new run with another --out"
            ))
        if changed and self.info.is_main:
            log.warning("resuming with changed settings (--allow-changed): %s", rundir.describe_changes(old, new, changed))
        return changed

    def load_for_resume(self, found: Path, engine) -> dict[str, Any]:
        """Restore the engine from checkpoint `found` (selected by :meth:`select_for_resume`) and return this rank's
        trainer state (RNG restored). Compares the data part of the fingerprint first (the config part was compared
        before anything was built); when the training data changed (--allow-changed), the state's loader position is
        dropped (None): the data order restarts. Collective."""
        old = self._resume_fingerprint
        keys = rundir.DATA_KEYS
        data_changed = self.check_changes({k: old[k] for k in keys if k in old},
                                          {k: self.fingerprint[k] for k in keys if k in self.fingerprint}, found)
        state = ckpt.load_checkpoint(found, engine)
        self.last_saved_step = int(state["step"])
        self.last_checkpoint = found
        self.expected_bytes = ckpt.checkpoint_bytes(found)
        if state.get("loader") is not None and {"data", "replay_data"} & set(data_changed):
            # other files, names or counts: a new order
            log.warning("the training data changed (--allow-changed %s): the data order restarts at epoch 0",
                        " ".join(data_changed))
            state["loader"] = None
        return state

    def resumed_note(self, found: Path, step: int) -> str:
        """The log line of a resume: where from, and the checkpoints skipped on the way."""
        skipped = "".join(f"; skipped {d.name} ({why})" for d, why in self.resume_skipped)
        return f"resumed from {found} at step {step}{skipped}"
