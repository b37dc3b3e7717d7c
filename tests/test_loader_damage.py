"""Shards damaged after they were indexed (truncated on a shared filesystem, a JPEG payload overwritten, a shard
shortened while the loader holds its table): training skips and counts the bad samples (per reason, across worker
processes), keeps every batch full, warns once per damaged shard, and stops with one line only past
--max-bad-fraction. Foreign shards (plain tarfile, no manifest of ours), indexed with `bioclip-fast index-shards`."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bioclip_fast.cli import main
from bioclip_fast.data import make_loader
from bioclip_fast.data.decode_dali import dali_import_error
from bioclip_fast.data.index import ShardIndex, sidecar_path
from bioclip_fast.data.synthetic import write_tol_shards
from bioclip_fast.errors import DataError

N_SHARDS, PER_SHARD, BATCH = 4, 16, 16
TRAIN = ["--model", "bioclip-micro", "--batch-size", str(BATCH), "--max-minutes", "none", "--schedule-clock",
         "steps", "--warmup-steps", "1", "--threads", "1", "--no-eval-at-end", "--no-progress", "--engine", "torch",
         "--precision", "fp32", "--save-every", "0", "--shuffle-buffer", "16"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage") / "clean"
    write_tol_shards(root, N_SHARDS, PER_SHARD)
    assert main(["index-shards", str(root), "--no-progress"]) == 0
    return root


def _damaged(indexed: Path, dest: Path, *, truncate: bool = True, corrupt: bool = True, rewrite: bool = False
             ) -> dict:
    """A copy of the indexed shards (index included), then: shard 2 cut to a third of its size (its samples wholly
    before the cut stay usable: `past_eof` counts the others), the JPEG payload of sample 5 of shard 1 overwritten
    with noise (its header and the tar still intact), and with `rewrite` shard 0 replaced by another, smaller shard
    under the same name (unusable as indexed: `shard_changed`)."""
    shutil.copytree(indexed, dest)
    shards = sorted(dest.glob("*.tar"))
    out = {"dir": dest, "truncated": str(shards[2]), "corrupt": str(shards[1]), "rewritten": str(shards[0])}
    if truncate:
        cut = shards[2].stat().st_size // 3
        os.truncate(shards[2], cut)
        idx = ShardIndex.load(sidecar_path(dest, shards[2].name))
        out["past_eof"] = int(np.sum(idx.img_off + idx.img_size > cut))
        assert 0 < out["past_eof"] < PER_SHARD
    if rewrite:
        other = write_tol_shards(dest / "other", 1, PER_SHARD // 2, seed=7)[0]
        assert other.stat().st_size < shards[0].stat().st_size
        os.replace(other, shards[0])
        (dest / "other").rmdir()
    if corrupt:
        idx = ShardIndex.load(sidecar_path(dest, shards[1].name))
        off, size = int(idx.img_off[5]), int(idx.img_size[5])
        buf = bytearray(shards[1].read_bytes())
        buf[off + 20:off + size - 2] = np.random.default_rng(0).integers(0, 256, size - 22, np.uint8).tobytes()
        shards[1].write_bytes(bytes(buf))
        out["corrupt_key"] = idx.keys[5]
    return out


def _damage_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if "damaged shard" in x]


def test_training_skips_and_counts_damaged_shards_across_workers(indexed, tmp_path):
    """One epoch (4 steps x 16) with 2 worker processes: the rewritten shard's 16 samples, the truncated shard's
    samples past the cut and the corrupt JPEG are skipped, each counted once by reason; every batch is full; each
    damaged shard is named once on stderr; the metrics, the summary and results.json carry the counts."""
    d = _damaged(indexed, tmp_path / "shards", rewrite=True)
    out = tmp_path / "run"
    cap = subprocess.run([sys.executable, "-m", "bioclip_fast", "train", *TRAIN, "--data", str(d["dir"]),
                          "--max-steps", "4", "--num-workers", "2", "--max-bad-fraction", "0.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert cap.returncode == 0, cap.stderr[-3000:]
    lines = _damage_lines(cap.stderr)
    assert len(lines) == 3, cap.stderr[-3000:]
    rewritten = [x for x in lines if d["rewritten"] in x]
    assert len(rewritten) == 1 and "changed since it was indexed" in rewritten[0]
    truncated = [x for x in lines if d["truncated"] in x]
    assert len(truncated) == 1 and "runs past the end of the file" in truncated[0]
    assert len([x for x in lines if d["corrupt"] in x]) == 1
    k = d["past_eof"]
    want = {"shard_changed": PER_SHARD, "past_eof": k, "corrupt_image": 1}
    assert (f"bad samples : {PER_SHARD + k + 1} skipped and replaced (corrupt_image 1, past_eof {k}, shard_changed "
            f"{PER_SHARD}); 3 damaged shard(s)") in cap.stdout
    res = json.loads((out / "results.json").read_text())
    st = res["loader_stats"]
    assert st["bad_samples"] == want
    assert st["skipped_corrupt"] == PER_SHARD + k + 1 and st["bad_shards"] == 3
    assert st["samples"] == 4 * BATCH and st["batches"] == 4  # full batches: bad samples were replaced
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["bad_samples"] == PER_SHARD + k + 1 and recs[-1]["bad_shards"] == 3
    assert recs[-1]["bad_by_reason"] == want
    assert [r["bad_samples"] for r in recs] == sorted(r["bad_samples"] for r in recs)  # running counts


def test_too_many_bad_samples_stop_in_one_line(indexed, tmp_path, capsys):
    """The default --max-bad-fraction (0.01) with a quarter of the data unreadable: one line naming the shard, exit
    2, no traceback; an invalid fraction is refused before any work."""
    d = _damaged(indexed, tmp_path / "shards", corrupt=False)
    out = tmp_path / "run"
    rc = main(["train", *TRAIN, "--data", str(d["dir"]), "--max-steps", "4", "--num-workers", "2",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("bioclip-fast train: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "max_bad_fraction=0.01" in errors[0] and d["truncated"] in errors[0] and "past_eof" in errors[0]
    # the first batch passed the limit (its bad samples replaced): that step ran, was checkpointed, then the stop
    assert "Stopped after step 1; checkpoint" in errors[0] and "continue with --resume auto" in errors[0]
    assert (out / "checkpoints" / "step_00000001").is_dir() and not (out / "model.pt").exists()

    bad_out = tmp_path / "never"
    assert main(["train", *TRAIN, "--data", str(d["dir"]), "--max-bad-fraction", "1.5", "--out", str(bad_out)]) == 2
    err = capsys.readouterr().err
    assert "max_bad_fraction must be in [0, 1]" in err and "Traceback" not in err
    assert not bad_out.exists()


@pytest.mark.parametrize("backend", ["cpu", pytest.param("dali", marks=pytest.mark.skipif(
    dali_import_error() is not None, reason=f"DALI unavailable: {dali_import_error()}"))])
def test_shard_shortened_while_in_use_and_resume_keeps_counts(indexed, tmp_path, caplog, backend):
    """The loader already holds shard 2's table when the file is cut: its members past the new end are short reads
    (past_eof), never decoded from stale buffer bytes; the samples before the cut are still used. The counts and the
    damaged-shard list survive a state_dict round trip (no second warning after a resume)."""
    d = _damaged(indexed, tmp_path / "shards", truncate=False, corrupt=False)
    victim = Path(d["truncated"])
    kw = dict(image_size=32, num_workers=0, seed=3, shuffle_buffer=16, max_bad_fraction=None, backend=backend)
    ld = make_loader(str(d["dir"]), BATCH, **kw)
    idx = ShardIndex.load(sidecar_path(d["dir"], victim.name))
    for s in range(N_SHARDS):
        ld.source.entries(s)  # every table cached, as after some steps of a run
    cut = int(idx.img_off[10])  # samples 0-9 of the shard stay whole, 10-15 lose their image
    os.truncate(victim, cut)
    with caplog.at_level("WARNING", logger="bioclip_fast"):
        batches = list(ld)
    assert all(len(b["key"]) == BATCH for b in batches) and len(batches) == N_SHARDS
    keys = [k for b in batches for k in b["key"]]
    lost = set(idx.keys[10:])
    assert ld.stats["bad_samples"] == {"past_eof": len(lost)} and ld.stats["bad_shards"] == 1
    assert not lost & set(keys) and set(idx.keys[:10]) <= set(keys)
    assert sum(str(victim) in r.getMessage() for r in caplog.records) == 1
    assert "runs past the end of the file" in ld.bad_shards[str(victim)]

    state = ld.state_dict()
    again = make_loader(str(d["dir"]), BATCH, **kw)
    again.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint's loader state is plain data
    assert again.stats["bad_samples"] == {"past_eof": len(lost)} and again.bad_shards == ld.bad_shards


def test_read_errors_are_counted_per_sample_and_the_limit_names_the_shard(indexed, monkeypatch, caplog):
    """EIO on every read of one shard (a failing disk or network mount; injected at the system call): its samples
    are skipped as read_error and replaced, the shard is warned about once; with a limit below the damaged share
    (16 of 64 > 0.1) iterating raises one DataError naming it."""
    victim = str(sorted(indexed.glob("*.tar"))[3])
    real = os.preadv

    def preadv(fd, buffers, offset):
        if os.readlink(f"/proc/self/fd/{fd}") == victim:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    kw = dict(image_size=32, num_workers=0, seed=5, shuffle_buffer=16)
    ld = make_loader(str(indexed), BATCH, **kw)
    with caplog.at_level("WARNING", logger="bioclip_fast"):
        batches = list(ld)
    assert [len(b["key"]) for b in batches] == [BATCH] * N_SHARDS
    assert ld.stats["bad_samples"] == {"read_error": PER_SHARD} and list(ld.bad_shards) == [victim]
    warned = [r.getMessage() for r in caplog.records if victim in r.getMessage()]
    assert len(warned) == 1 and "Input/output error" in warned[0]

    strict = make_loader(str(indexed), BATCH, max_bad_fraction=0.1, **kw)
    with pytest.raises(DataError, match=r"bad samples in epoch 0 on rank 0, more than max_bad_fraction=0\.1 of "
                                        r"the 64 samples per epoch \(read_error \d+\); damaged shard\(s\): .*000003"):
        list(strict)


def test_a_data_stop_mid_run_checkpoints_and_resumes_after_repair(indexed, tmp_path):
    """A shard cut to nothing during step 2 (the loader holds its table): batch 3 passes the limit; its bad samples
    were replaced, so step 3 runs, then the run stops (the flag rides in the step's loss all-reduce, so every rank
    would stop after the same step), writes a checkpoint and raises one DataError saying so; with the shard
    restored, --resume auto continues from step 3 to the end."""
    from bioclip_fast.train import checkpoint as ckpt
    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.trainer import Trainer

    d = _damaged(indexed, tmp_path / "shards", truncate=False, corrupt=False)
    victim = Path(d["truncated"])
    intact = victim.read_bytes()
    cfg = {"model": "bioclip-micro", "precision": "fp32", "engine": "torch", "lr": 1e-3, "warmup_steps": 1,
           "max_steps": 6, "schedule_clock": "steps", "progress": False, "eval_at_end": False, "batch_size": BATCH,
           "num_workers": 0, "threads": 1, "save_every": 0, "shuffle_buffer": 16, "data": [str(d["dir"])],
           "out": str(tmp_path / "run")}
    run = Trainer(resolve_config(cfg))
    real_step = run.train_step

    def step_then_cut(inputs):
        out = real_step(inputs)
        if run.step == 1:  # inside step 2 (0-based 1)
            os.truncate(victim, 0)
        return out

    run.train_step = step_then_cut
    with pytest.raises(DataError, match=r"past_eof .* Stopped after step 3; checkpoint .*step_0*3 written; after "
                                        r"repairing the data continue with --resume auto"):
        run.fit()
    assert ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / ckpt.ckpt_name(3)) is None
    bad = dict(run.loader.stats["bad_samples"])
    assert list(bad) == ["past_eof"] and bad["past_eof"] > 0
    run.loader.close()

    victim.write_bytes(intact)
    resumed = Trainer(resolve_config({**cfg, "resume": "auto"}))
    assert resumed.step == 3
    summary = resumed.fit()  # the counts so far come with the checkpoint; the repaired shard adds none
    assert summary["steps"] == 6 and summary["loader_stats"]["bad_samples"] == bad
    assert summary["loader_stats"]["samples"] == 6 * BATCH  # steps 1-3 from the checkpoint, 4-6 after the resume


def _caption_shards(root: Path, n: int, per: int) -> list[str]:
    """LAION-like replay shards (.jpg + .txt), written with plain tarfile, no index."""
    import io
    import tarfile

    from bioclip_fast.data.synthetic import jpeg_bytes

    root.mkdir(parents=True)
    out = []
    for i in range(n):
        path = root / f"laion-{i:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for k in range(per):
                for name, data in ((f"{i:03d}{k:05d}.jpg", jpeg_bytes(k)), (f"{i:03d}{k:05d}.txt", b"a photo.")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        out.append(str(path))
    return out


def test_replay_shard_damage_is_counted_apart_and_limited(indexed, tmp_path):
    """A replay shard (no index: indexed from its headers at start) truncated afterwards: its samples are skipped as
    shard_changed, counted in replay_bad_samples, replaced (replay parts stay full); the limit applies to the replay
    stream on its own."""
    replay = _caption_shards(tmp_path / "replay", 2, PER_SHARD)
    kw = dict(image_size=32, num_workers=0, seed=1, shuffle_buffer=16, replay_shards=replay, replay_batch_size=8)
    ld = make_loader(str(indexed), BATCH, max_bad_fraction=None, **kw)
    strict = make_loader(str(indexed), BATCH, max_bad_fraction=0.2, **kw)
    os.truncate(replay[1], 4096)
    batches = list(ld)  # 4 steps x 8 replay samples: the 32 replay samples once
    assert [len(b["replay"]["key"]) for b in batches] == [8] * N_SHARDS
    assert not any(k.startswith("001") for b in batches for k in b["replay"]["key"])
    assert ld.stats["replay_bad_samples"] == PER_SHARD and ld.stats["bad_samples"] == {"shard_changed": PER_SHARD}
    assert list(ld.bad_shards) == [replay[1]]

    with pytest.raises(DataError, match=r"bad replay samples in epoch 0 .* of the 32 samples per epoch"):
        list(strict)


@pytest.mark.distributed
def test_two_ranks_stop_after_the_same_step_with_one_checkpoint(indexed, tmp_path):
    """torchrun, 2 ranks (gloo, plain torch engine): whichever rank's slice holds the truncated shard passes the limit;
    the flag rides in the step's loss all-reduce, so both ranks stop after the same step (no hang in a collective),
    write that checkpoint together, and the job's error names the damaged shard."""
    import socket

    from bioclip_fast.train import checkpoint as ckpt

    d = _damaged(indexed, tmp_path / "shards", corrupt=False)
    out = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "bioclip_fast", "train", *TRAIN, "--data", str(d["dir"]),
           "--max-steps", "4", "--num-workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    err = proc.stdout + proc.stderr
    # (torchrun adds its own ChildFailedError traceback; none comes from our code)
    assert proc.returncode != 0 and not re.search(r'bioclip_fast/[\w/]+\.py", line', err), err[-5000:]
    # torchrun's ChildFailedError block quotes each rank's line (from its error file) after "traceback : "
    prefix = "bioclip-fast train: error:"
    quoted = re.findall(r"traceback : " + re.escape(prefix), err)
    assert 1 <= len(quoted) <= 2, err[-5000:]
    own = re.sub(r"traceback : " + re.escape(prefix), "traceback : ", err)
    # the ranks print at the same moment: their lines may share one line of the combined stderr
    # the rank whose data stopped the run prints its line; the other rank's short line may be cut off by torchrun's
    # SIGTERM once the first rank has exited (the error files in the block above still carry it)
    lines = [prefix + x for x in own.split(prefix)[1:]]
    assert 1 <= len(lines) <= 2, err[-5000:]
    assert sum(d["truncated"] in x and "past_eof" in x for x in lines) >= 1
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    stop = steps[-1]
    # rank 0's own count, and the sum over both ranks (which includes the samples that stopped the run)
    assert recs[-1]["bad_samples_all_ranks"] >= max(1, recs[-1]["bad_samples"])
    assert steps == list(range(1, stop + 1)) and stop < 4
    assert all(f"Stopped after step {stop}; checkpoint" in x for x in lines), lines
    assert ckpt.verify_checkpoint(out / "checkpoints" / ckpt.ckpt_name(stop)) is None


def _same_size_shards(root: Path, n: int = 3) -> list[Path]:
    """n shards of PER_SHARD samples, one species each, the same JPEG sizes and key lengths: every shard file has the
    same size (as TreeOfLife shards of one layout often do), so copying one over another keeps its size."""
    from bioclip_fast.data.synthetic import TAXA, jpeg_bytes, write_tol_shard

    root.mkdir(parents=True)
    jpgs = [jpeg_bytes(k) for k in range(PER_SHARD)]
    paths = [write_tol_shard(root / f"shard-{i:06d}.tar", [{"key": f"s{i}_{k:04d}", "taxon": TAXA[i], "jpg": jpgs[k]}
                                                            for k in range(PER_SHARD)]) for i in range(n)]
    assert len({p.stat().st_size for p in paths}) == 1
    assert main(["index-shards", str(root), "--no-progress"]) == 0
    return paths


def test_a_shard_rewritten_with_the_same_size_is_caught_per_sample(tmp_path, capsys):
    """Shard 2 copied over shard 0 while the loader holds shard 0's table (same size, same offsets): each image is
    read with the tar header in front of it, which now names another member, so shard 0's samples are skipped as
    shard_changed and replaced, never handed out under shard 0's keys and labels; eval stops with one DataError."""
    paths = _same_size_shards(tmp_path / "shards")
    capsys.readouterr()
    kw = dict(image_size=32, num_workers=0, seed=2, shuffle_buffer=16, max_bad_fraction=None)
    ld = make_loader(str(tmp_path / "shards"), BATCH, **kw)
    first = [k for b in ld for k in b["key"]]
    assert len(first) == 3 * PER_SHARD and not ld.stats["bad_samples"]
    shutil.copyfile(paths[2], paths[0])  # in place: the loader's open descriptors see the new bytes
    assert paths[0].stat().st_size == paths[1].stat().st_size
    batches = list(ld)
    keys = [k for b in batches for k in b["key"]]
    assert [len(b["key"]) for b in batches] == [BATCH] * 3  # bad samples replaced
    assert not [k for k in keys if k.startswith("s0_")]  # no image of shard 2 under a shard-0 key (mislabelled)
    from bioclip_fast.data.synthetic import TAXA

    for b in batches:  # every label is its key's species
        assert [ld.classes[lab].label for lab in b["label"].tolist()] == [TAXA[int(k[1])].label for k in b["key"]]
    assert ld.stats["bad_samples"] == {"shard_changed": PER_SHARD} and list(ld.bad_shards) == [str(paths[0])]
    assert "the index names 's0_" in ld.bad_shards[str(paths[0])]

    ev = make_loader(str(tmp_path / "shards"), BATCH, train=False, **kw)
    with pytest.raises(DataError, match=r"shard-000000\.tar changed since it was indexed .*re-run `bioclip-fast "
                                        r"index-shards`"):
        list(ev)


def test_resume_refuses_a_shard_rewritten_with_the_same_size(tmp_path, capsys):
    """`--resume auto` after another shard was copied over one (same name, size and sample count; the index not
    re-run): refused in one line naming data_files. Accepting it on purpose (--allow-changed data_files) resumes at
    the checkpoint's position, and the rewritten shard's samples are then skipped as shard_changed."""
    paths = _same_size_shards(tmp_path / "shards")
    out = tmp_path / "run"
    base = ["train", *TRAIN, "--data", str(tmp_path / "shards"), "--num-workers", "0", "--out", str(out),
            "--max-bad-fraction", "none"]
    assert main([*base, "--max-steps", "3", "--save-every", "3"]) == 0
    capsys.readouterr()
    shutil.copyfile(paths[2], paths[0])
    assert main([*base, "--max-steps", "6", "--resume", "auto", "--allow-changed", "max_steps"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("bioclip-fast train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "data_files (shard files were rewritten" in lines[0] and "--allow-changed data_files" in lines[0]
    assert "data (shard names" not in lines[0]  # names, counts, sizes and classes are the same

    assert main([*base, "--max-steps", "6", "--resume", "auto", "--allow-changed", "max_steps", "data_files"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["loader_stats"]["bad_samples"] == {"shard_changed": PER_SHARD}  # epoch 1: shard 0's 16 samples
    assert res["loader_stats"]["samples"] == 6 * BATCH
