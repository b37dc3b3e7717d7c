"""Two processes, DeepSpeed ZeRO-2 on CPU (DS_ACCELERATOR=cpu, gloo), launched with torchrun:

- the same global batches give the 1-process plain-torch run's losses and weights (local loss + all-gather with
  grad + DeepSpeed's gradient averaging = the global loss's gradient);
- GradCache on DeepSpeed (chunks as micro-steps) gives the same losses and weights as no caching;
- a real data run writes DeepSpeed checkpoints atomically, and a resumed run continues the uninterrupted run's curve;
- SIGTERM delivered to rank 1 only (ZeRO-3): both ranks agree to stop after the same step, both write that
  checkpoint, and `resume="auto"` continues the uninterrupted curve.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from test_train import assert_weights_close, fixed_inputs, micro_trainer  # tests/ is on sys.path under pytest

N_STEPS = 3
GLOBAL_BATCH = 16
BASE = {"model": "bioclip-micro", "precision": "fp32", "lr": 1e-3, "warmup_steps": 4, "max_steps": 10,
        "schedule_clock": "steps", "progress": False, "eval_at_end": False, "batch_size": GLOBAL_BATCH,
        "threads": 1, "num_workers": 0}

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.trainer import Trainer
    sys.path.insert(0, os.path.join(os.environ["REPO_ROOT"], "tests"))
    from test_train import fixed_inputs

    out, base = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ds = {**base, "engine": "deepspeed", "zero_stage": 2}

    def fixed_steps(tag, **over):
        tr = Trainer(resolve_config({**ds, "out": f"{out}/{tag}", **over}), build_data=False)
        losses = []
        for s in range(%(n)d):
            full = fixed_inputs(tr, n=%(b)d, seed=s)  # the same global batch on every rank ...
            n = %(b)d // world
            local = {k: v[rank * n:(rank + 1) * n] for k, v in full.items()}  # ... of which each takes its slice
            losses.append(tr.train_step(local)["loss"])
        state = tr.engine.export_state_dict()
        if rank == 0:
            torch.save({"losses": losses, "state": state}, f"{out}/{tag}.pt")

    fixed_steps("zero2")
    fixed_steps("zero2_gradcache", grad_cache_chunk=4)

    # real data: uninterrupted 6 steps vs 3 steps + (DeepSpeed checkpoint) + resume to 6
    data = {**ds, "max_steps": 6, "save_every": 2}
    Trainer(resolve_config({**data, "out": f"{out}/full"})).fit()
    part = Trainer(resolve_config({**data, "out": f"{out}/part"}))
    part.total_steps = 3  # stop early; the schedule still spans 6 steps
    part.fit()
    resumed = Trainer(resolve_config({**data, "out": f"{out}/part", "resume": "auto"}))
    assert resumed.step == 3, resumed.step
    resumed.fit()

    # preemption seen by rank 1 only, in step 3 (before its loss reduction): every rank stops after step 3
    z3 = {**data, "zero_stage": 3, "save_every": 0, "out": f"{out}/sig"}
    sig = Trainer(resolve_config(z3))
    real_step = sig.train_step

    def step_with_signal(inputs):
        if rank == 1 and sig.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(inputs)

    sig.train_step = step_with_signal
    summary = sig.fit()
    with open(f"{out}/sig_rank{rank}.json", "w") as f:
        json.dump({"preempted": summary.get("preempted"), "steps": summary["steps"]}, f)
    again = Trainer(resolve_config({**z3, "resume": "auto"}))
    assert again.step == 3, again.step
    again.fit()
    """
) % {"n": N_STEPS, "b": GLOBAL_BATCH}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_two_processes_match_single_process_and_resume(tmp_path):
    pytest.importorskip("deepspeed")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "REPO_ROOT": repo, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(tmp_path), json.dumps(BASE)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # single-process plain-torch reference on the same global batches
    ref = micro_trainer(tmp_path / "single", **{k: v for k, v in BASE.items() if k not in ("threads", "num_workers")})
    ref_losses = [ref.train_step(fixed_inputs(ref, n=GLOBAL_BATCH, seed=s))["loss"] for s in range(N_STEPS)]
    lr_sum = sum(BASE["lr"] * (k + 1) / BASE["warmup_steps"] for k in range(N_STEPS))
    for tag in ("zero2", "zero2_gradcache"):
        got = torch.load(tmp_path / f"{tag}.pt", weights_only=False)
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), tag
        named = list(ref.clip.named_parameters())
        assert_weights_close([(n, got["state"][n]) for n, _ in named], named, lr_sum, tag)

    # DeepSpeed checkpoint + resume reproduces the uninterrupted curve
    full, part = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "part" / "metrics.jsonl")
    assert sorted(full) == sorted(part) == list(range(1, 7))
    for s in full:
        assert part[s] == pytest.approx(full[s], rel=1e-5), f"step {s}"
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert "latest" in ckpts and not [c for c in ckpts if c.startswith(".tmp")]

    # SIGTERM on rank 1: both ranks stopped after step 3 and wrote one checkpoint; the resumed ZeRO-3 run follows
    # the uninterrupted ZeRO-2 curve
    ranks = [json.loads((tmp_path / f"sig_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1] == {"preempted": "SIGTERM", "steps": 3}, ranks
    assert ranks[0] == {"preempted": "a stop signal on another rank", "steps": 3}, ranks
    sig = _losses(tmp_path / "sig" / "metrics.jsonl")
    assert sorted(sig) == list(range(1, 7))
    for s in full:
        assert sig[s] == pytest.approx(full[s], rel=1e-5), f"step {s} (ZeRO-3, SIGTERM on rank 1, resumed)"
    from bioclip_fast.train import checkpoint as ckpt

    sig_ckpts = ckpt.list_checkpoints(tmp_path / "sig" / "checkpoints")
    assert [d.name for d in sig_ckpts] == ["step_00000006"]  # keep_checkpoints=1 (butterflies preset)
    assert ckpt.verify_checkpoint(sig_ckpts[0]) is None  # every rank's shards are in the manifest
    files = json.loads((sig_ckpts[0] / "manifest.json").read_text())["files"]
    assert "trainer_rank0.pt" in files and "trainer_rank1.pt" in files and len(files) > 4
