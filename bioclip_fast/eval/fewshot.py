"""Few-shot classification with SimpleShot (Wang et al., 2019), as in the BioCLIP papers.

CL2N normalization: subtract the mean of the support features, then L2-normalize every feature; classify a query by
its nearest class centroid (Euclidean) among the normalized support features. Reported over several seeded folds,
each drawing a fresh k-shot support set.

Two protocols:

* :func:`reference_few_shot_eval` — the BioCLIP 2 reference's (``split_few_shot_examples`` in the bioclip-2
  repository's ``src/evaluation/classification.py``): for fold ``f``, ``random.seed(f)`` (Python's generator),
  then per class, in order of first appearance, shuffle the class's images and take the first k as support;
  **every other image of the dataset is a query**. A class with fewer than k images is an error there;
  ``bioclip-fast eval`` (whose default protocol this is) passes ``rare_classes="leave_out"``: such a class is left
  out of that k (and named) instead of stopping everything. Ambiguity: the older ``few_shot.py`` shuffles each class's list *in
  place*, so its folds (and its 5-shot draws, which follow the 1-shot folds) compound; the combined
  ``classification.py`` shuffles a copy per fold, which is what we reproduce (a fold's draw depends only on its
  index).
* :func:`few_shot_eval` — support drawn from one set with numpy streams seeded by (seed, k, fold), queries either the
  rest or a separate query set (``bioclip-fast eval --fewshot-protocol split``).
"""
from __future__ import annotations

import random

from collections.abc import Sequence
from typing import Any

import numpy as np

from bioclip_fast.eval.arrays import as_feature_matrix, as_label_vector


def cl2n(features: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Center by ``mean`` (the support mean), then L2-normalize each row."""
    x = features - mean
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def simpleshot_predict(support: Any, support_labels: Any, query: Any) -> np.ndarray:
    """Predict a label for each query row: nearest CL2N-normalized centroid of the support classes.

    Returns labels drawn from ``support_labels`` (any hashable/sortable values).
    """
    s = as_feature_matrix(support, "support")
    q = as_feature_matrix(query, "query")
    if s.shape[1] != q.shape[1]:
        raise ValueError(f"support has dim {s.shape[1]} but query has dim {q.shape[1]}")
    y = as_label_vector(support_labels, s.shape[0], "support_labels")
    mean = s.mean(axis=0)
    s, q = cl2n(s, mean), cl2n(q, mean)
    classes = np.unique(y)
    centroids = np.stack([s[y == c].mean(axis=0) for c in classes])
    # squared Euclidean distance via the expansion; argmin picks the nearest centroid
    d = (q**2).sum(1, keepdims=True) - 2 * q @ centroids.T + (centroids**2).sum(1)[None]
    return classes[d.argmin(axis=1)]


def sample_support(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` examples per class (all of a class's examples when it has fewer)."""
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        idx.extend(rng.choice(members, size=min(shots, len(members)), replace=False).tolist())
    return np.sort(np.asarray(idx, dtype=np.int64))


def few_shot_eval(
    features: Any,
    labels: Any,
    query_features: Any | None = None,
    query_labels: Any | None = None,
    *,
    shots: Sequence[int] = (1, 5),
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """SimpleShot accuracy for each k in ``shots``, mean and std over ``folds`` seeded draws of the support set.

    The support set is drawn from (``features``, ``labels``). Queries are (``query_features``, ``query_labels``) when
    given; otherwise every example of ``features`` not in the fold's support set (so each class needs > k examples).
    Returns ``{"1-shot": {"top1": mean, "std": std, "folds": [...], "n_query": [...]}, ...}`` (fractions).
    """
    x = as_feature_matrix(features, "features")
    y = as_label_vector(labels, x.shape[0], "labels")
    if (query_features is None) != (query_labels is None):
        raise ValueError("pass both query_features and query_labels, or neither")
    if query_features is not None:
        xq = as_feature_matrix(query_features, "query_features")
        yq = as_label_vector(query_labels, xq.shape[0], "query_labels")
        if xq.shape[1] != x.shape[1]:
            raise ValueError(f"features have dim {x.shape[1]} but query_features have dim {xq.shape[1]}")
    shots = _check_protocol(y, folds, shots)

    out: dict[str, Any] = {}
    for k in shots:
        accs, nq = [], []
        for fold in range(folds):
            # one independent stream per (k, fold): results do not depend on which other k values were asked for
            rng = np.random.default_rng([seed, k, fold])
            sup = sample_support(y, k, rng)
            if query_features is None:
                mask = np.ones(len(y), dtype=bool)
                mask[sup] = False
                if not mask.any():
                    raise ValueError(f"{k}-shot: no examples left to query; pass query_features or lower shots")
                qx, qy = x[mask], y[mask]
            else:
                qx, qy = xq, yq
            pred = simpleshot_predict(x[sup], y[sup], qx)
            accs.append(float((pred == qy).mean()))
            nq.append(int(len(qy)))
        out[f"{k}-shot"] = {"top1": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs, "n_query": nq}
    return out


def _check_protocol(y: np.ndarray, folds: int, shots: Sequence[int]) -> list[int]:
    """Validate folds/shots/labels shared by both protocols; returns the shots as ints."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    shots = [int(k) for k in shots]
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be positive integers, got {shots}")
    if len(np.unique(y)) < 2:
        raise ValueError("few-shot evaluation needs at least 2 classes in labels")
    return shots


def reference_support_split(labels: Any, shots: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(support indices, query indices) of one fold of the reference protocol (see the module docstring).

    Reproduces the reference's draws exactly for the same image order: ``random.shuffle`` of a list depends only on
    the list's length, so shuffling index lists equals shuffling its feature lists.
    """
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    order: dict[Any, list[int]] = {}
    for i, c in enumerate(y.tolist()):
        order.setdefault(c, []).append(i)
    rng = random.Random(fold)  # == random.seed(fold) on the global generator, without touching it
    support, query = [], []
    for c, members in order.items():
        if len(members) < shots:
            raise ValueError(f"class {c!r} has only {len(members)} images, fewer than the requested {shots}-shot "
                             "evaluation")
        members = members[:]
        rng.shuffle(members)
        support.extend(members[:shots])
        query.extend(members[shots:])
    return np.asarray(support, dtype=np.int64), np.asarray(query, dtype=np.int64)


def reference_few_shot_eval(features: Any, labels: Any, *, shots: Sequence[int] = (1, 5), folds: int = 5,
                            rare_classes: str = "error") -> dict[str, Any]:
    """SimpleShot accuracy per k with the reference protocol: mean and std over ``folds`` folds seeded 0..folds-1.

    ``rare_classes``: what to do with a class that has fewer than k images. ``"error"`` stops, as the reference does;
    ``"leave_out"`` scores k-shot over the other classes (their images only: exactly the reference run on the data
    without those classes) and names the classes left out under ``left_out``; a k that leaves fewer than 2 classes
    gets ``top1: None`` and an ``error`` instead, the other k values still run.

    Returns ``{"1-shot": {"top1", "std", "folds", "n_query", "classes", "chance", "left_out"}, ...}`` (fractions;
    ``chance`` = 1 / classes scored), like :func:`few_shot_eval`.
    """
    if rare_classes not in ("error", "leave_out"):
        raise ValueError(f"rare_classes={rare_classes!r}; choose error or leave_out")
    x = as_feature_matrix(features, "features")
    y = as_label_vector(labels, x.shape[0], "labels")
    shots = _check_protocol(y, folds, shots)
    names, counts = np.unique(y, return_counts=True)
    out: dict[str, Any] = {}
    for k in shots:
        keep = np.ones(len(y), dtype=bool)
        left_out: list[str] = []
        if rare_classes == "leave_out":
            rare = names[counts < k]
            left_out = [str(c) for c in rare]
            keep = ~np.isin(y, rare)
            n_cls = len(names) - len(rare)
            if n_cls < 2 or (counts[counts >= k] - k).sum() == 0:
                out[f"{k}-shot"] = {"top1": None, "classes": int(n_cls), "left_out": left_out,
                                    "error": f"{k}-shot: only {n_cls} class(es) have at least {k} images"
                                             + ("" if n_cls < 2 else ", and none has an image left to query"),
                                    "protocol": "reference"}
                continue
        xk, yk = x[keep], y[keep]
        accs, nq = [], []
        for fold in range(folds):
            sup, qry = reference_support_split(yk, k, fold)
            if len(qry) == 0:
                raise ValueError(f"{k}-shot: every image is in the support set; no query left")
            pred = simpleshot_predict(xk[sup], yk[sup], xk[qry])
            accs.append(float((pred == yk[qry]).mean()))
            nq.append(int(len(qry)))
        n_cls = len(np.unique(yk))
        out[f"{k}-shot"] = {"top1": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs, "n_query": nq,
                            "classes": int(n_cls), "chance": 1.0 / n_cls, "left_out": left_out,
                            "protocol": "reference"}
    return out
