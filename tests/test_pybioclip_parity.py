"""pybioclip itself (the PyPI package) against `bioclip-fast`: the same commands, the same rows, scores within 1e-4.

A small open_clip model is saved in the hub-snapshot layout and a small TreeOfLife species table in the dataset
layout, both inside a fake Hugging Face cache under the names pybioclip looks up, so pybioclip runs unmodified and
offline (HF_HUB_OFFLINE=1). pybioclip runs in one subprocess (its import sets process-wide torch flags); our CLI runs
in-process with the same environment.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _fixtures_predict import (
    small_open_clip_model,
    species_table,
    write_hf_cache,
    write_hub_snapshot,
    write_table,
)
from bioclip_fast.cli import main

pytest.importorskip("bioclip", reason="pybioclip (dev extra) is the reference")

# (name, argv after the image list) — run identically through `bioclip` and `bioclip-fast`
CASES = {
    "species": ["predict"],
    "genus_k3": ["predict", "--rank", "genus", "--k", "3"],
    "family": ["predict", "--rank", "family"],
    "kingdom": ["predict", "--rank", "kingdom"],
    "cls": ["predict", "--cls", "a monarch butterfly,a beetle,a cat,a daisy"],
    "bins": ["predict", "--bins", "{bins}"],
    "subset": ["predict", "--subset", "{subset}"],
    "subset_species": ["predict", "--subset", "{subset_species}", "--k", "3"],
    "table": ["predict", "--format", "table", "--k", "2"],
    "embed": ["embed"],
}

PYBIOCLIP_SCRIPT = textwrap.dedent(
    """
    import json, sys, contextlib, io
    from bioclip.__main__ import parse_args
    from bioclip import commands
    cases = json.loads(sys.argv[1])
    for name, argv in cases.items():
        out = sys.argv[2] + "/" + name
        args = parse_args(argv[:1] + ["--output", out] + argv[1:])
        commands.run(args)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        commands.run(parse_args(["list-tol-taxa"]))
    open(sys.argv[2] + "/list-tol-taxa", "w").write(buf.getvalue())
    """
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from bioclip_fast.data.bundled import butterflies_root

    tmp = tmp_path_factory.mktemp("parity")
    model = small_open_clip_model()
    snap = write_hub_snapshot(model, tmp / "snapshot")
    emb, names = species_table()
    table = write_table(tmp / "table", emb, names)
    hf_home = write_hf_cache(tmp / "hf", snap, table)
    images = tmp / "images"
    images.mkdir()
    src = butterflies_root() / "images"
    for name in ("0010001.jpg", "0020039.jpg", "0030027.jpg", "0050036.jpg"):
        shutil.copy(src / name, images / name)
    from PIL import Image

    Image.open(src / "0060093.jpg").convert("L").save(images / "gray.png")  # grayscale, another format
    paths = sorted(str(p) for p in images.iterdir())
    (tmp / "bins.csv").write_text("cls,bin\na monarch butterfly,insect\na beetle,insect\na cat,other\na daisy,other\n")
    (tmp / "subset.csv").write_text("genus\nDanaus\nPieris\nParus\n")
    (tmp / "subset_species.csv").write_text("species\nDanaus alba\nFelis major\nBellis vulgaris\nCarabus nigra\n")
    fill = {"bins": str(tmp / "bins.csv"), "subset": str(tmp / "subset.csv"),
            "subset_species": str(tmp / "subset_species.csv")}
    cases = {k: [a.format(**fill) for a in v[:1]] + paths + [a.format(**fill) for a in v[1:]] for k, v in CASES.items()}
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TORCH_COMPILE_DISABLE": "1",
           "TQDM_DISABLE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    ref = tmp / "pybioclip"
    ref.mkdir()
    proc = subprocess.run([sys.executable, "-c", PYBIOCLIP_SCRIPT, json.dumps(cases), str(ref)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "cases": cases, "ref": ref, "hf_home": hf_home, "snap": snap, "table": table,
            "paths": paths, "emb": emb, "names": names}


@pytest.fixture()
def hf_env(world, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(world["hf_home"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("BIOCLIP_FAST_CACHE", str(world["tmp"] / "cache"))


def _ours(world, name, capsys, *extra):
    out = world["tmp"] / "ours" / name
    out.parent.mkdir(exist_ok=True)
    argv = world["cases"][name]
    rc = main([*argv, "--output", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    return out.read_text(encoding="utf-8")


def _compare_csv(ours: str, ref: str, tol: float = 1e-4) -> int:
    a, b = list(csv.reader(io.StringIO(ours))), list(csv.reader(io.StringIO(ref)))
    assert a[0] == b[0], (a[0], b[0])  # same columns, same order
    assert len(a) == len(b), (len(a), len(b))
    si = a[0].index("score")
    for ra, rb in zip(a[1:], b[1:]):
        assert ra[:si] + ra[si + 1:] == rb[:si] + rb[si + 1:], (ra, rb)
        assert abs(float(ra[si]) - float(rb[si])) <= tol, (ra, rb)
    return len(a) - 1


@pytest.mark.parametrize("case", ["species", "genus_k3", "family", "kingdom", "cls", "bins", "subset",
                                  "subset_species"])
def test_predict_rows_match_pybioclip(world, hf_env, capsys, case):
    """Default model string, no --model: both find imageomics/bioclip-2 and its TreeOfLife table in the HF cache."""
    ref = (world["ref"] / case).read_text(encoding="utf-8")
    n = _compare_csv(_ours(world, case, capsys), ref)
    n_img = len(world["paths"])
    expected = {"species": 5, "genus_k3": 3, "family": 5, "kingdom": 3, "cls": 4, "bins": 2, "subset": 5,
                "subset_species": 3}[case]
    assert n == n_img * expected


def test_local_snapshot_and_table_folder_match_pybioclip(world, hf_env, capsys, tmp_path):
    """The same files given as local folders (`local-dir:`, a plain snapshot path with only a .bin, the table dir)."""
    ref = (world["ref"] / "species").read_text(encoding="utf-8")
    ours = _ours(world, "species", capsys, "--model", f"local-dir:{world['snap']}", "--tol-embeddings",
                 str(world["table"]))
    _compare_csv(ours, ref)
    bin_only = write_hub_snapshot(small_open_clip_model(), tmp_path / "bin_only", safetensors=False, bin=True)
    shutil.copytree(world["table"], tmp_path / "tol" / "embeddings")  # the dataset repo's layout
    ours = _ours(world, "genus_k3", capsys, "--model", str(bin_only), "--tol-embeddings", str(tmp_path / "tol"),
                 "--batch-size", "2")
    _compare_csv(ours, (world["ref"] / "genus_k3").read_text(encoding="utf-8"))


def test_table_format_and_embed_json_match_pybioclip(world, hf_env, capsys):
    ours = _ours(world, "table", capsys)
    ref = (world["ref"] / "table").read_text(encoding="utf-8")
    strip = lambda t: [[c.strip() for c in line.split("|")] for line in t.splitlines()]  # noqa: E731
    oa, ra = strip(ours), strip(ref)
    assert len(oa) == len(ra) and oa[:3] == ra[:3]  # same rules and header
    for x, y in zip(oa[3:-1], ra[3:-1]):
        assert x[:-2] == y[:-2] and abs(float(x[-2]) - float(y[-2])) <= 1e-4
    ours = json.loads(_ours(world, "embed", capsys))
    ref = json.loads((world["ref"] / "embed").read_text())
    assert ours["model"] == ref["model"] == "hf-hub:imageomics/bioclip-2"
    assert list(ours["embeddings"]) == list(ref["embeddings"]) == world["paths"]
    for k, v in ref["embeddings"].items():
        np.testing.assert_allclose(ours["embeddings"][k], v, atol=1e-5)
    assert abs(np.linalg.norm(v) - 1) > 1e-3  # raw features, not normalized


def test_list_tol_taxa_matches_pybioclip(world, hf_env, capsys):
    assert main(["list-tol-taxa"]) == 0
    ours = capsys.readouterr().out
    assert ours == (world["ref"] / "list-tol-taxa").read_text(encoding="utf-8")
    assert main(["list-tol-taxa", "--tol-embeddings", str(world["table"])]) == 0
    assert capsys.readouterr().out == ours


def test_python_api_matches_pybioclip_api(world, hf_env):
    """Scripts port by changing the import: same constructor, predict signature, filters and label data."""
    from PIL import Image

    from bioclip_fast.predict import Rank, TreeOfLifeClassifier

    clf = TreeOfLifeClassifier(device="cpu")
    assert clf.model_str == "hf-hub:imageomics/bioclip-2"
    labels = clf.get_label_data()
    assert list(labels.columns) == ["kingdom", "phylum", "class", "order", "family", "genus", "species_epithet",
                                    "species", "common_name"]
    assert len(labels) == len(world["names"])
    with pytest.raises(ValueError, match="Unknown genus received: Nope. Only known genus may be used."):
        clf.create_taxa_filter(Rank.GENUS, ["Danaus", "Nope"])
    keep = clf.create_taxa_filter(Rank.FAMILY, ["Pieridae"])
    clf.apply_filter(keep)
    img = Image.open(world["paths"][0])
    rows = clf.predict([img], Rank.SPECIES, k=3)
    assert [r["file_name"] for r in rows] == ["0", "0", "0"] and {r["family"] for r in rows} == {"Pieridae"}
    rows_path = clf.predict(world["paths"][0], Rank.SPECIES, k=3)
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in rows_path], abs=1e-6)
    with pytest.raises(ValueError, match="should be a list containing"):
        clf.apply_filter([True])
    from bioclip import Rank as PyRank  # a script still passing pybioclip's enum works too

    assert clf.predict(world["paths"][0], PyRank.GENUS, k=1)[0]["genus"] in {"Pieris"}
    feats = clf.create_image_features([img, img], normalize=False)
    assert feats.shape == (2, 32)


def _readme_commands() -> list[str]:
    text = (Path(__file__).parent.parent / "docs" / "predict.md").read_text(encoding="utf-8")
    section = text.split("## Predict and embed with the released BioCLIP 2", 1)[1].split("```bash", 1)[1]
    block = section.split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("bioclip-fast ")]


def test_readme_predict_commands_run_as_written(world, hf_env, capsys, tmp_path, monkeypatch):
    """Every command of docs/predict.md's BioCLIP 2 section, as written, in a folder holding files of those names."""
    import shlex

    from bioclip_fast.model import create_model, save_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(Path(world["paths"][0]).parent, "images")
    shutil.copytree(world["snap"], "bioclip-2")
    shutil.copytree(world["table"], "TreeOfLife-200M/embeddings")
    Path("genera.csv").write_text("genus\nDanaus\nParus\n")
    Path("bins.csv").write_text("label,bin\na monarch butterfly,insect\na moth,insect\na beetle,insect\n")
    save_model("runs/r1/model.pt", create_model("bioclip-micro"), {"classes": ["Danaus plexippus", "Pieris rapae"]})
    commands = _readme_commands()
    assert len(commands) == 10
    for cmd in commands:
        argv = shlex.split(cmd.replace("runs/<run>", "runs/r1"))[1:]
        rc = main([*argv, "--no-progress"] if argv[0] in ("predict", "embed") else argv)
        cap = capsys.readouterr()
        assert rc == 0, (cmd, cap.err)
        if argv[0] == "predict":
            assert cap.out.strip(), cmd
    assert json.loads(Path("embeddings.json").read_text())["model"] == "bioclip-2"
    assert np.load("embeddings.npy").shape == (len(world["paths"]), 64)
    assert Path("taxa.csv").read_text().startswith("kingdom,phylum,class,order,family,genus,species_epithet,")
    import open_clip

    open_clip.create_model_from_pretrained("local-dir:exported")
