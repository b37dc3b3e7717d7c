"""`bioclip-fast` command line: one subcommand per module, imported lazily so `--help` stays fast.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bioclip_fast.train.cli", "train a BioCLIP-2-style model (default: tiny model on bundled butterflies)"),
    "make-shards": ("bioclip_fast.data.shards_cli", "images + metadata CSV -> TreeOfLife-200M-layout webdataset shards"),
    "eval": ("bioclip_fast.eval.cli", "zero-shot / few-shot / linear-probe evaluation"),
    "analyze": ("bioclip_fast.analysis.cli", "emergent-property analysis of an embedding space"),
    "predict": ("bioclip_fast.predict_cli", "classify images (pybioclip-compatible)"),
    "embed": ("bioclip_fast.predict_cli", "write image embeddings (npy/parquet) with image ids"),
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
    args = parser.parse_args(rest)
    args.command = name
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
