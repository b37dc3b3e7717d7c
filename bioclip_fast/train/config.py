"""Training configuration: one dataclass, every field a CLI flag (`--lr`, `--zero-stage`, ...) and a YAML/JSON key.

Precedence (later wins): dataclass defaults (= the BioCLIP 2 recipe) < preset < `--config FILE` < explicit CLI flags.

Presets:
- ``bioclip2``: the paper's recipe — ViT-L/14 (initialize it with `--pretrained` = open_clip's `laion2b_s32b_b82k`
  weights file), 2,816 biology + 320 replay images per GPU (on 32 GPUs: global 90,112 + 10,240), gradient
  checkpointing on, AdamW (0.9, 0.98), eps 1e-6, wd 0.2 (not on gains, biases, logit_scale), lr 1e-4, 1,875 warmup
  steps then cosine, bf16, logit_scale clamped to ln(100), DeepSpeed ZeRO-2. An explicit global `--batch-size`
  (or `--replay-batch-size`) replaces the per-GPU figure.
- ``butterflies``: the no-argument CPU run — `bioclip-nano` (32 px ViT) on the bundled butterfly shards, batch 128,
  fp32 (bf16 autocast is slower on CPUs without AVX512-BF16), plain torch fused AdamW (DeepSpeed adds nothing on one
  process), lr 2e-3 with 30 warmup steps, wd 0.1, and a cosine schedule over a fixed 550 steps (about 4 minutes on 2
  idle cores), seeded: the same command gives the same model however busy the machine is. `--max-minutes M` alone
  selects the time-bound schedule instead (the cosine anneals over M minutes of wall clock, so the number of steps,
  and the model, follow the machine's speed); data loading in the main process (the cores go to compute).
  Chosen automatically when no `--data` is given.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from bioclip_fast.errors import ConfigError  # noqa: F401  (defined in errors.py so modules below config can raise it)

BUNDLED = "bundled"  # `data` value meaning the package's bundled butterfly shards


def _f(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if flag is not None:
        meta["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model
    model: str = _f("ViT-L-14", "open_clip model name or a bioclip_fast config (bioclip-nano, bioclip-tiny, bioclip-micro)")
    pretrained: str | None = _f(None, "initialize from a local open_clip / bioclip_fast checkpoint file")
    grad_checkpointing: bool = _f(False, "recompute transformer blocks in backward (less memory, ~1.33x compute)")
    continual_proj: bool | None = _f(None, "add visual.continual_proj for replay images (default: on iff replay data)")
    init_logit_scale: float = _f(math.log(1 / 0.07), "initial logit_scale (log of the inverse temperature)")
    logit_scale_max: float = _f(math.log(100), "clamp logit_scale to at most this after every step (ln 100)")
    # --- data
    data: list[str] = _f([BUNDLED], "training shards: directories, globs, brace patterns ('shard-{000000..021399}"
                         ".tar'), '::'-joined lists, shard-list .txt files, .tar files; or 'bundled'")
    index_dir: str | None = _f(None, "shard index directory written by `bioclip-fast index-shards --out` (default: "
                               "next to the shards)")
    val_data: list[str] | None = _f(None, "held-out shards for zero-shot eval (default: bundled val if data is bundled)")
    replay_data: list[str] | None = _f(None, "experience-replay shards (e.g. LAION), projected with continual_proj")
    replay_batch_size: int | None = _f(None, "GLOBAL replay batch (default: the paper's ratio, 320/2,816 of the "
                                       "biology batch, per GPU)")
    replay_batch_size_per_gpu: int | None = _f(None, "replay images per GPU (preset bioclip2: 320); global = this x "
                                               "world size; overrides replay_batch_size")
    replay_weight: float = _f(1.0, "weight of the replay CLIP loss added to the biology loss")
    text_types: list[str] | None = _f(None, "caption types to draw per step (default: all taxonomy.TEXT_TYPES)")
    data_backend: str = _f("auto", "loader backend", choices=("auto", "dali", "cpu"))
    num_workers: int = _f(4, "data loader worker processes per rank")
    shuffle_buffer: int = _f(5000, "shuffle block size (samples) within each rank's slice of an epoch")
    crop_scale: list[float] = _f([0.9, 1.0], "RandomResizedCrop area range for training images (BioCLIP: 0.9 1.0)")
    max_bad_fraction: float | None = _f(0.01, "bad samples (corrupt images, shards damaged after indexing) are "
                                        "skipped and counted; stop when more than this fraction of an epoch's "
                                        "samples is bad (none = never stop)")
    # --- optimization
    batch_size: int = _f(90112, "GLOBAL biology batch (all ranks); BioCLIP 2: 90,112 = 2,816 per GPU x 32 GPUs")
    batch_size_per_gpu: int | None = _f(None, "biology images per GPU (preset bioclip2: 2,816); global = this x "
                                        "world size; overrides batch_size")
    epochs: int = _f(30, "passes over the training data")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs for the schedule)")
    max_minutes: float | None = _f(None, "wall-clock budget for the training loop (minutes)")
    schedule_clock: str = _f("steps", "schedule progress by optimizer steps or by elapsed/max_minutes",
                             choices=("steps", "time"))
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine")
    warmup_steps: int = _f(1875, "linear warmup steps")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "const"))
    weight_decay: float = _f(0.2, "AdamW weight decay (not applied to 1-D params, biases, logit_scale/bias)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW epsilon")
    grad_clip: float | None = _f(None, "clip the global grad norm to this (default: no clipping)")
    precision: str = _f("bf16", "bf16 (autocast / DeepSpeed bf16 with fp32 master weights) or fp32",
                        choices=("bf16", "fp32"))
    # --- loss
    loss: str = _f("fused", "contrastive loss implementation (open_clip = reference ClipLoss)",
                   choices=("fused", "open_clip"))
    local_loss: bool = _f(True, "each rank computes loss rows for its own samples only")
    gather_with_grad: bool = _f(True, "all-gather features with gradient (needed for exact local loss)")
    grad_cache_chunk: int = _f(0, "GradCache: encode the per-rank batch in chunks of this many samples (0 = off)")
    dedup_text: bool = _f(True, "encode each distinct caption once per step (exact; captions repeat per species)")
    # --- engine
    engine: str = _f("auto", "deepspeed, torch (plain AdamW), or auto (deepspeed when >1 process or on GPU)",
                     choices=("auto", "deepspeed", "torch"))
    zero_stage: int | None = _f(None, "DeepSpeed ZeRO stage (default 2; giving it selects the deepspeed engine)",
                                choices=(0, 1, 2, 3))
    deepspeed_config: str | None = _f(None, "DeepSpeed JSON to start from (batch/optimizer keys are checked)")
    # --- runtime
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = _f(None, "torch CPU threads (default: all cores)")
    channels_last: bool = _f(False, "channels_last memory format for images")
    seed: int = _f(0, "seed for init, data order, augmentation and caption types")
    out: str | None = _f(None, "run directory (default: runs/<timestamp>)")
    resume: str | None = _f(None, "'auto' (the newest intact checkpoint in --out, if any), a run dir, or a checkpoint dir")
    overwrite: bool = _f(False, "start over in a non-empty --out: delete its checkpoints, metrics and model first")
    allow_changed: list[str] | None = _f(None, "on resume, settings that may differ from the checkpoint's "
                                          "(e.g. max_steps for a longer run); any other change is refused")
    save_every: int = _f(1000, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "keep this many most recent checkpoints")
    log_every: int = _f(1, "log a JSONL record every N steps")
    nonfinite: str = _f("error", "non-finite loss: stop with an error, or skip the step", choices=("error", "skip"))
    max_nonfinite_skips: int = _f(10, "with nonfinite=skip: consecutive skipped steps before giving up")
    collapse_window: int = _f(200, "warn when the loss stays within 1 percent of ln(batch) (chance) for this many steps "
                              "after warmup (0 = off)")
    eval_at_end: bool = _f(True, "zero-shot top-1/top-5 on val_data at the end (results.json)")
    eval_every: int = _f(0, "also run the zero-shot eval every N steps (0 = only at the end)")
    eval_text_types: list[str] = _f(["taxonomic_common"], "caption types averaged into the zero-shot classifier "
                                    "(BioCLIP: taxonomic_common), or 'all'")
    eval_templates: str = _f("openai", "zero-shot templates: openai (80, BioCLIP's protocol), simple "
                             "('a photo of {}.', the training template) or a '{}' format string")
    peak_tflops: float | None = _f(None, "peak dense bf16 TFLOP/s per device for MFU (default: by GPU name)")
    progress: bool = _f(True, "tqdm progress bar")
    # --- experiment tracking (rank 0; the metrics.jsonl scalars, at the same global step)
    report_to: list[str] | None = _f(None, "also log to: tensorboard (event files in <out>/tensorboard), wandb "
                                     "(offline unless WANDB_MODE=online; <out>/wandb); e.g. tensorboard,wandb")
    wandb_project: str = _f("bioclip_fast", "W&B project (with --report-to wandb)")
    preset: str | None = _f(None, "bioclip2 (the recipe, = defaults) or butterflies (the no-argument CPU run)",
                            choices=("bioclip2", "butterflies"))

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        cfg = cls()
        cfg.update(d, source=source)
        return cfg

    def update(self, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        names = {f.name for f in fields(self)}
        hints = get_type_hints(type(self))
        for key, value in d.items():
            name = key.replace("-", "_")
            if name not in names:
                close = [n for n in names if n.split("_")[0] == name.split("_")[0]]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
            setattr(self, name, _coerce(name, value, hints[name], source))
        return self

    @property
    def uses_bundled_data(self) -> bool:
        return list(self.data) == [BUNDLED]


# BioCLIP 2 (arXiv 2505.23883): 32 GPUs x (2,816 biology + 320 replay) images
PAPER_GPUS, PAPER_BATCH_PER_GPU, PAPER_REPLAY_PER_GPU = 32, 2816, 320

PRESETS: dict[str, dict[str, Any]] = {
    "bioclip2": {"model": "ViT-L-14", "batch_size_per_gpu": PAPER_BATCH_PER_GPU,
                 "replay_batch_size_per_gpu": PAPER_REPLAY_PER_GPU, "grad_checkpointing": True, "precision": "bf16"},
    "butterflies": {
        "model": "bioclip-nano",
        "data": [BUNDLED],
        "batch_size": 128,  # more in-batch negatives: 62% top-1 vs 48% with 64 in 2-minute runs (shared VM, noisy)
        "max_steps": 550,  # ~4 minutes at BUTTERFLIES_STEPS_PER_S, + ~15 s start-up and ~5 s zero-shot eval
        "epochs": 1000,  # bounds a time-bound run (--max-minutes)
        "schedule_clock": "steps",
        "lr": 2e-3,
        "warmup_steps": 30,
        "weight_decay": 0.1,
        "precision": "fp32",
        "engine": "torch",
        "num_workers": 0,
        "shuffle_buffer": 1000,
        "save_every": 0,
        "keep_checkpoints": 1,
    },
}


# The butterflies preset's training speed on 2 idle cores (the CI machine: 591 steps in 4.25 minutes); used only to
# say up front how long the run will take.
BUTTERFLIES_STEPS_PER_S = 2.3


def duration_note(cfg: "TrainConfig", total_steps: int | None) -> str:
    """How long a run will take, said before it starts: its steps (and, for the butterflies demo as preset, minutes on
    2 idle cores), or the wall-clock budget of a time-bound schedule."""
    if cfg.schedule_clock == "time":
        return (f"for {cfg.max_minutes:g} minutes (time-bound schedule: the number of steps, and the model, follow "
                "the machine's speed)")
    if total_steps is None:
        return "until the data ends"
    note = f"{total_steps} steps"
    demo = PRESETS["butterflies"]
    if cfg.preset == "butterflies" and all(getattr(cfg, k) == demo[k] for k in ("model", "batch_size", "precision")):
        note += f", about {total_steps / BUTTERFLIES_STEPS_PER_S / 60:.1f} minutes on 2 idle CPU cores"
    if cfg.max_minutes:
        note += f" (or {cfg.max_minutes:g} minutes, whichever comes first)"
    return note


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); `X` -> (X, False)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(get_args(hint))
    return hint, False


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Coerce a YAML/JSON/CLI value to the field's annotated type, or raise ConfigError naming the key."""
    base, optional = unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be null")
    origin = get_origin(base)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            item = (get_args(base) or (str,))[0]
            return [item(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: {name}={value!r} is not a valid {getattr(base, '__name__', base)}")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of TrainConfig keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: invalid JSON: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def resolve_config(
    cli: dict[str, Any] | None = None, *, config_file: str | os.PathLike | None = None
) -> TrainConfig:
    """Build the effective config: defaults < preset < config file < CLI (only explicitly given flags)."""
    cli = dict(cli or {})
    file_values = load_config_file(config_file) if config_file else {}
    preset = cli.get("preset") or file_values.get("preset")
    if preset is None:
        data_given = "data" in cli or "data" in file_values
        preset = "bioclip2" if data_given else "butterflies"
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = TrainConfig()
    cfg.update(PRESETS[preset], source=f"preset {preset}")
    cfg.update(file_values, source=str(config_file))
    cfg.update(cli, source="command line")
    cfg.preset = preset
    given = {k.replace("-", "_") for k in (*file_values, *cli)}
    if preset == "butterflies" and "max_minutes" in given and cfg.max_minutes and not given & {"schedule_clock",
                                                                                                 "max_steps"}:
        cfg.schedule_clock, cfg.max_steps = "time", None  # the demo's time-bound schedule, as before (an option)
    for glob_key, gpu_key in (("batch_size", "batch_size_per_gpu"), ("replay_batch_size", "replay_batch_size_per_gpu")):
        if glob_key in given and gpu_key in given and cfg.__dict__[gpu_key] is not None:
            raise ConfigError(f"give either {glob_key} (global) or {gpu_key}, not both")
        if glob_key in given and gpu_key not in given:
            setattr(cfg, gpu_key, None)  # an explicit global batch replaces the preset's per-GPU figure
    if given & {"batch_size", "batch_size_per_gpu"} and not given & {"replay_batch_size", "replay_batch_size_per_gpu"}:
        cfg.replay_batch_size_per_gpu = None  # a changed biology batch: replay follows the paper's 320/2,816 ratio
    if cfg.pretrained and "model" not in cli and "model" not in file_values:
        cfg.model = pretrained_model_name(cfg.pretrained) or cfg.model  # our checkpoints say their architecture
    return cfg


def resolve_batches(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """Per-GPU and global biology/replay batches for a world size; sets cfg.batch_size / replay_batch_size (global).

    The replay batch defaults to the paper's 320/2,816 of the per-GPU biology batch (at least 1 per GPU)."""
    if cfg.batch_size_per_gpu is not None:
        cfg.batch_size = cfg.batch_size_per_gpu * world_size
    per_gpu = cfg.batch_size // world_size if cfg.batch_size % world_size == 0 else cfg.batch_size / world_size
    out = {"world_size": world_size, "batch_per_gpu": per_gpu, "batch_global": cfg.batch_size,
           "replay_per_gpu": 0, "replay_global": 0}
    if cfg.replay_data:
        if cfg.replay_batch_size_per_gpu is not None:
            cfg.replay_batch_size = cfg.replay_batch_size_per_gpu * world_size
        elif cfg.replay_batch_size is None:
            per = max(1, round(cfg.batch_size / world_size * PAPER_REPLAY_PER_GPU / PAPER_BATCH_PER_GPU))
            cfg.replay_batch_size = per * world_size
        out["replay_global"] = cfg.replay_batch_size
        out["replay_per_gpu"] = cfg.replay_batch_size / world_size
        if cfg.replay_batch_size % world_size == 0:
            out["replay_per_gpu"] = cfg.replay_batch_size // world_size
    return out


def pretrained_model_name(path: str) -> str | None:
    """The architecture our checkpoint (or run dir) describes; None for other files (they need --model)."""
    from bioclip_fast.errors import CheckpointError
    from bioclip_fast.model import resolve_pretrained

    if not Path(path).exists():
        return None  # validate_static names the missing file
    try:
        return resolve_pretrained(path)[0]
    except CheckpointError:
        return None


def field_specs() -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """(name, type hint, default, metadata) for every config field: the CLI builds its flags from this."""
    hints = get_type_hints(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, hints[f.name], default, dict(f.metadata)))
    return out
