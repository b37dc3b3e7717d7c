"""PlantDoc plant-disease classification (Singh et al., 2020), as the BioCLIP 2 reference evaluates it
(``src/evaluation/plantdoc.py`` of the bioclip-2 repository, from biobench).

Layout of ``root`` (the published PlantDoc classification release, ImageFolder)::

    root/train/<class>/*.jpg
    root/test/<class>/*.jpg

Protocol: L2-normalized features; per repeat ``r`` (numpy seeded ``seed + r``), one training image per class is
drawn (``np.random.shuffle`` of the class's indices, in ``np.unique`` class order) and SimpleShot (centre on the
support mean, L2-normalize, nearest class centroid) classifies every test image; mean and std over the repeats.

The draws follow the reference's order: its training features come from a *shuffled* DataLoader
(``shuffle=True``, right after ``random_seed(seed)``), so the indices it shuffles are positions in that loader's order;
we compute the same permutation (:func:`reference_train_order`) and draw over it.

Labels (``protocol``): the reference loads ``train/`` and ``test/`` as two separate ImageFolders, so each split
numbers its own sorted class folders. In the published release one class ("Tomato two spotted spider mites leaf")
exists only under ``train/``; every test class after it is numbered one lower than its train class, and its images are
scored against the wrong class. ``reference`` (default) reproduces that (the paper's number includes it) and flags it
in ``flags``, giving the by-name score as ``corrected_score``; ``corrected`` labels test images by class name (a test
class absent from ``train/`` cannot be predicted and is reported).
Ambiguity: the reference's docstring says 100 repeats, its ``--n_repeats`` default is 5, which is what runs unless
a script passes it (``slurm/eval_other.sh`` does not); we default to 5.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.beyond.common import extract_features, require, summarize_runs


# torchvision.datasets.folder.IMG_EXTENSIONS: the files an ImageFolder lists (the reference's sample order and count)
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """torchvision ImageFolder order: classes sorted, then each class folder walked as ``make_dataset`` walks it
    (``sorted(os.walk(...))``, files sorted, torchvision's extensions, case-insensitive)."""
    import os

    from bioclip_fast.errors import DataError

    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / c, followlinks=True)):
            for f in sorted(fnames):
                if f.lower().endswith(IMAGEFOLDER_EXTENSIONS):
                    paths.append(Path(dirpath) / f)
                    labels.append(i)
    if not paths:
        raise DataError(f"{root}: no class folders with images")
    return paths, np.asarray(labels, dtype=np.int64), classes


def reference_train_order(n: int, seed: int = 0) -> np.ndarray:
    """The order in which the reference's shuffled training loader yields the ``n`` ImageFolder samples: torch
    seeded ``seed`` (its ``random_seed(args.seed, 0)``), then one pass of ``DataLoader(shuffle=True)``. Computed
    without touching the caller's random state."""
    import torch

    from bioclip_fast.eval.beyond.common import dataloader_order

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dataloader_order(n, shuffle=True).numpy()


def choose_k_per_class(labels: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """The reference's draw: per class (np.unique order) shuffle its indices and keep k; then shuffle all."""
    out = np.array([], dtype=int)
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        out = np.concatenate((out, idx[:k]))
    rng.shuffle(out)
    return out


def check_layout(root: str | Path, protocol: str = "reference") -> None:
    """The class folders of both splits, before any model is loaded."""
    root = Path(root)
    image_folder(require(root / "train", "PlantDoc"))
    image_folder(require(root / "test", "PlantDoc"))


def simpleshot_repeats(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                       order: np.ndarray, repeats: int, seed: int, shots: int = 1) -> list[float]:
    """Per repeat, the accuracy of SimpleShot with ``shots`` images per class drawn as the reference draws them over
    the training samples in ``order`` (positions into ``x_train``)."""
    from bioclip_fast.eval.fewshot import simpleshot_predict

    y_ord = y_train[order]
    scores = []
    for r in range(repeats):
        i = order[choose_k_per_class(y_ord, shots, np.random.RandomState(seed + r))]
        pred = simpleshot_predict(x_train[i], y_train[i], x_test)
        scores.append(float((pred == y_test).mean()))
    return scores


def evaluate(model, preprocess, root: str | Path, *, device: str = "cpu", batch_size: int = 64, num_workers: int = 0,
             repeats: int = 5, seed: int = 0, shots: int = 1, protocol: str = "reference",
             progress: bool = False) -> dict[str, Any]:
    """PlantDoc 1-shot SimpleShot accuracy (fraction); see the module docstring."""
    from bioclip_fast.errors import DataError

    if protocol not in ("reference", "corrected"):
        raise ValueError(f"protocol={protocol!r}; choose reference or corrected")
    root = Path(root)
    tr_paths, tr_y, classes = image_folder(require(root / "train", "PlantDoc"))
    te_paths, te_y_own, te_classes = image_folder(require(root / "test", "PlantDoc"))
    index = {c: i for i, c in enumerate(classes)}
    te_y_name = np.asarray([index.get(te_classes[j], -1) for j in te_y_own], dtype=np.int64)
    only_train = [c for c in classes if c not in set(te_classes)]
    only_test = [c for c in te_classes if c not in index]
    if protocol == "corrected" and len(only_test) == len(te_classes):
        raise DataError(f"PlantDoc: no test class folder matches a train class folder (test: {te_classes[:3]})")
    tr = extract_features(model, preprocess, tr_paths, device=device, batch_size=batch_size,
                          num_workers=num_workers, progress=progress, desc="PlantDoc train")
    te = extract_features(model, preprocess, te_paths, device=device, batch_size=batch_size,
                          num_workers=num_workers, progress=progress, desc="PlantDoc test")
    ytr = tr_y[tr["index"]]
    # the reference's loader order over every train image, restricted to the readable ones (positions into ytr)
    pos = np.full(len(tr_paths), -1, dtype=np.int64)
    pos[tr["index"]] = np.arange(len(tr["index"]))
    order = pos[reference_train_order(len(tr_paths), seed)]
    order = order[order >= 0]
    by_name = simpleshot_repeats(tr["features"], ytr, te["features"], te_y_name[te["index"]], order=order,
                                 repeats=repeats, seed=seed, shots=shots)
    mismatch = bool(only_train or only_test or te_classes != classes)
    if protocol == "reference":
        scores = simpleshot_repeats(tr["features"], ytr, te["features"], te_y_own[te["index"]], order=order,
                                    repeats=repeats, seed=seed, shots=shots)
    else:
        scores = by_name
    flags = []
    if mismatch:
        shifted = [c for c in te_classes if index.get(c, -1) != te_classes.index(c)]
        what = (f"class folder(s) only under train/: {only_train}" if only_train else "") + \
               ("; " if only_train and only_test else "") + \
               (f"only under test/: {only_test}" if only_test else "")
        if protocol == "reference":
            flags.append(f"PlantDoc: {what}. As in the reference (train/ and test/ read as two separate "
                         f"ImageFolders), {len(shifted)} test class(es) carry another class's label and are scored "
                         "against it; the score by class name is corrected_score (--plantdoc-protocol corrected)")
        else:
            flags.append(f"PlantDoc: {what}; test images labelled by class name (--plantdoc-protocol corrected), "
                         "not as the reference")
    out = {
        "benchmark": "PlantDoc", "metric": f"{shots}-shot SimpleShot accuracy", **summarize_runs(scores),
        "n_classes": len(classes), "n_test_classes": len(te_classes), "n_train": int(len(ytr)),
        "n_test": int(len(te["index"])), "skipped": tr["skipped"] + te["skipped"],
        "label_protocol": protocol, "classes_only_in_train": only_train, "classes_only_in_test": only_test,
        "protocol": f"{shots} train image per class (np.random seeded {seed}+r over the reference's shuffled loader "
                    f"order), SimpleShot on every test image; {repeats} repeats; test labels "
                    f"{'of a separate ImageFolder (reference)' if protocol == 'reference' else 'by class name'}",
        "flags": flags,
    }
    if protocol == "reference" and mismatch:
        out["corrected_score"] = float(np.mean(by_name))
    return out
