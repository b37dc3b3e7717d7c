"""What predict and embed share (this module is not a subcommand): their image and model flags, the checks that need
no model, the expansion of files and folders to image files, the log of skipped images, the progress bar and the text
output (stdout or a file; list-tol-taxa writes there too).

Both commands stream: images are decoded and encoded batch by batch, results are written as each batch finishes, so
memory stays bounded for any number of images. A missing, unreadable or non-image file is reported by name on stderr
and skipped; the exit code is non-zero only when no image could be processed. The whole command is validated (flags,
output suffix, device, files) before a model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from bioclip_fast.cli.args import add_device_argument, add_model_arguments
from bioclip_fast.errors import UsageError

DEFAULT_BATCH_SIZE = 10  # pybioclip's


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags predict and embed share, in pybioclip's order (the command's own flags follow them)."""
    parser.add_argument("images", nargs="+", help="image files or directories (searched recursively)")
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per batch (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    add_device_argument(parser)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="compute precision of the encoders (fp32 gives pybioclip's scores)")
    parser.add_argument("--preprocess", default="auto", choices=("auto", "squash", "model"),
                        help="auto: squash to 224x224 like pybioclip for TreeOfLife models/tables, else the model's "
                             "own resize+crop")
    parser.add_argument("--output", "-o", default="stdout",
                        help="output file (default: stdout; embed --format npy: embeddings.npy)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def validate_image_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model: run before any work."""
    from bioclip_fast.devices import resolve_device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    resolve_device(args.device)
    if args.model_name and not args.model:
        args.model = args.model_name
    if args.pretrained and args.model and Path(args.model).exists():
        raise UsageError(f"--pretrained {args.pretrained}: --model {args.model} is already a file or folder with "
                         f"weights; --pretrained goes with an architecture name (e.g. --model ViT-B-16)")
    out = getattr(args, "output", None)
    if out not in (None, "-", "stdout") and Path(out).is_dir():
        raise UsageError(f"--output {out} is a directory; give a file name")


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


def images_or_fail(args: argparse.Namespace, errors: ErrorLog) -> list[str]:
    """``args.images`` expanded to image files; other files found in folders are reported to ``errors``."""
    not_images: list[str] = []
    images = list(expand_images(args.images, not_images))
    for f in not_images:
        errors(f, f"not an image file (suffix {Path(f).suffix or 'none'})")
    if not images:
        raise UsageError(f"no images found in {' '.join(args.images)}")
    return images


def progress(total: int | None, disable: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable, desc=desc, unit="img", file=sys.stderr)


def open_text_output(path: str | None) -> tuple[TextIO, bool]:
    """(stream, whether the caller closes it): stdout for None/"-"/"stdout", else the file (its folder created)."""
    if path is None or path in ("-", "stdout"):
        return sys.stdout, False
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", newline="", encoding="utf-8"), True
