r"""Emergent properties of an image-embedding space, as quantitative metrics of our own.

BioCLIP 2 (arXiv 2505.23883) claims two emergent properties and shows them in figures: species arrange by
ecological / functional traits (inter-species), and intra-species variation is kept in directions orthogonal to the
inter-species ones (intra-species). The formulas below are this package's quantification of those claims (the paper
defines none of them); see docs/emergent.md for the claims beside the metrics and
:mod:`bioclip_fast.analysis.visual` for the paper's three visual protocols.

Notation: ``x_i`` the L2-normalized embedding of image ``i``, ``s(i)`` its species, ``μ_s`` the mean embedding of
species ``s``, ``μ̄`` the mean of the species means, and ``M`` the (S x D) matrix of centered species means
``μ_s − μ̄``.

Inter-species subspace
    ``U`` (D x k): the top right-singular vectors of ``M``, keeping the smallest ``k`` whose singular values explain
    at least ``var_threshold`` (default 95%) of ``‖M‖_F²``; at most ``S − 1`` (the rank of ``M``).

Intra-species variance ratio ρ (lower = more orthogonal)
    residuals ``r_i = x_i − μ_{s(i)}``;  ``ρ = Σ_i ‖Uᵀ r_i‖² / Σ_i ‖r_i‖²``.
    A random k-dimensional subspace captures ``k / D`` of isotropic variance (``rho_random``), the reference value.

Fisher discriminant ratio (FDR) of an intra-species attribute in the orthogonal complement (higher = better separated)
    ``r⊥_i = (I − U Uᵀ) r_i``; with attribute groups ``g`` (e.g. male / female), group means ``m_g`` over ``r⊥``, overall
    mean ``m``:  ``S_B = Σ_g n_g (m_g − m)(m_g − m)ᵀ``,  ``S_W = Σ_g Σ_{i∈g} (r⊥_i − m_g)(r⊥_i − m_g)ᵀ``,
    ``FDR = tr(S_B) / tr(S_W)``. Traces are computed directly (no D x D matrices). By default only species in which
    at least two attribute values occur contribute (elsewhere the residuals carry no attribute contrast).

Inter-species alignment with a species-level attribute (Mantel test)
    ``d_E(s, t) = 1 − cos(μ_s, μ_t)`` (cosine distance of species means) and ``d_A(s, t)`` the attribute distance
    (``|a_s − a_t|`` for numbers, ``[a_s ≠ a_t]`` for categories, or a given matrix, e.g. distances of text
    embeddings of species descriptions). ``alignment = Spearman(d_E, d_A)`` over the ``S(S−1)/2`` species pairs;
    p-value from ``n_permutations`` relabelings of the species in ``d_A``:
    ``p = (1 + #{alignment_perm ≥ alignment}) / (1 + n_permutations)``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    a = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y, dtype=object)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must hold one value per image ({n}), got shape {a.shape}")
    return a


def species_means(features: Any, species: Any, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(species names in sorted order, S x D means, per-image species index)."""
    from bioclip_fast.eval.arrays import as_feature_matrix  # lazy: importing the eval package loads torch

    x = as_feature_matrix(features, "features", normalize=normalize)
    s = _labels(species, x.shape[0], "species")
    names, inv = np.unique(s.astype(str), return_inverse=True)
    counts = np.bincount(inv, minlength=len(names)).astype(np.float64)
    means = np.zeros((len(names), x.shape[1]))
    np.add.at(means, inv, x)
    return names, means / counts[:, None], inv


def inter_species_subspace(means: np.ndarray, var_threshold: float | None = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis U (D x k) of the centered species means and the explained-variance ratio of each kept axis.

    ``var_threshold=None`` keeps every axis with non-zero variance (up to S − 1).
    """
    if means.shape[0] < 2:
        raise ValueError(f"need at least 2 species for an inter-species subspace, got {means.shape[0]}")
    if var_threshold is not None and not 0 < var_threshold <= 1:
        raise ValueError(f"var_threshold must be in (0, 1], got {var_threshold}")
    m = means - means.mean(axis=0)
    _, sv, vt = np.linalg.svd(m, full_matrices=False)
    var = sv**2
    total = var.sum()
    if total <= 0:
        raise ValueError("all species means are identical: no inter-species subspace")
    ratio = var / total
    rank = int((sv > sv[0] * 1e-10).sum())
    if var_threshold is None:
        k = rank
    else:
        k = int(np.searchsorted(np.cumsum(ratio), var_threshold - 1e-12) + 1)
        k = min(k, rank)
    return vt[:k].T, ratio[:k]


def _fdr(z: np.ndarray, groups: np.ndarray) -> float:
    """tr(S_B) / tr(S_W) of the rows of z grouped by ``groups`` (integer codes)."""
    mean = z.mean(axis=0)
    sb = sw = 0.0
    for g in np.unique(groups):
        zg = z[groups == g]
        mg = zg.mean(axis=0)
        sb += len(zg) * float(((mg - mean) ** 2).sum())
        sw += float(((zg - mg) ** 2).sum())
    if sw > 0:
        return sb / sw
    return float("inf") if sb > 0 else float("nan")  # perfectly separated / no variation at all


def intra_species_metrics(
    features: Any,
    species: Any,
    attribute: Any | None = None,
    *,
    var_threshold: float | None = 0.95,
    normalize: bool = True,
    mixed_species_only: bool = True,
    missing: Sequence[Any] = ("", None),
) -> dict[str, Any]:
    """ρ (share of intra-species variance in the inter-species subspace) and, given a per-image ``attribute``, its
    Fisher discriminant ratio in the orthogonal complement (``fdr``), in the subspace itself (``fdr_subspace``) and
    in the full space (``fdr_full``). Images whose attribute is in ``missing`` are left out of the FDR.
    """
    names, means, inv = species_means(features, species, normalize=normalize)
    from bioclip_fast.eval.arrays import as_feature_matrix  # lazy: importing the eval package loads torch

    x = as_feature_matrix(features, "features", normalize=normalize)
    u, ratio = inter_species_subspace(means, var_threshold)
    r = x - means[inv]
    total = float((r**2).sum())
    if total <= 0:
        raise ValueError("no intra-species variance: every species has identical embeddings")
    proj = r @ u
    out: dict[str, Any] = {
        "rho": float((proj**2).sum()) / total,
        "rho_random": u.shape[1] / x.shape[1],
        "k": int(u.shape[1]),
        "dim": int(x.shape[1]),
        "n_species": int(len(names)),
        "n_images": int(x.shape[0]),
        "subspace_variance_explained": float(ratio.sum()),
    }
    if attribute is None:
        return out
    a = _labels(attribute, x.shape[0], "attribute")
    missing_set = {m for m in missing}
    keep = np.array([v not in missing_set and not (isinstance(v, float) and np.isnan(v)) for v in a])
    a_str = a.astype(str)
    if mixed_species_only:
        per_species: dict[int, set] = {}
        for sp, v, k in zip(inv, a_str, keep):
            if k:
                per_species.setdefault(int(sp), set()).add(v)
        mixed = {sp for sp, vals in per_species.items() if len(vals) >= 2}
        keep &= np.isin(inv, list(mixed))
    values, codes = np.unique(a_str[keep], return_inverse=True)
    if len(values) < 2:
        raise ValueError(
            "the attribute needs at least 2 distinct values"
            + (" within some species (mixed_species_only=True)" if mixed_species_only else "")
            + f"; found {list(values)}"
        )
    rk = r[keep]
    rk_in = rk @ u
    rk_perp = rk - rk_in @ u.T
    out.update(
        {
            "fdr": _fdr(rk_perp, codes),
            "fdr_subspace": _fdr(rk_in, codes),
            "fdr_full": _fdr(rk, codes),
            "attribute_values": {str(v): int((codes == i).sum()) for i, v in enumerate(values)},
            "n_attribute_images": int(keep.sum()),
        }
    )
    return out


def species_attribute(species: Any, attribute: Any) -> tuple[dict[str, Any], float]:
    """Species-level value of a per-image attribute (the most common value per species) and the share of images that
    agree with their species' value (1.0 for a true species-level attribute)."""
    species = [str(s) for s in species]
    attribute = list(attribute)
    if len(species) != len(attribute):
        raise ValueError(f"species ({len(species)}) and attribute ({len(attribute)}) differ in length")
    by_sp: dict[str, Counter] = {}
    for s, v in zip(species, attribute):
        if v is None or v == "" or (isinstance(v, float) and np.isnan(v)):
            continue
        by_sp.setdefault(s, Counter())[v] += 1
    values = {s: c.most_common(1)[0][0] for s, c in by_sp.items()}
    agree = sum(c[values[s]] for s, c in by_sp.items())
    n = sum(sum(c.values()) for c in by_sp.values())
    return values, (agree / n if n else float("nan"))


def try_numeric(values: Sequence[Any]) -> np.ndarray | None:
    """The values as finite floats, or None when any is not a finite number."""
    try:
        a = np.array([float(v) for v in values])
    except (TypeError, ValueError):
        return None
    return a if np.isfinite(a).all() else None


def attribute_distances(values: Sequence[Any], kind: str = "auto") -> tuple[np.ndarray, str]:
    """Pairwise distances of species-level attribute values: |a − b| for numbers, [a ≠ b] for categories.

    ``kind="auto"`` treats the attribute as numeric when every value parses as a finite number; pass
    ``"categorical"`` for integer-coded categories.
    """
    if kind not in ("auto", "numeric", "categorical"):
        raise ValueError(f"kind={kind!r}; choose auto, numeric or categorical")
    num = try_numeric(values) if kind != "categorical" else None
    if kind == "numeric" and num is None:
        raise ValueError("attribute kind 'numeric' but some values are not finite numbers")
    if num is not None:
        return np.abs(num[:, None] - num[None, :]), "numeric"
    v = np.asarray([str(x) for x in values], dtype=object)
    return (v[:, None] != v[None, :]).astype(np.float64), "categorical"


def _rank(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a)  # average ranks for ties, as Spearman's rho needs


def mantel(
    d1: np.ndarray, d2: np.ndarray, *, n_permutations: int = 999, seed: int = 0
) -> tuple[float, float]:
    """Spearman Mantel statistic between two symmetric S x S distance matrices and its one-sided permutation p-value
    (large positive correlation = aligned). Permuting species relabels the pairs of ``d2``, so the pair ranks of
    ``d2`` are computed once and only re-indexed per permutation."""
    d1, d2 = np.asarray(d1, dtype=np.float64), np.asarray(d2, dtype=np.float64)
    if d1.shape != d2.shape or d1.ndim != 2 or d1.shape[0] != d1.shape[1]:
        raise ValueError(f"distance matrices must be square and equal in shape, got {d1.shape} and {d2.shape}")
    s = d1.shape[0]
    if s < 3:
        raise ValueError(f"a Mantel test needs at least 3 species, got {s}")
    iu = np.triu_indices(s, k=1)
    r1 = _rank(d1[iu])
    r1 = (r1 - r1.mean()) / (np.linalg.norm(r1 - r1.mean()) or 1.0)
    rank2 = np.zeros((s, s))
    rank2[iu] = _rank(d2[iu])
    rank2 = rank2 + rank2.T
    v2 = rank2[iu]
    if np.ptp(v2) == 0:
        return float("nan"), float("nan")  # a constant attribute: no correlation is defined

    def corr(v: np.ndarray) -> float:
        v = v - v.mean()
        return float(r1 @ v / np.linalg.norm(v))

    stat = corr(v2)
    if n_permutations <= 0:
        return stat, float("nan")
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        p = rng.permutation(s)
        hits += corr(rank2[p][:, p][iu]) >= stat - 1e-12
    return stat, (1 + hits) / (1 + n_permutations)


def inter_species_alignment(
    features: Any,
    species: Any,
    attribute: Any | None = None,
    *,
    attribute_distance: np.ndarray | None = None,
    attribute_species: Sequence[str] | None = None,
    attribute_kind: str = "auto",
    n_permutations: int = 999,
    seed: int = 0,
    normalize: bool = True,
) -> dict[str, Any]:
    """Mantel-style Spearman correlation between species-mean cosine distances and attribute distances.

    Give either a per-image ``attribute`` (reduced to one value per species by majority) or a precomputed
    ``attribute_distance`` matrix over ``attribute_species`` (e.g. distances between description embeddings).
    Species without an attribute value are left out. ``attribute_kind``: ``auto``, ``numeric`` or ``categorical``.
    """
    names, means, _ = species_means(features, species, normalize=normalize)
    if (attribute is None) == (attribute_distance is None):
        raise ValueError("pass exactly one of attribute= (per image) or attribute_distance= (species x species)")
    if attribute is not None:
        sp = np.asarray(species.detach().cpu() if hasattr(species, "detach") else species, dtype=object).astype(str)
        values, consistency = species_attribute(sp, _labels(attribute, len(sp), "attribute"))
        keep = [i for i, s in enumerate(names) if s in values]
        dist_a, kind = attribute_distances([values[names[i]] for i in keep], attribute_kind)
    else:
        if attribute_species is None:
            raise ValueError("attribute_distance needs attribute_species (the species of its rows)")
        dist_a = np.asarray(attribute_distance, dtype=np.float64)
        if dist_a.shape != (len(attribute_species),) * 2:
            raise ValueError(f"attribute_distance has shape {dist_a.shape}, expected {(len(attribute_species),) * 2}")
        pos = {str(s): i for i, s in enumerate(attribute_species)}
        keep = [i for i, s in enumerate(names) if s in pos]
        sel = [pos[names[i]] for i in keep]
        dist_a = dist_a[np.ix_(sel, sel)]
        kind, consistency = "matrix", 1.0
    if len(keep) < 3:
        raise ValueError(f"only {len(keep)} species have an attribute value; need at least 3")
    mu = means[keep]
    mu = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
    dist_e = 1.0 - mu @ mu.T
    stat, p = mantel(dist_e, dist_a, n_permutations=n_permutations, seed=seed)
    return {
        "alignment": stat,
        "p_value": p,
        "n_species": len(keep),
        "n_permutations": int(n_permutations),
        "attribute_kind": kind,
        "attribute_consistency": consistency,
    }
