"""open_clip hub snapshots, read and written here, and the Hugging Face cache they come from.

A snapshot is a folder with ``open_clip_config.json`` (the model and preprocess configs) and the weights
(``open_clip_model.safetensors`` and/or ``open_clip_pytorch_model.bin``), the layout of ``hf-hub:`` repos such as
``hf-hub:imageomics/bioclip-2``. :func:`load_hub_snapshot` reads one through open_clip itself (as pybioclip does;
``weights_only=True`` for a ``.bin``, whose refusal names the objects it holds), :func:`export_open_clip` writes one
from a bioclip_fast model (+ ``bioclip_fast_meta.json``, our label set, which open_clip ignores), and
:func:`hf_snapshot` finds a repo in the HF cache (no network) before downloading it. The TreeOfLife models' names and
their species-table repos are here too. Which string names which source is :func:`bioclip_fast.model.parse_model_str`.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioclip_fast.errors import CheckpointError, UsageError
from bioclip_fast.fileio import atomic_write_json, replace_file
from bioclip_fast.preprocess import image_mean_std
from bioclip_fast.weights import pickled_objects_in, plain_data, unpickled_objects

BIOCLIP_V1_MODEL_STR = "hf-hub:imageomics/bioclip"
BIOCLIP_V2_MODEL_STR = "hf-hub:imageomics/bioclip-2"
BIOCLIP_MODEL_STR = BIOCLIP_V2_MODEL_STR
TOL_MODELS = {BIOCLIP_V1_MODEL_STR: "imageomics/TreeOfLife-10M", BIOCLIP_V2_MODEL_STR: "imageomics/TreeOfLife-200M"}
TOL_EMBEDDINGS = ("embeddings/txt_emb_species.npy", "embeddings/txt_emb_species.json")
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = "open_clip_model.safetensors"
META_FILE = "bioclip_fast_meta.json"  # our extra: the label set etc., ignored by open_clip


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


def hf_offline() -> bool:
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
        if hf_offline():
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
    return (Path(path) / HUB_CONFIG).is_file()


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
        with quiet_open_clip():
            model, preprocess = open_clip.create_model_from_pretrained(
                f"local-dir:{path}", device=device, return_transform=True, weights_only=True)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as e:  # noqa: BLE001 - corrupt weights, wrong shapes, unsafe pickle
        text = " ".join(str(e).split())[:240]
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
            objects = unpickled_objects(e) is not None or any(
                pickled_objects_in(w) is not None for w in weights if w.suffix != ".safetensors")
            text = ("the .bin holds Python objects other than tensors; weights are never unpickled blindly" if objects
                    else "the .bin is not a readable weights file (not a torch.save archive of tensors)")
        raise CheckpointError(f"--model {model_str}: cannot load the open_clip snapshot {path}: {text}") from None
    cfg = json.loads((path / HUB_CONFIG).read_text(encoding="utf-8"))
    model.model_cfg = cfg.get("model_cfg")
    meta: dict[str, Any] = {}
    meta_file = path / META_FILE  # written by `bioclip-fast export`: the label set
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    model.model_name = meta.get("model_name") or model_str
    return LoadedModel(model.eval(), preprocess, tokenizer, model_str, "hub-snapshot", meta,
                       tol_repo=_tol_repo_of_snapshot(path))


class quiet_open_clip:
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


def export_open_clip(model: nn.Module, out: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``out/`` as an open_clip hub snapshot: ``open_clip_config.json`` (the full ``model_cfg`` and the
    preprocess config, so no registration is needed) and ``open_clip_model.safetensors``. ``visual.continual_proj``
    (a training-only replay projection plain open_clip does not know) is dropped; ``logit_scale`` is saved 0-dim as
    open_clip creates it. Loads with ``open_clip.create_model_from_pretrained("local-dir:OUT")``."""
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
    # Every file is written into a staging folder beside OUT first, so a failure there (a full disk) leaves an
    # existing snapshot untouched; then each file is renamed in, the config (which makes OUT a snapshot) last.
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(state, str(stage / HUB_WEIGHTS), metadata={"format": "pt"})
        if meta:
            atomic_write_json(stage / META_FILE, {"model_name": getattr(model, "model_name", None),
                                                  **plain_data(dict(meta))}, indent=1)
        atomic_write_json(stage / HUB_CONFIG, {"model_cfg": plain_data(cfg), "preprocess_cfg": pp}, indent=2)
        out.mkdir(parents=True, exist_ok=True)
        for name in (HUB_WEIGHTS, META_FILE, HUB_CONFIG):
            if (stage / name).exists():
                replace_file(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
