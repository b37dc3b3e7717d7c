"""Linear probe: multinomial logistic regression (scikit-learn, L-BFGS) on frozen, L2-normalized image features.

The inverse regularization strength ``C`` is chosen on a stratified hold-out of the training features (20%) from a
log-spaced grid, then the probe is refit on all training features, as in CLIP's linear-probe protocol.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from bioclip_fast.eval.arrays import as_feature_matrix, as_label_vector

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe that stops at max_iter is still reported
        clf.fit(x, y)
    return clf


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a logistic-regression probe on the training features and score it on the test features.

    Returns ``{"top1", "top5", "C", "n_train", "n_test", "val_top1_by_C"}`` (accuracies as fractions) plus
    ``"probabilities"`` (n_test x n_classes) and ``"classes"`` (the label values, column order of probabilities).
    """
    xtr = _normalize(as_feature_matrix(train_features, "train_features"))
    ytr = as_label_vector(train_labels, xtr.shape[0], "train_labels")
    xte = _normalize(as_feature_matrix(test_features, "test_features"))
    yte = as_label_vector(test_labels, xte.shape[0], "test_labels")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train_features have dim {xtr.shape[1]} but test_features have dim {xte.shape[1]}")
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise ValueError("linear probe needs at least 2 classes in train_labels")
    unseen = set(np.unique(yte).tolist()) - set(classes.tolist())
    if unseen:
        raise ValueError(f"test_labels has classes absent from train_labels: {sorted(unseen)[:5]}")

    val_scores: dict[str, float] = {}
    if C is None:
        C_grid = [float(c) for c in C_grid]
        if not C_grid or min(C_grid) <= 0:
            raise ValueError(f"C_grid must hold positive values, got {C_grid}")
        counts = np.unique(ytr, return_counts=True)[1]
        if counts.min() >= 2 and len(C_grid) > 1:
            from sklearn.model_selection import train_test_split

            n_val = max(len(classes), int(round(0.2 * len(ytr))))
            a_x, v_x, a_y, v_y = train_test_split(xtr, ytr, test_size=n_val, stratify=ytr, random_state=seed)
            for c in C_grid:
                val_scores[str(c)] = float((_fit(a_x, a_y, c, max_iter, seed).predict(v_x) == v_y).mean())
            C = max(C_grid, key=lambda c: (val_scores[str(c)], -abs(np.log10(c))))  # ties: the milder setting
        else:
            C = 1.0  # too few examples to hold some out
    elif C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    clf = _fit(xtr, ytr, float(C), max_iter, seed)
    proba = clf.predict_proba(xte)
    order = np.argsort(-proba, axis=1)
    ranked = clf.classes_[order]
    top1 = float((ranked[:, 0] == yte).mean())
    top5 = float((ranked[:, : min(5, ranked.shape[1])] == yte[:, None]).any(axis=1).mean())
    return {
        "top1": top1,
        "top5": top5,
        "C": float(C),
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
        "val_top1_by_C": val_scores,
        "probabilities": proba,
        "classes": clf.classes_,
    }
