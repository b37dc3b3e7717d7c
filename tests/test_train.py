"""Training: config validation, exact equality with a hand-written torch step, GradCache equality, non-finite
handling, atomic checkpoints, FLOPs/MFU accounting, and the trained-model fixture's accuracy."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bioclip_fast.errors import CheckpointError
from bioclip_fast.train import checkpoint as ckpt
from bioclip_fast.train.config import ConfigError, TrainConfig, resolve_config
from bioclip_fast.train.preflight import validate_runtime, validate_static
from bioclip_fast.train.trainer import NonFiniteLossError, Trainer

from tests._tolerances import assert_grad_close

MICRO = {"model": "bioclip-micro", "precision": "fp32", "engine": "torch", "lr": 1e-3, "warmup_steps": 4,
         "max_steps": 10, "schedule_clock": "steps", "progress": False, "eval_at_end": False, "loss": "fused"}


def micro_trainer(tmp_path, **over) -> Trainer:
    cfg = resolve_config({**MICRO, "out": str(tmp_path / "run"), **over})
    return Trainer(cfg, build_data=False)


# sums behind one gradient element: over the batch's samples and each caption's 77 tokens (tolerances scale with it)
GRAD_TERMS = 16 * 77


def fixed_inputs(trainer: Trainer, n: int = 16, seed: int = 0, replay: int = 0) -> dict[str, torch.Tensor]:
    """Random images and captions that repeat (as species captions do) so text de-duplication is exercised."""
    g = torch.Generator().manual_seed(seed)
    s = trainer.image_size
    names = ["Danaus plexippus", "Vanessa atalanta", "Pieris rapae", "Papilio cresphontes", "Junonia coenia"]
    caps = [f"a photo of {names[i % len(names)]}." for i in range(n)]
    out = {"image": torch.randn(n, 3, s, s, generator=g), "text": trainer.tokenizer(caps).long()}
    if replay:
        out["replay_image"] = torch.randn(replay, 3, s, s, generator=g)
        out["replay_text"] = trainer.tokenizer([f"a picture number {i}" for i in range(replay)]).long()
    return out


def capture_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Gradients as the optimizer sees them, recorded right before each optimizer step."""
    seen: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in trainer.clip.named_parameters()}

    def hook(opt, args, kwargs):
        seen.append({names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                     if p.grad is not None})

    trainer.engine.optimizer.register_step_pre_hook(hook)
    return seen


def assert_weights_close(named_a, named_b, lr_sum: float, what: str = "") -> None:
    for (n, p), (_, q) in zip(named_a, named_b):
        if n.endswith("attn.in_proj_bias"):
            # The key bias has an exactly-zero gradient (softmax is shift-invariant), so both sides hold float
            # noise there, which Adam's g/|g| turns into up-to-lr updates: compare q/v tightly, k within lr.
            d = p.shape[0] // 3
            torch.testing.assert_close(p[d:2 * d], q[d:2 * d], rtol=0, atol=lr_sum)
            p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
        # atol 1e-5 is ~1% of one Adam step (lr 1e-3): float noise in a tiny gradient element can move that
        # element by a fraction of a step (Adam divides by |g|); a real difference moves weights by whole steps
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n} {what}: {m}")


# ------------------------------------------------------------------------------------------------ config
def test_presets_defaults_are_the_recipe_and_no_args_is_the_butterfly_run():
    recipe = resolve_config({"data": ["/some/shards-{000000..000009}.tar"]})
    assert recipe.preset == "bioclip2"
    assert (recipe.model, recipe.lr, recipe.warmup_steps, recipe.weight_decay) == ("ViT-L-14", 1e-4, 1875, 0.2)
    assert (recipe.beta1, recipe.beta2, recipe.eps, recipe.precision) == (0.9, 0.98, 1e-6, "bf16")
    assert recipe.logit_scale_max == pytest.approx(math.log(100))
    cpu = resolve_config({})
    assert cpu.preset == "butterflies" and cpu.model == "bioclip-nano" and cpu.max_minutes is None
    assert (cpu.schedule_clock, cpu.max_steps, cpu.precision) == ("steps", 550, "fp32")  # reproducible (issue 20)
    # explicit flags beat the preset
    assert resolve_config({"lr": 3e-3}).lr == 3e-3


def test_config_file_yaml_and_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: bioclip-micro\nlr: 0.01\ngrad_clip: 1.0\n")
    cfg = resolve_config({"lr": 0.02}, config_file=f)
    assert (cfg.model, cfg.lr, cfg.grad_clip) == ("bioclip-micro", 0.02, 1.0)
    f.write_text("learning_rate: 0.01\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        resolve_config({}, config_file=f)
    f.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match="batch_size='lots' is not a valid int"):
        resolve_config({}, config_file=f)


@pytest.mark.parametrize(
    "over, world, match",
    [
        ({"model": "ViT-Nope-99"}, 1, "unknown model 'ViT-Nope-99'"),
        ({"data": ["/definitely/missing/shard-000000.tar"]}, 1, "--data: shard spec .*: no such file or directory"),
        ({"data": ["/definitely/missing/*.tar"]}, 1, "no files match"),
        ({"val_data": ["/definitely/missing/val.tar"]}, 1, "--val-data: shard spec .*: no such file or directory"),
        ({"data": ["/definitely/missing/shard-{000000..000009}.tar"]}, 1, "10 of 10 expanded shard"),
        ({"batch_size": 10}, 4, "batch_size=10 is not divisible by the world size 4"),
        ({"batch_size": 16, "grad_cache_chunk": 3}, 1, "not divisible by grad_cache_chunk=3"),
        ({"schedule_clock": "time", "max_minutes": None}, 1, "needs max_minutes"),
        ({"text_types": ["latin"]}, 1, "unknown \\['latin'\\]"),
        ({"pretrained": "/no/such/ckpt.pt"}, 1, "pretrained: checkpoint file not found"),
        ({"replay_batch_size": 8}, 1, "replay_data is not"),
        ({"crop_scale": [0.5, 0.2]}, 1, "crop_scale"),
    ],
)
def test_bad_configs_fail_before_any_work(over, world, match):
    cfg = resolve_config(over)
    with pytest.raises(ConfigError, match=match):
        validate_static(cfg)
        validate_runtime(cfg, world_size=world)


def test_cli_reports_bad_config_with_exit_code_2(capsys):
    from bioclip_fast.cli import main

    assert main(["train", "--model", "ViT-Nope-99"]) == 2
    assert "unknown model 'ViT-Nope-99'" in capsys.readouterr().err
    assert main(["train", "--batch-size", "0"]) == 2
    assert "batch_size must be positive" in capsys.readouterr().err
    assert main(["train", "--print-config", "--lr", "0.005", "--no-dedup-text"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 0.005 and printed["dedup_text"] is False and printed["preset"] == "butterflies"


def test_deepspeed_json_is_checked_against_flags(tmp_path):
    from bioclip_fast.train.engine import deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 3}}))
    cfg = resolve_config({**MICRO, "engine": "deepspeed", "deepspeed_config": str(f), "batch_size": 16})
    with pytest.raises(ConfigError, match="train_batch_size=999 disagrees"):
        deepspeed_config(cfg, world_size=2, micro_batch=8, micro_steps=1)
    f.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        deepspeed_config(cfg, world_size=2, micro_batch=8, micro_steps=1)
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": False}}))
    ds = deepspeed_config(cfg, world_size=2, micro_batch=4, micro_steps=2)  # GradCache: 2 chunks of 4
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False


# ------------------------------------------------------------------------------------------------ exactness
def test_one_step_equals_hand_written_torch_step(tmp_path):
    # dedup off: same summation order as the reference (dedup's exactness is tested on its own below)
    tr = micro_trainer(tmp_path, weight_decay=0.2, dedup_text=False)
    cfg: TrainConfig = tr.cfg
    ref = copy.deepcopy(tr.clip)
    grads = capture_grads(tr)
    batches = [fixed_inputs(tr, seed=s) for s in range(2)]

    # hand-written: open_clip-style loss and AdamW, wd on >=2-D weights only, open_clip warmup lr*(s+1)/warmup
    named = list(ref.named_parameters())
    no_wd = [p for n, p in named if p.ndim < 2 or "logit_scale" in n]
    wd = [p for n, p in named if not (p.ndim < 2 or "logit_scale" in n)]
    opt = torch.optim.AdamW([{"params": wd, "weight_decay": cfg.weight_decay}, {"params": no_wd, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for step, batch in enumerate(batches):
        res = tr.train_step(batch)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (step + 1) / cfg.warmup_steps
        img = F.normalize(ref.encode_image(batch["image"]), dim=-1)
        txt = F.normalize(ref.encode_text(batch["text"]), dim=-1)
        logits = ref.logit_scale.exp() * img @ txt.T
        labels = torch.arange(len(img))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in named}
        opt.step()
        with torch.no_grad():
            ref.logit_scale.clamp_(0, math.log(100))

        assert res["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert set(grads[step]) == set(ref_grads)
        for n, g in grads[step].items():
            assert_grad_close(g, ref_grads[n], n_terms=GRAD_TERMS, msg=f"grad of {n} at step {step}")
        lr_sum = cfg.lr * sum(k + 1 for k in range(step + 1)) / cfg.warmup_steps
        assert_weights_close(tr.clip.named_parameters(), named, lr_sum, f"after step {step}")
    assert tr.engine.lr == pytest.approx(cfg.lr * 3 / cfg.warmup_steps)


@pytest.mark.parametrize("replay", [0, 8])
def test_grad_cache_equals_no_cache(tmp_path, replay):
    over = {"continual_proj": True} if replay else {}
    plain = micro_trainer(tmp_path / "a", **over)
    cached = micro_trainer(tmp_path / "b", grad_cache_chunk=4, **over)
    for (n, p), (_, q) in zip(plain.clip.named_parameters(), cached.clip.named_parameters()):
        assert torch.equal(p, q), f"same seed must give the same init ({n})"
    g_plain, g_cached = capture_grads(plain), capture_grads(cached)
    for s in range(2):
        batch = fixed_inputs(plain, seed=s, replay=replay)
        a, b = plain.train_step(batch), cached.train_step(batch)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if replay:
            assert b["loss_replay"] == pytest.approx(a["loss_replay"], rel=1e-5)
        assert set(g_cached[s]) == set(g_plain[s])
        for n in g_plain[s]:
            assert_grad_close(g_cached[s][n], g_plain[s][n], n_terms=GRAD_TERMS, msg=f"grad {n}")
    assert_weights_close(cached.clip.named_parameters(), plain.clip.named_parameters(), 3 * plain.cfg.lr / 4)
    if replay:  # the replay loss trains continual_proj, and only replay samples reach it
        assert g_plain[0]["visual.continual_proj"].abs().sum() > 0


def test_text_dedup_is_exact(tmp_path):
    a = micro_trainer(tmp_path / "a", dedup_text=True)
    b = micro_trainer(tmp_path / "b", dedup_text=False)
    ga, gb = capture_grads(a), capture_grads(b)
    batch = fixed_inputs(a)
    ra, rb = a.train_step(batch), b.train_step(batch)
    assert a.module.last_text_fraction == pytest.approx(5 / 16)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    for n in ga[0]:
        assert_grad_close(ga[0][n], gb[0][n], n_terms=GRAD_TERMS, msg=n)


# ------------------------------------------------------------------------------------------------ non-finite & checkpoints
def _state(trainer):
    return {n: p.detach().clone() for n, p in trainer.clip.named_parameters()}


def test_nonfinite_loss_errors_or_skips_and_never_updates(tmp_path):
    tr = micro_trainer(tmp_path / "err")
    bad = fixed_inputs(tr)
    bad["image"][3] = float("nan")
    before = _state(tr)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        tr.train_step(bad)
    assert all(torch.equal(p, before[n]) for n, p in tr.clip.named_parameters())

    sk = micro_trainer(tmp_path / "skip", nonfinite="skip", max_nonfinite_skips=1)
    before = _state(sk)
    assert sk.train_step(bad)["skipped"] is True
    assert all(torch.equal(p, before[n]) for n, p in sk.clip.named_parameters())
    assert sk.engine.scheduler.step_count == 0  # a skipped step does not advance the schedule
    good = sk.train_step(fixed_inputs(sk))
    assert not good["skipped"] and math.isfinite(good["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in sk.clip.named_parameters())
    sk.train_step(bad)
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        sk.train_step(bad)


def test_checkpoint_is_atomic_and_nan_weights_are_never_saved(tmp_path, monkeypatch):
    tr = micro_trainer(tmp_path)
    tr.train_step(fixed_inputs(tr))
    tr.step = 1
    first = tr.save()
    saved = _state(tr)
    root = tr.run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == first.name

    # crash in the middle of writing step 2: the previous checkpoint stays the resumable one
    tr.train_step(fixed_inputs(tr, seed=1))
    tr.step = 2

    def crash(_):
        raise OSError("simulated crash during fsync")

    monkeypatch.setattr(ckpt, "_fsync_tree", crash)
    with pytest.raises(CheckpointError, match="manifest.json failed: simulated crash"):
        tr.save()
    assert not list(root.glob(".tmp-*"))  # a failed write removes its partial checkpoint
    monkeypatch.undo()
    assert (root / "latest").read_text().strip() == first.name
    assert ckpt.find_checkpoint(tr.run_dir) == first

    # NaN weights: refuse to save, keep the last good checkpoint
    with torch.no_grad():
        tr.clip.text_projection[0, 0] = float("nan")
    tr.step = 3
    with pytest.raises(NonFiniteLossError, match="refusing to write a checkpoint"):
        tr.save()
    assert ckpt.find_checkpoint(tr.run_dir) == first

    # a fresh trainer resumes exactly the step-1 state (model, optimizer, schedule)
    resumed = micro_trainer(tmp_path, resume=str(tr.run_dir))
    assert resumed.step == 1 and resumed.engine.scheduler.step_count == 1
    for n, p in resumed.clip.named_parameters():
        assert torch.equal(p, saved[n]), n
    opt_a = resumed.engine.optimizer.state_dict()["state"]
    assert opt_a and all(int(s["step"]) == 1 for s in opt_a.values())
    # the next save cleans up the debris of the crashed one
    resumed.step = 4
    resumed.save()
    assert not list(root.glob(".tmp-*"))


def test_resume_rejects_other_engine_or_world_size(tmp_path):
    tr = micro_trainer(tmp_path)
    tr.step = 1
    d = tr.save()
    meta = json.loads((d / "meta.json").read_text())
    meta["world_size"] = 2
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="meta.json is .* bytes, the manifest says"):  # an edit is corruption
        micro_trainer(tmp_path, resume=str(tr.run_dir))
    # as if written by a 2-rank run: re-record meta.json in the manifest
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["meta.json"] = {"size": (d / "meta.json").stat().st_size,
                                 "sha256": ckpt.file_sha256(d / "meta.json")}
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="world size 2"):
        micro_trainer(tmp_path, resume=str(tr.run_dir))


# ------------------------------------------------------------------------------------------------ FLOPs / MFU
def test_flops_formula_vit_l14_and_mfu():
    from bioclip_fast.model import get_model_config
    from bioclip_fast.train.metrics import ThroughputMeter, model_flops, peak_tflops_for

    f = model_flops(get_model_config("ViT-L-14"))
    assert f.image_fwd == pytest.approx(162e9, rel=0.02)
    assert f.text_fwd == pytest.approx(13.3e9, rel=0.03)
    assert f.train_per_sample(1024, 1) == pytest.approx(526e9, rel=0.02)
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("cpu") is None
    m = ThroughputMeter(f, global_batch=1024, world_size=2, peak_tflops=989.0, grad_checkpointing=True)
    r = m.record(data_wait_s=0.25, step_s=0.75)
    assert r["img_s"] == pytest.approx(1024.0) and r["img_s_per_rank"] == pytest.approx(512.0)
    assert r["data_wait_frac"] == pytest.approx(0.25)
    assert r["mfu"] == pytest.approx(512 * f.train_per_sample(1024, 2) / 989e12)
    assert r["hfu"] > r["mfu"]  # recompute counted in HFU only


# ------------------------------------------------------------------------------------------------ the default run
def test_default_run_learns_and_writes_its_outputs(trained_model_dir):
    from bioclip_fast.model import load_model

    res = json.loads((trained_model_dir / "results.json").read_text())
    zs = res["zero_shot"]
    assert zs["n"] > 100 and len(zs["per_class"]) == 10
    # chance is 10%; its std on 167 images is 2.3 points, so 15% is a clear (>2 sigma) sign of learning even when
    # a loaded CI machine gives the 1-minute run few epochs
    assert zs["top1"] > 0.15, f"1-minute run should beat chance (10%) clearly; got {zs['top1']:.3f}"
    recs = [json.loads(x) for x in (trained_model_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]
    for key in ("loss", "lr", "logit_scale", "img_s", "img_s_per_rank", "tflops_per_rank", "data_wait_frac",
                "peak_mem_gb", "mfu"):
        assert key in recs[-1]
    assert recs[-1]["lr"] < 0.05 * max(r["lr"] for r in recs)  # the wall-clock cosine annealed by the end
    assert (trained_model_dir / "loss.png").stat().st_size > 10_000
    model, _, tok, meta = load_model(trained_model_dir / "model.pt")
    assert len(meta["classes"]) == 10 and meta["class_names"][0].count(" ") == 1
    assert model.logit_scale.shape == (1,)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_gpu_bf16_training_runs_with_dali_and_reports_mfu(tmp_path, engine):
    """bf16 on CUDA: DeepSpeed ZeRO-2 (bf16 weights, fp32 master) or torch autocast, DALI data, MFU from the table."""
    from bioclip_fast.data.decode_dali import dali_import_error

    if dali_import_error() is not None:  # as test_loader: a GPU host may lack DALI
        pytest.skip(f"DALI unavailable: {dali_import_error()}")
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    cfg = resolve_config({"model": "bioclip-tiny", "engine": engine, "precision": "bf16", "batch_size": 64,
                          "max_steps": 30, "max_minutes": None, "schedule_clock": "steps", "lr": 1e-3,
                          "warmup_steps": 5, "out": str(tmp_path / engine), "progress": False, "num_workers": 2,
                          "peak_tflops": 989.0})
    tr = Trainer(cfg)
    assert tr.device.type == "cuda" and tr.loader.backend == "dali"
    summary = tr.fit()
    recs = [json.loads(x) for x in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert sum(r["loss"] for r in recs[-5:]) < sum(r["loss"] for r in recs[:5])
    assert recs[-1]["mfu"] is not None and 0 < recs[-1]["mfu"] < 1
    assert recs[-1]["peak_mem_kind"] == "cuda_max_allocated"
    assert summary["zero_shot"]["top1"] >= 0.0


# ------------------------------------------------------------------------------------------------ replay, end to end
def _caption_shard(path, n: int = 48):
    """A LAION-style replay shard: key.jpg + key.txt (bundled butterfly photos with generic captions)."""
    import io
    import tarfile

    from bioclip_fast.data.bundled import butterflies_root

    images = sorted((butterflies_root() / "images").glob("*.jpg"))[:n]
    with tarfile.open(path, "w") as tf:
        for i, img in enumerate(images):
            for ext, data in (("jpg", img.read_bytes()), ("txt", f"an insect photo number {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_replay_data_trains_continual_proj_end_to_end(tmp_path):
    shard = _caption_shard(tmp_path / "replay-000000.tar")
    cfg = resolve_config({**MICRO, "batch_size": 32, "replay_data": [str(shard)], "replay_batch_size": 16,
                          "max_steps": 3, "grad_cache_chunk": 8, "out": str(tmp_path / "run"), "num_workers": 0,
                          "threads": 1})
    tr = Trainer(cfg)
    assert tr.cfg.continual_proj is None and tr.clip.visual.continual_proj is not None  # auto-enabled by replay
    proj0 = tr.clip.visual.continual_proj.detach().clone()
    vproj0 = tr.clip.visual.proj.detach().clone()
    tr.fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(math.isfinite(r["loss_replay"]) and r["loss_replay"] > 0 for r in recs)
    for r in recs:  # total = biology + replay_weight * replay
        assert r["loss"] == pytest.approx(r["loss_bio"] + r["loss_replay"], rel=1e-5)
    assert not torch.equal(tr.clip.visual.continual_proj, proj0)
    assert not torch.allclose(tr.clip.visual.continual_proj, tr.clip.visual.proj)  # two projectors diverge
    assert not torch.equal(tr.clip.visual.proj, vproj0)


def test_loss_check_is_the_steps_one_collective_with_the_parts(monkeypatch):
    """The loss parts (bio / replay) are averaged over ranks in the loss check's all-reduce (no collective and
    host read of their own per part), next to the stop and bad-data flags."""
    import types

    from bioclip_fast.train.signals import StopWatch
    from bioclip_fast.train.trainer import Trainer

    calls = []

    def fake_all_reduce(t, *a, **kw):  # 2 ranks: the other rank saw twice these values
        calls.append(t.clone())
        t.mul_(2.0)

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    me = types.SimpleNamespace(loader=None, info=types.SimpleNamespace(distributed=True, world_size=2),
                               stop_watch=StopWatch())
    ok = Trainer._loss_ok(me, torch.tensor(3.0), {"loss_bio": torch.tensor(2.5), "loss_replay": torch.tensor(0.5)})
    assert ok and len(calls) == 1 and calls[0].numel() == 6
    assert me._last_loss == 3.0 and me._last_parts == {"loss_bio": 2.5, "loss_replay": 0.5}
    calls.clear()
    assert not Trainer._loss_ok(me, torch.tensor(float("nan")), {"loss_bio": torch.tensor(1.0)})
    assert len(calls) == 1
