"""What a training run reports about itself, apart from the training: its clock (training seconds across resumes, the
wall-clock budget that rank 0's clock decides for every rank), the per-step records and where they go
(:class:`RunReporter`: ``metrics.jsonl`` and ``evals.jsonl`` appended by rank 0, the trackers of --report-to, the
progress bar), and the data loader's counts summed over the ranks for ``results.json``.
Throughput and FLOPs accounting is :mod:`bioclip_fast.train.metrics`; the trackers themselves
:mod:`bioclip_fast.train.tracking`; the collapse warning :mod:`bioclip_fast.train.collapse`."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bioclip_fast.distributed import DistInfo, all_gather_objects, rank0_value
from bioclip_fast.train.metrics import peak_memory_gb
from bioclip_fast.train.tracking import Trackers, eval_scalars, open_trackers, train_scalars


class RunClock:
    """Training seconds of a run: those before a resume (`elapsed_before`, from the checkpoint) plus those since
    :meth:`start`. The budget checks are collectives: rank 0's clock decides for everyone."""

    def __init__(self, info: DistInfo, device: torch.device, elapsed_before: float = 0.0):
        self.info, self.device = info, device
        self.elapsed_before = elapsed_before
        self._t_start: float | None = None

    def start(self) -> None:
        self._t_start = time.perf_counter()

    def elapsed(self) -> float:
        start = self._t_start
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    def over_budget(self, budget_s: float) -> bool:
        """Collective: has the run used its `budget_s` training seconds (by rank 0's clock)?"""
        return bool(rank0_value(1.0 if self.elapsed() >= budget_s else 0.0, self.info, self.device))

    def progress(self, budget_s: float) -> float:
        """Collective: the elapsed fraction of the budget (rank 0's), for a time-clocked schedule."""
        return rank0_value(min(self.elapsed() / budget_s, 1.0), self.info, self.device, torch.float64)


def step_record(*, step: int, res: dict[str, Any], rates: dict[str, Any], lr: float, text_type: str, step_s: float,
                elapsed_s: float, engine, loader, device: torch.device, info: DistInfo,
                bad_samples_all_ranks: int | None) -> dict[str, Any]:
    """One line of metrics.jsonl: the step's loss (and its parts), lr, logit scale, timing and throughput, peak
    memory and this rank's bad-sample counts so far."""
    mem, mem_kind = peak_memory_gb(device)
    rec = {
        "step": step,
        "epoch": loader.epoch if loader is not None else None,
        "loss": res["loss"],
        **{k: v for k, v in res.items() if k.startswith("loss_")},
        "skipped": res["skipped"],
        "lr": lr,
        "logit_scale": math.exp(engine.logit_scale_value()),
        "text_type": text_type,
        "step_time_s": step_s,
        **rates,
        "peak_mem_gb": mem,
        "peak_mem_kind": mem_kind,
        "elapsed_s": elapsed_s,
    }
    if engine.last_grad_norm is not None:
        rec["grad_norm"] = engine.last_grad_norm
    if loader is not None:  # this rank's counts so far (host-side dicts the batches fed: no sync); the
        # sum over ranks came with the step's loss all-reduce
        st = loader.stats
        rec["bad_samples"] = st["skipped_corrupt"]
        rec["bad_shards"] = st["bad_shards"]
        if info.distributed:
            rec["bad_samples_all_ranks"] = bad_samples_all_ranks
        if st["bad_samples"]:
            rec["bad_by_reason"] = dict(st["bad_samples"])
    return rec


class RunReporter:
    """Where a run's records go: the loop hands it each logged step's record (:meth:`log_step`) and each step's end
    (:meth:`step_done`); the evaluations come through :meth:`log_eval`. Rank 0 appends them to ``metrics.jsonl`` /
    ``evals.jsonl`` and logs them to the trackers (--report-to); the progress bar shows rank 0's (--progress); every
    rank keeps its step records in `history` (the summary's final loss and rates)."""

    def __init__(self, cfg, info: DistInfo, run_dir: Path):
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.trackers: Trackers | None = None
        self.bar = None

    def open(self, step: int) -> None:
        """Start the trackers (rank 0, --report-to) at the run's first step after `step`."""
        cfg = self.cfg
        if self.info.is_main and cfg.report_to:
            self.trackers = open_trackers(cfg.report_to, self.run_dir, resume_step=step, config=cfg.to_dict(),
                                          project=cfg.wandb_project)

    def start_bar(self, total: int | None, step: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total,
                        initial=step, disable=not (self.info.is_main and self.cfg.progress), desc="train",
                        unit="step", dynamic_ncols=True)

    def log_step(self, rec: dict[str, Any], budget: float | None) -> None:
        """One logged step's record (see :func:`step_record`)."""
        if self.info.is_main:
            append_jsonl(self.jsonl, rec)
            if self.trackers is not None:
                self.trackers.log(train_scalars(rec), rec["step"])
        self.history.append(rec)
        post = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.2e}", "img_s": f"{rec['img_s']:.0f}"}
        if budget:
            post["left"] = f"{max(budget - rec['elapsed_s'], 0):.0f}s"
        if rec.get("bad_samples"):
            post["bad"] = rec["bad_samples"]
        self.bar.set_postfix(post, refresh=False)

    def step_done(self) -> None:
        self.bar.update(1)

    def end_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_eval(self, res: dict[str, Any], step: int, tag: str) -> None:
        """One zero-shot evaluation (rank 0): to the trackers, and to evals.jsonl unless it is the final one."""
        if self.trackers is not None:
            self.trackers.log(eval_scalars(res), step)
        if tag != "final":
            append_jsonl(self.run_dir / "evals.jsonl", {k: v for k, v in res.items() if k != "per_class"})

    def close(self) -> None:
        self.end_bar()
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    """Append one JSON record; a failed write (full disk, file size limit) names the file."""
    try:
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        raise OSError(e.errno, f"appending a record to {path.name} failed: {e.strerror or e}; the checkpoints are "
                               f"intact: free space, then continue with --resume auto", str(path)) from e


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Metrics records, keeping the last record per step (a resumed run re-logs the steps after its checkpoint)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]


def loader_stats_all_ranks(loader, info: DistInfo) -> dict[str, Any] | None:
    """The loader's counts summed over every rank (collective: one all_gather_object, once per run): bad samples
    by reason, damaged shards (each named once, whichever ranks met it), and each rank's own counts."""
    if loader is None:
        return None
    mine = {**loader.stats, "bad_samples": dict(loader.stats["bad_samples"]),
            "damaged_shards": dict(loader.bad_shards)}
    parts = all_gather_objects(mine, info)
    out: dict[str, Any] = {k: v for k, v in mine.items() if not isinstance(v, (int, float, dict))}
    for k, v in mine.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = sum(p.get(k, 0) for p in parts)
    reasons: dict[str, int] = {}
    shards: dict[str, str] = {}
    for p in parts:
        for reason, n in p["bad_samples"].items():
            reasons[reason] = reasons.get(reason, 0) + n
        for shard, why in p["damaged_shards"].items():
            shards.setdefault(shard, why)
    out["bad_samples"] = reasons
    out["bad_shards"] = len(shards)  # a shard damaged for several ranks counts once
    out["damaged_shards"] = dict(sorted(shards.items())[:100])  # the first 100 named; bad_shards counts all
    if info.distributed:
        out["per_rank"] = [{"rank": r, "samples": p.get("samples", 0), "skipped_corrupt": p["skipped_corrupt"],
                            "bad_samples": p["bad_samples"], "bad_shards": len(p["damaged_shards"])}
                           for r, p in enumerate(parts)]
    return out
