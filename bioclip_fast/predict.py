"""Classify images with a bioclip_fast (or open_clip) checkpoint; a pybioclip-compatible API.

* :class:`TreeOfLifeClassifier` — ``predict(images, rank=Rank.SPECIES, min_prob=1e-9, k=5)`` over the taxa of the
  model's label set (the checkpoint's ``meta["classes"]``, or a CSV / list of taxa). Higher ranks sum the species
  probabilities of each taxon, as pybioclip does.
* :class:`CustomLabelsClassifier` — ``predict(images, k=None)`` over free-text labels.
* :class:`CustomLabelsBinningClassifier` — labels mapped to bins; a bin's score is the sum of its labels'.

Results are lists of dicts shaped like pybioclip's: ``file_name``, ``kingdom`` … ``species`` (+ ``species_epithet``
and ``common_name`` at species rank), ``score``; custom labels give ``file_name``, ``classification``, ``score``.
Images are decoded in batches through a DataLoader (optionally with worker processes), so memory stays bounded for
any number of files; :meth:`BaseClassifier.iter_predict` streams results batch by batch.
"""
from __future__ import annotations

import csv
import heapq
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

ImageInput = Union[str, os.PathLike, "PIL.Image.Image"]  # noqa: F821 - PIL imported lazily
ErrorHandler = Union[str, Callable[[str, str], None]]

PRED_FILENAME_KEY = "file_name"
PRED_CLASSIFICATION_KEY = "classification"
PRED_SCORE_KEY = "score"


class Rank(Enum):
    KINGDOM = 0
    PHYLUM = 1
    CLASS = 2
    ORDER = 3
    FAMILY = 4
    GENUS = 5
    SPECIES = 6

    def get_label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, rank: Rank | str | int) -> Rank:
        if isinstance(rank, Rank):
            return rank
        if isinstance(rank, int):
            return cls(rank)
        try:
            return cls[str(rank).strip().upper()]
        except KeyError:
            raise ValueError(f"rank={rank!r}; choose one of {[r.get_label() for r in cls]}") from None


# --------------------------------------------------------------------------------------------------------------------
# label sets
# --------------------------------------------------------------------------------------------------------------------
def _taxon_from_string(s: str):
    from bioclip_fast.taxonomy import Taxon

    s = s.strip()
    if " species " in f" {s} " and "kingdom " in s:
        return Taxon.from_tagged(s)
    parts = s.split()
    if len(parts) == 7:  # a taxonomic string: kingdom phylum class order family genus epithet
        return Taxon(*parts)
    if len(parts) >= 2 and parts[0][:1].isupper() and parts[1][:1].islower():
        return Taxon.from_row({"scientific_name": s})
    return Taxon(species=s)


def to_taxon(obj: Any):
    """A :class:`~bioclip_fast.taxonomy.Taxon` from a Taxon, a metadata row (dict) or a name string."""
    from bioclip_fast.taxonomy import Taxon

    if isinstance(obj, Taxon):
        return obj
    if isinstance(obj, Mapping):
        return Taxon.from_row(obj)
    if isinstance(obj, str):
        return _taxon_from_string(obj)
    raise TypeError(f"cannot make a taxon from {type(obj).__name__}: {obj!r}")


def taxa_from_csv(path: str | os.PathLike) -> list:
    """Unique taxa of a metadata CSV (rank columns and/or ``scientific_name``, optional ``common_name``), in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    seen, taxa = set(), []
    for i, row in enumerate(rows, start=2):
        try:
            t = to_taxon({k.strip(): v for k, v in row.items() if k})
        except ValueError as e:
            raise ValueError(f"{path}: line {i}: {e}") from None
        if t.label not in seen:
            seen.add(t.label)
            taxa.append(t)
    return taxa


def taxa_from_meta(meta: Mapping[str, Any]) -> list:
    """The label set stored in a checkpoint's meta (``classes``: rows, taxon strings or names)."""
    classes = meta.get("classes") or meta.get("taxa")
    if not classes:
        raise ValueError("the checkpoint's meta has no 'classes'; pass taxa= or a labels CSV (--labels)")
    return [to_taxon(c) for c in classes]


# --------------------------------------------------------------------------------------------------------------------
# image streaming
# --------------------------------------------------------------------------------------------------------------------
class _ImageList(torch.utils.data.Dataset):
    """Decodes one image per item; failures come back as messages instead of exceptions (reported, then skipped)."""

    def __init__(self, images: Sequence[ImageInput], transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        item = self.images[i]
        name = _image_name(item, i)
        try:
            if isinstance(item, Image.Image):
                img = item.convert("RGB")
            else:
                with Image.open(item) as im:
                    img = im.convert("RGB")  # forces a full decode: truncated files fail here
            return name, self.transform(img), None
        except FileNotFoundError:
            return name, None, "file not found"
        except IsADirectoryError:
            return name, None, "is a directory"
        except Exception as e:  # noqa: BLE001 - any decode failure is reported by file name and skipped
            return name, None, f"{type(e).__name__}: {e}"


def _image_name(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return str(getattr(item, "filename", "") or i)


def _collate(batch):
    ok = [(n, t) for n, t, e in batch if e is None]
    errors = [(n, e) for n, _, e in batch if e is not None]
    names = [n for n, _ in ok]
    tensor = torch.stack([t for _, t in ok]) if ok else None
    return names, tensor, errors


def _handle_error(on_error: ErrorHandler, name: str, message: str) -> None:
    if callable(on_error):
        on_error(name, message)
    elif on_error == "raise":
        raise ValueError(f"cannot read image {name}: {message}")
    elif on_error == "warn":
        print(f"warning: skipping {name}: {message}", file=sys.stderr)
    elif on_error != "skip":
        raise ValueError(f"on_error={on_error!r}; choose raise, warn, skip or a callable(name, message)")


def _chunks(images: Iterable[ImageInput], size: int) -> Iterator[list]:
    chunk: list = []
    for im in images:
        chunk.append(im)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BaseClassifier:
    """Loads a model and turns images into normalized image features, batch by batch."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        model: nn.Module | None = None,
        preprocess=None,
        tokenizer=None,
        meta: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        templates: str | Sequence[str] | None = "openai",
    ):
        from bioclip_fast.model import get_tokenizer, image_transform, load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if (checkpoint is None) == (model is None):
            raise ValueError("pass exactly one of checkpoint= (a file) or model= (a loaded model)")
        if checkpoint is not None:
            path = Path(checkpoint)
            if path.is_dir():
                path = path / "model.pt"
            model, preprocess, tokenizer, meta = load_model(path, model_name=model_name, device=self.device)
        else:
            model = model.to(self.device).eval()
            preprocess = preprocess or image_transform(model, train=False)
            tokenizer = tokenizer or get_tokenizer(model)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.meta = dict(meta or {})
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.templates = templates

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def create_image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with self._autocast():
            f = self.model.encode_image(images.to(self.device, non_blocking=True)).float()
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def iter_image_features(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
        normalize: bool = True,
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield ``(names, features)`` per batch; unreadable images go to ``on_error`` (``raise`` | ``warn`` |
        ``skip`` | callable(name, message)) and are left out. Any iterable works, including generators."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        bs = batch_size or self.batch_size
        pin = self.device.type == "cuda"
        # A list is served by one DataLoader (workers start once). Other iterables are chunked so a generator of
        # millions of paths is never materialized; each chunk feeds a DataLoader of several batches.
        chunks = [images] if isinstance(images, Sequence) else _chunks(images, bs * max(8, 4 * self.num_workers))
        for chunk in chunks:
            loader = torch.utils.data.DataLoader(
                _ImageList(chunk, self.preprocess), batch_size=bs, num_workers=self.num_workers,
                collate_fn=_collate, pin_memory=pin,
            )
            for names, tensor, errors in loader:
                for name, msg in errors:
                    _handle_error(on_error, name, msg)
                if tensor is not None:
                    yield names, self.create_image_features(tensor, normalize=normalize)

    @torch.no_grad()
    def text_features(self, classes: Sequence[Any], text_types: Sequence[str] = ("taxonomic_common",)) -> torch.Tensor:
        """D x C class embeddings, averaged over the templates (and text types) as in evaluation."""
        from bioclip_fast.eval.zeroshot import zero_shot_classifier

        return zero_shot_classifier(self.model, self.tokenizer, classes, text_types=list(text_types),
                                    templates=self.templates, device=self.device)

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor, txt_features: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of the model's scaled cosine similarities (as CLIP's logits)."""
        scale = self.model.logit_scale.exp().float().reshape(-1)[0] if hasattr(self.model, "logit_scale") else 100.0
        return torch.softmax(scale * features @ txt_features, dim=1)


def _check_k(k: int | None, n: int) -> int:
    if k is None:
        return n
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(int(k), n)


class TreeOfLifeClassifier(BaseClassifier):
    """Predict taxa among a model's label set (pybioclip's ``TreeOfLifeClassifier`` surface).

    The label set is ``taxa`` (Taxon objects, metadata rows or names), else ``labels_csv`` (a metadata CSV), else the
    checkpoint's ``meta["classes"]``. Class texts use ``text_type`` (default ``taxonomic_common``, averaged over the
    templates).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        taxa: Sequence[Any] | None = None,
        labels_csv: str | os.PathLike | None = None,
        text_type: str | Sequence[str] = "taxonomic_common",
        **kwargs,
    ):
        super().__init__(checkpoint, **kwargs)
        if taxa is not None:
            self.taxa = [to_taxon(t) for t in taxa]
        elif labels_csv is not None:
            self.taxa = taxa_from_csv(labels_csv)
        else:
            self.taxa = taxa_from_meta(self.meta)
        if not self.taxa:
            raise ValueError("the label set is empty")
        types = [text_type] if isinstance(text_type, str) else list(text_type)
        self.txt_features = self.text_features(self.taxa, types)

    def _classification(self, taxon, rank: Rank) -> dict[str, str]:
        d = taxon.to_dict()
        out: dict[str, str] = {}
        for r in Rank:
            if r.value > rank.value:
                break
            label = r.get_label()
            if r is Rank.SPECIES:
                out["species_epithet"] = d["species"]
                out["species"] = taxon.scientific_name if d["genus"] and d["species"] else d["species"]
            else:
                out[label] = d[label]
        if rank is Rank.SPECIES:
            out["common_name"] = d["common_name"]
        return out

    def format_probs(self, name: str, probs: torch.Tensor, rank: Rank, min_prob: float, k: int) -> list[dict[str, Any]]:
        if rank is Rank.SPECIES:
            top = probs.topk(_check_k(k, len(self.taxa)))
            return [
                {PRED_FILENAME_KEY: name, **self._classification(self.taxa[i], rank), PRED_SCORE_KEY: float(p)}
                for i, p in zip(top.indices.tolist(), top.values.tolist())
            ]
        totals: dict[tuple, float] = defaultdict(float)
        cls: dict[tuple, dict[str, str]] = {}
        for i in torch.nonzero(probs > min_prob).flatten().tolist():
            c = self._classification(self.taxa[i], rank)
            key = tuple(c.values())
            cls[key] = c
            totals[key] += float(probs[i])
        best = heapq.nlargest(_check_k(k, max(len(totals), 1)), totals, key=totals.get)
        return [{PRED_FILENAME_KEY: name, **cls[key], PRED_SCORE_KEY: totals[key]} for key in best]

    def iter_predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        rank: Rank | str = Rank.SPECIES,
        min_prob: float = 1e-9,
        k: int | None = 5,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
    ) -> Iterator[list[dict[str, Any]]]:
        """Like :meth:`predict`, yielding the rows of each batch as soon as it is done."""
        rank = Rank.parse(rank)
        for names, feats in self.iter_image_features(images, batch_size=batch_size, on_error=on_error):
            probs = self.probabilities(feats, self.txt_features).cpu()
            rows: list[dict[str, Any]] = []
            for name, p in zip(names, probs):
                rows.extend(self.format_probs(name, p, rank, min_prob, k))
            yield rows

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        rank: Rank | str = Rank.SPECIES,
        min_prob: float = 1e-9,
        k: int | None = 5,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
    ) -> list[dict[str, Any]]:
        """Top-``k`` taxa at ``rank`` for each image (paths or PIL images); higher ranks sum species probabilities
        above ``min_prob``. Returns one dict per (image, taxon)."""
        return [r for rows in self.iter_predict(images, rank, min_prob, k, batch_size, on_error) for r in rows]

    def get_label_data(self) -> list[dict[str, str]]:
        """The label set as rows (kingdom … species, common_name)."""
        return [t.to_dict() for t in self.taxa]


class CustomLabelsClassifier(BaseClassifier):
    """Zero-shot classification among free-text labels (pybioclip's ``CustomLabelsClassifier(cls_ary)``)."""

    def __init__(self, cls_ary: Sequence[str], checkpoint: str | os.PathLike | None = None, **kwargs):
        super().__init__(checkpoint, **kwargs)
        if isinstance(cls_ary, str):
            raise TypeError("cls_ary must be a list of labels, not one string")
        self.classes = [str(c).strip() for c in cls_ary]
        empty = [i for i, c in enumerate(self.classes) if not c]
        if not self.classes or empty:
            raise ValueError(f"labels must be non-empty strings (empty at positions {empty})")
        if len(set(self.classes)) != len(self.classes):
            dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise ValueError(f"duplicate labels: {dupes}")
        self.txt_features = self._label_features(self.classes)

    def _label_features(self, labels: Sequence[str]) -> torch.Tensor:
        return self.text_features(labels, ("scientific",))  # plain strings: every text type is the string itself

    def _group(self, probs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        return self.classes, probs

    def iter_predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        k: int | None = None,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
    ) -> Iterator[list[dict[str, Any]]]:
        for names, feats in self.iter_image_features(images, batch_size=batch_size, on_error=on_error):
            labels, probs = self._group(self.probabilities(feats, self.txt_features).cpu())
            kk = _check_k(k, len(labels))
            top = probs.topk(kk, dim=1)
            rows = []
            for name, idx, val in zip(names, top.indices.tolist(), top.values.tolist()):
                rows.extend(
                    {PRED_FILENAME_KEY: name, PRED_CLASSIFICATION_KEY: labels[i], PRED_SCORE_KEY: float(p)}
                    for i, p in zip(idx, val)
                )
            yield rows

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        k: int | None = None,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
    ) -> list[dict[str, Any]]:
        """Top-``k`` labels (all when ``k`` is None) per image."""
        return [r for rows in self.iter_predict(images, k, batch_size, on_error) for r in rows]


class CustomLabelsBinningClassifier(CustomLabelsClassifier):
    """Labels grouped into bins (``cls_to_bin``: label -> bin); a bin's score is the sum of its labels' probabilities."""

    def __init__(self, cls_to_bin: Mapping[str, str], checkpoint: str | os.PathLike | None = None, **kwargs):
        if not isinstance(cls_to_bin, Mapping) or not cls_to_bin:
            raise ValueError("cls_to_bin must be a non-empty mapping of label -> bin")
        empty = [c for c, b in cls_to_bin.items() if not str(b).strip()]
        if empty:
            raise ValueError(f"labels without a bin: {empty[:5]}")
        super().__init__(list(cls_to_bin), checkpoint, **kwargs)
        self.bins = list(dict.fromkeys(str(cls_to_bin[c]).strip() for c in cls_to_bin))
        index = {b: i for i, b in enumerate(self.bins)}
        self._bin_of = torch.tensor([index[str(cls_to_bin[c]).strip()] for c in cls_to_bin])

    def _group(self, probs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        binned = torch.zeros(probs.shape[0], len(self.bins), dtype=probs.dtype)
        binned.index_add_(1, self._bin_of, probs)
        return self.bins, binned


def read_bins_csv(path: str | os.PathLike) -> dict[str, str]:
    """A two-column CSV (label, bin; a header row is recognised by the column names) as a label -> bin dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bins CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    if not rows:
        raise ValueError(f"{path}: empty bins CSV")
    out: dict[str, str] = {}
    for i, r in enumerate(rows, start=1):
        if len(r) < 2:
            raise ValueError(f"{path}: line {i} needs two columns (label, bin), got {r}")
        out[r[0].strip()] = r[1].strip()
    first = rows[0]
    if len(rows) > 1 and first[0].strip().lower() in ("cls", "label", "class", "classification") and \
            first[1].strip().lower() in ("bin", "bins", "group"):
        out.pop(first[0].strip())
    return out
