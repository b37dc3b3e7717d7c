"""Kill a real `bioclip-fast train` process (SIGKILL) at a random step, or preempt it (SIGTERM), resume it, and get
the uninterrupted run's loss curve and final weights: model, optimizer, schedule, RNG and the data position are all
restored. SIGTERM must leave a checkpoint at the step it interrupted even with no periodic saves."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

MAX_STEPS = 10
ARGS = [
    "--model", "bioclip-micro", "--batch-size", "32", "--max-steps", str(MAX_STEPS), "--max-minutes", "none",
    "--schedule-clock", "steps", "--warmup-steps", "3", "--lr", "1e-3", "--save-every", "1",
    "--keep-checkpoints", "2", "--num-workers", "0", "--threads", "1", "--no-eval-at-end", "--no-progress",
    "--crop-scale", "0.5", "1.0",  # random crops: the augmentation stream must resume exactly too
]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bioclip_fast", "train", *ARGS, "--out", str(out), *extra]


def _losses(run: Path) -> dict[int, float]:
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the process was killed
                continue
            by_step[rec["step"]] = rec["loss"]  # a resumed run re-logs the steps after its checkpoint
    return by_step


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("resume") / "ref"
    subprocess.run(_cmd(ref), check=True, env=_env(), capture_output=True, timeout=600)
    assert sorted(_losses(ref)) == list(range(1, MAX_STEPS + 1))
    return ref


def _assert_same_run(run: Path, ref: Path, what: str) -> None:
    ref_losses, losses = _losses(ref), _losses(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-7), f"step {step} differs ({what})"
    a = torch.load(ref / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k} ({what}): {m}")


def _wait_for_steps(proc, run: Path, n: int) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)


def test_sigterm_at_random_step_checkpoints_exits_75_and_resume_equals_uninterrupted(tmp_path, reference_run):
    from bioclip_fast.errors import EXIT_PREEMPTED

    at = random.Random(time.time_ns()).randint(2, MAX_STEPS - 3)
    run = tmp_path / "preempted"
    cmd = _cmd(run, "--save-every", "1000")  # no periodic checkpoint: only the signal's
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, run, at)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    stopped = [x for x in err.splitlines() if x.startswith("bioclip-fast train: stopped by SIGTERM")]
    assert len(stopped) == 1 and "--resume auto" in stopped[0], err[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and at <= len(steps) < MAX_STEPS
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == [f"step_{len(steps):08d}"], ckpts  # the step it was in when the signal came
    assert not (run / "model.pt").exists()

    resumed = subprocess.run(cmd + ["--resume", "auto"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, MAX_STEPS + 1))  # every step once
    _assert_same_run(run, reference_run, f"SIGTERM after step {len(steps)}")


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_equals_uninterrupted(tmp_path, reference_run):
    ref = reference_run
    ref_losses = _losses(ref)

    kill_at = random.Random(time.time_ns()).randint(3, MAX_STEPS - 4)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-way (kill_at={kill_at}, rc={proc.returncode})"
    reached = max(_losses(run))
    assert reached < MAX_STEPS

    resumed = subprocess.run(_cmd(run, "--resume", "auto"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    losses = _losses(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-7), (
            f"step {step} differs after SIGKILL at step ~{reached} (kill_at={kill_at}) and resume"
        )
    a = torch.load(ref / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def test_bad_resume_path_is_a_config_error(tmp_path, capsys):
    from bioclip_fast.cli import main

    assert main(["train", "--out", str(tmp_path / "x"), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no complete checkpoint under" in capsys.readouterr().err
