"""PlantDoc plant-disease classification (Singh et al., 2020), as the BioCLIP 2 reference evaluates it
(``src/evaluation/plantdoc.py`` of the bioclip-2 repository, from biobench).

Layout of ``root`` (the published PlantDoc classification release, ImageFolder)::

    root/train/<class>/*.jpg
    root/test/<class>/*.jpg

Protocol: L2-normalized features; per repeat ``r`` (numpy seeded ``seed + r``), one training image per class is
drawn (``np.random.shuffle`` of the class's indices, in ``np.unique`` class order) and SimpleShot (centre on the
support mean, L2-normalize, nearest class centroid) classifies every test image; mean and std over the repeats.
Ambiguity: the reference's docstring says 100 repeats, its ``--n_repeats`` default is 5, which is what runs unless
a script passes it; we default to 5. Its training features are extracted from a *shuffled* loader, so its draws
depend on that loader's order; ours use the sorted ImageFolder order (same protocol, different draws).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.beyond.common import extract_features, require, summarize_runs
from bioclip_fast.eval.datasets import IMAGE_EXTENSIONS


def image_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """torchvision ImageFolder order: classes sorted, files sorted within each class."""
    from bioclip_fast.errors import DataError

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f)
                labels.append(i)
    if not paths:
        raise DataError(f"{root}: no class folders with images")
    return paths, np.asarray(labels, dtype=np.int64), classes


def choose_k_per_class(labels: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """The reference's draw: per class (np.unique order) shuffle its indices and keep k; then shuffle all."""
    out = np.array([], dtype=int)
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        out = np.concatenate((out, idx[:k]))
    rng.shuffle(out)
    return out


def evaluate(model, preprocess, root: str | Path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             repeats: int = 5, seed: int = 0, shots: int = 1, progress: bool = False) -> dict[str, Any]:
    """PlantDoc 1-shot SimpleShot accuracy (fraction); see the module docstring."""
    from bioclip_fast.errors import DataError
    from bioclip_fast.eval.fewshot import simpleshot_predict

    root = Path(root)
    tr_paths, tr_y, classes = image_folder(require(root / "train", "PlantDoc"))
    te_paths, te_y, te_classes = image_folder(require(root / "test", "PlantDoc"))
    if te_classes != classes:
        raise DataError(f"PlantDoc: train and test class folders differ: "
                        f"{sorted(set(classes) ^ set(te_classes))[:5]}")
    tr = extract_features(model, preprocess, tr_paths, device=device, batch_size=batch_size,
                          num_workers=num_workers, progress=progress, desc="PlantDoc train")
    te = extract_features(model, preprocess, te_paths, device=device, batch_size=batch_size,
                          num_workers=num_workers, progress=progress, desc="PlantDoc test")
    ytr, yte = tr_y[tr["index"]], te_y[te["index"]]
    scores = []
    for r in range(repeats):
        i = choose_k_per_class(ytr, shots, np.random.RandomState(seed + r))
        pred = simpleshot_predict(tr["features"][i], ytr[i], te["features"])
        scores.append(float((pred == yte).mean()))
    return {
        "benchmark": "PlantDoc", "metric": f"{shots}-shot SimpleShot accuracy", **summarize_runs(scores),
        "n_classes": len(classes), "n_train": int(len(ytr)), "n_test": int(len(yte)),
        "skipped": tr["skipped"] + te["skipped"],
        "protocol": f"{shots} train image per class (np.random seeded {seed}+r), SimpleShot on every test image; "
                    f"{repeats} repeats",
    }
