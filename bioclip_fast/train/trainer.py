"""The Trainer: data -> ClipTrainModule -> fused CLIP loss (+ replay loss) -> engine step, with logging, atomic
verified checkpoints, exact resume (with a fallback past corrupt checkpoints and a guard against changed settings), a
graceful stop on SIGTERM/SIGINT/SIGUSR1, wall-clock budgets, and a zero-shot evaluation at the end.

It builds the parts and runs the loop; the parts own their concerns: the run directory and its lock
(:mod:`.rundir`, :mod:`.runlock`), when to checkpoint, what to keep and what to resume from (:class:`.checkpointer.
Checkpointer`), the engines (:mod:`.engine`), the run's clock and where each step's record goes: metrics.jsonl, the
trackers, the progress bar (:class:`.progress.RunReporter`, :mod:`.tracking`, :mod:`.metrics`), the collapse
warning (:mod:`.collapse`), whether to stop: signals, the launcher's death, what the ranks agreed
(:class:`.signals.StopWatch`), and the collectives by which ranks agree (:mod:`bioclip_fast.distributed`).

    trainer = Trainer(cfg)        # validates the config, builds model, data, engine; resumes if asked
    summary = trainer.fit()       # trains; writes metrics.jsonl, loss.png, model.pt, results.json in the run dir
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bioclip_fast.devices import resolve_device
from bioclip_fast.distributed import DistInfo, dist_info_from_env
from bioclip_fast.errors import DataError
from bioclip_fast.fileio import atomic_write_json
from bioclip_fast.train import rundir, runlock
from bioclip_fast.train.checkpointer import Checkpointer
from bioclip_fast.train.collapse import CollapseMonitor
from bioclip_fast.train.config import TrainConfig, duration_note
from bioclip_fast.train.engine import (
    ClipTrainModule,
    build_engine,
    init_distributed,
    resolve_engine_kind,
)
from bioclip_fast.train.failures import mark_every_rank
from bioclip_fast.train.gradcache import grad_cache_step
from bioclip_fast.train.metrics import ThroughputMeter, model_flops, peak_tflops_for
from bioclip_fast.train.preflight import validate_runtime, validate_static
from bioclip_fast.train.progress import RunClock, RunReporter, loader_stats_all_ranks, read_jsonl, step_record
from bioclip_fast.train.signals import StopWatch, launcher_pid

log = logging.getLogger("bioclip_fast.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before any optimizer step or checkpoint uses it."""


def make_loss(cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    kw = dict(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
              rank=info.rank, world_size=info.world_size)
    if cfg.loss == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss(**kw)
    from bioclip_fast.loss import FusedClipLoss

    # the trainer checks the loss itself (and may skip the step), so no per-input finiteness reduction here;
    # it hands the loss fp32 features outside autocast: bf16 runs multiply in bf16 (tensor cores) like open_clip
    return FusedClipLoss(**kw, check_finite=False, compute_dtype="bf16" if cfg.precision == "bf16" else "fp32")


def auto_threads(local_world: int = 1) -> int:
    """CPU threads per rank: the cores this process may use, split between the local ranks (at least 1).

    Deliberately not reduced by the load average: that lags by a minute, so a run started right after a busy
    spell (an install, a test session) would keep half its cores idle for its whole length. On a machine shared
    with other jobs, pass --threads (OpenMP threads that outnumber the free cores spin-wait on each other).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world, 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _params_finite(module: torch.nn.Module) -> bool:
    for p in module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: this rank's partition
        if t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return True


class Trainer:
    def __init__(self, cfg: TrainConfig, *, info: DistInfo | None = None, build_data: bool = True):
        self.cfg = cfg
        self.info = info or dist_info_from_env()
        validate_static(cfg)
        from bioclip_fast.train.config import resolve_batches

        self.batches = resolve_batches(cfg, self.info.world_size)  # per-GPU figures -> global batch sizes
        validate_runtime(cfg, world_size=self.info.world_size)
        rundir.validate_run_dir(cfg)  # before the process group: nothing written yet
        self.device = resolve_device(cfg.device, local_rank=self.info.local_rank)  # checked by validate_static
        self.engine_kind = resolve_engine_kind(cfg, self.info, self.device)
        if self.device.type == "cpu":
            self.threads = cfg.threads or auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            torch.set_num_threads(self.threads)
        init_distributed(self.info, self.device, self.engine_kind == "deepspeed")
        self.local_batch = cfg.batch_size // self.info.world_size
        replay_global = (cfg.replay_batch_size or cfg.batch_size) if cfg.replay_data else 0
        self.local_replay = replay_global // self.info.world_size

        if self.info.world_size > 1 and torch.distributed.is_initialized():
            # every rank has validated --out (above) before rank 0 writes into it; the process group's own start-up
            # is no such barrier when it already exists (several Trainers in one process)
            torch.distributed.barrier()
        self.run_dir, self.lock_path = rundir.open_run_dir(cfg, self.info)
        self.checkpointer = Checkpointer(cfg, self.info, self.run_dir, self.engine_kind)
        # pick (and verify) the checkpoint and compare settings before building anything big
        self.resume_from = self.checkpointer.select_for_resume(cfg.resume) if cfg.resume else None
        seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
        from bioclip_fast.model import create_model, get_tokenizer, image_mean_std

        continual = cfg.continual_proj if cfg.continual_proj is not None else bool(cfg.replay_data)
        self.clip = create_model(cfg.model, pretrained=cfg.pretrained, continual_proj=continual,
                                 grad_checkpointing=cfg.grad_checkpointing, init_logit_scale=cfg.init_logit_scale)
        if cfg.channels_last:
            self.clip = self.clip.to(memory_format=torch.channels_last)
        self.tokenizer = get_tokenizer(self.clip)
        self.mean, self.std = image_mean_std(self.clip)
        size = self.clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.text_types = tuple(cfg.text_types) if cfg.text_types else None

        self.loader = self._make_train_loader() if build_data else None
        self.steps_per_epoch = len(self.loader) if self.loader is not None else None
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        elif self.steps_per_epoch is not None:
            self.total_steps = cfg.epochs * self.steps_per_epoch
        else:
            self.total_steps = None
        self.module = ClipTrainModule(self.clip, logit_scale_max=cfg.logit_scale_max, dedup_text=cfg.dedup_text)
        self.engine = build_engine(self.module, cfg, kind=self.engine_kind, device=self.device, info=self.info,
                                   total_steps=self.total_steps, local_batch=self.local_batch,
                                   local_replay_batch=self.local_replay)
        self.loss_fn = make_loss(cfg, self.info)
        self.flops = model_flops(self.clip.model_cfg)
        peak = cfg.peak_tflops
        if peak is None and self.device.type == "cuda":
            peak = peak_tflops_for(torch.cuda.get_device_name(self.device))
        self.meter = ThroughputMeter(self.flops, global_batch=cfg.batch_size, world_size=self.info.world_size,
                                     peak_tflops=peak, grad_checkpointing=cfg.grad_checkpointing,
                                     grad_cache=bool(cfg.grad_cache_chunk))
        self.step = 0
        self.clock = RunClock(self.info, self.device)  # training seconds, also those before a resume
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.warnings: list[str] = []
        self.collapse = CollapseMonitor(cfg.batch_size, window=cfg.collapse_window, after_step=cfg.warmup_steps)
        # a worker started by a launcher (torchrun, deepspeed) watches it: its parent at start
        self.stop_watch = StopWatch(self.info.rank, launcher_pid())
        self.checkpointer.set_data(self.loader)
        self.report = RunReporter(cfg, self.info, self.run_dir)  # metrics.jsonl, trackers, progress bar, history
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif cfg.resume == "auto" and self.info.is_main:  # nothing to resume: a fresh run keeps no stale records
            for name in ("metrics.jsonl", "evals.jsonl"):
                rundir.truncate_jsonl(self.run_dir / name, 0)

    # ------------------------------------------------------------------------------------------------ setup
    def _shards(self, specs: list[str] | None, split: str) -> list[str] | None:
        if not specs:
            return None
        out: list[str] = []
        for s in specs:
            if s == "bundled":
                from bioclip_fast.data.bundled import default_shards

                out.extend(default_shards(split))
            else:
                out.append(s)
        return out

    def _make_train_loader(self):
        from bioclip_fast.data import loader as data_loader

        cfg = self.cfg
        return data_loader.make_loader(
            self._shards(cfg.data, "train"), self.local_batch, image_size=self.image_size, mean=self.mean,
            std=self.std, tokenizer=self.tokenizer,
            text_types=self.text_types or data_loader.TEXT_TYPES, train=True, backend=cfg.data_backend,
            device=self.device, rank=self.info.rank, world_size=self.info.world_size, seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer, num_workers=cfg.num_workers, drop_last=True,
            replay_shards=self._shards(cfg.replay_data, "train"), replay_batch_size=self.local_replay,
            crop_scale=tuple(cfg.crop_scale), index_dir=cfg.index_dir, max_bad_fraction=cfg.max_bad_fraction,
            defer_bad_limit=True,  # past --max-bad-fraction every rank stops after the same step (see _loss_ok)
        )

    def _val_specs(self) -> list[str] | None:
        if self.cfg.val_data:
            return self._shards(self.cfg.val_data, "val")
        if self.cfg.uses_bundled_data:
            return self._shards(["bundled"], "val")
        return None

    # ------------------------------------------------------------------------------------------------ one step
    def loss_from_features(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scale = f["logit_scale"].float().exp()
        bias = f.get("logit_bias")
        bias = bias.float() if bias is not None else None
        bio = self.loss_fn(f["image"].float(), f["text"].float(), scale, bias)
        parts = {"loss_bio": bio.detach()}
        total = bio
        if "replay_image" in f:
            rep = self.loss_fn(f["replay_image"].float(), f["replay_text"].float(), scale, bias)
            parts["loss_replay"] = rep.detach()
            total = total + self.cfg.replay_weight * rep
        return total, parts

    def _loss_ok(self, loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> bool:
        # The mean over ranks is NaN if any rank's loss is, so every rank takes the same decision (no hang).
        # The stop-signal flag, the bad-data flag (this rank's loader passed --max-bad-fraction), the rank's bad
        # sample count and the loss parts ride in the same all-reduce: the step's one collective of its own and its
        # one host read (like GradScaler's found-inf check), see signals.py.
        value = loss.detach().float().reshape(())
        names = list(parts or {})
        bad_data = self.loader is not None and self.loader.bad_limit_error is not None
        bad_count = float(self.loader.stats["skipped_corrupt"]) if self.loader is not None else 0.0
        # new_full is a fill kernel on the loss's device, not a host-to-device copy (which would sync the stream)
        t = torch.stack([value, value.new_full((), 1.0 if self.stop_watch.requested_here() else 0.0),
                         value.new_full((), 1.0 if bad_data else 0.0), value.new_full((), bad_count)]
                        + [parts[k].detach().float().reshape(()) for k in names])
        if self.info.distributed:
            torch.distributed.all_reduce(t)
        loss_sum, stops, data_stops, bad_all, *part_sums = t.tolist()
        self._bad_samples_all_ranks = int(round(bad_all))  # fp32: exact to 2^24
        self._last_parts = {k: v / self.info.world_size for k, v in zip(names, part_sums)}
        self._last_loss = loss_sum / self.info.world_size
        self.stop_watch.agree(stops, data_stops)
        return math.isfinite(self._last_loss)

    def train_step(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on per-rank inputs {image, text[, replay_image, replay_text]}.

        Returns {"loss": global mean loss, parts..., "skipped": bool}. Raises NonFiniteLossError (nonfinite=error).
        """
        cfg, engine = self.cfg, self.engine
        if cfg.grad_cache_chunk:
            loss, parts, ok = grad_cache_step(engine, self.loss_from_features, inputs, cfg.grad_cache_chunk,
                                              check_loss=self._loss_ok)
        else:
            feats = engine.forward(**inputs)
            loss, parts = self.loss_from_features(feats)
            ok = self._loss_ok(loss, parts)
            if ok:
                engine.backward(loss)
        if not ok:
            return self._handle_nonfinite(parts)
        engine.step()
        self.consecutive_skips = 0
        return {"loss": self._last_loss, "skipped": False, **self._last_parts}

    def _handle_nonfinite(self, parts) -> dict[str, Any]:
        # steps count from 1, as in metrics.jsonl: this is step self.step + 1
        msg = (f"non-finite loss ({self._last_loss}) at step {self.step + 1}; no optimizer step was taken and no "
               f"checkpoint is written from this state")
        if self.cfg.nonfinite == "error":
            raise NonFiniteLossError(msg + ". Lower --lr, enable --grad-clip, or use --nonfinite skip.")
        self.engine.skip_step()
        self.consecutive_skips += 1
        self.skipped_steps += 1
        log.warning("%s; skipping (%d in a row)", msg, self.consecutive_skips)
        if self.consecutive_skips > self.cfg.max_nonfinite_skips:
            raise NonFiniteLossError(f"{self.consecutive_skips} consecutive non-finite losses (last at step "
                                     f"{self.step + 1}); giving up")
        return {"loss": self._last_loss, "skipped": True}

    def batch_inputs(self, batch: dict[str, Any], step: int) -> tuple[dict[str, torch.Tensor], str]:
        from bioclip_fast.taxonomy import TEXT_TYPES, text_type_for_step

        tt = text_type_for_step(step, self.cfg.seed, self.text_types or TEXT_TYPES)
        image = batch["image"]
        if self.cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        inputs = {"image": image, "text": batch["text"][tt]}
        if "replay" in batch:
            inputs["replay_image"] = batch["replay"]["image"]
            inputs["replay_text"] = batch["replay"]["text"]
        return inputs, tt

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        if not _params_finite(self.engine.module):
            raise NonFiniteLossError(f"parameters are not finite at step {self.step}; refusing to write a checkpoint")
        trainer_state = {
            "step": self.step,
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "elapsed_s": self.clock.elapsed(),
            "skipped_steps": self.skipped_steps,
            "collapse": self.collapse.state_dict(),
        }
        return self.checkpointer.save(self.engine, step=self.step, trainer_state=trainer_state)

    def _resume(self, found: Path) -> None:
        state = self.checkpointer.load_for_resume(found, self.engine)
        self.step = int(state["step"])
        self.clock.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("collapse") is not None:  # absent in checkpoints of older versions: the count restarts
            self.collapse.load_state_dict(state["collapse"])
            if self.collapse.warning is not None:
                self.warnings.append(self.collapse.warning)
        if self.loader is not None and state.get("loader") is not None:  # None: the data changed, a new order
            self.loader.load_state_dict(state["loader"])
        if self.info.is_main:
            for name in ("metrics.jsonl", "evals.jsonl"):  # every step appears once
                dropped = rundir.truncate_jsonl(self.run_dir / name, self.step)
                if dropped:
                    log.info("%s: dropped %d record(s) after step %d (re-done from the checkpoint)", name, dropped,
                             self.step)
            log.info("%s", self.checkpointer.resumed_note(found, self.step))

    # ------------------------------------------------------------------------------------------------ the loop
    def _should_stop(self, budget_s: float | None) -> bool:
        """Before a step: every rank agreed to stop (a signal, the data), the last step is done, or the wall-clock
        budget is spent (by rank 0's clock). Every rank answers alike."""
        if self.stop_watch.stopping:
            return True
        if self.step >= (self.total_steps or math.inf):
            return True
        if budget_s is None:
            return False
        return self.clock.over_budget(budget_s)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal), then export and evaluate. With a signal the summary has
        "preempted" (the signal's name) and "checkpoint"; the run continues exactly with ``resume="auto"``."""
        cfg = self.cfg
        if self.loader is None:
            raise RuntimeError("Trainer was built with build_data=False; call train_step() directly")
        budget = cfg.max_minutes * 60 if cfg.max_minutes else None
        # a wall-clock-bounded run has no meaningful step total: show steps and the time left instead
        show_total = self.total_steps if (cfg.schedule_clock == "steps" and self.total_steps) else None
        try:
            self.report.open(self.step)  # inside: a tracker that fails to start still frees the run directory
            # handlers first: loader workers forked afterwards inherit them (a Ctrl-C to the process group then stops
            # the main process gracefully instead of killing the workers under it)
            with self.stop_watch.watching() as signals:
                train_seconds, stop = self._loop(budget, show_total)
            if self.stop_watch.data_agreed:  # every rank stopped after the same step and wrote the checkpoint together
                raise mark_every_rank(self._data_stop(DataError(
                    self.loader.bad_limit_error or "another rank's data passed --max-bad-fraction (its log names the "
                    "damaged shards)")))
            if stop:
                return self._stopped(train_seconds, signals.received)
            return self._finish(train_seconds)
        finally:
            self._end_run()

    def _end_run(self) -> None:
        """The run is over (or failed): close its records and free the run directory (rank 0's lock). The normal
        ends call it before their last barrier, so no rank of this job leaves the run (and starts another Trainer
        on the same --out) while rank 0 still holds the lock."""
        self.report.close()
        if self.lock_path is not None:
            runlock.release(self.lock_path)  # a no-op once released

    def _loop(self, budget: float | None, show_total: int | None) -> tuple[float, bool]:
        cfg, info = self.cfg, self.info
        self.report.start_bar(show_total, self.step)
        self.clock.start()
        it = iter(self.loader)
        if info.is_main:
            log.info("training %s on %s%s (%d per rank x %d ranks), %s engine, run dir %s: %s", cfg.model,
                     self.device, f" ({self.threads} threads)" if self.device.type == "cpu" else "", self.local_batch,
                     info.world_size, self.engine.kind, self.run_dir, duration_note(cfg, self.total_steps))
        while not self._should_stop(budget):
            t0 = time.perf_counter()
            try:
                try:
                    batch = next(it)
                except StopIteration:  # epoch done: the loader moves on to the next epoch
                    it = iter(self.loader)
                    batch = next(it)
            except DataError as e:  # the loader gave up at once (e.g. no readable sample left to fill a batch)
                raise self._data_stop(e) from None
            t1 = time.perf_counter()
            if cfg.schedule_clock == "time":
                self.engine.scheduler.set_time_progress(self.clock.progress(budget))
            lr = self.engine.lr
            inputs, tt = self.batch_inputs(batch, self.step)
            res = self.train_step(inputs)
            # No device synchronize here: the step's one host read (the loss check, after the forward) already keeps
            # the host within a step of the GPU, so the windowed rates stay right; a second sync per step would only
            # leave the GPU idle while the host queues the next step's work.
            t2 = time.perf_counter()
            self.step += 1
            rates = self.meter.record(t1 - t0, t2 - t1, self.module.last_text_fraction)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                rec = step_record(step=self.step, res=res, rates=rates, lr=lr, text_type=tt, step_s=t2 - t1 + t1 - t0,
                                  elapsed_s=self.clock.elapsed(), engine=self.engine, loader=self.loader,
                                  device=self.device, info=info,
                                  bad_samples_all_ranks=getattr(self, "_bad_samples_all_ranks", None))
                self.report.log_step(rec, budget)
            if not res["skipped"]:
                warning = self.collapse.update(self.step, res.get("loss_bio", res["loss"]))
                if warning:
                    self.warnings.append(warning)
                    if info.is_main:
                        log.warning("%s", warning)
            self.report.step_done()
            if self.checkpointer.should_save(self.step):
                self.save()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not self.stop_watch.stopping:
                self.export_model()  # collective under ZeRO-3; also leaves an up-to-date model.pt
                self.evaluate(tag=f"step{self.step}")
        self.report.end_bar()
        train_seconds = self.clock.elapsed()
        stop = self.stop_watch.agree_at_end(self.info, self.device)  # a signal that landed after the last step's reduction
        if self.checkpointer.should_save(self.step, final=True):
            self.save()
        return train_seconds, stop

    def _data_stop(self, err: DataError) -> DataError:
        """The data stopped the run: --max-bad-fraction passed (agreed by all ranks in the step's reduction; the
        checkpoint is written), or a loader error at once (then a checkpoint is written here by a single process;
        with several the other ranks are inside a collective and cannot join one). Says how to continue."""
        last = self.checkpointer.last_checkpoint
        where = f"the last checkpoint is {last}" if last else "no checkpoint yet"
        if last is not None and not self.checkpointer.should_save(self.step, final=True):
            where = f"checkpoint {last} written"
        elif not self.info.distributed and self.step > 0:
            try:
                where = f"checkpoint {self.save()} written"
            except Exception as save_err:  # noqa: BLE001 - the data error is the one to report
                log.warning("could not write a checkpoint after the data error: %s", save_err)
        return DataError(f"{err}. Stopped after step {self.step}; {where}; after repairing the data continue with "
                         f"--resume auto")

    def _stopped(self, train_seconds: float, signame: str | None) -> dict[str, Any]:
        """Stopped by a signal: the checkpoint is written; no export or evaluation (that is for the resumed run)."""
        signame = signame or "a stop signal on another rank"
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "train_seconds": train_seconds,
                   "preempted": signame, "checkpoint": str(self.checkpointer.last_checkpoint) if self.checkpointer.last_checkpoint else None,
                   "warnings": list(self.warnings)}
        if self.info.is_main:
            log.warning("stopped by %s after step %d; checkpoint %s; continue with --resume auto", signame,
                        self.step, self.checkpointer.last_checkpoint)
        self._end_run()
        if self.info.distributed:
            torch.distributed.barrier()
        return summary

    # ------------------------------------------------------------------------------------------------ the end
    def export_model(self) -> Path | None:
        """model.pt (bioclip_fast.model.save_model format) with the class list in meta."""
        from bioclip_fast.model import create_model, save_model

        state = self.engine.export_state_dict()
        if not self.info.is_main:
            return None
        if self.engine.kind == "torch":
            model = self.clip
        else:
            model = create_model(self.cfg.model, model_cfg=self.clip.model_cfg,
                                 continual_proj=getattr(self.clip.visual, "continual_proj", None) is not None)
            model.load_state_dict(state)
        classes = self.loader.classes if self.loader is not None else []
        meta = {
            "classes": [c.to_dict() if hasattr(c, "to_dict") else str(c) for c in classes],
            "class_names": [getattr(c, "scientific_name", str(c)) for c in classes],
            "step": self.step,
            "config": self.cfg.to_dict(),
            "text_types": list(self.text_types or ()),
        }
        self.export_module = model
        return save_model(self.run_dir / "model.pt", model, meta=meta)

    def evaluate(self, tag: str = "final") -> dict[str, Any] | None:
        """Zero-shot top-1/top-5 on the held-out shards (rank 0); None when there is no val data."""
        specs = self._val_specs()
        if not specs or not self.info.is_main:
            return None
        from bioclip_fast.data.loader import make_loader

        model = getattr(self, "export_module", None) if self.engine.kind != "torch" else self.clip
        if model is None:
            return None
        val = make_loader(specs, min(256, max(self.local_batch, 32)), image_size=self.image_size, mean=self.mean,
                          std=self.std, tokenizer=self.tokenizer, train=False, drop_last=False,
                          backend=self.cfg.data_backend, device=self.device, num_workers=0,
                          index_dir=self.cfg.index_dir)
        was_training = model.training
        model.eval()
        model.to(self.device)
        try:
            from bioclip_fast.eval.zeroshot import zero_shot_eval

            res = zero_shot_eval(model, self.tokenizer, val, val.classes, text_types=_text_types_arg(self.cfg.eval_text_types),
                                 templates=self.cfg.eval_templates, device=self.device, progress=False)
        finally:
            model.train(was_training)
        res = {k: v for k, v in res.items()}
        # chance is set by the classifier's width (every class it scores), not by the classes the val images hold
        res["n_classes"] = len(val.classes)
        res["chance_top1"] = 1.0 / max(len(val.classes), 1)
        res["tag"], res["step"] = tag, self.step
        self.report.log_eval(res, self.step, tag)
        return res

    def _finish(self, train_seconds: float) -> dict[str, Any]:
        from bioclip_fast.train.plots import plot_metrics

        model_path = self.export_model()
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "train_seconds": train_seconds,
            "skipped_steps": self.skipped_steps,
            "final_loss": self.report.history[-1]["loss"] if self.report.history else None,
            "engine": self.engine.kind,
            "world_size": self.info.world_size,
            "device": str(self.device),
            "model": self.cfg.model,
            "model_path": str(model_path) if model_path else None,
            "loader_stats": loader_stats_all_ranks(self.loader, self.info),
            "warnings": list(self.warnings),
        }
        if self.report.history:
            tail = self.report.history[-min(len(self.report.history), 20):]
            summary["img_s"] = sum(r["img_s"] for r in tail) / len(tail)
            summary["data_wait_frac"] = self.meter.total_data_wait / max(self.meter.total_time, 1e-9)
        if self.cfg.eval_at_end:
            t = time.perf_counter()
            ev = self.evaluate("final")
            if ev is not None:
                summary["zero_shot"] = ev
                summary["eval_seconds"] = time.perf_counter() - t
        if self.info.is_main:
            records = read_jsonl(self.run_dir / "metrics.jsonl")
            if records:
                summary["plot"] = str(plot_metrics(records, self.run_dir / "loss.png",
                                                   title=f"{self.cfg.model} · {self.engine.kind} · "
                                                         f"{self.info.world_size} rank(s)"))
            atomic_write_json(self.run_dir / "results.json", summary, indent=1, default=str)
        self._end_run()
        if self.info.distributed:
            torch.distributed.barrier()
        return summary


def _text_types_arg(types: list[str]):
    return "all" if list(types) == ["all"] else list(types)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Build a Trainer and run it; returns the summary (also written to <run dir>/results.json)."""
    return Trainer(cfg).fit()
