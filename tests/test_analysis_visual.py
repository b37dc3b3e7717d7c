"""The BioCLIP 2 paper's visual protocols in `bioclip-fast analyze` (FishNet habitat t-SNE, finches by beak size,
NeWT life stages in 3-D) from local folders, their geometry checked on planted data, the trained demo-config model on
the bundled butterflies, and unreadable images skipped and listed."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from _fixtures_eval import corrupt, make_finches, make_fishnet, make_newt
from bioclip_fast.analysis.visual import (contrast_orthogonality, nn_agreement, plot_species_plane_3d,
                                          read_fishnet_habitat, read_newt_life_stages, species_plane)


def _planted(orthogonal: bool, seed: int = 0):
    """6 species on orthogonal mean directions; two stages per species shifted along a direction that is orthogonal
    to every species mean (or along a species-mean contrast)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(32, 32)))[0]
    shift = q[:, 20] if orthogonal else (q[:, 0] - q[:, 1]) / np.sqrt(2)
    x, sp, st = [], [], []
    for s in range(6):
        for i in range(8):
            x.append(3 * q[:, s] + (0.7 if i % 2 else -0.7) * shift + 0.02 * rng.normal(size=32))
            sp.append(f"s{s}")
            st.append(f"stage {i % 2}")
    return np.array(x), sp, st, q, shift


def test_species_plane_third_axis_follows_the_orthogonal_stage_contrast():
    x, sp, st, q, shift = _planted(True)
    plane, axis, how = species_plane(x, sp, st)
    assert "contrast" in how and abs(axis @ shift) > 0.99
    assert np.allclose(plane.T @ axis, 0, atol=1e-8)
    ortho = contrast_orthogonality(x, sp, st)
    aligned = contrast_orthogonality(*_planted(False)[:3])
    assert ortho["contrast_orthogonal_share"] > 0.95 and aligned["contrast_orthogonal_share"] < 0.1
    assert ortho["random_share"] == pytest.approx(1 - ortho["k"] / 32)
    plane2, axis2, how2 = species_plane(x, sp)  # no stages: top residual direction outside the plane
    assert "residual" in how2 and abs(axis2 @ shift) > 0.95


def test_nn_agreement_by_hand():
    # species a, b close (freshwater), c, d close (marine): every nearest neighbour shares the habitat
    x = np.array([[1, 0.1, 0], [1, 0, 0.1], [0, 1, 0.1], [0.1, 1, 0]], dtype=float)
    r = nn_agreement(x, ["a", "b", "c", "d"], ["fresh", "fresh", "marine", "marine"])
    assert r["nn_habitat_agreement"] == 1.0 and r["nn_chance"] == pytest.approx(4 / 12)


def test_dataset_readers(tmp_path):
    paths, sp, hab = read_fishnet_habitat(make_fishnet(tmp_path / "fishnet"))
    assert len(paths) == 24 and sorted(set(sp)) == ["G sp0", "G sp1", "G sp2", "G sp3"]
    assert {s: h for s, h in zip(sp, hab)} == {"G sp0": "freshwater", "G sp1": "marine", "G sp2": "freshwater",
                                               "G sp3": "marine"}
    paths, sp, stage = read_newt_life_stages(make_newt(tmp_path / "newt", n_tasks=4, life_stage_tasks=3))
    assert sorted(set(sp)) == ["task_0", "task_1", "task_2"] and set(stage) == {"stage 0", "stage 1"}


def test_plot_species_plane_3d(tmp_path):
    x, sp, st, _, _ = _planted(True)
    for variant in (st, None):
        p = plot_species_plane_3d(x, sp, tmp_path / f"p{variant is None}.png", variant=variant)
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_analyze_demo_model_on_butterflies_and_the_three_protocols(tmp_path, trained_model_dir, capsys,
                                                                   monkeypatch):
    """The README's protocol command, as written: the short trained demo-config model, butterflies metrics + plots,
    and the three paper protocols on tiny folders in their layouts."""
    from bioclip_fast.cli import main

    fish = make_fishnet(tmp_path / "fishnet")
    finches = make_finches(tmp_path / "finches")
    newt = make_newt(tmp_path / "newt", n_tasks=4, life_stage_tasks=3)
    monkeypatch.chdir(tmp_path)
    rc = main(["analyze", "--checkpoint", str(trained_model_dir), "--fishnet", str(fish), "--finches", str(finches),
               "--newt", str(newt)])
    assert rc == 0
    out = tmp_path / "analysis_results"
    r = json.loads((out / "analysis.json").read_text())["results"][trained_model_dir.name]
    assert r["intra"]["n_species"] == 10 and r["intra"]["n_images"] == 832
    assert -1 <= r["inter:family"]["alignment"] <= 1 and -1 <= r["inter:description"]["alignment"] <= 1
    f = r["visual:fishnet"]
    assert f["n_species"] == 4 and 0 <= f["nn_habitat_agreement"] <= 1 and f["attribute_kind"] == "categorical"
    b = r["visual:finches"]
    assert b["n_species"] == 5 and 0 <= b["beak_pc1_spearman"] <= 1 and len(b["species_order_by_pc1"]) == 5
    n = r["visual:newt"]
    assert n["n_species"] == 3 and 0 <= n["rho"] <= 1 and 0 <= n["contrast_orthogonal_share"] <= 1
    for png in (f["png"], b["png"], n["png"], r["intra"]["species_plane_png"], "comparison.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "analysis.md").read_text()
    assert "**Our metrics**" in md and "The paper's claims" in md and "Darwin's finches" in md
    assert "NN same habitat (FishNet)" in md and "ρ life stage (NeWT)" in md


def test_analyze_skips_unreadable_images_and_keeps_rows_aligned(tmp_path, capsys):
    from bioclip_fast.cli import main
    from bioclip_fast.data.bundled import butterflies_root
    from bioclip_fast.model import create_model, save_model

    torch.manual_seed(0)
    save_model(tmp_path / "m" / "model.pt", create_model("bioclip-micro"), {})
    root = butterflies_root()
    with open(root / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep, seen = [], {}
    for r in rows:
        if seen.get(r["scientific_name"], 0) < 4:
            seen[r["scientific_name"]] = seen.get(r["scientific_name"], 0) + 1
            keep.append({**r, "sex": "male" if len(keep) % 2 else "female"})
    import shutil

    (tmp_path / "img").mkdir()
    for r in keep:
        shutil.copy(root / r["image"], tmp_path / "img" / r["image"].split("/")[-1])
        r["image"] = "img/" + r["image"].split("/")[-1]
    bad = [keep[0]["image"], keep[5]["image"], keep[9]["image"]]
    for b, how in zip(bad, ("truncated", "garbage", "missing")):
        corrupt(tmp_path / b, how)
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep)
    out = tmp_path / "out"
    rc = main(["analyze", "--checkpoint", str(tmp_path / "m"), "--data", str(data), "--inter-attribute", "family",
               "--intra-attribute", "sex", "--permutations", "9", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "skipped 3 unreadable image(s)" in capsys.readouterr().err
    r = json.loads((out / "analysis.json").read_text())["results"]["m"]
    assert r["intra"]["n_images"] == 37 and r["skipped_images"]["count"] == 3
    assert sorted(f["image"] for f in r["skipped_images"]["files"]) == sorted(bad)
    # the sex of the images that were read: bad rows 0, 5, 9 removed before attributes are looked up
    expected = {"female": sum(1 for i in range(40) if i % 2 == 0 and i not in (0, 5, 9)),
                "male": sum(1 for i in range(40) if i % 2 == 1 and i not in (0, 5, 9))}
    assert r["intra:sex"]["attribute_values"] == expected
    assert all(b in (out / "analysis.md").read_text() for b in bad)


@pytest.mark.parametrize("argv, needle", [
    (["--newt", "/nonexistent"], "--newt /nonexistent: not a directory"),
    (["--permutations", "-1"], "--permutations must be >= 0"),
    (["--var-threshold", "1.5"], "--var-threshold must be in (0, 1]"),
])
def test_analyze_bad_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    from bioclip_fast.cli import main

    rc = main(["analyze", "--checkpoint", str(tmp_path / "x"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("bioclip-fast analyze: error:") and "Traceback" not in err


def test_readme_analyze_two_checkpoints(tmp_path, monkeypatch):
    """`bioclip-fast analyze --checkpoint runs/a/model.pt --checkpoint runs/b/model.pt`, as written (micro models)."""
    from bioclip_fast.cli import main
    from bioclip_fast.model import create_model, save_model

    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        save_model(tmp_path / "runs" / name / "model.pt", create_model("bioclip-micro"), {})
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--checkpoint", "runs/a/model.pt", "--checkpoint", "runs/b/model.pt"]) == 0
    res = json.loads((tmp_path / "analysis_results" / "analysis.json").read_text())["results"]
    assert set(res) == {"a", "b"} and all(r["intra"]["n_images"] == 832 for r in res.values())
