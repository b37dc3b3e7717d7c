"""Data pipeline: TreeOfLife-layout shards (`shards`), the bundled butterflies (`bundled`), the shard index the
loader reads samples through (`index`, built from tar headers walked by `tar`), batch loading (`loader`, made of
`shard_set`, `epoch_plan` and `batch_reader`) with JPEG decode on DALI or the CPU (`decode_dali`, `decode_cpu`), and
experience replay (`replay`).

Names are resolved lazily so `make-shards` and the bundled-data helpers do not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Loader": "bioclip_fast.data.loader",
    "make_loader": "bioclip_fast.data.loader",
    "make_shards": "bioclip_fast.data.shards",
    "iter_shard_samples": "bioclip_fast.data.shards",
    "read_metadata": "bioclip_fast.data.shards",
    "TEXT_TYPES": "bioclip_fast.taxonomy",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bioclip_fast.data' has no attribute {name!r}")
