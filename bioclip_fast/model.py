"""open_clip models for BioCLIP-2-style training: creation by name, a `logit_scale` of shape [1] (DeepSpeed cannot
shard 0-dim parameters), the optional `visual.continual_proj` used for experience-replay samples, gradient
checkpointing, and a self-describing checkpoint format that needs no hub access to load.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import tempfile
from pathlib import Path
from collections.abc import Mapping
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


def _plain(obj: Any) -> Any:
    """Meta as plain containers and scalars, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalar
        return obj.item()
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    return str(obj)  # Path, Enum, ...: their text


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint (config + weights + meta such as class names), atomically.

    Everything in it is a tensor, a plain container or a scalar: it loads with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_name": getattr(model, "model_name", None),
            "model_cfg": _plain(getattr(model, "model_cfg", None)),
            "continual_proj": getattr(model.visual, "continual_proj", None) is not None,
            "state_dict": state,
            "meta": _plain(dict(meta or {})),
        },
        path,
    )
    return path


def read_weights_file(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """A weights file as a dict, never unpickling arbitrary objects: ``.safetensors`` via safetensors, anything else
    through ``torch.load(weights_only=True)`` (tensors, plain containers and scalars only)."""
    from bioclip_fast.errors import CheckpointError

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a weights file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"could not read {path}: {_first_line(e)}") from e
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - unsafe pickle, truncated zip, garbage bytes, ...
        if mmap and not isinstance(e, pickle.UnpicklingError):  # e.g. a legacy (non-zip) torch.save file
            return read_weights_file(path, mmap=False)
        raise CheckpointError(_unreadable_weights(path, e)) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def unpickled_objects(e: BaseException) -> str | None:
    """For torch.load(weights_only=True)'s refusal of a pickle that holds objects other than tensors: the object's
    name (or ""); None when the error says something else (random bytes, text, a truncated archive)."""
    import re

    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    if "unrecognized function" in text or "Unsupported class" in text:
        return ""
    return None


def _pickled_objects_in(path: str | os.PathLike) -> str | None:
    """For a file torch's weights-only loader could not parse: when it is a complete pickle stream (read with
    pickletools, which executes nothing), the first global it imports outside torch/collections (or ""); None when it
    is not a pickle at all (random bytes, text)."""
    import pickletools

    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # PROTO: every pickle of protocol >= 2 (torch.save's) starts with it
                return None
            f.seek(0)
            strings: list[str] = []
            names: list[str] = []
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - not a (complete) pickle
        return None
    foreign = [n for n in names if not n.startswith(("torch.", "collections."))]
    return foreign[0] if foreign else ""


def _unreadable_weights(path: Path, e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file: objects it will not unpickle (named), or not a weights file
    at all (random bytes, text, a truncated archive)."""
    import re

    text = str(e)
    found = unpickled_objects(e)
    if found is None:
        found = _pickled_objects_in(path)
    if found is not None:
        what = f" ({found})" if found else ""
        return (f"refusing to load {path}: it holds Python objects other than tensors and plain containers{what}, and "
                f"weights are never unpickled blindly; re-save it as a state dict or .safetensors")
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = reason.group(1).strip() if reason else _first_line(e)
    try:
        size = f"{path.stat().st_size} bytes"
    except OSError:
        size = "size unknown"
    return (f"{path} is not a readable checkpoint or weights file (not a torch.save archive of tensors, nor "
            f".safetensors; {size}; torch.load: {type(e).__name__}: {reason})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


_read_checkpoint = read_weights_file  # older name


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

    return json.dumps(_plain(cfg), sort_keys=True)


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
    from bioclip_fast.errors import CheckpointError

    spec = str(path)
    if spec.startswith(("local-dir:", "hf-hub:")) or (Path(spec).is_dir() and not (Path(spec) / "model.pt").exists()
                                                      and (Path(spec) / "open_clip_config.json").is_file()):
        from bioclip_fast import hub  # released weights as open_clip hub snapshots (pybioclip's model strings)

        loaded = hub.load(spec, device=device)
        return loaded.model, loaded.preprocess, loaded.tokenizer, loaded.meta
    path = checkpoint_path(path)
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
    model = model.to(device).eval()
    return model, image_transform(model, train=False), get_tokenizer(model), meta


# --------------------------------------------------------------------------------------------------------------------
# open_clip hub-snapshot export
# --------------------------------------------------------------------------------------------------------------------
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = "open_clip_model.safetensors"
META_FILE = "bioclip_fast_meta.json"  # our extra: the label set etc., ignored by open_clip


def export_open_clip(model: nn.Module, out: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``out/`` as an open_clip hub snapshot: ``open_clip_config.json`` (the full ``model_cfg`` and the
    preprocess config, so no registration is needed) and ``open_clip_model.safetensors``. ``visual.continual_proj``
    (a training-only replay projection plain open_clip does not know) is dropped; ``logit_scale`` is saved 0-dim as
    open_clip creates it. Loads with ``open_clip.create_model_from_pretrained("local-dir:OUT")``."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    cfg = getattr(model, "model_cfg", None)
    if not cfg:
        raise ValueError("the model has no model_cfg to export (create it with bioclip_fast.model.create_model)")
    mean, std = image_mean_std(model)
    size = model.visual.image_size
    pp = {"mean": list(mean), "std": list(std), "interpolation": "bicubic", "resize_mode": "shortest",
          "size": list(size) if isinstance(size, (tuple, list)) else int(size)}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if k != "visual.continual_proj"}
    for key in ("logit_scale", "logit_bias"):
        if key in state and state[key].numel() == 1:
            state[key] = state[key].reshape(())
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}."))
    try:
        save_file(state, str(tmp / HUB_WEIGHTS), metadata={"format": "pt"})
        (tmp / HUB_CONFIG).write_text(json.dumps({"model_cfg": _plain(cfg), "preprocess_cfg": pp}, indent=2) + "\n")
        if meta:
            (tmp / META_FILE).write_text(json.dumps(
                {"model_name": getattr(model, "model_name", None), **_plain(dict(meta))}, indent=1) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
