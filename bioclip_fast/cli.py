"""`bioclip-fast` command line: one subcommand per module, imported lazily so `--help` stays fast.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). Expected failures
(:class:`bioclip_fast.errors.UsageError`, ``OSError``, ``ValueError``) print one line, ``bioclip-fast CMD: error: ...``,
and exit 2; ``--debug`` (on every subcommand) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bioclip_fast.train.cli", "train a BioCLIP-2-style model (default: tiny model on bundled butterflies)"),
    "make-shards": ("bioclip_fast.data.shards_cli", "images + metadata CSV -> TreeOfLife-200M-layout webdataset shards"),
    "index-shards": ("bioclip_fast.data.index_cli", "index shards (headers + text members only) for a fast start"),
    "eval": ("bioclip_fast.eval.cli", "zero-shot / few-shot / linear-probe evaluation"),
    "analyze": ("bioclip_fast.analysis.cli", "emergent-property analysis of an embedding space"),
    "predict": ("bioclip_fast.predict_cli", "classify images (pybioclip-compatible)"),
    "embed": ("bioclip_fast.predict_cli", "write image embeddings (pybioclip's JSON, or npy/parquet) with image ids"),
    "list-models": ("bioclip_fast.predict_cli", "list the models --model accepts (or an architecture's tags)"),
    "list-tol-taxa": ("bioclip_fast.predict_cli", "print the TreeOfLife species table's taxa as CSV"),
    "export": ("bioclip_fast.export_cli", "export a run / checkpoint as an open_clip hub snapshot folder"),
    "bench-loss": ("bioclip_fast.bench_cli", "benchmark the fused contrastive loss against peers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bioclip-fast", description=__doc__.splitlines()[0])
    from bioclip_fast import __version__

    parser.add_argument("--version", action="version", version=f"bioclip_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"bioclip-fast {name}", description=help_)
    if hasattr(module, "add_arguments_for"):  # modules serving several subcommands
        module.add_arguments_for(name, parser)
    else:
        module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(rest)
    args.command = name
    return run_subcommand(parser.prog, module.run, args)


def run_subcommand(prog: str, run, args) -> int:
    """``run(args)`` with the one-line error contract (see :mod:`bioclip_fast.errors`)."""
    from bioclip_fast.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, one_line

    try:
        return int(run(args) or 0)
    except (UsageError, OSError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
