import csv
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bioclip_fast.cli import main as cli_main
from bioclip_fast.data import bundled
from bioclip_fast.data.shards import (
    SHARD_TEXT_KEYS,
    index_tar,
    iter_shard_samples,
    make_shards,
    read_index,
    read_metadata,
)
from bioclip_fast.taxonomy import Taxon

ROOT = bundled.butterflies_root()
COLUMNS = ["image", "kingdom", "phylum", "class", "order", "family", "genus", "species", "scientific_name",
           "common_name"]


def _subset(n_per_species: int) -> list[dict]:
    rows = read_metadata(ROOT / "metadata.csv")
    seen: Counter = Counter()
    out = []
    for r in rows:
        if seen[r["species"]] < n_per_species:
            seen[r["species"]] += 1
            out.append(r)
    return out


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Shards of 3 images x 10 species + one large PNG (resized) + a missing and a corrupt image (skipped)."""
    tmp = tmp_path_factory.mktemp("shards")
    rows = _subset(3)
    big = tmp / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 300, 3), dtype=np.uint8)).save(big)
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    extra = dict(rows[0])
    rows += [dict(extra, image=str(big)), dict(extra, image=str(tmp / "missing.jpg")),
             dict(extra, image=str(tmp / "corrupt.jpg"))]
    csv_path = _write_csv(tmp / "meta.csv", rows)
    out = tmp / "out"
    manifest = make_shards(ROOT, csv_path, out, samples_per_shard=8, workers=2, progress=False)
    return {"rows": rows, "out": out, "manifest": manifest, "csv": csv_path}


def test_round_trip_every_key_and_counts(built):
    manifest, out, rows = built["manifest"], built["out"], built["rows"]
    assert manifest["num_samples"] == len(rows) - 2 == 31
    assert manifest["num_skipped"] == 2
    assert {Path(s["image"]).name for s in manifest["skipped"]} == {"missing.jpg", "corrupt.jpg"}
    assert all(s["line"] and s["error"] for s in manifest["skipped"])
    assert len(manifest["shards"]) == 5 and sum(s["count"] for s in manifest["shards"]) == 31
    assert manifest["num_classes"] == 10 and sum(c["count"] for c in manifest["classes"]) == 31

    by_key = {}
    for r in rows:
        by_key[Path(r["image"]).stem] = Taxon.from_row(r)
    samples = list(iter_shard_samples(sorted(str(p) for p in out.glob("shard-*.tar"))))
    assert len(samples) == 31
    assert len({s["key"] for s in samples}) == 31
    for s in samples:
        assert set(s["texts"]) == set(SHARD_TEXT_KEYS)
        taxon = by_key[s["key"]]
        assert s["texts"] == taxon.shard_texts()
        assert s["taxon"].label == taxon.label
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG"
        img.load()
        assert min(img.size) == 224
    big = next(s for s in samples if s["key"] == "big")
    assert Image.open(io.BytesIO(big["jpg"])).size == (224, 299)  # shorter side 224, aspect kept
    # counts per shard match the archives and the sidecars
    assert manifest["shards"][-1]["count"] == 0  # only the corrupt image: no archive is written
    assert not (out / manifest["shards"][-1]["name"]).exists()
    for entry in manifest["shards"][:-1]:
        tar = out / entry["name"]
        assert len(index_tar(tar)) == entry["count"]
        side = json.loads(tar.with_suffix(".json").read_text())
        assert len(side["keys"]) == len(side["labels"]) == entry["count"]


def test_index_matches_dali_wds2idx(built, tmp_path):
    tar = built["out"] / "shard-000000.tar"
    ours = read_index(tar.with_suffix(".idx"))
    with tarfile.open(tar) as tf:
        for key, members in ours:
            for ext, (off, size) in members.items():
                m = tf.getmember(f"{key}.{ext}")
                assert (m.offset_data, m.size) == (off, size)
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx script is not installed")
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as ic:
        ic.create_index()
    assert ref.read_text() == tar.with_suffix(".idx").read_text()


def test_bad_csv_row_names_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    lines = ["image,kingdom,genus,species", "images/0010001.jpg,Animalia,Danaus,plexippus",
             "images/0010002.jpg,Animalia,Danaus"]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 3 has 3 fields, the header has 4"):
        read_metadata(bad)
    bad.write_text("image,kingdom,genus\nimages/0010001.jpg,,\n")
    with pytest.raises(ValueError, match=r"line 2 \(images/0010001.jpg\) has no taxonomy"):
        read_metadata(bad)
    bad.write_text("file,kingdom\nx.jpg,Animalia\n")
    with pytest.raises(ValueError, match="lacks required column"):
        read_metadata(bad)


def test_cli_small_subset_and_bad_row(tmp_path, capsys):
    csv_path = _write_csv(tmp_path / "m.csv", _subset(1))
    rc = cli_main(["make-shards", "--images", str(ROOT), "--csv", str(csv_path), "--out", str(tmp_path / "o"),
                   "--samples-per-shard", "4", "--workers", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 10 and summary["shards"] == 3 and summary["num_classes"] == 10
    assert (tmp_path / "o" / "manifest.json").is_file()

    text = csv_path.read_text().splitlines()
    text[5] = ",".join(text[5].split(",")[:4])  # row on line 6 loses its last columns
    csv_path.write_text("\n".join(text) + "\n")
    rc = cli_main(["make-shards", "--images", str(ROOT), "--csv", str(csv_path), "--out", str(tmp_path / "o2"),
                   "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "line 6" in err and "fields" in err and str(csv_path) in err


def test_resume_rebuilds_only_missing_shards(tmp_path):
    csv_path = _write_csv(tmp_path / "m.csv", _subset(2))
    out = tmp_path / "o"
    m1 = make_shards(ROOT, csv_path, out, samples_per_shard=6, workers=1, progress=False)
    tars = sorted(out.glob("shard-*.tar"))
    assert len(tars) == 4
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tars}
    # simulate a crash while shard 2 was being written: no sidecar, partial tar
    (out / "shard-000002.json").unlink()
    (out / "shard-000002.tar").write_bytes(b"partial")
    m2 = make_shards(ROOT, csv_path, out, samples_per_shard=6, workers=1, progress=False)
    for p in sorted(out.glob("shard-*.tar")):
        data, mtime = before[p.name]
        assert p.read_bytes() == data  # deterministic archives
        if p.name != "shard-000002.tar":
            assert p.stat().st_mtime_ns == mtime  # untouched
    assert {k: v for k, v in m1.items() if k != "seconds"} == {k: v for k, v in m2.items() if k != "seconds"}
    # different settings into the same directory are refused instead of mixing shards
    with pytest.raises(ValueError, match="different input or settings"):
        make_shards(ROOT, csv_path, out, samples_per_shard=6, image_size=128, workers=1, progress=False)
    # a rebuild without resume replaces everything, including shards numbered beyond the new build
    m3 = make_shards(ROOT, csv_path, out, samples_per_shard=10, workers=1, resume=False, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert m3["num_samples"] == 20 and not (out / "shard-000003.json").exists()


def test_split_is_deterministic_and_stratified():
    rows = read_metadata(ROOT / "metadata.csv")
    train, val = bundled.split(rows)
    assert (train, val) == bundled.split(rows)
    assert len(train) + len(val) == len(rows) == 832
    assert not {r["image"] for r in train} & {r["image"] for r in val}
    per = Counter(r["species"] for r in rows)
    val_per = Counter(r["species"] for r in val)
    for sp, n in per.items():
        assert val_per[sp] == round(n * 0.2)
    assert bundled.split(rows, seed=1)[1] != val
    with pytest.raises(ValueError, match="val_fraction"):
        bundled.split(rows, val_fraction=1.0)


RACE = "import json; from bioclip_fast.data.bundled import default_shards; print(json.dumps(default_shards('val')))"


def test_default_shards_build_once_under_a_race(tmp_path, monkeypatch):
    # two independent processes (as two ranks at start-up) build the same cache entry at once
    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", RACE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1] and len(results[0]) == 2
    manifest = json.loads((Path(results[0][0]).parent / "manifest.json").read_text())
    assert manifest["num_samples"] == 167
    # idempotent: a third call reuses the cache and leaves no temporary directories behind
    assert bundled.default_shards("val") == results[0]
    assert not [p for p in Path(results[0][0]).parent.parent.iterdir() if p.name.startswith(".val.")
                and p.is_dir()]
    with pytest.raises(ValueError, match="split must be one of"):
        bundled.default_shards("test")


def test_square_resize_like_bioclip_make_wds(tmp_path):
    src = tmp_path / "wide.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(src)
    row = dict(read_metadata(ROOT / "metadata.csv")[0], image=str(src))
    for mode, size in (("square", (96, 96)), ("shorter", (160, 96))):
        make_shards(tmp_path, [row], tmp_path / mode, image_size=96, resize=mode, workers=1, progress=False)
        (sample,) = iter_shard_samples(tmp_path / mode)
        assert Image.open(io.BytesIO(sample["jpg"])).size == size
    with pytest.raises(ValueError, match="resize must be"):
        make_shards(tmp_path, [row], tmp_path / "x", resize="crop")


def test_damaged_archives_are_named_in_errors(built, tmp_path):
    data = (built["out"] / "shard-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ValueError, match=r"cut.tar: damaged tar archive"):
        list(iter_shard_samples([str(cut)]))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"junk.tar: not a readable tar archive"):
        index_tar(junk)
