"""open_clip models for BioCLIP-2-style training: creation by name, a `logit_scale` of shape [1] (DeepSpeed cannot
shard 0-dim parameters), the optional `visual.continual_proj` used for experience-replay samples, gradient
checkpointing, a self-describing checkpoint format that needs no hub access to load, and the one resolver of model
strings (what ``--model`` / ``model_str`` accept; pybioclip's and open_clip's forms and ours):

* ``hf-hub:ORG/NAME`` (default ``hf-hub:imageomics/bioclip-2``): the Hugging Face cache first (no network), then a
  download; without either, one line saying so.
* ``local-dir:PATH`` or a plain path to an open_clip hub-snapshot folder (``open_clip_config.json`` +
  ``open_clip_model.safetensors`` and/or ``open_clip_pytorch_model.bin``): loaded by open_clip itself, exactly as
  pybioclip does, with ``weights_only=True`` for ``.bin`` (:mod:`bioclip_fast.hub` reads and writes snapshots).
* an open_clip architecture name (``ViT-B-16``, or our ``bioclip-tiny`` ...) with ``pretrained`` a file or a tag.
* our checkpoints (``model.pt``) and run directories: they describe their architecture.

:func:`parse_model_str` parses a string (nothing loaded), :func:`resolve_model` loads any of them,
:func:`load_model` the paths to weights (checkpoints and snapshots) as ``(model, preprocess, tokenizer, meta)``.
TreeOfLife models (``hf-hub:imageomics/bioclip`` and ``-2``, or snapshots of them in the HF cache) get pybioclip's
squash-to-224 preprocessing and their species table from the matching TreeOfLife dataset repo (see
:mod:`bioclip_fast.predict`).
"""
from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioclip_fast.errors import CheckpointError, UsageError
from bioclip_fast.fileio import atomic_save
from bioclip_fast.hub import (  # noqa: F401 - HUB_CONFIG, export_open_clip: public as bioclip_fast.model.*
    BIOCLIP_MODEL_STR, HUB_CONFIG, TOL_MODELS, LoadedModel, export_open_clip, hf_offline, hf_snapshot,
    is_hub_snapshot, load_hub_snapshot, quiet_open_clip,
)
from bioclip_fast.preprocess import get_tokenizer, image_mean_std, image_transform  # noqa: F401 - public here too
from bioclip_fast.weights import plain_data, read_weights_file

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

    `pretrained` is a local file: one of our checkpoints (`save_model`, or its run directory), an open_clip / OpenAI
    state dict or a ``.safetensors`` file; a checkpoint of another architecture fails with one line ("checkpoint is
    X, model is Y"). `model_cfg` overrides the named config (as stored in our checkpoints, so custom sizes round-trip).
    """
    import open_clip
    from open_clip import factory

    ckpt = None
    if pretrained is not None:
        pretrained = checkpoint_path(pretrained)
        ckpt = read_weights_file(pretrained, mmap=True)
        if model_cfg is None and is_our_checkpoint(ckpt) and ckpt.get("model_name") == model_name:
            model_cfg = ckpt.get("model_cfg")  # the checkpoint's own sizes (a model_cfg override round-trips)
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
        load_weights(model, pretrained, ckpt)
        del ckpt
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


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint (config + weights + meta such as class names), atomically.

    Everything in it is a tensor, a plain container or a scalar: it loads with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_name": getattr(model, "model_name", None),
        "model_cfg": plain_data(getattr(model, "model_cfg", None)),
        "continual_proj": getattr(model.visual, "continual_proj", None) is not None,
        "state_dict": state,
        "meta": plain_data(dict(meta or {})),
    }
    return atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``RUN`` (a run directory) -> ``RUN/model.pt``; a file stays as it is."""
    p = Path(path)
    return p / "model.pt" if p.is_dir() and (p / "model.pt").is_file() else p


def is_our_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    return ckpt.get("format") == CHECKPOINT_FORMAT


def describe_architecture(name: str | None, cfg: Mapping[str, Any] | None) -> str:
    """One short phrase for an architecture: its name and the sizes that decide its weights' shapes."""
    if not cfg:
        return name or "an unknown architecture"
    v, t = cfg.get("vision_cfg", {}) or {}, cfg.get("text_cfg", {}) or {}
    sizes = (
        f"embed {cfg.get('embed_dim')}, vision {v.get('layers')}x{v.get('width')} patch {v.get('patch_size')} "
        f"@{v.get('image_size')}px, text {t.get('layers')}x{t.get('width')} ctx {t.get('context_length')}"
    )
    return f"{name} ({sizes})" if name else sizes


def _describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """The architecture a plain open_clip state dict was saved from, as far as its shapes tell."""
    def shape(k):
        return tuple(state[k].shape) if k in state else None

    conv = shape("visual.conv1.weight")
    proj = shape("text_projection")
    vlayers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    tlayers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    parts = []
    if proj:
        parts.append(f"embed {proj[-1]}")
    if conv:
        parts.append(f"vision {vlayers}x{conv[0]} patch {conv[-1]}")
    if shape("token_embedding.weight"):
        parts.append(f"text {tlayers}x{shape('token_embedding.weight')[1]}")
    return ", ".join(parts) or f"{len(state)} tensors"


def resolve_pretrained(path: str | os.PathLike) -> tuple[str, dict[str, Any] | None, dict[str, torch.Tensor]]:
    """``(model_name, model_cfg, state_dict)`` of our checkpoint (``model.pt`` or its run directory): the architecture
    it describes, so callers (``train --pretrained RUN/model.pt``) build it without being told ``--model``.
    Raises CheckpointError for a file that is not one of ours (it does not say which architecture it holds)."""
    from bioclip_fast.errors import CheckpointError

    path = checkpoint_path(path)
    ckpt = read_weights_file(path, mmap=True)
    if not is_our_checkpoint(ckpt) or not ckpt.get("model_name"):
        raise CheckpointError(f"{path} is not a bioclip_fast checkpoint, so it does not say its architecture; "
                              f"pass --model NAME (its open_clip architecture, e.g. ViT-L-14)")
    return ckpt["model_name"], ckpt.get("model_cfg"), ckpt["state_dict"]


def _state_from(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping):
        raise ValueError("the file holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for key in ("logit_scale", "logit_bias"):  # 0-dim in other open_clip checkpoints -> our [1] shape
        if key in state and isinstance(state[key], torch.Tensor) and state[key].dim() == 0:
            state[key] = state[key].reshape(1)
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, ckpt: Mapping[str, Any] | None = None) -> None:
    """Load weights from our checkpoint, an open_clip/OpenAI state dict (``state_dict`` key or bare) or a
    ``.safetensors`` file. Another architecture's weights fail with one line: "checkpoint is X, model is Y"."""
    from bioclip_fast.errors import CheckpointError

    if ckpt is None:
        ckpt = read_weights_file(path)
    try:
        state = _state_from(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model_name = getattr(model, "model_name", None)
    model_desc = describe_architecture(model_name, getattr(model, "model_cfg", None))
    if is_our_checkpoint(ckpt) and ckpt.get("model_cfg") and getattr(model, "model_cfg", None):
        if _arch_key(ckpt["model_cfg"]) != _arch_key(model.model_cfg):
            raise CheckpointError(f"checkpoint {path} is {describe_architecture(ckpt.get('model_name'), ckpt['model_cfg'])}, "
                                  f"model is {model_desc}")
    has_cp = getattr(model.visual, "continual_proj", None) is not None
    if has_cp and "visual.continual_proj" not in state and "visual.proj" in state:
        state["visual.continual_proj"] = state["visual.proj"].clone()
    if not has_cp:
        state.pop("visual.continual_proj", None)  # the replay projection is only used in training
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        what = describe_architecture(ckpt.get("model_name"), ckpt.get("model_cfg")) if is_our_checkpoint(ckpt) \
            else _describe_state(state)
        raise CheckpointError(
            f"checkpoint {path} is {what}, model is {model_desc} ({len(wrong)} tensors differ, e.g. {k}: "
            f"{list(state[k].shape)} vs {list(own[k].shape)})"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match model {model_desc}: missing {len(missing)} "
            f"({', '.join(missing[:3])}), unexpected {len(unexpected)} ({', '.join(unexpected[:3])})"
        )


def _arch_key(cfg: Mapping[str, Any]) -> str:
    import json

    return json.dumps(plain_data(cfg), sort_keys=True)


# --------------------------------------------------------------------------------------------------------------------
# model strings: one parser, one resolver
# --------------------------------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ModelSource:
    """What a model string names (:func:`parse_model_str`).

    ``kind``: ``hf-hub`` (``location`` = the repo id), ``snapshot`` (an open_clip hub-snapshot folder),
    ``checkpoint`` (a weights file: our ``model.pt`` or a plain state dict / ``.safetensors``) or ``architecture``
    (an open_clip / bioclip_fast architecture name). ``spec`` is the string as given (error messages name it).
    """

    kind: str
    spec: str
    location: str


def parse_model_str(model_str: str | os.PathLike | None, *, architectures: bool = True) -> ModelSource:
    """The one place a model string is parsed; nothing is loaded. ``None`` is ``hf-hub:imageomics/bioclip-2``.

    ``hf-hub:ORG/NAME``; ``local-dir:PATH``; a folder holding ``model.pt`` (our run; it wins over a hub snapshot in
    the same folder) or ``open_clip_config.json`` (a hub snapshot); a file; else an architecture name
    (``ViT-B-16``; open_clip's older ``ViT-B/16`` spelling holds a path separator and is refused as a missing
    path, as before the resolvers were merged). ``architectures=False`` (paths to weights, :func:`load_model`):
    whatever is not a hub source or snapshot folder is a checkpoint path, and reading it says what is wrong with it.
    """
    spec = os.fspath(model_str) if model_str is not None else BIOCLIP_MODEL_STR
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        return ModelSource("hf-hub", spec, spec.removeprefix("hf-hub:"))
    if spec.startswith("local-dir:"):
        return ModelSource("snapshot", spec, str(Path(spec.removeprefix("local-dir:")).expanduser()))
    path = Path(spec).expanduser() if architectures else Path(spec)
    if path.is_dir():
        if (path / "model.pt").is_file():
            return ModelSource("checkpoint", spec, str(path / "model.pt"))
        if is_hub_snapshot(path):
            return ModelSource("snapshot", spec, str(path))
        if architectures:
            raise UsageError(f"--model {spec}: the directory holds neither open_clip_config.json (a hub snapshot) "
                             f"nor model.pt (a bioclip_fast run)")
    if path.is_file() or not architectures:
        return ModelSource("checkpoint", spec, str(path))
    if os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        raise UsageError(f"--model {spec}: no such file or directory")
    name = spec.replace("/", "-")
    if name not in set(list_models()):
        raise UsageError(f"--model {spec}: not a file, folder, hf-hub:/local-dir: source or known architecture "
                         f"(see bioclip-fast list-models)")
    return ModelSource("architecture", spec, name)


def resolve_model(model_str: str | os.PathLike | None = None, pretrained: str | None = None, *,
                  device: str | torch.device = "cpu", model_name: str | None = None) -> LoadedModel:
    """Any model string (:func:`parse_model_str`; ``pretrained`` a file or an open_clip tag for an architecture
    name) as a model in eval mode with its preprocess and tokenizer. ``model_name`` is the architecture of a plain
    state dict. TreeOfLife models (``hf-hub:imageomics/bioclip`` and ``-2``, or their snapshots in the HF cache)
    carry ``tol_repo``, the dataset repo of their species table."""
    source = parse_model_str(model_str)
    if source.kind == "architecture":
        return _load_architecture(source, pretrained, device)
    return _load_source(source, device, model_name)


def load_model(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """Load a model for inference: returns (model in eval mode, eval preprocess, tokenizer, meta).

    ``path``: our checkpoint (``model.pt``) or its run directory — they describe their architecture; an open_clip
    hub snapshot (``local-dir:DIR``, a folder with ``open_clip_config.json``, or ``hf-hub:ORG/NAME`` from the local
    HF cache); a plain open_clip state dict (``.pt``/``.bin``/``.safetensors``) needs ``model_name``.
    """
    loaded = _load_source(parse_model_str(path, architectures=False), device, model_name)
    return loaded.model, loaded.preprocess, loaded.tokenizer, loaded.meta


def _load_source(source: ModelSource, device: str | torch.device, model_name: str | None) -> LoadedModel:
    if source.kind == "hf-hub":
        loaded = load_hub_snapshot(hf_snapshot(source.location), device, source.spec)
        loaded.tol_repo = TOL_MODELS.get(source.spec, loaded.tol_repo)
        return loaded
    if source.kind == "snapshot":
        return load_hub_snapshot(Path(source.location), device, source.spec)
    model, meta = _load_checkpoint(Path(source.location), model_name)
    model = model.to(device).eval()
    return LoadedModel(model, image_transform(model, train=False), get_tokenizer(model), source.spec, "checkpoint",
                       meta)


def _load_checkpoint(path: Path, model_name: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Our checkpoint builds the architecture it describes; a plain state dict needs ``model_name``."""
    ckpt = read_weights_file(path)
    if is_our_checkpoint(ckpt):
        name = ckpt.get("model_name") or model_name or "bioclip-tiny"
        model = create_model(name, model_cfg=ckpt.get("model_cfg"), continual_proj=bool(ckpt.get("continual_proj")))
        load_weights(model, path, ckpt)
        meta = dict(ckpt.get("meta", {}))
    else:
        if model_name is None:
            raise CheckpointError(f"{path} is not a bioclip_fast checkpoint; pass its architecture "
                                  f"(--model NAME --pretrained {path}, or model_name= e.g. 'ViT-L-14')")
        model = create_model(model_name)
        load_weights(model, path, ckpt)
        meta = {}
    del ckpt
    return model, meta


def _load_architecture(source: ModelSource, pretrained: str | None, device: str | torch.device) -> LoadedModel:
    """An architecture name with a pretrained file (ours or a plain state dict), an open_clip tag, or neither."""
    import open_clip

    name, model_str = source.location, source.spec
    if pretrained and Path(pretrained).expanduser().exists():
        model, meta = _load_checkpoint(checkpoint_path(Path(pretrained).expanduser()), name)
        model = model.to(device).eval()
        wanted = get_model_config(name)
        if _arch_key(getattr(model, "model_cfg", wanted)) != _arch_key(wanted):  # our checkpoint says another one
            raise CheckpointError(f"checkpoint {pretrained} is "
                                  f"{describe_architecture(getattr(model, 'model_name', None), model.model_cfg)}, "
                                  f"model is {describe_architecture(name, wanted)}")
        return LoadedModel(model, image_transform(model, train=False), get_tokenizer(model), model_str, "checkpoint",
                           meta)
    tags = [] if name not in open_clip.list_models() else open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None and len(tags) > 1:
        raise UsageError(f"--model {model_str}: multiple pretrained tags available {tags}; pass --pretrained TAG "
                         f"or --pretrained FILE")
    tag = pretrained or (tags[0] if tags else None)
    if tag is None:
        logging.getLogger(__name__).warning("--model %s without --pretrained: randomly initialised weights", name)
        model = create_model(name).to(device).eval()
        return LoadedModel(model, image_transform(model), get_tokenizer(model), model_str, "open_clip")
    if tag not in tags:
        raise UsageError(f"--pretrained {tag}: neither a file nor a tag of {name} (tags: {tags or 'none'})")
    import huggingface_hub.constants as hf_constants

    was_offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = was_offline or hf_offline()  # read at import; honour a later HF_HUB_OFFLINE=1
    try:
        with quiet_open_clip():
            model, preprocess = open_clip.create_model_from_pretrained(name, pretrained=tag, device=device,
                                                                       return_transform=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - no network
        raise CheckpointError(f"--model {name} --pretrained {tag}: cannot download the weights "
                              f"({' '.join(str(e).split())[:160]}); pass --pretrained FILE") from None
    finally:
        hf_constants.HF_HUB_OFFLINE = was_offline
    model.model_name, model.model_cfg = name, open_clip.get_model_config(name)
    return LoadedModel(model.eval(), preprocess, open_clip.get_tokenizer(name), model_str, "open_clip")
