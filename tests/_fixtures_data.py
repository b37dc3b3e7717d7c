"""Foreign (manifest-less) TreeOfLife-layout shard fixtures for the data tests; the generator lives in
`bioclip_fast.data.synthetic` so the benchmarks use the same layout."""
from bioclip_fast.data.synthetic import TAXA, jpeg_bytes, write_tol_shard, write_tol_shards  # noqa: F401
