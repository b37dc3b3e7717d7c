"""`bioclip-fast make-shards`: images + metadata CSV -> TreeOfLife-200M-layout webdataset shards."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default=None,
                        help="image root; paths in the CSV are relative to it (default: the CSV's directory)")
    parser.add_argument("--csv", default=None,
                        help="metadata CSV with columns image,kingdom,...,species,scientific_name,common_name "
                             "(default: the bundled Leeds Butterflies metadata.csv)")
    parser.add_argument("--out", required=True, help="output directory for shard-*.tar/.idx/.json + manifest.json")
    parser.add_argument("--samples-per-shard", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    parser.add_argument("--image-size", type=int, default=224, help="shorter side (or square side) in pixels")
    parser.add_argument("--resize", choices=("shorter", "square"), default="shorter",
                        help="'shorter': keep aspect ratio; 'square': squash like BioCLIP's make_wds.py")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--no-resume", action="store_true", help="rebuild every shard even if already complete")
    parser.add_argument("--allow-missing-columns", action="store_true",
                        help="build even if taxonomy columns are missing (captions then lack those ranks)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.data.bundled import butterflies_root
    from bioclip_fast.data.shards import make_shards
    from bioclip_fast.errors import UsageError

    csv = args.csv or str(butterflies_root() / "metadata.csv")
    images = args.images or os.path.dirname(os.path.abspath(csv))
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if not os.path.isfile(csv):
        raise UsageError(f"--csv: file not found: {csv}")
    if not os.path.isdir(images):
        raise UsageError(f"--images: not a directory: {images}")
    manifest = make_shards(
        images, csv, args.out, samples_per_shard=args.samples_per_shard, workers=args.workers,
        image_size=args.image_size, resume=not args.no_resume, resize=args.resize, quality=args.quality,
        progress=not args.no_progress, allow_missing_columns=args.allow_missing_columns,
    )
    summary = {k: manifest[k] for k in ("num_samples", "num_skipped", "num_classes")}
    summary["shards"] = len(manifest["shards"])
    summary["manifest"] = os.path.join(args.out, "manifest.json")
    print(json.dumps(summary))
    for s in manifest["skipped"][:20]:
        print(f"skipped {s['image']} (line {s['line']}): {s['error']}", file=sys.stderr)
    if manifest["num_skipped"] > 20:
        print(f"... and {manifest['num_skipped'] - 20} more, listed in the manifest", file=sys.stderr)
    return 0
