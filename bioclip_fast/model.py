"""open_clip models for BioCLIP-2-style training: creation by name, a `logit_scale` of shape [1] (DeepSpeed cannot
shard 0-dim parameters), the optional `visual.continual_proj` used for experience-replay samples, gradient
checkpointing, and a self-describing checkpoint format that needs no hub access to load.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "bioclip_fast/model/1"

# Small configs for CPU runs and tests, in open_clip's config layout. `bioclip-tiny` is the CPU default.
CUSTOM_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "bioclip-tiny": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
    },
    # The no-argument CPU training default (`bioclip-fast train`): 32 px images in 16 patches keep a step cheap
    # enough for ~20 epochs of the bundled butterflies per 2 CPU-minutes; the text tower only has to tell ~50
    # captions apart, so it is slim, with a 48-token context (the longest butterfly caption + template is ~45).
    "bioclip-nano": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
    },
    "bioclip-micro": {  # for unit tests: a forward+backward in milliseconds
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    },
}


def list_models() -> list[str]:
    import open_clip

    return sorted(CUSTOM_MODEL_CONFIGS) + open_clip.list_models()


def _register_custom_configs() -> None:
    from open_clip import factory

    for name, cfg in CUSTOM_MODEL_CONFIGS.items():
        factory._MODEL_CONFIGS.setdefault(name, copy.deepcopy(cfg))


def get_model_config(model_name: str) -> dict[str, Any]:
    import open_clip

    _register_custom_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(
            f"unknown model {model_name!r}; choose one of bioclip_fast.model.list_models() "
            f"(e.g. 'bioclip-tiny', 'ViT-B-16', 'ViT-L-14')"
        )
    return copy.deepcopy(cfg)


def _drop_no_pretrained_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No pretrained weights loaded")


def create_model(
    model_name: str = "bioclip-tiny",
    *,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    continual_proj: bool = False,
    grad_checkpointing: bool = False,
    model_cfg: dict[str, Any] | None = None,
    init_logit_scale: float = math.log(1 / 0.07),
) -> nn.Module:
    """Create an open_clip CLIP model with a [1]-shaped `logit_scale`.

    `pretrained` is a local file: one of our checkpoints (`save_model`) or an open_clip / OpenAI state dict.
    `model_cfg` overrides the named config (as stored in our checkpoints, so custom sizes round-trip).
    """
    import open_clip
    from open_clip import factory

    cfg = copy.deepcopy(model_cfg) if model_cfg is not None else get_model_config(model_name)
    name = f"_bioclip_fast_{model_name}_{abs(hash(repr(sorted(cfg.items(), key=str))))}"
    factory._MODEL_CONFIGS[name] = cfg  # open_clip builds from its registry; a private name keeps overrides apart
    root = logging.getLogger()
    root.addFilter(_drop_no_pretrained_warning)  # we load weights ourselves below; the warning would mislead
    try:
        model = open_clip.create_model(
            name, precision=precision, device=device, nonscalar_logit_scale=True, init_logit_scale=init_logit_scale
        )
    finally:
        factory._MODEL_CONFIGS.pop(name, None)
        root.removeFilter(_drop_no_pretrained_warning)
    model.model_name = model_name
    model.model_cfg = cfg
    if continual_proj:
        add_continual_proj(model)
    if pretrained is not None:
        load_weights(model, pretrained)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def add_continual_proj(model: nn.Module) -> None:
    """Add `visual.continual_proj`, a trainable copy of `visual.proj` through which replay images are projected."""
    visual = model.visual
    if getattr(visual, "proj", None) is None:
        raise ValueError("model.visual has no `proj` to copy; continual_proj needs a ViT image tower")
    if getattr(visual, "continual_proj", None) is None:
        visual.continual_proj = nn.Parameter(visual.proj.detach().clone())


def encode_image(model: nn.Module, images: torch.Tensor, *, replay: bool = False, normalize: bool = True) -> torch.Tensor:
    """Image features; `replay=True` projects with `visual.continual_proj` instead of `visual.proj`."""
    if replay:
        proj = getattr(model.visual, "continual_proj", None)
        if proj is None:
            raise ValueError("replay=True needs a model created with continual_proj=True")
        feats = torch.func.functional_call(model.visual, {"proj": proj}, (images,), strict=False)
    else:
        feats = model.visual(images)
    return nn.functional.normalize(feats, dim=-1) if normalize else feats


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint (config + weights + meta such as class names), atomically."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_name": getattr(model, "model_name", None),
            "model_cfg": getattr(model, "model_cfg", None),
            "continual_proj": getattr(model.visual, "continual_proj", None) is not None,
            "state_dict": state,
            "meta": dict(meta or {}),
        },
        path,
    )
    return path


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights from our checkpoint or an open_clip/OpenAI state dict (`state_dict` key or bare)."""
    ckpt = _read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # 0-dim logit_scale/bias from other open_clip checkpoints -> our [1] shape
    for key in ("logit_scale", "logit_bias"):
        if key in state and state[key].dim() == 0:
            state[key] = state[key].reshape(1)
    has_cp = getattr(model.visual, "continual_proj", None) is not None
    if has_cp and "visual.continual_proj" not in state and "visual.proj" in state:
        state["visual.continual_proj"] = state["visual.proj"].clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing={missing[:8]} unexpected={unexpected[:8]}")


def load_model(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """Load a model for inference: returns (model in eval mode, eval preprocess, tokenizer, meta).

    Our checkpoints describe themselves; a plain open_clip state dict needs `model_name`.
    """
    import open_clip

    ckpt = _read_checkpoint(path)
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        name = ckpt.get("model_name") or model_name or "bioclip-tiny"
        model = create_model(name, model_cfg=ckpt.get("model_cfg"), continual_proj=bool(ckpt.get("continual_proj")))
        load_weights(model, path)
        meta = dict(ckpt.get("meta", {}))
    else:
        if model_name is None:
            raise ValueError(f"{path} is not a bioclip_fast checkpoint; pass model_name= (e.g. 'ViT-L-14')")
        model = create_model(model_name, pretrained=path)
        meta = {}
    model = model.to(device).eval()
    return model, image_transform(model, train=False), get_tokenizer(model), meta


def image_transform(model: nn.Module, train: bool = False):
    """torchvision transform matching the model's image size and normalization."""
    import open_clip

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    return open_clip.image_transform(size, is_train=train, mean=mean, std=std)


def get_tokenizer(model: nn.Module):
    """The open_clip tokenizer for the model's text tower (CLIP BPE, no hub access)."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)


def image_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import open_clip

    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    return tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
