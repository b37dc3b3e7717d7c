"""Experience replay: general image-caption shards (LAION-style `<key>.jpg` + `<key>.txt`) mixed into every batch.

BioCLIP 2 keeps a fixed share of general image-text pairs in each batch (2,816 biology + 320 replay samples per GPU)
to preserve CLIP's general-domain alignment. `make_loader(..., replay_shards=..., replay_batch_size=R)` returns them
as `batch["replay"]`; any LAION/DataComp-style webdataset works. Replay shards are read like the biology shards,
through the shard index (`bioclip-fast index-shards`; shards without one are indexed from their tar headers when
the loader starts).

No real LAION data ships with the package. `bioclip_fast.data.bundled.build_bundled_replay` makes a small stand-in
from the bundled butterfly images with free-text captions taken from the field-guide descriptions
(`descriptions.csv`: "a photo of a butterfly. Wings long and narrow. Jet-black above, ..."). These are
general-language captions, not taxonomic labels, so replay batches exercise the same code path as LAION data; they
are a test/default fixture only.
"""
from __future__ import annotations

import itertools
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bioclip_fast.data.shards import MANIFEST, write_dali_index
from bioclip_fast.data.tar import add_member
from bioclip_fast.fileio import atomic_save, atomic_write_text

REPLAY_FORMAT = "bioclip_fast/caption-shards/1"


def write_caption_shards(samples: Iterable[tuple[str, bytes, str]], out_dir: str | os.PathLike,
                         samples_per_shard: int = 10000, prefix: str = "replay") -> dict[str, Any]:
    """Write (key, jpeg bytes, caption) samples as `.jpg` + `.txt` webdataset shards, each with a DALI `.idx` (for
    DALI's own reader), and a `manifest.json`. Each shard appears whole (written to a temporary file, renamed)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    seen: set[str] = set()
    it = iter(samples)
    for first in it:
        path = out_dir / f"{prefix}-{len(shards):06d}.tar"
        count = 0

        def write_tar(tmp: Path) -> None:
            nonlocal count
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                for key, jpg, caption in itertools.chain([first], itertools.islice(it, samples_per_shard - 1)):
                    if "." in key or "/" in key or not key:
                        raise ValueError(f"replay sample key {key!r} must be non-empty without '.' or '/'")
                    if key in seen:
                        raise ValueError(f"duplicate replay sample key {key!r}")
                    seen.add(key)
                    add_member(tf, f"{key}.jpg", jpg)
                    add_member(tf, f"{key}.txt", caption.encode())
                    count += 1

        atomic_save(path, write_tar, mkdir=False)
        write_dali_index(path)
        shards.append({"name": path.name, "count": count})
    if not shards:
        raise ValueError("no replay samples given")
    manifest = {"format": REPLAY_FORMAT, "num_samples": sum(s["count"] for s in shards), "shards": shards}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
