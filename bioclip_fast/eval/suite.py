"""`bioclip-fast eval --suite bioclip2 --data-root DIR`: every benchmark of the BioCLIP 2 paper found under DIR, for
one or several models, in one table laid out like the paper's (Markdown + JSON) and a bar chart.

Expected layout of DIR (folder names are matched case-insensitively; aliases in :data:`SPECIES` / :data:`BEYOND`;
a benchmark whose folder is absent is skipped and listed)::

    DIR/nabirds/metadata.csv            species benchmarks: the reference's CSV (filepath, [cls ranks],
    DIR/plankton/metadata.csv             class, common_name); images relative to the benchmark folder
    DIR/insects/  DIR/insects2/  DIR/plantnet/  DIR/fungi/  DIR/plantvillage/  DIR/medicinal_leaf/
    DIR/rare_species/metadata.csv
    DIR/camera_trap/<subset>/metadata.csv   one folder per camera-trap set (desert-lion, ENA24, island, orinoquia,
                                            ohio-small-animals); the benchmark is their mean, as in the paper
    DIR/fishnet/  DIR/newt/  DIR/awa2/  DIR/herbarium19/  DIR/plantdoc/    beyond species: their published layouts

Species benchmarks run zero-shot (81 templates; ``taxonomic_common`` names for Camera Trap and Rare Species,
labels as is for the others, as the reference's eval.sh) and reference SimpleShot (1- and 5-shot, 5 folds); the
beyond-species benchmarks run their reference protocols (:mod:`bioclip_fast.eval.beyond`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# key, display name, group, text type, folder aliases
SPECIES = (
    ("nabirds", "NABirds", "Animals", "as_is", ("nabird", "nabirds", "na_birds")),
    ("plankton", "Plankton", "Animals", "as_is", ("plk_mini", "plk")),
    ("insects", "Insects", "Animals", "as_is", ("ins_mini", "ins")),
    ("insects2", "Insects 2", "Animals", "as_is", ("insects_2", "ins_2_mini", "ins_2")),
    ("camera_trap", "Camera Trap", "Animals", "taxonomic_common", ("cameratrap", "camera-trap")),
    ("plantnet", "PlantNet", "Plants & Fungi", "as_is", ("plt_net_mini", "plt_net")),
    ("fungi", "Fungi", "Plants & Fungi", "as_is", ("fng_mini", "fng")),
    ("plantvillage", "PlantVillage", "Plants & Fungi", "as_is", ("plt_vil_mini", "plt_vil")),
    ("medicinal_leaf", "Medicinal Leaf", "Plants & Fungi", "as_is", ("med_lf_mini", "med_lf", "medicinal-leaf")),
    ("rare_species", "Rare Species", "Rare Species", "taxonomic_common", ("rare-species", "rarespecies")),
)
BEYOND = (
    ("fishnet", "FishNet", "habitat / traits", ("fish_net",)),
    ("newt", "NeWT", "binary tasks", ("newt2021",)),
    ("awa2", "AwA2", "attributes", ("awa2-data", "awa2_data")),
    ("herbarium19", "Herbarium19", "new species", ("herbarium_19", "herbarium-19")),
    ("plantdoc", "PlantDoc", "disease", ("plant_doc",)),
)


def find_folder(root: Path, key: str, aliases: tuple[str, ...]) -> Path | None:
    names = {key, *aliases}
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name.lower() in names:
            return d
    return None


def discover(root: str | Path) -> tuple[dict[str, Path], list[str]]:
    """({benchmark key: folder}, [absent benchmark keys]) under ``root``."""
    root = Path(root)
    found, absent = {}, []
    for key, _, _, _, aliases in SPECIES:
        d = find_folder(root, key, aliases)
        ok = d is not None and ((d / "metadata.csv").is_file() if key != "camera_trap"
                                else any((s / "metadata.csv").is_file() for s in d.iterdir() if s.is_dir()))
        (found.__setitem__(key, d) if ok else absent.append(key))
    for key, _, _, aliases in BEYOND:
        d = find_folder(root, key, aliases)
        (found.__setitem__(key, d) if d is not None else absent.append(key))
    return found, absent


def species_benchmark(model, preprocess, tokenizer, folder: Path, text_type: str, args, device: str) -> dict[str, Any]:
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.eval.fewshot import reference_few_shot_eval
    from bioclip_fast.eval.zeroshot import class_name, classification_metrics, zero_shot_logits

    data = load_eval_data(folder / "metadata.csv", preprocess=preprocess, model=model, tokenizer=tokenizer,
                          batch_size=args.batch_size, root=folder, num_workers=args.workers, device=device)
    zs = zero_shot_logits(model, tokenizer, data.loader, data.classes, text_types=[text_type],
                          templates=args.templates, device=device, progress=not args.no_progress)
    m = classification_metrics(zs["logits"], zs["labels"], data.classes)
    out: dict[str, Any] = {"zeroshot": {k: m[k] for k in ("top1", "top3", "top5", "n")}, "n_classes": len(data.classes),
                           "text_type": text_type, "skipped": list(zs.get("skipped", []))}
    names = np.asarray([class_name(c) for c in data.classes], dtype=object)[zs["labels"].numpy()].astype(str)
    try:
        out["fewshot"] = reference_few_shot_eval(zs["features"].numpy(), names, shots=(1, 5), folds=args.folds)
    except ValueError as e:  # the reference stops here (a class with fewer than k images); the suite goes on
        out["fewshot_error"] = str(e)
        print(f"warning: {folder.name}: few-shot not run: {e}", file=sys.stderr)
    return out


def camera_trap(model, preprocess, tokenizer, folder: Path, text_type: str, args, device: str) -> dict[str, Any]:
    subs = {s.name: species_benchmark(model, preprocess, tokenizer, s, text_type, args, device)
            for s in sorted(folder.iterdir()) if s.is_dir() and (s / "metadata.csv").is_file()}

    def mean(get):
        vals = [get(r) for r in subs.values()]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    out: dict[str, Any] = {"subsets": subs, "zeroshot": {k: mean(lambda r, k=k: r["zeroshot"][k])
                                                         for k in ("top1", "top3", "top5")},
                           "skipped": [s for r in subs.values() for s in r["skipped"]]}
    out["fewshot"] = {k: {"top1": mean(lambda r, k=k: r.get("fewshot", {}).get(k, {}).get("top1"))}
                      for k in ("1-shot", "5-shot")}
    return out


def beyond_benchmark(key: str, model, preprocess, folder: Path, args, device: str) -> dict[str, Any]:
    import importlib

    mod = importlib.import_module(f"bioclip_fast.eval.beyond.{key}")
    common = dict(device=device, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                  progress=not args.no_progress)
    if key in ("fishnet", "awa2"):
        return mod.evaluate(model, preprocess, folder, runs=args.runs or 3, epochs=args.epochs, **common)
    if key == "newt":
        return mod.evaluate(model, preprocess, folder, runs=args.runs or 3, n_iter=args.svm_iter, **common)
    if key == "herbarium19":
        return mod.evaluate(model, preprocess, folder, runs=args.runs or 3, **common)
    return mod.evaluate(model, preprocess, folder, repeats=args.runs or 5, **common)


def evaluate_model(ckpt, args: argparse.Namespace, found: dict[str, Path], device: str) -> dict[str, Any]:
    from bioclip_fast.model import load_model

    model, preprocess, tokenizer, _ = load_model(ckpt, model_name=args.model_name, device=device)
    res: dict[str, Any] = {"checkpoint": str(ckpt), "species": {}, "beyond": {}}
    for key, name, _, text_type, _ in SPECIES:
        if key in found:
            t0 = time.time()
            fn = camera_trap if key == "camera_trap" else species_benchmark
            res["species"][key] = fn(model, preprocess, tokenizer, found[key], text_type, args, device)
            print(f"  {name}: zero-shot top-1 {100 * res['species'][key]['zeroshot']['top1']:.1f}% "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr)
    for key, name, _, _ in BEYOND:
        if key in found:
            t0 = time.time()
            res["beyond"][key] = beyond_benchmark(key, model, preprocess, found[key], args, device)
            print(f"  {name}: {100 * res['beyond'][key]['score']:.1f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return res


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def tables(results: dict[str, dict[str, Any]], found: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    """Markdown in the paper's layout and the same numbers as JSON rows (percent)."""
    from bioclip_fast.eval.report import markdown_table

    sp = [(k, n, g) for k, n, g, _, _ in SPECIES if k in found]
    by = [(k, n, g) for k, n, g, _ in BEYOND if k in found]
    md, rows_json = [], {}

    def species_table(title: str, get) -> None:
        rows = []
        for model, r in results.items():
            row = {"Model": model}
            for k, n, _ in sp:
                row[n] = get(r["species"][k])
            row["Mean"] = _mean([row[n] for _, n, _ in sp])
            rows.append(row)
        cols = ["Model"] + [n for _, n, _ in sp] + ["Mean"]
        groups = " | ".join(f"{g}: {', '.join(n for _, n, gg in sp if gg == g)}"
                            for g in dict.fromkeys(g for _, _, g in sp))
        md.extend([f"## {title}", "", f"Groups as in the paper — {groups}. Mean over the {len(sp)} benchmarks present.",
                   "", markdown_table(rows, cols, pct_columns=cols[1:])])
        rows_json[title] = rows

    if sp:
        species_table("Species classification: zero-shot top-1 (%)", lambda b: b["zeroshot"]["top1"])
        species_table("Species classification: one-shot (%)",
                      lambda b: b.get("fewshot", {}).get("1-shot", {}).get("top1"))
        species_table("Species classification: five-shot (%)",
                      lambda b: b.get("fewshot", {}).get("5-shot", {}).get("top1"))
    if by:
        rows = []
        for model, r in results.items():
            row = {"Model": model, **{n: r["beyond"][k]["score"] for k, n, _ in by}}
            row["Mean"] = _mean([row[n] for _, n, _ in by])
            rows.append(row)
        cols = ["Model"] + [n for _, n, _ in by] + ["Mean"]
        title = "Beyond species classification (%)"
        md.extend([f"## {title}", "", "Metrics: " + "; ".join(
            f"{n} — {next(iter(results.values()))['beyond'][k]['metric']}" for k, n, _ in by) + ". Mean over "
                   f"the {len(by)} benchmarks present.", "", markdown_table(rows, cols, pct_columns=cols[1:])])
        rows_json[title] = rows
    return "\n".join(md), rows_json


def plot_suite(results: dict[str, dict[str, Any]], found: dict[str, Path], path: Path) -> Path:
    """Grouped bars: one panel for species zero-shot top-1, one for the beyond-species scores; a bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    sp = [(k, n) for k, n, *_ in SPECIES if k in found]
    by = [(k, n) for k, n, *_ in BEYOND if k in found]
    if sp:
        panels.append(("species: zero-shot top-1 (%)", sp, lambda r, k: r["species"][k]["zeroshot"]["top1"]))
    if by:
        panels.append(("beyond species (%)", by, lambda r, k: r["beyond"][k]["score"]))
    models = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, 1.0 * sum(len(p[1]) for p in panels) * max(1, len(models))
                                                          ** 0.5 + 3), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    w = 0.8 / max(len(models), 1)
    for ax, (title, items, get) in zip(axes[0], panels):
        x = np.arange(len(items))
        for i, m in enumerate(models):
            vals = [100 * (get(results[m], k) or 0.0) for k, _ in items]
            bars = ax.bar(x + (i - (len(models) - 1) / 2) * w, vals, w, label=m, color=colors(i % 10))
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, [n for _, n in items], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 105)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_suite(args: argparse.Namespace, ckpts: list, labels: list[str], device: str, out: Path) -> int:
    from bioclip_fast.errors import DataError
    from bioclip_fast.eval.cli import skipped_markdown, skipped_summary, warn_skipped
    from bioclip_fast.eval.report import write_json

    found, absent = discover(args.data_root)
    if not found:
        names = ", ".join(k for k, *_ in SPECIES + BEYOND)
        raise DataError(f"--data-root {args.data_root}: no benchmark folder found; expected some of: {names} "
                        "(layout: docs/evaluation.md)")
    print(f"benchmarks found: {', '.join(found)}; absent (skipped): {', '.join(absent) or 'none'}", file=sys.stderr)
    t0 = time.time()
    results = {}
    for name, ckpt in zip(labels, ckpts):
        print(f"{name}:", file=sys.stderr)
        r = evaluate_model(ckpt, args, found, device)
        r["skipped_images"] = skipped_summary([s for b in (*r["species"].values(), *r["beyond"].values())
                                               for s in b.get("skipped", [])])
        warn_skipped(name, r["skipped_images"])
        results[name] = r
    md_tables, rows = tables(results, found)
    png = plot_suite(results, found, out / "suite.png")
    meta = {"suite": "bioclip2", "data_root": str(args.data_root), "found": {k: str(v) for k, v in found.items()},
            "absent": absent, "device": device, "seconds": round(time.time() - t0, 2), "templates": args.templates,
            "args": vars(args)}
    write_json(out / "suite.json", {"meta": meta, "tables": rows, "results": results})
    md = ["# BioCLIP 2 evaluation suite", "", f"Data root: `{args.data_root}`. Absent benchmarks (skipped): "
          f"{', '.join(absent) or 'none'}.", "", md_tables, f"![suite]({png.name})", ""]
    md += skipped_markdown({n: r["skipped_images"] for n, r in results.items()})
    (out / "suite.md").write_text("\n".join(md))
    print(md_tables)
    print(f"wrote {out / 'suite.json'}, {out / 'suite.md'}, {png}")
    return 0
