"""The epoch plan: which samples a rank reads in an epoch, and in what order.

Sample order is a pure function of (seed, epoch, rank, position), computed from per-shard sample counts (no sample
list is materialized: locating a batch is a searchsorted over the shards' cumulative counts):

1. the shards are permuted per epoch, and their samples concatenated;
2. rank r takes a contiguous slice (equal lengths when `drop_last`, so every rank has the same number of batches);
3. the slice is read round-robin from 8 equal segments ("lanes", so nearby positions come from distant shards),
   and consecutive blocks of `shuffle_buffer` positions are permuted.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


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
