r"""Throughput accounting: model FLOPs per sample from the open_clip config, TFLOP/s, MFU and HFU.

FLOPs formula (a multiply-add = 2 FLOPs; LayerNorm, softmax, GELU and embeddings are ignored, < 1%):

One transformer layer over ``n`` tokens of width ``d`` with MLP ratio ``r``::

    qkv 6·n·d²  +  attn-out 2·n·d²  +  MLP 4·r·n·d²  +  scores QKᵀ 2·n²·d  +  P·V 2·n²·d
    = (8 + 4r)·n·d² + 4·n²·d                  (r = 4: the familiar 24·n·d² + 4·n²·d)

Image tower (ViT, patch ``p``, image ``S``, ``L_v`` layers, ``n_v = (S/p)² + 1`` tokens incl. CLS)::

    F_img = 2·(S/p)²·(3p²)·d_v  [patch conv]  +  L_v·layer(n_v, d_v, r_v)  +  2·d_v·E  [proj]

Text tower (``n_t`` = context length 77, causal mask still computes full n² scores in SDPA)::

    F_txt = L_t·layer(n_t, d_t, r_t) + 2·d_t·E

Contrastive loss per local sample (``B_g`` global batch, ``E`` embed dim): forward logits 2·B_g·E per direction;
world size 1 shares one logit matrix (forward 2·B·E, backward 4·B·E); with the local loss on W > 1 ranks each rank
computes both B_l×B_g matrices::

    F_loss_train = 6·B·E (W = 1)   or   12·B_g·E (W > 1)

Training FLOPs per sample = 3·(F_img + F_txt) + F_loss_train (backward = 2× forward).
ViT-L/14 @ 224: F_img ≈ 162 GFLOP + F_txt ≈ 13 GFLOP → ≈ 526 GFLOP per training sample.

MFU = (samples/s × training FLOPs per sample) ÷ peak dense bf16 FLOP/s of the devices. The numerator counts model
FLOPs only, whatever the implementation does: HFU additionally counts what is executed on top — the recomputed
forward of gradient checkpointing (+1× forward of the towers) and the no-grad first pass of gradient caching
(+1× forward) — and subtracts the text rows skipped by caption de-duplication.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import torch

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per device, from the vendors' data sheets.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    # most specific first: matched as substrings of torch.cuda.get_device_name()
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
]


def peak_tflops_for(device_name: str | None) -> float | None:
    """Peak dense bf16 TFLOP/s for a CUDA device name, or None if unknown (MFU is then not reported)."""
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def layer_flops(n: int, d: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm transformer block over n tokens of width d."""
    return (8 + 4 * mlp_ratio) * n * d * d + 4 * n * n * d


@dataclass(frozen=True)
class ModelFlops:
    image_fwd: float  # per sample
    text_fwd: float  # per sample (one caption)
    embed_dim: int

    @property
    def fwd(self) -> float:
        return self.image_fwd + self.text_fwd

    def loss_train(self, global_batch: int, world_size: int) -> float:
        """Training FLOPs of the contrastive loss per local sample."""
        return (6.0 if world_size == 1 else 12.0) * global_batch * self.embed_dim

    def train_per_sample(self, global_batch: int, world_size: int = 1) -> float:
        """Model FLOPs per training sample (forward + backward = 3x forward), the MFU numerator."""
        return 3 * self.fwd + self.loss_train(global_batch, world_size)

    def executed_per_sample(
        self,
        global_batch: int,
        world_size: int = 1,
        *,
        grad_checkpointing: bool = False,
        grad_cache: bool = False,
        text_fraction: float = 1.0,
    ) -> float:
        """FLOPs actually executed per sample (HFU numerator): recompute passes in, de-duplicated text rows out."""
        passes = 3 + int(grad_checkpointing) + int(grad_cache)
        return passes * (self.image_fwd + text_fraction * self.text_fwd) + self.loss_train(global_batch, world_size)


def _as_size(x: Any) -> int:
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


def model_flops(model_cfg: dict[str, Any]) -> ModelFlops:
    """Forward FLOPs per sample of an open_clip CLIP config (the dict `bioclip_fast.model.get_model_config` returns)."""
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise ValueError("model_cfg must be an open_clip config dict with vision_cfg and text_cfg")
    E = int(model_cfg["embed_dim"])
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if v.get("timm_model_name") or t.get("hf_model_name"):
        raise ValueError("FLOPs formula covers open_clip's own ViT and text transformer, not timm/HF towers")
    S, p = _as_size(v.get("image_size", 224)), _as_size(v.get("patch_size", 16))
    dv, Lv, rv = int(v["width"]), int(v["layers"]), float(v.get("mlp_ratio", 4.0))
    grid = (S // p) ** 2
    n_v = grid + (0 if v.get("no_cls_token") else 1)
    image = 2 * grid * 3 * p * p * dv + Lv * layer_flops(n_v, dv, rv) + 2 * dv * E
    dt, Lt, rt = int(t["width"]), int(t["layers"]), float(t.get("mlp_ratio", 4.0))
    n_t = int(t.get("context_length", 77))
    text = Lt * layer_flops(n_t, dt, rt) + 2 * dt * E
    return ModelFlops(image_fwd=float(image), text_fwd=float(text), embed_dim=E)


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(peak memory in GB, what was measured): CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "cpu_peak_rss"  # ru_maxrss is in KiB


class ThroughputMeter:
    """Per-step timing: data wait vs compute, img/s (global and per rank), TFLOP/s, MFU, HFU.

    Rates are over a sliding window of recent steps so one slow step (a checkpoint, an eval) does not dominate.
    """

    def __init__(
        self,
        flops: ModelFlops,
        *,
        global_batch: int,
        world_size: int,
        peak_tflops: float | None,
        grad_checkpointing: bool = False,
        grad_cache: bool = False,
        window: int = 20,
    ):
        self.flops = flops
        self.global_batch = global_batch
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.grad_checkpointing = grad_checkpointing
        self.grad_cache = grad_cache
        self.window = window
        self._steps: list[tuple[float, float, float]] = []  # (data_wait_s, step_s, text_fraction)
        self.total_data_wait = 0.0
        self.total_time = 0.0

    def record(self, data_wait_s: float, step_s: float, text_fraction: float = 1.0) -> dict[str, float | None]:
        self._steps.append((data_wait_s, step_s, text_fraction))
        if len(self._steps) > self.window:
            self._steps.pop(0)
        self.total_data_wait += data_wait_s
        self.total_time += data_wait_s + step_s
        wait = sum(s[0] for s in self._steps)
        total = wait + sum(s[1] for s in self._steps)
        tf = sum(s[2] for s in self._steps) / len(self._steps)
        samples_per_s = len(self._steps) * self.global_batch / max(total, 1e-9)
        per_rank = samples_per_s / self.world_size
        model_flops_s = per_rank * self.flops.train_per_sample(self.global_batch, self.world_size)
        hw_flops_s = per_rank * self.flops.executed_per_sample(
            self.global_batch, self.world_size, grad_checkpointing=self.grad_checkpointing,
            grad_cache=self.grad_cache, text_fraction=tf,
        )
        out: dict[str, float | None] = {
            "img_s": samples_per_s,
            "img_s_per_rank": per_rank,
            "tflops_per_rank": model_flops_s / 1e12,
            "data_wait_frac": wait / max(total, 1e-9),
            "mfu": None,
            "hfu": None,
        }
        if self.peak_tflops:
            out["mfu"] = model_flops_s / (self.peak_tflops * 1e12)
            out["hfu"] = hw_flops_s / (self.peak_tflops * 1e12)
        return out
