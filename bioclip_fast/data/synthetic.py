"""Synthetic TreeOfLife-200M-layout shards made the way other people's shards are made: webdataset tars written with
plain `tarfile` (no manifest, no sidecar, no index of ours), optionally with caption members that disagree with the
taxonomy members or missing members, and JPEG payloads of realistic sizes. Used by the tests and the benchmarks."""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bioclip_fast.data.tar import add_member
from bioclip_fast.taxonomy import Taxon

MTIME = 1_700_000_000  # member mtime of these tars (a plain `tarfile` writer's would be a real time)

TAXA = [
    Taxon("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus", "Monarch"),
    Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax", "Common Raven"),
    Taxon("Plantae", "Tracheophyta", "Magnoliopsida", "Asterales", "Asteraceae", "Bellis", "perennis", ""),
    Taxon("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria",
          "Fly Agaric"),
]


def jpeg_bytes(seed: int, size: int = 24, quality: int = 80) -> bytes:
    """A real (decodable) JPEG of noise, size x (size + 4) pixels; 128 px at quality 75 is ~25-35 KB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_tol_shard(path: str | os.PathLike, samples: Sequence[Mapping], *, fmt=tarfile.USTAR_FORMAT) -> Path:
    """Write a TreeOfLife-layout tar. Each sample: {"key", "taxon" (Taxon), "jpg" (bytes), optional
    "override" {member: text} (replaces members), optional "drop" [members] (omits members)}."""
    path = Path(path)
    with tarfile.open(path, "w", format=fmt) as tf:
        for s in samples:
            add_member(tf, f"{s['key']}.jpg", s["jpg"], mtime=MTIME)
            texts = dict(s["taxon"].shard_texts())
            texts.update(s.get("override", {}))
            for member in s.get("drop", ()):
                texts.pop(member, None)
            for member, text in texts.items():
                add_member(tf, f"{s['key']}.{member}", text.encode(), mtime=MTIME)
    return path


def write_tol_shards(root: str | os.PathLike, n_shards: int, per_shard: int, *, payload: str = "small",
                     seed: int = 0, prefix: str = "shard-") -> list[Path]:
    """`n_shards` foreign shards of `per_shard` samples cycling through TAXA (keys unique across shards).
    payload="small": 24 px JPEGs (~1.5 KB, fast tests); "realistic": 176-232 px noise JPEGs of ~20-40 KB (the
    benchmarks' TreeOfLife-like payload sizes). Both decode."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if payload == "small":
        pool = [jpeg_bytes(seed * 101 + i) for i in range(8)]
    elif payload == "realistic":
        pool = [jpeg_bytes(seed * 101 + i, size=176 + 8 * (i % 8), quality=75) for i in range(16)]
    else:
        raise ValueError(f"payload must be 'small' or 'realistic', got {payload!r}")
    paths = []
    k = 0
    for i in range(n_shards):
        samples = []
        for _ in range(per_shard):
            samples.append({"key": f"{seed:02x}{k:08x}-sample", "taxon": TAXA[k % len(TAXA)],
                            "jpg": pool[k % len(pool)]})
            k += 1
        paths.append(write_tol_shard(root / f"{prefix}{i:06d}.tar", samples))
    return paths
