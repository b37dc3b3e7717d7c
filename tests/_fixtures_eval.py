"""Tiny datasets in the published layouts the BioCLIP 2 reference evaluation reads (made by the tests, not by us:
each writer follows the layout the dataset ships with), plus unreadable-image helpers."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

RANKS_REF = ("kingdom", "phylum", "cls", "order", "family", "genus", "species")
TAXA = [  # (ranks ..., common name): lower-case ranks on purpose (the reference capitalizes them)
    ("animalia", "chordata", "aves", "passeriformes", "paridae", "baeolophus", "inornatus", "Oak Titmouse"),
    ("animalia", "chordata", "aves", "passeriformes", "corvidae", "cyanocitta", "cristata", "Blue Jay"),
    ("animalia", "arthropoda", "insecta", "lepidoptera", "nymphalidae", "danaus", "plexippus", ""),
    ("plantae", "tracheophyta", "magnoliopsida", "fagales", "fagaceae", "quercus", "alba", "White Oak"),
]


def write_image(path: Path, cls: int, i: int, size: int = 36) -> Path:
    """A small RGB image whose colour encodes the class (so features differ by class) plus per-image noise."""
    from PIL import Image

    rng = np.random.default_rng(1000 * cls + i)
    base = np.array([(cls * 67) % 256, (cls * 131 + 40) % 256, (cls * 29 + 90) % 256], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], index: bool = True) -> Path:
    """A CSV as pandas ``to_csv`` writes it: with ``index=True`` a leading unnamed index column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([""] if index else []) + header)
        for i, r in enumerate(rows):
            w.writerow(([i] if index else []) + list(r))
    return path


def make_rare_species(root: Path, n_classes: int = 3, per_class: int = 6) -> Path:
    """Rare-Species-style folder after the reference's renaming: filepath, ranks with ``cls``, common_name."""
    rows = []
    for c in range(n_classes):
        t = TAXA[c]
        for i in range(per_class):
            rel = f"dataset/{t[5]}_{t[6]}/{i}.jpg"
            write_image(root / rel, c, i)
            rows.append([rel, *t[:7], t[7], f"{t[5].capitalize()} {t[6]}"])
    write_csv(root / "metadata.csv", ["filepath", *RANKS_REF, "common_name", "scientific_name"], rows)
    return root


def make_asis(root: Path, labels=("Oak Titmouse", "Blue Jay (Adult)", "Dark-eyed Junco"), per_class: int = 6) -> Path:
    """NABirds / Meta-Album-style folder: ``class`` (the label, as is) and ``filepath`` only."""
    rows = []
    for c, lab in enumerate(labels):
        for i in range(per_class):
            rel = f"{c:04d}/{i}.jpg"
            write_image(root / rel, c + 5, i)
            rows.append([lab, rel])
    write_csv(root / "metadata.csv", ["class", "filepath"], rows)
    return root


# The published FishNet anns/{train,test}.csv header: a pandas index column ("") and "Unnamed: 0" (the CSV was
# written twice with its index), then species, image, SpecCode, ..., Folder, Troph, FeedingPath and the eight habitat
# columns. The seven columns between SpecCode and Folder are not named in what we compare against; placeholders here
# keep every position where the published file has it (image = column 3, Folder = 12, FeedingPath = 14).
FISHNET_HEADER = ["Unnamed: 0", "species", "image", "SpecCode", "Genus", "Family", "Order", "Class", "Source",
                  "Length", "Note", "Folder", "Troph", "FeedingPath", "Tropical", "Temperate", "Subtropical", "Boreal",
                  "Polar", "freshwater", "saltwater", "brackish"]


def make_fishnet(root: Path, n_train: int = 16, n_test: int = 8, n_species: int = 4) -> Path:
    """FishNet layout: train.csv / test.csv with the published header (see FISHNET_HEADER: a leading unnamed index
    column; SpecCode empty, Troph numeric, as in the release) + Image_Library/<Folder>/<image file>.
    Species ``G sp<i % n_species>``; odd species are marine, even ones freshwater."""
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            marine = i % 2
            sp = i % n_species
            folder = f"Family{marine}"
            name = f"{split}_{i}.jpg"
            write_image(root / "Image_Library" / folder / name, 10 + sp, i + (0 if split == "train" else 500))
            rec = [i, f"G sp{sp}", f"some/dir/{name}", "", "G", folder, "Perciformes", "Actinopterygii", "x", "1",
                   "", folder, "3.5", "pelagic" if marine else "benthic", 1, 0, 0, 0, 0, 1 - marine, marine, 0]
            rows.append(rec)
        # one row with a missing target: dropped, as by the reference's null filter
        rows.append([99, "G sp0", "x/missing.jpg", "", "G", "F", "P", "A", "x", "", "", "Family0", "", "benthic",
                     "", 0, 0, 0, 0, 1, 0, 0])
        write_csv(root / f"{split}.csv", FISHNET_HEADER, rows, index=True)
    return root


def reference_fishnet_rows(csv_path: Path) -> list[tuple[str, str, list]]:
    """A port of the reference's FishNet ImageDataset (``src/evaluation/fishnet.py``) reading: ``pl.read_csv(...)
    .with_row_index()`` (a row-index column in front), drop rows with a null in any target column, then the image
    name at position 4 (its file name), the folder at 13 and the targets at 15..23 (FeedingPath pelagic = 1)."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = ["index"] + next(reader)
        rows = [[i] + [None if v == "" else v for v in rec] for i, rec in enumerate(reader)]
    targets = ["FeedingPath", "Tropical", "Temperate", "Subtropical", "Boreal", "Polar", "freshwater", "saltwater",
               "brackish"]
    for col in targets:
        j = header.index(col)
        rows = [r for r in rows if r[j] is not None]
    out = []
    for r in rows:
        label = []
        for col in range(15, 24):
            v = r[col]
            if col == 15:
                v = {"pelagic": 1, "benthic": 0}[v]
            label.append(int(float(v)))
        out.append((r[4].split("/")[-1], r[13], label))
    return out


def make_newt(root: Path, n_tasks: int = 2, n_train: int = 10, n_test: int = 4, life_stage_tasks: int = 1) -> Path:
    """NeWT layout: newt2021_labels.csv (id, task, label, split, task_cluster, task_subcluster) + images/<id>.jpg.
    The first ``life_stage_tasks`` tasks are life-stage tasks (cluster appearance, subcluster life_stage)."""
    rows = []
    for t in range(n_tasks):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                label = i % 2
                img_id = f"t{t}_{split}_{i}"
                write_image(root / "newt2021_images" / f"{img_id}.jpg", 20 + 2 * t + label, i + 100 * (split == "test"))
                stage = t < life_stage_tasks
                rows.append([img_id, f"task_{t}", label, split, "appearance" if stage else "behavior",
                             "life_stage" if stage else ""])
    write_csv(root / "newt2021_labels.csv", ["id", "task", "label", "split", "task_cluster", "task_subcluster"],
              rows, index=False)
    return root


def make_awa2(root: Path, per_class: int = 4, n_attr: int = 85) -> Path:
    """AwA2 layout: classes.txt (with the index column), train/testclasses.txt, predicate-matrix-binary.txt,
    JPEGImages/<class>/."""
    classes = ["antelope", "grizzly+bear", "killer+whale", "beaver", "dalmatian"]
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 2, size=(len(classes), n_attr))
    matrix[:, 0] = [1, 0, 1, 0, 1]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{i + 1}\t{c}\n" for i, c in enumerate(classes)))
    (root / "trainclasses.txt").write_text("\n".join(classes[:3]) + "\n")
    (root / "testclasses.txt").write_text("\n".join(classes[3:]) + "\n")
    (root / "predicate-matrix-binary.txt").write_text("\n".join(" ".join(map(str, r)) for r in matrix) + "\n")
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / "JPEGImages" / name / f"{name}_{i:05d}.jpg", 30 + c, i)
    return root


def make_herbarium19(root: Path, n_classes: int = 6, per_class: int = 5, with_split: bool = True) -> Path:
    """GCD Herbarium19 layout: small-train/<class>/ (+ small-validation/) and the Old/New class split."""
    for c in range(n_classes):
        for i in range(per_class):
            write_image(root / "small-train" / f"{c:03d}" / f"{i}.jpg", 40 + c, i)
        write_image(root / "small-validation" / f"{c:03d}" / "0.jpg", 40 + c, 99)
    if with_split:
        (root / "class_splits.json").write_text(json.dumps({"Old": list(range(0, n_classes, 2)),
                                                            "New": list(range(1, n_classes, 2))}))
    return root


def make_plantdoc(root: Path, classes=("Apple leaf", "Apple rust leaf", "Corn leaf blight"), n_train: int = 3,
                  n_test: int = 3) -> Path:
    """PlantDoc classification layout: train/<class>/, test/<class>/."""
    for c, name in enumerate(classes):
        for i in range(n_train):
            write_image(root / "train" / name / f"{i}.jpg", 50 + c, i)
        for i in range(n_test):
            write_image(root / "test" / name / f"{i}.jpg", 50 + c, 100 + i)
    return root


def corrupt(path: Path, how: str) -> Path:
    """Make an image unreadable: ``truncated``, ``garbage``, ``text`` (a non-image file) or ``missing``."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif how == "text":
        path.write_text("not an image\n")
    elif how == "missing":
        path.unlink()
    else:
        raise ValueError(how)
    return path


def make_finches(root: Path, beaks=(8.0, 9.5, 11.0, 13.5, 16.0), per_species: int = 4) -> Path:
    """metadata.csv (filepath, species, beak_size) + images whose colour follows the beak size."""
    rows = []
    for s, b in enumerate(beaks):
        for i in range(per_species):
            rel = f"images/sp{s}_{i}.jpg"
            write_image(root / rel, 60 + s, i)
            rows.append([rel, f"Geospiza sp{s}", b])
    write_csv(root / "metadata.csv", ["filepath", "species", "beak_size"], rows, index=False)
    return root
