"""`bioclip-fast predict` and `bioclip-fast embed` (pybioclip-style command line).

Both stream: images are decoded and encoded batch by batch, results are written as each batch finishes, so memory
stays bounded for any number of images. A missing, unreadable or non-image file is reported by name on stderr and
skipped; the exit code is non-zero only when no image could be processed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bioclip_fast.eval.datasets import IMAGE_EXTENSIONS

RANK_CHOICES = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files or directories (searched recursively)")
    parser.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="PATH",
                        help="our checkpoint (model.pt or its run dir) or an open_clip state dict")
    parser.add_argument("--model-name", default=None, help="open_clip architecture for plain state dicts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--output", "-o", default=None,
                        help="output file (predict: default stdout; embed: default embeddings.npy)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    if name == "predict":
        parser.add_argument("--rank", default="species", choices=RANK_CHOICES)
        parser.add_argument("--k", type=int, default=5, help="top-k predictions per image")
        parser.add_argument("--min-prob", type=float, default=1e-9,
                            help="species probabilities below this are ignored when summing to a higher rank")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--cls", default=None,
                           help="custom labels: comma-separated, or a text file with one label per line")
        group.add_argument("--bins", default=None, help="CSV of label,bin: custom labels scored per bin")
        group.add_argument("--labels", default=None,
                           help="metadata CSV whose taxa form the label set (default: the checkpoint's classes)")
        parser.add_argument("--format", default="table", choices=("table", "csv", "json"))
        parser.add_argument("--templates", default="openai", help="template set for class texts: openai, simple, none")
    elif name == "embed":
        parser.add_argument("--format", default=None, choices=("npy", "parquet"),
                            help="default: from the --output suffix (.parquet), else npy")
        parser.add_argument("--ids", default=None,
                            help="npy only: where to write the image ids (.txt one per line, or .json); "
                                 "default <output stem>.ids.txt")
    else:
        raise ValueError(f"predict_cli serves 'predict' and 'embed', not {name!r}")


def expand_images(items: list[str]) -> Iterator[str]:
    """Files as given (even missing ones, so they are reported); directories expanded to their image files."""
    for item in items:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        yield os.path.join(root, f)
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
        raise SystemExit(f"error: {source}: no labels")
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
    """Streams prediction rows as an aligned table, CSV or a JSON list."""

    def __init__(self, out: TextIO, fmt: str):
        self.out, self.fmt = out, fmt
        self.columns: list[str] | None = None
        self.widths: dict[str, int] = {}
        self.n = 0
        self._csv = None

    def _cell(self, v: Any) -> str:
        return f"{v:.6f}" if isinstance(v, float) else str(v)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.columns is None:
            self.columns = list(rows[0])
            if self.fmt == "csv":
                self._csv = csv.DictWriter(self.out, fieldnames=self.columns, lineterminator="\n")
                self._csv.writeheader()
            elif self.fmt == "json":
                self.out.write("[\n")
            else:
                # widths from the first batch (at least the header); later long values widen their cell only
                self.widths = {c: max(len(c), *(len(self._cell(r[c])) for r in rows)) for c in self.columns}
                self.out.write("  ".join(c.ljust(self.widths[c]) for c in self.columns).rstrip() + "\n")
        for r in rows:
            if self.fmt == "csv":
                self._csv.writerow({c: self._cell(r[c]) if isinstance(r[c], float) else r[c] for c in self.columns})
            elif self.fmt == "json":
                self.out.write((",\n" if self.n else "") + "  " + json.dumps(r))
            else:
                self.out.write("  ".join(self._cell(r[c]).ljust(self.widths[c]) for c in self.columns).rstrip() + "\n")
            self.n += 1
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.n else "[]\n")
        self.out.flush()


def _open_text_output(path: str | None) -> tuple[TextIO, bool]:
    if path is None or path == "-":
        return sys.stdout, False
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="", encoding="utf-8"), True


def run_predict(args: argparse.Namespace) -> int:
    from bioclip_fast.predict import (
        CustomLabelsBinningClassifier,
        CustomLabelsClassifier,
        TreeOfLifeClassifier,
        read_bins_csv,
    )

    if args.k < 1:
        raise SystemExit(f"error: --k must be >= 1, got {args.k}")
    if (args.cls or args.bins) and args.rank != "species":
        raise SystemExit("error: --rank applies to the taxonomic label set; it cannot be combined with --cls/--bins")
    images = list(expand_images(args.images))
    if not images:
        print("error: no images found in the given paths", file=sys.stderr)
        return 1
    common = dict(model_name=args.model_name, device=args.device, batch_size=args.batch_size,
                  num_workers=args.workers, templates=args.templates)
    if args.cls:
        clf = CustomLabelsClassifier(parse_cls(args.cls), args.checkpoint, **common)
        predict = lambda on_error: clf.iter_predict(images, k=args.k, on_error=on_error)  # noqa: E731
    elif args.bins:
        clf = CustomLabelsBinningClassifier(read_bins_csv(args.bins), args.checkpoint, **common)
        predict = lambda on_error: clf.iter_predict(images, k=args.k, on_error=on_error)  # noqa: E731
    else:
        clf = TreeOfLifeClassifier(args.checkpoint, labels_csv=args.labels, **common)
        predict = lambda on_error: clf.iter_predict(  # noqa: E731
            images, rank=args.rank, min_prob=args.min_prob, k=args.k, on_error=on_error)
    errors = ErrorLog()
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
    return 0 if done else 1


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


def run_embed(args: argparse.Namespace) -> int:
    from bioclip_fast.predict import BaseClassifier

    output = Path(args.output or "embeddings.npy")
    fmt = args.format or ("parquet" if output.suffix == ".parquet" else "npy")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SystemExit("error: parquet output needs pyarrow (pip install pyarrow)") from None
    images = list(expand_images(args.images))
    if not images:
        print("error: no images found in the given paths", file=sys.stderr)
        return 1
    enc = BaseClassifier(args.checkpoint, model_name=args.model_name, device=args.device,
                         batch_size=args.batch_size, num_workers=args.workers)
    output.parent.mkdir(parents=True, exist_ok=True)
    errors = ErrorLog()
    if fmt == "npy":
        ids_path = Path(args.ids) if args.ids else output.with_name(output.stem + ".ids.txt")
        writer: Any = _NpyWriter(output, len(images))
        ids_tmp = ids_path.with_name(f".{ids_path.name}.partial")
        ids_file = open(ids_tmp, "w", encoding="utf-8")
    else:
        writer = _ParquetWriter(output)
        ids_file = None
    done = 0
    ok = False
    try:
        with _progress(len(images), args.no_progress, "embed") as bar:
            errors.bar = bar
            for names, feats in enc.iter_image_features(images, on_error=errors):
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
        if ok:
            writer.close()
            if fmt == "npy":
                _finish_ids(ids_tmp, ids_path)
        else:
            writer.abort()
            if ids_file is not None and ids_tmp.exists():
                ids_tmp.unlink()
    print(f"embedded {done} image(s), skipped {errors.count}", file=sys.stderr)
    if done:
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


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.eval.cli import report_errors

    return report_errors(_run, args)


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if args.command == "predict":
        return run_predict(args)
    if args.command == "embed":
        return run_embed(args)
    raise SystemExit(f"error: unknown command {args.command!r}")
