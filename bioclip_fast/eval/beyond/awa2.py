"""Animals with Attributes 2 (Xian et al., 2018) attribute prediction, as the BioCLIP 2 reference evaluates it
(``src/evaluation/awa2.py`` of the bioclip-2 repository).

Layout of ``root`` (the published ``AwA2-data`` release)::

    root/classes.txt                    50 classes, one per line ("1<TAB>antelope" or "antelope")
    root/trainclasses.txt               40 class names (train)
    root/testclasses.txt                10 class names (test: classes unseen in training)
    root/predicate-matrix-binary.txt    50 lines of 85 space-separated 0/1, in classes.txt order
    root/JPEGImages/<class>/*.jpg

Every image carries its class's 85-attribute vector. Protocol (``slurm/eval_other.sh``): raw (not normalized) image
features of the train classes' images train the reference MLP probe
(:func:`~bioclip_fast.eval.beyond.common.mlp_probe_predict`: batch 256, 50 epochs, lr **1e-5**, scored with dropout
on as the reference does — flagged); the test classes' images are scored with macro-F1, 3 runs seeded ``seed + run``.

Reproduced exactly, and flagged: the reference calls ``f1_score(y_true, y_pred, average="macro",
labels=np.unique(y_true))``; for multi-label indicator targets ``labels`` selects *columns*, and ``np.unique`` of a 0/1
matrix is ``[0, 1]``, so its macro-F1 averages attributes 0 and 1 only. ``score`` is that number (the paper's);
``macro_f1_all_attributes`` averages all 85. Ambiguity: the reference strips each ``classes.txt`` line and compares it
with the bare names of ``trainclasses.txt``, which only matches a ``classes.txt`` without the index column; we
accept both forms. The reference lists images with ``os.listdir`` (unordered); we sort.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.beyond.common import PROBE_QUIRKS, mlp_probe_runs, probe_protocol, require, summarize_runs
from bioclip_fast.eval.datasets import IMAGE_EXTENSIONS


def _names(path: Path) -> list[str]:
    return [line.split()[-1] for line in path.read_text().splitlines() if line.strip()]


def read_split(root: str | Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, N x 85 targets, class of each image) of ``train`` or ``test``."""
    from bioclip_fast.errors import DataError

    root = Path(root)
    classes = _names(require(root / "classes.txt", "AwA2"))
    subset = _names(require(root / f"{split}classes.txt", "AwA2"))
    matrix_path = require(root / "predicate-matrix-binary.txt", "AwA2")
    matrix = [line.split() for line in matrix_path.read_text().splitlines() if line.strip()]
    if len(matrix) != len(classes):
        raise DataError(f"{matrix_path}: {len(matrix)} rows but {len(classes)} classes in classes.txt")
    try:
        attrs = {c: np.asarray([int(v) for v in row], dtype=np.int64) for c, row in zip(classes, matrix)}
    except ValueError:
        raise DataError(f"{matrix_path}: expected 0/1 values") from None
    unknown = [c for c in subset if c not in attrs]
    if unknown:
        raise DataError(f"{root / (split + 'classes.txt')}: classes not in classes.txt: {unknown[:5]}")
    paths, targets, cls = [], [], []
    for c in subset:
        d = require(root / "JPEGImages" / c, "AwA2 images")
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f)
                targets.append(attrs[c])
                cls.append(c)
    if not paths:
        raise DataError(f"AwA2 {split}: no images under {root / 'JPEGImages'}")
    return paths, np.stack(targets), cls


def reference_macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))`` exactly as the reference calls it."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)))


def check_layout(root: str | Path) -> None:
    """The class lists, the attribute matrix and the image folders, before any model is loaded."""
    read_split(root, "train")
    read_split(root, "test")


def evaluate(model, preprocess, root: str | Path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             runs: int = 3, seed: int = 0, epochs: int = 50, lr: float = 1e-5, probe_batch_size: int = 256,
             probe_eval_mode: bool = False, progress: bool = False) -> dict[str, Any]:
    """AwA2 attribute macro-F1 (fraction) of the reference MLP probe; see the module docstring."""
    from sklearn.metrics import f1_score

    tr_paths, tr_y, _ = read_split(root, "train")
    te_paths, te_y, _ = read_split(root, "test")
    probe = mlp_probe_runs(model, preprocess, tr_paths, tr_y, te_paths, te_y, name="AwA2", runs=runs, seed=seed,
                           epochs=epochs, lr=lr, device=device, batch_size=batch_size, num_workers=num_workers,
                           progress=progress, probe_batch_size=probe_batch_size, probe_eval_mode=probe_eval_mode)
    ytr, yte = probe["y_train"], probe["y_test"]
    scores = [reference_macro_f1(yte, pred) for pred in probe["preds"]]
    all_attr = [float(f1_score(yte, pred, average="macro", zero_division=0)) for pred in probe["preds"]]
    return {
        "benchmark": "AwA2", "metric": "macro-F1 (reference call: attributes 0 and 1, see docs)",
        **summarize_runs(scores), "macro_f1_all_attributes": float(np.mean(all_attr)),
        "n_train": int(len(ytr)), "n_test": int(len(yte)), "n_attributes": int(tr_y.shape[1]),
        "skipped": probe["skipped"],
        "protocol": probe_protocol(lr, epochs, probe_batch_size, probe_eval_mode, runs, seed)
                    + "; train classes -> test classes",
        "flags": ["AwA2 macro-F1 averages attributes 0 and 1 only (the reference's labels=np.unique(y_true)); "
                  "macro_f1_all_attributes averages all 85", *PROBE_QUIRKS[int(probe_eval_mode):]],
    }
