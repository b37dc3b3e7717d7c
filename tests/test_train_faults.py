"""Fault injection for training (issue 13): stop signals, corrupt checkpoints, changed settings on resume, a full
disk, re-running into an existing --out, bad commands, and the figures a run reports. Each test injects the fault,
then asserts that nothing is lost, that the run continues exactly where that is the promise, and that the one-line
message names the cause."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from bioclip_fast.cli import main
from bioclip_fast.errors import EXIT_PREEMPTED, CheckpointError
from bioclip_fast.train import checkpoint as ckpt
from bioclip_fast.train.config import ConfigError, resolve_config
from bioclip_fast.train.trainer import Trainer
from bioclip_fast.train.collapse import CollapseMonitor

from test_train import MICRO, fixed_inputs, micro_trainer  # tests/ is on sys.path under pytest

# the smallest real-data run: bioclip-micro on the bundled butterflies, 32 per step
DATA_RUN = {**MICRO, "batch_size": 32, "num_workers": 0, "threads": 1, "warmup_steps": 2, "save_every": 0,
            "crop_scale": [0.5, 1.0]}
CLI_MICRO = ["--model", "bioclip-micro", "--batch-size", "32", "--max-steps", "2", "--max-minutes", "none",
             "--schedule-clock", "steps", "--warmup-steps", "1", "--num-workers", "0", "--threads", "1",
             "--no-eval-at-end", "--no-progress", "--engine", "torch"]


def data_trainer(out: Path, **over) -> Trainer:
    return Trainer(resolve_config({**DATA_RUN, "out": str(out), **over}))


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.clip.named_parameters()}


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("bioclip-fast train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ 1. signals
@pytest.mark.parametrize("signame, over", [("SIGUSR1", {}), ("SIGINT", {"grad_cache_chunk": 8})])
def test_stop_signal_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, signame, over):
    """The signal arrives at a random step (a real signal to this process); the run finishes that step, writes a
    checkpoint, reports the signal; a `resume="auto"` run then ends with the uninterrupted run's weights and losses
    (also with GradCache, whose chunked step carries the stop flag in the same reduction)."""
    steps = 6
    ref = data_trainer(tmp_path / "ref", max_steps=steps, **over)
    ref.fit()
    at = random.Random(time.time_ns()).randint(1, steps - 2)  # 0-based index of the step the signal lands in

    run = data_trainer(tmp_path / "run", max_steps=steps, **over)
    real_step = run.train_step

    def step_with_signal(inputs):
        if run.step == at:
            os.kill(os.getpid(), getattr(signal, signame))
        return real_step(inputs)

    run.train_step = step_with_signal
    summary = run.fit()
    assert summary["preempted"] == signame and summary["steps"] == at + 1, (summary, at)
    assert Path(summary["checkpoint"]).name == ckpt.ckpt_name(at + 1)
    assert ckpt.verify_checkpoint(summary["checkpoint"]) is None
    assert not (tmp_path / "run" / "model.pt").exists()  # not finished: no export, no results
    assert signal.getsignal(getattr(signal, signame)) is not None  # handlers restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    resumed = data_trainer(tmp_path / "run", max_steps=steps, resume="auto", **over)
    assert resumed.step == at + 1
    resumed.fit()
    assert _steps(tmp_path / "run") == list(range(1, steps + 1))  # every step once
    ref_losses = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for n, p in _weights(resumed).items():
        torch.testing.assert_close(p, _weights(ref)[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_signal_after_the_last_reduction_is_still_honoured(tmp_path):
    """A signal landing after the step's loss reduction (here: inside the optimizer step of the last step) is
    settled by the end-of-loop agreement: checkpoint, preempted summary, no export."""
    tr = data_trainer(tmp_path / "run", max_steps=2)
    real = tr.engine.step

    def step_then_signal():
        real()
        if tr.step == 1:  # the second (last) step
            os.kill(os.getpid(), signal.SIGTERM)

    tr.engine.step = step_then_signal
    summary = tr.fit()
    assert summary["preempted"] == "SIGTERM" and summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / ckpt.ckpt_name(2)).is_dir()
    assert not (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------------------------------------ 2. run directories
def test_rerun_into_existing_out_is_refused_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *CLI_MICRO, "--save-every", "1", "--out", str(out)]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *CLI_MICRO, "--out", str(out)]) == 2
    _one_error_line(capsys, str(out), "already holds a run", "checkpoint step_00000002", "--resume auto",
                    "--overwrite")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "metrics.jsonl").read_text() == metrics
    # --overwrite starts over: the old outputs are replaced by the new run's
    assert main(["train", *CLI_MICRO, "--max-steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert _steps(out) == [1]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [ckpt.ckpt_name(1)]


def test_retention_orders_by_step_and_keeps_the_checkpoint_just_written(tmp_path):
    tr = micro_trainer(tmp_path, keep_checkpoints=2)
    root = tr.run_dir / "checkpoints"
    # a directory of another timeline whose name sorts after ours, and one whose name sorts before though its step
    # is larger (9 digits): by name the new checkpoints would be the ones deleted
    for stale in ("step_00000012", "step_100000000"):
        (root / stale).mkdir(parents=True)
        (root / stale / "meta.json").write_text("{}")
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step_100000000", "step_00000012"]
    for s in (1, 2):
        tr.step = s
        tr.save()
        assert (root / ckpt.ckpt_name(s)).is_dir(), f"retention removed the checkpoint just written (step {s})"
    assert (root / "latest").read_text().strip() == ckpt.ckpt_name(2)
    assert len(ckpt.list_checkpoints(root)) == 2


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    data_trainer(out, max_steps=4, save_every=2, keep_checkpoints=3).fit()
    # the process died after logging steps 3-4 but before checkpoint 4 became visible
    shutil.rmtree(out / "checkpoints" / ckpt.ckpt_name(4))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.0')  # a line cut by the crash
    resumed = data_trainer(out, max_steps=4, resume="auto")
    assert resumed.step == 2 and _steps(out) == [1, 2]
    resumed.fit()
    assert _steps(out) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ 3. integrity
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))  # same size: only the checksum can tell


def _cut_json(p: Path) -> None:
    p.write_text(p.read_text()[:-7])


@pytest.mark.parametrize("victim, damage, why", [
    ("state.pt", _truncate, "state.pt is"),
    ("trainer_rank0.pt", _garbage, "trainer_rank0.pt does not match its checksum"),
    ("meta.json", _cut_json, "meta.json is"),
    ("manifest.json", _cut_json, "manifest.json is unreadable"),
])
def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, victim, damage, why):
    tr = micro_trainer(tmp_path, keep_checkpoints=3)
    states = {}
    for s in (1, 2, 3):
        tr.train_step(fixed_inputs(tr, seed=s))
        tr.step = s
        tr.save()
        states[s] = _weights(tr)
    root = tr.run_dir / "checkpoints"
    damage(root / ckpt.ckpt_name(3) / victim)
    with caplog.at_level(logging.WARNING, logger="bioclip_fast"):
        resumed = micro_trainer(tmp_path, keep_checkpoints=3, resume="auto")
    assert resumed.step == 2
    assert f"skipping checkpoint {root / ckpt.ckpt_name(3)}: {why}" in caplog.text
    assert all(torch.equal(p, states[2][n]) for n, p in _weights(resumed).items())
    # nothing deleted: the corrupt one is moved aside, out of the resume and retention candidates
    assert (root / f"corrupt-{ckpt.ckpt_name(3)}" / victim).is_file()
    assert [d.name for d in ckpt.list_checkpoints(root)] == [ckpt.ckpt_name(2), ckpt.ckpt_name(1)]
    # and the run continues exactly: the same step 3 gives the same weights as before the damage
    resumed.train_step(fixed_inputs(resumed, seed=3))
    for n, p in _weights(resumed).items():
        torch.testing.assert_close(p, states[3][n], rtol=0, atol=0, msg=n)


def test_no_intact_checkpoint_names_each_and_why(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *CLI_MICRO, "--save-every", "1", "--keep-checkpoints", "2", "--out", str(out)]) == 0
    root = out / "checkpoints"
    _truncate(root / ckpt.ckpt_name(2) / "state.pt")
    _garbage(root / ckpt.ckpt_name(1) / "trainer_rank0.pt")
    capsys.readouterr()
    assert main(["train", *CLI_MICRO, "--out", str(out), "--resume", "auto"]) == 2
    _one_error_line(capsys, "no intact checkpoint", "step_00000002: state.pt is", "truncated",
                    "step_00000001: trainer_rank0.pt does not match its checksum")
    # a checkpoint named explicitly is the only candidate
    assert main(["train", *CLI_MICRO, "--out", str(out), "--resume", str(root / ckpt.ckpt_name(2))]) == 2
    _one_error_line(capsys, "step_00000002: state.pt is")
    assert (root / ckpt.ckpt_name(2)).is_dir() and (root / ckpt.ckpt_name(1)).is_dir()  # nothing removed


# ------------------------------------------------------------------------------------------------ 4. resume guards
def test_changed_settings_are_refused_with_the_changed_keys(tmp_path):
    tr = micro_trainer(tmp_path)
    tr.train_step(fixed_inputs(tr))
    tr.step = 1
    tr.save()
    with pytest.raises(ConfigError) as e:
        micro_trainer(tmp_path, resume="auto", lr=2e-3, max_steps=20, text_types=["scientific"])
    msg = str(e.value)
    assert "lr 0.001 -> 0.002" in msg and "max_steps 10 -> 20" in msg and "text_types null -> [\"scientific\"]" in msg
    assert "--allow-changed lr max_steps text_types" in msg
    # settings that do not change the run may differ freely
    assert micro_trainer(tmp_path, resume="auto", save_every=7, log_every=3, eval_every=5).step == 1
    # a deliberate change goes through the flag
    longer = micro_trainer(tmp_path, resume="auto", max_steps=20, allow_changed=["max_steps"])
    assert longer.step == 1 and longer.total_steps == 20


def test_adding_data_switches_the_preset_and_is_refused(tmp_path, capsys):
    from bioclip_fast.data.bundled import default_shards

    out = tmp_path / "run"
    assert main(["train", *CLI_MICRO, "--save-every", "1", "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    shards = str(Path(default_shards("train")[0]).parent / "shard-*.tar")
    assert main(["train", *CLI_MICRO, "--data", shards, "--out", str(out), "--resume", "auto"]) == 2
    _one_error_line(capsys, "preset butterflies -> bioclip2", "lr 0.002 -> 0.0001", "precision fp32 -> bf16",
                    "weight_decay", "shuffle_buffer", "--allow-changed")


def test_same_shard_names_and_counts_with_other_content_are_refused(tmp_path):
    from bioclip_fast.data.bundled import default_shards

    src = Path(default_shards("train")[0]).parent
    data = tmp_path / "shards"
    shutil.copytree(src, data)
    over = {"data": [str(p) for p in sorted(data.glob("shard-*.tar"))], "preset": "butterflies", "max_steps": 1}
    data_trainer(tmp_path / "run", **over).fit()
    # regenerate one shard with other samples under the same name and count (100 samples each)
    tars = sorted(data.glob("shard-*.tar"))
    shutil.copy(tars[1], tars[0])
    shutil.copy(tars[1].with_suffix(".json"), tars[0].with_suffix(".json"))
    with pytest.raises(ConfigError, match=r"data \(shard names, sample counts, sizes or classes differ\)"):
        data_trainer(tmp_path / "run", **over, resume="auto")


# ------------------------------------------------------------------------------------------------ 5. disk
def test_no_room_for_a_checkpoint_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert main(["train", *CLI_MICRO, "--save-every", "1", "--out", str(out)]) == 2
    line = _one_error_line(capsys, "not enough free space for checkpoint step_00000001", str(out / "checkpoints"),
                           "ENOSPC", "1.0 KB free")
    need = int(line.split("(")[1].split(" bytes")[0])
    n_params = sum(p.numel() for p in micro_trainer(tmp_path / "x").clip.parameters())
    assert need >= n_params * 12  # weights + two AdamW moments, fp32
    assert not list((out / "checkpoints").iterdir())  # nothing half-written


@pytest.mark.parametrize("failure", ["oserror", "torch_runtime_error"])
def test_enospc_during_a_write_names_the_path_and_cleans_up(tmp_path, monkeypatch, failure):
    tr = micro_trainer(tmp_path)
    tr.step = 1
    first = tr.save()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("trainer_rank0.pt"):
            Path(f).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves
            if failure == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            real_usage = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=10))
            raise RuntimeError("basic_ios::clear: iostream error")  # what torch says on a full disk
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    tr.step = 2
    with pytest.raises(CheckpointError) as e:
        tr.save()
    msg = str(e.value)
    assert "no space left on device writing checkpoint file" in msg and "ENOSPC" in msg
    assert f"{ckpt.TMP_PREFIX}{ckpt.ckpt_name(2)}/trainer_rank0.pt" in msg and "bytes)" in msg
    root = tr.run_dir / "checkpoints"
    assert not list(root.glob(".tmp-*"))  # the partial checkpoint is gone
    assert (root / "latest").read_text().strip() == first.name and ckpt.verify_checkpoint(first) is None


def test_config_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A job stopped while it writes config.json (here the write fails halfway, as a full disk or a kill leaves it)
    keeps the previous config.json whole, and leaves no temporary file beside it."""
    from bioclip_fast.distributed import DistInfo
    from bioclip_fast.train import rundir, runlock

    out = tmp_path / "run"
    run_dir, lock = rundir.open_run_dir(resolve_config({**MICRO, "out": str(out)}), DistInfo())
    runlock.release(lock)
    before = (run_dir / "config.json").read_text()
    real_write = Path.write_bytes

    def half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError):
        rundir.open_run_dir(resolve_config({**MICRO, "out": str(out), "resume": "auto", "lr": 2e-3}), DistInfo())
    monkeypatch.undo()
    assert (run_dir / "config.json").read_text() == before and json.loads(before)["lr"] == MICRO["lr"]
    assert not list(run_dir.glob(".config.json.*"))


def test_stale_temp_dirs_are_removed_at_start(tmp_path, caplog):
    tr = micro_trainer(tmp_path)
    tr.step = 1
    tr.save()
    stale = tr.run_dir / "checkpoints" / f"{ckpt.TMP_PREFIX}{ckpt.ckpt_name(2)}"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="bioclip_fast"):
        resumed = micro_trainer(tmp_path, resume="auto")
    assert resumed.step == 1 and not stale.exists()
    assert "unfinished checkpoint write" in caplog.text and str(stale) in caplog.text


def test_temporary_files_of_a_killed_runs_writes_are_removed_at_start(tmp_path):
    """An atomic write killed before its rename (SIGKILL: no cleanup runs) leaves .<name>.<pid>-<hex>.tmp beside
    the run's outputs; the next start in that run directory removes them, and nothing else."""
    tr = micro_trainer(tmp_path)
    tr.step = 1
    tr.save()
    leftovers = [tr.run_dir / f".{name}.123-abcd0123.tmp" for name in ("config.json", "results.json", "model.pt",
                                                                           "metrics.jsonl")]
    for p in leftovers:
        p.write_text("partial")
    mine = tr.run_dir / ".notes.txt.tmp"
    mine.write_text("the user's")
    micro_trainer(tmp_path, resume="auto")
    assert not [p for p in leftovers if p.exists()] and mine.read_text() == "the user's"


# ------------------------------------------------------------------------------------------------ 6/7. validation
@pytest.mark.parametrize("argv, needle", [
    (["--eval-templates", "a photo of {} and {}."], "eval_templates"),
    (["--eval-templates", "no placeholder"], "eval_templates"),
    (["--text-types", "latin"], "text_types: unknown ['latin']"),
    (["--engine", "torch", "--zero-stage", "3"], "zero_stage=3 needs the deepspeed engine"),
    (["--num-workers", "-1"], "num_workers must be >= 0"),
    (["--device", "gpu"], "device: 'gpu' is not a device"),
    (["--allow-changed", "learning_rate"], "allow_changed: ['learning_rate']"),
    (["--resume", "auto", "--overwrite"], "overwrite and resume exclude each other"),
    (["--collapse-window", "-1"], "collapse_window must be >= 0"),
])
def test_bad_train_commands_fail_in_one_line_before_any_work(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    assert main(["train", *CLI_MICRO, "--eval-at-end", "--out", str(out), *argv]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()  # nothing was started


def test_out_that_is_a_file_cuda_without_gpu_and_a_broken_config_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert main(["train", *CLI_MICRO, "--out", str(f)]) == 2
    _one_error_line(capsys, f"out: {f} is a file")
    assert f.read_text() == "keep me"
    if not torch.cuda.is_available():
        assert main(["train", *CLI_MICRO, "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
        _one_error_line(capsys, "device='cuda' but no CUDA GPU is available")
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("lr: [1, 2\nmodel: x\n")
    assert main(["train", "--config", str(bad_yaml), "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, f"config file {bad_yaml}: invalid YAML")
    assert not (tmp_path / "r").exists()


def test_zero_stage_alone_selects_deepspeed_and_torch_runs_record_no_stage():
    from bioclip_fast.train.engine import DistInfo, resolve_engine_kind

    cpu = torch.device("cpu")
    assert resolve_engine_kind(resolve_config({**MICRO, "engine": "auto", "zero_stage": 3}), DistInfo(), cpu) == "deepspeed"
    assert resolve_engine_kind(resolve_config({**MICRO, "engine": "auto"}), DistInfo(), cpu) == "torch"
    assert resolve_config({}).zero_stage is None  # the butterflies run (torch engine) records no ZeRO stage


# ------------------------------------------------------------------------------------------------ 9. figures
def test_chance_is_set_by_the_classes_the_classifier_scored(tmp_path, capsys):
    from bioclip_fast.cli.train import print_summary

    tr = micro_trainer(tmp_path, eval_templates="simple")
    res = tr.evaluate("final")  # bundled val split: 10 species
    assert res["n_classes"] == 10 and res["chance_top1"] == pytest.approx(0.1)
    # val images of one species scored by a 10-class classifier: chance is 10%, not 100%
    one = {**res, "per_class": {"Danaus plexippus": 0.5}, "n": 17}
    print_summary({"run_dir": "r", "steps": 1, "train_seconds": 1.0, "final_loss": 1.0, "zero_shot": one})
    out = capsys.readouterr().out
    assert "1 class (the classifier scored 10) (chance 10%)" in out and "chance 100%" not in out


def test_nonfinite_messages_count_steps_from_one_like_metrics(tmp_path):
    tr = micro_trainer(tmp_path, nonfinite="skip", max_nonfinite_skips=0)
    bad = fixed_inputs(tr)
    bad["image"][0] = float("nan")
    with pytest.raises(Exception, match=r"last at step 1\)"):
        tr.train_step(bad)


def test_collapse_monitor_fires_once_after_warmup_only():
    m = CollapseMonitor(32, window=3, after_step=2)
    chance = math.log(32)
    fired = [m.update(s, chance * 1.005) for s in range(1, 7)]
    assert fired[:4] == [None] * 4 and fired[4] and "ln(batch) = 3.466" in fired[4] and fired[5] is None
    learning = CollapseMonitor(32, window=3, after_step=0)
    assert all(learning.update(s, chance * (1 - 0.05 * s)) is None for s in range(1, 20))
    blip = CollapseMonitor(32, window=3, after_step=0)  # the window must be consecutive
    assert all(blip.update(s, chance * (0.9 if s % 3 == 0 else 1.0)) is None for s in range(1, 20))


def test_a_collapsed_run_ends_with_a_warning(tmp_path, caplog):
    """A logit scale of 1 (init_logit_scale 0) and a negligible lr: logits carry almost no information and the loss
    sits at ln(batch) — the run is flagged, in the log and in results.json."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="bioclip_fast"):
        summary = data_trainer(out, max_steps=5, warmup_steps=1, lr=1e-9, init_logit_scale=0.0,
                               collapse_window=3).fit()
    assert any("training has collapsed" in w for w in summary["warnings"]), summary["warnings"]
    assert "training has collapsed" in caplog.text
    assert json.loads((out / "results.json").read_text())["warnings"] == summary["warnings"]


def test_collapse_count_carries_over_a_resume(tmp_path):
    """The collapse run count is checkpointed: a run stopped after step 3 (chance-level steps 2-3 counted) and resumed
    warns at step 4, exactly as the uninterrupted run does, instead of restarting its count."""
    over = dict(warmup_steps=1, lr=1e-9, init_logit_scale=0.0, collapse_window=3)
    ref = data_trainer(tmp_path / "ref", max_steps=5, **over).fit()
    assert any("(steps 2-4)" in w for w in ref["warnings"]), ref["warnings"]
    first = data_trainer(tmp_path / "run", max_steps=3, **over)
    assert first.fit()["warnings"] == [] and first.collapse.run == 2
    resumed = data_trainer(tmp_path / "run", max_steps=5, resume="auto", allow_changed=["max_steps"], **over)
    assert resumed.step == 3 and resumed.collapse.run == 2
    assert resumed.fit()["warnings"] == ref["warnings"]


# ------------------------------------------------------------------------------------------------ README
def _readme_block(marker: str) -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    block = text[text.index(marker):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("bioclip-fast ")]


@pytest.mark.slow  # ~30 s on 2 idle cores: three CLI runs of the CPU demo model, two zero-shot evals
def test_readme_preemption_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """docs/training.md's three commands (runs/demo -> a temp dir): preempted by SIGTERM in step 2 -> exit 75 with a
    checkpoint; the same command with --resume auto finishes; --allow-changed max_steps extends the run."""
    import shlex

    cmds = _readme_block("**Preemption, resume and run directories.**")
    assert len(cmds) == 3 and "--resume auto" in cmds[1] and "--allow-changed max_steps" in cmds[2]
    out = tmp_path / "demo"
    argvs = [shlex.split(c.replace("runs/demo", str(out)))[1:] for c in cmds]
    real_step = Trainer.train_step

    def preempted_in_step_2(self, inputs):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, inputs)

    monkeypatch.setattr(Trainer, "train_step", preempted_in_step_2)
    assert main(argvs[0]) == EXIT_PREEMPTED
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().err
    assert _steps(out) == [1, 2] and (out / "checkpoints" / ckpt.ckpt_name(2)).is_dir()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(argvs[0]) == 2  # the same command without --resume: refused, nothing lost
    assert "already holds a run" in capsys.readouterr().err
    assert main(argvs[1]) == 0
    assert _steps(out) == [1, 2, 3, 4]
    assert main(argvs[2][:argvs[2].index("--allow-changed")]) == 2  # the change must be named
    assert "max_steps 4 -> 8" in capsys.readouterr().err
    assert main(argvs[2]) == 0
    assert _steps(out) == list(range(1, 9))
    assert json.loads((out / "results.json").read_text())["steps"] == 8


def test_checkpoint_without_manifest_is_incomplete_and_the_previous_one_is_used(tmp_path, caplog):
    """The manifest is written last: a checkpoint without one is skipped like a bad checksum (here its state.pt is
    truncated too, which only the manifest could have told), and the intact previous one is resumed."""
    tr = micro_trainer(tmp_path, keep_checkpoints=3)
    states = {}
    for s in (1, 2):
        tr.train_step(fixed_inputs(tr, seed=s))
        tr.step = s
        d = tr.save()
        states[s] = _weights(tr)
    (d / ckpt.MANIFEST).unlink()
    _truncate(d / "state.pt")
    with caplog.at_level(logging.WARNING, logger="bioclip_fast"):
        resumed = micro_trainer(tmp_path, keep_checkpoints=3, resume="auto")
    assert resumed.step == 1 and f"skipping checkpoint {d}: manifest.json is missing" in caplog.text
    assert all(torch.equal(p, states[1][n]) for n, p in _weights(resumed).items())


def test_train_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--overwrite", "--allow-changed", "--collapse-window", "--resume"):
        assert flag in out


# ------------------------------------------------------------------------------------------------ issue 20: disk limits
def test_full_disk_while_appending_metrics_names_the_file(tmp_path):
    """metrics.jsonl on a full device (/dev/full: every write fails with ENOSPC): the error names the file."""
    from bioclip_fast.errors import one_line

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    tr = data_trainer(tmp_path / "run", max_steps=1)
    (tmp_path / "run" / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        tr.fit()
    line = one_line(e.value)
    assert str(tmp_path / "run" / "metrics.jsonl") in line and "ENOSPC" in line, line


def test_file_size_limit_while_saving_gives_one_line_naming_the_file(tmp_path, capsys):
    """`ulimit -f` below the checkpoint's size: one line naming the file and the limit (not torch's
    "[enforce fail at inline_container.cc] unexpected pos"); nothing partial is left."""
    import resource

    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 1 << 20  # 1 MiB: config.json and metrics fit, the bioclip-micro checkpoint (~10 MB) does not
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(["train", *CLI_MICRO, "--max-steps", "1", "--out", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    line = _one_error_line(capsys, "file size limit of 1.0 MB (1048576 bytes)", "EFBIG", "ulimit -f",
                           str(out / "checkpoints" / ".tmp-step_00000001"))
    assert "inline_container" not in line and "unexpected pos" not in line
    assert not list((out / "checkpoints").glob(".tmp-*"))
