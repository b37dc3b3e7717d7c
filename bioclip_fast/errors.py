"""The package's expected-failure type and the CLI's one-line error contract.

Every subcommand answers an expected failure (bad flag value, missing file, corrupt checkpoint, full disk, ...) with
one line, ``bioclip-fast CMD: error: MESSAGE``, and exit status 2; ``--debug`` shows the traceback instead.
Raise :class:`UsageError` (or a subclass) with a message that names the offending argument, path or value.
"""
from __future__ import annotations

EXIT_USAGE = 2  # argparse's own status for a bad command line; ours for every expected failure
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention
EXIT_NONFINITE = 3  # `train` stopped on a non-finite loss (nothing non-finite was checkpointed)
# `train` stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint: requeue and run again with --resume auto.
# 75 is sysexits' EX_TEMPFAIL ("temporary failure, try again"); distinct from 143 (= killed by SIGTERM unhandled).
EXIT_PREEMPTED = 75
# `train` with several ranks: this rank stopped because another rank failed (that rank's line and status say why)
EXIT_PEER_FAILED = 4


class UsageError(Exception):
    """An expected failure the user can fix; the CLI prints ``str(self)`` as one line, no traceback."""


class DataError(UsageError):
    """Input data that cannot be used (no shards matched, unreadable CSV, missing columns, ...)."""


class ConfigError(UsageError, ValueError):
    """A training configuration that cannot run; the message names the offending key."""


class CheckpointError(UsageError):
    """A checkpoint or weights file that is missing, corrupt, of another architecture or unsafe to load."""


def one_line(exc: BaseException) -> str:
    """The message for an expected failure: the exception's text on one line, with OSError's path and errno name."""
    if isinstance(exc, OSError) and not isinstance(exc, UsageError):
        import errno as _errno

        name = _errno.errorcode.get(exc.errno or 0, "")
        what = exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{what}" + (f" ({name})" if name else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
