"""`bioclip-fast predict`: pybioclip's command line, same flags, defaults and rows (`--format csv`, `--k` 5 for ranks /
all labels for `--cls`/`--bins`, `--batch-size` 10, `--subset`, `--model`/`--pretrained`), plus our
`--tol-embeddings`, `--labels` and `--format json`. It streams, and skips and reports bad images, as
:mod:`bioclip_fast.cli.image_io` describes.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from bioclip_fast.cli.image_io import (
    ErrorLog,
    add_image_arguments,
    images_or_fail,
    open_text_output,
    progress,
    validate_image_arguments,
)
from bioclip_fast.errors import UsageError

RANK_CHOICES = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_arguments(parser)
    parser.add_argument("--format", default="csv", choices=("table", "csv", "json"),
                        help="output format (default csv, as pybioclip)")
    parser.add_argument("--rank", default=None, choices=RANK_CHOICES, help="rank of the classification "
                        "(default species); not with --cls/--bins")
    parser.add_argument("--k", type=int, default=None,
                        help="top predictions per image (default: 5 for ranks, all labels for --cls/--bins)")
    parser.add_argument("--min-prob", type=float, default=1e-9,
                        help="species probabilities at or below this are ignored when summing to a higher rank")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cls", default=None,
                       help="custom labels: comma-separated, or a text file with one label per line")
    group.add_argument("--bins", default=None, help="CSV with a header row: label,bin (labels scored per bin)")
    group.add_argument("--labels", default=None,
                       help="metadata CSV whose taxa form the label set (instead of a species table)")
    parser.add_argument("--subset", default=None,
                        help="CSV whose first column is named after a rank: predict only among those taxa")
    parser.add_argument("--tol-embeddings", default=None, metavar="DIR",
                        help="TreeOfLife species table folder (txt_emb_species.npy + .json, or its parent with "
                             "embeddings/); default: the model's own (HF cache) or its label set")
    parser.add_argument("--log", metavar="LOG_FILE", default=None,
                        help="record the run (model, settings, images) as pybioclip does: a new .json file, or "
                             "appended text for any other name")
    parser.add_argument("--templates", default="openai",
                        help="templates for --cls/--bins/--labels texts: openai (pybioclip), bioclip2 (81, the "
                             "evaluation's), simple, none")


def parse_cls(value: str) -> list[str]:
    p = Path(value)
    if p.is_file():
        labels = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(p)
    else:
        labels = [c.strip() for c in value.split(",") if c.strip()]
        source = "--cls"
    if not labels:
        raise UsageError(f"{source}{' ' + repr(value) if source == '--cls' else ''}: no labels (give them comma-"
                         "separated, or a file with one per line)")
    return labels


class _RowWriter:
    """Prediction rows as pybioclip writes them (csv: pandas' to_csv, full-precision scores; table: PrettyTable),
    or a JSON list. csv and json stream; a table needs every row for its widths."""

    def __init__(self, out: TextIO, fmt: str):
        self.out, self.fmt = out, fmt
        self.columns: list[str] | None = None
        self.n = 0
        self._csv = None
        self._table: list[list[Any]] = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.columns is None:
            self.columns = list(rows[0])
            if self.fmt == "csv":
                self._csv = csv.writer(self.out, lineterminator="\n")
                self._csv.writerow(self.columns)
            elif self.fmt == "json":
                self.out.write("[\n")
        for r in rows:
            if self.fmt == "csv":
                self._csv.writerow([r[c] for c in self.columns])
            elif self.fmt == "json":
                self.out.write((",\n" if self.n else "") + "  " + json.dumps(r))
            else:
                self._table.append([r[c] for c in self.columns])
            self.n += 1
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.n else "[]\n")
        elif self.fmt == "table":
            self.out.write(render_table(self.columns or [], self._table) + "\n")
        elif self.fmt == "csv" and self.columns is None:
            self.out.write("\n")  # pandas writes one empty line for an empty frame
        self.out.flush()


def render_table(columns: list[str], rows: list[list[Any]]) -> str:
    """PrettyTable's default rendering (what pybioclip prints for --format table)."""
    if not columns:
        return ""
    try:
        import prettytable
    except ImportError:  # the same layout by hand: centred cells between +---+ rules
        cells = [[str(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        line = lambda vals: "|" + "|".join(f" {v.center(w)} " for v, w in zip(vals, widths)) + "|"  # noqa: E731
        return "\n".join([rule, line(columns), rule, *(line(r) for r in cells), rule])
    table = prettytable.PrettyTable()
    table.field_names = columns
    for r in rows:
        table.add_row(r)
    return str(table)


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.predict import (
        CustomLabelsBinningClassifier,
        CustomLabelsClassifier,
        TreeOfLifeClassifier,
        read_bins_csv,
    )

    validate_image_arguments(args)
    if args.k is not None and args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if args.cls is not None:  # an empty --cls is an error, never "no --cls" (the checkpoint's own labels)
        parse_cls(args.cls)
    if args.bins is not None and not args.bins.strip():
        raise UsageError("--bins: no file given")
    custom = args.cls is not None or args.bins is not None
    if custom and (args.rank is not None or args.subset or args.tol_embeddings):
        raise UsageError("--rank/--subset/--tol-embeddings apply to the taxonomic labels; they cannot be combined "
                         "with --cls/--bins")
    if args.subset and not Path(args.subset).is_file():
        raise UsageError(f"--subset {args.subset}: file not found")
    if args.tol_embeddings:
        from bioclip_fast.tol import find_table

        find_table(args.tol_embeddings)
    if args.labels and args.tol_embeddings:
        raise UsageError("--labels and --tol-embeddings are two label sets; give one")
    if args.log and args.log.endswith(".json") and Path(args.log).exists():
        raise UsageError(f"--log {args.log}: File {args.log} already exists. Please choose a different file name.")
    started = datetime.datetime.now().isoformat(timespec="seconds")
    cls_to_bin = read_bins_csv(args.bins) if args.bins else None
    labels = parse_cls(args.cls) if args.cls is not None else None
    rank = args.rank or "species"
    errors = ErrorLog()
    images = images_or_fail(args, errors)
    common = dict(device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                  templates=args.templates, preprocess_mode=args.preprocess, precision=args.precision)
    if labels:
        clf = CustomLabelsClassifier(labels, args.model, args.pretrained, **common)
        predict = lambda on_error: clf.iter_predict(images, k=args.k, on_error=on_error)  # noqa: E731
    elif cls_to_bin:
        clf = CustomLabelsBinningClassifier(cls_to_bin, args.model, args.pretrained, **common)
        predict = lambda on_error: clf.iter_predict(images, k=args.k, on_error=on_error)  # noqa: E731
    else:
        clf = TreeOfLifeClassifier(args.model, args.pretrained, labels_csv=args.labels,
                                   tol_embeddings=args.tol_embeddings, **common)
        if args.subset:
            clf.apply_filter(clf.create_taxa_filter_from_csv(args.subset))
        k = 5 if args.k is None else args.k
        predict = lambda on_error: clf.iter_predict(  # noqa: E731
            images, rank=rank, min_prob=args.min_prob, k=k, on_error=on_error)
    out, close = open_text_output(args.output)
    writer = _RowWriter(out, args.format)
    done = 0
    try:
        with progress(len(images), args.no_progress, "predict") as bar:
            errors.bar = bar
            for rows in predict(errors):
                writer.write(rows)
                n = len({r["file_name"] for r in rows})
                done += n
                bar.update(n)
        writer.close()
    finally:
        if close:
            out.close()
    print(f"predicted {done} image(s), skipped {errors.count}", file=sys.stderr)
    if args.log:
        if labels:
            settings: dict[str, Any] = {"classes": args.cls}
            details: dict[str, Any] = {"k": args.k, "batch_size": args.batch_size}
        elif cls_to_bin:
            settings = {"bins_path": args.bins}
            details = {"k": args.k, "batch_size": args.batch_size}
        else:
            table = getattr(clf, "table", None)
            settings = {"tree_of_life_version": clf.tol_repo or (table.source if table is not None else None),
                        "subset": args.subset}
            details = {"rank": rank, "min_prob": args.min_prob, "k": k, "batch_size": args.batch_size}
        write_log(args.log, clf, settings, details, images, started)
    return 0 if done else 1


def write_log(path: str, clf, settings: dict[str, Any], details: dict[str, Any], images: list[str],
              started: str) -> None:
    """pybioclip's --log: a JSON record (new file) or a text record appended to any other file."""
    from bioclip_fast import __version__

    end = datetime.datetime.now().isoformat(timespec="seconds")
    record = {"bioclip_fast_version": __version__, "start": started, "end": end, "command_line": " ".join(sys.argv),
              "model": clf.model_str, "pretrained": clf.pretrained_str, "device": str(clf.device),
              "top_level_settings": settings, "predictions": [{"images": images, "details": details}]}
    if path.endswith(".json"):
        Path(path).write_text(json.dumps(record, indent=4), encoding="utf-8")
        return
    title = f"** Prediction Log - bioclip_fast v{__version__} - {started} to {end} **"
    key = lambda k: " ".join(w.capitalize() for w in k.split("_"))  # noqa: E731
    lines = ["*" * len(title), title, "*" * len(title), f"Command Line: {record['command_line']}",
             f"Model: {clf.model_str}"]
    if clf.pretrained_str:
        lines.append(f"Pretrained: {clf.pretrained_str}")
    lines.append(f"Device: {clf.device}")
    lines += [f"{key(k)}: {v}" for k, v in settings.items() if v is not None]
    lines += [f"{key(k)}: {v}" for k, v in details.items()]
    lines += ["Images:", *images, ""]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
