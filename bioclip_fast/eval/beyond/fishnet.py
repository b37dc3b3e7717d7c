"""FishNet habitat / trait prediction (Khan et al., ICCV 2023), as the BioCLIP 2 reference evaluates it
(``src/evaluation/fishnet.py`` of the bioclip-2 repository).

Layout of ``root`` (the published FishNet release)::

    root/train.csv                      one row per image
    root/test.csv
    root/Image_Library/<folder>/<image file>

The CSVs are read by column name: the image name from ``image`` (only its file name is used), the folder from
``Folder``; the nine targets are the columns ``FeedingPath`` (``pelagic`` = 1, ``benthic`` = 0), ``Tropical``,
``Temperate``, ``Subtropical``, ``Boreal``, ``Polar``, ``freshwater``, ``saltwater``, ``brackish`` (0/1). Rows with an
empty target are dropped, as the reference's null filter does. The reference addresses these columns by position
(image 4, folder 13, targets 15-23) *after* ``with_row_index()`` has put a row-index column in front; in the published
header (``,Unnamed: 0,species,image,SpecCode,...,Folder,Troph,FeedingPath,...``) those positions are exactly the
named columns, which is what we read (and a reordered header still works).

Protocol (``slurm/eval_other.sh``): raw (not normalized) image features; the reference MLP probe
(:func:`~bioclip_fast.eval.beyond.common.mlp_probe_predict`: batch 256, 50 epochs, lr 1e-4, scored with dropout on
as the reference does — flagged); the score is the share of test images
whose nine predicted attributes are **all** correct (exact match); mean and std over 3 runs seeded ``seed + run``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.beyond.common import PROBE_QUIRKS, mlp_probe_runs, probe_protocol, require, summarize_runs

TARGETS = ("FeedingPath", "Tropical", "Temperate", "Subtropical", "Boreal", "Polar", "freshwater", "saltwater",
           "brackish")
IMAGE_COLUMN, FOLDER_COLUMN = "image", "Folder"


def read_split(root: str | Path, split: str) -> tuple[list[Path], np.ndarray, list[dict[str, str]]]:
    """(image paths, N x 9 targets, rows) of ``train`` or ``test``."""
    from bioclip_fast.errors import DataError

    root = Path(root)
    path = require(root / f"{split}.csv", "FishNet")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty CSV")
        names = {h.strip(): i for i, h in enumerate(header)}
        lower = {h.strip().lower(): i for i, h in reversed(list(enumerate(header)))}
        want = (IMAGE_COLUMN, FOLDER_COLUMN, *TARGETS)
        missing = [c for c in want if c not in names and c.lower() not in lower]
        if missing:
            raise DataError(f"{path}: needs the FishNet columns {', '.join(want)}; missing {missing}; "
                            f"header: {header}")
        image_col, folder_col, *cols = [names.get(c, lower.get(c.lower())) for c in want]
        paths, targets, rows = [], [], []
        for line_no, rec in enumerate(reader, start=2):
            if len(rec) < len(header):
                raise DataError(f"{path}:{line_no}: {len(rec)} fields, header has {len(header)}")
            values = [rec[c].strip() for c in cols]
            if any(v == "" or v.lower() in ("null", "nan", "none") for v in values):
                continue
            fp = values[0]
            if fp not in ("pelagic", "benthic"):
                raise DataError(f"{path}:{line_no}: FeedingPath can only be pelagic or benthic, got {fp!r}")
            try:
                t = [1 if fp == "pelagic" else 0] + [int(float(v)) for v in values[1:]]
            except ValueError:
                raise DataError(f"{path}:{line_no}: non-numeric habitat value in {values[1:]}") from None
            name = rec[image_col].strip().split("/")[-1]
            paths.append(root / "Image_Library" / rec[folder_col].strip() / name)
            targets.append(t)
            rows.append(dict(zip(header, rec)))
    if not paths:
        raise DataError(f"{path}: no row with all nine FishNet targets")
    return paths, np.asarray(targets, dtype=np.int64), rows


def check_layout(root: str | Path) -> None:
    """The CSVs' columns and values, before any model is loaded (a DataError naming the problem)."""
    read_split(root, "train")
    read_split(root, "test")


def evaluate(model, preprocess, root: str | Path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             runs: int = 3, seed: int = 0, epochs: int = 50, lr: float = 1e-4, probe_batch_size: int = 256,
             probe_eval_mode: bool = False, progress: bool = False) -> dict[str, Any]:
    """FishNet exact-match accuracy (fraction) of the reference MLP probe; see the module docstring."""
    tr_paths, tr_y, _ = read_split(root, "train")
    te_paths, te_y, _ = read_split(root, "test")
    probe = mlp_probe_runs(model, preprocess, tr_paths, tr_y, te_paths, te_y, name="FishNet", runs=runs, seed=seed,
                           epochs=epochs, lr=lr, device=device, batch_size=batch_size, num_workers=num_workers,
                           progress=progress, probe_batch_size=probe_batch_size, probe_eval_mode=probe_eval_mode)
    ytr, yte = probe["y_train"], probe["y_test"]
    scores = [float(np.all(pred == yte, axis=1).mean()) for pred in probe["preds"]]
    per_attr = [(pred == yte).mean(axis=0) for pred in probe["preds"]]
    return {
        "benchmark": "FishNet", "metric": "exact-match accuracy of 9 habitat/trait attributes", **summarize_runs(scores),
        "attribute_accuracy": dict(zip(TARGETS, np.mean(per_attr, axis=0).tolist())),
        "n_train": int(len(ytr)), "n_test": int(len(yte)),
        "skipped": probe["skipped"],
        "protocol": probe_protocol(lr, epochs, probe_batch_size, probe_eval_mode, runs, seed),
        "flags": list(PROBE_QUIRKS[int(probe_eval_mode):]),
    }
