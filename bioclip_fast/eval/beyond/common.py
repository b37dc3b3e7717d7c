"""Shared pieces of the beyond-species evaluators: an image-list dataset that skips unreadable files, feature
extraction, the reference's multi-label MLP probe, and seeded runs."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class ImageListDataset(Dataset):
    """``(path, target)`` pairs; yields ``{"image", "label", "key", "index", "error"}`` (``image=None`` and the error
    for a file that cannot be read, which :func:`bioclip_fast.eval.datasets.collate_skipping` lists and drops)."""

    def __init__(self, paths: Sequence[str | os.PathLike], targets: Sequence[Any], transform=None):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = list(targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        target = torch.as_tensor(np.asarray(self.targets[i]))
        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
            if self.transform is not None:
                img = self.transform(img)
        except Exception as e:  # noqa: BLE001 - reported by file name and skipped
            return {"image": None, "label": target, "key": self.paths[i], "index": i, "error": f"{type(e).__name__}: {e}"}
        return {"image": img, "label": target, "key": self.paths[i], "index": i, "error": None}


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    preprocess,
    paths: Sequence[str | os.PathLike],
    targets: Sequence[Any] | None = None,
    *,
    normalize: bool = True,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> dict[str, Any]:
    """Image-tower features of ``paths`` (float32 numpy, N_kept x D; L2-normalized unless ``normalize=False``, as
    the reference leaves FishNet/AwA2 features raw), the ``index`` into ``paths`` of each kept image, and the list of
    skipped (unreadable) images ``[{"image", "error"}]``."""
    from tqdm.auto import tqdm

    from bioclip_fast.eval.datasets import collate_skipping
    from bioclip_fast.eval.zeroshot import _autocast

    device = torch.device(device)
    if targets is None:
        targets = [0] * len(paths)
    ds = ImageListDataset(paths, targets, transform=preprocess)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping)
    was_training = model.training
    model.eval()
    feats, index, skipped = [], [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            skipped.extend(batch["skipped"])
            if batch["image"] is None:
                continue
            with _autocast(device):
                f = model.encode_image(batch["image"].to(device)).float()
            if normalize:
                f = torch.nn.functional.normalize(f, dim=-1)
            feats.append(f.cpu().numpy())
            index.extend(int(i) for i in batch["index"])
    finally:
        model.train(was_training)
    if not feats:
        first = f" (first: {skipped[0]['image']}: {skipped[0]['error']})" if skipped else ""
        raise ValueError(f"{desc}: no readable image among {len(paths)}{first}")
    return {"features": np.concatenate(feats).astype(np.float32), "index": np.asarray(index, dtype=np.int64),
            "skipped": skipped}


def mlp_probe_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The reference's FishNet / AwA2 probe: ``Linear(D, 512) → Dropout(0.5) → Linear(512, A)`` trained with
    ``BCEWithLogitsLoss``, Adam (lr 1e-4), StepLR(20, 0.5), shuffled batches of 64, ``epochs`` epochs; returns the
    test predictions ``logits > 0.5`` (sic: the reference thresholds the logits, not the sigmoid, i.e. p > 0.62).

    Seeded like the reference's ``random_seed(seed + run)`` (torch's global generator: weights, shuffling,
    dropout), inside ``torch.random.fork_rng`` so the caller's random state is untouched.
    """
    device = torch.device(device)
    xtr = torch.as_tensor(x_train, dtype=torch.float32)
    ytr = torch.as_tensor(y_train, dtype=torch.float32)
    xte = torch.as_tensor(x_test, dtype=torch.float32)
    if ytr.ndim != 2 or len(ytr) != len(xtr):
        raise ValueError(f"y_train must be N x A with N = {len(xtr)}, got {tuple(ytr.shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], 512), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(512, ytr.shape[1])).to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        n = len(xtr)
        for _ in range(epochs):
            clf.train()
            for idx in torch.randperm(n).split(batch_size):
                loss = loss_fn(clf(xtr[idx].to(device)), ytr[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        clf.eval()
        with torch.no_grad():
            logits = torch.cat([clf(b.to(device)).cpu() for b in xte.split(1024)])
    return (logits > 0.5).numpy().astype(np.int64)


def mlp_probe_runs(model, preprocess, train_paths, train_y, test_paths, test_y, *, name: str, runs: int, seed: int,
                   epochs: int, lr: float, device, batch_size: int, num_workers: int, progress: bool) -> dict[str, Any]:
    """The FishNet / AwA2 protocol around :func:`mlp_probe_predict`: raw (unnormalized) train/test features, one probe
    per run seeded ``seed + run``. Returns the kept targets ``y_train``/``y_test``, the test predictions of each run
    (``preds``) and the skipped images of both splits."""
    feats = {}
    for split, paths in (("train", train_paths), ("test", test_paths)):
        feats[split] = extract_features(model, preprocess, paths, normalize=False, device=device,
                                        batch_size=batch_size, num_workers=num_workers, progress=progress,
                                        desc=f"{name} {split}")
    tr, te = feats["train"], feats["test"]
    ytr, yte = train_y[tr["index"]], test_y[te["index"]]
    preds = [mlp_probe_predict(tr["features"], ytr, te["features"], epochs=epochs, lr=lr, batch_size=batch_size,
                               seed=seed + run, device=device) for run in range(runs)]
    return {"y_train": ytr, "y_test": yte, "preds": preds, "skipped": tr["skipped"] + te["skipped"]}


def summarize_runs(scores: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(scores, dtype=np.float64)
    return {"score": float(a.mean()), "std": float(a.std()), "runs": [float(v) for v in a]}


def require(path: Path, what: str) -> Path:
    from bioclip_fast.errors import DataError

    if not path.exists():
        raise DataError(f"{what}: {path} not found (expected layout: docs/evaluation.md)")
    return path
