"""The bundled Leeds Butterflies subset (832 real images, 10 species) and its shards, built on first use.

Shards live in a cache dir (`$BIOCLIP_FAST_CACHE`, else `~/.cache/bioclip_fast`) under a name that includes a hash
of the metadata and build settings, so a changed dataset never reuses stale shards. Two processes that race to
build them (e.g. several ranks at start) serialize on a lock file; the finished set appears by atomic rename.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.data.replay import write_caption_shards
from bioclip_fast.data.shards import MANIFEST, encode_image, make_shards, read_metadata, sample_key
from bioclip_fast.taxonomy import Taxon

SPLITS = ("train", "val", "all")
VAL_FRACTION = 0.2
SPLIT_SEED = 0
SAMPLES_PER_SHARD = 100  # several shards even for 832 images, so rank/worker sharding is exercised
BUILD_VERSION = "1"


def butterflies_root() -> Path:
    """Directory with `images/`, `metadata.csv`, `descriptions.csv` and the license note."""
    root = Path(__file__).resolve().parent.parent / "assets" / "leeds_butterflies"
    if not (root / "metadata.csv").is_file():
        raise FileNotFoundError(f"bundled Leeds Butterflies data missing at {root} (broken install?)")
    return root


def cache_dir() -> Path:
    env = os.environ.get("BIOCLIP_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bioclip_fast"


def split(
    rows: Sequence[Mapping[str, str]], val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic split stratified by species: round(n * val_fraction) images of each taxon go to val (at least
    one when the taxon has two or more images), chosen by a seeded shuffle. Row order is kept within each part."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[Taxon.from_row(r).label].append(i)
    val_idx: set[int] = set()
    for n, label in enumerate(sorted(groups)):
        idx = groups[label]
        k = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        rng = np.random.default_rng([seed, n])
        val_idx.update(idx[j] for j in rng.permutation(len(idx))[:k])
    train = [dict(r) for i, r in enumerate(rows) if i not in val_idx]
    val = [dict(r) for i, r in enumerate(rows) if i in val_idx]
    return train, val


_split = split  # `default_shards(split=...)` shadows the function name inside it


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], Any]) -> None:
    """Make the cache directory `target` unless it is complete (has its MANIFEST): `build(tmp)` fills a temporary
    directory beside it, renamed into place, under a lock file (concurrent callers build it once)."""
    if (target / MANIFEST).is_file():
        return
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MANIFEST).is_file():  # another process may have finished while we waited
            return
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(tmp)
            if target.exists():  # a half-built dir from a killed process without the manifest
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _build_id(rows: Sequence[Mapping[str, str]]) -> str:
    h = hashlib.sha1(f"{BUILD_VERSION}/{SAMPLES_PER_SHARD}/{VAL_FRACTION}/{SPLIT_SEED}".encode())
    for r in rows:
        h.update(repr(sorted((k, v) for k, v in r.items() if k != "_line")).encode())
    return h.hexdigest()[:12]


def default_shards(split: str = "train", *, workers: int | None = None, progress: bool = False) -> list[str]:
    """Paths of the bundled shards for "train", "val" or "all", building them into the cache on first use.

    Idempotent and safe under concurrent callers.
    """
    split_name = split
    if split_name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split_name!r}")
    root = butterflies_root()
    rows = read_metadata(root / "metadata.csv")
    target = cache_dir() / f"leeds_butterflies-{_build_id(rows)}" / split_name

    def build(tmp: Path) -> None:
        train, val = _split(rows)
        part = {"train": train, "val": val, "all": rows}[split_name]
        make_shards(root, part, tmp, samples_per_shard=SAMPLES_PER_SHARD,
                    workers=workers if workers is not None else min(4, os.cpu_count() or 1),
                    image_size=224, progress=progress)

    _build_once(target, build)
    return sorted(str(p) for p in target.glob("shard-*.tar"))


def _caption(description: str) -> str:
    # drop the leading wingspan ('3-3 3/8" (76-78 mm).') so captions read like web alt-text
    text = re.sub(r'^[^A-Za-z]*\(\s*[\d\-\s]+mm\)\.\s*', "", description.strip())
    return f"a photo of a butterfly. {text}"


def build_bundled_replay(out_dir: str | os.PathLike, samples_per_shard: int = 200, progress: bool = False) -> dict:
    """Stand-in replay set from the bundled images + description captions (see `bioclip_fast.data.replay`)."""
    from tqdm import tqdm

    root = butterflies_root()
    with open(root / "descriptions.csv", newline="", encoding="utf-8") as f:
        desc = {r["scientific_name"]: _caption(r["description"]) for r in csv.DictReader(f)}
    rows = read_metadata(root / "metadata.csv")
    missing = sorted({r["scientific_name"] for r in rows} - set(desc))
    if missing:
        raise ValueError(f"{root / 'descriptions.csv'} has no description for {missing}")

    def samples():
        for r in tqdm(rows, desc="replay shards", unit="img", disable=not progress):
            data, err = encode_image(str(root / r["image"]), 224)
            if data is not None:
                yield "replay_" + sample_key(os.path.basename(r["image"])), data, desc[r["scientific_name"]]

    return write_caption_shards(samples(), out_dir, samples_per_shard=samples_per_shard)


def replay_shards(*, progress: bool = False) -> list[str]:
    """Bundled general-caption replay shards (`build_bundled_replay`, cached like the butterfly shards)."""
    root = butterflies_root()
    rows = read_metadata(root / "metadata.csv")
    target = cache_dir() / f"leeds_butterflies-{_build_id(rows)}" / "replay"
    _build_once(target, lambda tmp: build_bundled_replay(tmp, progress=progress))
    return sorted(str(p) for p in target.glob("*.tar"))
