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

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.options import EvalOptions

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


def failure_reason(exc: BaseException) -> str:
    """One line for a benchmark that failed: the message of an expected failure (bad layout, unreadable file, a
    protocol that cannot run), prefixed with the exception type for anything else."""
    from bioclip_fast.errors import UsageError, one_line

    text = one_line(exc)
    return text if isinstance(exc, (UsageError, OSError, ValueError)) else f"{type(exc).__name__}: {text}"


def preflight(key: str, folder: Path, options: EvalOptions) -> None:
    """The cheap checks of a benchmark folder (its CSV / list files / class folders), run for every benchmark before
    any model is loaded, so a broken layout is reported at the start (and that benchmark skipped) instead of after
    hours of the others. Raises the reader's one-line error."""
    import importlib

    from bioclip_fast.eval.datasets import ImageCsvDataset, read_csv_rows

    if key == "camera_trap":
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and (sub / "metadata.csv").is_file():
                ImageCsvDataset(read_csv_rows(sub / "metadata.csv"), sub)
        return
    if any(key == k for k, *_ in SPECIES):
        ImageCsvDataset(read_csv_rows(folder / "metadata.csv"), folder)
        return
    mod = importlib.import_module(f"bioclip_fast.eval.beyond.{key}")
    mod.check_layout(folder, **({"protocol": options.plantdoc_protocol} if key == "plantdoc" else {}))


def species_benchmark(model, preprocess, tokenizer, folder: Path, text_type: str, options: EvalOptions,
                      device: str) -> dict[str, Any]:
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.eval.fewshot import reference_few_shot_eval
    from bioclip_fast.eval.zeroshot import class_name, classification_metrics, zero_shot_logits

    data = load_eval_data(folder / "metadata.csv", preprocess=preprocess, model=model, tokenizer=tokenizer,
                          batch_size=options.batch_size, root=folder, num_workers=options.workers, device=device)
    zs = zero_shot_logits(model, tokenizer, data.loader, data.classes, text_types=[text_type],
                          templates=options.templates, device=device, progress=options.progress)
    m = classification_metrics(zs["logits"], zs["labels"], data.classes)
    out: dict[str, Any] = {"zeroshot": {k: m[k] for k in ("top1", "top3", "top5", "n")}, "n_classes": len(data.classes),
                           "text_type": text_type, "skipped": list(zs.get("skipped", []))}
    names = np.asarray([class_name(c) for c in data.classes], dtype=object)[zs["labels"].numpy()].astype(str)
    # a class with fewer than k images is left out of that k (named in the results; the reference would stop)
    out["fewshot"] = reference_few_shot_eval(zs["features"].numpy(), names, shots=(1, 5), folds=options.folds,
                                             rare_classes="leave_out")
    for k, v in out["fewshot"].items():
        if v.get("left_out"):
            print(f"warning: {folder.name}: {k}: left out {len(v['left_out'])} class(es) with fewer than "
                  f"{k.split('-')[0]} images: {', '.join(v['left_out'][:5])}", file=sys.stderr)
    return out


def camera_trap(model, preprocess, tokenizer, folder: Path, text_type: str, options: EvalOptions,
                device: str) -> dict[str, Any]:
    subs: dict[str, dict[str, Any]] = {}
    for s in sorted(folder.iterdir()):
        if s.is_dir() and (s / "metadata.csv").is_file():
            try:
                subs[s.name] = species_benchmark(model, preprocess, tokenizer, s, text_type, options, device)
            except Exception as e:  # noqa: BLE001 - recorded, the other subsets go on
                if options.debug:
                    raise
                subs[s.name] = {"error": failure_reason(e), "skipped": []}
    failed = {n: r["error"] for n, r in subs.items() if "error" in r}

    def mean(get):
        if failed:
            return None
        vals = [get(r) for r in subs.values()]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    out: dict[str, Any] = {"subsets": subs, "zeroshot": {k: mean(lambda r, k=k: r["zeroshot"][k])
                                                         for k in ("top1", "top3", "top5")},
                           "skipped": [s for r in subs.values() for s in r["skipped"]]}
    out["fewshot"] = {k: {"top1": mean(lambda r, k=k: r.get("fewshot", {}).get(k, {}).get("top1"))}
                      for k in ("1-shot", "5-shot")}
    if failed:  # the benchmark is the mean over its subsets: not defined without all of them
        out["error"] = "; ".join(f"subset {n}: {e}" for n, e in failed.items())
    return out


def beyond_benchmark(key: str, model, preprocess, folder: Path, options: EvalOptions, device: str) -> dict[str, Any]:
    import importlib

    mod = importlib.import_module(f"bioclip_fast.eval.beyond.{key}")
    common = dict(device=device, batch_size=options.batch_size, num_workers=options.workers, seed=options.seed,
                  progress=options.progress)
    if key in ("fishnet", "awa2"):
        lr = options.lr_fishnet if key == "fishnet" else options.lr_awa2
        return mod.evaluate(model, preprocess, folder, runs=options.runs or 3, epochs=options.epochs, lr=lr,
                            probe_batch_size=options.probe_batch_size, probe_eval_mode=options.probe_eval_mode,
                            **common)
    if key == "newt":
        return mod.evaluate(model, preprocess, folder, runs=options.runs or 3, n_iter=options.svm_iter, **common)
    if key == "herbarium19":
        return mod.evaluate(model, preprocess, folder, runs=options.runs or 3, **common)
    return mod.evaluate(model, preprocess, folder, repeats=options.runs or 5, protocol=options.plantdoc_protocol,
                        **common)


def evaluate_model(ckpt, options: EvalOptions, found: dict[str, Path], device: str,
                   refused: dict[str, str] | None = None) -> dict[str, Any]:
    """Every benchmark in ``found`` for one model. A benchmark that fails is recorded as ``{"error": reason}`` and
    the others go on; ``refused`` holds the benchmarks whose layout check failed before any model was loaded."""
    from bioclip_fast.model import load_model

    refused = refused or {}
    res: dict[str, Any] = {"checkpoint": str(ckpt), "species": {}, "beyond": {}}
    groups = [("species", key, name, text_type) for key, name, _, text_type, _ in SPECIES if key in found] + \
             [("beyond", key, name, None) for key, name, _, _ in BEYOND if key in found]
    try:
        model, preprocess, tokenizer, _ = load_model(ckpt, model_name=options.model_name, device=device)
    except Exception as e:  # noqa: BLE001 - this model's cells are marked failed; the other models go on
        if options.debug:
            raise
        reason = f"model not loaded: {failure_reason(e)}"
        print(f"  error: {reason}", file=sys.stderr)
        for group, key, _, _ in groups:
            res[group][key] = {"error": reason, "skipped": []}
        return res
    for group, key, name, text_type in groups:
        if key in refused:
            res[group][key] = {"error": refused[key], "skipped": []}
            continue
        t0 = time.time()
        try:
            if group == "species":
                fn = camera_trap if key == "camera_trap" else species_benchmark
                r = fn(model, preprocess, tokenizer, found[key], text_type, options, device)
            else:
                r = beyond_benchmark(key, model, preprocess, found[key], options, device)
        except Exception as e:  # noqa: BLE001 - recorded with its reason; the other benchmarks go on
            if options.debug:
                raise
            r = {"error": failure_reason(e), "skipped": []}
        res[group][key] = r
        if "error" in r:
            print(f"  {name}: FAILED: {r['error']}", file=sys.stderr)
        elif group == "species":
            print(f"  {name}: zero-shot top-1 {100 * r['zeroshot']['top1']:.1f}% ({time.time() - t0:.0f} s)",
                  file=sys.stderr)
        else:
            print(f"  {name}: {100 * r['score']:.1f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return res


def _mean(vals: list[float | None]) -> float | None:
    """The mean over the benchmarks present; undefined (None) when one of them has no number (failed / not run),
    since a mean over fewer benchmarks is not comparable with the paper's."""
    if not vals or any(x is None for x in vals):
        return None
    return float(np.mean(vals))


def failures(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(model, benchmark key, reason) of every failed cell, in table order."""
    out = []
    for model, r in results.items():
        for key, *_ in SPECIES + BEYOND:
            b = r["species"].get(key) or r["beyond"].get(key)
            if b is not None and "error" in b:
                out.append((model, key, b["error"]))
    return out


def tables(results: dict[str, dict[str, Any]], found: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    """Markdown in the paper's layout (one row per model, the paper's column order) and the same numbers as JSON
    rows (fractions). A failed benchmark's cell reads ``failed [n]``, its reason listed under the tables (and in the
    JSON row under ``failed``); the Mean is then undefined."""
    from bioclip_fast.eval.report import markdown_table

    sp = [(k, n, g) for k, n, g, _, _ in SPECIES if k in found]
    by = [(k, n, g) for k, n, g, _ in BEYOND if k in found]
    md, rows_json = [], {}
    fail = failures(results)
    reasons = list(dict.fromkeys(reason for _, _, reason in fail))  # one note per distinct reason
    notes = {(m, k): reasons.index(reason) + 1 for m, k, reason in fail}

    def table(title: str, items, group: str, get, intro: str) -> None:
        rows, md_rows = [], []
        for model, r in results.items():
            row: dict[str, Any] = {"Model": model}
            md_row: dict[str, Any] = {"Model": model}
            failed = {}
            for k, n, _ in items:
                b = r[group][k]
                if "error" in b:
                    row[n], failed[n] = None, b["error"]
                    md_row[n] = f"failed [{notes[(model, k)]}]"
                else:
                    row[n] = md_row[n] = get(b)
            row["Mean"] = md_row["Mean"] = _mean([row[n] for _, n, _ in items])
            if failed:
                row["failed"] = failed
            rows.append(row)
            md_rows.append(md_row)
        cols = ["Model"] + [n for _, n, _ in items] + ["Mean"]
        md.extend([f"## {title}", "", intro, "", markdown_table(md_rows, cols, pct_columns=cols[1:])])
        rows_json[title] = rows

    if sp:
        groups = " | ".join(f"{g}: {', '.join(n for _, n, gg in sp if gg == g)}"
                            for g in dict.fromkeys(g for _, _, g in sp))
        intro = f"Groups as in the paper — {groups}. Mean over the {len(sp)} benchmarks present."
        table("Species classification: zero-shot top-1 (%)", sp, "species", lambda b: b["zeroshot"]["top1"], intro)
        table("Species classification: one-shot (%)", sp, "species",
              lambda b: b.get("fewshot", {}).get("1-shot", {}).get("top1"), intro)
        table("Species classification: five-shot (%)", sp, "species",
              lambda b: b.get("fewshot", {}).get("5-shot", {}).get("top1"), intro)
    if by:
        metric = {}
        for k, n, _ in by:
            ok = [r["beyond"][k] for r in results.values() if "error" not in r["beyond"][k]]
            metric[n] = ok[0]["metric"] if ok else "failed for every model"
        intro = "Metrics: " + "; ".join(f"{n} — {m}" for n, m in metric.items()) + \
                f". Mean over the {len(by)} benchmarks present."
        table("Beyond species classification (%)", by, "beyond", lambda b: b["score"], intro)
    if fail:
        names = {k: n for k, n, *_ in SPECIES + BEYOND}
        md += ["## Failed benchmarks", "", "The other results are complete; the Mean of a row with a failed benchmark "
               "is left undefined.", ""]
        for i, reason in enumerate(reasons):
            cells = ", ".join(f"{m} / {names[k]}" for m, k, r in fail if r == reason)
            md.append(f"{i + 1}. {reason} ({cells})")
        md.append("")
    flags = sorted({f for r in results.values() for g in ("species", "beyond") for b in r[g].values()
                    for f in b.get("flags", [])})
    if flags:
        md += ["## Reference quirks reproduced (flagged)", ""] + [f"- {f}" for f in flags] + [""]
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
        panels.append(("species: zero-shot top-1 (%)", sp,
                       lambda r, k: r["species"][k].get("zeroshot", {}).get("top1")))
    if by:
        panels.append(("beyond species (%)", by, lambda r, k: r["beyond"][k].get("score")))
    models = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, 1.0 * sum(len(p[1]) for p in panels) * max(1, len(models))
                                                          ** 0.5 + 3), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    w = 0.8 / max(len(models), 1)
    for ax, (title, items, get) in zip(axes[0], panels):
        x = np.arange(len(items))
        for i, m in enumerate(models):
            raw = [get(results[m], k) for k, _ in items]
            vals = [100 * (v or 0.0) for v in raw]
            bars = ax.bar(x + (i - (len(models) - 1) / 2) * w, vals, w, label=m, color=colors(i % 10))
            for b, v, r in zip(bars, vals, raw):
                ax.annotate("failed" if r is None else f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                            va="bottom", fontsize=6, rotation=90 if r is None else 0)
        ax.set_xticks(x, [n for _, n in items], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 105)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_suite(options: EvalOptions, ckpts: list, labels: list[str], device: str, out: Path, *,
              args_record: dict[str, Any] | None = None) -> int:
    """Every model on every benchmark under ``options.data_root``; all results are written (``suite.json``,
    ``suite.md``, ``suite.png``) even when some benchmarks fail, each failed cell with its reason; the exit status is
    2 when any failed. ``args_record`` is what ``suite.json`` records as the run's arguments (the command's flags;
    default: ``options``)."""
    from bioclip_fast.errors import EXIT_USAGE, DataError, UsageError
    from bioclip_fast.eval.report import skipped_markdown, skipped_summary, warn_skipped
    from bioclip_fast.eval.report import write_json

    if options.data_root is None:
        raise UsageError("the suite needs data_root (--data-root DIR): the folder holding the benchmark folders")
    found, absent = discover(options.data_root)
    if not found:
        names = ", ".join(k for k, *_ in SPECIES + BEYOND)
        raise DataError(f"--data-root {options.data_root}: no benchmark folder found; expected some of: {names} "
                        "(layout: docs/evaluation.md)")
    print(f"benchmarks found: {', '.join(found)}; absent (skipped): {', '.join(absent) or 'none'}", file=sys.stderr)
    refused: dict[str, str] = {}
    for key, folder in found.items():
        try:
            preflight(key, folder, options)
        except Exception as e:  # noqa: BLE001 - reported now, marked failed for every model, the others run
            if options.debug:
                raise
            refused[key] = failure_reason(e)
            print(f"error: {key} ({folder}): {refused[key]}; this benchmark is not run, the others are",
                  file=sys.stderr)
    t0 = time.time()
    results = {}
    for name, ckpt in zip(labels, ckpts):
        print(f"{name}:", file=sys.stderr)
        r = evaluate_model(ckpt, options, found, device, refused)
        r["skipped_images"] = skipped_summary([s for b in (*r["species"].values(), *r["beyond"].values())
                                               for s in b.get("skipped", [])])
        warn_skipped(name, r["skipped_images"])
        results[name] = r
    md_tables, rows = tables(results, found)
    png = plot_suite(results, found, out / "suite.png")
    failed = failures(results)
    meta = {"suite": "bioclip2", "data_root": str(options.data_root), "found": {k: str(v) for k, v in found.items()},
            "absent": absent, "device": device, "seconds": round(time.time() - t0, 2), "templates": options.templates,
            "failed": [{"model": m, "benchmark": k, "error": e} for m, k, e in failed],
            "args": dict(args_record) if args_record is not None else asdict(options)}
    write_json(out / "suite.json", {"meta": meta, "tables": rows, "results": results})
    md = ["# BioCLIP 2 evaluation suite", "", f"Data root: `{options.data_root}`. Absent benchmarks (skipped): "
          f"{', '.join(absent) or 'none'}.", "", md_tables, f"![suite]({png.name})", ""]
    md += skipped_markdown({n: r["skipped_images"] for n, r in results.items()})
    (out / "suite.md").write_text("\n".join(md))
    print(md_tables)
    print(f"wrote {out / 'suite.json'}, {out / 'suite.md'}, {png}")
    if failed:
        first = f"{failed[0][0]} / {failed[0][1]}: {failed[0][2]}"
        print(f"bioclip-fast eval: error: {len(failed)} of {len(results) * len(found)} benchmark runs failed "
              f"(first: {first}); every other result is in {out / 'suite.json'}", file=sys.stderr)
        return EXIT_USAGE
    return 0
