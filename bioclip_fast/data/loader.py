"""`make_loader`: shards -> fixed-shape training/eval batches, on a DALI (GPU/CPU) or PIL backend.

Sample order is a pure function of (seed, epoch, rank, position), computed from per-shard sample counts:

1. the shards are permuted per epoch, and their samples concatenated;
2. rank r takes a contiguous slice (equal lengths when `drop_last`, so every rank has the same number of batches);
3. the slice is read round-robin from 8 equal segments ("lanes", so nearby positions come from distant shards),
   and consecutive blocks of `shuffle_buffer` positions are permuted.

Workers read samples by byte offset (DALI `.idx` files), so any batch can be produced independently: the position
in the epoch is the whole loader state, a resumed run sees exactly the remaining samples in the same order, and
crops come from per-batch seeded uniforms so augmentation repeats too.

Corrupt samples (garbage bytes, truncated JPEGs) are skipped and counted in `loader.stats`. In training, a skipped
sample is replaced by the nearest earlier sample of the rank's order (outside the batch) so every batch has exactly
`batch_size` samples (distributed contrastive losses gather equal-size batches); in eval (`train=False`) it is
simply left out, so every good sample is seen exactly once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bioclip_fast.data import cpu as cpu_ops
from bioclip_fast.data.shards import (
    index_tar,
    load_manifest,
    read_index,
    resolve_shards,
    taxon_from_texts,
)
from bioclip_fast.taxonomy import TEXT_TYPES, Taxon, validate_text_types

STATE_FORMAT = "bioclip_fast/loader-state/1"
BACKENDS = ("auto", "dali", "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# shard tables
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardEntries:
    """Per-sample random-access info of one shard."""

    keys: list[str]
    members: list[dict[str, tuple[int, int]]]  # ext -> (offset, size)
    labels: np.ndarray | None  # global class index per sample (bio shards)


def _read_members(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    idx = Path(path).with_suffix(".idx")
    if idx.is_file():
        return read_index(idx)
    return [(k, {ext: (off, size) for ext, off, size, _ in m}) for k, m in index_tar(path)]


def _read_member_bytes(f, members: dict[str, tuple[int, int]], ext: str) -> bytes | None:
    if ext not in members:
        return None
    off, size = members[ext]
    f.seek(off)
    return f.read(size)


class ShardSet:
    """A list of shards with per-shard counts (known up front) and lazily loaded per-sample entries.

    `kind="bio"`: samples carry a taxon -> class label (from our sidecar `.json` + manifest, or parsed from the
    text members of foreign shards). `kind="caption"`: samples carry a `.txt` caption (replay).
    """

    def __init__(self, shards, kind: str = "bio", progress: bool = False):
        if kind not in ("bio", "caption"):
            raise ValueError(f"kind must be 'bio' or 'caption', got {kind!r}")
        self.paths = resolve_shards(shards)
        self.kind = kind
        counts = []
        self._sidecar_labels: dict[int, np.ndarray] = {}  # shard -> global labels, when read eagerly
        self.classes: list[Taxon] = []
        manifests: dict[str, dict | None] = {}
        for p in self.paths:
            d = os.path.dirname(os.path.abspath(p))
            if d not in manifests:
                manifests[d] = load_manifest(d) if kind == "bio" else None
        # global classes: union of manifest classes (sorted by label) + taxa found in foreign shards
        labels: dict[str, Taxon] = {}
        for m in manifests.values():
            for c in (m or {}).get("classes", []):
                labels.setdefault(c["label"], Taxon.from_row(c))
        self._dir_class_labels = {d: [c["label"] for c in m["classes"]] for d, m in manifests.items() if m}
        foreign: dict[int, list[Taxon | None]] = {}
        from tqdm import tqdm

        for i, p in enumerate(tqdm(self.paths, desc="index shards", unit="shard", disable=not progress)):
            d = os.path.dirname(os.path.abspath(p))
            m = manifests[d]
            if m is not None:
                entry = next((s for s in m["shards"] if s["name"] == os.path.basename(p)), None)
                if entry is None:
                    raise ValueError(f"{p} is not listed in {d}/manifest.json (stale manifest?)")
                counts.append(int(entry["count"]))
                continue
            if kind == "caption":
                idx = Path(p).with_suffix(".idx")
                if idx.is_file():
                    with idx.open() as f:
                        counts.append(int(f.readline().split()[1]))
                else:
                    counts.append(len(index_tar(p)))
                continue
            taxa = self._scan_taxa(p)
            foreign[i] = taxa
            for t in taxa:
                if t is not None:
                    labels.setdefault(t.label, t)
            counts.append(len(taxa))
        self.counts = np.asarray(counts, dtype=np.int64)
        if kind == "bio":
            self.classes = [labels[k] for k in sorted(labels)]
            self.class_index = {t.label: i for i, t in enumerate(self.classes)}
            for i, taxa in foreign.items():
                self._sidecar_labels[i] = np.asarray(
                    [self.class_index[t.label] if t is not None else -1 for t in taxa], dtype=np.int64
                )
        if self.counts.sum() == 0:
            raise ValueError(f"the shards hold no samples: {self.paths[:3]}{'...' if len(self.paths) > 3 else ''}")
        self._cache: OrderedDict[int, ShardEntries] = OrderedDict()
        self._lock = threading.Lock()
        if kind == "caption":  # fail at construction, not inside a worker, when the shards have no captions
            first = next(i for i, c in enumerate(self.counts) if c > 0)
            members = self.entries(first).members[0]
            if "txt" not in members:
                raise ValueError(
                    f"replay shard {self.paths[first]} has no '.txt' caption member (members: {sorted(members)}); "
                    "replay needs LAION-style .jpg+.txt shards, e.g. bioclip_fast.data.bundled.replay_shards()"
                )

    @staticmethod
    def _scan_taxa(path: str) -> list[Taxon | None]:
        """Taxon of every sample of a shard without our sidecar, from its text members."""
        from bioclip_fast.data.shards import iter_shard_samples

        return [s["taxon"] for s in iter_shard_samples([path])]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def fingerprint(self) -> str:
        return json.dumps([[os.path.basename(p), int(c)] for p, c in zip(self.paths, self.counts)])

    def entries(self, i: int) -> ShardEntries:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        path = self.paths[i]
        rows = _read_members(path)
        keys = [k for k, _ in rows]
        members = [m for _, m in rows]
        labels = None
        if self.kind == "bio":
            if i in self._sidecar_labels:
                labels = self._sidecar_labels[i]
            else:
                side = Path(path).with_suffix(".json")
                meta = json.loads(side.read_text())
                local = self._dir_class_labels[os.path.dirname(os.path.abspath(path))]
                remap = np.asarray([self.class_index[lab] for lab in local], dtype=np.int64)
                labels = remap[np.asarray(meta["labels"], dtype=np.int64)]
                if meta["keys"] != keys:
                    raise ValueError(f"{side} does not match {path} (keys differ); rebuild the shards")
        if len(keys) != self.counts[i]:
            raise ValueError(f"{path}: index has {len(keys)} samples, the manifest says {self.counts[i]}")
        e = ShardEntries(keys, members, labels)
        with self._lock:
            self._cache[i] = e
            while len(self._cache) > 24:  # the shards of the active shuffle window (one or two per lane)
                self._cache.popitem(last=False)
        return e


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

    def locate(self, positions: Sequence[int]) -> list[tuple[int, int]]:
        """(shard index, index within shard) of rank-local positions."""
        out = []
        for p in positions:
            if not 0 <= p < self.n:
                raise IndexError(f"position {p} outside the rank's {self.n} samples")
            if self.block > 1:
                k = p // self.block
                p = k * self.block + int(self._block_perm(k)[p - k * self.block])
            if self.lanes > 1:
                full = self._lane_base * self.lanes
                lane, k = (p % self.lanes, p // self.lanes) if p < full else (p - full, self._lane_base)
                p = self._lane_start[lane] + k
            g = self.start + p
            s = int(np.searchsorted(self.cum, g, side="right"))
            within = g - (int(self.cum[s - 1]) if s else 0)
            out.append((int(self.order[s]), within))
        return out


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
        self._files: OrderedDict[int, Any] = OrderedDict()

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            c = self.cfg
            self._plans[epoch] = EpochPlan(self.shards.counts, seed=c.seed, epoch=epoch, rank=c.rank,
                                           world_size=c.world_size, shuffle=c.shuffle,
                                           shuffle_buffer=c.shuffle_buffer, drop_last=c.drop_last)
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def _file(self, i: int):
        if i not in self._files:
            self._files[i] = open(self.shards.paths[i], "rb")  # noqa: SIM115 - cached, closed on eviction
            while len(self._files) > 24:
                self._files.popitem(last=False)[1].close()
        return self._files[i]

    def _read(self, plan: EpochPlan, pos: int) -> tuple[str, bytes | None, int, bytes | None]:
        (s, j), = plan.locate([pos])
        e = self.shards.entries(s)
        f = self._file(s)
        m = e.members[j]
        ext = next((x for x in (self.ext, "jpeg", "png", "webp") if x in m), self.ext)
        data = _read_member_bytes(f, m, ext)
        label = int(e.labels[j]) if e.labels is not None else -1
        caption = _read_member_bytes(f, e.members[j], "txt") if self.shards.kind == "caption" else None
        return e.keys[j], data, label, caption

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

    def read_positions(self, epoch: int, positions: list[int], rng_key: tuple[int, ...], replace: bool,
                       plan: EpochPlan | None = None) -> dict[str, Any]:
        plan = plan or self.plan(epoch)
        c = self.cfg
        uniforms = np.random.default_rng([c.seed, *rng_key, 0xC209]).random(
            (len(positions), cpu_ops.UNIFORMS_PER_SLOT))
        images, boxes, jpegs, keys, labels, captions, skipped = [], [], [], [], [], [], []
        in_batch = set(positions)
        fallback = iter(range(1, plan.n + 1))
        for slot, pos in enumerate(positions):
            cand = pos
            while True:
                key, data, label, caption = self._read(plan, cand)
                try:
                    if self.shards.kind == "bio" and label < 0:
                        raise cpu_ops.CorruptImage("no taxonomy in the sample's text members")
                    img, box = self._prepare(data, uniforms[slot])
                    break
                except cpu_ops.CorruptImage as err:
                    skipped.append(f"{key}: {err}")
                    if not replace:
                        cand = None
                        break
                    # nearest earlier sample of the rank's order outside this batch (wrapping around)
                    for t in fallback:
                        cand = (positions[0] - t) % plan.n
                        if cand not in in_batch:
                            break
                    else:
                        raise RuntimeError(
                            f"no decodable image left to replace corrupt samples (shards {self.shards.paths[:3]})"
                        ) from None
                    in_batch.add(cand)
            if cand is None:
                continue
            keys.append(key)
            labels.append(label)
            boxes.append(box)
            if caption is not None:
                captions.append(caption.decode("utf-8", errors="replace").strip())
            if self.decode:
                images.append(img)
            else:
                jpegs.append(data)
        out: dict[str, Any] = {"key": keys, "label": torch.as_tensor(labels, dtype=torch.long),
                               "skipped": skipped, "box": np.asarray(boxes, dtype=np.int32).reshape(-1, 4)}
        if self.decode:
            s = c.image_size
            arr = np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)
            out["image_u8"] = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        else:
            # one tensor for the whole batch: DataLoader moves it through shared memory instead of pickling
            out["jpeg"] = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else \
                torch.empty(0, dtype=torch.uint8)
            out["jpeg_sizes"] = np.asarray([len(d) for d in jpegs], dtype=np.int64)
        if self.shards.kind == "caption":
            out["caption"] = captions
        return out


def _identity(x):
    return x


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over (epoch, batch index) -> prepared batch (bio + optional replay part)."""

    def __init__(self, bio: BatchReader, replay: BatchReader | None, replay_batch_size: int, batches_per_epoch: int,
                 tokenizer):
        self.bio, self.replay, self.replay_batch_size = bio, replay, replay_batch_size
        self.batches_per_epoch, self.tokenizer = batches_per_epoch, tokenizer

    def __len__(self) -> int:  # not used by our sampler; required by the protocol
        return self.batches_per_epoch

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
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
                 progress: bool = False):
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

        self.source = ShardSet(shards, kind="bio", progress=progress)
        self.classes: list[Taxon] = self.source.classes
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
            self.replay_source = ShardSet(replay_shards, kind="caption")
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
        self.stats = {"samples": 0, "batches": 0, "skipped_corrupt": 0, "replay_samples": 0, "backend": backend}
        self.skipped_keys: list[str] = []
        self._token_row: dict[int, int] = {}  # class index -> row of the token tables
        self._token_table: dict[str, torch.Tensor] = {}
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
                "stats": dict(self.stats)}

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

    # ---- iteration ------------------------------------------------------------------------------------------------
    def _batch_indices(self):
        return [(self.epoch, b) for b in range(self._consumed, self._len)]

    def _raw_batches(self):
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
            from bioclip_fast.data.dali import DaliDecoder

            if self._dali is None:
                self._dali = DaliDecoder(self)
            batches = self._dali.decode(self._raw_batches())
        else:
            batches = (self._finish_cpu(raw) for raw in self._raw_batches())
        for batch in batches:
            self._consumed += batch.pop("_advance", 1)
            skipped = batch.pop("skipped")
            self.stats["skipped_corrupt"] += len(skipped)
            self.skipped_keys.extend(s.split(":", 1)[0] for s in skipped)
            if "replay" in batch:
                self.stats["skipped_corrupt"] += len(batch["replay"].pop("skipped"))
            if not batch["key"]:
                continue  # eval batch whose samples were all corrupt
            self.stats["batches"] += 1
            self.stats["samples"] += len(batch["key"])
            if "replay" in batch:
                self.stats["replay_samples"] += len(batch["replay"]["key"])
            yield batch
        self._consumed = self._len  # ran to the end (trailing all-corrupt batches included)

    def normalize(self, image_u8: torch.Tensor) -> torch.Tensor:
        x = image_u8.to(self.device, non_blocking=True).float()
        return (x - self._mean_t.to(x.device)) / self._std_t.to(x.device)

    def tokens(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids [B, L] of each text type for class labels.

        Each class is tokenized once, on first sight (ToL-scale label sets are never tokenized up front), into a
        per-type table; a batch is then one gather per text type.
        """
        idx = labels.tolist()
        new = sorted({i for i in idx if i not in self._token_row})
        if new:
            for tt in self.text_types:
                toks = self.tokenizer([self.classes[i].text(tt) for i in new]).long()
                self._token_table[tt] = torch.cat([self._token_table[tt], toks]) if tt in self._token_table else toks
            for i in new:
                self._token_row[i] = len(self._token_row)
        if not idx:
            empty = torch.zeros((0, self._context_length()), dtype=torch.long, device=self.device)
            return {tt: empty for tt in self.text_types}
        rows = torch.as_tensor([self._token_row[i] for i in idx], dtype=torch.long)
        return {tt: self._token_table[tt][rows].to(self.device, non_blocking=True) for tt in self.text_types}

    def _context_length(self) -> int:
        if not hasattr(self, "_ctx_len"):
            self._ctx_len = int(self.tokenizer(["x"]).shape[-1])
        return self._ctx_len

    def _finish_cpu(self, raw: dict[str, Any]) -> dict[str, Any]:
        batch = {"image": self.normalize(raw["image_u8"]), "text": self.tokens(raw["label"]), "key": raw["key"],
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
    (default open_clip's (0.9, 1.0)), `crop_ratio`, `dali_threads`.

    `drop_last` defaults to `train`: training drops the incomplete last batch (equal batches on every rank), eval
    keeps it so every sample is seen exactly once.
    """
    return Loader(shards, batch_size, image_size=image_size, mean=mean, std=std, tokenizer=tokenizer,
                  text_types=text_types, train=train, backend=backend, device=device, rank=rank,
                  world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, num_workers=num_workers,
                  drop_last=drop_last, replay_shards=replay_shards, replay_batch_size=replay_batch_size, **kwargs)
