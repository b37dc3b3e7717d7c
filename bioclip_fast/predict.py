"""Classify images with BioCLIP 2, any open_clip model or our checkpoints; pybioclip's API and exact rows.

* :class:`TreeOfLifeClassifier` — ``predict(images, rank=Rank.SPECIES, min_prob=1e-9, k=5)`` over the TreeOfLife
  species table (``tol_embeddings=DIR``, streamed; see :mod:`bioclip_fast.tol`) or a label set (our checkpoint's
  ``meta["classes"]``, a CSV or a list of taxa). Higher ranks sum the species probabilities of each taxon, as
  pybioclip does; ``create_taxa_filter`` / ``apply_filter`` / ``get_label_data`` as in pybioclip.
* :class:`CustomLabelsClassifier` — ``predict(images, k=None)`` over free-text labels.
* :class:`CustomLabelsBinningClassifier` — labels mapped to bins; a bin's score is the sum of its labels'.

Results are lists of dicts shaped like pybioclip's: ``file_name``, ``kingdom`` … ``species`` (+ ``species_epithet``
and ``common_name`` at species rank), ``score``; custom labels give ``file_name``, ``classification``, ``score``.
Images are decoded in batches through a DataLoader (optionally with worker processes), so memory stays bounded for
any number of files; ``iter_predict`` streams results batch by batch. Scripts port from pybioclip by changing
the import: ``TreeOfLifeClassifier(model_str=..., pretrained_str=..., device=...)``.
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
        if isinstance(rank, Enum):  # e.g. pybioclip's own Rank: same names
            rank = rank.name
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

    def __init__(self, images: Sequence[ImageInput], transform, start: int = 0):
        self.images = images
        self.transform = transform
        self.start = start  # index of images[0] in the whole input (PIL images are named by it, as in pybioclip)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        item = self.images[i]
        name = _image_name(item, self.start + i)
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
    return str(i)


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


def resolve_templates(templates: str | Sequence[str] | None) -> list:
    """``openai`` (the default: the 80 CLIP ImageNet templates pybioclip uses for custom labels), ``bioclip2``,
    ``simple`` ("a photo of {}."), ``none`` (the bare name), or a list of ``{}`` format strings / callables, as
    callables ``name -> text`` (:func:`bioclip_fast.templates.resolve_templates`)."""
    from bioclip_fast.templates import resolve_templates as resolve

    return resolve(templates, default="openai", callables=True)


class BaseClassifier:
    """Loads a model (see :mod:`bioclip_fast.model` for what ``model_str`` accepts) and turns images into features.

    pybioclip's constructor: ``BaseClassifier(model_str=..., pretrained_str=..., device=...)``. Also accepted: an
    already loaded ``model=`` (with optional ``preprocess`` / ``tokenizer``), and ``checkpoint=`` (= model_str).
    ``preprocess="auto"`` squashes to 224x224 like pybioclip for TreeOfLife models (and whenever the TreeOfLife
    species table is used), else uses the model's own transform; ``"squash"`` / ``"model"`` force one.
    """

    def __init__(
        self,
        model_str: str | os.PathLike | None = None,
        pretrained_str: str | None = None,
        device: str | torch.device | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        model: nn.Module | None = None,
        preprocess=None,
        tokenizer=None,
        meta: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        batch_size: int = 10,
        num_workers: int = 0,
        templates: str | Sequence[str] | None = "openai",
        preprocess_mode: str = "auto",
        precision: str = "fp32",
    ):
        from bioclip_fast.devices import resolve_device
        from bioclip_fast.model import get_tokenizer, image_transform, resolve_model
        from bioclip_fast.preprocess import squash_preprocess

        if checkpoint is not None:
            if model_str is not None:
                raise ValueError("pass model_str= or checkpoint=, not both")
            model_str = checkpoint
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if preprocess_mode not in ("auto", "squash", "model"):
            raise ValueError(f"preprocess={preprocess_mode!r}; choose auto, squash or model")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={precision!r}; choose fp32, bf16 or fp16")
        self.device = resolve_device(device)
        self.tol_repo = None
        if model is not None:
            if model_str is not None:
                raise ValueError("pass model_str= or model=, not both")
            self.model = model.to(self.device).eval()
            self.preprocess = preprocess or image_transform(model, train=False)
            self.tokenizer = tokenizer or get_tokenizer(model)
            self.model_str = getattr(model, "model_name", type(model).__name__)
            self.meta = dict(meta or {})
            self.kind = "module"
        else:
            loaded = resolve_model(None if model_str is None else os.fspath(model_str), pretrained_str,
                              device=self.device, model_name=model_name)
            self.model = loaded.model.to(self.device).eval()
            self.preprocess, self.tokenizer = preprocess or loaded.preprocess, tokenizer or loaded.tokenizer
            self.model_str, self.meta, self.kind, self.tol_repo = loaded.model_str, loaded.meta, loaded.kind, \
                loaded.tol_repo
        self.pretrained_str = pretrained_str
        self.preprocess_mode = preprocess_mode
        if preprocess_mode == "squash" or (preprocess_mode == "auto" and self.tol_repo and preprocess is None):
            self.preprocess = squash_preprocess(self.image_size())
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.templates = templates
        self.precision = precision

    def image_size(self) -> int:
        size = getattr(getattr(self.model, "visual", None), "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _use_squash_for_table(self) -> None:
        from bioclip_fast.preprocess import squash_preprocess

        if self.preprocess_mode == "auto":
            self.preprocess = squash_preprocess(self.image_size())

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type if self.device.type in ("cuda", "cpu") else "cpu", enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def create_image_features(self, images, normalize: bool = True) -> torch.Tensor:
        """Features of a list of PIL images (pybioclip) or of a preprocessed ``[B, 3, H, W]`` tensor."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(img.convert("RGB")) for img in images])
        with self._autocast():
            f = self.model.encode_image(images.to(self.device, non_blocking=True)).float()
        return nn.functional.normalize(f, dim=-1) if normalize else f

    @staticmethod
    def ensure_rgb_image(image) -> "PIL.Image.Image":  # noqa: F821
        from PIL import Image

        img = image if isinstance(image, Image.Image) else Image.open(image)
        return img.convert("RGB")

    def iter_image_features(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
        normalize: bool = True,
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield ``(names, features)`` per batch; unreadable images go to ``on_error`` (``raise`` | ``warn`` |
        ``skip`` | callable(name, message)) and are left out. Any iterable works, including generators. Names are
        the paths as given, and ``"<index>"`` for PIL images (pybioclip's keys)."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        bs = batch_size or self.batch_size
        pin = self.device.type == "cuda"
        # A list is served by one DataLoader (workers start once). Other iterables are chunked so a generator of
        # millions of paths is never materialized; each chunk feeds a DataLoader of several batches.
        chunks = [images] if isinstance(images, Sequence) else _chunks(images, bs * max(8, 4 * self.num_workers))
        start = 0
        for chunk in chunks:
            loader = torch.utils.data.DataLoader(
                _ImageList(chunk, self.preprocess, start), batch_size=bs, num_workers=self.num_workers,
                collate_fn=_collate, pin_memory=pin,
            )
            start += len(chunk)
            for names, tensor, errors in loader:
                for name, msg in errors:
                    _handle_error(on_error, name, msg)
                if tensor is not None:
                    yield names, self.create_image_features(tensor, normalize=normalize)

    @torch.no_grad()
    def encode_label_texts(self, names: Sequence[str]) -> torch.Tensor:
        """``[D, C]`` class embeddings as pybioclip builds them: each name in every template, encoded, normalized,
        averaged and normalized again."""
        templates = resolve_templates(self.templates)
        out = []
        for name in names:
            tokens = self.tokenizer([t(name) for t in templates]).to(self.device)
            with self._autocast():
                f = self.model.encode_text(tokens).float()
            f = nn.functional.normalize(f, dim=-1).mean(dim=0)
            out.append(f / f.norm())
        return torch.stack(out, dim=1)

    def logit_scale(self) -> float:
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().exp().float().reshape(-1)[0]) if ls is not None else 100.0

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor, txt_features: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of the model's scaled cosine similarities (pybioclip's create_probabilities)."""
        return torch.softmax(self.logit_scale() * features.float() @ txt_features.float(), dim=1)

    create_probabilities = probabilities


def _check_k(k: int | None, n: int) -> int:
    if k is None or k == 0:
        return n
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(int(k), n)


def _taxon_names(taxon) -> tuple[list[str], str]:
    d = taxon.to_dict()
    return [d[r] for r in ("kingdom", "phylum", "class", "order", "family", "genus", "species")], d["common_name"]


class TreeOfLifeClassifier(BaseClassifier):
    """Predict taxa (pybioclip's ``TreeOfLifeClassifier``).

    The label set, first found of: ``tol_embeddings`` (a folder with the TreeOfLife species table
    ``txt_emb_species.npy/json``, or its ``embeddings/`` parent), ``taxa`` (Taxon objects, metadata rows or names),
    ``labels_csv`` (a metadata CSV), our checkpoint's ``meta["classes"]``, and for the TreeOfLife models
    (``hf-hub:imageomics/bioclip-2`` ...) their table in the Hugging Face cache. With the table, class features are
    the table's embeddings (streamed, never loaded whole); otherwise they are encoded from ``text_type`` names.
    """

    def __init__(
        self,
        model_str: str | os.PathLike | None = None,
        pretrained_str: str | None = None,
        device: str | torch.device | None = None,
        *,
        tol_embeddings: str | os.PathLike | None = None,
        taxa: Sequence[Any] | None = None,
        labels_csv: str | os.PathLike | None = None,
        text_type: str | Sequence[str] = "taxonomic_common",
        table_batch: int | None = None,
        **kwargs,
    ):
        from bioclip_fast import hub
        from bioclip_fast.errors import UsageError
        from bioclip_fast.tol import SpeciesTable

        super().__init__(model_str, pretrained_str, device, **kwargs)
        self.table: SpeciesTable | None = None
        self.taxa: list | None = None
        if tol_embeddings is None and taxa is None and labels_csv is None and not (
                self.meta.get("classes") or self.meta.get("taxa")):
            if self.tol_repo is None:
                raise UsageError(
                    f"--model {self.model_str} has no label set: pass --tol-embeddings DIR (the TreeOfLife species "
                    f"table, txt_emb_species.npy/json), --labels CSV, --cls or --bins")
            tol_embeddings = hub.tol_table_dir(self)  # type: ignore[arg-type]
        if tol_embeddings is not None:
            self.table = SpeciesTable.load(tol_embeddings, device=self.device)
            dim = _embed_dim(self.model)
            if dim is not None and dim != self.table.dim:
                raise UsageError(f"--tol-embeddings {tol_embeddings}: the table's embeddings have dimension "
                                 f"{self.table.dim}, the model's {dim} (a table made with another model)")
            self._use_squash_for_table()
            # the table is streamed once per scoring pass: score enough images per pass to amortize the read
            self.table_batch = table_batch or (256 if self.device.type == "cpu" else 4096)
        else:
            if taxa is not None:
                self.taxa = [to_taxon(t) for t in taxa]
            elif labels_csv is not None:
                self.taxa = taxa_from_csv(labels_csv)
            else:
                self.taxa = taxa_from_meta(self.meta)
            if not self.taxa:
                raise ValueError("the label set is empty")
            types = [text_type] if isinstance(text_type, str) else list(text_type)
            self._all_taxa = list(self.taxa)
            self._all_features = self._taxa_features(self.taxa, types)
            self.txt_features = self._all_features
            self.table_batch = table_batch or self.batch_size

    @torch.no_grad()
    def _taxa_features(self, taxa: Sequence[Any], types: Sequence[str]) -> torch.Tensor:
        templates = resolve_templates(self.templates)
        out = []
        for t in taxa:
            texts = [tp(t.text(tt, template=False)) for tt in types for tp in templates]
            tokens = self.tokenizer(texts).to(self.device)
            with self._autocast():
                f = self.model.encode_text(tokens).float()
            f = nn.functional.normalize(f, dim=-1).mean(dim=0)
            out.append(f / f.norm())
        return torch.stack(out, dim=1)

    text_features = _taxa_features

    # ---- labels (pybioclip API) ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table) if self.table is not None else len(self.taxa)

    def get_classification_dict(self, column: int, rank: Rank) -> dict[str, str]:
        """pybioclip's dict of names at ``rank`` for a table column (or a label-set index)."""
        rank = Rank.parse(rank)
        if self.table is not None:
            return self.table.names.classification(column, rank.value)
        sci, common = _taxon_names(self.taxa[column])
        out: dict[str, str] = {}
        for r in Rank:
            if r.value > rank.value:
                break
            if r is Rank.SPECIES:
                out["species_epithet"] = sci[6]
                out["species"] = self.taxa[column].scientific_name if sci[5] and sci[6] else sci[6]
            else:
                out[r.get_label()] = sci[r.value]
        if rank is Rank.SPECIES:
            out["common_name"] = common
        return out

    def iter_label_rows(self) -> Iterator[dict[str, str]]:
        """Every label (all of the table, not the subset) as pybioclip's species-rank dict."""
        if self.table is not None:
            yield from self.table.label_rows()
        else:
            for i in range(len(self._all_taxa)):
                yield self._label_dict(self._all_taxa[i])

    def _label_dict(self, taxon) -> dict[str, str]:
        sci, common = _taxon_names(taxon)
        d = dict(zip(("kingdom", "phylum", "class", "order", "family", "genus"), sci[:6]))
        d["species_epithet"] = sci[6]
        d["species"] = taxon.scientific_name if sci[5] and sci[6] else sci[6]
        d["common_name"] = common
        return d

    def get_label_data(self):
        """The label set as a pandas DataFrame (kingdom … genus, species_epithet, species, common_name)."""
        import pandas as pd

        from bioclip_fast.tol import LABEL_COLUMNS

        return pd.DataFrame(list(self.iter_label_rows()), columns=list(LABEL_COLUMNS))

    def create_taxa_filter(self, rank: Rank | str, user_values: Sequence[str]):
        """A boolean mask of the labels whose ``rank`` is one of ``user_values`` (pybioclip's error for unknown
        values)."""
        rank = Rank.parse(rank)
        if self.table is not None:
            return self.table.taxa_filter(rank.value, list(user_values))
        import numpy as np

        label = rank.get_label()
        col = [r[label] for r in self.iter_label_rows()]
        known = set(col)
        unknown = [str(v) for v in user_values if str(v) not in known]
        if unknown:
            raise ValueError(f"Unknown {label} received: {', '.join(unknown)}. Only known {label} may be used.")
        wanted = {str(v) for v in user_values}
        return np.array([c in wanted for c in col], dtype=bool)

    def create_taxa_filter_from_csv(self, csv_path: str | os.PathLike):
        """The filter for a CSV whose first column is named after a rank (pybioclip's ``--subset``)."""
        path = Path(csv_path)
        if not path.is_file():
            raise FileNotFoundError(f"subset CSV not found: {path}")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
        if not rows:
            raise ValueError(f"{path}: empty subset CSV")
        column_name = rows[0][0].strip().lower()
        allowed = [r.get_label() for r in Rank]
        if column_name not in allowed:
            raise ValueError(f"The first column of {csv_path} is named '{column_name}' but must be one of "
                             f"{','.join(allowed)}.")
        return self.create_taxa_filter(Rank.parse(column_name), [r[0] for r in rows[1:] if r[0] != ""])

    def apply_filter(self, keep_labels_ary) -> None:
        """Restrict predictions to the labels where ``keep_labels_ary`` is true (pybioclip)."""
        import numpy as np

        keep = np.asarray(keep_labels_ary, dtype=bool).reshape(-1)
        if self.table is not None:
            self.table.apply_filter(keep)
            return
        if len(keep) != len(self._all_taxa):
            raise ValueError("Invalid keep_embeddings values. "
                             f"This parameter should be a list containing {len(self._all_taxa)} items.")
        idx = np.flatnonzero(keep)
        self.taxa = [self._all_taxa[i] for i in idx]
        self.txt_features = self._all_features[:, torch.from_numpy(idx).to(self._all_features.device)]

    # ---- prediction ---------------------------------------------------------------------------------------------
    def format_species_probs(self, image_key: str, values: Sequence[float], columns: Sequence[int]) -> list[dict]:
        return [{PRED_FILENAME_KEY: image_key, **self.get_classification_dict(int(c), Rank.SPECIES),
                 PRED_SCORE_KEY: float(p)} for c, p in zip(columns, values)]

    def _rows(self, names: list[str], feats: torch.Tensor, rank: Rank, min_prob: float, k: int | None) -> list[dict]:
        rows: list[dict[str, Any]] = []
        if self.table is not None:
            scores = self.table.score(feats, self.logit_scale(), k=k if rank is Rank.SPECIES else 1,
                                      min_prob=None if rank is Rank.SPECIES else min_prob)
            for r, name in enumerate(names):
                if rank is Rank.SPECIES:
                    rows.extend(self.format_species_probs(name, scores.top_values[r].tolist(),
                                                          scores.top_indices[r].tolist()))
                else:
                    cols, probs = scores.groups[r]
                    for col, total in self.table.group(cols, probs, rank.value, k):
                        rows.append({PRED_FILENAME_KEY: name, **self.get_classification_dict(col, rank),
                                     PRED_SCORE_KEY: total})
            return rows
        probs = self.probabilities(feats, self.txt_features).cpu()
        for name, p in zip(names, probs):
            if rank is Rank.SPECIES:
                top = p.topk(_check_k(k, len(self.taxa)))
                rows.extend(self.format_species_probs(name, top.values.tolist(), top.indices.tolist()))
                continue
            sel = torch.nonzero(p > min_prob).flatten().numpy()
            keys = [tuple(self.get_classification_dict(int(i), rank).values()) for i in sel]
            totals: dict[tuple, float] = defaultdict(float)
            first: dict[tuple, int] = {}
            for i, key in zip(sel, keys):
                totals[key] += float(p[i])
                first.setdefault(key, int(i))
            best = heapq.nlargest(_check_k(k, max(len(totals), 1)), totals, key=totals.get)
            rows.extend({PRED_FILENAME_KEY: name, **self.get_classification_dict(first[key], rank),
                         PRED_SCORE_KEY: totals[key]} for key in best)
        return rows

    def iter_predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        rank: Rank | str = Rank.SPECIES,
        min_prob: float = 1e-9,
        k: int | None = 5,
        batch_size: int | None = None,
        on_error: ErrorHandler = "raise",
    ) -> Iterator[list[dict[str, Any]]]:
        """Like :meth:`predict`, yielding rows as soon as they are done (per scoring pass of ``table_batch``
        images with the species table, per batch otherwise)."""
        rank = Rank.parse(rank)
        if k is not None and int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        pending_names: list[str] = []
        pending: list[torch.Tensor] = []
        for names, feats in self.iter_image_features(images, batch_size=batch_size, on_error=on_error):
            pending_names.extend(names)
            pending.append(feats)
            if len(pending_names) >= self.table_batch:
                yield self._rows(pending_names, torch.cat(pending), rank, min_prob, k)
                pending_names, pending = [], []
        if pending_names:
            yield self._rows(pending_names, torch.cat(pending), rank, min_prob, k)

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        rank: Rank | str = Rank.SPECIES,
        min_prob: float = 1e-9,
        k: int | None = 5,
        batch_size: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        on_error: ErrorHandler = "raise",
    ) -> list[dict[str, Any]]:
        """Top-``k`` taxa at ``rank`` for each image (paths or PIL images); higher ranks sum species probabilities
        above ``min_prob``. Returns one dict per (image, taxon), pybioclip's keys and order."""
        out: list[dict[str, Any]] = []
        total = len(images) if isinstance(images, Sequence) and not isinstance(images, str) else None
        done = 0
        for rows in self.iter_predict(images, rank, min_prob, k, batch_size, on_error):
            out.extend(rows)
            if callback is not None and total is not None:
                done += len(dict.fromkeys(r[PRED_FILENAME_KEY] for r in rows))
                callback(min(done, total), total)
        return out


def _embed_dim(model: nn.Module) -> int | None:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    cfg = getattr(model, "model_cfg", None)
    return int(cfg["embed_dim"]) if isinstance(cfg, Mapping) and "embed_dim" in cfg else None


class CustomLabelsClassifier(BaseClassifier):
    """Zero-shot classification among free-text labels (pybioclip's ``CustomLabelsClassifier(cls_ary, ...)``):
    each label in the 80 OpenAI templates, averaged."""

    def __init__(self, cls_ary: Sequence[str], model_str: str | os.PathLike | None = None,
                 pretrained_str: str | None = None, device: str | torch.device | None = None, **kwargs):
        if isinstance(cls_ary, str):
            raise TypeError("cls_ary must be a list of labels, not one string")
        classes = [str(c).strip() for c in cls_ary]
        empty = [i for i, c in enumerate(classes) if not c]
        if not classes or empty:
            raise ValueError(f"labels must be non-empty strings (empty at positions {empty})")
        if len(set(classes)) != len(classes):
            dupes = sorted({c for c in classes if classes.count(c) > 1})
            raise ValueError(f"duplicate labels: {dupes}")
        super().__init__(model_str, pretrained_str, device, **kwargs)
        self.classes = classes
        self.txt_features = self.txt_embeddings = self.encode_label_texts(self.classes)

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
        callback: Callable[[int, int], None] | None = None,
        on_error: ErrorHandler = "raise",
    ) -> list[dict[str, Any]]:
        """Top-``k`` labels (all when ``k`` is None) per image."""
        out: list[dict[str, Any]] = []
        total = len(images) if isinstance(images, Sequence) and not isinstance(images, str) else None
        for rows in self.iter_predict(images, k, batch_size, on_error):
            out.extend(rows)
            if callback is not None and total is not None:
                callback(min(len(dict.fromkeys(r[PRED_FILENAME_KEY] for r in out)), total), total)
        return out


class CustomLabelsBinningClassifier(CustomLabelsClassifier):
    """Labels grouped into bins (``cls_to_bin``: label -> bin); a bin's score is the sum of its labels' probabilities."""

    def __init__(self, cls_to_bin: Mapping[str, str], model_str: str | os.PathLike | None = None,
                 pretrained_str: str | None = None, device: str | torch.device | None = None, **kwargs):
        if not isinstance(cls_to_bin, Mapping) or not cls_to_bin:
            raise ValueError("cls_to_bin must be a non-empty mapping of label -> bin")
        empty = [c for c, b in cls_to_bin.items() if b is None or b != b or not str(b).strip()]
        if empty:
            raise ValueError(f"Empty, null, or nan are not allowed for bin values (labels {empty[:5]})")
        super().__init__(list(cls_to_bin), model_str, pretrained_str, device, **kwargs)
        self.cls_to_bin = dict(cls_to_bin)
        self.bins = list(dict.fromkeys(str(cls_to_bin[c]).strip() for c in cls_to_bin))
        index = {b: i for i, b in enumerate(self.bins)}
        self._bin_of = torch.tensor([index[str(cls_to_bin[c]).strip()] for c in cls_to_bin])

    def _group(self, probs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        binned = torch.zeros(probs.shape[0], len(self.bins), dtype=probs.dtype)
        binned.index_add_(1, self._bin_of, probs)
        return self.bins, binned


def read_bins_csv(path: str | os.PathLike) -> dict[str, str]:
    """pybioclip's ``--bins`` CSV: a header row, then label (first column) and bin (second column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bins CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    if not rows:
        raise ValueError(f"{path}: empty bins CSV")
    if len(rows[0]) < 2:
        raise ValueError(f"{path}: CSV file must have at least two columns (label, bin), with a header row")
    out: dict[str, str] = {}
    for i, r in enumerate(rows[1:], start=2):
        if len(r) < 2 or not r[1].strip():
            raise ValueError(f"{path}: line {i} has no bin: {r}")
        out[r[0]] = r[1]
    if not out:
        raise ValueError(f"{path}: no label rows after the header")
    return out
