"""`--preset bioclip2`: the paper's batch layout (2,816 biology + 320 replay images per GPU, gradient checkpointing,
ViT-L-14, bf16), per-GPU and global batches in `--print-config`, the replay ratio default, and shard specs checked
by `train` before any work."""
import json

import pytest

from bioclip_fast.cli import main
from bioclip_fast.train.config import ConfigError, resolve_batches, resolve_config


def _print_config(capsys, monkeypatch, argv, world=None):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["train", "--print-config", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def shards(tmp_path):
    from tests._fixtures_data import write_tol_shards

    write_tol_shards(tmp_path / "tol", 2, 2)
    write_tol_shards(tmp_path / "laion", 2, 2, prefix="")
    return tmp_path


def test_bioclip2_preset_is_the_papers_layout(capsys, monkeypatch, shards):
    argv = ["--preset", "bioclip2", "--data", str(shards / "tol"), "--replay-data", str(shards / "laion")]
    cfg = _print_config(capsys, monkeypatch, argv, world=32)
    assert cfg["model"] == "ViT-L-14" and cfg["grad_checkpointing"] is True and cfg["precision"] == "bf16"
    b = cfg["batches"]
    assert (b["world_size"], b["batch_per_gpu"], b["replay_per_gpu"]) == (32, 2816, 320)
    assert (b["batch_global"], b["replay_global"]) == (90112, 10240)
    assert cfg["batch_size"] == 90112 and cfg["replay_batch_size"] == 10240
    cfg = _print_config(capsys, monkeypatch, argv)  # one process: per-GPU figures, and what 32 GPUs would give
    assert (cfg["batches"]["batch_global"], cfg["batches"]["replay_global"]) == (2816, 320)
    assert cfg["batches"]["global_on_32_gpus"] == {"batch": 90112, "replay": 10240}
    # --data alone selects the same preset
    assert _print_config(capsys, monkeypatch, argv[2:], world=8)["batches"]["batch_global"] == 8 * 2816


def test_explicit_global_batch_replaces_the_per_gpu_figure(capsys, monkeypatch, shards):
    base = ["--data", str(shards / "tol"), "--replay-data", str(shards / "laion")]
    cfg = _print_config(capsys, monkeypatch, base + ["--batch-size", "4096"], world=8)
    b = cfg["batches"]
    assert (b["batch_global"], b["batch_per_gpu"]) == (4096, 512)
    # replay defaults to the paper's 320/2816 of the per-GPU biology batch: round(512 * 320 / 2816) = 58 per GPU
    assert (b["replay_per_gpu"], b["replay_global"]) == (58, 58 * 8)
    cfg = _print_config(capsys, monkeypatch, base + ["--batch-size-per-gpu", "64", "--replay-batch-size", "80"],
                        world=4)
    assert (cfg["batches"]["batch_global"], cfg["batches"]["replay_global"]) == (256, 80)
    with pytest.raises(ConfigError, match="either batch_size .* or batch_size_per_gpu"):
        resolve_config({"data": [str(shards / "tol")], "batch_size": 64, "batch_size_per_gpu": 8})


def test_replay_default_ratio_without_preset_figures(shards):
    cfg = resolve_config({"data": [str(shards / "tol")], "replay_data": [str(shards / "laion")],
                          "batch_size": 2816 * 2})
    out = resolve_batches(cfg, 2)
    assert (out["batch_per_gpu"], out["replay_per_gpu"]) == (2816, 320)
    cfg = resolve_config({"data": [str(shards / "tol")], "replay_data": [str(shards / "laion")], "batch_size": 8})
    assert resolve_batches(cfg, 1)["replay_per_gpu"] == 1  # at least one replay image


def test_help_states_the_real_figures(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "90,112 = 2,816 per GPU x 32 GPUs" in text and "320/2,816" in text
    assert "32,768" not in text


@pytest.mark.parametrize("form", ["dir", "brace", "glob", "colons", "listfile", "list"])
def test_train_accepts_every_spec_form(capsys, monkeypatch, shards, form):
    d = shards / "tol"
    (shards / "train.txt").write_text("tol/shard-000000.tar\ntol/shard-000001.tar\n")
    argv = {"dir": ["--data", str(d)], "brace": ["--data", f"{d}/shard-{{000000..000001}}.tar"],
            "glob": ["--data", f"{d}/shard-*.tar"], "colons": ["--data", f"{d}/shard-000000.tar::{d}/shard-000001.tar"],
            "listfile": ["--data", str(shards / "train.txt")],
            "list": ["--data", f"{d}/shard-000000.tar", f"{d}/shard-000001.tar"]}[form]
    cfg = _print_config(capsys, monkeypatch, argv + ["--replay-data", f"{shards}/laion/{{000000..000001}}.tar"])
    assert cfg["data"] == argv[1:]


def test_the_demo_is_step_clocked_and_the_time_bound_schedule_is_an_option(capsys, monkeypatch):
    """`bioclip-fast train` with no arguments: a fixed step count (the same model on a busy or an idle machine);
    `--max-minutes M` alone is the time-bound schedule the demo used to run; explicit flags still win."""
    cfg = _print_config(capsys, monkeypatch, [])
    assert (cfg["preset"], cfg["schedule_clock"], cfg["max_steps"], cfg["max_minutes"]) == ("butterflies", "steps",
                                                                                            550, None)
    cfg = _print_config(capsys, monkeypatch, ["--max-minutes", "4.25"])
    assert (cfg["schedule_clock"], cfg["max_steps"], cfg["max_minutes"]) == ("time", None, 4.25)
    cfg = _print_config(capsys, monkeypatch, ["--max-minutes", "2", "--max-steps", "40"])  # a cap on a step schedule
    assert (cfg["schedule_clock"], cfg["max_steps"], cfg["max_minutes"]) == ("steps", 40, 2)


def test_two_demo_runs_give_the_same_model_and_say_how_long_they_take(tmp_path, caplog):
    """The demo's defaults (step clock, seeded data order, crops and init), shrunk to 3 steps of bioclip-micro: two
    runs give bit-identical weights and losses, and each states its length before training."""
    import torch

    from bioclip_fast.model import load_model

    argv = ["train", "--model", "bioclip-micro", "--batch-size", "32", "--max-steps", "3", "--num-workers", "0",
            "--threads", "1", "--no-eval-at-end", "--no-progress"]
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        with caplog.at_level("INFO", logger="bioclip_fast"):
            assert main([*argv, "--out", str(out)]) == 0
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training bioclip-micro")]
        assert len(said) == 1 and said[0].endswith(": 3 steps"), said
        caplog.clear()
        model = load_model(out / "model.pt")[0]
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        runs.append((model.state_dict(), losses))
    (w0, l0), (w1, l1) = runs
    assert len(l0) == 3 and l0 == l1
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
