"""NVIDIA DALI decode + augment stage of the loader: `fn.decoders.image_slice(device="mixed")` (nvJPEG ROI decode),
`fn.resize`, `fn.crop_mirror_normalize`, output straight on the GPU; the same graph with CPU operators when the
loader's device is the CPU (`device_id=None`), which is what CI runs.

Why not `fn.readers.webdataset` + `fn.random_resized_crop`: the reader's shuffling cannot reproduce a given
position, so it cannot give the exact mid-epoch resume, equal per-rank batch counts and corrupt-sample replacement
the loader promises, and its crops differ from the CPU backend's. Reading bytes by offset (the shard index's
sidecars, `bioclip_fast.data.index`, not DALI's `.idx` files) is a few microseconds per sample and runs in the
loader's worker processes (`batch_reader`); they also validate the JPEG structure, so a corrupt sample never reaches
nvJPEG, and compute the crop boxes (torchvision's RandomResizedCrop algorithm) from seeded uniforms. DALI then does
all pixel work: ROI decode (only the crop is decoded), resize, normalize. `benchmarks/bench_decode.py` also measures
the plain `fn.readers.webdataset` reader (through the `.idx` files `make-shards` writes).
"""
from __future__ import annotations

import collections
import functools
import logging
import os
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def dali_import_error() -> str | None:
    """Why NVIDIA DALI cannot be imported here ("ExcType: message"), or None when it can (checked once)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (the loader's `backend="auto"` picks it on a CUDA device)."""
    return dali_import_error() is None


def _build_pipeline(source, *, batch_size: int, size: int, mean, std, device_id: int | None, num_threads: int,
                    seed: int, prefetch: int = 2):
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    def pipe():
        jpegs, anchors, shapes = fn.external_source(source=source, num_outputs=3, batch=True,
                                                    dtype=[types.UINT8, types.FLOAT, types.FLOAT], no_copy=False)
        images = fn.decoders.image_slice(jpegs, anchors, shapes, device=decoder_device, output_type=types.RGB,
                                         normalized_anchor=False, normalized_shape=False, axis_names="WH")
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])

    p = pipe()
    p.build()
    return p


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tensor_list.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


def _inputs(part: dict[str, Any]):
    boxes = part["box"].astype(np.float32)
    buf = part["jpeg"].numpy()
    ends = np.cumsum(part["jpeg_sizes"])
    jpegs = [buf[e - n:e] for e, n in zip(ends, part["jpeg_sizes"])]
    return jpegs, [b[:2].copy() for b in boxes], [b[2:].copy() for b in boxes]


class _Demux:
    """Splits raw batches from the workers into the bio and replay DALI sources and a metadata FIFO.

    Each pipeline's source pulls the next raw batch when its own queue is empty, so prefetching pipelines stay in
    step; outputs come back in raw-batch order, matched with the metadata FIFO. Raw batches with no sample (every
    sample corrupt, eval only) are folded into the next batch's `advance` count.
    """

    def __init__(self, raw_iter, with_replay: bool):
        self.raw = raw_iter
        self.bio: collections.deque = collections.deque()
        self.replay: collections.deque = collections.deque()
        self.meta: collections.deque = collections.deque()
        self.with_replay = with_replay
        self.pending_advance = 0
        self.pending_skipped: list[str] = []

    def _pull(self) -> bool:
        while True:
            try:
                raw = next(self.raw)
            except StopIteration:
                return False
            self.pending_advance += 1
            self.pending_skipped += raw["skipped"]
            if not raw["key"]:
                continue
            bio_in = _inputs(raw)
            self.bio.append(bio_in)
            meta = {"key": raw["key"], "label": raw["label"], "captions": raw.get("captions"),
                    "skipped": self.pending_skipped,
                    "_advance": self.pending_advance, "inputs": bio_in}
            self.pending_advance, self.pending_skipped = 0, []
            if self.with_replay:
                r = raw["replay"]
                rep_in = _inputs(r)
                self.replay.append(rep_in)
                meta["replay"] = {"key": r["key"], "text": r["text"], "skipped": r["skipped"], "inputs": rep_in}
            self.meta.append(meta)
            return True

    def bio_source(self):
        if not self.bio and not self._pull():
            raise StopIteration
        return self.bio.popleft()

    def replay_source(self):
        if not self.replay and not self._pull():
            raise StopIteration
        return self.replay.popleft()


class _Source:
    """Callable handed to `fn.external_source`; forwards to the current epoch's demux."""

    def __init__(self, owner: "DaliDecoder", which: str):
        self.owner, self.which = owner, which

    def __call__(self):
        demux = self.owner.demux
        if demux is None:
            raise StopIteration
        return demux.bio_source() if self.which == "bio" else demux.replay_source()


class DaliDecoder:
    """Decodes the loader's raw batches (JPEG bytes + crop boxes) with DALI; yields finished batches."""

    def __init__(self, loader):
        self.loader = loader
        dev = loader.device
        self.device = dev
        self.device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev.type == "cuda" else None
        self.demux: _Demux | None = None
        self._pipes: tuple | None = None
        self._reusable = False

    def _pipelines(self):
        if self._pipes is None:
            ld = self.loader
            # host threads: Huffman decoding of what the hardware JPEG engine does not take, resize on CPU
            threads = ld.dali_threads or (max(2, min(8, (os.cpu_count() or 2) // 2)) if self.device_id is not None
                                          else max(1, min(4, ld.num_workers or 1)))
            kw = dict(size=ld.image_size, mean=ld.mean, std=ld.std, device_id=self.device_id,
                      num_threads=threads, seed=ld.seed)
            bio = _build_pipeline(_Source(self, "bio"), batch_size=ld.batch_size, **kw)
            rep = (_build_pipeline(_Source(self, "replay"), batch_size=ld.replay_batch_size, **kw)
                   if ld.replay_batch_size else None)
            self._pipes = (bio, rep)
        return self._pipes

    def _cpu_part(self, inputs, keys: list[str], skipped: list[str]):
        from bioclip_fast.data.decode_cpu import CorruptImage, decode_crop_resize

        keep, images = [], []
        for i, (jpeg, anchor, shape) in enumerate(zip(*inputs)):
            box = (int(anchor[0]), int(anchor[1]), int(shape[0]), int(shape[1]))
            try:
                images.append(decode_crop_resize(jpeg.tobytes(), box, self.loader.image_size))
                keep.append(i)
            except CorruptImage as e:
                skipped.append(f"{keys[i]}: {e}")
        s = self.loader.image_size
        arr = np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)
        return self.loader.normalize(torch.from_numpy(arr).permute(0, 3, 1, 2)), keep

    def _cpu_batch(self, meta: dict[str, Any]) -> dict[str, Any]:
        ld = self.loader
        skipped = list(meta["skipped"])
        image, keep = self._cpu_part(meta["inputs"], meta["key"], skipped)
        label = meta["label"][keep]
        caps = meta.get("captions")
        batch = {"image": image, "text": ld.tokens(label, [caps[i] for i in keep] if caps is not None else None),
                 "key": [meta["key"][i] for i in keep],
                 "label": label.to(self.device), "skipped": skipped, "_advance": meta["_advance"]}
        if "replay" in meta:
            r = meta["replay"]
            rskipped = list(r["skipped"])
            rimage, rkeep = self._cpu_part(r["inputs"], r["key"], rskipped)
            batch["replay"] = {"image": rimage, "text": r["text"][rkeep].to(self.device),
                               "key": [r["key"][i] for i in rkeep], "skipped": rskipped}
        return batch

    def decode(self, raw_batches):
        # Reuse the pipelines only after a pass that ran to its end (and was reset): an abandoned pass leaves
        # prefetched iterations inside DALI.
        if not self._reusable:
            self._pipes = None
        self._reusable = False
        self.demux = _Demux(iter(raw_batches), with_replay=self.loader.replay_batch_size > 0)
        bio_pipe, rep_pipe = self._pipelines()
        ld = self.loader
        try:
            while True:
                try:
                    (images,) = bio_pipe.run()
                    replay_images = rep_pipe.run()[0] if rep_pipe is not None else None
                except StopIteration:
                    ld.stats["skipped_corrupt"] += len(self.demux.pending_skipped)  # trailing all-corrupt batches
                    self._reusable = self._end_of_pass(bio_pipe, rep_pipe)
                    return
                except RuntimeError as err:
                    # An image passed the host checks but the decoder rejected it. Decode this batch on the CPU
                    # (dropping what fails there too, so this one batch may be short), re-queue the prefetched
                    # batches, rebuild the pipelines.
                    if not self.demux.meta:
                        raise
                    msg = " ".join(str(err).split())
                    msg = msg.split("encountered:", 1)[-1].strip()[:300]
                    log.warning("DALI failed on a batch, decoding it on the CPU instead: %s", msg)
                    meta = self.demux.meta.popleft()
                    batch = self._cpu_batch(meta)
                    self.demux.bio = collections.deque(m["inputs"] for m in self.demux.meta)
                    self.demux.replay = collections.deque(m["replay"]["inputs"] for m in self.demux.meta
                                                          if "replay" in m)
                    self._pipes = None
                    bio_pipe, rep_pipe = self._pipelines()
                    ld.stats["dali_fallback_batches"] = ld.stats.get("dali_fallback_batches", 0) + 1
                    yield batch
                    continue
                meta = self.demux.meta.popleft()
                batch = {"image": _to_torch(images, self.device),
                         "text": ld.tokens(meta["label"], meta.get("captions")),
                         "key": meta["key"], "label": meta["label"].to(self.device), "skipped": meta["skipped"],
                         "_advance": meta["_advance"]}
                if replay_images is not None:
                    r = meta["replay"]
                    batch["replay"] = {"image": _to_torch(replay_images, self.device),
                                       "text": r["text"].to(self.device), "key": r["key"], "skipped": r["skipped"]}
                yield batch
        finally:
            self.demux = None

    @staticmethod
    def _end_of_pass(bio_pipe, rep_pipe) -> bool:
        """Reset the pipelines for the next epoch; False if the replay pipeline is not at its end too."""
        if rep_pipe is not None:
            try:
                rep_pipe.run()
                return False
            except StopIteration:
                rep_pipe.reset()
        bio_pipe.reset()
        return True
