"""--report-to tensorboard,wandb (issue 20): rank 0 writes the metrics.jsonl scalars to TensorBoard event files (read
back with TensorBoard's own EventAccumulator) and to an offline W&B run (read back from its transaction log), at the
same global steps; a resumed run continues the same curves."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from bioclip_fast.cli import main
from bioclip_fast.train import checkpoint as ckpt

from test_train_faults import CLI_MICRO, _one_error_line, data_trainer  # tests/ is on sys.path under pytest


def _wandb_history(path: Path) -> list[dict]:
    """History rows of a W&B transaction log (.wandb: LevelDB-log framing of wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (2, 3):
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_tensorboard_and_wandb_get_the_metrics_and_a_resumed_run_continues_the_curves(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no network, no account
    out = tmp_path / "run"
    over = dict(max_steps=4, save_every=2, keep_checkpoints=3, report_to=["tensorboard,wandb"], eval_at_end=True,
                eval_templates="simple")
    data_trainer(out, **over).fit()
    # the process died after logging steps 3-4 but before checkpoint 4: the resumed run re-does them
    shutil.rmtree(out / "checkpoints" / ckpt.ckpt_name(4))
    resumed = data_trainer(out, resume="auto", **over)
    assert resumed.step == 2
    summary = resumed.fit()

    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/logit_scale", "perf/img_s", "perf/tflops_per_rank",
                "perf/data_wait_frac", "data/bad_samples", "eval/top1", "eval/top5"):
        assert tag in tags, (tag, sorted(tags))
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/logit_scale", "logit_scale"),
                     ("perf/img_s", "img_s"), ("data/bad_samples", "bad_samples")):
        events = acc.Scalars(tag)
        # one point per step: the interrupted run's steps 3-4 were purged, the resumed run's replace them
        assert [e.step for e in events] == [1, 2, 3, 4], (tag, [(e.step, e.value) for e in events])
        for e in events:
            assert e.value == pytest.approx(metrics[e.step][key], rel=1e-6, abs=1e-12), (tag, e.step)
    top1 = acc.Scalars("eval/top1")
    assert top1[-1].step == 4 and top1[-1].value == pytest.approx(summary["zero_shot"]["top1"], rel=1e-6)

    # W&B: one run id for the run directory; each process's offline log holds its steps
    run_id = (out / "wandb_run_id").read_text().strip()
    logs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(logs) == 2, list((out / "wandb").iterdir())
    first, second = (_wandb_history(p) for p in logs)
    loss_steps = lambda rows: [r["_step"] for r in rows if "train/loss" in r]  # noqa: E731
    assert loss_steps(first) == [1, 2, 3, 4] and loss_steps(second) == [3, 4]
    for r in second:
        if "train/loss" in r:
            assert r["train/loss"] == pytest.approx(metrics[r["_step"]]["loss"], rel=1e-12)
    assert any(r.get("eval/top1") == pytest.approx(summary["zero_shot"]["top1"]) for r in second)


def test_report_to_is_validated_before_any_work(tmp_path, capsys, monkeypatch):
    from bioclip_fast.train import tracking

    out = tmp_path / "run"
    assert main(["train", *CLI_MICRO, "--out", str(out), "--report-to", "tensorbored"]) == 2
    _one_error_line(capsys, "report_to: unknown ['tensorbored']", "tensorboard, wandb")
    monkeypatch.setitem(tracking.BACKENDS, "wandb", "wandb_package_that_is_not_installed")
    assert main(["train", *CLI_MICRO, "--out", str(out), "--report-to", "tensorboard", "wandb"]) == 2
    _one_error_line(capsys, "report_to: wandb is not installed (pip install wandb_package_that_is_not_installed)")
    assert not out.exists()


def test_a_tracker_that_fails_to_start_frees_the_run_directory(tmp_path, monkeypatch):
    """The lock on --out is released however fit() ends, a tracker failing to start included."""
    from bioclip_fast.train import progress

    def broken(*a, **k):
        raise OSError(13, "Permission denied: tensorboard/")

    monkeypatch.setattr(progress, "open_trackers", broken)
    out = tmp_path / "run"
    tr = data_trainer(out, max_steps=1, report_to=["tensorboard"])
    assert tr.lock_path is not None and tr.lock_path.exists()
    with pytest.raises(OSError, match="Permission denied"):
        tr.fit()
    assert not tr.lock_path.exists()
