"""Result files: JSON (numpy-safe), Markdown tables, and a confusion-matrix PNG."""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.fileio import atomic_write_json


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null reads as "undefined"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_json(path, _jsonable(obj), indent=2, allow_nan=False)


def _fmt(v: Any, pct: bool) -> str:
    if v is None:
        return "–"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{100 * v:.1f}" if pct else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, pct_columns: Sequence[str] = ()) -> str:
    """A GitHub Markdown table; ``pct_columns`` hold fractions shown as percentages with one decimal."""
    if not columns:
        raise ValueError("columns is empty")
    pct = set(pct_columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), c in pct).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def confusion_matrix(predictions: Any, labels: Any, n_classes: int) -> np.ndarray:
    """C x C counts, rows = true class, columns = predicted class."""
    p = np.asarray(predictions).astype(np.int64).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.shape}) and labels ({y.shape}) differ in length")
    if len(y) and (min(p.min(), y.min()) < 0 or max(p.max(), y.max()) >= n_classes):
        raise ValueError(f"class indices out of range [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def plot_confusion(
    cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, *, title: str = "", max_classes: int = 60
) -> Path:
    """Row-normalized confusion matrix as a PNG. Beyond ``max_classes`` only the most frequent classes are shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    names = list(class_names)
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(names)} class names")
    if len(names) > max_classes:
        keep = np.sort(np.argsort(-cm.sum(axis=1))[:max_classes])
        cm, names = cm[np.ix_(keep, keep)], [names[i] for i in keep]
        title = f"{title} (top {max_classes} classes)".strip()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(names)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), names, fontsize=7 if n > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def skipped_summary(skipped: list[dict[str, str]], limit: int = 200) -> dict[str, Any]:
    """``{"count", "files": [{"image", "error"}]}`` (the first ``limit`` listed) of the images that were skipped."""
    seen: dict[str, dict[str, str]] = {}
    for s in skipped:
        seen.setdefault(s["image"], s)
    files = list(seen.values())
    return {"count": len(files), "files": files[:limit]}


def warn_skipped(what: str, summary: dict[str, Any]) -> None:
    if summary["count"]:
        first = summary["files"][0]
        print(f"warning: {what}: skipped {summary['count']} unreadable image(s) (first: {first['image']}: "
              f"{first['error']}); listed in the results", file=sys.stderr)


def skipped_markdown(by_model: dict[str, dict[str, Any]]) -> list[str]:
    """A "Skipped images" section (empty list when nothing was skipped)."""
    if not any(s["count"] for s in by_model.values()):
        return []
    md = ["## Skipped images (unreadable: missing, truncated or not an image)", ""]
    for name, s in by_model.items():
        if s["count"]:
            md.append(f"- {name}: {s['count']}")
            md += [f"  - `{f['image']}`: {f['error']}" for f in s["files"]]
    return md + [""]
