"""The BioCLIP 2 paper's visual evidence for its emergent properties, as three protocols on local dataset folders,
each with a plot (what the paper shows) and metrics (ours; the paper states its evidence visually):

* ``fishnet`` — FishNet species in a t-SNE, coloured freshwater vs marine (inter-species: habitat).
  Folder: FishNet's published layout (``train.csv``, ``test.csv``, ``Image_Library/``; see
  :mod:`bioclip_fast.eval.beyond.fishnet`). Habitat per image from the ``freshwater`` / ``saltwater`` columns:
  freshwater only → ``freshwater``, saltwater only → ``marine``, both → ``both``. Species from a ``species`` /
  ``Species`` / ``scientific_name`` column (genus prefixed when a ``Genus`` column holds it), else the folder column.
  Metrics: Mantel alignment of species means with habitat (categorical), and the share of species whose nearest
  species mean (cosine) has the same habitat (``nn_habitat_agreement``; chance = the share of same-habitat pairs).
* ``finches`` — Darwin's finches ordered by beak size (inter-species: a numeric trait).
  Folder: ``metadata.csv`` with an image column (``filepath`` or ``image``, relative to the folder), ``species``
  (or ``scientific_name``) and a numeric ``beak_size`` (per image; a species' value is its mean). There is no
  published finch benchmark; this is the layout the paper's figure needs.
  Metrics: Spearman correlation of beak size with the species means' first principal coordinate (``|ρ|``: the sign
  of a PCA axis is arbitrary) and the Mantel alignment with beak-size differences.
* ``newt`` — NeWT life stages in 3-D (intra-species).
  Folder: NeWT's published layout (``newt2021_labels.csv``, ``newt2021_images/``; see
  :mod:`bioclip_fast.eval.beyond.newt`); the tasks whose ``task_subcluster`` (or name) says ``life_stage`` are used,
  each task one species, its binary label the two stages. Plot: the two principal components of the species means
  (the species plane) plus the axis orthogonal to that plane along the mean stage contrast, with a line from each
  species' first-stage mean to its second-stage mean. Metrics: ρ and FDR⊥ of the stage attribute
  (:func:`bioclip_fast.analysis.emergent.intra_species_metrics`) and the share of each species' stage contrast
  outside the inter-species subspace (``contrast_orthogonal_share``; an isotropic random direction: ``1 − k/D``).

The same 3-D plot on data without a stage attribute (the bundled butterflies) uses the top principal direction of the
intra-species residuals outside the species plane as the third axis.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOLS = ("fishnet", "finches", "newt")


# ---- readers ---------------------------------------------------------------------------------------------------------
def read_fishnet_habitat(root: str | Path) -> tuple[list[Path], list[str], list[str]]:
    from bioclip_fast.errors import DataError
    from bioclip_fast.eval.beyond import fishnet

    paths, species, habitat = [], [], []
    for split in ("train", "test"):
        if not (Path(root) / f"{split}.csv").is_file():
            continue
        p, y, rows = fishnet.read_split(root, split)
        cols = rows[0].keys()
        sp_col = next((c for c in ("species", "Species", "scientific_name", "ScientificName") if c in cols), None)
        genus_col = next((c for c in ("genus", "Genus") if c in cols), None)
        for path, t, r in zip(p, y, rows):
            if sp_col:
                s = r[sp_col].strip()
                g = r[genus_col].strip() if genus_col else ""
                s = s if (not g or s.startswith(g)) else f"{g} {s}"
            else:
                s = next((v for k, v in r.items() if k.strip().lower() == fishnet.FOLDER_COLUMN.lower()), "")
            fresh, salt = int(t[6]), int(t[7])
            if not (fresh or salt):
                continue
            paths.append(path)
            species.append(s)
            habitat.append("both" if fresh and salt else ("freshwater" if fresh else "marine"))
    if not paths:
        raise DataError(f"FishNet {root}: no train.csv/test.csv rows with a freshwater or saltwater habitat")
    return paths, species, habitat


def read_finches(root: str | Path) -> tuple[list[Path], list[str], list[float]]:
    from bioclip_fast.errors import DataError
    from bioclip_fast.eval.datasets import IMAGE_COLUMNS, read_csv_rows

    root = Path(root)
    rows = read_csv_rows(root / "metadata.csv")
    cols = rows[0].keys()
    img = next((c for c in IMAGE_COLUMNS if c in cols), None)
    sp = next((c for c in ("species", "scientific_name") if c in cols), None)
    if img is None or sp is None or "beak_size" not in cols:
        raise DataError(f"{root / 'metadata.csv'}: needs an image column ({'/'.join(IMAGE_COLUMNS)}), species "
                        f"and beak_size; has {sorted(cols)}")
    try:
        beak = [float(r["beak_size"]) for r in rows]
    except ValueError:
        raise DataError(f"{root / 'metadata.csv'}: beak_size must be numeric") from None
    return [root / r[img] for r in rows], [r[sp] for r in rows], beak


def read_newt_life_stages(root: str | Path) -> tuple[list[Path], list[str], list[str]]:
    from bioclip_fast.errors import DataError
    from bioclip_fast.eval.beyond.newt import read_labels

    root = Path(root)
    rows = [r for r in read_labels(root)
            if "life_stage" in (r.get("task_subcluster") or "") or "life_stage" in r["task"]]
    if not rows:
        raise DataError(f"NeWT {root}: no life-stage task (task_subcluster 'life_stage')")
    return ([root / "newt2021_images" / f"{r['id']}.jpg" for r in rows], [r["task"] for r in rows],
            [f"stage {r['label']}" for r in rows])


# ---- geometry ---------------------------------------------------------------------------------------------------------
def species_plane(features: np.ndarray, species: Sequence[str], variant: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """(D x 2 basis of the species plane, D unit third axis orthogonal to it, how the third axis was chosen)."""
    from bioclip_fast.analysis.emergent import species_means

    names, means, inv = species_means(features, species)
    if len(names) < 3:
        raise ValueError(f"need at least 3 species for a species plane, got {len(names)}")
    m = means - means.mean(0)
    _, _, vt = np.linalg.svd(m, full_matrices=False)
    plane = vt[:2].T
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    proj = np.eye(x.shape[1]) - plane @ plane.T
    how = "top intra-species residual direction outside the species plane"
    axis = None
    if variant is not None:
        contrasts = _contrasts(x, np.asarray(species, dtype=object).astype(str), np.asarray(variant, dtype=object))
        if contrasts:
            d = proj @ np.mean(list(contrasts.values()), axis=0)
            if np.linalg.norm(d) > 1e-12:
                axis, how = d / np.linalg.norm(d), "mean variant contrast, orthogonal to the species plane"
    if axis is None:
        r = (x - means[inv]) @ proj
        _, _, rv = np.linalg.svd(r - r.mean(0), full_matrices=False)
        axis = rv[0]
    return plane, axis, how


def _contrasts(x: np.ndarray, species: np.ndarray, variant: np.ndarray) -> dict[str, np.ndarray]:
    """Per species seen with exactly two variants: mean(second variant) − mean(first variant) (sorted)."""
    out = {}
    for s in np.unique(species):
        m = species == s
        vals = sorted({str(v) for v in variant[m] if str(v)})
        if len(vals) == 2:
            a = x[m & (variant.astype(str) == vals[0])].mean(0)
            b = x[m & (variant.astype(str) == vals[1])].mean(0)
            out[s] = b - a
    return out


def contrast_orthogonality(features: Any, species: Sequence[str], variant: Sequence[str],
                           var_threshold: float = 0.95) -> dict[str, Any]:
    """Share of each species' variant contrast outside the inter-species subspace (ours)."""
    from bioclip_fast.analysis.emergent import inter_species_subspace, species_means

    names, means, _ = species_means(features, species)
    u, _ = inter_species_subspace(means, var_threshold)
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    c = _contrasts(x, np.asarray(species, dtype=object).astype(str), np.asarray(variant, dtype=object))
    shares = {s: float(1 - np.sum((u.T @ d) ** 2) / max(np.sum(d ** 2), 1e-24)) for s, d in c.items()}
    return {"contrast_orthogonal_share": float(np.mean(list(shares.values()))) if shares else float("nan"),
            "by_species": shares, "random_share": float(1 - u.shape[1] / x.shape[1]), "k": int(u.shape[1])}


def nn_agreement(features: Any, species: Sequence[str], attribute: Sequence[str]) -> dict[str, float]:
    """Share of species whose nearest other species mean (cosine) has the same attribute value, and its chance."""
    from bioclip_fast.analysis.emergent import species_attribute, species_means

    names, means, _ = species_means(features, species)
    values, _ = species_attribute(np.asarray(species, dtype=object).astype(str), np.asarray(attribute, dtype=object))
    mu = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    sim = mu @ mu.T
    np.fill_diagonal(sim, -np.inf)
    att = np.asarray([values[n] for n in names], dtype=object)
    nn = sim.argmax(1)
    same = att[:, None] == att[None, :]
    n = len(names)
    chance = (same.sum() - n) / max(n * (n - 1), 1)
    return {"nn_habitat_agreement": float((att == att[nn]).mean()), "nn_chance": float(chance)}


# ---- plots ------------------------------------------------------------------------------------------------------------
def plot_species_plane_3d(features: Any, species: Sequence[str], path: str | os.PathLike, *,
                          variant: Sequence[str] | None = None, title: str = "", annotate_max: int = 25) -> Path:
    """Species means and images in (species-plane PC1, PC2, orthogonal axis); with ``variant``, one line per
    species from its first-variant mean to its second-variant mean."""
    from bioclip_fast.analysis.emergent import species_means
    from bioclip_fast.analysis.plots import pyplot

    plt = pyplot()
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sp = np.asarray([str(s) for s in species], dtype=object)
    plane, axis, how = species_plane(x, sp, variant)
    basis = np.column_stack([plane, axis])
    center = x.mean(0)
    pts = (x - center) @ basis
    names, means, inv = species_means(x, sp)
    mxy = (means - center) @ basis
    fig = plt.figure(figsize=(8, 7))
    ax = fig.add_subplot(projection="3d")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=[cmap(i % cmap.N) for i in inv], s=6, alpha=0.25)
    if variant is not None:
        var = np.asarray([str(v) for v in variant], dtype=object)
        for i, s in enumerate(names):
            vals = sorted({v for v in var[sp == s] if v})
            if len(vals) == 2:
                a = pts[(sp == s) & (var == vals[0])].mean(0)
                b = pts[(sp == s) & (var == vals[1])].mean(0)
                ax.plot(*zip(a, b), color="black", lw=1.2)
                ax.scatter(*a, color=cmap(i % cmap.N), marker="o", s=60, edgecolors="black")
                ax.scatter(*b, color=cmap(i % cmap.N), marker="^", s=70, edgecolors="black")
    else:
        ax.scatter(mxy[:, 0], mxy[:, 1], mxy[:, 2], c=[cmap(i % cmap.N) for i in range(len(names))], s=90,
                   edgecolors="black")
    if len(names) <= annotate_max:
        for (px, py, pz), n in zip(mxy, names):
            ax.text(px, py, pz, n, fontsize=6)
    ax.set_xlabel("species plane PC1")
    ax.set_ylabel("species plane PC2")
    ax.set_zlabel("orthogonal axis")
    ax.set_title(title or f"species plane + orthogonal axis ({how})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- protocols --------------------------------------------------------------------------------------------------------
def run_protocol(name: str, model, preprocess, root: str | Path, out: Path, label: str, *, device: str = "cpu",
                 batch_size: int = 64, num_workers: int = 0, permutations: int = 999, seed: int = 0,
                 var_threshold: float = 0.95, progress: bool = False) -> dict[str, Any]:
    """One visual protocol for one model: writes its PNG into ``out`` and returns its metrics (ours)."""
    from bioclip_fast.analysis.emergent import inter_species_alignment, intra_species_metrics
    from bioclip_fast.analysis.plots import plot_projection
    from bioclip_fast.eval.beyond.common import extract_features

    reader = {"fishnet": read_fishnet_habitat, "finches": read_finches, "newt": read_newt_life_stages}[name]
    paths, species, attr = reader(root)
    enc = extract_features(model, preprocess, paths, device=device, batch_size=batch_size, num_workers=num_workers,
                           progress=progress, desc=f"{name} images")
    x = enc["features"]
    sp = [species[i] for i in enc["index"]]
    at = [attr[i] for i in enc["index"]]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    res: dict[str, Any] = {"data": str(root), "n_images": len(sp), "n_species": len(set(sp)),
                           "skipped": enc["skipped"]}
    if name == "fishnet":
        res.update(inter_species_alignment(x, sp, at, attribute_kind="categorical", n_permutations=permutations,
                                           seed=seed))
        res.update(nn_agreement(x, sp, at))
        png = plot_projection(x, sp, at, out / f"fishnet_habitat_tsne_{safe}.png", attribute_name="habitat",
                              method="tsne", annotate_max=0,
                              title=f"{label}: FishNet species, freshwater vs marine (t-SNE; Mantel "
                                    f"{res['alignment']:.2f})")
    elif name == "finches":
        from scipy.stats import spearmanr

        from bioclip_fast.analysis.emergent import species_means

        names, means, _ = species_means(x, sp)
        beak = {n: float(np.mean([b for s, b in zip(sp, at) if s == n])) for n in names}
        m = means - means.mean(0)
        pc1 = m @ np.linalg.svd(m, full_matrices=False)[2][0]
        rho = float(spearmanr(pc1, [beak[n] for n in names]).statistic) if len(names) > 2 else float("nan")
        res.update(inter_species_alignment(x, sp, [str(b) for b in at], attribute_kind="numeric",
                                           n_permutations=permutations, seed=seed))
        res["beak_pc1_spearman"] = abs(rho)
        res["species_order_by_pc1"] = [str(n) for n in np.asarray(names)[np.argsort(pc1)]]
        png = plot_projection(x, sp, at, out / f"finches_beak_{safe}.png", attribute_name="beak size",
                              method="pca", title=f"{label}: finches by beak size (|Spearman(PC1, beak)| = "
                                                  f"{abs(rho):.2f})")
    else:
        m = intra_species_metrics(x, sp, at, var_threshold=var_threshold)
        res.update({k: m[k] for k in ("rho", "rho_random", "k", "fdr", "fdr_subspace", "fdr_full")})
        res.update(contrast_orthogonality(x, sp, at, var_threshold))
        png = plot_species_plane_3d(x, sp, out / f"newt_life_stages_3d_{safe}.png", variant=at,
                                    title=f"{label}: NeWT life stages (species plane + orthogonal axis; "
                                          f"ρ = {m['rho']:.2f}, FDR⊥ = {m['fdr']:.2f})")
    res["png"] = png.name
    return res
