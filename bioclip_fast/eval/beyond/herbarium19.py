"""Herbarium 2019 generalized category discovery (Vaze et al., CVPR 2022), as the BioCLIP 2 reference evaluates it
(``src/evaluation/herbarium19.py`` of the bioclip-2 repository, from GCD).

Layout of ``root`` (the GCD "small" Herbarium19 release, ImageFolder)::

    root/small-train/<class>/*.jpg      the only split the protocol uses
    root/small-validation/<class>/*.jpg (optional; the reference builds it but never scores it)
    root/class_splits.json              {"Old": [class indices], "New": [class indices]}   (or GCD's
    root/herbarium_19_class_splits.pkl  pickle with the same keys; read with a numpy-only unpickler, never blindly)

Class indices are positions in the sorted class-folder list (torchvision ImageFolder). Without a split file the
"Old" classes are a seeded random half of the classes: **not** the reference split, and flagged as such.

Protocol (semi-supervised k-means, GCD): the labelled set is 80% of the Old classes' images (``np.random.seed(0)``,
``np.random.choice(n, int(0.8 n), replace=False)``); every other image is unlabelled. Features are L2-normalized.
Semi-supervised k-means with K = #Old + #New: the labelled classes, renumbered 0..L-1 as the reference does, give
the first L centres (their means), the others come from k-means++ (squared Euclidean) over the unlabelled features;
each iteration assigns unlabelled images to the nearest centre while labelled images keep their class, recomputes
the centres, and stops after 10 iterations or when the squared centre shift falls below 1e-4; the labels kept are
those of the iteration with the lowest inertia, as the reference keeps them. The score is the clustering accuracy on
the unlabelled images, with the Hungarian matching computed separately for Old-class and New-class images ("All"
accuracy), mean and std over 3 runs (k-means++ seeded ``seed + run``). Deviation: an empty cluster keeps its
previous centre (GCD's would turn NaN).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.beyond.common import extract_features, require, summarize_runs
from bioclip_fast.eval.beyond.plantdoc import image_folder


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads dicts, lists and numpy arrays only (the GCD split file); anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "range"), ("builtins", "set")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a class-split pickle")


def read_class_splits(root: Path, n_classes: int, seed: int = 0) -> tuple[list[int], list[int], str]:
    """(Old class indices, New class indices, source description)."""
    from bioclip_fast.errors import DataError

    js, pk = root / "class_splits.json", root / "herbarium_19_class_splits.pkl"
    if js.is_file():
        splits, source = json.loads(js.read_text()), str(js)
    elif pk.is_file():
        with open(pk, "rb") as f:
            try:
                splits = _NumpyOnlyUnpickler(f).load()
            except Exception as e:  # noqa: BLE001 - named in the message
                raise DataError(f"{pk}: not a readable class-split pickle ({e})") from None
        source = str(pk)
    else:
        rng = np.random.RandomState(seed)
        old = sorted(rng.choice(n_classes, size=n_classes // 2, replace=False).tolist())
        return old, [c for c in range(n_classes) if c not in set(old)], "random half (NOT the reference split)"
    try:
        old = [int(c) for c in splits["Old"]]
        new = [int(c) for c in splits["New"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{source}: expected {{'Old': [...], 'New': [...]}} of class indices") from None
    bad = [c for c in old + new if not 0 <= c < n_classes]
    if bad or set(old) & set(new):
        raise DataError(f"{source}: class indices out of range [0, {n_classes}) or in both splits: {bad[:5]}")
    return old, new, source


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-image correctness after the Hungarian matching of predicted clusters to classes (GCD's cluster_acc)."""
    from scipy.optimize import linear_sum_assignment

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return np.zeros(0, dtype=bool)
    d = int(max(y_pred.max(), y_true.max())) + 1
    w = np.zeros((d, d), dtype=np.int64)
    np.add.at(w, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(w.max() - w)
    mapping = dict(zip(rows.tolist(), cols.tolist()))
    return np.asarray([mapping[p] for p in y_pred]) == y_true


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0.0)


def semi_supervised_kmeans(u: np.ndarray, l_feats: np.ndarray, l_targets: np.ndarray, k: int, *, seed: int,
                           max_iterations: int = 10, tolerance: float = 1e-4) -> np.ndarray:
    """Cluster labels of ``concat(l_feats, u)`` (labelled first): GCD's ``K_Means.fit_mix`` with one init
    (``faster_mix_k_means_pytorch.py`` in the reference).

    As the reference: the labelled classes are renumbered ``0..L-1`` in sorted order (``cid2ncid``) and their means
    are the first ``L`` centres; the other centres come from k-means++ over the unlabelled features; each iteration
    assigns the unlabelled images to the nearest centre (labelled ones keep their class), computes the inertia
    (unlabelled + labelled squared distances to the centres it assigned with), recomputes the centres, and stops after
    ``max_iterations`` or when the squared centre shift is below ``tolerance``. The labels returned are those of the
    iteration with the **lowest inertia** (the first one on ties), not the last one's.
    """
    rng = np.random.RandomState(seed)
    u = np.asarray(u, dtype=np.float64)
    l_feats = np.asarray(l_feats, dtype=np.float64)
    l_classes, l_new = np.unique(np.asarray(l_targets), return_inverse=True)  # cid2ncid
    c = np.stack([l_feats[l_new == j].mean(0) for j in range(len(l_classes))])
    # k-means++ for the remaining centres over the unlabelled features, given the labelled ones
    while len(c) < k:
        d2 = _sqdist(u, c).min(1)
        cum = np.cumsum(d2 / max(d2.sum(), 1e-300))
        hit = np.flatnonzero(cum >= rng.rand())
        ind = hit[0] if len(hit) else len(u) - 1
        c = np.vstack([c, u[ind]])
    cat = np.concatenate([l_feats, u])
    best_labels, best_inertia = None, None
    for _ in range(max_iterations):
        old = c.copy()
        dist = _sqdist(u, c)
        u_labels = dist.argmin(1)
        inertia = dist[np.arange(len(u)), u_labels].sum() + ((l_feats - c[l_new]) ** 2).sum()
        labels = np.concatenate([l_new, u_labels])
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = cat[members].mean(0)
        if best_inertia is None or inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
        if np.sqrt(((c - old) ** 2).sum(1)).sum() ** 2 < tolerance:
            break
    return best_labels


def check_layout(root: str | Path) -> None:
    """The class folders and the class-split file, before any model is loaded."""
    root = Path(root)
    _, _, classes = image_folder(require(root / "small-train", "Herbarium19"))
    read_class_splits(root, len(classes))


def evaluate(model, preprocess, root: str | Path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             runs: int = 3, seed: int = 0, prop_labelled: float = 0.8, progress: bool = False) -> dict[str, Any]:
    """Herbarium19 "All" clustering accuracy (fraction) on the unlabelled images; see the module docstring."""
    from bioclip_fast.errors import DataError

    root = Path(root)
    paths, targets, classes = image_folder(require(root / "small-train", "Herbarium19"))
    old, new, split_source = read_class_splits(root, len(classes))
    # GCD: labelled = a 0.8 subsample (np.random.seed(0)) of the Old classes' images, in dataset order
    old_idx = np.flatnonzero(np.isin(targets, old))
    pick = np.random.RandomState(0).choice(len(old_idx), replace=False, size=int(prop_labelled * len(old_idx)))
    mask = np.zeros(len(old_idx), dtype=bool)
    mask[pick] = True
    labelled = old_idx[mask]
    unlabelled = np.setdiff1d(np.arange(len(paths)), labelled)
    # targets renumbered as GCD does: Old classes 0..L-1 in split order, then the rest
    remap = {c: i for i, c in enumerate(list(old) + [c for c in new if c not in set(old)])}
    missing = sorted(set(targets.tolist()) - set(remap))
    if missing:
        raise DataError(f"Herbarium19: classes {missing[:5]} are in neither the Old nor the New split")
    y = np.asarray([remap[t] for t in targets.tolist()])
    enc = extract_features(model, preprocess, [paths[i] for i in np.concatenate([labelled, unlabelled])],
                           device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
                           desc="Herbarium19")
    order = np.concatenate([labelled, unlabelled])[enc["index"]]
    is_l = np.isin(order, labelled)
    feats, yy = enc["features"], y[order]
    if not is_l.any() or is_l.all():
        raise DataError("Herbarium19: needs both labelled (Old-class) and unlabelled images")
    k = len(old) + len(new)
    u_true = yy[~is_l]
    u_old = u_true < len(old)
    scores, old_acc, new_acc = [], [], []
    for run in range(runs):
        pred = semi_supervised_kmeans(feats[~is_l], feats[is_l], yy[is_l], k, seed=seed + run)[int(is_l.sum()):]
        acc = np.zeros(len(u_true), dtype=bool)
        acc[u_old] = cluster_acc(u_true[u_old], pred[u_old])
        acc[~u_old] = cluster_acc(u_true[~u_old], pred[~u_old])
        scores.append(float(acc.mean()))
        old_acc.append(float(acc[u_old].mean()) if u_old.any() else float("nan"))
        new_acc.append(float(acc[~u_old].mean()) if (~u_old).any() else float("nan"))
    return {
        "benchmark": "Herbarium19", "metric": "clustering accuracy (All) on the unlabelled images",
        **summarize_runs(scores), "old_accuracy": float(np.mean(old_acc)), "new_accuracy": float(np.mean(new_acc)),
        "class_split": split_source, "n_classes": len(classes), "k": k, "n_labelled": int(is_l.sum()),
        "n_unlabelled": int((~is_l).sum()), "skipped": enc["skipped"],
        "protocol": f"semi-supervised k-means (K={k}, 10 iterations), {prop_labelled:.0%} of Old-class images "
                    f"labelled; {runs} runs seeded {seed}..{seed + runs - 1}",
    }
