"""bioclip_fast.fileio: atomic replacement, no temporary left behind, the old file kept when a write fails."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bioclip_fast.fileio import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("durable", [False, True])
def test_writes_replace_and_leave_no_temporary(tmp_path, durable):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"x": 1}, durable=durable, indent=2)
    assert p.read_text() == '{\n  "x": 1\n}\n'
    atomic_write_text(p, "new", durable=durable)
    assert p.read_text() == "new"
    atomic_write_bytes(p, b"\x00\x01", durable=durable)
    assert p.read_bytes() == b"\x00\x01"
    assert json.loads(atomic_write_json(tmp_path / "b.json", [1, 2]).read_text()) == [1, 2]
    assert _leftovers(p.parent) == [] and _leftovers(tmp_path) == []


def test_np_save_writes_the_given_path(tmp_path):
    p = tmp_path / "codes.npy"
    atomic_save(p, lambda tmp: np.save(tmp, np.arange(5)))
    assert np.load(p).tolist() == [0, 1, 2, 3, 4]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["codes.npy"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_save(p, boom)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.txt"]


def test_mode_follows_the_umask_like_a_plain_open(tmp_path):
    """Not mkstemp's 0600: an index or checkpoint on a shared filesystem stays readable to the group."""
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save(tmp_path / "b.npy", lambda tmp: np.save(tmp, np.zeros(2)))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o644, "b.npy": 0o644, "plain.txt": 0o644}


def test_a_temporary_tar_is_never_listed_as_a_shard(tmp_path):
    """A temporary file left by a killed write (no ``finally`` runs on SIGKILL) must not look like a finished file
    to a scan by extension: while a shard is being written, the directory lists only the finished shard."""
    import tarfile

    from bioclip_fast.data.shardspec import resolve_shards

    with tarfile.open(tmp_path / "shard-000000.tar", "w"):
        pass
    listed = []

    def write(tmp):
        with tarfile.open(tmp, "w"):
            pass
        listed.append(resolve_shards(str(tmp_path)))

    atomic_save(tmp_path / "shard-000001.tar", write)
    assert listed == [[str(tmp_path / "shard-000000.tar")]]
