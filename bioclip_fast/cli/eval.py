"""`bioclip-fast eval`: zero-shot, few-shot (SimpleShot) and linear-probe evaluation of one or more checkpoints.

Writes ``results.json`` (everything, per model), ``results.md`` (one table row per model) and a confusion-matrix PNG
per model (zero-shot) into ``--out``. Protocol defaults are the BioCLIP 2 reference's: 81 templates, reference class
naming, top-1/3/5, SimpleShot with k images per class drawn per fold (``random.seed(fold)``) and every other image
queried. ``--suite bioclip2 --data-root DIR`` runs every benchmark of the paper found under DIR
(:mod:`bioclip_fast.eval.suite`). Unreadable images are skipped, counted and listed in the outputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.cli.args import add_checkpoint_arguments, add_data_arguments, resolve_checkpoints
from bioclip_fast.devices import resolve_device
from bioclip_fast.eval.report import skipped_markdown, skipped_summary, warn_skipped

TASKS = ("zeroshot", "fewshot", "linear")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser, multiple=True)
    add_data_arguments(parser)
    parser.add_argument("--train-data", default=None,
                        help="support / training images for few-shot and linear probe (default: the butterflies' "
                             "train split for --data butterflies --split val, else a seeded stratified half of "
                             "--data)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument("--text-types", default="taxonomic_common",
                        help="zero-shot text types: comma list of as_is, taxonomic, scientific, common, "
                             "scientific_common, taxonomic_common (or the reference's asis, taxon, sci, com, sci_com, "
                             "taxon_com), or 'all' (averaged; each is also scored alone). Labels that are not taxa "
                             "are always used as is")
    parser.add_argument("--templates", default="bioclip2",
                        help="template set: bioclip2 (81, the reference's), openai (80), simple, none")
    parser.add_argument("--shots", default="1,5", help="few-shot k values")
    parser.add_argument("--folds", type=int, default=5, help="few-shot folds")
    parser.add_argument("--fewshot-protocol", default="reference", choices=("reference", "split"),
                        help="reference: k support images per class drawn per fold (random.seed(fold)) from --data, "
                             "every other image a query (BioCLIP 2); split: support from --train-data or a seeded "
                             "stratified half, queries the rest")
    parser.add_argument("--suite", default=None, choices=("bioclip2",),
                        help="run every benchmark of the BioCLIP 2 paper found under --data-root (one table)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder of benchmark folders for --suite (layout: docs/evaluation.md)")
    parser.add_argument("--runs", type=int, default=None,
                        help="--suite: seeded runs of the beyond-species classifiers (default: the reference's 3; "
                             "PlantDoc: 5 SimpleShot repeats)")
    parser.add_argument("--epochs", type=int, default=50,
                        help="--suite: FishNet/AwA2 probe epochs (default 50, as slurm/eval_other.sh runs them)")
    parser.add_argument("--probe-batch-size", type=int, default=256,
                        help="--suite: FishNet/AwA2 probe batch size (default 256, slurm/eval_other.sh's)")
    parser.add_argument("--lr-fishnet", type=float, default=1e-4, help="--suite: FishNet probe learning rate (1e-4)")
    parser.add_argument("--lr-awa2", type=float, default=1e-5, help="--suite: AwA2 probe learning rate (1e-5)")
    parser.add_argument("--probe-eval-mode", action="store_true",
                        help="--suite: score the FishNet/AwA2 probes in eval mode (dropout off). The reference never "
                             "switches them to eval mode, so its scores are taken with dropout on (the default)")
    parser.add_argument("--plantdoc-protocol", default="reference", choices=("reference", "corrected"),
                        help="--suite: PlantDoc labels. reference (default): train/ and test/ are two separate "
                             "ImageFolders, as in the reference, so a class present only in train/ shifts the test "
                             "labels after it (flagged in the output); corrected: test labels by class name")
    parser.add_argument("--svm-iter", type=int, default=100,
                        help="--suite: NeWT random-search iterations per task (reference 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval_results", help="output directory")


def _split_half(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 50/50 split of indices (train, test); singleton classes go to train."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        h = (len(idx) + 1) // 2
        tr.extend(idx[:h])
        te.extend(idx[h:])
    return np.sort(np.array(tr, dtype=np.int64)), np.sort(np.array(te, dtype=np.int64))


def _task_failure(args: argparse.Namespace, errors: dict[str, str], task: str, exc: BaseException) -> None:
    """Record a task that could not run (one line; the other tasks go on); ``--debug`` re-raises."""
    from bioclip_fast.errors import one_line

    if getattr(args, "debug", False):
        raise exc
    errors[task] = one_line(exc)
    print(f"warning: {task} not computed: {errors[task]}", file=sys.stderr)


def topk_notes(n_classes: int) -> list[str]:
    """What a reader must know beside top-k accuracies on few classes: k >= classes makes top-k 100% by design."""
    trivial = [k for k in (3, 5) if k >= n_classes]
    if not trivial:
        return []
    ks = " and ".join(f"top-{k}" for k in trivial)
    return [f"{ks} {'are' if len(trivial) > 1 else 'is'} 100% by construction: only {n_classes} classes "
            f"(k ≥ the number of classes)"]


def evaluate_checkpoint(ckpt: Path | str, args: argparse.Namespace, tasks: list[str], device: str) -> dict[str, Any]:
    """Every task in ``tasks`` for one model. A task that cannot run (too few images per class for a k, a class
    absent from the training data, ...) is recorded under ``errors`` with its reason and the other tasks go on."""
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.eval.fewshot import few_shot_eval, reference_few_shot_eval
    from bioclip_fast.eval.linear_probe import linear_probe
    from bioclip_fast.eval.zeroshot import class_name, classification_metrics, encode_images, zero_shot_logits
    from bioclip_fast.errors import UsageError
    from bioclip_fast.model import load_model

    expected = (UsageError, OSError, ValueError)
    model, preprocess, tokenizer, meta = load_model(ckpt, model_name=args.model_name, device=device)
    common = dict(preprocess=preprocess, model=model, tokenizer=tokenizer, batch_size=args.batch_size,
                  root=args.root, image_column=args.image_column, label_column=args.label_column,
                  num_workers=args.workers, device=device)
    data = load_eval_data(args.data, split=args.split, **common)
    names = [class_name(c) for c in data.classes]
    result: dict[str, Any] = {"checkpoint": str(ckpt), "data": data.description, "n_classes": len(names)}
    errors: dict[str, str] = {}
    enc = None
    if "zeroshot" in tasks:
        try:
            zs = zero_shot_logits(model, tokenizer, data.loader, data.classes, text_types=args.text_types,
                                  templates=args.templates, device=device, progress=not args.no_progress)
            enc = zs
            metrics = classification_metrics(zs["logits"], zs["labels"], data.classes)
            metrics["by_text_type"] = {
                tt: {k: v for k, v in classification_metrics(lg, zs["labels"], data.classes).items()
                     if k in ("top1", "top3", "top5")}
                for tt, lg in zs["logits_by_text_type"].items()
            }
            metrics["text_types"] = list(zs["logits_by_text_type"])
            metrics["templates"] = args.templates
            metrics["classes"] = len(names)
            metrics["chance_top1"] = 1.0 / len(names)
            metrics["notes"] = topk_notes(len(names))
            result["zeroshot"] = metrics
            result["_confusion"] = (zs["logits"].argmax(1).numpy(), zs["labels"].numpy(), names)
        except expected as e:
            _task_failure(args, errors, "zeroshot", e)
    if enc is None:
        enc = encode_images(model, data.loader, device=device, desc="eval: images", progress=not args.no_progress)
    if enc["labels"] is None:
        raise ValueError(f"{args.data}: the loader yields no labels")
    skipped = list(enc.get("skipped", []))
    feats = enc["features"].numpy()
    labels = np.array([names[i] for i in enc["labels"].tolist()], dtype=object)

    reference = args.fewshot_protocol == "reference"
    if "fewshot" in tasks and reference:
        try:
            shots = parse_shots(args.shots)
            result["fewshot"] = reference_few_shot_eval(feats, labels.astype(str), shots=shots, folds=args.folds,
                                                        rare_classes="leave_out")
            result["fewshot_protocol"] = ("reference: k per class per fold (random.seed(fold)) from --data, rest "
                                          "queried; classes with fewer than k images left out of that k")
            for k, v in result["fewshot"].items():
                if v.get("error"):
                    errors[f"fewshot {k}"] = v["error"]
                if v.get("left_out"):
                    print(f"warning: {k}: left out {len(v['left_out'])} class(es) with fewer than {k.split('-')[0]} "
                          f"images: {', '.join(v['left_out'][:5])}" + (" ..." if len(v["left_out"]) > 5 else ""),
                          file=sys.stderr)
        except expected as e:
            _task_failure(args, errors, "fewshot", e)
    if ("fewshot" in tasks and not reference) or "linear" in tasks:
        # the bundled train split is disjoint from val only; other splits fall back to a held-out half
        try:
            if args.train_data or (args.data == "butterflies" and args.split == "val"):
                src = args.train_data or "butterflies"
                tdata = load_eval_data(src, split="train", **common)
                tenc = encode_images(model, tdata.loader, device=device, desc="eval: support images",
                                     progress=not args.no_progress)
                skipped += tenc.get("skipped", [])
                tnames = [class_name(c) for c in tdata.classes]
                tr_x = tenc["features"].numpy()
                tr_y = np.array([tnames[i] for i in tenc["labels"].tolist()], dtype=object)
                te_x, te_y = feats, labels
                result["train_data"] = tdata.description
            else:
                tr, te = _split_half(labels.astype(str), args.seed)
                tr_x, tr_y, te_x, te_y = feats[tr], labels[tr], feats[te], labels[te]
                result["train_data"] = f"stratified half of {data.description} (seed {args.seed})"
            shared = np.isin(te_y.astype(str), np.unique(tr_y.astype(str)))
            if not shared.all():
                print(f"warning: {int((~shared).sum())} test images of classes absent from the training data are "
                      "left out of few-shot / linear probe", file=sys.stderr)
            te_x, te_y = te_x[shared], te_y[shared]
            tr_y, te_y = tr_y.astype(str), te_y.astype(str)
        except expected as e:
            for task in ("fewshot",) * ("fewshot" in tasks and not reference) + ("linear",) * ("linear" in tasks):
                _task_failure(args, errors, task, e)
        else:
            if "fewshot" in tasks and not reference:
                try:
                    shots = parse_shots(args.shots)
                    result["fewshot"] = few_shot_eval(tr_x, tr_y, te_x, te_y, shots=shots, folds=args.folds,
                                                      seed=args.seed)
                    result["fewshot_protocol"] = "split: support from the training data, queries the held-out images"
                except expected as e:
                    _task_failure(args, errors, "fewshot", e)
            if "linear" in tasks:
                try:
                    lp = linear_probe(tr_x, tr_y, te_x, te_y, seed=args.seed)
                    n_cls = len(np.unique(tr_y))
                    result["linear"] = {k: v for k, v in lp.items() if k not in ("probabilities", "classes")}
                    result["linear"].update(classes=n_cls, chance_top1=1.0 / n_cls)
                except expected as e:
                    _task_failure(args, errors, "linear", e)
    result["skipped_images"] = skipped_summary(skipped)
    if errors:
        result["errors"] = errors
    return result


def check_class_counts(args: argparse.Namespace, tasks: list[str]) -> None:
    """Before any model is loaded: read the labels of a CSV / image-folder ``--data`` (a bad label or image column
    is an error now) and say which classes are too small for which k, and how to include them."""
    from bioclip_fast.eval.datasets import ImageCsvDataset, image_folder_rows, read_csv_rows

    if "fewshot" not in tasks or args.fewshot_protocol != "reference":
        return
    src = str(args.data)
    if src.lower().endswith(".csv"):
        rows, root, label_column = read_csv_rows(src), Path(args.root or Path(src).resolve().parent), args.label_column
    elif src != "butterflies" and Path(src).is_dir() and not any(Path(src).glob("*.tar")):
        rows, root, label_column = image_folder_rows(src), Path(src), args.label_column or "label"
    else:
        return
    ds = ImageCsvDataset(rows, root, image_column=args.image_column, label_column=label_column)
    counts = np.bincount(np.asarray(ds.labels), minlength=len(ds.class_labels))
    for k in parse_shots(args.shots):
        rare = [(ds.class_labels[i], int(counts[i])) for i in np.flatnonzero(counts < k)]
        if rare:
            listed = ", ".join(f"{c} ({n})" for c, n in rare[:5]) + (" ..." if len(rare) > 5 else "")
            print(f"warning: {k}-shot: {len(rare)} of {len(counts)} classes have fewer than {k} images: {listed}; "
                  f"{k}-shot is computed over the other {len(counts) - len(rare)} classes and the ones left out are "
                  f"named in the results (to score them, lower --shots to {int(counts.min())} or add images)",
                  file=sys.stderr)


def summary_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "classes": r.get("n_classes")}
    if r.get("n_classes"):
        row["chance top-1"] = 1.0 / r["n_classes"]
    if "zeroshot" in r:
        row.update({"zero-shot top-1": r["zeroshot"]["top1"], "zero-shot top-3": r["zeroshot"]["top3"],
                    "zero-shot top-5": r["zeroshot"]["top5"], "n": r["zeroshot"]["n"]})
    for k, v in r.get("fewshot", {}).items():
        row[f"{k} top-1"] = v["top1"]
        if v.get("left_out"):
            row[f"{k} classes"] = v.get("classes")
    if "linear" in r:
        row["linear probe top-1"] = r["linear"]["top1"]
    row["skipped images"] = r.get("skipped_images", {}).get("count", 0)
    return row


def parse_shots(text: str) -> list[int]:
    from bioclip_fast.errors import UsageError

    try:
        shots = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--shots {text!r}: expected a comma list of positive integers") from None
    if not shots or min(shots) < 1:
        raise UsageError(f"--shots {text!r}: expected a comma list of positive integers")
    return shots


def validate(args: argparse.Namespace) -> list[str]:
    """Check every flag before any model is loaded; returns the task list."""
    from bioclip_fast.errors import UsageError
    from bioclip_fast.eval.zeroshot import resolve_templates, resolve_text_types

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UsageError(f"--tasks: unknown {bad}; choose from {', '.join(TASKS)}")
    try:
        resolve_templates(args.templates)
        resolve_text_types(args.text_types)
    except ValueError as e:
        raise UsageError(f"--templates/--text-types: {e}") from None
    parse_shots(args.shots)
    for flag, v, lo in (("--folds", args.folds, 1), ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                        ("--epochs", args.epochs, 1), ("--svm-iter", args.svm_iter, 1)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.probe_batch_size < 1:
        raise UsageError(f"--probe-batch-size must be >= 1, got {args.probe_batch_size}")
    for flag, v in (("--lr-fishnet", args.lr_fishnet), ("--lr-awa2", args.lr_awa2)):
        if not v > 0:
            raise UsageError(f"{flag} must be > 0, got {v}")
    if args.runs is not None and args.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {args.runs}")
    if args.suite and not args.data_root:
        raise UsageError("--suite bioclip2 needs --data-root DIR (the folder holding the benchmark folders)")
    if args.data_root and not args.suite:
        raise UsageError("--data-root is only used with --suite bioclip2")
    if args.data_root and not Path(args.data_root).is_dir():
        raise UsageError(f"--data-root {args.data_root}: not a directory")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    return tasks


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.errors import EXIT_USAGE, UsageError, one_line
    from bioclip_fast.eval.report import confusion_matrix, markdown_table, plot_confusion, write_json

    tasks = validate(args)
    ckpts, labels = resolve_checkpoints(args.checkpoints)
    from bioclip_fast.eval.datasets import check_data_source

    check_data_source(args.data)  # a shard spec that matches nothing fails before any model is loaded
    if not args.suite:
        check_class_counts(args, tasks)
    device = str(resolve_device(args.device))  # a device this machine lacks fails before any work too
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.suite:
        from bioclip_fast.eval.suite import run_suite

        return run_suite(args, ckpts, labels, device, out)
    results: dict[str, Any] = {}
    rows = []
    t0 = time.time()
    for name, ckpt in zip(labels, ckpts):
        try:
            r = evaluate_checkpoint(ckpt, args, tasks, device)
        except (UsageError, OSError, ValueError) as e:
            if len(ckpts) == 1 or getattr(args, "debug", False):
                raise
            # several models: this one is recorded with its reason, the others go on (exit 2 at the end)
            r = {"checkpoint": str(ckpt), "errors": {"model": one_line(e)}, "skipped_images": skipped_summary([])}
            print(f"warning: {name}: not evaluated: {one_line(e)}", file=sys.stderr)
        warn_skipped(name, r["skipped_images"])
        conf = r.pop("_confusion", None)
        if conf is not None:
            pred, true, names = conf
            cm = confusion_matrix(pred, true, len(names))
            png = plot_confusion(cm, names, out / f"confusion_{name.replace(':', '_')}.png",
                                 title=f"{name}: zero-shot ({r['zeroshot']['top1'] * 100:.1f}% top-1)")
            r["zeroshot"]["confusion_png"] = png.name
            r["zeroshot"]["confusion"] = cm if len(names) <= 200 else None
        results[name] = r
        rows.append(summary_row(name, r))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    pct = [c for c in columns if "top-" in c]
    table = markdown_table(rows, columns, pct_columns=pct)
    meta = {"tasks": tasks, "device": device, "seconds": round(time.time() - t0, 2), "args": vars(args)}
    write_json(out / "results.json", {"meta": meta, "results": results})
    data_desc = next((r["data"] for r in results.values() if "data" in r), str(args.data))
    md = [f"# Evaluation on {data_desc}", "",
          f"Accuracies in %. Zero-shot: {args.templates} templates, text types {args.text_types}; few-shot: "
          f"{args.fewshot_protocol} protocol, {args.folds} folds.", "", table]
    for name, r in results.items():
        if "zeroshot" in r and len(r["zeroshot"].get("by_text_type", {})) > 1:
            md += [f"## {name}: zero-shot by text type", "",
                   markdown_table([{"text type": t, **v} for t, v in r["zeroshot"]["by_text_type"].items()],
                                  ["text type", "top1", "top3", "top5"], pct_columns=["top1", "top3", "top5"])]
    notes = report_notes(results)
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += skipped_markdown({n: r["skipped_images"] for n, r in results.items()})
    (out / "results.md").write_text("\n".join(md))
    print(table)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    failed = [(name, task, e) for name, r in results.items() for task, e in r.get("errors", {}).items()]
    if failed:
        print(f"bioclip-fast eval: error: {len(failed)} task(s) not computed (first: {failed[0][0]} / "
              f"{failed[0][1]}: {failed[0][2]}); every other result is in {out / 'results.json'}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def report_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """The lines a reader needs beside the table: chance level of what was scored, top-k that are trivial, classes
    left out of a k-shot task, tasks not computed."""
    notes = []
    for name, r in results.items():
        n = r.get("n_classes")
        if n:
            notes.append(f"{name}: chance (top-1) = 1/{n} = {100 / n:.1f}% over the {n} classes scored")
            if "zeroshot" in r:
                notes += [f"{name}: zero-shot {t}" for t in topk_notes(n)]
        for k, v in r.get("fewshot", {}).items():
            if v.get("left_out"):
                c = v.get("classes")
                notes.append(f"{name}: {k} scored over {c} classes (chance {100 / c:.1f}%)" if c and v.get("top1")
                             is not None else f"{name}: {k} not scored")
                notes[-1] += (f"; left out, fewer than {k.split('-')[0]} images: {', '.join(v['left_out'])}")
        for task, e in r.get("errors", {}).items():
            notes.append(f"{name}: {task} not computed: {e}")
    return notes
