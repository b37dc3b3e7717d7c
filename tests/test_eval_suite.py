"""`bioclip-fast eval --suite bioclip2 --data-root DIR`: benchmarks found under DIR (absent ones listed), several
models, one table in the paper's layout (Markdown + JSON) and a bar chart."""
from __future__ import annotations

import json

import pytest
import torch

from _fixtures_eval import (corrupt, make_asis, make_awa2, make_fishnet, make_herbarium19, make_newt, make_plantdoc,
                            make_rare_species)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bioclip2_benchmarks")
    make_asis(root / "nabirds")
    make_asis(root / "PLT_VIL_Mini", labels=("Apple scab", "Apple healthy", "Corn rust"))  # a Meta-Album alias
    make_rare_species(root / "rare_species")
    for sub in ("ENA24", "island"):
        make_rare_species(root / "camera_trap" / sub)
    make_fishnet(root / "fishnet")
    make_newt(root / "newt")
    make_awa2(root / "AwA2-data")
    make_herbarium19(root / "herbarium19")
    make_plantdoc(root / "plantdoc")
    corrupt(root / "plantdoc" / "test" / "Corn leaf blight" / "1.jpg", "garbage")
    return root


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from bioclip_fast.model import create_model, save_model

    d = tmp_path_factory.mktemp("models")
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_model(d / "runs" / name / "model.pt", create_model("bioclip-micro"), {})
    return d


def test_suite_discovers_present_and_absent_benchmarks(data_root):
    from bioclip_fast.eval.suite import discover

    found, absent = discover(data_root)
    assert set(found) == {"nabirds", "plantvillage", "rare_species", "camera_trap", "fishnet", "newt", "awa2",
                          "herbarium19", "plantdoc"}
    assert set(absent) == {"plankton", "insects", "insects2", "plantnet", "fungi", "medicinal_leaf"}


def test_suite_readme_command(tmp_path, two_models, capsys, monkeypatch):
    """The README's suite command, as written (reference protocols, default runs), on a root holding three tiny
    benchmarks, with two micro models."""
    from bioclip_fast.cli import main

    root = tmp_path / "benchmarks"
    make_asis(root / "nabirds")
    make_rare_species(root / "rare_species")
    make_plantdoc(root / "plantdoc")
    monkeypatch.chdir(two_models)
    rc = main(["eval", "--suite", "bioclip2", "--data-root", str(root),
               "--checkpoint", "runs/a/model.pt", "--checkpoint", "runs/b/model.pt", "--out", "suite/"])
    assert rc == 0
    res = json.loads((two_models / "suite" / "suite.json").read_text())
    assert set(res["results"]) == {"a", "b"} and len(res["results"]["a"]["beyond"]["plantdoc"]["runs"]) == 5
    assert res["results"]["a"]["species"]["rare_species"]["fewshot"]["5-shot"]["n_query"] == [3] * 5
    assert (two_models / "suite" / "suite.md").is_file() and (two_models / "suite" / "suite.png").is_file()


def test_suite_table_in_the_paper_layout(data_root, two_models, capsys, monkeypatch):
    """Every kind of benchmark (aliases, camera-trap subsets, the five beyond-species layouts, an unreadable image),
    two models; classifier runs shortened (--runs 1 --epochs 5 --svm-iter 2) to keep the test fast."""
    from bioclip_fast.cli import main

    monkeypatch.chdir(two_models)
    rc = main(["eval", "--suite", "bioclip2", "--data-root", str(data_root), "--runs", "1", "--epochs", "5",
               "--svm-iter", "2", "--checkpoint", "runs/a/model.pt", "--checkpoint", "runs/b/model.pt",
               "--out", "suite/", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "absent (skipped): plankton, insects, insects2, plantnet, fungi, medicinal_leaf" in captured.err
    assert "skipped 1 unreadable image(s)" in captured.err
    out = two_models / "suite"
    res = json.loads((out / "suite.json").read_text())
    assert set(res["results"]) == {"a", "b"} and res["meta"]["absent"][0] == "plankton"
    for r in res["results"].values():
        assert set(r["species"]) == {"nabirds", "plantvillage", "camera_trap", "rare_species"}
        assert set(r["beyond"]) == {"fishnet", "newt", "awa2", "herbarium19", "plantdoc"}
        ct = r["species"]["camera_trap"]
        assert set(ct["subsets"]) == {"ENA24", "island"}
        assert ct["zeroshot"]["top1"] == pytest.approx(
            sum(s["zeroshot"]["top1"] for s in ct["subsets"].values()) / 2)
        assert ct["subsets"]["ENA24"]["text_type"] == "taxonomic_common"
        assert r["species"]["nabirds"]["text_type"] == "as_is"
        assert r["skipped_images"]["count"] == 1
    zs = res["tables"]["Species classification: zero-shot top-1 (%)"]
    assert [row["Model"] for row in zs] == ["a", "b"]
    row = zs[0]
    assert list(row) == ["Model", "NABirds", "Camera Trap", "PlantVillage", "Rare Species", "Mean"]  # paper order
    assert row["Mean"] == pytest.approx(sum(row[k] for k in list(row)[1:-1]) / 4)
    beyond = res["tables"]["Beyond species classification (%)"][1]
    assert list(beyond) == ["Model", "FishNet", "NeWT", "AwA2", "Herbarium19", "PlantDoc", "Mean"]
    assert beyond["PlantDoc"] == res["results"]["b"]["beyond"]["plantdoc"]["score"]
    md = (out / "suite.md").read_text()
    assert "| Model | NABirds | Camera Trap | PlantVillage | Rare Species | Mean |" in md
    assert "| Model | FishNet | NeWT | AwA2 | Herbarium19 | PlantDoc | Mean |" in md
    assert "Absent benchmarks (skipped): plankton" in md and "Skipped images" in md and "1.jpg" in md
    # slurm/eval_other.sh's probe settings by default, its quirks flagged
    fish = res["results"]["a"]["beyond"]["fishnet"]
    assert "Adam lr 0.0001" in fish["protocol"] and "batch 256" in fish["protocol"]
    assert "Adam lr 1e-05" in res["results"]["a"]["beyond"]["awa2"]["protocol"]
    assert res["results"]["a"]["beyond"]["plantdoc"]["label_protocol"] == "reference"
    assert "## Reference quirks reproduced (flagged)" in md and "scored with dropout on" in md
    assert (out / "suite.png").read_bytes()[:4] == b"\x89PNG"


def test_suite_empty_root_is_a_one_line_error(tmp_path, two_models, capsys):
    from bioclip_fast.cli import main

    (tmp_path / "empty").mkdir()
    rc = main(["eval", "--suite", "bioclip2", "--data-root", str(tmp_path / "empty"),
               "--checkpoint", str(two_models / "runs" / "a"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no benchmark folder found" in err and "Traceback" not in err


def test_readme_eval_command(trained_model_dir, tmp_path, monkeypatch):
    """`bioclip-fast eval --checkpoint runs/<run>/model.pt --data butterflies --tasks zeroshot,fewshot,linear`, as
    written, with the short trained model: reference protocol on the held-out butterflies, far above chance."""
    from bioclip_fast.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--checkpoint", str(trained_model_dir / "model.pt"), "--data", "butterflies",
               "--tasks", "zeroshot,fewshot,linear"])
    assert rc == 0
    r = json.loads((tmp_path / "eval_results" / "results.json").read_text())["results"][trained_model_dir.name]
    assert r["zeroshot"]["n"] == 167 and r["zeroshot"]["top1"] > 0.3 and r["zeroshot"]["templates"] == "bioclip2"
    assert r["fewshot"]["5-shot"]["top1"] > 0.3 and r["fewshot"]["5-shot"]["n_query"] == [167 - 50] * 5
    assert r["linear"]["top1"] > 0.3 and r["skipped_images"]["count"] == 0


def _hub_snapshot(folder, model):
    """An open_clip hub-snapshot folder (what `push_to_hf_hub` writes and `local-dir:` reads) of ``model``."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["logit_scale"] = state["logit_scale"].reshape(())  # open_clip's scalar logit_scale
    save_file(state, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": model.model_cfg,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                              "image_size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return folder


def test_suite_on_a_hub_snapshot_folder(tmp_path, monkeypatch):
    """The suite command on released-weights layout (a hub-snapshot folder) gives the numbers our checkpoint of the
    same weights gives. Loading the snapshot is bioclip_fast.model.load_model's job (`local-dir:`)."""
    from bioclip_fast.cli import main
    from bioclip_fast.cli.args import resolve_checkpoint
    from bioclip_fast.model import create_model, load_model, save_model

    torch.manual_seed(3)
    model = create_model("bioclip-micro")
    snap = _hub_snapshot(tmp_path / "bioclip-2-snapshot", model)
    save_model(tmp_path / "ours" / "model.pt", model, {})
    assert resolve_checkpoint(str(snap)) == f"local-dir:{snap}"
    assert resolve_checkpoint(f"local-dir:{snap}") == f"local-dir:{snap}"
    try:
        load_model(f"local-dir:{snap}")
    except (OSError, ValueError) as e:
        pytest.skip(f"load_model does not read hub snapshots on this branch yet ({e})")
    root = tmp_path / "benchmarks"
    make_rare_species(root / "rare_species")
    make_plantdoc(root / "plantdoc")
    rc = main(["eval", "--suite", "bioclip2", "--data-root", str(root), "--checkpoint", str(snap),
               "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "suite"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "suite" / "suite.json").read_text())["results"]
    a, b = res["bioclip-2-snapshot"], res["ours"]
    assert a["species"]["rare_species"]["zeroshot"] == b["species"]["rare_species"]["zeroshot"]
    assert a["beyond"]["plantdoc"]["runs"] == pytest.approx(b["beyond"]["plantdoc"]["runs"])


def test_suite_several_models_one_table_and_failures_keep_every_other_result(tmp_path, capsys):
    """A hub snapshot, our run and a corrupt checkpoint in one suite run, over a root where one benchmark's layout
    is broken (caught before any model is loaded) and one fails while running (no readable test image): every other
    result is written, one table row per model in the order given, the paper's column order, each failed cell marked
    with its reason, and the exit status is 2 only at the end."""
    from bioclip_fast.cli import main
    from bioclip_fast.model import create_model, save_model

    torch.manual_seed(3)
    snap = _hub_snapshot(tmp_path / "bioclip-2", create_model("bioclip-micro"))
    torch.manual_seed(4)
    save_model(tmp_path / "runs" / "ours" / "model.pt", create_model("bioclip-micro"), {})
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    root = tmp_path / "benchmarks"
    make_rare_species(root / "rare_species")
    make_asis(root / "nabirds")
    make_fishnet(root / "fishnet")
    (root / "fishnet" / "test.csv").write_text("a,b\n1,2\n")  # broken layout
    make_plantdoc(root / "plantdoc")
    for f in (root / "plantdoc" / "test").rglob("*.jpg"):
        corrupt(f, "garbage")  # fails when run
    out = tmp_path / "suite"
    rc = main(["eval", "--suite", "bioclip2", "--data-root", str(root), "--checkpoint", str(snap),
               "--checkpoint", str(tmp_path / "runs" / "ours"), "--checkpoint", str(tmp_path / "broken.pt"),
               "--runs", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.index("error: fishnet") < err.index("bioclip-2:")  # the layout check comes before any model
    assert "error: 8 of 12 benchmark runs failed" in err.strip().splitlines()[-1]
    for f in ("suite.json", "suite.md", "suite.png"):
        assert (out / f).is_file()
    res = json.loads((out / "suite.json").read_text())
    assert list(res["results"]) == ["bioclip-2", "ours", "broken"]
    for m in ("bioclip-2", "ours"):
        r = res["results"][m]
        assert 0 <= r["species"]["rare_species"]["zeroshot"]["top1"] <= 1 and "error" not in r["species"]["nabirds"]
        assert "FishNet columns" in r["beyond"]["fishnet"]["error"]
        assert "no readable image" in r["beyond"]["plantdoc"]["error"]
    assert all("model not loaded" in b["error"] for g in ("species", "beyond")
               for b in res["results"]["broken"][g].values())
    zs = res["tables"]["Species classification: zero-shot top-1 (%)"]
    assert [row["Model"] for row in zs] == ["bioclip-2", "ours", "broken"]
    assert list(zs[0]) == ["Model", "NABirds", "Rare Species", "Mean"]  # the paper's order, not the folders'
    assert zs[0]["Mean"] == pytest.approx((zs[0]["NABirds"] + zs[0]["Rare Species"]) / 2)
    assert zs[2]["NABirds"] is None and zs[2]["Mean"] is None and "model not loaded" in zs[2]["failed"]["NABirds"]
    beyond = res["tables"]["Beyond species classification (%)"][1]
    assert beyond["FishNet"] is None and beyond["Mean"] is None and set(beyond["failed"]) == {"FishNet", "PlantDoc"}
    md = (out / "suite.md").read_text()
    assert "| Model | NABirds | Rare Species | Mean |" in md and "| Model | FishNet | PlantDoc | Mean |" in md
    assert "| ours | failed [1] | failed [2] | – |" in md and "| broken | failed [3] | failed [3] | – |" in md
    assert "## Failed benchmarks" in md and "(bioclip-2 / FishNet, ours / FishNet)" in md
    assert "(broken / NABirds, broken / Rare Species, broken / FishNet, broken / PlantDoc)" in md
