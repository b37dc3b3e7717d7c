"""`bioclip-fast index-shards SPEC [--out DIR] [--workers N]`: index webdataset shards (headers and text members
only) so training/eval start without reading the shards; see `bioclip_fast.data.index`."""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+",
                        help="shard spec(s): directory, glob, brace pattern ('shard-{000000..021399}.tar'), "
                             "'::'-joined list, or a text file listing shards")
    parser.add_argument("--out", default=None,
                        help="index directory (default: the shards' directory; use a cache directory when the "
                             "dataset mount is read-only, and pass it to training as --index-dir)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="indexing processes")
    parser.add_argument("--no-resume", action="store_true", help="re-index shards even if their index is current")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.data.index import index_shards
    from bioclip_fast.errors import UsageError

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    summary = index_shards(args.shards, args.out, workers=args.workers, progress=not args.no_progress,
                           resume=not args.no_resume)
    print(json.dumps(summary))
    if summary["damaged"]:
        import sys

        print(f"bioclip-fast index-shards: warning: {len(summary['damaged'])} damaged shard(s) skipped and listed in "
              f"the manifest's damaged_shards, e.g. {next(iter(summary['damaged'].values()))}", file=sys.stderr)
    return 0
