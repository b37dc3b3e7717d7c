"""`bioclip-fast predict`, `embed`, `list-models` and `list-tol-taxa`: pybioclip's command line, same flags, defaults
and rows (`--format csv`, `--k` 5 for ranks / all labels for `--cls`/`--bins`, `--batch-size` 10, `--subset`,
`--model`/`--pretrained`), plus our `--tol-embeddings`, `--labels`, `--format json` and npy/parquet embeddings.

Both stream: images are decoded and encoded batch by batch, results are written as each batch finishes, so memory
stays bounded for any number of images. A missing, unreadable or non-image file is reported by name on stderr and
skipped; the exit code is non-zero only when no image could be processed. The whole command is validated (flags,
output suffix, device, files) before a model is loaded.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bioclip_fast.errors import UsageError

RANK_CHOICES = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


DEFAULT_BATCH_SIZE = 10  # pybioclip's
EMBED_SUFFIXES = {".json": "json", ".npy": "npy", ".parquet": "parquet"}


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="MODEL",
                        help="hf-hub:ORG/NAME (default hf-hub:imageomics/bioclip-2, from the Hugging Face cache), "
                             "local-dir:PATH or a hub-snapshot folder, an open_clip architecture (with --pretrained), "
                             "or our model.pt / run directory")
    parser.add_argument("--pretrained", default=None,
                        help="weights for an architecture --model: a file (.pt/.bin/.safetensors) or an open_clip tag")
    parser.add_argument("--model-name", default=None, help=argparse.SUPPRESS)  # older spelling of --model ARCH


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "list-models":
        parser.add_argument("--model", default=None, help="list the pretrained tags of this open_clip architecture")
        return
    if name == "list-tol-taxa":
        _model_arguments(parser)
        parser.add_argument("--tol-embeddings", default=None, metavar="DIR",
                            help="folder with txt_emb_species.npy/json (default: the model's TreeOfLife table)")
        parser.add_argument("--output", default="stdout", help="CSV file (default: stdout)")
        return
    parser.add_argument("images", nargs="+", help="image files or directories (searched recursively)")
    _model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per batch (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="compute precision of the encoders (fp32 gives pybioclip's scores)")
    parser.add_argument("--preprocess", default="auto", choices=("auto", "squash", "model"),
                        help="auto: squash to 224x224 like pybioclip for TreeOfLife models/tables, else the model's "
                             "own resize+crop")
    parser.add_argument("--output", "-o", default="stdout",
                        help="output file (default: stdout; embed --format npy: embeddings.npy)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    if name == "predict":
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
                            help="templates for --cls/--bins/--labels texts: openai (pybioclip), simple, none")
    elif name == "embed":
        parser.add_argument("--format", default=None, choices=("json", "npy", "parquet"),
                            help="default: from the --output suffix (.json/.npy/.parquet); json on stdout")
        parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                            help="L2-normalise the features (default: no for json, as pybioclip; yes for npy/parquet)")
        parser.add_argument("--ids", default=None,
                            help="npy only: where to write the image ids (.txt one per line, or .json); "
                                 "default <output stem>.ids.txt")
    else:
        raise ValueError(f"predict_cli serves predict, embed, list-models and list-tol-taxa, not {name!r}")


def expand_images(items: list[str], not_images: list[str] | None = None) -> Iterator[str]:
    """Files as given (even missing ones, so they are reported); directories expanded recursively to their image
    files. Other files found in a directory are appended to ``not_images`` (reported and skipped)."""
    from bioclip_fast.eval.datasets import IMAGE_EXTENSIONS  # the one list (imported here: --help stays light)

    for item in items:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        yield os.path.join(root, f)
                    elif not_images is not None:
                        not_images.append(os.path.join(root, f))
        else:
            yield item


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


class ErrorLog:
    """Reports skipped images on stderr, by name, and counts them."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr  # looked up now, not at import: sys.stderr may be redirected
        self.count = 0
        self.bar = None  # a tqdm bar: skipped files advance it too, and messages do not tear it

    def __call__(self, name: str, message: str) -> None:
        self.count += 1
        line = f"error: {name}: {message} (skipped)"
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=self.stream)
            self.bar.update(1)
        else:
            print(line, file=self.stream, flush=True)


def _progress(total: int | None, disable: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable, desc=desc, unit="img", file=sys.stderr)


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


def _open_text_output(path: str | None) -> tuple[TextIO, bool]:
    if path is None or path in ("-", "stdout"):
        return sys.stdout, False
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="", encoding="utf-8"), True


def _validate_common(args: argparse.Namespace) -> None:
    """Checks that need no model: run before any work."""
    from bioclip_fast.devices import resolve_device as _check_device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    _check_device(args.device)
    if args.model_name and not args.model:
        args.model = args.model_name
    if args.pretrained and args.model and Path(args.model).exists():
        raise UsageError(f"--pretrained {args.pretrained}: --model {args.model} is already a file or folder with "
                         f"weights; --pretrained goes with an architecture name (e.g. --model ViT-B-16)")
    out = getattr(args, "output", None)
    if out not in (None, "-", "stdout") and Path(out).is_dir():
        raise UsageError(f"--output {out} is a directory; give a file name")


def _images_or_fail(args: argparse.Namespace, errors: ErrorLog) -> list[str]:
    not_images: list[str] = []
    images = list(expand_images(args.images, not_images))
    for f in not_images:
        errors(f, f"not an image file (suffix {Path(f).suffix or 'none'})")
    if not images:
        raise UsageError(f"no images found in {' '.join(args.images)}")
    return images


def run_predict(args: argparse.Namespace) -> int:
    from bioclip_fast.predict import (
        CustomLabelsBinningClassifier,
        CustomLabelsClassifier,
        TreeOfLifeClassifier,
        read_bins_csv,
    )

    _validate_common(args)
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
    images = _images_or_fail(args, errors)
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
    out, close = _open_text_output(args.output)
    writer = _RowWriter(out, args.format)
    done = 0
    try:
        with _progress(len(images), args.no_progress, "predict") as bar:
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


class _NpyWriter:
    """Rows appended to a preallocated .npy memmap; trimmed at the end when images were skipped."""

    def __init__(self, path: Path, n_max: int):
        self.path, self.n_max = path, n_max
        self.tmp = path.with_name(f".{path.name}.partial.npy")
        self.mm = None
        self.n = 0

    def write(self, feats) -> None:
        import numpy as np

        if self.mm is None:
            self.mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(self.n_max, feats.shape[1]))
        self.mm[self.n : self.n + len(feats)] = feats
        self.n += len(feats)

    def close(self) -> None:
        import numpy as np

        if self.mm is None:
            return
        dim = self.mm.shape[1]
        if self.n == self.n_max:
            self.mm.flush()
            del self.mm
            os.replace(self.tmp, self.path)
            return
        final = self.path.with_name(f".{self.path.name}.final.npy")
        out = np.lib.format.open_memmap(final, mode="w+", dtype=np.float32, shape=(self.n, dim))
        step = 65536
        for i in range(0, self.n, step):  # chunked copy keeps memory bounded
            out[i : i + step] = self.mm[i : min(i + step, self.n)]
        out.flush()
        del out, self.mm
        os.replace(final, self.path)
        os.unlink(self.tmp)

    def abort(self) -> None:
        self.mm = None
        for p in (self.tmp, self.path.with_name(f".{self.path.name}.final.npy")):
            if p.exists():
                p.unlink()


class _ParquetWriter:
    """Row groups of (id: string, embedding: fixed-size list<float32>) appended per batch."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.writer = None
        self.n = 0

    def write(self, ids: list[str], feats) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        feats = np.ascontiguousarray(feats, dtype=np.float32)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
        table = pa.table({"id": pa.array(ids, type=pa.string()), "embedding": emb})
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        self.n += len(ids)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tmp.exists():
            self.tmp.unlink()


class _JsonEmbedWriter:
    """pybioclip's embed output, ``{"model": ..., "embeddings": {image: [floats]}}`` with ``indent=4``, streamed
    entry by entry (byte-identical to ``json.dump(data, f, indent=4)``; a repeated path repeats its key)."""

    def __init__(self, out: TextIO, model_str: str, newline: bool = False):
        self.out = out
        self.n = 0
        self.newline = newline  # print() adds one on stdout; json.dump into a file does not
        out.write("{\n    \"model\": " + json.dumps(model_str) + ",\n    \"embeddings\": {")

    def write(self, ids: list[str], feats) -> None:
        for name, vec in zip(ids, feats.tolist()):
            body = json.dumps(vec, indent=4).replace("\n", "\n        ")
            self.out.write(("," if self.n else "") + "\n        " + json.dumps(name) + ": " + body)
            self.n += 1

    def close(self) -> None:
        self.out.write(("\n    }\n}" if self.n else "}\n}") + ("\n" if self.newline else ""))
        self.out.flush()


def _embed_format(args: argparse.Namespace) -> tuple[str, Path | None]:
    """(format, output path or None for stdout), refusing a suffix that does not match the format."""
    out = None if args.output in (None, "-", "stdout") else Path(args.output)
    by_suffix = EMBED_SUFFIXES.get(out.suffix.lower()) if out is not None else None
    if out is not None and not out.suffix and args.format in (None, "json"):
        by_suffix = "json"  # pybioclip writes its JSON to any file name
    if out is not None and by_suffix is None:
        raise UsageError(f"--output {out}: unknown suffix {out.suffix or '(none)'!r}; embed writes "
                         f"{', '.join(EMBED_SUFFIXES)} (or stdout for json)")
    fmt = args.format or by_suffix or "json"
    if out is not None and by_suffix != fmt:
        raise UsageError(f"--output {out} does not match --format {fmt} (use a {fmt} suffix: "
                         f"{[s for s, f in EMBED_SUFFIXES.items() if f == fmt][0]})")
    if out is None and fmt != "json":
        out = Path(f"embeddings.{fmt}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("parquet output needs pyarrow (pip install pyarrow)") from None
    if args.ids and fmt != "npy":
        raise UsageError(f"--ids applies to npy output only (json and parquet hold the ids), not {fmt}")
    return fmt, out


def run_embed(args: argparse.Namespace) -> int:
    from bioclip_fast.predict import BaseClassifier

    _validate_common(args)
    fmt, output = _embed_format(args)
    normalize = args.normalize if args.normalize is not None else fmt != "json"
    errors = ErrorLog()
    images = _images_or_fail(args, errors)
    enc = BaseClassifier(args.model, args.pretrained, device=args.device, batch_size=args.batch_size,
                         num_workers=args.workers, preprocess_mode=args.preprocess, precision=args.precision)
    ids_file = None
    if fmt == "json":
        if output is None:
            stream, tmp_json = sys.stdout, None
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp_json = output.with_name(f".{output.name}.partial")
            stream = open(tmp_json, "w", encoding="utf-8")
        writer: Any = _JsonEmbedWriter(stream, enc.model_str, newline=output is None)
    elif fmt == "npy":
        output.parent.mkdir(parents=True, exist_ok=True)
        ids_path = Path(args.ids) if args.ids else output.with_name(output.stem + ".ids.txt")
        writer = _NpyWriter(output, len(images))
        ids_tmp = ids_path.with_name(f".{ids_path.name}.partial")
        ids_file = open(ids_tmp, "w", encoding="utf-8")
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        writer = _ParquetWriter(output)
    done = 0
    ok = False
    try:
        with _progress(len(images), args.no_progress, "embed") as bar:
            errors.bar = bar
            for names, feats in enc.iter_image_features(images, on_error=errors, normalize=normalize):
                arr = feats.cpu().numpy()
                if fmt == "npy":
                    writer.write(arr)
                    # ids are written as one per line (json lists are built from that file at the end)
                    ids_file.writelines(json.dumps(n) + "\n" for n in names)
                else:
                    writer.write(names, arr)
                done += len(names)
                bar.update(len(names))
        ok = done > 0
    finally:
        if ids_file is not None:
            ids_file.close()
        if fmt == "json":
            if ok or output is None:
                writer.close()
            if output is not None:
                stream.close()
                if ok:
                    os.replace(tmp_json, output)
                elif tmp_json.exists():
                    tmp_json.unlink()
        elif ok:
            writer.close()
            if fmt == "npy":
                _finish_ids(ids_tmp, ids_path)
        else:
            writer.abort()
            if ids_file is not None and ids_tmp.exists():
                ids_tmp.unlink()
    print(f"embedded {done} image(s), skipped {errors.count}", file=sys.stderr)
    if done and output is not None:
        extra = f" and ids to {ids_path}" if fmt == "npy" else ""
        print(f"wrote {done} embeddings to {output}{extra}", file=sys.stderr)
    return 0 if done else 1


def _finish_ids(tmp: Path, path: Path) -> None:
    """JSON-lines temp file -> ids as plain text (one per line) or as a JSON list, streamed."""
    with open(tmp, encoding="utf-8") as src, open(path.with_name(f".{path.name}.tmp"), "w", encoding="utf-8") as dst:
        if path.suffix == ".json":
            dst.write("[")
            for i, line in enumerate(src):
                dst.write(("," if i else "") + line.strip())
            dst.write("]\n")
        else:
            for line in src:
                name = json.loads(line)
                if "\n" in name:
                    raise ValueError(f"image id {name!r} contains a newline; use --ids with a .json file")
                dst.write(name + "\n")
    os.replace(path.with_name(f".{path.name}.tmp"), path)
    tmp.unlink()


def run_list_models(args: argparse.Namespace) -> int:
    """pybioclip's list-models: the TreeOfLife models and open_clip's architectures (ours too), or one's tags."""
    import open_clip

    from bioclip_fast.hub import TOL_MODELS
    from bioclip_fast.model import CUSTOM_MODEL_CONFIGS, list_models

    if args.model:
        if args.model not in list_models():
            raise UsageError(f"--model {args.model}: not a known architecture (run list-models without --model)")
        for tag in open_clip.list_pretrained_tags_by_model(args.model) if args.model not in CUSTOM_MODEL_CONFIGS \
                else []:
            print(tag)
        return 0
    for name in list(TOL_MODELS) + sorted(CUSTOM_MODEL_CONFIGS) + open_clip.list_models():
        print(f"\t{name}")
    return 0


def run_list_tol_taxa(args: argparse.Namespace) -> int:
    """pybioclip's list-tol-taxa: the species table's labels as CSV, streamed."""
    from bioclip_fast import hub
    from bioclip_fast.tol import LABEL_COLUMNS, TaxaNames, find_table

    if args.model_name and not args.model:
        args.model = args.model_name
    if args.tol_embeddings:
        _, names_file = find_table(args.tol_embeddings)
    else:
        model_str = args.model or hub.BIOCLIP_MODEL_STR
        repo = hub.TOL_MODELS.get(model_str)
        if repo is None:
            raise UsageError(f"--model {model_str}: not a TreeOfLife model ({', '.join(hub.TOL_MODELS)}); "
                             f"pass --tol-embeddings DIR")
        snap = hub.hf_snapshot(repo, repo_type="dataset", files=hub.TOL_EMBEDDINGS)
        names_file = snap / hub.TOL_EMBEDDINGS[1]
    names = TaxaNames.from_json(names_file)
    out, close = _open_text_output(args.output)
    try:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(LABEL_COLUMNS)
        for i in range(len(names)):
            row = names.classification(i, 6)
            w.writerow([row[c] for c in LABEL_COLUMNS])
    finally:
        if close:
            out.close()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "predict":
        return run_predict(args)
    if args.command == "embed":
        return run_embed(args)
    if args.command == "list-models":
        return run_list_models(args)
    if args.command == "list-tol-taxa":
        return run_list_tol_taxa(args)
    raise UsageError(f"unknown command {args.command!r}")
