"""NeWT: 164 binary natural-world tasks (Van Horn et al., CVPR 2021), as the BioCLIP 2 reference evaluates it
(``src/evaluation/newt.py`` of the bioclip-2 repository, from biobench).

Layout of ``root`` (the published NeWT 2021 release)::

    root/newt2021_labels.csv            columns id, task, label, split (train/test), task_cluster, task_subcluster
    root/newt2021_images/<id>.jpg

Protocol: L2-normalized image features; per task, the train features' mean is subtracted and features are
re-normalized, then ``RandomizedSearchCV(StandardScaler → SVC)`` (C ~ loguniform(1e-3, 10), kernel in rbf / linear /
sigmoid / poly, gamma ~ loguniform(1e-4, 1e-3), ``n_iter`` = 100, 5-fold CV, ``random_state`` = the run seed) is fit
on the task's train split and predicts its test split. The score is the accuracy over **all tasks' test images
pooled**; mean and std over 3 runs seeded ``seed + run``. Per-cluster accuracies are reported too.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.beyond.common import extract_features, require, summarize_runs

COLUMNS = ("id", "task", "label", "split", "task_cluster", "task_subcluster")


def read_labels(root: str | Path) -> list[dict[str, str]]:
    from bioclip_fast.errors import DataError

    path = require(Path(root) / "newt2021_labels.csv", "NeWT")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS[:4] if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing columns {missing}; has {reader.fieldnames}")
        rows = [dict(r) for r in reader]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def make_svc(seed: int, n_iter: int = 100, n_jobs: int | None = 1):
    """The reference's randomized SVM search (it runs 16 jobs; the result does not depend on ``n_jobs``)."""
    import scipy.stats
    import sklearn.model_selection
    import sklearn.pipeline
    import sklearn.preprocessing
    import sklearn.svm

    return sklearn.model_selection.RandomizedSearchCV(
        sklearn.pipeline.make_pipeline(sklearn.preprocessing.StandardScaler(), sklearn.svm.SVC(C=1.0, kernel="rbf")),
        {
            "svc__C": scipy.stats.loguniform(a=1e-3, b=1e1),
            "svc__kernel": ["rbf", "linear", "sigmoid", "poly"],
            "svc__gamma": scipy.stats.loguniform(a=1e-4, b=1e-3),
        },
        n_iter=n_iter,
        n_jobs=n_jobs,
        random_state=seed,
    )


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_layout(root: str | Path) -> None:
    """The label CSV and the image folder, before any model is loaded."""
    read_labels(root)
    require(Path(root) / "newt2021_images", "NeWT images")


def evaluate(model, preprocess, root: str | Path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             runs: int = 3, seed: int = 0, n_iter: int = 100, n_jobs: int | None = 1,
             progress: bool = False) -> dict[str, Any]:
    """NeWT pooled binary accuracy (fraction); see the module docstring."""
    import warnings

    from bioclip_fast.errors import DataError

    root = Path(root)
    rows = read_labels(root)
    images = require(root / "newt2021_images", "NeWT images")
    enc = extract_features(model, preprocess, [images / f"{r['id']}.jpg" for r in rows], device=device,
                           batch_size=batch_size, num_workers=num_workers, progress=progress, desc="NeWT")
    feats = np.zeros((len(rows), enc["features"].shape[1]), dtype=np.float32)
    feats[enc["index"]] = enc["features"]
    kept = np.zeros(len(rows), dtype=bool)
    kept[enc["index"]] = True
    tasks: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if kept[i]:
            tasks.setdefault(r["task"], []).append(i)
    scores, by_cluster_runs = [], []
    for run in range(runs):
        run_seed = seed + run
        preds, trues, clusters = [], [], []
        for task, idx in tasks.items():
            idx = np.asarray(idx)
            labels = np.asarray([int(float(rows[i]["label"])) for i in idx])
            train = np.asarray([rows[i]["split"] == "train" for i in idx])
            if train.all() or not train.any():
                raise DataError(f"NeWT task {task!r}: needs both train and test images")
            x = feats[idx]
            mean = x[train].mean(axis=0, keepdims=True)
            xtr, xte = _l2(x[train] - mean), _l2(x[~train] - mean)
            svc = make_svc(run_seed, n_iter=n_iter, n_jobs=n_jobs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "least populated class" CV warnings on tiny tasks
                svc.fit(xtr, labels[train])
            preds.append(svc.predict(xte))
            trues.append(labels[~train])
            clusters += [rows[idx[0]].get("task_cluster", "") or "none"] * int((~train).sum())
        p, t = np.concatenate(preds), np.concatenate(trues)
        scores.append(float((p == t).mean()))
        cl = np.asarray(clusters)
        by_cluster_runs.append({c: float((p[cl == c] == t[cl == c]).mean()) for c in np.unique(cl)})
    by_cluster = {c: float(np.mean([r[c] for r in by_cluster_runs])) for c in by_cluster_runs[0]}
    n_test = sum(int(sum(rows[i]["split"] != "train" for i in idx)) for idx in tasks.values())
    return {
        "benchmark": "NeWT", "metric": "binary accuracy pooled over all tasks", **summarize_runs(scores),
        "by_cluster": by_cluster, "n_tasks": len(tasks), "n_test": n_test, "n_train": int(kept.sum()) - n_test,
        "skipped": enc["skipped"],
        "protocol": f"normalized features, centred + re-normalized per task; RandomizedSearchCV(StandardScaler, SVC), "
                    f"n_iter {n_iter}, 5-fold; {runs} runs seeded {seed}..{seed + runs - 1}",
    }
