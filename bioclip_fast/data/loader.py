"""`make_loader`: shards -> fixed-shape training/eval batches, on a DALI (GPU/CPU) or PIL backend.

Sample order is a pure function of (seed, epoch, rank, position), computed from per-shard sample counts:

1. the shards are permuted per epoch, and their samples concatenated;
2. rank r takes a contiguous slice (equal lengths when `drop_last`, so every rank has the same number of batches);
3. the slice is read round-robin from 8 equal segments ("lanes", so nearby positions come from distant shards),
   and consecutive blocks of `shuffle_buffer` positions are permuted.

Workers read samples by byte offset (DALI `.idx` files), so any batch can be produced independently: the position
in the epoch is the whole loader state, a resumed run sees exactly the remaining samples in the same order, and
crops come from per-batch seeded uniforms so augmentation repeats too.

Bad samples are skipped and counted in `loader.stats` (`skipped_corrupt` in all, `bad_samples` per reason, see
`BAD_REASONS`): corrupt image bytes, and in training also shards damaged after they were indexed (truncated: the
samples before the cut are still read; rewritten on a shared filesystem, unreadable, read errors). In training,
a skipped sample is replaced by the nearest earlier sample of the rank's order (outside the batch) so every batch has
exactly `batch_size` samples (distributed contrastive losses gather equal-size batches); in eval (`train=False`) it
is simply left out, so every good sample is seen exactly once (a shard that is no longer the indexed one stops
eval with a DataError).

Like webdataset's `handler=warn_and_continue` a damaged shard is warned about once (one log line naming the shard and
the reason) and training continues; unlike it, a limit stops a run whose data is largely bad: with
`max_bad_fraction=f`, more than f x (the rank's samples per epoch) bad samples met in one epoch raise a DataError
naming the damaged shards. The counts travel back from the worker processes inside each batch (no extra IPC, no host
sync), and a sample is counted once, at its own position, never again when it was only tried as a replacement.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bioclip_fast.data import decode_cpu as cpu_ops
from bioclip_fast.data.index import IMAGE_EXTS
from bioclip_fast.data.shardspec import resolve_shards
from bioclip_fast.data.tar import tar_number
from bioclip_fast.errors import DataError
from bioclip_fast.taxonomy import TEXT_TYPES, Taxon, validate_text_types

log = logging.getLogger(__name__)

STATE_FORMAT = "bioclip_fast/loader-state/1"
BACKENDS = ("auto", "dali", "cpu")

# why a sample was skipped (the keys of loader.stats["bad_samples"])
BAD_REASONS = (
    "corrupt_image",  # image bytes that do not decode (or no image member / no taxonomy in the sample)
    "shard_changed",  # the shard is not the one indexed (grown, rewritten, another sample count): all its samples
    "unreadable",  # the shard cannot be opened or indexed (deleted, permissions, a damaged tar header)
    "read_error",  # an I/O error reading the sample's bytes
    "past_eof",  # the sample's member runs past the end of the file: a truncated shard (its earlier samples are used)
)
WARN_SHARDS = 100  # damaged shards named one per line; beyond this they are only counted


class ShardDamaged(DataError):
    """A shard that can no longer be read as indexed; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (ShardDamaged, (self.reason, str(self)))


class BadSample(NamedTuple):
    """One skipped sample, as reported by a worker in a batch's `skipped` list."""

    key: str
    reason: str  # one of BAD_REASONS
    shard: str  # the shard's path
    detail: str

    def __str__(self) -> str:
        return f"{self.key}: {self.detail}"


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
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, local)
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


def _header_mismatch(block, name: str, size: int) -> str | None:
    """Why the 512-byte tar header `block` is not that of member `name` holding `size` bytes; None when it is.

    Name (ustar prefix joined) and size fields only: a few slices, no checksum sum. A name longer than the 100-byte
    field (GNU long-name / pax records in front of the header) is compared as far as the field holds it."""
    block = bytes(block)
    if len(block) != 512:
        return "no tar header there"
    got = block[0:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            got = prefix + b"/" + got
    want = name.encode("utf-8", "surrogateescape")
    # pax headers carry non-ASCII names; the ustar field then holds a lossy copy: such members are checked by size
    if got != want and want.isascii() and not (len(want) >= 100 and len(got) >= 90 and want.startswith(got)):
        return f"the tar member there is {got.decode('utf-8', 'replace')!r}, the index names {name!r}"
    try:
        got_size = tar_number(block[124:136])
    except ValueError:
        return f"the tar header of {name!r} is damaged"
    if got_size != size:
        return f"member {name!r} holds {got_size} bytes, the index says {size}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# epoch plan
# ---------------------------------------------------------------------------------------------------------------------
class EpochPlan:
    """Rank-local order of one epoch: position p in [0, n) -> (shard index, sample index in shard)."""

    def __init__(self, counts: np.ndarray, *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool,
                 shuffle_buffer: int, drop_last: bool, lanes: int = 8):
        counts = np.asarray(counts, dtype=np.int64)
        self.order = (np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(counts)) if shuffle
                      else np.arange(len(counts)))
        self.cum = np.cumsum(counts[self.order])
        total = int(self.cum[-1]) if len(self.cum) else 0
        if drop_last:
            self.n = total // world_size
            self.start = rank * self.n
        else:
            base, extra = divmod(total, world_size)
            self.n = base + (1 if rank < extra else 0)
            self.start = rank * base + min(rank, extra)
        self.block = max(1, int(shuffle_buffer)) if shuffle else 1
        self.seed, self.epoch, self.rank, self.shuffle = seed, epoch, rank, shuffle
        self._perm_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # Lanes: the slice is cut into `lanes` segments read round-robin, so a shuffle block mixes samples from
        # several distant shards (shards are often written in class order; one shard per block would make batches
        # nearly single-class).
        self.lanes = max(1, min(int(lanes), self.n)) if shuffle else 1
        base, extra = divmod(self.n, self.lanes)
        self._lane_base, self._lane_extra = base, extra
        self._lane_start = [i * base + min(i, extra) for i in range(self.lanes)]

    def _block_perm(self, k: int) -> np.ndarray:
        if k not in self._perm_cache:
            length = min(self.block, self.n - k * self.block)
            self._perm_cache[k] = np.random.default_rng([self.seed, self.epoch, self.rank, k, 0xB10C]).permutation(
                length)
            while len(self._perm_cache) > 4:
                self._perm_cache.popitem(last=False)
        return self._perm_cache[k]

    def locate_array(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, indices within shard) of rank-local positions, vectorized."""
        p = np.array(positions, dtype=np.int64, copy=True).reshape(-1)
        if p.size and (p.min() < 0 or p.max() >= self.n):
            bad = int(p[(p < 0) | (p >= self.n)][0])
            raise IndexError(f"position {bad} outside the rank's {self.n} samples")
        if self.block > 1 and p.size:
            k = p // self.block
            for kk in np.unique(k):
                m = k == kk
                p[m] = kk * self.block + self._block_perm(int(kk))[p[m] - kk * self.block]
        if self.lanes > 1 and p.size:
            full = self._lane_base * self.lanes
            inside = p < full
            lane = np.where(inside, p % self.lanes, p - full)
            k = np.where(inside, p // self.lanes, self._lane_base)
            p = np.asarray(self._lane_start, dtype=np.int64)[lane] + k
        g = self.start + p
        s = np.searchsorted(self.cum, g, side="right")
        within = g - np.where(s > 0, self.cum[np.maximum(s - 1, 0)], 0)
        return self.order[s].astype(np.int64), within.astype(np.int64)

    def locate(self, positions: Sequence[int]) -> list[tuple[int, int]]:
        """(shard index, index within shard) of rank-local positions."""
        s, j = self.locate_array(positions)
        return list(zip(s.tolist(), j.tolist()))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# batch production (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SourceConfig:
    batch_size: int
    image_size: int
    train: bool
    seed: int
    rank: int
    world_size: int
    shuffle: bool
    shuffle_buffer: int
    drop_last: bool
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]


class BatchReader:
    """Reads and prepares batch `b` of epoch `e` for one source. `decode=True`: uint8 images [B,3,S,S] (PIL);
    `decode=False`: validated JPEG bytes + crop boxes for a DALI pipeline."""

    def __init__(self, shards: ShardSet, cfg: SourceConfig, decode: bool, ext: str = "jpg"):
        self.shards, self.cfg, self.decode, self.ext = shards, cfg, decode, ext
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._files: OrderedDict[int, int] = OrderedDict()
        self._damaged: dict[int, ShardDamaged] = {}  # shards found unusable by this process: not retried

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            c = self.cfg
            self._plans[epoch] = EpochPlan(self.shards.counts, seed=c.seed, epoch=epoch, rank=c.rank,
                                           world_size=c.world_size, shuffle=c.shuffle,
                                           shuffle_buffer=c.shuffle_buffer, drop_last=c.drop_last)
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def _fd(self, i: int) -> int:
        fd = self._files.get(i)
        if fd is None:
            try:
                fd = os.open(self.shards.paths[i], os.O_RDONLY)
            except OSError as e:
                raise ShardDamaged("unreadable", f"{self.shards.paths[i]}: cannot open shard ({e.strerror or e})") \
                    from None
            self._files[i] = fd
            while len(self._files) > 256:  # cached descriptors, closed on eviction
                os.close(self._files.popitem(last=False)[1])
        return fd

    def _entries(self, i: int) -> ShardEntries:
        """The shard's table; raises ShardDamaged (remembered: a damaged shard is not stat'ed again per sample)."""
        bad = self._damaged.get(i)
        if bad is not None:
            raise bad
        try:
            return self.shards.entries(i)
        except ShardDamaged as e:
            self._damaged[i] = e
            raise

    def _pread(self, s: int, size: int, offset: int) -> bytes:
        """`size` bytes at `offset` of shard s; raises ShardDamaged for a read error or a short read."""
        try:
            data = os.pread(self._fd(s), size, offset)
        except OSError as e:
            raise ShardDamaged("read_error", f"{self.shards.paths[s]}: read error at byte {offset} "
                                             f"({e.strerror or e})") from None
        if len(data) != size:
            raise ShardDamaged("past_eof", self._past_eof(s, offset + size))
        return data

    def _member(self, s: int, name: str, size: int, offset: int) -> bytes:
        """The payload of member `name` (`size` bytes at `offset`) of shard s, read with the tar header in front of it
        (one read), which must name that member: a shard rewritten after it was indexed (same size, other content)
        raises ShardDamaged("shard_changed") instead of handing out another sample's bytes under this label."""
        data = self._pread(s, size + 512, offset - 512)
        why = _header_mismatch(data[:512], name, size)
        if why is not None:
            raise self._changed(s, offset - 512, why)
        return data[512:]

    def _changed(self, s: int, at: int, why: str) -> ShardDamaged:
        """shard_changed for shard s (remembered: the shard is not the indexed one, so none of its samples is read)."""
        err = ShardDamaged("shard_changed", f"{self.shards.paths[s]} changed since it was indexed (at byte {at} "
                                            f"{why}); re-run `bioclip-fast index-shards`")
        self._damaged[s] = err
        return err

    def _past_eof(self, s: int, end: int) -> str:
        path = self.shards.paths[s]
        try:
            size = f"{os.fstat(self._fd(s)).st_size} bytes"
        except (OSError, DataError):
            size = "unknown size"
        return f"{path}: a member runs past the end of the file (ends at byte {end}, the file has {size}); " \
               "the shard was truncated after it was indexed"

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):  # workers open their own descriptors
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        state["_damaged"] = {}
        return state

    def _read(self, s: int, j: int) -> tuple[str, bytes | None, int, bytes | None, tuple | None]:
        """(key, image bytes, label, replay caption bytes, member captions per TEXT_TYPES) of sample j of shard s.
        Raises ShardDamaged."""
        e = self._entries(s)
        data = (self._member(s, _member_name(e, j), int(e.img_size[j]), int(e.img_off[j])) if e.img_ext[j] >= 0
                else None)
        if self.shards.kind == "caption":
            caption = (self._member(s, e.keys[j] + ".txt", int(e.txt_size[j]), int(e.txt_off[j]))
                       if e.txt_off[j] >= 0 else b"")
            return e.keys[j], data, -1, caption, None
        ids = e.captions[:, j]
        caps = tuple(e.strings[c] if c >= 0 else None for c in ids.tolist())
        return e.keys[j], data, int(e.labels[j]), None, caps

    def _prepare(self, data: bytes | None, u: np.ndarray):
        """-> (image uint8 HWC | None, box) or raises CorruptImage."""
        if data is None:
            raise cpu_ops.CorruptImage("sample has no image member")
        w, h = cpu_ops.image_size(data)
        c = self.cfg
        box = (cpu_ops.random_resized_crop_box(w, h, u, c.crop_scale, c.crop_ratio) if c.train
               else cpu_ops.center_crop_box(w, h))
        if self.decode:
            return cpu_ops.decode_crop_resize(data, box, c.image_size), box
        return None, box

    def _bad_sample(self, s: int, j: int, e: ShardEntries | None, err: Exception) -> BadSample:
        path = self.shards.paths[s]
        key = e.keys[j] if e is not None else f"{os.path.basename(path)}#{j}"
        reason = err.reason if isinstance(err, ShardDamaged) else "corrupt_image"
        return BadSample(key, reason, path, str(err))

    def read_positions(self, epoch: int, positions: list[int], rng_key: tuple[int, ...], replace: bool,
                       plan: EpochPlan | None = None) -> dict[str, Any]:
        """Read (and with decode=True decode) the samples at rank-local `positions`.

        The fast path locates the whole batch at once, reads every image straight into one batch buffer
        (`os.preadv`, one copy), validates headers in place and draws all crop boxes in one vectorized call. Bad
        samples (BAD_REASONS) are replaced (train) or dropped (eval) through the per-sample path, and listed in
        `skipped` as BadSample (only those at `positions`: a replacement candidate that is bad too is passed over
        uncounted, it is counted at its own position). In eval a shard that cannot be read as indexed raises.
        """
        plan = plan or self.plan(epoch)
        c = self.cfg
        n = len(positions)
        uniforms = np.random.default_rng([c.seed, *rng_key, 0xC209]).random((n, cpu_ops.UNIFORMS_PER_SLOT))
        shard_idx, within = plan.locate_array(positions)
        ents: dict[int, ShardEntries] = {}
        slot_bad: list[ShardDamaged | None] = [None] * n
        offs = np.zeros(n, np.int64)
        sizes = np.zeros(n, np.int64)
        for s in np.unique(shard_idx).tolist():
            m = shard_idx == s
            try:
                e = ents[s] = self._entries(s)
            except ShardDamaged as err:
                if not replace:
                    raise
                for k in np.flatnonzero(m).tolist():
                    slot_bad[k] = err
                continue
            j = within[m]
            has = e.img_ext[j] >= 0
            offs[m] = e.img_off[j]
            sizes[m] = np.where(has, e.img_size[j], -1)
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(np.maximum(sizes, 0), out=starts[1:])
        buf = np.empty(int(starts[-1]), np.uint8)
        mv = memoryview(buf)
        # each image is read together with the tar header in front of it, which must name the indexed member
        headers = np.empty(n * 512, np.uint8)
        hv = memoryview(headers)
        sl, wl, st, sz, of = shard_idx.tolist(), within.tolist(), starts.tolist(), sizes.tolist(), offs.tolist()
        for k in range(n):
            if sz[k] > 0 and slot_bad[k] is None:
                if sl[k] in self._damaged:  # found rewritten earlier in this batch
                    slot_bad[k] = self._damaged[sl[k]]
                    continue
                try:
                    got = os.preadv(self._fd(sl[k]), [hv[512 * k:512 * k + 512], mv[st[k]:st[k] + sz[k]]],
                                    of[k] - 512) - 512
                except ShardDamaged as err:  # cannot open the shard
                    if not replace:
                        raise
                    self._damaged[sl[k]] = slot_bad[k] = err
                    continue
                except OSError as err:
                    slot_bad[k] = ShardDamaged("read_error", f"{self.shards.paths[sl[k]]}: read error at byte "
                                                             f"{of[k]} ({err.strerror or err})")
                    continue
                if got != sz[k]:  # buf holds garbage past `got`: never decode it
                    slot_bad[k] = ShardDamaged("past_eof", self._past_eof(sl[k], of[k] + sz[k]))
                    continue
                why = _header_mismatch(hv[512 * k:512 * k + 512], _member_name(ents[sl[k]], wl[k]), sz[k])
                if why is not None:
                    slot_bad[k] = self._changed(sl[k], of[k] - 512, why)
                    if not replace:
                        raise slot_bad[k]

        caption_kind = self.shards.kind == "caption"
        pieces: list[Any] = []  # per kept slot: memoryview into `buf` or bytes of a replacement sample
        keys, labels, captions, member_caps, skipped, dims, kept_slots, images = [], [], [], [], [], [], [], []
        in_batch = set(positions)
        # replacement candidates: the nearest earlier samples of the rank's order, wrapping around; bounded so a run
        # whose data is nearly all bad stops with a message instead of scanning the whole epoch for every batch
        fallback = iter(range(1, min(plan.n, max(4096, 16 * n)) + 1))
        for k in range(n):
            s, j = sl[k], wl[k]
            e = ents.get(s)
            data = mv[st[k]:st[k] + sz[k]] if sz[k] >= 0 else None
            bad = slot_bad[k]
            primary = True
            while True:
                try:
                    if bad is not None:
                        raise bad
                    key = e.keys[j]
                    label = -1 if caption_kind else int(e.labels[j])
                    if data is None:
                        raise cpu_ops.CorruptImage("sample has no image member")
                    if not caption_kind and label < 0:
                        raise cpu_ops.CorruptImage("no taxonomy in the sample's text members")
                    wh = cpu_ops.image_size(data)
                    if caption_kind:  # read inside the try: a failing read is replaced like a bad image
                        caption = (self._member(s, e.keys[j] + ".txt", int(e.txt_size[j]), int(e.txt_off[j]))
                                   if e.txt_off[j] >= 0 else b"")
                    if self.decode:  # the PIL path decodes here, so a decoder failure is replaced like any other
                        box = (cpu_ops.random_resized_crop_box(wh[0], wh[1], uniforms[k], c.crop_scale,
                                                               c.crop_ratio) if c.train
                               else cpu_ops.center_crop_box(*wh))
                        images.append(cpu_ops.decode_crop_resize(bytes(data), box, c.image_size))
                    break
                except (cpu_ops.CorruptImage, ShardDamaged) as err:
                    if primary:
                        skipped.append(self._bad_sample(s, j, e, err))
                        primary = False
                    if not replace:
                        s = None
                        break
                    for t in fallback:
                        cand = (positions[0] - t) % plan.n
                        if cand not in in_batch:
                            break
                    else:
                        damaged = sorted({b.shard for b in skipped if isinstance(b, BadSample)})
                        raise DataError(
                            f"no readable sample left to replace bad ones near position {positions[0]} (damaged "
                            f"shard(s): {', '.join(damaged[:5])}{', ...' if len(damaged) > 5 else ''})") from None
                    in_batch.add(cand)
                    (s, j), = plan.locate([cand])
                    e, bad = None, None
                    try:
                        e = self._entries(s)
                        _, data, _, _, _ = self._read(s, j)
                    except ShardDamaged as err2:
                        bad = err2
            if s is None:
                continue
            keys.append(key)
            labels.append(label)
            dims.append(wh)
            kept_slots.append(k)
            pieces.append(data)
            if caption_kind:
                captions.append(caption.decode("utf-8", errors="replace").strip())
            else:
                member_caps.append(tuple(e.strings[x] if x >= 0 else None for x in e.captions[:, j].tolist()))
        wh_arr = np.asarray(dims, dtype=np.int64).reshape(-1, 2)
        if c.train:
            boxes = cpu_ops.random_resized_crop_boxes(wh_arr[:, 0], wh_arr[:, 1], uniforms[kept_slots],
                                                      c.crop_scale, c.crop_ratio)
        else:
            boxes = np.asarray([cpu_ops.center_crop_box(w, h) for w, h in dims], dtype=np.int64).reshape(-1, 4)
        out: dict[str, Any] = {"key": keys, "label": torch.as_tensor(labels, dtype=torch.long),
                               "skipped": skipped, "box": boxes.astype(np.int32).reshape(-1, 4)}
        if self.decode:
            size = c.image_size
            arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
            out["image_u8"] = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        else:
            # one tensor for the whole batch: DataLoader moves it through shared memory instead of pickling
            if len(pieces) == n and not skipped:
                out["jpeg"] = torch.from_numpy(buf)  # the fast path: already one buffer, no copy
            else:
                out["jpeg"] = torch.frombuffer(bytearray(b"".join(bytes(p) for p in pieces)), dtype=torch.uint8) \
                    if pieces else torch.empty(0, dtype=torch.uint8)
            out["jpeg_sizes"] = np.asarray([len(p) for p in pieces], dtype=np.int64)
        if caption_kind:
            out["caption"] = captions
        else:
            out["captions"] = member_caps
        return out


def _member_name(e: ShardEntries, j: int) -> str:
    """The tar member name of sample j's image (as the index recorded it)."""
    return f"{e.keys[j]}.{IMAGE_EXTS[int(e.img_ext[j])]}"


def _identity(x):
    return x


def _key_of(skipped) -> str:
    return skipped.key if isinstance(skipped, BadSample) else str(skipped).split(":", 1)[0]


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over (epoch, batch index) -> prepared batch (bio + optional replay part)."""

    def __init__(self, bio: BatchReader, replay: BatchReader | None, replay_batch_size: int, batches_per_epoch: int,
                 tokenizer):
        self.bio, self.replay, self.replay_batch_size = bio, replay, replay_batch_size
        self.batches_per_epoch, self.tokenizer = batches_per_epoch, tokenizer

    def __len__(self) -> int:  # not used by our sampler; required by the protocol
        return self.batches_per_epoch

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        try:
            return self._get(item)
        except DataError as e:  # sent back as a value: re-raised in the main process as the same one-line error
            return {"_error": str(e)}  # (DataLoader would wrap it in the worker's traceback text)

    def _get(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, b = item
        bs = self.bio.cfg.batch_size
        plan = self.bio.plan(epoch)
        positions = list(range(b * bs, min((b + 1) * bs, plan.n)))
        out = self.bio.read_positions(epoch, positions, (epoch, self.bio.cfg.rank, b), replace=self.bio.cfg.train)
        if self.replay is not None:
            out["replay"] = self._replay(epoch * self.batches_per_epoch + b)
        return out

    def _replay(self, step: int) -> dict[str, Any]:
        """Replay samples of global step `step`: the replay set is an endless stream of its own epochs."""
        r = self.replay_batch_size
        n = self.replay.plan(0).n
        if n < r:
            raise ValueError(f"the replay shards give this rank {n} samples, fewer than replay_batch_size={r}")
        first = step * r
        cycle, start = divmod(first, n)
        positions = [start + i for i in range(r)]
        parts = []
        # a step may straddle two replay epochs
        for cyc, pos in ((cycle, [p for p in positions if p < n]), (cycle + 1, [p - n for p in positions if p >= n])):
            if pos:
                parts.append(self.replay.read_positions(cyc, pos, (cyc, self.replay.cfg.rank, step), replace=True,
                                                        plan=self.replay.plan(cyc)))
        out = parts[0]
        for p in parts[1:]:
            out["key"] += p["key"]
            out["skipped"] += p["skipped"]
            out["caption"] += p["caption"]
            out["box"] = np.concatenate([out["box"], p["box"]])
            if "image_u8" in out:
                out["image_u8"] = torch.cat([out["image_u8"], p["image_u8"]])
            else:
                out["jpeg"] = torch.cat([out["jpeg"], p["jpeg"]])
                out["jpeg_sizes"] = np.concatenate([out["jpeg_sizes"], p["jpeg_sizes"]])
        out["text"] = self.tokenizer(out["caption"]).long()
        return out


def _worker_init(_):
    torch.set_num_threads(1)  # decode parallelism comes from the workers, not intra-op threads


# ---------------------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------------------
class Loader:
    """Iterable over one epoch of batches; resumable via `state_dict` / `load_state_dict`. See `make_loader`."""

    def __init__(self, shards, batch_size: int, *, image_size: int = 224, mean=None, std=None, tokenizer=None,
                 text_types: Sequence[str] = TEXT_TYPES, train: bool = True, backend: str = "auto",
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, num_workers: int = 2, drop_last: bool | None = None,
                 replay_shards=None, replay_batch_size: int = 0, shuffle: bool | None = None,
                 crop_scale: tuple[float, float] = cpu_ops.DEFAULT_SCALE,
                 crop_ratio: tuple[float, float] = cpu_ops.DEFAULT_RATIO, dali_threads: int | None = None,
                 progress: bool = False, index_dir: str | os.PathLike | None = None,
                 max_bad_fraction: float | None = None, defer_bad_limit: bool = False):
        import open_clip

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if replay_batch_size < 0 or (replay_batch_size > 0) != (replay_shards is not None):
            raise ValueError("replay needs both replay_shards and replay_batch_size > 0 "
                             f"(got replay_shards={replay_shards!r}, replay_batch_size={replay_batch_size!r})")
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1] (or None: no limit), got {max_bad_fraction!r}")
        self.max_bad_fraction = max_bad_fraction
        # defer_bad_limit: past the limit, set `bad_limit_error` (the message) and keep yielding instead of raising
        self.defer_bad_limit, self.bad_limit_error = bool(defer_bad_limit), None
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale!r}")
        self.text_types = validate_text_types(text_types)
        self.device = torch.device(device)
        mean = tuple(open_clip.OPENAI_DATASET_MEAN if mean is None else mean)
        std = tuple(open_clip.OPENAI_DATASET_STD if std is None else std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must be 3 values (std > 0), got mean={mean!r} std={std!r}")
        self.mean, self.std = mean, std
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer("ViT-B-32")
        self.batch_size, self.image_size, self.train = batch_size, image_size, train
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        drop_last = train if drop_last is None else bool(drop_last)
        self.num_workers, self.drop_last, self.dali_threads = num_workers, drop_last, dali_threads
        self.shuffle = train if shuffle is None else bool(shuffle)

        self.source = ShardSet(shards, kind="bio", progress=progress, index_dir=index_dir, rank=rank,
                               world_size=world_size)
        self.classes: Sequence[Taxon] = self.source.classes
        cfg = SourceConfig(batch_size, image_size, train, self.seed, rank, world_size, self.shuffle,
                           shuffle_buffer, drop_last, tuple(crop_scale), tuple(crop_ratio))
        if backend == "auto":
            backend = "dali" if self.device.type == "cuda" and _dali_available() else "cpu"
        if backend == "dali" and not _dali_available():
            raise RuntimeError(f"backend='dali' but NVIDIA DALI cannot be imported: {_dali_import_error()}")
        self.backend = backend
        decode = backend == "cpu"
        self._bio = BatchReader(self.source, cfg, decode=decode)
        self.replay_batch_size = replay_batch_size
        self._replay = None
        if replay_shards is not None:
            self.replay_source = ShardSet(replay_shards, kind="caption", index_dir=index_dir, rank=rank,
                                          world_size=world_size)
            rcfg = dataclasses.replace(cfg, batch_size=replay_batch_size, seed=self.seed + 1, drop_last=True,
                                       shuffle=True)
            self._replay = BatchReader(self.replay_source, rcfg, decode=decode)
            n_replay = self._replay.plan(0).n
            if n_replay < replay_batch_size:
                raise ValueError(f"the replay shards give rank {rank} {n_replay} samples, fewer than "
                                 f"replay_batch_size={replay_batch_size}")
        n = self._bio.plan(0).n
        self._len = num_batches(n, batch_size, drop_last)
        if self._len == 0:
            raise ValueError(f"rank {rank} gets {n} samples, fewer than one batch of {batch_size} (drop_last=True)")
        self._dataset = _BatchDataset(self._bio, self._replay, replay_batch_size, self._len, self.tokenizer)
        self._dataloader = None
        self._dali = None
        self.epoch = 0
        self._consumed = 0  # batches of `epoch` already yielded
        # caption_fallback: (sample, text type) pairs whose caption member was missing, rebuilt from the taxonomy
        # skipped_corrupt: every skipped sample (bio + replay); bad_samples: the same per reason (BAD_REASONS);
        # bad_shards: shards with at least one bad sample (named in `self.bad_shards`)
        self.stats = {"samples": 0, "batches": 0, "skipped_corrupt": 0, "replay_samples": 0, "caption_fallback": 0,
                      "bad_samples": {}, "bad_shards": 0, "replay_bad_samples": 0, "backend": backend}
        self.skipped_keys: list[str] = []
        self.bad_shards: dict[str, str] = {}  # shard path -> the first reason met
        # bad and seen samples of the current epoch, per stream (for max_bad_fraction)
        self._bad_window = {"epoch": 0, "bio": 0, "bio_seen": 0, "replay": 0, "replay_seen": 0}
        self._token_row: dict[str, int] = {}  # caption string -> row of the token table
        self._token_table: np.ndarray | None = None  # int32 [rows, context length]
        self._mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    # ---- sizes and state ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before drop_last truncation to whole batches)."""
        return self._bio.plan(self.epoch).n

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. A no-op for the current epoch, so a restored mid-epoch position survives."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self._consumed = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, batches consumed) and settings; order and crops are functions of these, so no RNG state
        needs saving. Restore with `load_state_dict` on a loader built with the same shards and settings."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches_consumed": self._consumed,
                "samples_consumed": self._consumed * self.batch_size, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "replay_batch_size": self.replay_batch_size, "dataset": self.source.fingerprint(),
                "stats": {**self.stats, "bad_samples": dict(self.stats["bad_samples"])},
                "bad_shards": dict(self.bad_shards), "bad_window": dict(self._bad_window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a loader state (format {state.get('format') if isinstance(state, dict) else None!r}"
                             f", expected {STATE_FORMAT!r})")
        for k in ("seed", "world_size", "batch_size", "replay_batch_size"):
            if state[k] != getattr(self, k):
                raise ValueError(f"loader state was saved with {k}={state[k]}, this loader has {getattr(self, k)}; "
                                 "exact resume needs the same setting")
        if state["dataset"] != self.source.fingerprint():
            raise ValueError("loader state was saved for different shards (names or sample counts differ)")
        if not 0 <= state["batches_consumed"] <= self._len:
            raise ValueError(f"batches_consumed={state['batches_consumed']} outside [0, {self._len}]")
        self.epoch, self._consumed = int(state["epoch"]), int(state["batches_consumed"])
        self.stats.update(state.get("stats", {}))
        self.stats["backend"] = self.backend
        self.bad_shards = dict(state.get("bad_shards", {}))
        self._bad_window.update(state.get("bad_window", {}))

    # ---- iteration ------------------------------------------------------------------------------------------------
    def _batch_indices(self):
        return [(self.epoch, b) for b in range(self._consumed, self._len)]

    def _raw_batches(self):
        for raw in self._raw_batches_unchecked():
            if "_error" in raw:
                raise DataError(raw["_error"])
            yield raw

    def _raw_batches_unchecked(self):
        items = self._batch_indices()
        if self.num_workers == 0:
            for it in items:
                yield self._dataset[it]
            return
        if self._dataloader is None:
            self._dataloader = torch.utils.data.DataLoader(
                self._dataset, batch_size=None, sampler=_ListSampler(), num_workers=self.num_workers,
                collate_fn=_identity, persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init,
                pin_memory=self.device.type == "cuda" and self.backend == "cpu",
            )
        self._dataloader.sampler.items = items
        yield from self._dataloader

    def __iter__(self):
        if self._consumed >= self._len:  # previous epoch finished: move on
            self.epoch, self._consumed = self.epoch + 1, 0
        if self.backend == "dali":
            from bioclip_fast.data.decode_dali import DaliDecoder

            if self._dali is None:
                self._dali = DaliDecoder(self)
            batches = self._dali.decode(self._raw_batches())
        else:
            batches = (self._finish_cpu(raw) for raw in self._raw_batches())
        for batch in batches:
            advance = batch.pop("_advance", 1)
            skipped = batch.pop("skipped")
            rskipped = batch["replay"].pop("skipped") if "replay" in batch else []
            # a batch that stops iteration is not consumed: its counts are undone, a resumed run reads it again
            undo = self._bad_state() if (skipped or rskipped) and self.max_bad_fraction is not None else None
            # positions the batch covered: in training every bad one was filled by a replacement
            self._count_bad(skipped, "bio", len(batch["key"]) + (0 if self.train else len(skipped)))
            self.skipped_keys.extend(_key_of(s) for s in skipped)
            if "replay" in batch:
                self._count_bad(rskipped, "replay", len(batch["replay"]["key"]))
            if undo is not None:
                try:
                    self._check_bad_fraction()
                except DataError as e:
                    if not self.defer_bad_limit:
                        self._set_bad_state(undo)
                        raise
                    # the batch itself is fine (its bad samples were replaced): hand it out, and let the trainer
                    # stop every rank together after this step
                    self.bad_limit_error = self.bad_limit_error or str(e)
            self._consumed += advance
            if not batch["key"]:
                continue  # eval batch whose samples were all corrupt
            self.stats["batches"] += 1
            self.stats["samples"] += len(batch["key"])
            if "replay" in batch:
                self.stats["replay_samples"] += len(batch["replay"]["key"])
            yield batch
        self._consumed = self._len  # ran to the end (trailing all-corrupt batches included)

    def _count_bad(self, skipped: list, stream: str, positions: int) -> None:
        """Count a batch's skipped samples (BadSample from the workers; plain strings from the DALI CPU fallback)
        out of the `positions` it covered, and warn once per damaged shard."""
        st = self.stats
        st["skipped_corrupt"] += len(skipped)
        window = self._window()
        window[stream + "_seen"] += positions
        if not skipped:
            return
        window[stream] += len(skipped)
        by_reason = st["bad_samples"]
        for b in skipped:
            reason = b.reason if isinstance(b, BadSample) else "corrupt_image"
            by_reason[reason] = by_reason.get(reason, 0) + 1
            if stream == "replay":
                st["replay_bad_samples"] += 1
            if not isinstance(b, BadSample) or b.shard in self.bad_shards:
                continue
            detail = b.detail[len(b.shard):].lstrip(": ") if b.detail.startswith(b.shard) else b.detail
            self.bad_shards[b.shard] = f"{b.reason}: {detail}"[:500]
            st["bad_shards"] = len(self.bad_shards)
            if len(self.bad_shards) <= WARN_SHARDS:
                log.warning("damaged shard %s: %s (%s); skipping its bad samples%s", b.shard, detail, b.reason,
                            "; further damaged shards are only counted (loader.stats)"
                            if len(self.bad_shards) == WARN_SHARDS else "")

    def _bad_state(self) -> tuple:
        st = {**self.stats, "bad_samples": dict(self.stats["bad_samples"])}
        return st, dict(self.bad_shards), dict(self._bad_window), len(self.skipped_keys)

    def _set_bad_state(self, state: tuple) -> None:
        st, shards, window, n_keys = state
        self.stats.clear()
        self.stats.update(st)
        self.bad_shards, self._bad_window = shards, window
        del self.skipped_keys[n_keys:]

    def _window(self) -> dict[str, int]:
        w = self._bad_window
        if w["epoch"] != self.epoch:
            w.update(epoch=self.epoch, bio=0, bio_seen=0, replay=0, replay_seen=0)
        return w

    def _check_bad_fraction(self) -> None:
        """Stop when the bad samples met this epoch exceed max_bad_fraction of the stream's samples per epoch (or of
        the samples read this epoch, for a replay set smaller than an epoch's worth): the known-bad part of the
        data is then over the limit however the rest reads, and a damaged shard met early never stops a run."""
        f = self.max_bad_fraction
        if f is None:
            return
        w = self._window()
        for stream, per_epoch in (("bio", self._bio.plan(self.epoch).n),
                                  ("replay", self._replay.plan(0).n if self._replay is not None else 0)):
            total = max(per_epoch, w[stream + "_seen"])
            if w[stream] and w[stream] > f * total:
                shards = sorted(self.bad_shards)
                more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.stats["bad_samples"].items()))
                raise DataError(
                    f"{w[stream]} bad {'replay ' if stream == 'replay' else ''}samples in epoch {self.epoch} on rank "
                    f"{self.rank}, more than max_bad_fraction={f:g} of the {total} samples per epoch ({reasons}); "
                    + (f"damaged shard(s): {', '.join(shards[:5])}{more}. Repair or re-index them (`bioclip-fast "
                       "index-shards`)" if shards else "corrupt images") + ", or raise --max-bad-fraction")

    def normalize(self, image_u8: torch.Tensor) -> torch.Tensor:
        x = image_u8.to(self.device, non_blocking=True).float()
        return (x - self._mean_t.to(x.device)) / self._std_t.to(x.device)

    # distinct caption strings kept tokenized (int32 [N, 77]: 39 MB at this bound); cleared when full
    TOKEN_CACHE_ROWS = 1 << 17

    def captions(self, labels: torch.Tensor, member_captions: Sequence[Sequence[str | None]] | None = None,
                 ) -> dict[str, list[str]]:
        """Caption strings of each text type for a batch: the shard's caption member (`.taxon.txt`, `.sci.txt`,
        `.com.txt`, `.sci_com.txt`, `.taxon_com.txt`) when the sample has it, else rebuilt from the taxonomy (counted
        in `stats["caption_fallback"]`)."""
        idx = labels.tolist()
        out: dict[str, list[str]] = {}
        fallback = 0
        for tt in self.text_types:
            col = TEXT_TYPES.index(tt) if tt in TEXT_TYPES else None
            if member_captions is None or col is None:  # no members (or a rank-tagged type): from the taxonomy
                out[tt] = [self.classes[i].text(tt) for i in idx]
                continue
            texts = [mc[col] for mc in member_captions]
            for b, s in enumerate(texts):
                if s is None:
                    texts[b] = self.classes[idx[b]].text(tt)
                    fallback += 1
            out[tt] = texts
        self.stats["caption_fallback"] += fallback
        return out

    def tokens(self, labels: torch.Tensor, member_captions: Sequence[Sequence[str | None]] | None = None,
               ) -> dict[str, torch.Tensor]:
        """Token ids [B, L] of each text type for a batch (see `captions`).

        Each distinct caption string is tokenized once, on first sight (ToL-scale caption sets are never tokenized up
        front), into a bounded table; a batch is then one gather per text type.
        """
        if not len(labels):
            empty = torch.zeros((0, self._context_length()), dtype=torch.long, device=self.device)
            return {tt: empty for tt in self.text_types}
        texts = self.captions(labels, member_captions)
        new = list(dict.fromkeys(s for col in texts.values() for s in col if s not in self._token_row))
        if new:
            if len(self._token_row) + len(new) > self.TOKEN_CACHE_ROWS:
                self._token_row, self._token_table = {}, None
                new = list(dict.fromkeys(s for col in texts.values() for s in col))
            toks = self.tokenizer(new).to(torch.int32).numpy()
            base = len(self._token_row)
            self._token_table = toks if self._token_table is None else np.concatenate([self._token_table, toks])
            for k, s in enumerate(new):
                self._token_row[s] = base + k
        out = {}
        row = self._token_row
        for tt, col in texts.items():  # numpy gather: no per-op torch dispatch or thread wake-ups in the main loop
            rows = np.fromiter((row[s] for s in col), dtype=np.int64, count=len(col))
            out[tt] = torch.from_numpy(self._token_table[rows].astype(np.int64)).to(self.device, non_blocking=True)
        return out

    def _context_length(self) -> int:
        if not hasattr(self, "_ctx_len"):
            self._ctx_len = int(self.tokenizer(["x"]).shape[-1])
        return self._ctx_len

    def _finish_cpu(self, raw: dict[str, Any]) -> dict[str, Any]:
        batch = {"image": self.normalize(raw["image_u8"]), "text": self.tokens(raw["label"], raw.get("captions")),
                 "key": raw["key"],
                 "label": raw["label"].to(self.device), "skipped": raw["skipped"]}
        if "replay" in raw:
            r = raw["replay"]
            batch["replay"] = {"image": self.normalize(r["image_u8"]), "text": r["text"].to(self.device),
                               "key": r["key"], "skipped": r["skipped"]}
        return batch

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        dl, self._dataloader, self._dali = self._dataloader, None, None
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __repr__(self) -> str:
        return (f"Loader(backend={self.backend!r}, samples={self.source.num_samples}, shards={len(self.source)}, "
                f"classes={len(self.classes)}, batch_size={self.batch_size}, batches={self._len}, "
                f"rank={self.rank}/{self.world_size}, train={self.train})")


class _ListSampler(torch.utils.data.Sampler):
    """Yields the (epoch, batch) items set before each pass (lets persistent workers serve every epoch/resume)."""

    def __init__(self):
        self.items: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


@functools.lru_cache(maxsize=1)
def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _dali_available() -> bool:
    return _dali_import_error() is None


def make_loader(shards, batch_size: int, *, image_size: int = 224, mean=None, std=None, tokenizer=None,
                text_types: Sequence[str] = TEXT_TYPES, train: bool = True, backend: str = "auto",
                device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle_buffer: int = 1000, num_workers: int = 2, drop_last: bool | None = None, replay_shards=None,
                replay_batch_size: int = 0, **kwargs) -> Loader:
    """Batches from TreeOfLife-layout shards.

    Each batch: `image` float [B,3,S,S] normalized on `device`; `text` {text_type: LongTensor [B, L]} (every text
    type, pre-tokenized per class); `key` list[str]; `label` LongTensor [B] indexing `loader.classes`; and
    `replay` {"image": [R,3,S,S], "text": [R, L], "key": [...]} when `replay_shards` and `replay_batch_size` are
    given. `backend="auto"` uses DALI (GPU decode) on a CUDA device and the PIL backend otherwise; `backend="dali"`
    with `device="cpu"` runs DALI's CPU operators. Extra keywords: `shuffle` (default: `train`), `crop_scale`
    (default open_clip's (0.9, 1.0)), `crop_ratio`, `dali_threads`, `index_dir` (a `bioclip-fast index-shards --out`
    directory; default: next to the shards, or $BIOCLIP_FAST_INDEX_DIR), `progress`, `max_bad_fraction` (stop with a
    DataError when more than this fraction of an epoch's samples is bad; default None: skip and count without limit),
    `defer_bad_limit` (instead of raising, set `loader.bad_limit_error` and go on, the batch being whole: the trainer
    then stops all ranks together after the step, with a checkpoint).

    `shards` is any shard spec (`bioclip_fast.data.shardspec`): a directory, glob, brace pattern, '::' list,
    shard-list file, or a list of these. Captions come from each sample's caption members; see `Loader.captions`.

    `drop_last` defaults to `train`: training drops the incomplete last batch (equal batches on every rank), eval
    keeps it so every sample is seen exactly once.
    """
    return Loader(shards, batch_size, image_size=image_size, mean=mean, std=std, tokenizer=tokenizer,
                  text_types=text_types, train=train, backend=backend, device=device, rank=rank,
                  world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, num_workers=num_workers,
                  drop_last=drop_last, replay_shards=replay_shards, replay_batch_size=replay_batch_size, **kwargs)
