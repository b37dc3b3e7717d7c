"""The BioCLIP 2 reference evaluation's conventions: CSV columns (cls/class/filepath), naming rules, as-is labels,
81 templates, top-1/3/5, the SimpleShot protocol (random.seed(fold)), skipping unreadable images, one-line errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from numpy import linalg as LA

from _fixtures_eval import corrupt, make_asis, make_rare_species
from bioclip_fast.eval.fewshot import reference_few_shot_eval, reference_support_split
from bioclip_fast.eval.naming import ReferenceTaxon
from bioclip_fast.eval.zeroshot import class_text, resolve_templates, resolve_text_types


@pytest.fixture(scope="module")
def micro():
    from bioclip_fast.model import create_model, get_tokenizer

    torch.manual_seed(0)
    model = create_model("bioclip-micro").eval()
    return model, get_tokenizer(model)


# ---- naming -----------------------------------------------------------------------------------------------------------
def test_reference_naming_rules():
    row = {"kingdom": "animalia", "phylum": "chordata", "cls": "aves", "order": "passeriformes", "family": "paridae",
           "genus": "baeolophus", "species": "Inornatus", "common_name": "Oak Titmouse", "class": "ignored label"}
    t = ReferenceTaxon.from_row(row, label="Oak Titmouse")
    tax = "Animalia Chordata Aves Passeriformes Paridae Baeolophus inornatus"
    assert t.text("taxonomic") == t.text("taxon") == tax
    assert t.text("scientific") == "Baeolophus inornatus"
    assert t.text("taxon_com") == f"{tax} with common name Oak Titmouse"
    assert t.text("sci_com") == "Baeolophus inornatus with common name Oak Titmouse"
    assert t.text("asis") == t.text("as_is") == "Oak Titmouse"
    # no common name: no suffix, and `com` is empty like the reference's (no fallback)
    bare = ReferenceTaxon.from_row({**row, "common_name": ""})
    assert bare.text("taxonomic_common") == tax and bare.text("common") == ""
    # no kingdom: the reference's taxonomic name is the binomial only
    assert ReferenceTaxon.from_row({**row, "kingdom": ""}).text("taxonomic") == "Baeolophus inornatus"
    # our convention (class = the rank, no cls column) and the binomial in `species`
    ours = ReferenceTaxon.from_row({"kingdom": "Animalia", "class": "Insecta", "genus": "Danaus",
                                    "species": "Danaus plexippus"})
    assert ours.cls == "Insecta" and ours.text("scientific") == "Danaus plexippus"
    assert class_text(t, "taxon_com") == f"{tax} with common name Oak Titmouse"
    assert resolve_text_types("asis,taxon_com") == ["as_is", "taxonomic_common"]
    with pytest.raises(ValueError, match="unknown text type"):
        resolve_text_types("latin")


def test_as_is_uses_the_class_column_when_ranks_are_present(tmp_path):
    """The reference's to_classes("asis") returns the `class` column even when the CSV has rank columns (cls,
    genus, species, ...) and a scientific name; as_is must not become genus + epithet."""
    from _fixtures_eval import write_csv, write_image

    from bioclip_fast.eval.datasets import load_eval_data

    rows = []
    for c, (genus, sp, label) in enumerate([("baeolophus", "inornatus", "Oak Titmouse (adult)"),
                                            ("cyanocitta", "cristata", "Blue Jay (adult)")]):
        for i in range(2):
            write_image(tmp_path / f"{c}/{i}.jpg", c, i)
            rows.append([f"{c}/{i}.jpg", "animalia", "chordata", "aves", "passeriformes", "x", genus, sp, label,
                         f"{genus.capitalize()} {sp}"])
    write_csv(tmp_path / "metadata.csv", ["filepath", "kingdom", "phylum", "cls", "order", "family", "genus",
                                          "species", "class", "scientific_name"], rows)
    data = load_eval_data(tmp_path / "metadata.csv", preprocess=lambda im: im)
    assert sorted(class_text(c, "as_is") for c in data.classes) == ["Blue Jay (adult)", "Oak Titmouse (adult)"]
    assert sorted(class_text(c, "scientific") for c in data.classes) == ["Baeolophus inornatus", "Cyanocitta cristata"]


def test_bioclip2_templates_are_the_training_caption_plus_openai_80():
    t81 = resolve_templates("bioclip2")
    assert len(t81) == 81 and t81[0] == "a photo of {}." and t81[1:] == resolve_templates("openai")
    assert resolve_templates(None) == t81  # the default


def test_reference_csv_conventions(tmp_path, micro):
    """Rare Species: `cls` is the rank, labels come from the taxonomy; NABirds: `class` is the label, used as is."""
    from bioclip_fast.eval.datasets import load_eval_data

    rare = load_eval_data(make_rare_species(tmp_path / "rare") / "metadata.csv", model=micro[0], batch_size=8)
    assert len(rare.classes) == 3 and all(isinstance(c, ReferenceTaxon) for c in rare.classes)
    texts = sorted(class_text(c, "taxonomic_common") for c in rare.classes)
    assert texts == [
        "Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus",  # no common name: no suffix
        "Animalia Chordata Aves Passeriformes Corvidae Cyanocitta cristata with common name Blue Jay",
        "Animalia Chordata Aves Passeriformes Paridae Baeolophus inornatus with common name Oak Titmouse",
    ]
    assert sum(len(b["key"]) for b in rare.loader) == 18  # `filepath` column, unnamed index column ignored
    birds = load_eval_data(make_asis(tmp_path / "nabirds") / "metadata.csv", model=micro[0])
    assert birds.classes == ["Blue Jay (Adult)", "Dark-eyed Junco", "Oak Titmouse"]
    for tt in ("as_is", "taxonomic_common", "scientific"):
        assert class_text(birds.classes[2], tt) == "Oak Titmouse"  # never "... with common name Oak Titmouse"


def test_zero_shot_reports_top3(micro):
    from bioclip_fast.eval.zeroshot import zero_shot_eval

    model, tok = micro
    classes = ["a", "b", "c", "d", "e", "f"]
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 6
    res = zero_shot_eval(model, tok, [{"image": images, "label": labels}], classes, templates="none", progress=False)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(classes)), dim=-1)
    top3 = (img @ txt.T).topk(3, dim=1).indices
    assert res["top3"] == pytest.approx((top3 == labels[:, None]).any(1).float().mean().item())
    assert res["top1"] <= res["top3"] <= res["top5"] and set(res["by_text_type"]["taxonomic_common"]) == {
        "top1", "top3", "top5"}


# ---- SimpleShot, reference protocol --------------------------------------------------------------------------------
def _reference_fold_accuracy(features, targets, kshot, fold):
    """A line-by-line port of the reference's split_few_shot_examples + get_few_shot_accuracy (classification.py)."""
    select = {}
    for f, c in zip(features, targets):
        select.setdefault(c, {"feature": []})["feature"].append(f)
    train, test, label, target = [], [], [], []
    random.seed(fold)
    for c, data in select.items():
        feats = data["feature"][:]
        random.shuffle(feats)
        train.append(feats[:kshot])
        test.extend(feats[kshot:])
        label.extend([c] * kshot)
        target.extend([c] * (len(feats) - kshot))
    flat, label, test, target = np.vstack(train), np.array(label), np.vstack(test), np.array(target)
    mean = flat.mean(axis=0)
    flat = (flat - mean) / LA.norm(flat - mean, 2, 1)[:, None]
    test = (test - mean) / LA.norm(test - mean, 2, 1)[:, None]
    centers = flat.reshape(len(select), kshot, flat.shape[-1]).mean(1)
    dist = LA.norm(centers[:, None, :] - test, 2, axis=-1)
    pred = label[::kshot][dist.argmin(0)]
    return float((pred == target).mean())


def test_reference_simpleshot_reproduces_the_reference_folds():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(5), [7, 9, 6, 12, 8]))  # uneven classes, interleaved order
    x = rng.normal(size=(5, 24))[y] * 0.8 + rng.normal(size=(len(y), 24))
    res = reference_few_shot_eval(x, y, shots=(1, 5), folds=5)
    for k in (1, 5):
        expected = [_reference_fold_accuracy(list(x), list(y), k, fold) for fold in range(5)]
        assert res[f"{k}-shot"]["folds"] == pytest.approx(expected)
        assert res[f"{k}-shot"]["n_query"] == [len(y) - 5 * k] * 5
    sup, qry = reference_support_split(y, 1, 0)
    assert len(set(sup) | set(qry)) == len(y) and not set(sup) & set(qry)
    with pytest.raises(ValueError, match="fewer than the requested 7-shot"):
        reference_few_shot_eval(x, y, shots=(7,))


# ---- the eval command -----------------------------------------------------------------------------------------------
def test_eval_cli_reference_defaults_and_skipped_images(tmp_path, micro, capsys):
    """Default protocol on a reference-layout folder with four unreadable images: they are skipped, counted, listed."""
    from bioclip_fast.cli import main
    from bioclip_fast.model import save_model

    save_model(tmp_path / "run" / "model.pt", micro[0], {})
    root = make_rare_species(tmp_path / "rare", per_class=7)
    files = sorted((root / "dataset").rglob("*.jpg"))  # 3 classes x 7
    bad = [files[0], files[7], files[14], files[1]]  # every class keeps >= 5 images for 5-shot
    for f, how in zip(bad, ("missing", "truncated", "garbage", "text")):
        corrupt(f, how)
    out = tmp_path / "out"
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(root / "metadata.csv"),
               "--tasks", "zeroshot,fewshot", "--out", str(out), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 4 unreadable image(s)" in err
    res = json.loads((out / "results.json").read_text())["results"]["run"]
    assert res["zeroshot"]["n"] == 21 - 4 and res["zeroshot"]["templates"] == "bioclip2"
    assert {"top1", "top3", "top5"} <= set(res["zeroshot"])
    assert res["skipped_images"]["count"] == 4
    assert {f["image"] for f in res["skipped_images"]["files"]} == {str(f.relative_to(root)) for f in bad}
    # reference SimpleShot on --data itself: every non-support image is a query
    assert res["fewshot"]["5-shot"]["n_query"] == [21 - 4 - 15] * 5 and "reference" in res["fewshot_protocol"]
    md = (out / "results.md").read_text()
    assert "Skipped images" in md and all(str(f.relative_to(root)) in md for f in bad)
    assert "zero-shot top-3" in md


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "zeroshot,bogus"], "--tasks: unknown ['bogus']"),
    (["--templates", "fancy"], "--templates/--text-types"),
    (["--text-types", "latin"], "unknown text type 'latin'"),
    (["--shots", "1,x"], "--shots '1,x'"),
    (["--suite", "bioclip2"], "--suite bioclip2 needs --data-root"),
    (["--suite", "bioclip2", "--data-root", "/nonexistent/dir"], "--data-root /nonexistent/dir: not a directory"),
    (["--folds", "0"], "--folds must be >= 1"),
])
def test_eval_cli_bad_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    from bioclip_fast.cli import main

    rc = main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("bioclip-fast eval: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_eval_cli_missing_checkpoint_and_small_class(tmp_path, micro, capsys):
    from bioclip_fast.cli import main
    from bioclip_fast.model import save_model

    rc = main(["eval", "--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "absent" in err and "Traceback" not in err
    # every class below k: that k cannot be scored (said before the model is loaded, and at the end: exit 2), but
    # the results of what could run are written
    save_model(tmp_path / "run" / "model.pt", micro[0], {})
    root = make_asis(tmp_path / "few", per_class=3)
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(root / "metadata.csv"),
               "--tasks", "fewshot", "--shots", "1,5", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "5-shot: 3 of 3 classes have fewer than 5 images" in err  # before any work
    assert "5-shot: only 0 class(es) have at least 5 images" in err.strip().splitlines()[-1]
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]["run"]
    assert res["fewshot"]["1-shot"]["top1"] is not None and res["fewshot"]["5-shot"]["top1"] is None


def test_eval_default_tasks_on_a_user_csv_with_a_rare_class(tmp_path, micro, capsys):
    """A biologist's CSV: four species, one with only 4 images. The default tasks all run: 5-shot over the three
    species with >= 5 images (the one left out named, before any work and in the results), 1-shot over all four, the
    chance level of what was scored stated beside the accuracies."""
    from _fixtures_eval import write_csv, write_image

    from bioclip_fast.cli import main
    from bioclip_fast.model import save_model

    save_model(tmp_path / "run" / "model.pt", micro[0], {})
    rows = []
    for c, (name, n) in enumerate([("Corvus corax", 4), ("Pica pica", 7), ("Parus major", 7), ("Sitta europaea", 7)]):
        for i in range(n):
            write_image(tmp_path / "birds" / f"{c}_{i}.jpg", c, i)
            rows.append([f"{c}_{i}.jpg", name])
    write_csv(tmp_path / "birds" / "metadata.csv", ["filepath", "scientific_name"], rows, index=False)
    out = tmp_path / "o"
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "birds" / "metadata.csv"),
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.index("5-shot: 1 of 4 classes have fewer than 5 images: Corvus corax (4)") < err.index("left out 1")
    r = json.loads((out / "results.json").read_text())["results"]["run"]
    assert {"zeroshot", "fewshot", "linear"} <= set(r) and "errors" not in r
    assert r["fewshot"]["5-shot"]["left_out"] == ["Corvus corax"] and r["fewshot"]["5-shot"]["classes"] == 3
    assert r["fewshot"]["5-shot"]["n_query"] == [3 * 7 - 15] * 5
    assert r["fewshot"]["1-shot"]["classes"] == 4 and r["fewshot"]["1-shot"]["left_out"] == []
    assert r["zeroshot"]["chance_top1"] == pytest.approx(0.25)
    assert r["zeroshot"]["notes"] == ["top-5 is 100% by construction: only 4 classes (k ≥ the number of classes)"]
    md = (out / "results.md").read_text()
    assert "chance (top-1) = 1/4 = 25.0%" in md
    assert "5-shot scored over 3 classes (chance 33.3%); left out, fewer than 5 images: Corvus corax" in md
    assert "| model | classes | chance top-1 | zero-shot top-1 |" in md and "| 25.0 |" in md


def test_leave_out_equals_the_reference_on_the_kept_classes():
    rng = np.random.default_rng(1)
    y = np.repeat(np.array(["a", "b", "c", "d"]), [3, 8, 6, 9])
    x = rng.normal(size=(len(y), 12))
    res = reference_few_shot_eval(x, y, shots=(1, 5), folds=3, rare_classes="leave_out")
    keep = y != "a"
    ref = reference_few_shot_eval(x[keep], y[keep], shots=(5,), folds=3)
    assert res["5-shot"]["folds"] == ref["5-shot"]["folds"] and res["5-shot"]["left_out"] == ["a"]
    assert res["1-shot"]["folds"] == reference_few_shot_eval(x, y, shots=(1,), folds=3)["1-shot"]["folds"]
    lone = reference_few_shot_eval(x, y, shots=(9,), folds=1, rare_classes="leave_out")["9-shot"]
    assert lone["top1"] is None and "only 1 class(es) have at least 9 images" in lone["error"]


def test_eval_two_classes_says_top3_top5_are_trivial_and_names_the_cli_flag(tmp_path, micro, capsys):
    from bioclip_fast.cli import main
    from bioclip_fast.model import save_model

    save_model(tmp_path / "run" / "model.pt", micro[0], {})
    root = make_asis(tmp_path / "two", labels=("Oak Titmouse", "Blue Jay"), per_class=6)
    out = tmp_path / "o"
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(root / "metadata.csv"),
               "--tasks", "zeroshot", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())["results"]["run"]["zeroshot"]
    assert r["top3"] == r["top5"] == 1.0
    assert r["notes"] == ["top-3 and top-5 are 100% by construction: only 2 classes (k ≥ the number of classes)"]
    md = (out / "results.md").read_text()
    assert "top-3 and top-5 are 100% by construction: only 2 classes" in md and "1/2 = 50.0%" in md
    # several models, one of them corrupt: the others are evaluated and written, exit 2 at the end
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    rc = main(["eval", "--checkpoint", str(tmp_path / "broken.pt"), "--checkpoint", str(tmp_path / "run"),
               "--data", str(root / "metadata.csv"), "--tasks", "zeroshot", "--out", str(out), "--no-progress"])
    assert rc == 2 and "1 task(s) not computed (first: broken / model" in capsys.readouterr().err
    both = json.loads((out / "results.json").read_text())["results"]
    assert both["run"]["zeroshot"]["top1"] == r["top1"] and "model" in both["broken"]["errors"]
    # a CSV whose label column cannot be guessed: the error names the CLI flag, before any model is loaded
    (tmp_path / "odd.csv").write_text("filepath,taxon_label\n0000/0.jpg,a\n")
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "odd.csv"),
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--label-column" in err and len(err.strip().splitlines()) == 1
