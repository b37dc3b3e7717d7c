"""`bioclip-fast embed`: image embeddings with their image ids, as pybioclip's JSON (``--format json``, the default
on stdout) or as ``.npy`` (+ an ids file) / ``.parquet``. It streams, and skips and reports bad images, as
:mod:`bioclip_fast.cli.image_io` describes; a file output appears whole at the end (atomic rename), or not at all
when no image could be embedded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from bioclip_fast.cli.image_io import ErrorLog, add_image_arguments, images_or_fail, progress, validate_image_arguments
from bioclip_fast.errors import UsageError
from bioclip_fast.fileio import atomic_save, replace_file

EMBED_SUFFIXES = {".json": "json", ".npy": "npy", ".parquet": "parquet"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_arguments(parser)
    parser.add_argument("--format", default=None, choices=("json", "npy", "parquet"),
                        help="default: from the --output suffix (.json/.npy/.parquet); json on stdout")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise the features (default: no for json, as pybioclip; yes for npy/parquet)")
    parser.add_argument("--ids", default=None,
                        help="npy only: where to write the image ids (.txt one per line, or .json); "
                             "default <output stem>.ids.txt")


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
        if self.mm is None:
            return
        if self.n == self.n_max:
            self.mm.flush()
            self.mm = None
            replace_file(self.tmp, self.path)
            return
        atomic_save(self.path, self._copy_rows)
        self.mm = None
        self.tmp.unlink()

    def _copy_rows(self, dst: Path) -> None:
        """The rows written so far, as a .npy file of their own."""
        import numpy as np

        out = np.lib.format.open_memmap(dst, mode="w+", dtype=np.float32, shape=(self.n, self.mm.shape[1]))
        step = 65536
        for i in range(0, self.n, step):  # chunked copy keeps memory bounded
            out[i : i + step] = self.mm[i : min(i + step, self.n)]
        out.flush()
        del out

    def abort(self) -> None:
        self.mm = None
        if self.tmp.exists():
            self.tmp.unlink()


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
            replace_file(self.tmp, self.path)

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


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.predict import BaseClassifier

    validate_image_arguments(args)
    fmt, output = _embed_format(args)
    normalize = args.normalize if args.normalize is not None else fmt != "json"
    errors = ErrorLog()
    images = images_or_fail(args, errors)
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
        with progress(len(images), args.no_progress, "embed") as bar:
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
                    replace_file(tmp_json, output)
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
    def convert(dst_path: Path) -> None:
        with open(tmp, encoding="utf-8") as src, open(dst_path, "w", encoding="utf-8") as dst:
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

    atomic_save(path, convert)
    tmp.unlink()
