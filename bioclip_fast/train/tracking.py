"""Experiment tracking: ``--report-to tensorboard,wandb`` (open_clip's flag), from rank 0.

The same scalars as ``metrics.jsonl`` at the same global step (the optimizer step, counted from 1), under
open_clip-like tags: ``train/loss``, ``train/lr``, ``train/logit_scale``, ``perf/img_s``, ``perf/tflops_per_rank``,
``perf/mfu``, ``perf/data_wait_frac``, ``data/bad_samples`` (all ranks), ... and ``eval/top1`` / ``eval/top5`` for
each zero-shot evaluation. A resumed run continues the same curves: TensorBoard's writer is opened with
``purge_step`` = the first step re-done after the checkpoint, so readers drop the records the interrupted run wrote
past it (as ``metrics.jsonl`` is cut back), and W&B resumes the run id kept in ``<out>/wandb_run_id``.

W&B runs offline (no network; ``wandb sync <out>/wandb/offline-run-*`` uploads later) unless ``WANDB_MODE`` says
otherwise. Both packages are optional: asking for one that is not installed is refused before any work.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("bioclip_fast.train")

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs

# metrics.jsonl key -> tag
TRAIN_SCALARS = {
    "loss": "train/loss", "loss_bio": "train/loss_bio", "loss_replay": "train/loss_replay", "lr": "train/lr",
    "logit_scale": "train/logit_scale", "grad_norm": "train/grad_norm", "epoch": "train/epoch",
    "img_s": "perf/img_s", "img_s_per_rank": "perf/img_s_per_rank", "tflops_per_rank": "perf/tflops_per_rank",
    "mfu": "perf/mfu", "hfu": "perf/hfu", "data_wait_frac": "perf/data_wait_frac", "step_time_s": "perf/step_time_s",
    "peak_mem_gb": "perf/peak_mem_gb", "bad_samples": "data/bad_samples", "bad_shards": "data/bad_shards",
}
EVAL_SCALARS = {"top1": "eval/top1", "top5": "eval/top5"}


def parse_report_to(values: list[str] | None) -> list[str]:
    """['tensorboard,wandb'] / ['tensorboard', 'wandb'] / ['all'] / ['none'] -> backend names in order."""
    names: list[str] = []
    for v in values or []:
        for n in str(v).replace(",", " ").split():
            n = n.strip().lower()
            if n in ("none", ""):
                continue
            for name in (list(BACKENDS) if n == "all" else [n]):
                if name not in names:
                    names.append(name)
    return names


def check_report_to(values: list[str] | None) -> None:
    """Validate --report-to before any work: known names whose packages are installed."""
    from bioclip_fast.errors import ConfigError

    names = parse_report_to(values)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"report_to: unknown {unknown}; choose from tensorboard, wandb, all, none")
    for n in names:
        if importlib.util.find_spec(BACKENDS[n]) is None:
            raise ConfigError(f"report_to: {n} is not installed (pip install {BACKENDS[n]}); or drop it from "
                              f"--report-to")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def train_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The tagged scalars of one metrics.jsonl record (bad samples summed over ranks where known)."""
    out = {tag: float(rec[k]) for k, tag in TRAIN_SCALARS.items() if _finite(rec.get(k))}
    if _finite(rec.get("bad_samples_all_ranks")):
        out["data/bad_samples"] = float(rec["bad_samples_all_ranks"])
    return out


def eval_scalars(res: dict[str, Any]) -> dict[str, float]:
    return {tag: float(res[k]) for k, tag in EVAL_SCALARS.items() if _finite(res.get(k))}


class Trackers:
    """The requested writers; `log(scalars, step)` fans out. Use on rank 0 only."""

    def __init__(self, names: list[str], run_dir: Path, *, resume_step: int, config: dict[str, Any], project: str):
        self.writers: list[Any] = []
        self.wandb_run = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers drop what an earlier attempt logged at or after this run's first step (a resumed
            # run's first re-done step; step 1 for a --resume auto run that found no checkpoint)
            self.writers.append(SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step + 1))
        if "wandb" in names:
            import wandb

            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            if not run_id:
                run_id = secrets.token_hex(4)  # W&B run ids: [a-z0-9]
                id_file.write_text(run_id + "\n")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow",
                                        config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                                        name=run_dir.name)
            self._wandb_next_step = int(getattr(self.wandb_run, "step", 0) or 0)

        where = []
        if self.writers:
            where.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
        if self.wandb_run is not None:
            where.append(f"W&B run {self.wandb_run.id} ({os.environ.get('WANDB_MODE', 'offline')}"
                         f"{'; upload with: wandb sync ' + str(run_dir / 'wandb') + '/offline-run-*' if os.environ.get('WANDB_MODE', 'offline') == 'offline' else ''})")
        log.info("metrics also go to %s", "; ".join(where))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for w in self.writers:
            for tag, v in scalars.items():
                w.add_scalar(tag, v, step)
        # an online run resumed by id already holds the steps up to its last one (W&B refuses smaller steps, with a
        # warning each): those re-done after the checkpoint are the same numbers (exact resume), so skip them
        if self.wandb_run is not None and scalars and step >= self._wandb_next_step:
            self.wandb_run.log(scalars, step=step)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def open_trackers(values: list[str] | None, run_dir: Path, *, resume_step: int, config: dict[str, Any],
                  project: str) -> Trackers | None:
    names = parse_report_to(values)
    if not names:
        return None
    try:
        return Trackers(names, run_dir, resume_step=resume_step, config=config, project=project)
    except Exception as e:  # noqa: BLE001 - e.g. WANDB_MODE=online without an API key: one line, not a traceback
        from bioclip_fast.errors import ConfigError

        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError(f"report_to: could not start {', '.join(names)} logging ({type(e).__name__}: {text}); "
                          f"for W&B without an account or network use WANDB_MODE=offline") from e
