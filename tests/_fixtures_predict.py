"""Fixtures for the predict/embed tests: a small open_clip model in the hub-snapshot layout, a small TreeOfLife
species table, and a fake Hugging Face cache holding them under the names pybioclip looks up
(``imageomics/bioclip-2`` and the dataset ``imageomics/TreeOfLife-200M``), so pybioclip itself runs offline."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

# 224 px input (pybioclip squashes TreeOfLife images to 224x224), everything else tiny
SMALL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
SNAPSHOT_HASH = "0123456789abcdef0123456789abcdef01234567"
GENERA = [
    ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus"),
    ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Vanessa"),
    ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Pieridae", "Pieris"),
    ("Animalia", "Arthropoda", "Insecta", "Coleoptera", "Carabidae", "Carabus"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus"),
    ("Animalia", "Chordata", "Mammalia", "Carnivora", "Felidae", "Felis"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Asterales", "Asteraceae", "Bellis"),
    ("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita"),
]


def small_open_clip_model(seed: int = 0) -> torch.nn.Module:
    """A plain open_clip CLIP (0-dim logit_scale, as open_clip creates it) of SMALL_CFG with seeded weights."""
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS["_test_small_hub"] = SMALL_CFG
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model("_test_small_hub")
    finally:
        factory._MODEL_CONFIGS.pop("_test_small_hub", None)
    return model.eval()


def write_hub_snapshot(model: torch.nn.Module, folder: Path, *, safetensors: bool = True, bin: bool = False) -> Path:
    """open_clip's hub layout: open_clip_config.json + open_clip_model.safetensors and/or open_clip_pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_CFG, "preprocess_cfg": PREPROCESS_CFG}))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(folder / "open_clip_model.safetensors"))
    if bin:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


def species_table(n_per_genus: int = 9, dim: int = 32, seed: int = 1) -> tuple[np.ndarray, list]:
    """A TreeOfLife-layout table: [D, N] float32 unit columns and N `[[k, p, c, o, f, g, epithet], common]` names.
    Epithets repeat across genera (as in the real table) and some names need CSV quoting."""
    rng = np.random.default_rng(seed)
    names = []
    for gi, ranks in enumerate(GENERA):
        for j in range(n_per_genus):
            epithet = ["vulgaris", "alba", "major", "minor", "communis", "nigra", "rubra", "magna", "parva"][j % 9]
            common = "" if (gi + j) % 5 == 0 else f"{ranks[5]} {epithet}, common ({gi}.{j})"
            if gi == 0 and j == 1:
                common = 'Monarch "king" papillon \u00e9t\u00e9'
            names.append([[*ranks, epithet], common])
    emb = rng.standard_normal((dim, len(names))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=0, keepdims=True)
    return emb, names


def write_table(folder: Path, emb: np.ndarray, names: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "txt_emb_species.npy", emb)
    (folder / "txt_emb_species.json").write_text(json.dumps(names))
    return folder


def write_hf_cache(hf_home: Path, snapshot: Path, table: Path) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<hash>/...) for the model and the dataset repo."""
    hub = hf_home / "hub"
    model_dir = hub / "models--imageomics--bioclip-2"
    (model_dir / "refs").mkdir(parents=True, exist_ok=True)
    (model_dir / "refs" / "main").write_text(SNAPSHOT_HASH)
    shutil.copytree(snapshot, model_dir / "snapshots" / SNAPSHOT_HASH)
    data_dir = hub / "datasets--imageomics--TreeOfLife-200M"
    (data_dir / "refs").mkdir(parents=True, exist_ok=True)
    (data_dir / "refs" / "main").write_text(SNAPSHOT_HASH)
    shutil.copytree(table, data_dir / "snapshots" / SNAPSHOT_HASH / "embeddings")
    return hf_home


def softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def logit_scale_of(model) -> float:
    return float(math.exp(float(model.logit_scale.detach().reshape(-1)[0])))
