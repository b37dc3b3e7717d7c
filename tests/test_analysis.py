"""Emergent-property metrics recover structure planted in synthetic embeddings; plots; `bioclip-fast analyze`."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from bioclip_fast.analysis.emergent import (
    attribute_distances,
    inter_species_alignment,
    inter_species_subspace,
    intra_species_metrics,
    mantel,
    species_attribute,
)
from bioclip_fast.analysis.plots import plot_comparison, plot_projection

S, D, N_PER = 12, 64, 20


def _planted(intra_direction: str, seed: int = 0):
    """12 species on orthogonal mean directions; within each species a binary attribute (sex) shifts images along
    a direction that is either orthogonal to every species mean or one of the species-mean directions."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    mean_dirs, orth = q[:, :S], q[:, S + 3]
    # "aligned": a contrast of two species means, so it lies in the span of the centered means
    sex_dir = orth if intra_direction == "orthogonal" else (mean_dirs[:, 0] - mean_dirs[:, 1]) / np.sqrt(2)
    x, sp, sex = [], [], []
    for s in range(S):
        for i in range(N_PER):
            g = i % 2
            x.append(3 * mean_dirs[:, s] + (0.8 if g else -0.8) * sex_dir + 0.03 * rng.normal(size=D))
            sp.append(f"species {s}")
            sex.append("male" if g else "female")
    return np.array(x), sp, sex


def test_rho_and_fdr_recover_orthogonal_vs_aligned_intra_species_direction():
    ortho = intra_species_metrics(*_planted("orthogonal"))
    aligned = intra_species_metrics(*_planted("aligned"))
    assert ortho["k"] == aligned["k"] == S - 1  # the centered means of S species span S - 1 dimensions
    # orthogonal: the sex shift lies outside the inter-species subspace -> small rho, large FDR in the complement
    assert ortho["rho"] < ortho["rho_random"] < aligned["rho"]
    assert ortho["rho"] < 0.2 and aligned["rho"] > 0.5
    assert ortho["fdr"] > 5 and aligned["fdr"] < 0.1
    # ... and the separation moved into the subspace when the direction is aligned
    assert aligned["fdr_subspace"] > 5 and ortho["fdr_subspace"] < 0.1
    assert ortho["attribute_values"] == {"female": S * N_PER // 2, "male": S * N_PER // 2}


def test_rho_by_definition_on_a_tiny_example():
    """Two species in 3-D: means (±1,0,0) span the x axis; residuals (0,±a,0) and (±b,0,0) give rho = b²/(a²+b²)."""
    a, b = 0.3, 0.1
    x = np.array([[1, a, 0], [1, -a, 0], [-1 + b, 0, 0], [-1 - b, 0, 0]], dtype=float)
    m = intra_species_metrics(x, ["s1", "s1", "s2", "s2"], normalize=False)
    assert m["k"] == 1
    assert m["rho"] == pytest.approx(2 * b**2 / (2 * a**2 + 2 * b**2))
    assert m["rho_random"] == pytest.approx(1 / 3)


def test_fdr_by_definition():
    # in the complement of the x axis (the species axis) the two groups sit at y = ±1 with spread ±0.5:
    # tr(S_B) = 8·1², tr(S_W) = 8·0.5². Along x the residuals are ±0.1 in both groups: no attribute signal there.
    x = np.array([[1.1, 1.5, 0], [0.9, 0.5, 0], [1.1, -0.5, 0], [0.9, -1.5, 0],
                  [-0.9, 1.5, 0], [-1.1, 0.5, 0], [-0.9, -0.5, 0], [-1.1, -1.5, 0]], dtype=float)
    sp = ["a"] * 4 + ["b"] * 4
    sex = ["m", "m", "f", "f"] * 2
    m = intra_species_metrics(x, sp, sex, normalize=False)
    assert m["fdr"] == pytest.approx(8 * 1.0 / (8 * 0.25))
    assert m["fdr_subspace"] == 0.0  # no attribute signal along the species axis


def test_subspace_variance_threshold():
    means = np.diag([10.0, 3.0, 1.0, 0.0])  # 4 species in 4-D
    u_all, r_all = inter_species_subspace(means, None)
    assert u_all.shape == (4, 3)  # rank of the centered means: S - 1
    u, r = inter_species_subspace(means, 0.95)  # explained: 0.920, 0.074, 0.006
    assert u.shape[1] == 2 and r.sum() >= 0.95 > r[0]
    assert inter_species_subspace(means, 0.9)[0].shape[1] == 1
    with pytest.raises(ValueError, match="at least 2 species"):
        inter_species_subspace(means[:1], 0.95)


def _families(seed=0, n_species=15, per=10):
    rng = np.random.default_rng(seed)
    fam = np.array([f"family {i % 3}" for i in range(n_species)])
    centers = {f: rng.normal(size=D) * 2 for f in sorted(set(fam))}
    means = np.stack([centers[f] for f in fam]) + 0.6 * rng.normal(size=(n_species, D))
    x = np.concatenate([means[s] + 0.4 * rng.normal(size=(per, D)) for s in range(n_species)])
    sp = np.repeat([f"sp{s}" for s in range(n_species)], per)
    return x, sp, fam, per, rng


def test_alignment_high_for_planted_attribute_and_null_for_shuffled():
    x, sp, fam, per, rng = _families()
    planted = inter_species_alignment(x, sp, np.repeat(fam, per), n_permutations=499)
    assert planted["attribute_kind"] == "categorical" and planted["n_species"] == 15
    assert planted["alignment"] > 0.5 and planted["p_value"] < 0.01
    nulls = []
    for seed in range(5):
        shuffled = np.random.default_rng(seed + 10).permutation(fam)
        r = inter_species_alignment(x, sp, np.repeat(shuffled, per), n_permutations=0)
        nulls.append(r["alignment"])
    assert abs(np.mean(nulls)) < 0.15 and max(nulls) < planted["alignment"] - 0.3


def test_alignment_with_numeric_attribute_and_distance_matrix():
    rng = np.random.default_rng(2)
    size = np.linspace(0, 1, 10)
    # species means on a quarter circle: cosine distance 1 - cos(π/2·Δsize) grows with the size difference
    e1, e2 = np.linalg.qr(rng.normal(size=(D, 2)))[0].T
    means = np.cos(size * np.pi / 2)[:, None] * e1 + np.sin(size * np.pi / 2)[:, None] * e2
    x = np.repeat(means, 5, axis=0) + 0.01 * rng.normal(size=(50, D))
    sp = np.repeat([f"s{i}" for i in range(10)], 5)
    r = inter_species_alignment(x, sp, np.repeat(size, 5).astype(str), n_permutations=199)
    assert r["attribute_kind"] == "numeric" and r["alignment"] > 0.8
    dist = np.abs(size[:, None] - size[None, :])
    r2 = inter_species_alignment(x, sp, attribute_distance=dist, attribute_species=[f"s{i}" for i in range(10)],
                                 n_permutations=0)
    assert r2["alignment"] == pytest.approx(r["alignment"])
    with pytest.raises(ValueError, match="exactly one"):
        inter_species_alignment(x, sp)


def test_mantel_statistic_is_spearman_of_pairs_and_p_value_counts():
    rng = np.random.default_rng(3)
    p = rng.normal(size=(8, 2))
    d1 = np.linalg.norm(p[:, None] - p[None], axis=-1)
    d2 = d1 + rng.normal(scale=0.3, size=d1.shape)
    d2 = (d2 + d2.T) / 2
    stat, pval = mantel(d1, d2, n_permutations=99, seed=0)
    iu = np.triu_indices(8, 1)
    assert stat == pytest.approx(spearmanr(d1[iu], d2[iu]).statistic)
    assert 1 / 100 <= pval <= 1 and (pval * 100) == pytest.approx(round(pval * 100))
    with pytest.raises(ValueError, match="at least 3"):
        mantel(d1[:2, :2], d2[:2, :2])


def test_species_attribute_majority_and_distances():
    values, consistency = species_attribute(["a", "a", "a", "b"], ["x", "x", "y", "z"])
    assert values == {"a": "x", "b": "z"} and consistency == pytest.approx(3 / 4)
    d, kind = attribute_distances(["1", "2", "4"])
    assert kind == "numeric" and d[0, 2] == 3
    d, kind = attribute_distances(["1", "2", "1"], "categorical")
    assert kind == "categorical" and d.tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


def test_metric_input_errors():
    x, sp, sex = _planted("orthogonal")
    with pytest.raises(ValueError, match="one value per image"):
        intra_species_metrics(x, sp[:-1])
    with pytest.raises(ValueError, match="at least 2 distinct values"):
        intra_species_metrics(x, sp, ["male"] * len(sp))
    with pytest.raises(ValueError, match="NaN"):
        intra_species_metrics(np.full((4, 3), np.nan), ["a", "a", "b", "b"])


def test_plots_write_pngs(tmp_path):
    x, sp, fam, per, _ = _families(per=4)
    p1 = plot_projection(x, sp, np.repeat(fam, per), tmp_path / "proj.png", attribute_name="family")
    p2 = plot_projection(x, sp, np.arange(len(sp)) / 10, tmp_path / "proj_num.png", attribute_name="size")
    p3 = plot_comparison({"a": {"rho": 0.2, "fdr": 3.0}, "b": {"rho": 0.6, "fdr": None}}, tmp_path / "cmp.png")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_analyze_cli_compares_two_checkpoints(tmp_path, capsys):
    import torch

    from bioclip_fast.cli import main
    from bioclip_fast.data.bundled import butterflies_root
    from bioclip_fast.model import create_model, save_model

    for seed, name in ((0, "small"), (1, "large")):
        torch.manual_seed(seed)
        save_model(tmp_path / name / "model.pt", create_model("bioclip-micro"), {})
    root = butterflies_root()
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep, seen = [], {}
    for r in rows:
        if seen.get(r["scientific_name"], 0) < 4:
            seen[r["scientific_name"]] = seen.get(r["scientific_name"], 0) + 1
            keep.append({**r, "image": str(root / r["image"]), "sex": "male" if len(keep) % 2 else "female"})
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep)
    out = tmp_path / "out"
    rc = main(["analyze", "--checkpoint", str(tmp_path / "small"), "--checkpoint", str(tmp_path / "large"),
               "--data", str(data), "--inter-attribute", "family", "--intra-attribute", "sex",
               "--descriptions", str(root / "descriptions.csv"), "--permutations", "49", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "analysis.json").read_text())["results"]
    assert set(res) == {"small", "large"}
    for r in res.values():
        assert 0 <= r["intra"]["rho"] <= 1 and r["intra"]["n_species"] == 10
        assert r["intra:sex"]["fdr"] >= 0 and r["inter:family"]["n_species"] == 10
        assert -1 <= r["inter:description"]["alignment"] <= 1
    md = (out / "analysis.md").read_text()
    assert "| small |" in md and "| large |" in md and "FDR⊥ sex" in md
    for png in ("comparison.png", "projection_small_family.png", "projection_large_family.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    rc = main(["analyze", "--checkpoint", str(tmp_path / "small"), "--data", str(data),
               "--inter-attribute", "habitat", "--out", str(out)])
    assert rc == 2 and "habitat" in capsys.readouterr().err
    rc = main(["analyze", "--checkpoint", str(tmp_path / "absent"), "--out", str(out)])
    assert rc == 2 and "absent" in capsys.readouterr().err
