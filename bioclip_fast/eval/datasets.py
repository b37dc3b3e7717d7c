"""Labelled image sources for evaluation and analysis.

* an image folder + CSV (one row per image: an image path column, relative to the CSV's folder or ``root``, and a
  label column; taxonomic rank columns, ``scientific_name`` and ``common_name`` give the class texts),
* an ImageFolder-style directory (one sub-directory per class; the directory name is the class text),
* our webdataset shards (``*.tar`` files or a directory of them, through :func:`bioclip_fast.data.make_loader`),
* the bundled Leeds butterflies (``butterflies``, with the same train/val split the training job uses).

:func:`load_eval_data` turns any of them into an :class:`EvalData`: a loader yielding ``{"image", "label", "key"}``,
the list of classes (label indices point into it) and, for CSV sources, the metadata row of each image (in loader
order) for attribute analyses.
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


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty CSV (no header)")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if not rows:
        raise ValueError(f"{path}: CSV has a header but no rows")
    return rows


def _make_class(row: dict[str, str], label_column: str) -> Any:
    """A class object for zero-shot texts: a Taxon when the row carries a taxonomy, else the label string."""
    if any(row.get(r) for r in RANK_COLUMNS) or row.get("scientific_name"):
        try:
            from bioclip_fast.taxonomy import Taxon

            return Taxon.from_row(row)
        except ImportError:
            return dict(row)
    return row[label_column]


def default_label_column(columns: Sequence[str]) -> str:
    for col in ("scientific_name", "species", "label", "class_name"):
        if col in columns:
            return col
    raise ValueError(
        f"cannot guess the label column from {list(columns)}; pass label_column= (e.g. 'scientific_name')"
    )


def _species_label(row: dict[str, str], label_column: str) -> str:
    # a bare epithet ("plexippus") is ambiguous across genera: prefix the genus when the row has one
    val = row[label_column]
    if label_column == "species" and row.get("genus") and not val.startswith(row["genus"] + " "):
        return f"{row['genus']} {val}"
    return val


class ImageCsvDataset(Dataset):
    """Images listed in metadata rows; yields ``{"image", "label", "key"}``.

    A file that cannot be read raises an error naming it (evaluation numbers must not silently drop images).
    """

    def __init__(
        self,
        rows: Sequence[dict[str, str]],
        root: str | os.PathLike,
        *,
        transform=None,
        image_column: str = "image",
        label_column: str | None = None,
        classes: Sequence[Any] | None = None,
        class_labels: Sequence[str] | None = None,
    ):
        if not rows:
            raise ValueError("rows is empty")
        columns = list(rows[0])
        if image_column not in columns:
            raise ValueError(f"image_column={image_column!r} is not a column; columns: {columns}")
        self.label_column = label_column or default_label_column(columns)
        if self.label_column not in columns:
            raise ValueError(f"label_column={self.label_column!r} is not a column; columns: {columns}")
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
            classes = [_make_class(first[lab], self.label_column) for lab in class_labels]
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
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read image {path}: {e}") from e
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "label": self.labels[i], "key": self.rows[i][self.image_column]}


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
    image_column: str = "image",
    label_column: str | None = None,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
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
    ds = ImageCsvDataset(rows, img_root, transform=preprocess, image_column=image_column, label_column=label_column)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    return EvalData(loader, ds.classes, ds.rows, desc, {"class_labels": ds.class_labels, "dataset": ds})
