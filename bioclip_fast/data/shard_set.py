"""The shard set: a list of shards with their sample counts and classes from the shard index (one manifest read
at startup), and each shard's per-sample table (`ShardEntries`: byte offsets, labels, captions) loaded on first use
from its sidecar, checked against the file as it is now, and cached per process."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bioclip_fast.data.shardspec import resolve_shards
from bioclip_fast.distributed import DistInfo, all_gather_objects
from bioclip_fast.errors import DataError
from bioclip_fast.taxonomy import Taxon

log = logging.getLogger(__name__)

# why a sample was skipped (the keys of loader.stats["bad_samples"])
BAD_REASONS = (
    "corrupt_image",  # image bytes that do not decode (or no image member / no taxonomy in the sample)
    "shard_changed",  # the shard is not the one indexed (grown, rewritten, another sample count): all its samples
    "unreadable",  # the shard cannot be opened or indexed (deleted, permissions, a damaged tar header)
    "read_error",  # an I/O error reading the sample's bytes
    "past_eof",  # the sample's member runs past the end of the file: a truncated shard (its earlier samples are used)
)


class ShardDamaged(DataError):
    """A shard that can no longer be read as indexed; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (ShardDamaged, (self.reason, str(self)))


# ---------------------------------------------------------------------------------------------------------------------
# shard tables
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardEntries:
    """Per-sample random-access info of one shard (compact arrays; see `bioclip_fast.data.index.ShardIndex`)."""

    keys: list[str]
    img_off: np.ndarray
    img_size: np.ndarray
    img_ext: np.ndarray
    txt_off: np.ndarray
    txt_size: np.ndarray
    labels: np.ndarray | None  # global class index per sample (bio shards), -1 without taxonomy
    captions: np.ndarray  # [len(TEXT_TYPES), n] ids into `strings`, -1 = member missing
    strings: list[str]

    def __len__(self) -> int:
        return len(self.keys)


class TaxonTable(Sequence):
    """A class list held as rows (sorted by label), as a sequence of Taxon built on access: for shards indexed at
    startup or spread over several indexes (one index gives `bioclip_fast.data.index.ClassTable`, memory-mapped)."""

    def __init__(self, rows: list[dict[str, str]]):
        self._rows = rows
        self._cache: dict[int, Taxon] = {}
        self._index: dict[str, int] | None = None

    def indices(self, labels: Sequence[str]) -> np.ndarray:
        """Class index of each label; KeyError for a label the table lacks."""
        if self._index is None:
            self._index = {self[i].label: i for i in range(len(self))}
        return np.asarray([self._index[lab] for lab in labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self._rows)
        t = self._cache.get(i)
        if t is None:
            t = self._cache[i] = Taxon.from_row(self._rows[i])
        return t


# cached shard tables per process, bounded by samples held (a 10,000-sample shard is ~0.5 MB of arrays + keys)
CACHE_SAMPLES = 1 << 19


class ShardSet:
    """A list of shards with per-shard counts (known up front) and lazily loaded per-sample entries.

    Counts and classes come from a shard index (`bioclip-fast index-shards`; `bioclip_index.json` next to the shards
    or in `index_dir` / $BIOCLIP_FAST_INDEX_DIR): one manifest read, no shard is opened at startup. Shards without
    an index are indexed from their tar headers and text members (never image bytes); under torch.distributed each
    rank indexes 1/world of them and the ranks exchange the summaries. `kind="bio"`: samples carry a taxon -> class
    label and caption members; `kind="caption"`: samples carry a `.txt` caption (replay).
    """

    def __init__(self, shards, kind: str = "bio", progress: bool = False, *, index_dir=None, rank: int = 0,
                 world_size: int = 1):
        from bioclip_fast.data.index import find_index, load_class_table

        if kind not in ("bio", "caption"):
            raise ValueError(f"kind must be 'bio' or 'caption', got {kind!r}")
        self.paths = resolve_shards(shards, name="replay shards" if kind == "caption" else "shards")
        self.kind = kind
        index_dirs = [d for d in (index_dir, os.environ.get("BIOCLIP_FAST_INDEX_DIR")) if d]
        manifests: dict[str, dict] = {}
        found = find_index(self.paths, index_dirs, manifests=manifests)
        self._index_dir: dict[int, Any] = {}
        self._expected_size: dict[int, int] = {}
        self._indexed_as: dict[int, tuple[int, int, str]] = {}  # (size, mtime_ns, head digest) when indexed
        counts = np.zeros(len(self.paths), dtype=np.int64)
        for i, p in enumerate(self.paths):
            if p in found:
                d, entry = found[p]
                self._index_dir[i] = d
                self._expected_size[i] = int(entry["size"])
                self._indexed_as[i] = (int(entry["size"]), int(entry.get("mtime_ns", -1)), entry.get("head", ""))
                counts[i] = int(entry["count"])
        missing = [i for i in range(len(self.paths)) if i not in self._index_dir]
        self.indexed_at_startup = len(missing)  # shards without an index (all ranks together)
        self.indexed_locally = 0  # of those, indexed by this process
        summaries = self._index_missing(missing, rank, world_size, progress) if missing else {}
        for i, summary in summaries.items():
            counts[i] = summary["count"]
            self._expected_size[i] = summary["size"]
            self._indexed_as[i] = (summary["size"], summary["mtime_ns"], summary.get("head", ""))
        self.counts = counts
        self.classes: Sequence[Taxon] = TaxonTable([])
        if kind == "bio":
            # each index's class ids of the shards used, by index directory (manifest shard positions -> class ids)
            used: dict[Any, list[int]] = {}
            for i, (d, _) in ((i, found[self.paths[i]]) for i in self._index_dir):
                used.setdefault(d, []).append(i)
            by_dir = {Path(k): m for k, m in manifests.items() if m is not None}  # find_index gives Path(dir)
            tables = {d: load_class_table(d, by_dir[d]) for d in used}
            ids = {}
            for d, idxs in used.items():
                pos = {e["name"]: k for k, e in enumerate(by_dir[d]["shards"])}
                ks = {pos[found[self.paths[i]][1]["name"]] for i in idxs}
                ids[d] = None  # every shard of the index: all its classes, nothing to select
                if len(ks) < len(pos):  # the classes of these shards: one pass over their ids (no sort)
                    mask = np.zeros(len(tables[d]), dtype=bool)
                    for k in ks:
                        mask[tables[d].shard_classes(k)] = True
                    ids[d] = np.flatnonzero(mask)
            if len(tables) == 1 and not summaries:  # one index: its memory-mapped table (a subset when fewer shards)
                d = next(iter(tables))
                self.classes = tables[d] if ids[d] is None else tables[d].subset(ids[d])
            elif tables or summaries:  # several indexes, or shards indexed now: merge the labels (materialized)
                labels: dict[str, dict[str, str]] = {}
                for d, t in tables.items():
                    sub = t if ids[d] is None else t.subset(ids[d])
                    for c in range(len(sub)):
                        row = sub.row(c)
                        labels.setdefault(row["label"], row)
                for summary in summaries.values():
                    for t in summary["taxa"]:
                        labels.setdefault(Taxon.from_row(t).label, t)
                self.classes = TaxonTable([labels[k] for k in sorted(labels)])
        if self.counts.sum() == 0:
            raise DataError(f"the shards hold no samples: {self.paths[:3]}{'...' if len(self.paths) > 3 else ''}")
        self._cache: OrderedDict[int, ShardEntries] = OrderedDict()
        self._cached_samples = 0
        self.loads = 0  # shard tables loaded by this process (cache misses)
        self._lock = threading.Lock()
        if kind == "caption":  # fail at construction, not inside a worker, when the shards have no captions
            first = next(i for i, c in enumerate(self.counts) if c > 0)
            e = self.entries(first)
            if e.txt_off[0] < 0:
                raise DataError(
                    f"replay shard {self.paths[first]} has no '.txt' caption member; replay needs LAION-style "
                    ".jpg+.txt shards, e.g. bioclip_fast.data.bundled.replay_shards()"
                )

    def _index_missing(self, missing: list[int], rank: int, world_size: int, progress: bool) -> dict[int, dict]:
        """Summaries (count, size, taxa) of shards without an index: each rank indexes 1/world, then all-gather."""
        from tqdm import tqdm

        from bioclip_fast.data.index import index_shard, summarize

        dist = torch.distributed
        split = world_size > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size
        mine = missing[rank::world_size] if split else missing
        if len(missing) > 1 and rank == 0:
            log.warning("%d of %d shard(s) have no index; indexing their headers now%s (run `bioclip-fast "
                        "index-shards` once to skip this)", len(missing), len(self.paths),
                        f", split over {world_size} ranks" if split else "")
        self.indexed_locally = len(mine)
        local = {}
        for i in tqdm(mine, desc="index shards", unit="shard", disable=not progress):
            s = summarize(index_shard(self.paths[i]))
            s.pop("taxon_counts", None)
            local[i] = s
        if not split:
            return local
        gathered = all_gather_objects(local, DistInfo(rank=rank, world_size=world_size))
        out: dict[int, dict] = {}
        for part in gathered:
            out.update(part)
        return out

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def content_tokens(self) -> list[str]:
        """Per shard, "size:head digest" of the file as it is now (`index.head_digest`; "unreadable" when it cannot
        be read). A stat per shard; the first header block is read only of shards whose size or mtime differ from
        their index's (a shard rewritten, restored from a backup, a dataset copied without keeping times): a shard
        restored with its content matches again, another shard copied over it does not."""
        from bioclip_fast.data.index import head_digest

        out = []
        for i, p in enumerate(self.paths):
            try:
                st = os.stat(p)
                size, mtime, head = self._indexed_as.get(i, (-1, -1, ""))
                if not (head and st.st_size == size and st.st_mtime_ns == mtime):
                    head = head_digest(p)
                out.append(f"{st.st_size}:{head}")
            except OSError:
                out.append("unreadable")
        return out

    def fingerprint(self) -> str:
        return json.dumps([[os.path.basename(p), int(c)] for p, c in zip(self.paths, self.counts)])

    def _load(self, i: int):
        from bioclip_fast.data.index import ShardIndex, index_shard, sidecar_path

        path = self.paths[i]
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise ShardDamaged("unreadable", f"{path}: cannot read shard ({e.strerror or e})") from None
        changed = ShardDamaged("shard_changed", f"{path} changed since it was indexed ({size} bytes, the index says "
                                                 f"{self._expected_size[i]}); re-run `bioclip-fast index-shards`")
        if i in self._index_dir:
            if size > self._expected_size[i]:
                raise changed
            idx = ShardIndex.load(sidecar_path(self._index_dir[i], os.path.basename(path)))
            # shorter: usable as far as it goes if it is the indexed shard cut short (a copy or write that stopped);
            # the samples past the cut are then short reads, skipped as past_eof
            if size < self._expected_size[i] and not _prefix_intact(path, idx, size):
                raise changed
            return idx
        if size != self._expected_size[i]:
            raise changed
        try:
            return index_shard(path)
        except DataError as e:
            raise ShardDamaged("unreadable", str(e)) from None

    def entries(self, i: int) -> ShardEntries:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        idx = self._load(i)
        self.loads += 1
        path = self.paths[i]
        if idx.count != self.counts[i]:
            raise ShardDamaged("shard_changed", f"{path}: holds {idx.count} samples, the index says {self.counts[i]}; "
                                                "re-run `bioclip-fast index-shards`")
        labels = None
        if self.kind == "bio":
            try:
                remap = np.append(self.classes.indices(idx.taxon_labels()), -1)
            except KeyError as e:
                raise ShardDamaged("shard_changed", f"{path}: holds class {e.args[0]!r}, which its index does not "
                                                    "list; re-run `bioclip-fast index-shards`") from None
            labels = remap[idx.taxon.astype(np.int64)]  # -1 -> the appended -1
        e = ShardEntries(idx.keys, idx.img_off, idx.img_size, idx.img_ext, idx.txt_off, idx.txt_size, labels,
                         idx.captions, idx.strings)
        with self._lock:
            if i not in self._cache:
                self._cache[i] = e
                self._cached_samples += len(e)
            while self._cached_samples > CACHE_SAMPLES and len(self._cache) > 1:
                self._cached_samples -= len(self._cache.popitem(last=False)[1])
        return e


def _prefix_intact(path: str, idx, size: int) -> bool:
    """Whether a shard now `size` bytes long is its indexed version cut short: the tar headers in front of the image
    members of its first sample and of its last sample still wholly inside the file are intact (checksum) and give
    the indexed member sizes. Two 512-byte reads; a shard rewritten with other content fails it."""
    import tarfile

    has = np.asarray(idx.img_ext) >= 0
    off = np.asarray(idx.img_off, dtype=np.int64)
    inside = np.flatnonzero(has & (off + np.asarray(idx.img_size, dtype=np.int64) <= size) & (off >= 512))
    if not inside.size:
        return False
    try:
        with open(path, "rb") as f:
            for j in {int(inside[0]), int(inside[-1])}:
                f.seek(int(off[j]) - 512)
                info = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
                if info.size != int(idx.img_size[j]):
                    return False
    except (OSError, tarfile.TarError):
        return False
    return True
