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
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioclip_fast.errors import CheckpointError, UsageError
from bioclip_fast.preprocess import image_mean_std
from bioclip_fast.weights import _plain

BIOCLIP_V1_MODEL_STR = "hf-hub:imageomics/bioclip"
BIOCLIP_V2_MODEL_STR = "hf-hub:imageomics/bioclip-2"
BIOCLIP_MODEL_STR = BIOCLIP_V2_MODEL_STR
TOL_MODELS = {BIOCLIP_V1_MODEL_STR: "imageomics/TreeOfLife-10M", BIOCLIP_V2_MODEL_STR: "imageomics/TreeOfLife-200M"}
TOL_EMBEDDINGS = ("embeddings/txt_emb_species.npy", "embeddings/txt_emb_species.json")


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Any
    tokenizer: Any
    model_str: str
    kind: str  # "hub-snapshot" | "checkpoint" | "open_clip"
    meta: dict[str, Any] = field(default_factory=dict)
    tol_repo: str | None = None  # the TreeOfLife dataset repo of a TreeOfLife model


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
            from bioclip_fast.weights import _pickled_objects_in, unpickled_objects

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


def tol_table_dir(model: LoadedModel) -> Path | None:
    """The species table of a TreeOfLife model from its dataset repo (HF cache first); None for other models."""
    if model.tol_repo is None:
        return None
    snap = hf_snapshot(model.tol_repo, repo_type="dataset", files=TOL_EMBEDDINGS)
    return snap / "embeddings"


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
