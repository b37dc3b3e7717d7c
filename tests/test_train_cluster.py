"""Cluster jobs as operators run them (issue 20), two processes under torchrun (gloo; DeepSpeed ZeRO-2 or plain torch):

- a checkpoint without its manifest is incomplete: under ZeRO-2 every rank skips it and resumes from the previous
  one, though rank 0's own files would load (rank 1's are truncated);
- training steps raise no warning (the deprecated torch.distributed.nn all-gather is gone) and the all-gather's
  gradients equal those of the function it replaces, bit for bit;
- bad samples and damaged shards of every rank reach the summary and results.json;
- one rank failing prints one error line (that rank's, naming it); the other stops with one short line naming the
  failed rank; no gloo traceback; torchrun's root cause is the failing rank's line;
- one run per --out: a second run is refused naming the holder; workers whose launcher died stop with a checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE = {"model": "bioclip-micro", "precision": "fp32", "engine": "torch", "lr": 1e-3, "warmup_steps": 2,
        "schedule_clock": "steps", "max_minutes": None, "progress": False, "eval_at_end": False, "batch_size": 32,
        "threads": 1, "num_workers": 0, "save_every": 0, "crop_scale": [0.5, 1.0]}
CLI = ["--model", "bioclip-micro", "--batch-size", "32", "--max-minutes", "none", "--schedule-clock", "steps",
       "--warmup-steps", "1", "--num-workers", "0", "--threads", "1", "--no-eval-at-end", "--no-progress",
       "--engine", "torch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "REPO_ROOT": str(REPO),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), str(script), *args]


def _run(tmp_path: Path, source: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run(_torchrun(script, *args), env=_env(), capture_output=True, text=True, timeout=timeout)


WORKER_OK = """
    import json, os, shutil, sys, warnings
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from bioclip_fast.train import checkpoint as ckpt
    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.trainer import Trainer

    out, base = Path(sys.argv[1]), json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    report = {}

    # 1. item 3, ZeRO-2: step_2 lost its manifest and rank 1's trainer state is truncated; rank 0's files alone
    # would load
    ck = {**base, "out": str(out / "ck"), "max_steps": 2, "save_every": 1, "keep_checkpoints": 3,
          "engine": "deepspeed", "zero_stage": 2}
    first = Trainer(resolve_config(ck))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training steps, checkpoints and the final export warn about nothing ...
        from bioclip_fast.train.engine import quiet_deepspeed_deprecations
        quiet_deepspeed_deprecations()  # ... but DeepSpeed's own calls of torch's renamed collectives (silenced)
        first.fit()
    dist.barrier()
    if rank == 0:
        d = out / "ck" / "checkpoints" / ckpt.ckpt_name(2)
        (d / ckpt.MANIFEST).unlink()
        p = d / "trainer_rank1.pt"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    dist.barrier()
    again = Trainer(resolve_config({**ck, "resume": "auto"}))
    report["resumed_step"] = again.step

    # 2. item 4: the all-gather's gradients equal the deprecated torch.distributed.nn one's, bit for bit
    from bioclip_fast.distributed import all_gather_with_grad
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 7, generator=g, requires_grad=True)
    w = torch.randn(10, 7, generator=torch.Generator().manual_seed(99))
    (all_gather_with_grad(x) * w).sin().sum().backward()
    ours = x.grad.clone()
    x.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.distributed.nn.functional import all_gather
        (torch.cat(all_gather(x), 0) * w).sin().sum().backward()
    report["grad_equal"] = bool(torch.equal(ours, x.grad))
    # the NCCL branch (reduce-scatter) gives the gloo branch's numbers (two ranks: one addition, order-free)
    from bioclip_fast.distributed import all_to_all_sum, reduce_scatter_sum
    grad = torch.randn(10, 7, generator=g)
    report["scatter_equal"] = bool(torch.equal(reduce_scatter_sum(grad, 2), all_to_all_sum(grad, 2)))

    # 3. item 5: three of the seven shards are deleted after the loader indexed them
    data = out / "shards"
    if rank == 0:
        from bioclip_fast.data.bundled import default_shards
        shutil.copytree(Path(default_shards("train")[0]).parent, data)
    dist.barrier()
    tars = sorted(str(p) for p in data.glob("shard-*.tar"))
    run = Trainer(resolve_config({**base, "out": str(out / "bad"), "max_steps": 3, "data": tars,
                                  "preset": "butterflies", "max_bad_fraction": None}))
    dist.barrier()
    if rank == 0:
        for t in tars[:3]:
            os.unlink(t)
    dist.barrier()
    summary = run.fit()
    report["local_bad"] = run.loader.stats["skipped_corrupt"]
    report["local_reasons"] = dict(run.loader.stats["bad_samples"])
    report["local_shards"] = sorted(run.loader.bad_shards)
    (out / f"report{rank}.json").write_text(json.dumps(report))
"""


@pytest.mark.distributed
def test_two_ranks_manifestless_checkpoint_warnings_gradients_and_bad_samples(tmp_path):
    proc = _run(tmp_path, WORKER_OK, str(tmp_path), json.dumps(BASE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reps = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    # item 3: both ranks resumed from step 1, and step 2 was named with its reason
    assert [r["resumed_step"] for r in reps] == [1, 1], reps
    assert "step_00000002: manifest.json is missing" in proc.stderr, proc.stderr[-3000:]
    # item 4: the same gradients as torch.distributed.nn's all_gather, and no warning in the training steps
    assert [r["grad_equal"] for r in reps] == [True, True] and [r["scatter_equal"] for r in reps] == [True, True]
    assert "FutureWarning" not in proc.stderr and "is deprecated" not in proc.stderr, proc.stderr[-3000:]
    # item 5: every rank's bad samples and damaged shards are in results.json
    res = json.loads((tmp_path / "bad" / "results.json").read_text())["loader_stats"]
    assert all(r["local_bad"] > 0 for r in reps), reps  # both ranks met the deleted shards
    assert res["skipped_corrupt"] == sum(r["local_bad"] for r in reps)
    assert [p["skipped_corrupt"] for p in res["per_rank"]] == [r["local_bad"] for r in reps]
    reasons = {}
    for r in reps:
        for k, v in r["local_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert res["bad_samples"] == reasons
    shards = sorted(set(reps[0]["local_shards"]) | set(reps[1]["local_shards"]))
    assert sorted(res["damaged_shards"]) == shards and res["bad_shards"] == len(shards) >= 1


WORKER_FAIL = """
    import errno, os, sys
    from bioclip_fast.cli import main
    from bioclip_fast.train.trainer import Trainer

    real = Trainer.batch_inputs

    def failing(self, batch, step):  # rank 1's disk goes away in step 2
        if int(os.environ["RANK"]) == 1 and step == 1:
            raise OSError(errno.EIO, "Input/output error", "/scratch/node7/cache.bin")
        return real(self, batch, step)

    Trainer.batch_inputs = failing
    sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.distributed
def test_one_rank_failing_gives_one_error_line_for_the_job(tmp_path):
    out = tmp_path / "run"
    proc = _run(tmp_path, WORKER_FAIL, *CLI, "--max-steps", "4", "--out", str(out))
    err = proc.stderr
    assert proc.returncode != 0
    errors = [x for x in err.splitlines() if x.startswith("bioclip-fast train: error:")]
    assert errors == ["bioclip-fast train: error: rank 1: /scratch/node7/cache.bin: Input/output error (EIO)"], err
    # rank 0 says why it stopped in one short line, unless torchrun's SIGTERM (sent as soon as rank 1 exits) ends it
    # first, between the failed collective and that line: then it is quiet
    stopped = [x for x in err.splitlines() if x.startswith("bioclip-fast train: stopped:")]
    assert len(stopped) <= 1 and all("rank 1 failed" in x for x in stopped), err
    assert "GLHF" not in err and "Connection closed" not in err and "pair.cc" not in err, err
    assert err.count("Traceback (most recent call last)") == 1, err  # torchrun's own, raising ChildFailedError
    # torchrun's block shows rank 1's line (its error file) instead of "To enable traceback see ..."
    block = err[err.index("ChildFailedError"):]
    assert "traceback : bioclip-fast train: error: rank 1: /scratch/node7/cache.bin" in block, block
    assert "To enable traceback" not in block, block


# ------------------------------------------------------------------------------------------------ item 1: --out lock
def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path):
    from bioclip_fast.train import runlock
    from bioclip_fast.train.config import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    lock = out / runlock.LOCK_NAME
    # a holder on another host (shared filesystem) that refreshes its lease: refused, naming it
    lock.write_text(json.dumps({"host": "node-17", "boot_id": "x", "pid": 4242, "started": "2026-01-01T00:00:00Z"}))
    with pytest.raises(ConfigError, match=r"in use by another run \(host node-17, pid 4242, started 2026-01-01"):
        runlock.check(out)
    with pytest.raises(ConfigError, match="node-17"):
        runlock.acquire(out)
    # ... whose lease ran out: taken over
    old = time.time() - runlock.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    runlock.check(out)
    path, notes = runlock.acquire(out)
    assert len(notes) == 1 and "took over" in notes[0] and "node-17" in notes[0], notes
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    # the holder's heartbeat keeps the lease fresh
    os.utime(lock, (old, old))
    assert runlock.refresh() >= 1 and time.time() - lock.stat().st_mtime < 60
    runlock.release(path)
    assert not lock.exists()
    # same host: a live process holds it -> refused; once it is gone (or its pid reused) -> taken over
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({**runlock.my_identity(), "pid": sleeper.pid,
                                    "pid_start": runlock.process_start(sleeper.pid)}))
        with pytest.raises(ConfigError, match=f"pid {sleeper.pid} is running"):
            runlock.acquire(out)
        lock.write_text(json.dumps({**runlock.my_identity(), "pid": sleeper.pid, "pid_start": "1"}))
        path, notes = runlock.acquire(out)
        assert f"pid {sleeper.pid} is another process now" in notes[0], notes
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({**runlock.my_identity(), "pid": sleeper.pid}))
    path, notes = runlock.acquire(out)
    assert f"pid {sleeper.pid} is no longer running" in notes[0], notes
    runlock.release(path)


def _worker_pids(marker: str, exclude: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != exclude:
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.distributed
def test_one_run_per_out_and_workers_stop_when_their_launcher_dies(tmp_path, capsys):
    """A 2-rank job owns --out: a second run is refused in one line naming the holder. The scheduler then SIGKILLs
    torchrun (the requeue case): the orphaned workers notice, agree to stop after the same step, write a verified
    checkpoint, exit and free --out."""
    from bioclip_fast.cli import main
    from bioclip_fast.train import checkpoint as ckpt
    from bioclip_fast.train import runlock

    out = tmp_path / "run"
    script = tmp_path / "train_worker.py"
    script.write_text("import sys\nfrom bioclip_fast.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))\n")
    log = tmp_path / "job.log"
    with log.open("w") as f:
        agent = subprocess.Popen(_torchrun(script, *CLI, "--max-steps", "100000", "--out", str(out)), env=_env(),
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        holder = json.loads((out / runlock.LOCK_NAME).read_text())
        capsys.readouterr()
        assert main(["train", *CLI, "--max-steps", "5", "--out", str(out), "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("bioclip-fast train: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "is in use by another run" in lines[0] and f"pid {holder['pid']}" in lines[0], lines[0]
        assert f"host {socket.gethostname()}" in lines[0]

        workers = _worker_pids(str(script), exclude=agent.pid)
        assert len(workers) == 2 and holder["pid"] in workers, (workers, holder)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 120
        while _worker_pids(str(script), exclude=agent.pid):
            assert time.monotonic() < deadline, "workers still running after their launcher died"
            time.sleep(0.2)
    finally:
        if agent.poll() is None:
            agent.kill()
        for pid in _worker_pids(str(script), exclude=agent.pid):
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "stopped by the launcher's exit" in text, text[-3000:]
    ckpts = ckpt.list_checkpoints(out / "checkpoints")
    assert ckpts and ckpt.verify_checkpoint(ckpts[0]) is None
    files = json.loads((ckpts[0] / "manifest.json").read_text())["files"]
    assert "trainer_rank0.pt" in files and "trainer_rank1.pt" in files  # both ranks wrote the same step
    assert not (out / runlock.LOCK_NAME).exists()  # released at exit: a requeued job may start
