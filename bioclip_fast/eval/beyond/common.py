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
    from bioclip_fast.eval.zeroshot import inference_autocast

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
            with inference_autocast(device):
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


def dataloader_order(n: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one pass over ``torch.utils.data.DataLoader(dataset, shuffle=shuffle)`` (no generator,
    no workers), drawing from torch's global generator exactly as the DataLoader does: ``iter()`` draws the
    iterator's base seed, then a shuffling sampler draws its own seed and permutes with a fresh generator."""
    torch.empty((), dtype=torch.int64).random_()  # _BaseDataLoaderIter._base_seed
    if not shuffle:
        return torch.arange(n)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler.__iter__
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g)


PROBE_QUIRKS = (
    "FishNet/AwA2 probes are scored with dropout on (the reference never switches the classifier to eval mode; "
    "--probe-eval-mode turns it off)",
    "FishNet/AwA2 probes threshold the logits at 0.5 (a sigmoid probability of 0.62), as the reference",
)


def mlp_probe_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    epochs: int = 50,
    lr: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    eval_mode: bool = False,
    eval_every: int = 10,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The reference's FishNet / AwA2 probe (``src/evaluation/{fishnet,awa2}.py`` as ``slurm/eval_other.sh`` runs
    them): ``Linear(D, 512) → Dropout(0.5) → Linear(512, A)`` trained with ``BCEWithLogitsLoss``, Adam (``lr``),
    StepLR(20, 0.5), ``epochs`` epochs over a shuffling loader of ``batch_size``; returns the test predictions
    ``logits > 0.5`` (sic: the reference thresholds the logits, not the sigmoid, i.e. p > 0.62).

    Reproduced, and flagged: the classifier is never put in eval mode, so the test set is scored **with dropout on**
    (``eval_mode=True`` scores it with dropout off); the reference also scores the test set every ``eval_every``
    epochs (logged only), which draws from the same random stream, so we do too. Seeded like the reference's
    ``random_seed(seed + run)`` (torch's global generator: weights, loader shuffling, dropout) inside
    ``torch.random.fork_rng`` so the caller's random state is untouched; the same draws as the reference run on the
    same device.
    """
    device = torch.device(device)
    xtr = torch.as_tensor(x_train, dtype=torch.float32)
    ytr = torch.as_tensor(y_train, dtype=torch.float32)
    xte = torch.as_tensor(x_test, dtype=torch.float32)
    if ytr.ndim != 2 or len(ytr) != len(xtr):
        raise ValueError(f"y_train must be N x A with N = {len(xtr)}, got {tuple(ytr.shape)}")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        clf = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], 512), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(512, ytr.shape[1])).to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        loss_fn = torch.nn.BCEWithLogitsLoss()

        def score() -> torch.Tensor:
            dataloader_order(len(xte), shuffle=False)
            clf.train(not eval_mode)
            with torch.no_grad():
                logits = torch.cat([clf(b.to(device)).float().cpu() for b in xte.split(batch_size)])
            clf.train()
            return logits

        for epoch in range(epochs):
            clf.train()
            for idx in dataloader_order(len(xtr), shuffle=True).split(batch_size):
                loss = loss_fn(clf(xtr[idx].to(device)), ytr[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            if eval_every and (epoch + 1) % eval_every == 0:
                score()
        logits = score()
    return (logits > 0.5).numpy().astype(np.int64)


def mlp_probe_runs(model, preprocess, train_paths, train_y, test_paths, test_y, *, name: str, runs: int, seed: int,
                   epochs: int, lr: float, device, batch_size: int, num_workers: int, progress: bool,
                   probe_batch_size: int = 256, probe_eval_mode: bool = False) -> dict[str, Any]:
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
    preds = [mlp_probe_predict(tr["features"], ytr, te["features"], epochs=epochs, lr=lr, batch_size=probe_batch_size,
                               seed=seed + run, eval_mode=probe_eval_mode, device=device) for run in range(runs)]
    return {"y_train": ytr, "y_test": yte, "preds": preds, "skipped": tr["skipped"] + te["skipped"]}


def probe_protocol(lr: float, epochs: int, batch_size: int, eval_mode: bool, runs: int, seed: int) -> str:
    return (f"raw features; MLP 512 + dropout 0.5, BCE, Adam lr {lr:g}, StepLR(20, 0.5), {epochs} epochs, batch "
            f"{batch_size}, shuffled; scored with dropout {'off' if eval_mode else 'on (reference)'}, logits > 0.5; "
            f"{runs} runs seeded {seed}..{seed + runs - 1}")


def summarize_runs(scores: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(scores, dtype=np.float64)
    return {"score": float(a.mean()), "std": float(a.std()), "runs": [float(v) for v in a]}


def require(path: Path, what: str) -> Path:
    from bioclip_fast.errors import DataError

    if not path.exists():
        raise DataError(f"{what}: {path} not found (expected layout: docs/evaluation.md)")
    return path
