"""PNG of the training curves (loss, lr, logit scale, throughput, data wait) from the metrics JSONL records."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def plot_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write a 2×3 panel figure of the per-step records; returns the path."""
    if not records:
        raise ValueError("plot_metrics: no records to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    panels = [
        ("loss", "contrastive loss", [("loss", "total"), ("loss_bio", "biology"), ("loss_replay", "replay")]),
        ("lr", "learning rate", [("lr", None)]),
        ("logit_scale", "logit scale (exp)", [("logit_scale", None)]),
        ("img_s", "images / s", [("img_s", "global"), ("img_s_per_rank", "per rank")]),
        ("mfu", "MFU / data-wait fraction", [("mfu", "MFU"), ("hfu", "HFU"), ("data_wait_frac", "data wait")]),
        ("peak_mem_gb", "peak memory (GB)", [("peak_mem_gb", None)]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (_, label, keys) in zip(axes.flat, panels):
        drawn = False
        has_replay = any(r.get("loss_replay") is not None for r in records)
        for key, name in keys:
            if key == "loss_bio" and not has_replay:  # identical to the total without replay
                continue
            ys = series(key)
            if all(y != y for y in ys):  # all NaN: metric not available (e.g. MFU on CPU)
                continue
            if key.startswith("loss") and len(ys) > 20:
                ax.plot(steps, ys, alpha=0.3, lw=0.8)
                k = max(1, len(ys) // 50)
                smooth = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
                ax.plot(steps, smooth, label=f"{name} (smoothed)" if name else None)
            else:
                ax.plot(steps, ys, label=name)
            drawn = True
        ax.set_title(label)
        ax.set_xlabel("step")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if drawn and any(name for _, name in keys):
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
