"""`make_loader`: shards -> fixed-shape training/eval batches, on a DALI (GPU/CPU) or PIL backend.

The loader is four parts: the shard set (`shard_set.ShardSet`: shards, sample counts and classes from the shard
index, each shard's per-sample table loaded on first use), the epoch plan (`epoch_plan.EpochPlan`: which samples a
rank reads in an epoch, in what order, a pure function of (seed, epoch, rank, position)), the batch reader
(`batch_reader.BatchReader`, in the DataLoader worker processes: reads a batch's samples by the byte offsets of the
shard index sidecars, `bioclip-fast index-shards`, and decodes them with `decode_cpu`, or hands the JPEG bytes and
crop boxes to `decode_dali`), and this module (`Loader`: the DataLoader, epoch position and resume state, bad-sample
counts and limit, normalization and caption tokens).

Any batch can be produced independently from its position: the position in the epoch is the whole loader state, a
resumed run sees exactly the remaining samples in the same order, and crops come from per-batch seeded uniforms so
augmentation repeats too.

Bad samples are skipped and counted in `loader.stats` (`skipped_corrupt` in all, `bad_samples` per reason, see
`shard_set.BAD_REASONS`): corrupt image bytes, and in training also shards damaged after they were indexed
(truncated: the samples before the cut are still read; rewritten on a shared filesystem, unreadable, read errors).
In training, a skipped sample is replaced by the nearest earlier sample of the rank's order (outside the batch) so
every batch has exactly `batch_size` samples (distributed contrastive losses gather equal-size batches); in eval
(`train=False`) it is simply left out, so every good sample is seen exactly once (a shard that is no longer the
indexed one stops eval with a DataError).

Like webdataset's `handler=warn_and_continue` a damaged shard is warned about once (one log line naming the shard and
the reason) and training continues; unlike it, a limit stops a run whose data is largely bad: with
`max_bad_fraction=f`, more than f x (the rank's samples per epoch) bad samples met in one epoch raise a DataError
naming the damaged shards. The counts travel back from the worker processes inside each batch (no extra IPC, no host
sync), and a sample is counted once, at its own position, never again when it was only tried as a replacement.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bioclip_fast.data import decode_cpu
from bioclip_fast.data.batch_reader import BadSample, BatchReader, SourceConfig
from bioclip_fast.data.decode_dali import dali_available, dali_import_error
from bioclip_fast.data.epoch_plan import num_batches
from bioclip_fast.data.shard_set import ShardSet
from bioclip_fast.errors import DataError
from bioclip_fast.taxonomy import TEXT_TYPES, Taxon, validate_text_types

log = logging.getLogger(__name__)

STATE_FORMAT = "bioclip_fast/loader-state/1"
BACKENDS = ("auto", "dali", "cpu")
WARN_SHARDS = 100  # damaged shards named one per line; beyond this they are only counted


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
                 crop_scale: tuple[float, float] = decode_cpu.DEFAULT_SCALE,
                 crop_ratio: tuple[float, float] = decode_cpu.DEFAULT_RATIO, dali_threads: int | None = None,
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
            backend = "dali" if self.device.type == "cuda" and dali_available() else "cpu"
        if backend == "dali" and not dali_available():
            raise RuntimeError(f"backend='dali' but NVIDIA DALI cannot be imported: {dali_import_error()}")
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
