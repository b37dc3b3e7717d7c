"""Training engines: DeepSpeed ZeRO 1/2/3 or plain torch AdamW, behind one small interface.

Both engines step the same `ClipTrainModule`, use the same AdamW parameter groups and the same `WarmupCosine`
schedule, and take one or more micro-backward calls per optimizer step (GradCache issues one per chunk):

    engine.backward(loss)      # accumulate gradients (DeepSpeed: engine.backward + engine.step per micro-step)
    engine.step()              # optimizer + schedule step, logit_scale clamp (at the accumulation boundary)
    engine.skip_step()         # drop the accumulated gradients (non-finite loss with nonfinite=skip)
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioclip_fast.distributed import DistInfo
from bioclip_fast.train.config import ConfigError, TrainConfig


# ---------------------------------------------------------------------------------------------- distributed setup
def init_distributed(info: DistInfo, device: torch.device, use_deepspeed: bool) -> None:
    if torch.distributed.is_initialized() or not (info.distributed or use_deepspeed):
        return
    if not info.distributed:  # DeepSpeed needs a process group even for one process: a private one
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                     ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(k, v)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        torch.distributed.init_process_group(backend=backend)


def resolve_engine_kind(cfg: TrainConfig, info: DistInfo, device: torch.device) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    # DeepSpeed pays off when it shards optimizer state (several ranks) or runs bf16 on a GPU; on one CPU process
    # plain torch AdamW is faster (no flat-buffer copies).
    # Asking for a ZeRO stage asks for DeepSpeed.
    use_ds = info.distributed or device.type == "cuda" or cfg.deepspeed_config or cfg.zero_stage is not None
    return "deepspeed" if use_ds else "torch"


# ---------------------------------------------------------------------------------------------- the train module
class ClipTrainModule(nn.Module):
    """Wraps an open_clip CLIP so that one `forward` computes everything a step needs.

    Going through a single module forward keeps DeepSpeed ZeRO-3 correct: parameters owned by the CLIP root
    (positional_embedding, text_projection, logit_scale) and `visual.continual_proj` are registered as external
    parameters of this module, so ZeRO-3 gathers them for the duration of this forward.
    """

    def __init__(self, clip: nn.Module, *, logit_scale_max: float, dedup_text: bool = True):
        super().__init__()
        self.clip = clip
        self.logit_scale_max = float(logit_scale_max)
        self.dedup_text = dedup_text
        self.last_text_fraction = 1.0  # share of caption rows actually encoded (for HFU)

    def register_zero3_external_params(self) -> None:
        from deepspeed.runtime.zero import register_external_parameter

        for p in self.clip.parameters(recurse=False):
            register_external_parameter(self, p)
        for name in ("proj", "continual_proj"):
            p = getattr(self.clip.visual, name, None)
            if isinstance(p, nn.Parameter):
                register_external_parameter(self, p)

    def _dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype if hasattr(self.clip.visual, "conv1") else torch.float32

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        if self.dedup_text and text.shape[0] > 1:
            # Captions repeat (one per species and caption type): encode each distinct row once and index back.
            # Exact in forward and backward (gradients of repeated rows sum, as they would anyway).
            uniq, inverse = torch.unique(text, dim=0, return_inverse=True)
            self.last_text_fraction = uniq.shape[0] / text.shape[0]
            if uniq.shape[0] < text.shape[0]:
                return self.clip.encode_text(uniq, normalize=True)[inverse]
        else:
            self.last_text_fraction = 1.0
        return self.clip.encode_text(text, normalize=True)

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        replay_image: torch.Tensor | None = None,
        replay_text: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        from bioclip_fast.model import encode_image

        dtype = self._dtype()
        out: dict[str, torch.Tensor] = {}
        if image is not None:
            out["image"] = encode_image(self.clip, image.to(dtype), normalize=True)
        if text is not None:
            out["text"] = self.encode_text(text)
        if replay_image is not None:
            out["replay_image"] = encode_image(self.clip, replay_image.to(dtype), replay=True, normalize=True)
        if replay_text is not None:
            out["replay_text"] = self.encode_text(replay_text)
        # Raw parameter (not exp'd): GradCache needs its gradient. The clamp is the identity (gradient 1) while the
        # post-step clamp keeps the parameter <= max; it guards engines whose master weights we cannot clamp.
        out["logit_scale"] = self.clip.logit_scale.clamp(max=self.logit_scale_max)
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        return out


# ---------------------------------------------------------------------------------------------- optimizer & schedule
def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in open_clip: no weight decay on gains, biases (all <2-D params) and logit_scale/bias."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


class WarmupCosine:
    """Linear warmup then cosine (or constant), by optimizer steps or by wall-clock progress.

    open_clip's convention: step ``s`` (0-based) of warmup uses ``lr·(s+1)/warmup``. Follows the scheduler protocol
    torch and DeepSpeed expect (``step()``, ``get_last_lr()``, ``state_dict()``, ``load_state_dict()``).
    With ``clock="time"`` the post-warmup progress is the elapsed fraction of the time budget, fed by
    ``set_time_progress`` before each step, so a wall-clock-bounded run always ends annealed.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float,
        warmup_steps: int,
        total_steps: int | None,
        min_lr: float = 0.0,
        schedule: str = "cosine",
        clock: str = "steps",
    ):
        if clock == "steps" and schedule == "cosine" and not total_steps:
            raise ConfigError("a step-clocked cosine schedule needs a known number of steps (epochs or max_steps)")
        self.optimizer = optimizer
        self.base_lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.schedule, self.clock = schedule, clock
        self.step_count = 0  # optimizer steps taken
        self.time_progress = 0.0
        self.warmup_end_progress: float | None = None
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.schedule == "const":
            return self.base_lr
        if self.clock == "time":
            p0 = self.warmup_end_progress if self.warmup_end_progress is not None else self.time_progress
            frac = (self.time_progress - p0) / max(1.0 - p0, 1e-9)
        else:
            frac = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        frac = min(max(frac, 0.0), 1.0)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (self.base_lr - self.min_lr)

    def set_time_progress(self, p: float) -> None:
        self.time_progress = float(p)
        if self.step_count >= self.warmup_steps and self.warmup_end_progress is None:
            self.warmup_end_progress = self.time_progress
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]

    def step(self, *args, **kwargs) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "time_progress": self.time_progress,
            "warmup_end_progress": self.warmup_end_progress,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.time_progress = float(state.get("time_progress", 0.0))
        self.warmup_end_progress = state.get("warmup_end_progress")
        self._apply()


def make_adamw(groups, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    # fused: one kernel over all parameters, on GPU and (torch >= 2.4) on CPU, where it is ~4x faster than the
    # multi-pass foreach implementation (the token-embedding table makes the CPU tiny model optimizer-heavy)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device/dtype the fused kernel does not support
        return torch.optim.AdamW(groups, foreach=True, **kw)


# ---------------------------------------------------------------------------------------------- engines
class _EngineBase:
    kind: str
    module: ClipTrainModule
    scheduler: WarmupCosine
    device: torch.device
    info: DistInfo
    micro_steps: int

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def clip(self) -> nn.Module:
        return self.module.clip

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def logit_scale_value(self) -> float:
        raise NotImplementedError


class TorchEngine(_EngineBase):
    """Plain torch AdamW (fused on GPU), bf16 autocast, gradients all-reduced across ranks if distributed."""

    kind = "torch"

    def __init__(self, module: ClipTrainModule, cfg: TrainConfig, *, device, info: DistInfo, total_steps,
                 micro_steps: int = 1):
        self.module, self.cfg, self.device, self.info = module.to(device), cfg, device, info
        self.micro_steps = micro_steps
        self.optimizer = make_adamw(param_groups(module, cfg.weight_decay), cfg, device)
        self.scheduler = WarmupCosine(
            self.optimizer, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr=cfg.min_lr,
            schedule=cfg.schedule, clock=cfg.schedule_clock,
        )
        self.autocast = cfg.precision == "bf16"
        self._grad_norm: torch.Tensor | None = None  # on device; read (host sync) only when a log line asks
        if info.distributed:  # identical initial weights on every rank
            for p in module.parameters():
                torch.distributed.broadcast(p.data, src=0)

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.info.distributed:
            _allreduce_mean([p.grad for p in params])
        if self.cfg.grad_clip:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.module.clip.logit_scale.clamp_(0, self.cfg.logit_scale_max)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def last_grad_norm(self) -> float | None:
        """The last step's gradient norm before clipping (with --grad-clip): a host read, so only at log steps."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def logit_scale_value(self) -> float:
        return float(self.module.clip.logit_scale.detach().float().reshape(-1)[0])

    # checkpoint state (the torch engine writes one file from rank 0; every rank holds the same values)
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.clip.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.clip.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.clip.state_dict().items()}


def _allreduce_mean(grads: list[torch.Tensor]) -> None:
    """Average gradients across ranks in ~64 MB flat buckets (fewer collectives than one per tensor)."""
    world = torch.distributed.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        off = 0
        for g in bucket:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        bucket, size = [], 0

    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size > 64 << 20:
            flush()
    flush()


def deepspeed_config(cfg: TrainConfig, *, world_size: int, micro_batch: int, micro_steps: int) -> dict[str, Any]:
    """DeepSpeed config from the flags; a user JSON (`deepspeed_config`) is the base and must agree on batch keys.

    The optimizer is our torch AdamW (passed as a client optimizer) and the schedule our `WarmupCosine`, so the
    JSON must not define `optimizer`/`scheduler`. GradCache's chunks are DeepSpeed micro-steps
    (gradient_accumulation_steps = chunks per step) whose backward is not rescaled (scale_wrt_gas=False).
    """
    base: dict[str, Any] = {}
    if cfg.deepspeed_config:
        try:
            base = json.loads(Path(cfg.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed_config {cfg.deepspeed_config}: invalid JSON: {e}") from e
        for key in ("optimizer", "scheduler"):
            if key in base:
                raise ConfigError(
                    f"deepspeed_config {cfg.deepspeed_config}: remove {key!r}; the optimizer/schedule come from "
                    f"the training flags (--lr, --beta1, --warmup-steps, ...)"
                )
    want = {
        "train_batch_size": micro_batch * micro_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": micro_steps,
    }
    for key, value in want.items():
        if key in base and base[key] != "auto" and int(base[key]) != value:
            raise ConfigError(
                f"deepspeed_config {cfg.deepspeed_config}: {key}={base[key]} disagrees with the training flags "
                f"(batch_size={cfg.batch_size}, world size {world_size}, grad_cache_chunk={cfg.grad_cache_chunk} "
                f"-> {key}={value})"
            )
    ds = dict(base)
    ds.update(want)
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    if cfg.grad_clip:
        ds["gradient_clipping"] = cfg.grad_clip
    else:
        ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed's own default is 1.0: clipping must be asked for
    ds.setdefault("bf16", {"enabled": cfg.precision == "bf16"})
    ds.setdefault("fp16", {"enabled": False})
    zero = dict(ds.get("zero_optimization", {}))
    if not cfg.deepspeed_config or "stage" not in zero:
        zero["stage"] = cfg.zero_stage if cfg.zero_stage is not None else 2
    zero.setdefault("overlap_comm", True)
    zero.setdefault("contiguous_gradients", True)
    zero.setdefault("reduce_bucket_size", 5e8)
    if zero["stage"] == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds["zero_optimization"] = zero
    return ds


# DeepSpeed's ZeRO partition gathers (steps, ZeRO-3 forwards, checkpoints, exports) call torch's renamed collectives
# by their old names; torch >= 2.12 warns about that on every rank. Not ours to fix and nothing a user can act on:
# silenced for exactly those two messages once a DeepSpeed engine is built (our own collectives use the new names).
_DEEPSPEED_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def quiet_deepspeed_deprecations() -> None:
    warnings.filterwarnings("ignore", message=_DEEPSPEED_DEPRECATIONS, category=FutureWarning)


class DeepSpeedEngineWrapper(_EngineBase):
    kind = "deepspeed"

    def __init__(self, module: ClipTrainModule, cfg: TrainConfig, *, device, info: DistInfo, total_steps,
                 micro_batch: int, micro_steps: int = 1):
        import deepspeed

        quiet_deepspeed_deprecations()
        self.cfg, self.device, self.info, self.micro_steps = cfg, device, info, micro_steps
        self.ds_config = deepspeed_config(cfg, world_size=info.world_size, micro_batch=micro_batch,
                                          micro_steps=micro_steps)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        if self.zero_stage == 3:
            module.register_zero3_external_params()
        module = module.to(device)
        optimizer = make_adamw(param_groups(module, cfg.weight_decay), cfg, device)
        scheduler = WarmupCosine(
            optimizer, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr=cfg.min_lr,
            schedule=cfg.schedule, clock=cfg.schedule_clock,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.module = self.engine.module
        self.scheduler = scheduler
        # the scheduler must drive the param groups DeepSpeed's wrapper optimizer exposes
        self.scheduler.optimizer = self.optimizer
        self.scheduler._apply()
        self._pending = 0
        self.last_grad_norm: float | None = None

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # chunk losses already carry their share of the batch
        self._pending += 1
        if self._pending < self.micro_steps:
            self.engine.step()  # a non-boundary micro-step: DeepSpeed only advances its counters

    def step(self) -> None:
        if self._pending != self.micro_steps:
            raise RuntimeError(f"{self._pending} backward calls before step(); expected {self.micro_steps}")
        self.engine.step()
        self._pending = 0
        gn = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        self.last_grad_norm = float(gn) if gn is not None else None
        self._clamp_logit_scale()

    def skip_step(self) -> None:
        # Drop this step's gradients without an optimizer update: zero grads and rewind DeepSpeed's micro-step count.
        self.engine.zero_grad()
        if hasattr(self.optimizer, "zero_grad"):
            self.optimizer.zero_grad()
        self.engine.micro_steps -= max(self._pending - 1, 0)
        self._pending = 0

    def _clamp_logit_scale(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        p = self.module.clip.logit_scale
        master = safe_get_full_fp32_param(p)
        if master is not None and float(master.max()) > self.cfg.logit_scale_max:
            safe_set_full_fp32_param(p, master.clamp(max=self.cfg.logit_scale_max))
        if self.zero_stage < 3:
            with torch.no_grad():
                p.clamp_(max=self.cfg.logit_scale_max)

    def logit_scale_value(self) -> float:
        from deepspeed.utils import safe_get_full_fp32_param

        v = safe_get_full_fp32_param(self.module.clip.logit_scale)
        if v is None:
            v = self.module.clip.logit_scale
        return float(v.detach().float().reshape(-1)[0])

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full model weights (fp32 master values where DeepSpeed keeps them) on rank 0; None on other ranks."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        params = dict(self.module.clip.named_parameters())
        for name, t in self.module.clip.state_dict().items():
            if name in params:
                full = safe_get_full_fp32_param(params[name])  # collective under ZeRO-3: every rank calls it
                t = full if full is not None else t
            out[name] = t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
        return out if self.info.is_main else None


def build_engine(module: ClipTrainModule, cfg: TrainConfig, *, kind: str, device: torch.device, info: DistInfo,
                 total_steps: int | None, local_batch: int, local_replay_batch: int = 0):
    chunk = cfg.grad_cache_chunk
    if chunk:
        micro_steps = local_batch // chunk + local_replay_batch // chunk
        micro_batch = chunk
    else:
        micro_steps, micro_batch = 1, local_batch
    if kind == "torch":
        return TorchEngine(module, cfg, device=device, info=info, total_steps=total_steps, micro_steps=micro_steps)
    if kind == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ConfigError("engine=deepspeed but deepspeed is not installed (pip install 'bioclip_fast[train]')") from e
        return DeepSpeedEngineWrapper(module, cfg, device=device, info=info, total_steps=total_steps,
                                      micro_batch=micro_batch, micro_steps=micro_steps)
    raise ConfigError(f"engine: unknown engine {kind!r}")
