import csv
import io
import json
import os
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
    iter_shard_samples,
    make_shards,
    read_dali_index,
    read_metadata,
)
from bioclip_fast.data.tar import tar_samples
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
    # 5 chunks of 8 rows; the last holds only the corrupt image: no archive, so the manifest does not list it
    assert len(manifest["shards"]) == 4 and sum(s["count"] for s in manifest["shards"]) == 31
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
    assert not (out / "shard-000004.tar").exists()
    assert all((out / s["name"]).is_file() and s["count"] > 0 for s in manifest["shards"])
    for entry in manifest["shards"]:
        tar = out / entry["name"]
        assert len(tar_samples(tar)) == entry["count"]
        side = json.loads(tar.with_suffix(".json").read_text())
        assert len(side["keys"]) == len(side["labels"]) == entry["count"]


def test_index_matches_dali_wds2idx(built, tmp_path):
    tar = built["out"] / "shard-000000.tar"
    ours = read_dali_index(tar.with_suffix(".idx"))
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
    with pytest.raises(DataError, match=r"junk.tar: damaged tar archive or not a tar"):
        tar_samples(junk)


# ---------------------------------------------------------------------------------------------------------------------
# shard specs, index-shards, make-shards validation (issue 9 item 1-2, issue 13)
# ---------------------------------------------------------------------------------------------------------------------
from bioclip_fast.data.index import (  # noqa: E402
    INDEX_MANIFEST,
    ShardIndex,
    index_shard,
    index_shards,
    load_class_table,
    load_index_manifest,
    sidecar_path,
)
from bioclip_fast.data.shardspec import braceexpand, resolve_shards  # noqa: E402
from bioclip_fast.errors import DataError  # noqa: E402

from tests._fixtures_data import TAXA, write_tol_shard, write_tol_shards  # noqa: E402


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Six manifest-less TreeOfLife-layout shards (3 samples each) in a directory, as a user's dataset looks."""
    root = tmp_path_factory.mktemp("foreign")
    paths = write_tol_shards(root / "tol", 6, 3)
    return {"root": root, "dir": root / "tol", "paths": [str(p) for p in paths]}


def test_braceexpand_matches_webdataset():
    braceexpand_ref = pytest.importorskip("braceexpand").braceexpand
    for pat in ("shard-{000000..000011}.tar", "{a,b}-{0..3}.tar", "x{1..10..3}", "{09..11}/{a,b{c,d}}", "plain",
                "x{y}z", "{8..11}"):
        assert braceexpand(pat) == list(braceexpand_ref(pat)), pat


def test_every_spec_form_resolves(foreign, tmp_path):
    d, paths = foreign["dir"], foreign["paths"]
    assert resolve_shards(str(d)) == paths  # directory
    assert resolve_shards(str(d) + "/") == paths
    assert resolve_shards(str(d / "shard-00000[0-2].tar")) == paths[:3]  # glob
    assert resolve_shards(str(d / "shard-{000000..000005}.tar")) == paths  # brace, zero-padded
    assert resolve_shards(str(d / "shard-00000{1,3}.tar")) == [paths[1], paths[3]]
    assert resolve_shards(f"{d}/shard-00000{{0..1}}.tar::{d}/shard-000005.tar") == paths[:2] + [paths[5]]  # '::'
    assert resolve_shards([paths[4], str(d / "shard-00000[0-1].tar")]) == [paths[4]] + paths[:2]  # python list
    lst = d / "train.txt"  # a shard list, relative to itself, with a comment, a glob and a nested list
    (d / "more.lst").write_text("shard-000005.tar\n")
    lst.write_text("# train split\nshard-000000.tar\n\nshard-00000{1..2}.tar  # two\nmore.lst\n")
    assert resolve_shards(str(lst)) == paths[:3] + [paths[5]]
    assert resolve_shards((str(lst), paths[3])) == paths[:3] + [paths[5], paths[3]]
    os.chdir(d)  # relative specs as typed in a shell
    try:
        assert resolve_shards("shard-{000000..000001}.tar") == ["shard-000000.tar", "shard-000001.tar"]
    finally:
        os.chdir(foreign["root"])


def test_spec_errors_name_the_spec(foreign, tmp_path):
    d = foreign["dir"]
    with pytest.raises(DataError, match=r"'.*shard-\{000000\.\.000009\}\.tar': 4 of 10 expanded shard\(s\) do not "
                                        r"exist, e.g. .*shard-000006\.tar"):
        resolve_shards(str(d / "shard-{000000..000009}.tar"), name="--data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--data: shard spec .*empty': no \.tar shards in this directory \(it is "
                                        r"empty\)"):
        resolve_shards(str(tmp_path / "empty"), name="--data")
    csv = tmp_path / "meta.csv"
    csv.write_text("image,species\na.jpg,x\n")
    with pytest.raises(DataError, match=r"meta\.csv is a CSV file, not a tar shard"):
        resolve_shards(str(csv))
    with pytest.raises(DataError, match=r"no files match this glob"):
        resolve_shards(str(d / "nope-*.tar"))
    with pytest.raises(DataError, match=r"no such file or directory"):
        resolve_shards(str(tmp_path / "missing.tar"))
    with pytest.raises(DataError, match=r"remote/pipe shards are not supported"):
        resolve_shards("pipe:curl -s http://x/{0..3}.tar")


def _write_paths(tmp, n=2, per=3):
    return [str(p) for p in write_tol_shards(tmp, n, per)]


def test_index_reads_headers_and_text_only(tmp_path):
    """Offsets equal tarfile's for ustar, GNU long names and pax; image payloads are never read."""
    rng = np.random.default_rng(0)
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        long = "k" * 120 if fmt != tarfile.USTAR_FORMAT else "k"
        samples = [{"key": f"dir/{long}{i}", "taxon": TAXA[i % 4], "jpg": rng.bytes(30_000 + 97 * i)}
                   for i in range(4)]
        p = write_tol_shard(tmp_path / f"f{fmt}.tar", samples, fmt=fmt)
        idx = index_shard(p)
        with tarfile.open(p) as tf:
            truth = {m.name: (m.offset_data, m.size) for m in tf}
        assert idx.keys == [s["key"] for s in samples]
        for j, k in enumerate(idx.keys):
            assert truth[k + ".jpg"] == (idx.img_off[j], idx.img_size[j])
            assert Taxon.from_row(idx.taxa[idx.taxon[j]]) == TAXA[j % 4]
        jpg = sum(len(s["jpg"]) for s in samples)
        assert idx.bytes_read <= p.stat().st_size - jpg  # not one image byte


def test_index_shards_cli_resumable_parallel_and_cache_dir(foreign, tmp_path, capsys):
    import shutil

    d = tmp_path / "ro"
    shutil.copytree(foreign["dir"], d, ignore=shutil.ignore_patterns("*.txt", "*.lst"))
    cache = tmp_path / "cache"
    spec = str(d / "shard-{000000..000005}.tar")
    assert cli_main(["index-shards", spec, "--out", str(cache), "--workers", "2", "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["shards"], s["indexed"], s["samples"], s["classes"]) == (6, 6, 18, 4)
    assert not list(d.glob("*.bfidx.npz")) and not (d / INDEX_MANIFEST).exists()  # nothing next to the shards
    m = load_index_manifest(cache)
    assert [e["name"] for e in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    table = load_class_table(cache)  # the binary class table beside the manifest (memory-mapped)
    assert "classes" not in m and m["class_table"]["num_classes"] == len(table) == 4
    assert int(np.sum(table._a["counts"])) == 18
    assert [table[i].label for i in range(4)] == sorted(t.label for t in TAXA)
    assert table.indices([TAXA[2].label, TAXA[0].label]).tolist() == [table[:].index(TAXA[2]),
                                                                       table[:].index(TAXA[0])]
    serial = index_shard(d / "shard-000002.tar")
    saved = ShardIndex.load(sidecar_path(cache, "shard-000002.tar"))
    assert saved.keys == serial.keys and (saved.img_off == serial.img_off).all() and saved.strings == serial.strings
    # resumable: nothing re-read; a rewritten shard (new size/mtime) is re-indexed
    assert cli_main(["index-shards", spec, "--out", str(cache), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["indexed"] == 0
    write_tol_shards(tmp_path / "new", 1, 5)
    shutil.copy(tmp_path / "new" / "shard-000000.tar", d / "shard-000003.tar")
    assert cli_main(["index-shards", spec, "--out", str(cache), "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["indexed"], s["samples"]) == (1, 20)
    # a read-only dataset directory without --out: one line naming the directory and the fix
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            assert cli_main(["index-shards", str(d), "--no-progress"]) == 2
            assert "pass --out with a writable cache directory" in capsys.readouterr().err
        finally:
            d.chmod(0o755)


@pytest.mark.parametrize("spec_kind", ["dir", "brace", "glob", "colons", "listfile"])
def test_index_shards_cli_takes_every_spec_form(foreign, tmp_path, capsys, spec_kind):
    d = foreign["dir"]
    spec = {"dir": str(d), "brace": str(d / "shard-{000000..000005}.tar"), "glob": str(d / "shard-*.tar"),
            "colons": f"{d}/shard-00000{{0..2}}.tar::{d}/shard-00000[3-5].tar", "listfile": None}[spec_kind]
    if spec is None:
        (tmp_path / "shards.txt").write_text("\n".join(foreign["paths"]) + "\n")
        spec = str(tmp_path / "shards.txt")
    assert cli_main(["index-shards", spec, "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 18


def test_index_shards_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.csv").write_text("a,b\n1,2\n")
    for spec, msg in ((str(tmp_path / "empty"), "no .tar shards in this directory"),
                      (str(tmp_path / "m.csv"), "is a CSV file, not a tar shard")):
        assert cli_main(["index-shards", spec, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bioclip-fast index-shards: error: ") and msg in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tar").write_bytes(b"\x00" * 100 + b"junk" * 300)
    assert cli_main(["index-shards", str(bad), "--no-progress"]) == 2
    assert "damaged tar archive" in capsys.readouterr().err


def test_make_shards_validates_taxonomy_columns(tmp_path, capsys):
    rows = _subset(1)[:3]
    cols = ["image", "kingdom", "phylum", "class", "order", "Family", "genus", "species", "scientific_name",
            "commonName"]
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c.lower() if c != "commonName" else "common_name"] for c in cols])
    rc = cli_main(["make-shards", "--csv", str(bad), "--images", str(ROOT), "--out", str(tmp_path / "o"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "missing column(s) ['family', 'common_name']" in err
    assert "'Family' -> 'family'" in err and "'commonName' -> 'common_name'" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    # a CSV without some ranks at all: named, and allowed only explicitly
    part = tmp_path / "part.csv"
    part.write_text("image,genus,species\n" + "\n".join(f"{r['image']},{r['genus']},{r['species']}" for r in rows))
    rc = cli_main(["make-shards", "--csv", str(part), "--images", str(ROOT), "--out", str(tmp_path / "p"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing taxonomy column(s) ['kingdom', 'phylum', 'class', 'order', 'family'" in err
    assert "--allow-missing-columns" in err
    rc = cli_main(["make-shards", "--csv", str(part), "--images", str(ROOT), "--out", str(tmp_path / "p"),
                   "--no-progress", "--allow-missing-columns", "--workers", "1"])
    assert rc == 0


def test_make_shards_wrong_image_root_fails_and_manifest_lists_real_shards(tmp_path, capsys):
    csv_path = _write_csv(tmp_path / "m.csv", _subset(1))
    rc = cli_main(["make-shards", "--csv", str(csv_path), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "make-shards wrote nothing: all 10 image(s) were skipped" in err and str(tmp_path) in err
    assert not list((tmp_path / "o").glob("*.tar")) and not (tmp_path / "o" / "manifest.json").exists()
    # chunk 1 (rows 3-4) has only missing images: the manifest and the index list the shards that exist
    rows = _subset(1)
    rows[2] = dict(rows[2], image="nope/a.jpg")
    rows[3] = dict(rows[3], image="nope/b.jpg")
    manifest = make_shards(ROOT, _write_csv(tmp_path / "m2.csv", rows), tmp_path / "o2", samples_per_shard=2,
                           workers=1, progress=False)
    names = [s["name"] for s in manifest["shards"]]
    assert "shard-000001.tar" not in names and len(names) == 4
    assert all((tmp_path / "o2" / n).is_file() for n in names)
    assert [s["name"] for s in load_index_manifest(tmp_path / "o2")["shards"]] == names


def test_index_shards_skips_and_lists_damaged_shards(tmp_path, capsys):
    """A damaged shard among many does not lose the indexing job: the others are indexed, the damaged ones are listed
    (manifest and stderr); only a spec with no indexable shard at all is an error."""
    import json

    from bioclip_fast.cli import main
    from bioclip_fast.data.synthetic import write_tol_shards

    write_tol_shards(tmp_path, 3, 4)
    shards = sorted(tmp_path.glob("*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated mid-member
    (tmp_path / "zz-garbage.tar").write_bytes(b"garbage!")
    assert main(["index-shards", str(tmp_path), "--no-progress", "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert "2 damaged shard(s) skipped" in cap.err and "Traceback" not in cap.err
    manifest = json.loads((tmp_path / "bioclip_index.json").read_text())
    assert set(manifest["damaged_shards"]) == {shards[1].name, "zz-garbage.tar"}
    assert "not a tar archive" in manifest["damaged_shards"]["zz-garbage.tar"]
    assert json.loads(cap.out)["samples"] == 8

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.tar").write_bytes(b"garbage!")
    assert main(["index-shards", str(only_bad), "--no-progress"]) == 2
    assert "no shard could be indexed" in capsys.readouterr().err
