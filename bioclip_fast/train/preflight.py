"""Preflight: the whole `train` command checked before any work (`validate_static`: no data, devices or processes
needed) and once the world size is known (`validate_runtime`). Every failure is one `ConfigError` naming the key.

Kept apart from `config.py`, which only describes and parses the configuration, so that modules the checks consult
(checkpoints, the run directory, the model and data resolvers) can import the config without a circle.
"""
from __future__ import annotations

from pathlib import Path

from bioclip_fast.errors import ConfigError
from bioclip_fast.train.config import BUNDLED, TrainConfig


def validate_static(cfg: TrainConfig) -> None:
    """Checks that need no data, devices or processes: run before any work starts."""
    def bad(msg: str):
        raise ConfigError(msg)

    from bioclip_fast.model import get_model_config

    try:
        get_model_config(cfg.model)
    except ValueError as e:
        bad(f"model: {e}")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file() and \
            not (Path(cfg.pretrained) / "model.pt").is_file():
        bad(f"pretrained: checkpoint file not found: {cfg.pretrained}")
    if cfg.batch_size <= 0:
        bad(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.epochs <= 0:
        bad(f"epochs must be positive, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        bad(f"max_steps must be positive, got {cfg.max_steps}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        bad(f"max_minutes must be positive, got {cfg.max_minutes}")
    if cfg.schedule_clock == "time" and cfg.max_minutes is None:
        bad("schedule_clock=time needs max_minutes (the schedule runs over that budget)")
    for name in ("lr", "eps"):
        if not getattr(cfg, name) > 0:
            bad(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        bad(f"min_lr must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.warmup_steps < 0:
        bad(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    from bioclip_fast.train.tracking import check_report_to

    check_report_to(cfg.report_to)
    if cfg.weight_decay < 0:
        bad(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        bad(f"grad_clip must be positive, got {cfg.grad_clip}")
    if cfg.grad_cache_chunk < 0:
        bad(f"grad_cache_chunk must be >= 0, got {cfg.grad_cache_chunk}")
    if cfg.max_bad_fraction is not None and not 0 <= cfg.max_bad_fraction <= 1:
        bad(f"max_bad_fraction must be in [0, 1] (or none), got {cfg.max_bad_fraction}")
    if cfg.collapse_window < 0:
        bad(f"collapse_window must be >= 0, got {cfg.collapse_window}")
    if cfg.save_every < 0 or cfg.log_every <= 0 or cfg.keep_checkpoints <= 0 or cfg.eval_every < 0:
        bad("save_every/eval_every must be >= 0, log_every and keep_checkpoints > 0")
    if cfg.num_workers < 0:
        bad(f"num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.threads is not None and cfg.threads <= 0:
        bad(f"threads must be positive, got {cfg.threads}")
    if cfg.replay_batch_size is not None and cfg.replay_batch_size <= 0:
        bad(f"replay_batch_size must be positive, got {cfg.replay_batch_size}")
    for name in ("batch_size_per_gpu", "replay_batch_size_per_gpu"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            bad(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.replay_batch_size is not None and not cfg.replay_data:
        bad("replay_batch_size is set but replay_data is not")
    if cfg.continual_proj is False and cfg.replay_data:
        bad("replay_data needs continual_proj (replay images are projected with visual.continual_proj)")
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        bad(f"deepspeed_config: file not found: {cfg.deepspeed_config}")
    if cfg.deepspeed_config is not None and cfg.engine == "torch":
        bad("deepspeed_config is set but engine=torch")
    if cfg.zero_stage is not None and cfg.engine == "torch":
        bad(f"zero_stage={cfg.zero_stage} needs the deepspeed engine; engine=torch has no ZeRO "
            f"(drop --zero-stage, or use --engine deepspeed)")
    if cfg.engine == "deepspeed" or cfg.zero_stage is not None or cfg.deepspeed_config is not None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            bad("engine=deepspeed (or zero_stage/deepspeed_config) but deepspeed is not installed "
                "(pip install 'bioclip_fast[train]')")
    _check_device(cfg.device)
    if cfg.data_backend == "dali":
        from bioclip_fast.data.decode_dali import dali_import_error

        why = dali_import_error()
        if why is not None:
            bad(f"data_backend=dali but NVIDIA DALI cannot be imported ({why}); use --data-backend cpu or auto")
    if cfg.eval_at_end or cfg.eval_every:
        _check_templates(cfg.eval_templates)
    if cfg.overwrite and cfg.resume:
        bad("overwrite and resume exclude each other: --resume continues the run in --out, --overwrite deletes it")
    if cfg.allow_changed:
        from bioclip_fast.train.rundir import fingerprint_keys

        unknown = [k for k in cfg.allow_changed if k.replace("-", "_") not in fingerprint_keys()]
        if unknown:
            bad(f"allow_changed: {unknown} are not run settings checked on resume; choose from "
                f"{sorted(fingerprint_keys())}")
    if cfg.text_types:
        from bioclip_fast.taxonomy import TEXT_TYPES

        unknown = [t for t in cfg.text_types if t not in TEXT_TYPES]
        if unknown:
            bad(f"text_types: unknown {unknown}; choose from {list(TEXT_TYPES)}")
    from bioclip_fast.taxonomy import TEXT_TYPES as _TT

    if not cfg.eval_text_types or any(t not in _TT for t in cfg.eval_text_types) and cfg.eval_text_types != ["all"]:
        bad(f"eval_text_types: {cfg.eval_text_types} must be 'all' or from {list(_TT)}")
    for name in ("data", "val_data", "replay_data"):
        _check_paths(name, getattr(cfg, name))
    if not cfg.data:
        bad("data: no training shards given")
    if cfg.resume not in (None, "auto"):
        from bioclip_fast.train.checkpoint import find_checkpoint

        if find_checkpoint(cfg.resume) is None:
            bad(f"resume: no complete checkpoint under {cfg.resume}")
    if len(cfg.crop_scale) != 2 or not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        bad(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {cfg.crop_scale}")


def _check_device(spec: str) -> None:
    if spec == "auto":
        return
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ConfigError(f"device: {spec!r} is not supported for training; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but no CUDA GPU is available (torch.cuda.is_available() is False); "
                          f"use --device cpu, or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def _check_templates(spec: str) -> None:
    """The zero-shot templates must resolve and format with one class name (else the eval fails after training)."""
    from bioclip_fast.eval.zeroshot import resolve_templates

    try:
        templates = resolve_templates(spec)
        for t in templates:
            t.format("Danaus plexippus")
    except (ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"eval_templates: {spec!r} is not usable: {type(e).__name__}: {e} (use openai, simple, "
                          f"or a format string with one '{{}}' for the class name)") from None


def _check_paths(name: str, specs: list[str] | None) -> None:
    """Resolve every shard spec now (one directory listing per brace pattern), so a typo fails before any work."""
    if not specs:
        return
    from bioclip_fast.data.shardspec import resolve_shards
    from bioclip_fast.errors import DataError

    real = [s for s in specs if s != BUNDLED]
    if real:
        try:
            resolve_shards(real, name="--" + name.replace("_", "-"))
        except DataError as e:
            raise ConfigError(str(e)) from None


def validate_runtime(cfg: TrainConfig, *, world_size: int, per_rank_batch_min: int = 1) -> None:
    """Checks that depend on the launch (world size)."""
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by the world size {world_size} "
            f"(each rank takes batch_size / world_size samples)"
        )
    local = cfg.batch_size // world_size
    if local < per_rank_batch_min:
        raise ConfigError(f"batch_size={cfg.batch_size} gives {local} samples per rank; need >= {per_rank_batch_min}")
    if cfg.grad_cache_chunk and local % cfg.grad_cache_chunk:
        raise ConfigError(
            f"per-rank batch {local} (batch_size {cfg.batch_size} / world size {world_size}) is not divisible by "
            f"grad_cache_chunk={cfg.grad_cache_chunk}"
        )
    if cfg.replay_data:
        rb = cfg.replay_batch_size or cfg.batch_size
        if rb % world_size:
            raise ConfigError(f"replay_batch_size={rb} is not divisible by the world size {world_size}")
        if cfg.grad_cache_chunk and (rb // world_size) % cfg.grad_cache_chunk:
            raise ConfigError(
                f"per-rank replay batch {rb // world_size} is not divisible by grad_cache_chunk={cfg.grad_cache_chunk}"
            )
