"""Evaluation: zero-shot (texts, templates, metrics, trained model beats chance), SimpleShot, linear probe, reports,
and the `bioclip-fast eval` command."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from bioclip_fast.eval.fewshot import cl2n, few_shot_eval, simpleshot_predict
from bioclip_fast.eval.linear_probe import linear_probe
from bioclip_fast.eval.report import confusion_matrix, markdown_table, plot_confusion, write_json
from bioclip_fast.eval.zeroshot import (
    class_text,
    resolve_templates,
    resolve_text_types,
    topk_accuracy,
    zero_shot_classifier,
    zero_shot_eval,
)
from bioclip_fast.taxonomy import Taxon

MONARCH = {"kingdom": "Animalia", "phylum": "Arthropoda", "class": "Insecta", "order": "Lepidoptera",
           "family": "Nymphalidae", "genus": "Danaus", "species": "plexippus", "common_name": "Monarch"}


@pytest.fixture(scope="module")
def micro():
    from bioclip_fast.model import create_model, get_tokenizer

    torch.manual_seed(0)
    model = create_model("bioclip-micro").eval()
    return model, get_tokenizer(model)


# ---- zero-shot ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MONARCH, Taxon.from_row(MONARCH)], ids=["row", "taxon"])
def test_class_text_matches_bioclip_formats(cls):
    tax = "Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus"
    assert class_text(cls, "taxonomic") == tax
    assert class_text(cls, "scientific") == "Danaus plexippus"
    assert class_text(cls, "common") == "Monarch"
    assert class_text(cls, "scientific_common") == "Danaus plexippus with common name Monarch"
    assert class_text(cls, "taxonomic_common") == f"{tax} with common name Monarch"
    assert class_text("a red fox", "taxonomic") == "a red fox"  # custom labels are used as they are
    with pytest.raises(ValueError, match="text_type"):
        class_text(cls, "latin")


def test_templates_and_text_types_resolve():
    openai = resolve_templates("openai")
    assert len(openai) == 80 and all("{}" in t for t in openai)
    assert resolve_templates("simple") == ["a photo of {}."]
    assert resolve_text_types("all") == ["taxonomic", "scientific", "common", "scientific_common", "taxonomic_common"]
    assert resolve_text_types("scientific,common") == ["scientific", "common"]
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["a photo"])
    assert resolve_text_types(["sci"]) == ["scientific"]  # the reference's spelling
    with pytest.raises(ValueError, match="unknown"):
        resolve_text_types(["sciname"])


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(logits, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3)  # only row 0 right at top-1
    assert acc[2] == pytest.approx(1.0)  # row 1: label 1 second; row 2: label 2 second
    assert acc[5] == pytest.approx(1.0)


def test_zero_shot_eval_equals_manual_cosine_classifier(micro):
    """The ensemble classifier and the accuracy bookkeeping agree with a direct computation from the towers."""
    model, tok = micro
    classes = [MONARCH, "a cabbage white butterfly", "a zebra longwing"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=g)
    labels = torch.arange(12) % 3
    loader = [{"image": images[i:i + 5], "label": labels[i:i + 5]} for i in range(0, 12, 5)]
    templates = ["a photo of {}.", "an image of {}."]
    types = ["scientific", "common"]
    res = zero_shot_eval(model, tok, loader, classes, text_types=types, templates=templates, progress=False)

    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        per_type = []
        for tt in types:
            emb = []
            for c in classes:
                t = model.encode_text(tok([tp.format(class_text(c, tt)) for tp in templates]))
                emb.append(torch.nn.functional.normalize(torch.nn.functional.normalize(t, dim=-1).mean(0), dim=0))
            per_type.append(torch.stack(emb))
        w = torch.nn.functional.normalize(per_type[0] + per_type[1], dim=-1)
    pred = (img @ w.T).argmax(1)
    assert res["n"] == 12
    assert res["top1"] == pytest.approx((pred == labels).float().mean().item())
    assert res["top5"] == 1.0  # 3 classes: the label is always within the top 5
    for c, name in enumerate(["Danaus plexippus", "a cabbage white butterfly", "a zebra longwing"]):
        assert res["per_class"][name] == pytest.approx((pred[labels == c] == c).float().mean().item())
    assert set(res["by_text_type"]) == set(types)
    weights = zero_shot_classifier(model, tok, classes, text_types=types, templates=templates)
    assert torch.allclose(weights, w.T, atol=1e-5)


def test_zero_shot_eval_rejects_bad_input(micro):
    model, tok = micro
    with pytest.raises(ValueError, match="label"):
        zero_shot_eval(model, tok, [{"image": torch.randn(2, 3, 32, 32)}], ["a", "b"], templates="none",
                       progress=False)
    with pytest.raises(ValueError, match="out of range"):
        zero_shot_eval(model, tok, [{"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 5])}],
                       ["a", "b"], templates="none", progress=False)
    with pytest.raises(ValueError, match="classes is empty"):
        zero_shot_classifier(model, tok, [])


def test_zero_shot_trained_model_beats_chance(trained_model_dir):
    """The briefly trained tiny model classifies the held-out butterflies far above chance (10 species: 10%)."""
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.model import load_model

    model, preprocess, tok, meta = load_model(trained_model_dir / "model.pt")
    data = load_eval_data("butterflies", split="val", preprocess=preprocess, batch_size=64)
    assert len(data.classes) == 10
    res = zero_shot_eval(model, tok, data.loader, data.classes, templates="simple", progress=False)
    print(f"zero-shot val top-1 {res['top1']:.3f} top-5 {res['top5']:.3f} (n={res['n']})")
    assert res["n"] == len(data.rows) > 100
    # the predict API over the checkpoint's own label set makes the same top-1 calls
    from bioclip_fast.predict import TreeOfLifeClassifier

    clf = TreeOfLifeClassifier(model=model, preprocess=preprocess, tokenizer=tok, meta=meta, device="cpu",
                               templates="simple", batch_size=64)
    ds = data.extra["dataset"]
    preds = clf.predict([str(ds.path(i)) for i in range(len(ds))], k=1)
    hits = [p["species"] == r["scientific_name"] for p, r in zip(preds, data.rows)]
    assert len(preds) == res["n"] and np.mean(hits) == pytest.approx(res["top1"], abs=1.5 / res["n"])
    assert res["top1"] >= 0.30, res
    assert res["top5"] >= 0.70, res


# ---- few-shot ---------------------------------------------------------------------------------------------------------
def test_simpleshot_matches_hand_computed_nearest_centroid():
    support = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = np.array(["A", "A", "B", "B"])
    # CL2N by hand: support mean (1.5, 1.5); A's members become (0.5,-1.5)/|.| = (0.3162,-0.9487) and
    # (2.5,-1.5)/|.| = (0.8575,-0.5145), so A's centroid is (0.5869,-0.7316); B's is its mirror image (-0.7316,0.5869).
    z = cl2n(support, support.mean(0))
    np.testing.assert_allclose(z[:2].mean(0), [0.58685, -0.73160], atol=1e-4)
    np.testing.assert_allclose(z[2:].mean(0), [-0.73160, 0.58685], atol=1e-4)
    # query (3, 1) -> centered (1.5,-0.5) -> (0.9487,-0.3162): squared distance 0.3035 to A, 3.6389 to B.
    # query (1, 1.6) -> centered (-0.5, 0.1) -> (-0.9806, 0.1961): 3.3175 to A, 0.2147 to B.
    # query (1.6, 1.4) -> centered (0.1,-0.1) -> (0.7071,-0.7071): 0.0151 to A, 3.7442 to B.
    pred = simpleshot_predict(support, labels, np.array([[3.0, 1.0], [1.0, 1.6], [1.6, 1.4]]))
    assert pred.tolist() == ["A", "B", "A"]


def test_few_shot_folds_are_seeded_and_sized():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 4
    y = np.repeat(np.arange(4), 12)
    x = centers[y] + rng.normal(size=(48, 16))
    a = few_shot_eval(x, y, shots=(1, 5), folds=5, seed=3)
    b = few_shot_eval(x, y, shots=(5,), folds=5, seed=3)
    assert a["5-shot"] == b["5-shot"]  # a k's folds do not depend on the other k values asked for
    assert len(a["1-shot"]["folds"]) == 5
    assert a["1-shot"]["n_query"] == [48 - 4] * 5 and a["5-shot"]["n_query"] == [48 - 20] * 5
    assert a["5-shot"]["top1"] > 0.9
    assert few_shot_eval(x, y, seed=4)["1-shot"]["folds"] != a["1-shot"]["folds"] or a["1-shot"]["std"] == 0
    with pytest.raises(ValueError, match="no examples left"):
        two = np.array([0, 1, 12, 13, 24, 25, 36, 37])
        few_shot_eval(x[two], y[two], shots=(2,), folds=1)  # 2 per class: nothing left to query
    with pytest.raises(ValueError, match="query_labels"):
        few_shot_eval(x, y, query_features=x)


# ---- linear probe ---------------------------------------------------------------------------------------------------
def test_linear_probe_separable_is_perfect_and_random_is_chance():
    rng = np.random.default_rng(1)
    dirs = np.linalg.qr(rng.normal(size=(32, 32)))[0][:5]
    ytr, yte = np.repeat(np.arange(5), 30), np.repeat(np.arange(5), 20)
    xtr = dirs[ytr] * 3 + 0.3 * rng.normal(size=(len(ytr), 32))
    xte = dirs[yte] * 3 + 0.3 * rng.normal(size=(len(yte), 32))
    res = linear_probe(xtr, ytr, xte, yte)
    assert res["top1"] == 1.0 and res["top5"] == 1.0
    assert res["probabilities"].shape == (100, 5)
    assert set(res["val_top1_by_C"]) == {"0.01", "0.1", "1.0", "10.0", "100.0"}
    noise = linear_probe(rng.normal(size=(150, 32)), ytr, rng.normal(size=(100, 32)), yte, C=1.0)
    assert noise["top1"] < 0.45  # chance is 0.2
    with pytest.raises(ValueError, match="absent from train_labels"):
        linear_probe(xtr, ytr, xte, yte + 1)


# ---- reports --------------------------------------------------------------------------------------------------------
def test_report_files(tmp_path):
    cm = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    png = plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json(tmp_path / "r.json", {"x": np.float32(0.5), "nan": float("nan"), "arr": np.arange(3), "t": torch.ones(2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 0.5, "nan": None, "arr": [0, 1, 2], "t": [1.0, 1.0]}
    md = markdown_table([{"model": "m", "top1": 0.4567}], ["model", "top1"], pct_columns=["top1"])
    assert md.splitlines()[2] == "| m | 45.7 |"
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix([3], [0], 3)


# ---- CLI ------------------------------------------------------------------------------------------------------------
def _small_csv(tmp_path, per_species=4):
    from bioclip_fast.data.bundled import butterflies_root

    root = butterflies_root()
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    taken: dict[str, int] = {}
    out = []
    for r in rows:
        if taken.get(r["scientific_name"], 0) < per_species:
            taken[r["scientific_name"]] = taken.get(r["scientific_name"], 0) + 1
            out.append({**r, "image": str(root / r["image"])})
    path = tmp_path / "small.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    return path


def test_eval_cli_writes_json_markdown_png(tmp_path, micro):
    from bioclip_fast.cli import main
    from bioclip_fast.model import save_model

    save_model(tmp_path / "run" / "model.pt", micro[0], {"classes": []})
    data = _small_csv(tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(data), "--out", str(out),
               "--templates", "simple", "--text-types", "scientific,common", "--folds", "2", "--shots", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]["run"]
    assert res["n_classes"] == 10 and res["zeroshot"]["n"] == 40
    assert set(res["zeroshot"]["by_text_type"]) == {"scientific", "common"}
    assert 0.0 <= res["zeroshot"]["top1"] <= res["zeroshot"]["top5"] <= 1.0
    assert np.array(res["zeroshot"]["confusion"]).sum() == 40
    assert len(res["fewshot"]["1-shot"]["folds"]) == 2 and "linear" in res
    md = (out / "results.md").read_text()
    assert "| run | 10 |" in md and "zero-shot top-1" in md
    assert (out / "confusion_run.png").read_bytes()[:4] == b"\x89PNG"
    assert all(math.isfinite(v) for v in res["zeroshot"]["per_class"].values())


def test_eval_data_from_shards_matches_csv_source(tmp_path, micro):
    """Our webdataset shards and the CSV they were built from give the same classes and the same zero-shot result."""
    from bioclip_fast.data.bundled import butterflies_root, read_metadata
    from bioclip_fast.data.shards import make_shards
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.eval.zeroshot import class_name

    model, tok = micro
    root = butterflies_root()
    rows = read_metadata(root / "metadata.csv")[::40]  # 21 images over several species
    make_shards(root, rows, tmp_path / "shards", samples_per_shard=8, workers=1, image_size=32, progress=False)
    sh = load_eval_data(tmp_path / "shards", model=model, tokenizer=tok, batch_size=8)
    res = zero_shot_eval(model, tok, sh.loader, sh.classes, templates="simple", progress=False)
    species = {r["scientific_name"] for r in rows}
    assert res["n"] == len(rows)
    assert {class_name(c) for c in sh.classes} == species
    assert set(res["per_class"]) == species


def test_trimmed_text_encoding_is_exact(micro):
    """Dropping padding after the last EOT token (causal mask) changes nothing; order of texts is kept."""
    from bioclip_fast.eval.zeroshot import encode_text_trimmed, encode_texts

    model, tok = micro
    texts = ["a photo of Danaus plexippus with common name Monarch.", "a", "a photo of a moth.", "x " * 40]
    tokens = tok(texts)
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = encode_text_trimmed(model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    feats = encode_texts(model, tok, texts, batch_size=2)  # length-sorted batches, scattered back in order
    torch.testing.assert_close(feats, torch.nn.functional.normalize(full, dim=-1), atol=1e-5, rtol=1e-5)


def test_image_folder_and_csv_sources(tmp_path, micro):
    import shutil

    from bioclip_fast.data.bundled import butterflies_root
    from bioclip_fast.eval.datasets import load_eval_data

    imgs = sorted((butterflies_root() / "images").glob("*.jpg"))
    for cls, files in (("monarch", imgs[:2]), ("zebra longwing", imgs[100:103])):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, tmp_path / "folder" / cls / f.name)
    data = load_eval_data(tmp_path / "folder", model=micro[0], batch_size=4)
    assert data.classes == ["monarch", "zebra longwing"]
    batches = list(data.loader)
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 0, 1, 1, 1]
    assert batches[0]["image"].shape == (4, 3, 32, 32)
    # a CSV row pointing at a missing image is skipped and listed by name (on_error="raise" stops instead)
    (tmp_path / "m.csv").write_text("image,label\nnope.jpg,a\n")
    bad = load_eval_data(tmp_path / "m.csv", model=micro[0])
    batch = next(iter(bad.loader))
    assert batch["image"] is None and batch["skipped"][0]["image"] == "nope.jpg"
    strict = load_eval_data(tmp_path / "m.csv", model=micro[0], on_error="raise")
    with pytest.raises(ValueError, match="nope.jpg"):
        next(iter(strict.loader))
    with pytest.raises(FileNotFoundError, match="neither"):
        load_eval_data(tmp_path / "missing_dir_or_file", model=micro[0])
    (tmp_path / "nolabel.csv").write_text("image,x\na.jpg,1\n")
    with pytest.raises(ValueError, match="label column"):
        load_eval_data(tmp_path / "nolabel.csv", model=micro[0])
