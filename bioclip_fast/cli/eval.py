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

from bioclip_fast.cli.args import (
    add_checkpoint_arguments,
    add_data_arguments,
    image_set_options,
    resolve_checkpoints,
)
from bioclip_fast.devices import resolve_device
from bioclip_fast.eval.options import EvalOptions
from bioclip_fast.eval.report import skipped_markdown, skipped_summary, warn_skipped
from bioclip_fast.eval.runner import (
    TASKS,
    check_class_counts,
    evaluate_checkpoint,
    report_notes,
    summary_row,
)


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


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The library's settings from the checked flags."""
    return EvalOptions(
        **image_set_options(args), debug=getattr(args, "debug", False), train_data=args.train_data,
        text_types=args.text_types, templates=args.templates, shots=tuple(parse_shots(args.shots)), folds=args.folds,
        fewshot_protocol=args.fewshot_protocol, seed=args.seed, data_root=args.data_root, runs=args.runs,
        epochs=args.epochs, probe_batch_size=args.probe_batch_size, lr_fishnet=args.lr_fishnet, lr_awa2=args.lr_awa2,
        probe_eval_mode=args.probe_eval_mode, plantdoc_protocol=args.plantdoc_protocol, svm_iter=args.svm_iter)


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.errors import EXIT_USAGE, UsageError, one_line
    from bioclip_fast.eval.report import confusion_matrix, markdown_table, plot_confusion, write_json

    tasks = validate(args)
    options = options_from_args(args)
    ckpts, labels = resolve_checkpoints(args.checkpoints)
    from bioclip_fast.eval.datasets import check_data_source

    check_data_source(args.data)  # a shard spec that matches nothing fails before any model is loaded
    if not args.suite:
        check_class_counts(options, tasks)
    device = str(resolve_device(args.device))  # a device this machine lacks fails before any work too
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.suite:
        from bioclip_fast.eval.suite import run_suite

        return run_suite(options, ckpts, labels, device, out, args_record=vars(args))
    results: dict[str, Any] = {}
    rows = []
    t0 = time.time()
    for name, ckpt in zip(labels, ckpts):
        try:
            r = evaluate_checkpoint(ckpt, options, tasks, device)
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


