"""pybioclip-compatible prediction API and the `predict` / `embed` commands: formats, ranks, bins, bad files."""
from __future__ import annotations

import csv
import io
import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch

from bioclip_fast.cli import main
from bioclip_fast.errors import UsageError
from bioclip_fast.predict import (
    CustomLabelsBinningClassifier,
    CustomLabelsClassifier,
    Rank,
    TreeOfLifeClassifier,
    read_bins_csv,
    to_taxon,
)

SPECIES_KEYS = ["file_name", "kingdom", "phylum", "class", "order", "family", "genus", "species_epithet", "species",
                "common_name", "score"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained bioclip-micro checkpoint whose meta lists the 10 butterfly taxa, and a folder of 4 good images
    plus a text file named .jpg and a truncated JPEG."""
    from bioclip_fast.data.bundled import butterflies_root, read_metadata
    from bioclip_fast.model import create_model, save_model
    from bioclip_fast.taxonomy import Taxon

    tmp = tmp_path_factory.mktemp("predict")
    root = butterflies_root()
    rows = read_metadata(root / "metadata.csv")
    taxa = sorted({Taxon.from_row(r) for r in rows}, key=lambda t: t.label)
    torch.manual_seed(0)
    model = create_model("bioclip-micro")
    save_model(tmp / "run" / "model.pt", model, {"classes": [t.to_dict() for t in taxa]})
    images = tmp / "images"
    images.mkdir()
    for name in ("0010001.jpg", "0010002.jpg", "0020039.jpg", "0030027.jpg"):
        shutil.copy(root / "images" / name, images / name)
    (images / "notes.jpg").write_text("this is not an image")
    (images / "truncated.jpg").write_bytes((root / "images" / "0010004.jpg").read_bytes()[:2000])
    good = sorted(str(p) for p in images.glob("00*.jpg"))
    return {"ckpt": tmp / "run" / "model.pt", "dir": images, "good": good, "taxa": taxa, "tmp": tmp}


@pytest.fixture(scope="module")
def tol(setup):
    return TreeOfLifeClassifier(setup["ckpt"], device="cpu", templates="simple", batch_size=3)


def test_species_predictions_match_pybioclip_shape(setup, tol):
    preds = tol.predict(setup["good"], Rank.SPECIES, k=3)
    assert len(preds) == 4 * 3
    assert list(preds[0]) == SPECIES_KEYS
    by_file = defaultdict(list)
    for p in preds:
        by_file[p["file_name"]].append(p["score"])
        assert p["species"] == f"{p['genus']} {p['species_epithet']}"
    assert list(by_file) == setup["good"]
    for scores in by_file.values():
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    labels = {t.scientific_name for t in setup["taxa"]}
    assert {p["species"] for p in preds} <= labels


def test_higher_rank_sums_species_probabilities(setup, tol):
    img = setup["good"][0]
    species = tol.predict(img, "species", k=None)
    assert len(species) == 10 and sum(p["score"] for p in species) == pytest.approx(1.0, abs=1e-5)
    expected = defaultdict(float)
    for p in species:
        expected[p["family"]] += p["score"]
    families = tol.predict(img, Rank.FAMILY, k=10)
    assert list(families[0]) == ["file_name", "kingdom", "phylum", "class", "order", "family", "score"]
    assert {p["family"]: p["score"] for p in families} == pytest.approx(dict(expected), abs=1e-6)
    assert [p["score"] for p in families] == sorted(expected.values(), reverse=True)
    assert len(tol.predict(img, "family", k=2)) == 2
    with pytest.raises(ValueError, match="rank"):
        tol.predict(img, "tribe")


def test_streaming_accepts_generators_and_pil_images(setup, tol):
    from PIL import Image

    gen = (p for p in setup["good"])
    batches = list(tol.iter_predict(gen, k=1))
    assert [len(b) for b in batches] == [3, 1]  # batch_size=3
    pil = Image.open(setup["good"][0])
    a = tol.predict([pil], k=1)[0]
    b = tol.predict(setup["good"][0], k=1)[0]
    assert a["species"] == b["species"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_bad_files_raise_or_are_skipped(setup, tol):
    bad = [str(setup["dir"] / "notes.jpg"), str(setup["dir"] / "truncated.jpg"), str(setup["dir"] / "missing.jpg")]
    with pytest.raises(ValueError, match="notes.jpg"):
        tol.predict(bad[:1])
    seen = []
    preds = tol.predict(setup["good"][:2] + bad, k=1, on_error=lambda name, msg: seen.append((name, msg)))
    assert [p["file_name"] for p in preds] == setup["good"][:2]
    assert [n for n, _ in seen] == bad
    assert "truncated" in seen[1][1] and "not found" in seen[2][1]


def test_custom_labels_and_binning(setup):
    labels = ["a monarch butterfly", "a cabbage white butterfly", "a red admiral", "a snail"]
    clf = CustomLabelsClassifier(labels, setup["ckpt"], device="cpu", templates="simple")
    preds = clf.predict(setup["good"][:2])
    assert len(preds) == 8 and list(preds[0]) == ["file_name", "classification", "score"]
    first = {p["classification"]: p["score"] for p in preds[:4]}
    assert set(first) == set(labels) and sum(first.values()) == pytest.approx(1.0, abs=1e-5)
    bins = {"a monarch butterfly": "butterfly", "a cabbage white butterfly": "butterfly",
            "a red admiral": "butterfly", "a snail": "mollusc"}
    binned = CustomLabelsBinningClassifier(bins, setup["ckpt"], device="cpu", templates="simple")
    bp = {p["classification"]: p["score"] for p in binned.predict(setup["good"][0])}
    assert bp["mollusc"] == pytest.approx(first["a snail"], abs=1e-6)
    assert bp["butterfly"] == pytest.approx(1 - first["a snail"], abs=1e-5)
    with pytest.raises(ValueError, match="duplicate"):
        CustomLabelsClassifier(["x", "x"], setup["ckpt"], device="cpu")


def test_label_sources(setup, tmp_path):
    t = to_taxon("Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus")
    assert t.genus == "Danaus" and t.species == "plexippus" and t.family == "Nymphalidae"
    assert to_taxon("Danaus plexippus").scientific_name == "Danaus plexippus"
    (tmp_path / "bins.csv").write_text("label,bin\ncat,mammal\nowl,bird\n")
    assert read_bins_csv(tmp_path / "bins.csv") == {"cat": "mammal", "owl": "bird"}
    (tmp_path / "bad_bins.csv").write_text("cat\n")
    with pytest.raises(ValueError, match="two columns"):
        read_bins_csv(tmp_path / "bad_bins.csv")
    from bioclip_fast.model import create_model, save_model

    save_model(tmp_path / "nometa.pt", create_model("bioclip-micro"), {})
    with pytest.raises(UsageError, match="no label set"):
        TreeOfLifeClassifier(tmp_path / "nometa.pt", device="cpu")


# ---- CLI ------------------------------------------------------------------------------------------------------------
def _predict(setup, capsys, *extra):
    rc = main(["predict", str(setup["dir"]), str(setup["dir"] / "missing.jpg"), "--checkpoint", str(setup["ckpt"]),
               "--templates", "simple", "--no-progress", "--batch-size", "2", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_predict_cli_formats_parse_and_bad_files_are_reported(setup, capsys, fmt):
    rc, out, err = _predict(setup, capsys, "--format", fmt, "--k", "2")
    assert rc == 0
    for bad in ("notes.jpg", "truncated.jpg", "missing.jpg"):
        assert bad in err
    assert "predicted 4 image(s), skipped 3" in err
    if fmt == "json":
        rows = json.loads(out)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
    else:  # PrettyTable, as pybioclip prints it
        lines = out.strip().splitlines()
        assert lines[0].startswith("+-") and lines[2] == lines[0] == lines[-1]
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
        header = cells[0]
        rows = [dict(zip(header, c)) for c in cells[1:]]
        assert header == SPECIES_KEYS and len({len(line) for line in lines}) == 1
    assert len(rows) == 8
    assert sorted({r["file_name"] for r in rows}) == setup["good"]
    if fmt != "table":
        assert list(rows[0]) == SPECIES_KEYS
        assert all(0 < float(r["score"]) <= 1 for r in rows)


def test_predict_cli_rank_cls_and_bins(setup, capsys, tmp_path):
    rc, out, _ = _predict(setup, capsys, "--format", "json", "--rank", "genus", "--k", "1")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 4 and "genus" in rows[0] and "species" not in rows[0]
    rc, out, _ = _predict(setup, capsys, "--format", "csv", "--cls", "butterfly,moth,beetle")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 4 * 3 and {r["classification"] for r in rows} == {"butterfly", "moth", "beetle"}
    (tmp_path / "bins.csv").write_text("cls,bin\nbutterfly,lepidoptera\nmoth,lepidoptera\nbeetle,coleoptera\n")
    rc, out, _ = _predict(setup, capsys, "--format", "json", "--bins", str(tmp_path / "bins.csv"))
    rows = json.loads(out)
    assert rc == 0 and {r["classification"] for r in rows} == {"lepidoptera", "coleoptera"} and len(rows) == 8


def test_predict_cli_nothing_processed_exits_nonzero(setup, capsys, tmp_path):
    out_file = tmp_path / "p.json"
    rc = main(["predict", str(setup["dir"] / "notes.jpg"), str(setup["dir"] / "missing.jpg"), "--checkpoint",
               str(setup["ckpt"]), "--format", "json", "--no-progress", "--templates", "simple", "--output", str(out_file)])
    err = capsys.readouterr().err
    assert rc == 1 and "notes.jpg" in err and "missing.jpg" in err
    assert json.loads(out_file.read_text()) == []


def test_embed_cli_npy_and_parquet(setup, capsys, tmp_path, tol):
    out = tmp_path / "emb.npy"
    rc = main(["embed", str(setup["dir"]), "--checkpoint", str(setup["ckpt"]), "-o", str(out), "--batch-size", "2",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and "truncated.jpg" in err and "notes.jpg" in err
    emb = np.load(out)
    ids = (tmp_path / "emb.ids.txt").read_text().splitlines()
    assert ids == setup["good"] and emb.shape == (4, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    with torch.no_grad():
        ref = next(tol.iter_image_features(setup["good"][:1]))[1].numpy()
    np.testing.assert_allclose(emb[:1], ref, atol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no partial files left behind

    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rc = main(["embed", *setup["good"], "--checkpoint", str(setup["ckpt"]), "-o", str(tmp_path / "e.parquet"),
               "--no-progress"])
    table = pq.read_table(tmp_path / "e.parquet")
    assert rc == 0 and table.column("id").to_pylist() == setup["good"]
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), emb, atol=1e-6)

    rc = main(["predict", *setup["good"], "--checkpoint", str(tmp_path / "absent.pt"), "--no-progress"])
    assert rc == 2 and "absent.pt" in capsys.readouterr().err
    rc = main(["predict", *setup["good"], "--checkpoint", str(setup["ckpt"]), "--bins", str(tmp_path / "no.csv")])
    assert rc == 2 and "no.csv" in capsys.readouterr().err

    rc = main(["embed", str(setup["dir"] / "notes.jpg"), "--checkpoint", str(setup["ckpt"]), "-o",
               str(tmp_path / "none.npy"), "--no-progress", "--ids", str(tmp_path / "none.json")])
    assert rc == 1 and not (tmp_path / "none.npy").exists() and not (tmp_path / "none.json").exists()


def test_plain_open_clip_state_dict_and_labels_csv(setup, tmp_path, tol):
    """An open_clip state dict (no bioclip_fast metadata) loads with model_name=; a metadata CSV gives the labels."""
    from bioclip_fast.model import load_model

    model = load_model(setup["ckpt"])[0]
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    rows = "image,kingdom,phylum,class,order,family,genus,species,common_name\n" \
           "a.jpg,Animalia,Arthropoda,Insecta,Lepidoptera,Pieridae,Pieris,rapae,Cabbage White\n" \
           "b.jpg,Animalia,Arthropoda,Insecta,Lepidoptera,Pieridae,Pieris,rapae,Cabbage White\n" \
           "c.jpg,Animalia,Arthropoda,Insecta,Lepidoptera,Nymphalidae,Danaus,plexippus,Monarch\n"
    (tmp_path / "labels.csv").write_text(rows)
    with pytest.raises(UsageError, match="not a bioclip_fast checkpoint"):
        TreeOfLifeClassifier(tmp_path / "plain.pt", labels_csv=tmp_path / "labels.csv", device="cpu")
    clf = TreeOfLifeClassifier(tmp_path / "plain.pt", model_name="bioclip-micro", labels_csv=tmp_path / "labels.csv",
                               device="cpu", templates="simple")
    preds = clf.predict(setup["good"][0], k=5)
    assert [p["species"] for p in preds] and {p["species"] for p in preds} == {"Pieris rapae", "Danaus plexippus"}
    a = next(clf.iter_image_features(setup["good"][:2]))[1]
    b = next(tol.iter_image_features(setup["good"][:2]))[1]
    torch.testing.assert_close(a, b)


def test_generator_input_is_consumed_lazily(setup, tol):
    """Bounded memory: a generator of 10,000 paths is read one chunk (8 batches) ahead of the results, not whole."""
    consumed = []

    def paths():
        for i in range(10_000):
            consumed.append(i)
            yield setup["good"][i % 4]

    it = tol.iter_image_features(paths(), batch_size=2)
    names, feats = next(it)
    assert len(names) == 2 and feats.shape == (2, 64)
    assert len(consumed) <= 2 * 8
