"""Plots for the emergent-property analysis: a 2-D projection of an embedding space coloured by an attribute, and
bar charts comparing several models' metrics."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """N x 2 coordinates: PCA (default; deterministic, fast) or t-SNE (scikit-learn; slower, local structure)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an N x D array with N >= 2 to project, got shape {x.shape}")
    if method == "pca":
        xc = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        out = xc @ vt[:2].T
        if out.shape[1] < 2:
            out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
        return out
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"method={method!r}; choose pca or tsne")


def plot_projection(
    features: Any,
    species: Sequence[Any],
    attribute: Sequence[Any],
    path: str | os.PathLike,
    *,
    title: str = "",
    attribute_name: str = "attribute",
    method: str = "pca",
    annotate_max: int = 30,
) -> Path:
    """Images (small dots) and species means (large circles, labelled) in 2-D, coloured by ``attribute``.

    Numeric attributes get a colour bar; categorical ones a legend. The projection is fitted on all images.
    """
    from bioclip_fast.analysis.emergent import try_numeric
    from bioclip_fast.eval.arrays import as_feature_matrix

    plt = pyplot()
    x = as_feature_matrix(features, "features", normalize=True)
    sp = np.asarray([str(s) for s in species], dtype=object)
    att = list(attribute)
    if len(sp) != len(x) or len(att) != len(x):
        raise ValueError(f"features ({len(x)}), species ({len(sp)}) and attribute ({len(att)}) differ in length")
    names, inv = np.unique(sp, return_inverse=True)
    means = np.stack([x[inv == i].mean(axis=0) for i in range(len(names))])
    xy = project_2d(np.concatenate([x, means]), method)
    pts, mxy = xy[: len(x)], xy[len(x):]
    # a species' colour is its most common attribute value
    sp_att = []
    for i in range(len(names)):
        vals = [att[j] for j in np.flatnonzero(inv == i)]
        sp_att.append(max(set(vals), key=vals.count))
    fig, ax = plt.subplots(figsize=(8, 6.5))
    num = try_numeric(att)
    if num is not None:
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=num, cmap="viridis", s=8, alpha=0.45, linewidths=0)
        ax.scatter(mxy[:, 0], mxy[:, 1], c=np.array([float(v) for v in sp_att]), cmap="viridis", s=160,
                   edgecolors="black", linewidths=1.0, vmin=num.min(), vmax=num.max())
        fig.colorbar(sc, ax=ax, label=attribute_name)
    else:
        cats = sorted({str(v) for v in att})
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        color = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
        ax.scatter(pts[:, 0], pts[:, 1], c=[color[str(v)] for v in att], s=8, alpha=0.45, linewidths=0)
        ax.scatter(mxy[:, 0], mxy[:, 1], c=[color[str(v)] for v in sp_att], s=160, edgecolors="black", linewidths=1.0)
        if len(cats) <= 20:
            handles = [plt.Line2D([], [], marker="o", ls="", color=color[c], label=c) for c in cats]
            ax.legend(handles=handles, title=attribute_name, fontsize=8, loc="best", framealpha=0.8)
    if len(names) <= annotate_max:
        for (px, py), n in zip(mxy, names):
            ax.annotate(n, (px, py), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title or f"image embeddings coloured by {attribute_name} (large: species means)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparison(
    results: dict[str, dict[str, float]],
    path: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    titles: dict[str, str] | None = None,
) -> Path:
    """One panel per metric, one bar per model: ``results`` is ``{model: {metric: value}}``; missing values are
    left empty."""
    plt = pyplot()
    models = list(results)
    if not models:
        raise ValueError("results is empty")
    if metrics is None:
        metrics = list(dict.fromkeys(m for r in results.values() for m in r))
    metrics = [m for m in metrics if any(results[mod].get(m) is not None for mod in models)]
    if not metrics:
        raise ValueError("no metric has a value for any model")
    titles = titles or {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.2 * len(metrics), 4), 3.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, m in zip(axes[0], metrics):
        vals = [results[mod].get(m) for mod in models]
        h = [np.nan if v is None else float(v) for v in vals]
        bars = ax.bar(range(len(models)), h, color=[colors(i % 10) for i in range(len(models))])
        for b, v in zip(bars, h):
            if np.isfinite(v):
                ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center",
                            va="bottom" if v >= 0 else "top", fontsize=8)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(titles.get(m, m), fontsize=9)
        ax.axhline(0, color="black", lw=0.6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
