"""The batch reader: reads the samples at rank-local positions of an epoch through the shard index's byte offsets
(`os.preadv`, each image with the tar header in front of it, which must name the indexed member), validates and
decodes them (or hands JPEG bytes + crop boxes to DALI), and replaces (train) or drops (eval) bad samples.
Runs in the DataLoader worker processes."""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

from bioclip_fast.data import decode_cpu
from bioclip_fast.data.epoch_plan import EpochPlan
from bioclip_fast.data.index import IMAGE_EXTS
from bioclip_fast.data.shard_set import ShardDamaged, ShardEntries, ShardSet
from bioclip_fast.data.tar import header_mismatch
from bioclip_fast.errors import DataError


class BadSample(NamedTuple):
    """One skipped sample, as reported by a worker in a batch's `skipped` list."""

    key: str
    reason: str  # one of BAD_REASONS
    shard: str  # the shard's path
    detail: str

    def __str__(self) -> str:
        return f"{self.key}: {self.detail}"


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
        why = header_mismatch(data[:512], name, size)
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
            raise decode_cpu.CorruptImage("sample has no image member")
        w, h = decode_cpu.image_size(data)
        c = self.cfg
        box = (decode_cpu.random_resized_crop_box(w, h, u, c.crop_scale, c.crop_ratio) if c.train
               else decode_cpu.center_crop_box(w, h))
        if self.decode:
            return decode_cpu.decode_crop_resize(data, box, c.image_size), box
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
        uniforms = np.random.default_rng([c.seed, *rng_key, 0xC209]).random((n, decode_cpu.UNIFORMS_PER_SLOT))
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
                why = header_mismatch(hv[512 * k:512 * k + 512], _member_name(ents[sl[k]], wl[k]), sz[k])
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
                        raise decode_cpu.CorruptImage("sample has no image member")
                    if not caption_kind and label < 0:
                        raise decode_cpu.CorruptImage("no taxonomy in the sample's text members")
                    wh = decode_cpu.image_size(data)
                    if caption_kind:  # read inside the try: a failing read is replaced like a bad image
                        caption = (self._member(s, e.keys[j] + ".txt", int(e.txt_size[j]), int(e.txt_off[j]))
                                   if e.txt_off[j] >= 0 else b"")
                    if self.decode:  # the PIL path decodes here, so a decoder failure is replaced like any other
                        box = (decode_cpu.random_resized_crop_box(wh[0], wh[1], uniforms[k], c.crop_scale,
                                                               c.crop_ratio) if c.train
                               else decode_cpu.center_crop_box(*wh))
                        images.append(decode_cpu.decode_crop_resize(bytes(data), box, c.image_size))
                    break
                except (decode_cpu.CorruptImage, ShardDamaged) as err:
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
            boxes = decode_cpu.random_resized_crop_boxes(wh_arr[:, 0], wh_arr[:, 1], uniforms[kept_slots],
                                                      c.crop_scale, c.crop_ratio)
        else:
            boxes = np.asarray([decode_cpu.center_crop_box(w, h) for w, h in dims], dtype=np.int64).reshape(-1, 4)
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
