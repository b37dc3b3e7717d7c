"""Models as users have them: what ``--model`` / ``model_str`` accept (pybioclip's and open_clip's forms and ours).

* ``hf-hub:ORG/NAME`` (default ``hf-hub:imageomics/bioclip-2``): the Hugging Face cache first (no network), then a
  download; without either, one line saying so.
* ``local-dir:PATH`` or a plain path to an open_clip hub-snapshot folder (``open_clip_config.json`` +
  ``open_clip_model.safetensors`` and/or ``open_clip_pytorch_model.bin``): loaded by open_clip itself, exactly as
  pybioclip does, with ``weights_only=True`` for ``.bin``.
* an open_clip architecture name (``ViT-B-16``, or our ``bioclip-tiny`` ...) with ``pretrained`` a file or a tag.
* our checkpoints (``model.pt``) and run directories: they describe their architecture.

TreeOfLife models (``hf-hub:imageomics/bioclip`` and ``-2``, or snapshots of them in the HF cache) get pybioclip's
squash-to-224 preprocessing and their species table from the matching TreeOfLife dataset repo.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioclip_fast.errors import CheckpointError, UsageError

BIOCLIP_V1_MODEL_STR = "hf-hub:imageomics/bioclip"
BIOCLIP_V2_MODEL_STR = "hf-hub:imageomics/bioclip-2"
BIOCLIP_MODEL_STR = BIOCLIP_V2_MODEL_STR
TOL_MODELS = {BIOCLIP_V1_MODEL_STR: "imageomics/TreeOfLife-10M", BIOCLIP_V2_MODEL_STR: "imageomics/TreeOfLife-200M"}
TOL_EMBEDDINGS = ("embeddings/txt_emb_species.npy", "embeddings/txt_emb_species.json")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Any
    tokenizer: Any
    model_str: str
    kind: str  # "hub-snapshot" | "checkpoint" | "open_clip"
    meta: dict[str, Any] = field(default_factory=dict)
    tol_repo: str | None = None  # the TreeOfLife dataset repo of a TreeOfLife model


def squash_preprocess(size: int = 224):
    """pybioclip's ``preprocess_img`` for TreeOfLife models: no crop, the whole image squashed to 224x224 (or the
    model's input size, for models of another size used with a species table)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize((size, size), antialias=True),
        transforms.Normalize(mean=OPENAI_MEAN, std=OPENAI_STD),
    ])


def hf_cache_dir() -> str:
    """The Hugging Face hub cache as huggingface_hub resolves it, read now (tests and users may set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hf_snapshot(repo_id: str, *, repo_type: str = "model", files: tuple[str, ...] | None = None) -> Path:
    """A hub repo's local snapshot folder: from the cache (no network), else downloaded; one line when neither."""
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = hf_cache_dir()
    try:
        if files:
            paths = [hf_hub_download(repo_id, f, repo_type=repo_type, cache_dir=cache, local_files_only=True)
                     for f in files]
            return Path(paths[0]).parents[len(Path(files[0]).parts) - 1]
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - not cached: try the network unless offline
        if _offline():
            raise CheckpointError(
                f"{repo_id} ({repo_type}) is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                f"download it where there is network, or pass a local folder"
            ) from cached_error
    try:
        if files:
            paths = [hf_hub_download(repo_id, f, repo_type=repo_type, cache_dir=cache) for f in files]
            return Path(paths[0]).parents[len(Path(files[0]).parts) - 1]
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache))
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot get {repo_id} ({repo_type}): not in the Hugging Face cache {cache} and the download failed "
            f"({type(e).__name__}: {msg}); download it where there is network, or pass a local folder"
        ) from None


def is_hub_snapshot(path: str | os.PathLike) -> bool:
    return (Path(path) / "open_clip_config.json").is_file()


def _tol_repo_of_snapshot(path: Path) -> str | None:
    """A snapshot inside the HF cache of imageomics/bioclip(-2) is that TreeOfLife model."""
    for model_str, repo in TOL_MODELS.items():
        tag = "models--" + model_str.removeprefix("hf-hub:").replace("/", "--")
        if tag in path.resolve().parts:
            return repo
    return None


def load_hub_snapshot(path: str | os.PathLike, device: str | torch.device, model_str: str) -> LoadedModel:
    import open_clip

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--model {model_str}: no such directory: {path}")
    if not is_hub_snapshot(path):
        raise UsageError(f"--model {model_str}: {path} has no open_clip_config.json (not an open_clip hub snapshot)")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
    if not weights:
        raise CheckpointError(f"--model {model_str}: {path} has no weights (open_clip_model.safetensors or "
                              f"open_clip_pytorch_model.bin)")
    try:
        with _quiet_open_clip():
            model, preprocess = open_clip.create_model_from_pretrained(
                f"local-dir:{path}", device=device, return_transform=True, weights_only=True)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as e:  # noqa: BLE001 - corrupt weights, wrong shapes, unsafe pickle
        import pickle

        text = " ".join(str(e).split())[:240]
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
            from bioclip_fast.model import _pickled_objects_in, unpickled_objects

            objects = unpickled_objects(e) is not None or any(
                _pickled_objects_in(w) is not None for w in weights if w.suffix != ".safetensors")
            text = ("the .bin holds Python objects other than tensors; weights are never unpickled blindly" if objects
                    else "the .bin is not a readable weights file (not a torch.save archive of tensors)")
        raise CheckpointError(f"--model {model_str}: cannot load the open_clip snapshot {path}: {text}") from None
    import json

    cfg = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8"))
    model.model_cfg = cfg.get("model_cfg")
    meta: dict[str, Any] = {}
    meta_file = path / "bioclip_fast_meta.json"  # written by `bioclip-fast export`: the label set
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    model.model_name = meta.get("model_name") or model_str
    return LoadedModel(model.eval(), preprocess, tokenizer, model_str, "hub-snapshot", meta,
                       tol_repo=_tol_repo_of_snapshot(path))


class _quiet_open_clip:
    """open_clip logs INFO/WARNING lines while loading a snapshot; keep the user's terminal to our own lines."""

    def __enter__(self):
        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(max(self.level, logging.CRITICAL))  # its errors come back as exceptions, named by us

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def load(model_str: str | None = None, pretrained: str | None = None, *, device: str | torch.device = "cpu",
         model_name: str | None = None) -> LoadedModel:
    """Resolve ``model_str`` (+ ``pretrained``) to a model in eval mode with its preprocess and tokenizer."""
    import open_clip

    from bioclip_fast.model import checkpoint_path, get_tokenizer, image_transform, list_models, load_model

    model_str = str(model_str or BIOCLIP_MODEL_STR)
    if model_str.startswith("hf-hub:"):
        repo = model_str.removeprefix("hf-hub:")
        snap = hf_snapshot(repo)
        loaded = load_hub_snapshot(snap, device, model_str)
        loaded.tol_repo = TOL_MODELS.get(model_str, loaded.tol_repo)
        return loaded
    if model_str.startswith("local-dir:"):
        return load_hub_snapshot(Path(model_str.removeprefix("local-dir:")).expanduser(), device, model_str)
    path = Path(model_str).expanduser()
    if path.is_dir():
        if is_hub_snapshot(path):
            return load_hub_snapshot(path, device, model_str)
        if (path / "model.pt").is_file():
            model, preprocess, tokenizer, meta = load_model(path, device=device)
            return LoadedModel(model, preprocess, tokenizer, model_str, "checkpoint", meta)
        raise UsageError(f"--model {model_str}: the directory holds neither open_clip_config.json (a hub snapshot) "
                         f"nor model.pt (a bioclip_fast run)")
    if path.is_file():
        model, preprocess, tokenizer, meta = load_model(path, model_name=model_name, device=device)
        return LoadedModel(model, preprocess, tokenizer, model_str, "checkpoint", meta)
    if os.sep in model_str or model_str.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise UsageError(f"--model {model_str}: no such file or directory")
    # an architecture name, with a pretrained file or tag
    known = set(list_models())
    name = model_str.replace("/", "-")
    if name not in known:
        raise UsageError(f"--model {model_str}: not a file, folder, hf-hub:/local-dir: source or known architecture "
                         f"(see bioclip-fast list-models)")
    if pretrained and Path(pretrained).expanduser().exists():
        model, preprocess, tokenizer, meta = load_model(checkpoint_path(Path(pretrained).expanduser()),
                                                        model_name=name, device=device)
        from bioclip_fast.model import _arch_key, describe_architecture, get_model_config

        wanted = get_model_config(name)
        if _arch_key(getattr(model, "model_cfg", wanted)) != _arch_key(wanted):  # our checkpoint says another one
            raise CheckpointError(f"checkpoint {pretrained} is "
                                  f"{describe_architecture(getattr(model, 'model_name', None), model.model_cfg)}, "
                                  f"model is {describe_architecture(name, wanted)}")
        return LoadedModel(model, preprocess, tokenizer, model_str, "checkpoint", meta)
    tags = [] if name not in open_clip.list_models() else open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None and len(tags) > 1:
        raise UsageError(f"--model {model_str}: multiple pretrained tags available {tags}; pass --pretrained TAG "
                         f"or --pretrained FILE")
    tag = pretrained or (tags[0] if tags else None)
    if tag is None:
        from bioclip_fast.model import create_model

        logging.getLogger(__name__).warning("--model %s without --pretrained: randomly initialised weights", name)
        model = create_model(name).to(device).eval()
        return LoadedModel(model, image_transform(model), get_tokenizer(model), model_str, "open_clip")
    if tag not in tags:
        raise UsageError(f"--pretrained {tag}: neither a file nor a tag of {name} (tags: {tags or 'none'})")
    import huggingface_hub.constants as hf_constants

    was_offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = was_offline or _offline()  # read at import; honour a later HF_HUB_OFFLINE=1
    try:
        with _quiet_open_clip():
            model, preprocess = open_clip.create_model_from_pretrained(name, pretrained=tag, device=device,
                                                                       return_transform=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - no network
        raise CheckpointError(f"--model {name} --pretrained {tag}: cannot download the weights "
                              f"({' '.join(str(e).split())[:160]}); pass --pretrained FILE") from None
    finally:
        hf_constants.HF_HUB_OFFLINE = was_offline
    model.model_name, model.model_cfg = name, open_clip.get_model_config(name)
    return LoadedModel(model.eval(), preprocess, open_clip.get_tokenizer(name), model_str, "open_clip")


def tol_table_dir(model: LoadedModel) -> Path | None:
    """The species table of a TreeOfLife model from its dataset repo (HF cache first); None for other models."""
    if model.tol_repo is None:
        return None
    snap = hf_snapshot(model.tol_repo, repo_type="dataset", files=TOL_EMBEDDINGS)
    return snap / "embeddings"
