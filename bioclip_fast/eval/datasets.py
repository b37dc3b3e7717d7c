"""Labelled image sources for evaluation and analysis.

* an image folder + CSV (one row per image: an image path column, relative to the CSV's folder or ``root``, and a
  label column; taxonomic rank columns, ``scientific_name`` and ``common_name`` give the class texts). Both CSV
  conventions are read: ours (``image``, the class rank in ``class``) and the BioCLIP 2 reference's (``filepath``,
  the class rank in ``cls``, the as-is label in ``class``, a leading unnamed index column); see
  :mod:`bioclip_fast.eval.naming`,
* an ImageFolder-style directory (one sub-directory per class; the directory name is the class text),
* our webdataset shards (``*.tar`` files or a directory of them, through :func:`bioclip_fast.data.make_loader`),
* the bundled Leeds butterflies (``butterflies``, with the same train/val split the training job uses).

:func:`load_eval_data` turns any of them into an :class:`EvalData`: a loader yielding ``{"image", "label", "key"}``,
the list of classes (label indices point into it) and, for CSV sources, the metadata row of each image (in loader
order) for attribute analyses.

Unreadable images (missing, truncated, not an image) are skipped, counted and listed, like ``predict`` does: the
loader's batches carry them under ``"skipped"`` (``[{"image", "error"}]``) and
:func:`bioclip_fast.eval.zeroshot.encode_images` collects them; ``on_error="raise"`` stops at the first one instead.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RANK_COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
IMAGE_COLUMNS = ("image", "filepath", "file_name", "path")  # ours, the reference's, Hugging Face's, generic


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty CSV (no header)")
        # an unnamed first column is the pandas index the reference's CSVs carry: dropped
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None and k.strip()} for r in reader]
    if not rows:
        raise ValueError(f"{path}: CSV has a header but no rows")
    return rows


def class_is_rank(columns: Sequence[str]) -> bool:
    """Whether a ``class`` column holds the class rank (our convention) rather than an as-is label (the reference's:
    its rank column is ``cls``; NABirds-style CSVs carry only ``class`` + ``filepath``)."""
    cols = set(columns)
    return "class" in cols and "cls" not in cols and bool(cols & {"kingdom", "phylum", "order", "family", "genus"})


def _make_class(row: dict[str, str], label_column: str, label: str, rank_in_class: bool) -> Any:
    """A class object for zero-shot texts: a ReferenceTaxon (reference naming rules) when the row carries a
    taxonomy, else the label string (used as is: NABirds, Meta-Album)."""
    ranks = [r for r in ("kingdom", "phylum", "cls", "order", "family", "genus", "species") if row.get(r)]
    if ranks or (rank_in_class and row.get("class")) or row.get("scientific_name"):
        from bioclip_fast.eval.naming import ReferenceTaxon

        # as_is text: the reference's `class` column (its to_classes("asis") returns data["class"]) whenever `class`
        # is a label rather than our rank column; else the label itself
        as_is = row["class"] if not rank_in_class and row.get("class") else label
        return ReferenceTaxon.from_row(row, label=as_is, class_is_rank=rank_in_class)
    return label


def default_label_column(columns: Sequence[str]) -> str:
    for col in ("scientific_name", "species", "label", "class_name"):
        if col in columns:
            return col
    if "class" in columns and not class_is_rank(columns):
        return "class"  # the reference's as-is label
    raise ValueError(
        f"cannot guess the label column from {list(columns)}; name it with --label-column (label_column= in Python), "
        "e.g. --label-column scientific_name"
    )


def default_image_column(columns: Sequence[str]) -> str:
    for col in IMAGE_COLUMNS:
        if col in columns:
            return col
    raise ValueError(f"no image column among {list(columns)}; expected one of {IMAGE_COLUMNS} (or name it with "
                     "--image-column; image_column= in Python)")


def collate_skipping(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation of the readable samples; the unreadable ones go to ``"skipped"`` (a list of
    ``{"image", "error"}``). ``"image"`` is None when no sample of the batch could be read."""
    from torch.utils.data import default_collate

    good = [s for s in samples if s.get("error") is None]
    skipped = [{"image": str(s["key"]), "error": s["error"]} for s in samples if s.get("error") is not None]
    batch = default_collate([{k: v for k, v in s.items() if k != "error"} for s in good]) if good else {
        "image": None, "label": None, "key": None, "index": None}
    batch["skipped"] = skipped
    return batch


def _species_label(row: dict[str, str], label_column: str) -> str:
    # a bare epithet ("plexippus") is ambiguous across genera: prefix the genus when the row has one
    val = row[label_column]
    if label_column == "species" and row.get("genus") and not val.startswith(row["genus"] + " "):
        return f"{row['genus']} {val}"
    return val


class ImageCsvDataset(Dataset):
    """Images listed in metadata rows; yields ``{"image", "label", "key", "error"}``.

    A file that cannot be read yields ``image=None`` and its error (``on_error="skip"``, the default; batch with
    :func:`collate_skipping`, which counts and lists them) or raises a ValueError naming it (``on_error="raise"``).
    """

    def __init__(
        self,
        rows: Sequence[dict[str, str]],
        root: str | os.PathLike,
        *,
        transform=None,
        image_column: str | None = None,
        label_column: str | None = None,
        classes: Sequence[Any] | None = None,
        class_labels: Sequence[str] | None = None,
        on_error: str = "skip",
    ):
        if not rows:
            raise ValueError("rows is empty")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}; choose skip or raise")
        self.on_error = on_error
        columns = list(rows[0])
        if image_column is None or (image_column == "image" and "image" not in columns):
            image_column = default_image_column(columns)
        if image_column not in columns:
            raise ValueError(f"image column {image_column!r} (--image-column) is not a column; columns: {columns}")
        self.label_column = label_column or default_label_column(columns)
        if self.label_column not in columns:
            raise ValueError(f"label column {self.label_column!r} (--label-column) is not a column; columns: {columns}")
        missing = [i for i, r in enumerate(rows) if not r.get(self.label_column)]
        if missing:
            raise ValueError(f"{len(missing)} rows have an empty {self.label_column!r} (first: row {missing[0]})")
        self.rows = list(rows)
        self.root = Path(root)
        self.transform = transform
        self.image_column = image_column
        labels = [_species_label(r, self.label_column) for r in self.rows]
        if classes is None:
            first: dict[str, dict[str, str]] = {}
            for lab, r in zip(labels, self.rows):
                first.setdefault(lab, r)
            class_labels = sorted(first)
            rank_in_class = class_is_rank(columns)
            classes = [_make_class(first[lab], self.label_column, lab, rank_in_class) for lab in class_labels]
        elif class_labels is None:
            raise ValueError("pass class_labels (the label value of each class) together with classes")
        self.classes = list(classes)
        self.class_labels = list(class_labels)
        index = {lab: i for i, lab in enumerate(self.class_labels)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"labels not in the class list: {unknown[:5]}")
        self.labels = [index[lab] for lab in labels]

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, i: int) -> Path:
        p = Path(self.rows[i][self.image_column])
        return p if p.is_absolute() else self.root / p

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        path = self.path(i)
        key = self.rows[i][self.image_column]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
            if self.transform is not None:
                img = self.transform(img)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported by file name and skipped
            if self.on_error == "raise":
                raise ValueError(f"cannot read image {path}: {e}") from e
            return {"image": None, "label": self.labels[i], "key": key, "index": i,
                    "error": f"{type(e).__name__}: {e}"}
        return {"image": img, "label": self.labels[i], "key": key, "index": i, "error": None}


@dataclass
class EvalData:
    loader: Any
    classes: list[Any]
    rows: list[dict[str, str]] | None = None  # per image, loader order (CSV / folder / bundled sources)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def image_folder_rows(root: str | os.PathLike) -> list[dict[str, str]]:
    """Rows ``{"image", "label"}`` for an ImageFolder layout (root/<class>/<image>)."""
    root = Path(root)
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({"image": str(f.relative_to(root)), "label": d.name})
    if not rows:
        raise ValueError(f"{root}: no class sub-directories with images ({', '.join(IMAGE_EXTENSIONS)})")
    return rows


def butterfly_rows(split: str = "val") -> tuple[list[dict[str, str]], Path]:
    """The bundled Leeds butterflies' metadata rows for ``split`` (train/val/all) and their image root."""
    from bioclip_fast.data import bundled

    if split not in ("train", "val", "all"):
        raise ValueError(f"split={split!r}; choose train, val or all")
    root = Path(bundled.butterflies_root())
    rows = [dict(r) for r in bundled.read_metadata(root / "metadata.csv")]
    if split != "all":
        train, val = bundled.split(rows)
        rows = train if split == "train" else val
    return rows, root


def _is_shards(source: str) -> bool:
    """Shard specs (see `bioclip_fast.data.shardspec`): .tar, brace/glob patterns, '::' lists, shard-list files,
    directories of .tar files."""
    from bioclip_fast.data.shardspec import LIST_SUFFIXES

    if source.endswith(".tar") or "::" in source or any(ch in source for ch in "*?{"):
        return True
    p = Path(source)
    if p.is_file() and source.lower().endswith(LIST_SUFFIXES):
        return True
    return p.is_dir() and any(p.glob("*.tar")) and not any(p.glob("*.csv"))


def check_data_source(source: str) -> None:
    """Validate a shard-spec `--data` before any model is loaded (DataError naming the spec); other sources are
    checked when read."""
    if source != "butterflies" and not source.lower().endswith(".csv") and _is_shards(source):
        _shard_list(source)


def _shard_list(source: str) -> list[str]:
    from bioclip_fast.data.shardspec import resolve_shards

    return resolve_shards(source, name="--data")


def load_eval_data(
    source: str | os.PathLike,
    *,
    preprocess=None,
    model=None,
    tokenizer=None,
    batch_size: int = 64,
    split: str = "val",
    root: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    on_error: str = "skip",
) -> EvalData:
    """Build an evaluation loader from ``source``: ``butterflies`` (bundled; ``split`` train/val/all), a metadata CSV
    (images relative to ``root`` or the CSV's folder), an ImageFolder directory, or shards (``*.tar``, a glob, or a
    directory of ``.tar`` files; needs ``model`` for image size/normalization and ``tokenizer``)."""
    source = str(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if source == "butterflies":
        rows, img_root = butterfly_rows(split)
        desc = f"bundled Leeds butterflies ({split} split)"
    elif source.lower().endswith(".csv"):
        rows = read_csv_rows(source)
        img_root = Path(root) if root is not None else Path(source).resolve().parent
        desc = f"{source}"
    elif _is_shards(source):
        from bioclip_fast.data import make_loader

        if model is None or tokenizer is None:
            raise ValueError("shard sources need model= and tokenizer= (image size, normalization, text tokens)")
        from bioclip_fast.model import image_mean_std

        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = image_mean_std(model)
        loader = make_loader(
            _shard_list(source), batch_size, image_size=size, mean=mean, std=std, tokenizer=tokenizer,
            train=False, device=device, num_workers=num_workers,
        )
        return EvalData(loader, list(loader.classes), None, f"shards {source}")
    elif Path(source).is_dir():
        rows = image_folder_rows(source)
        img_root = Path(source)
        label_column = label_column or "label"
        desc = f"image folder {source}"
    else:
        raise FileNotFoundError(
            f"data source {source!r} is neither 'butterflies', a .csv file, shards (*.tar) nor an image folder"
        )
    if preprocess is None:
        if model is None:
            raise ValueError("pass preprocess= or model= (to derive the eval transform)")
        from bioclip_fast.model import image_transform

        preprocess = image_transform(model, train=False)
    ds = ImageCsvDataset(rows, img_root, transform=preprocess, image_column=image_column, label_column=label_column,
                         on_error=on_error)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda", collate_fn=collate_skipping)
    return EvalData(loader, ds.classes, ds.rows, desc, {"class_labels": ds.class_labels, "dataset": ds})
