"""`bioclip-fast` command line: one subcommand per module, imported lazily so `--help` stays fast.

Each subcommand has its module in this package (``COMMANDS``), which exposes ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code); flags shared by several subcommands are defined once, in :mod:`.args` (and, for
predict and embed, :mod:`.image_io`), modules that are no subcommand. Expected failures
(:class:`bioclip_fast.errors.UsageError`, ``OSError``, ``ValueError``) print one line, ``bioclip-fast CMD: error: ...``,
and exit 2; ``--debug`` (on every subcommand) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from bioclip_fast.errors import EXIT_INTERRUPTED

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bioclip_fast.cli.train", "train a BioCLIP-2-style model (default: tiny model on bundled butterflies)"),
    "make-shards": ("bioclip_fast.cli.make_shards", "images + metadata CSV -> TreeOfLife-200M-layout webdataset shards"),
    "index-shards": ("bioclip_fast.cli.index_shards", "index shards (headers + text members only) for a fast start"),
    "eval": ("bioclip_fast.cli.eval", "zero-shot / few-shot / linear-probe evaluation"),
    "analyze": ("bioclip_fast.cli.analyze", "emergent-property analysis of an embedding space"),
    "predict": ("bioclip_fast.cli.predict", "classify images (pybioclip-compatible)"),
    "embed": ("bioclip_fast.cli.embed", "write image embeddings (pybioclip's JSON, or npy/parquet) with image ids"),
    "list-models": ("bioclip_fast.cli.list_models", "list the models --model accepts (or an architecture's tags)"),
    "list-tol-taxa": ("bioclip_fast.cli.list_tol_taxa", "print the TreeOfLife species table's taxa as CSV"),
    "export": ("bioclip_fast.cli.export", "export a run / checkpoint as an open_clip hub snapshot folder"),
    "bench-loss": ("bioclip_fast.cli.bench_loss", "benchmark the fused contrastive loss against peers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bioclip-fast", description=__doc__.splitlines()[0])
    from bioclip_fast import __version__

    parser.add_argument("--version", action="version", version=f"bioclip_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


class SigintGuard:
    """The SIGINT handler while a command runs: raises KeyboardInterrupt as Python's default does, and remembers that
    it did (`received`), so a Ctrl-C whose KeyboardInterrupt is swallowed on the way (raised inside a `__del__` or a
    weakref callback during start-up, where Python only prints "Exception ignored", or caught by a library) still
    ends the command with 130 instead of 0 (`train` checks it before its first step: train/signals.py)."""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def __enter__(self) -> "SigintGuard":
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    with SigintGuard() as guard:  # before the (slow) imports: a Ctrl-C at any point of the start is an interrupt
        try:
            return _main(argv, guard)
        except KeyboardInterrupt:
            if "--debug" in argv:
                raise
            print(f"bioclip-fast {argv[0]}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def _main(argv: list[str], guard: SigintGuard) -> int:
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"bioclip-fast {name}", description=help_)
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(rest)
    args.command = name
    return run_subcommand(parser.prog, module.run, args, guard=guard)


def run_subcommand(prog: str, run, args, *, guard: SigintGuard | None = None) -> int:
    """``run(args)`` with the one-line error contract (see :mod:`bioclip_fast.errors`); a Ctrl-C is exit 130 even
    when its KeyboardInterrupt was swallowed on the way (`guard.received`)."""
    from bioclip_fast.errors import EXIT_USAGE, UsageError, one_line

    try:
        rc = int(run(args) or 0)
        if guard is not None and guard.received and rc == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        return rc
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

