"""Data pipeline: TreeOfLife-layout shards (`shards`), the bundled butterflies (`bundled`), batch loading on DALI
or CPU (`loader`, `dali`, `cpu`) and experience replay (`replay`)."""
from bioclip_fast.data.loader import Loader, make_loader
from bioclip_fast.data.shards import iter_shard_samples, make_shards, read_metadata

__all__ = ["Loader", "make_loader", "make_shards", "iter_shard_samples", "read_metadata"]
