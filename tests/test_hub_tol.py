"""Model sources (`--model` forms, weights_only loading, architecture mismatch, export to an open_clip hub snapshot,
train --pretrained without --model) and the streamed TreeOfLife species table (chunked exact softmax, grouping,
subsets, compact names)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _fixtures_predict import (
    logit_scale_of,
    small_open_clip_model,
    softmax64,
    species_table,
    write_hub_snapshot,
    write_table,
)
from bioclip_fast.cli import main
from bioclip_fast.errors import CheckpointError, DataError, UsageError


# ---- the species table ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    emb, names = species_table()
    d = write_table(tmp_path_factory.mktemp("tol") / "embeddings", emb, names)
    return d, emb, names


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_chunked_scores_equal_full_softmax(table_dir, tmp_path, monkeypatch, dtype, chunk):
    """Top-k and per-species probabilities from the streamed, chunked pass equal a float64 softmax over all N
    (chunk sizes that do and do not divide N=72; a float16 table)."""
    from bioclip_fast.tol import SpeciesTable, TaxaNames

    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path / "cache"))
    d, emb, names = table_dir
    emb_t = emb.astype(dtype)
    write_table(tmp_path / "t", emb_t, names)
    table = SpeciesTable(tmp_path / "t" / "txt_emb_species.npy", TaxaNames.from_json(tmp_path / "t" /
                         "txt_emb_species.json"), chunk=chunk)
    feats = torch.nn.functional.normalize(torch.randn(5, emb.shape[0], generator=torch.Generator().manual_seed(0)),
                                          dim=-1)
    scale = 30.0
    ref = softmax64(scale * feats.double().numpy() @ emb_t.astype(np.float64))
    s = table.score(feats, scale, k=4, min_prob=1e-3)
    for r in range(5):
        order = np.argsort(-ref[r], kind="stable")[:4]
        assert s.top_indices[r].tolist() == order.tolist()
        np.testing.assert_allclose(s.top_values[r].numpy(), ref[r, order], atol=1e-6)
        cols, probs = s.groups[r]
        expect = np.flatnonzero(ref[r] > 1e-3)
        assert sorted(cols.tolist()) == expect.tolist()
        np.testing.assert_allclose(probs[np.argsort(cols)], ref[r, expect], atol=1e-6)
    # a subset renormalizes over its own species only
    keep = np.zeros(len(names), bool)
    keep[[3, 10, 11, 40, 71]] = True
    table.apply_filter(keep)
    sub = softmax64(scale * feats.double().numpy() @ emb_t.astype(np.float64)[:, keep])
    s = table.score(feats, scale, k=None)
    for r in range(5):
        order = np.argsort(-sub[r], kind="stable")
        assert s.top_indices[r].tolist() == np.flatnonzero(keep)[order].tolist()
        np.testing.assert_allclose(s.top_values[r].numpy(), sub[r, order], atol=1e-6)


def test_grouping_sums_species_above_min_prob(table_dir, tmp_path, monkeypatch):
    from bioclip_fast.tol import SpeciesTable

    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path / "cache"))
    d, emb, names = table_dir
    table = SpeciesTable.load(d.parent, chunk=10)
    feats = torch.nn.functional.normalize(torch.randn(1, emb.shape[0], generator=torch.Generator().manual_seed(3)),
                                          dim=-1)
    s = table.score(feats, 20.0, k=1, min_prob=0.01)
    ref = softmax64(20.0 * feats.double().numpy() @ emb.astype(np.float64))[0]
    totals: dict[str, float] = {}
    for i in np.flatnonzero(ref > 0.01):  # pybioclip's loop: family key = kingdom..family joined
        key = " ".join(names[i][0][:5])
        totals[key] = totals.get(key, 0.0) + ref[i]
    got = table.group(*s.groups[0], rank=4, k=None)
    assert [" ".join(names[c][0][:5]) for c, _ in got] == sorted(totals, key=lambda k: -totals[k])
    assert [p for _, p in got] == pytest.approx(sorted(totals.values(), reverse=True), abs=1e-6)


def test_names_are_compact_streamed_and_cached(table_dir, tmp_path, monkeypatch):
    from bioclip_fast import tol

    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path / "cache"))
    d, emb, names = table_dir
    path = d / "txt_emb_species.json"
    # the block-wise decoder agrees with json.load at every block size, even 1-character blocks
    for block in (1, 7, 1 << 22):
        assert list(tol._iter_json_array(path, block=block)) == json.loads(path.read_text())
    first = tol.TaxaNames.from_json(path)
    assert first.codes.shape == (len(names), 8) and first.codes.dtype == np.int32
    assert [first.entry(i) for i in range(len(names))] == [(n[0], n[1]) for n in names]
    assert len(first.offsets) - 1 < 2 * len(names)  # unique strings only (ranks repeat)
    again = tol.TaxaNames.from_json(path)  # from the cache, memory-mapped
    assert isinstance(again.codes, np.memmap) and np.array_equal(again.codes, first.codes)
    assert again.classification(1, 6)["common_name"] == names[1][1]


def test_bad_tables_fail_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path / "cache"))
    from bioclip_fast.tol import SpeciesTable

    emb, names = species_table()
    write_table(tmp_path / "short", emb[:, :-1], names)
    with pytest.raises(DataError, match="71 embeddings but 72 names"):
        SpeciesTable.load(tmp_path / "short")
    write_table(tmp_path / "garbage", emb, names)
    (tmp_path / "garbage" / "txt_emb_species.json").write_text('[[["a","b"], "c"], 5, ')
    with pytest.raises(DataError, match="txt_emb_species.json"):
        SpeciesTable.load(tmp_path / "garbage")
    (tmp_path / "img.jpg").write_bytes(b"x")
    rc = main(["predict", str(tmp_path / "img.jpg"), "--tol-embeddings", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nothing: no such directory" in err


# ---- model sources --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from bioclip_fast.model import add_continual_proj, create_model, save_model

    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    micro = create_model("bioclip-micro")
    add_continual_proj(micro)
    with torch.no_grad():
        micro.visual.continual_proj.add_(1.0)  # differs from proj: must not leak into the export
    classes = [{"kingdom": "Animalia", "genus": "Danaus", "species": "plexippus", "common_name": "Monarch"},
               {"kingdom": "Animalia", "genus": "Pieris", "species": "rapae", "common_name": "Cabbage White"}]
    save_model(tmp / "run" / "model.pt", micro, {"classes": classes, "config": {"out": Path("/x")}})
    return tmp


def test_our_checkpoints_load_weights_only_and_describe_themselves(ckpts):
    from bioclip_fast.model import resolve_pretrained

    obj = torch.load(ckpts / "run" / "model.pt", weights_only=True)  # no unpickling of Python objects needed
    assert obj["meta"]["config"]["out"] == "/x"
    name, cfg, state = resolve_pretrained(ckpts / "run")
    assert name == "bioclip-micro" and cfg["embed_dim"] == 64 and "visual.continual_proj" in state


def test_train_pretrained_without_model_builds_the_checkpoints_architecture(ckpts):
    from bioclip_fast.model import create_model
    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.preflight import validate_static

    cfg = resolve_config({"pretrained": str(ckpts / "run" / "model.pt")})
    assert cfg.model == "bioclip-micro"  # not the preset's bioclip-nano
    validate_static(cfg)
    model = create_model(cfg.model, pretrained=cfg.pretrained)
    assert model.visual.conv1.weight.shape[0] == 64
    cfg = resolve_config({"pretrained": str(ckpts / "run"), "model": "bioclip-nano"})
    assert cfg.model == "bioclip-nano"
    with pytest.raises(CheckpointError) as e:
        create_model(cfg.model, pretrained=cfg.pretrained)
    msg = str(e.value)
    assert "\n" not in msg and "is bioclip-micro" in msg and "model is bioclip-nano" in msg


def test_architecture_mismatch_is_one_line_through_the_cli(ckpts, tmp_path, capsys):
    from bioclip_fast.model import load_model

    model = load_model(ckpts / "run")[0]
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    img = tmp_path / "x.jpg"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    rc = main(["predict", str(img), "--model", "bioclip-tiny", "--pretrained", str(tmp_path / "plain.pt"),
               "--cls", "a,b"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "checkpoint" in err[0] and "is embed 64" in err[0] and "model is bioclip-tiny" in err[0]
    # the right architecture for the same file works, and finds the same features as the checkpoint
    rc = main(["embed", str(img), "--model", "bioclip-micro", "--pretrained", str(tmp_path / "plain.pt"),
               "-o", str(tmp_path / "e.npy"), "--no-progress"])
    assert rc == 0
    rc = main(["embed", str(img), "--model", str(ckpts / "run"), "-o", str(tmp_path / "f.npy"), "--no-progress"])
    assert rc == 0 and np.allclose(np.load(tmp_path / "e.npy"), np.load(tmp_path / "f.npy"), atol=1e-6)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    rc = main(["embed", str(img), "--model", "bioclip-micro", "--pretrained", str(tmp_path / "w.safetensors"),
               "-o", str(tmp_path / "g.npy"), "--no-progress"])
    assert rc == 0 and np.allclose(np.load(tmp_path / "g.npy"), np.load(tmp_path / "f.npy"), atol=1e-6)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('I10_PWNED', '/nonexistent/x')}",))


def test_downloaded_weights_are_never_unpickled(tmp_path, capsys, monkeypatch):
    """A hub snapshot whose .bin carries a pickle payload is refused, and the payload never runs."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("I10_PWNED", str(marker))
    snap = write_hub_snapshot(small_open_clip_model(), tmp_path / "evil", safetensors=False)
    state = small_open_clip_model().state_dict()
    (tmp_path / "x.jpg").write_bytes((Path(__file__).parent.parent / "bioclip_fast" / "assets" / "leeds_butterflies" /
                                      "images" / "0010001.jpg").read_bytes())
    from bioclip_fast.model import read_weights_file

    for legacy in (False, True):
        if legacy:  # a raw pickle, as very old torch.save wrote
            with open(snap / "open_clip_pytorch_model.bin", "wb") as f:
                pickle.dump({"state_dict": state, "x": _Payload()}, f)
        else:
            torch.save({**state, "x": _Payload()}, snap / "open_clip_pytorch_model.bin")
        rc = main(["embed", str(tmp_path / "x.jpg"), "--model", f"local-dir:{snap}", "-o", str(tmp_path / "e.json")])
        err = capsys.readouterr().err
        assert rc == 2 and "never unpickled" in err and err.count("\n") == 1, err
        with pytest.raises(CheckpointError, match="never unpickled"):
            read_weights_file(snap / "open_clip_pytorch_model.bin")
        assert not marker.exists() and not (tmp_path / "e.json").exists()


def test_hf_hub_without_network_or_cache_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    for argv in (["predict", str(img)], ["embed", str(img), "--model", "hf-hub:imageomics/bioclip-2"],
                 ["list-tol-taxa"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "imageomics/" in err and "Traceback" not in err
    # an architecture with a pretrained tag needs a download too; several tags need a choice
    for argv, msg in ((["embed", str(img), "--model", "ViT-B-32", "--pretrained", "openai"], "cannot download"),
                      (["embed", str(img), "--model", "ViT-B-16"], "multiple pretrained tags")):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and msg in err, err


def test_validation_before_work(tmp_path, capsys):
    """Refused before any model is loaded (the model does not even exist)."""
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    cases = [
        (["embed", str(img), "--model", "nope/none", "-o", str(tmp_path / "x.csv")], "unknown suffix '.csv'"),
        (["embed", str(img), "--model", "nope/none", "-o", str(tmp_path / "x.npy"), "--format", "parquet"],
         "does not match --format parquet"),
        (["predict", str(img), "--model", "nope/none", "--k", "0"], "--k must be >= 1"),
        (["predict", str(img), "--model", "nope/none", "--cls", "a,b", "--rank", "genus"], "cannot be combined"),
        (["predict", str(img), "--model", "nope/none", "--subset", str(tmp_path / "no.csv")], "no.csv"),
        (["predict", str(img), "--model", "nope/none", "--device", "banana"], "--device banana"),
    ]
    if not torch.cuda.is_available():
        cases.append((["predict", str(img), "--model", "nope/none", "--device", "cuda"], "no CUDA GPU"))
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.npy").exists()


def test_folder_with_missing_garbage_and_non_image_files(ckpts, tmp_path, capsys):
    from bioclip_fast.data.bundled import butterflies_root

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    shutil.copy(butterflies_root() / "images" / "0010001.jpg", d / "a.jpg")
    shutil.copy(butterflies_root() / "images" / "0020039.jpg", d / "sub" / "b.JPG")
    (d / "garbage.png").write_bytes(os.urandom(300))
    (d / "notes.txt").write_text("field notes")
    (d / "empty.jpg").write_bytes(b"")
    rc = main(["predict", str(d), str(tmp_path / "missing.jpg"), "--model", str(ckpts / "run"), "--no-progress",
               "--templates", "simple", "-o", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert rc == 0
    for bad in ("garbage.png", "notes.txt", "empty.jpg", "missing.jpg"):
        assert bad in err
    assert "predicted 2 image(s), skipped 4" in err
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("file_name,kingdom") and len(rows) == 1 + 2 * 2  # 2 images x 2 classes


def test_export_open_clip_snapshot_loads_in_open_clip_and_predict(ckpts, tmp_path, capsys):
    import open_clip

    from bioclip_fast.model import load_model

    out = tmp_path / "exported"
    rc = main(["export", str(ckpts / "run"), "--format", "open_clip", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "dropped visual.continual_proj" in err
    assert sorted(p.name for p in out.iterdir()) == ["bioclip_fast_meta.json", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    oc_model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    ours = load_model(ckpts / "run")[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(oc_model.encode_image(x), ours.encode_image(x))
        tok = open_clip.get_tokenizer(f"local-dir:{out}")(["a photo of a monarch"])
        torch.testing.assert_close(oc_model.encode_text(tok), ours.encode_text(tok))
    assert logit_scale_of(oc_model.requires_grad_(False)) == pytest.approx(logit_scale_of(ours))
    # our predict loads the export (label set from bioclip_fast_meta.json) and the run identically
    img = str(Path(__file__).parent.parent / "bioclip_fast" / "assets" / "leeds_butterflies" / "images" /
              "0010001.jpg")
    outs = []
    for model in (str(out), str(ckpts / "run")):
        assert main(["predict", img, "--model", model, "--templates", "simple", "--no-progress", "--format",
                     "json", "--preprocess", "model"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert [r["species"] for r in outs[0]] == [r["species"] for r in outs[1]]
    assert [r["score"] for r in outs[0]] == pytest.approx([r["score"] for r in outs[1]], abs=1e-5)
    rc = main(["export", str(ckpts / "run"), "--format", "open_clip", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_export_that_fails_midway_keeps_the_existing_snapshot(ckpts, tmp_path, monkeypatch):
    """A full disk while writing an export over an existing snapshot (--overwrite) leaves the old snapshot whole:
    every file is staged beside OUT first and only renamed in once all are written."""
    import safetensors.torch

    from bioclip_fast.hub import export_open_clip
    from bioclip_fast.model import load_model

    out = tmp_path / "snap"
    model = load_model(ckpts / "run")[0]
    export_open_clip(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        export_open_clip(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no staging folder left behind


def test_one_parser_names_every_model_string(ckpts, tmp_path):
    """parse_model_str is the one place a model string is read: each form maps to its source kind, nothing loads;
    load_model (paths to weights) leaves what is not a hub source to the weights reader and its one-line errors."""
    from bioclip_fast.model import load_model, parse_model_str

    snap = write_hub_snapshot(small_open_clip_model(), tmp_path / "snap")
    both = tmp_path / "both"  # a run folder that also holds a snapshot config: the run's model.pt wins
    shutil.copytree(ckpts / "run", both)
    (both / "open_clip_config.json").write_text("{}")
    cases = {
        None: ("hf-hub", "imageomics/bioclip-2"),
        "hf-hub:org/name": ("hf-hub", "org/name"),
        f"local-dir:{snap}": ("snapshot", str(snap)),
        str(snap): ("snapshot", str(snap)),
        str(ckpts / "run"): ("checkpoint", str(ckpts / "run" / "model.pt")),
        str(both): ("checkpoint", str(both / "model.pt")),
        str(ckpts / "run" / "model.pt"): ("checkpoint", str(ckpts / "run" / "model.pt")),
        "ViT-B-16": ("architecture", "ViT-B-16"),
        "bioclip-micro": ("architecture", "bioclip-micro"),
    }
    for spec, (kind, location) in cases.items():
        src = parse_model_str(spec)
        assert (src.kind, src.location) == (kind, location), spec
    for spec, msg in ((str(tmp_path / "missing.pt"), "no such file or directory"),
                      ("not-a-model", "known architecture"),
                      (str(tmp_path), "neither open_clip_config.json")):
        with pytest.raises(UsageError, match=msg):
            parse_model_str(spec)
    assert parse_model_str("not-a-model", architectures=False).kind == "checkpoint"
    with pytest.raises(CheckpointError, match="checkpoint not found: not-a-model"):
        load_model("not-a-model")
    assert load_model(both)[3]["classes"][0]["genus"] == "Danaus"


def test_list_models(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:2] == ["hf-hub:imageomics/bioclip", "hf-hub:imageomics/bioclip-2"]
    assert "ViT-L-14" in out and "bioclip-tiny" in out
    assert main(["list-models", "--model", "ViT-B-16"]) == 0
    assert "openai" in capsys.readouterr().out.split()
    assert main(["list-models", "--model", "ViT-Nope"]) == 2


def test_our_checkpoint_with_a_species_table(ckpts, tmp_path, capsys, monkeypatch):
    """A table must match the model's embedding size; a matching one is used with the model's own input size."""
    from bioclip_fast.model import load_model

    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path / "cache"))
    img = str(Path(__file__).parent.parent / "bioclip_fast" / "assets" / "leeds_butterflies" / "images" /
              "0010001.jpg")
    emb, names = species_table(dim=32)
    write_table(tmp_path / "t32", emb, names)
    rc = main(["predict", img, "--model", str(ckpts / "run"), "--tol-embeddings", str(tmp_path / "t32")])
    err = capsys.readouterr().err
    assert rc == 2 and "dimension 32, the model's 64" in err and err.count("\n") == 1
    emb, names = species_table(dim=64)
    write_table(tmp_path / "t64", emb, names)
    rc = main(["predict", img, "--model", str(ckpts / "run"), "--tol-embeddings", str(tmp_path / "t64"),
               "--rank", "order", "--format", "json", "--no-progress"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and 1 <= len(rows) <= 5 and list(rows[0]) == ["file_name", "kingdom", "phylum", "class", "order",
                                                                  "score"]
    # the same scores by hand: squash to the model's 32 px, softmax over the 72 species, summed per order
    from PIL import Image

    from bioclip_fast.preprocess import squash_preprocess

    model = load_model(ckpts / "run")[0]
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.encode_image(squash_preprocess(32)(Image.open(img).convert("RGB"))[None]),
                                          dim=-1)
    p = softmax64(logit_scale_of(model) * f.double().numpy() @ emb.astype(np.float64))[0]
    totals: dict[str, float] = {}
    for i in np.flatnonzero(p > 1e-9):
        totals[names[i][0][3]] = totals.get(names[i][0][3], 0.0) + p[i]
    assert {r["order"]: r["score"] for r in rows} == pytest.approx(
        dict(sorted(totals.items(), key=lambda kv: -kv[1])[:5]), abs=1e-5)


@pytest.mark.gpu
def test_species_table_on_gpu_equals_cpu(table_dir, tmp_path, monkeypatch):
    """The table uploaded once to the GPU gives the CPU stream's top-k and groups (fp32 both)."""
    from bioclip_fast.tol import SpeciesTable

    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path / "cache"))
    d, emb, names = table_dir
    feats = torch.nn.functional.normalize(torch.randn(9, emb.shape[0], generator=torch.Generator().manual_seed(5)),
                                          dim=-1)
    cpu = SpeciesTable.load(d.parent, chunk=16).score(feats, 25.0, k=5, min_prob=1e-4)
    gpu_table = SpeciesTable.load(d.parent, chunk=16, device="cuda")
    gpu = gpu_table.score(feats.cuda(), 25.0, k=5, min_prob=1e-4)
    assert gpu_table._gpu is not None and gpu_table._gpu.is_cuda
    assert torch.equal(cpu.top_indices, gpu.top_indices)
    torch.testing.assert_close(cpu.top_values, gpu.top_values, atol=1e-5, rtol=1e-4)
    for (c1, p1), (c2, p2) in zip(cpu.groups, gpu.groups):
        assert sorted(c1.tolist()) == sorted(c2.tolist())
        np.testing.assert_allclose(np.sort(p1), np.sort(p2), atol=1e-5)


def test_predict_log_like_pybioclip(ckpts, tmp_path, capsys):
    """--log: a new JSON record with pybioclip's fields, or text appended run after run; an existing .json is refused
    before any work."""
    img = str(Path(__file__).parent.parent / "bioclip_fast" / "assets" / "leeds_butterflies" / "images" /
              "0010001.jpg")
    base = ["predict", img, "--model", str(ckpts / "run"), "--templates", "simple", "--no-progress", "-o",
            str(tmp_path / "p.csv")]
    assert main([*base, "--log", str(tmp_path / "log.json")]) == 0
    rec = json.loads((tmp_path / "log.json").read_text())
    assert {"start", "end", "command_line", "model", "pretrained", "device", "top_level_settings",
            "predictions"} <= set(rec)
    assert rec["predictions"] == [{"images": [img], "details": {"rank": "species", "min_prob": 1e-9, "k": 5,
                                                                "batch_size": 10}}]
    assert main([*base, "--log", str(tmp_path / "log.json")]) == 2
    assert "already exists" in capsys.readouterr().err
    for _ in range(2):
        assert main([*base, "--cls", "a,b", "--log", str(tmp_path / "log.txt")]) == 0
    text = (tmp_path / "log.txt").read_text()
    assert text.count("Prediction Log") == 2 and "Classes: a,b" in text and img in text
