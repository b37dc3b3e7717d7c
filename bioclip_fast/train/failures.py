"""One error line per job, not per rank.

When one rank of a multi-process run fails, the others learn it only as a broken collective (gloo: "Connection closed
by peer ... GLHF", NCCL: a DistBackendError) and a launcher such as torchrun then prints its ChildFailedError block.
What the user should see is the failing rank's one line. So, on an exception in `bioclip-fast train`:

- a rank whose own step failed publishes "rank R failed: MESSAGE" in the process group's key-value store (the
  c10d store every rank already holds; one `add` and one `set`, only on failure), prints its one line naming its
  rank and writes it to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so the launcher's "Root Cause" shows
  that line instead of "To enable traceback see ...";
- a rank whose collective broke because a peer went away finds the peer's record and exits quietly with
  :data:`EXIT_PEER_FAILED`; one of them (rank 0, or rank 1 when rank 0 is the failed one) prints one short line
  naming the failed rank; no gloo/NCCL traceback;
- an error every rank raised together (checkpoint writes and loads agree their errors across ranks; validation
  before the process group is the same everywhere) is printed once, by rank 0.

Unexpected exceptions (bugs) still show their traceback on the rank that raised them (after publishing the record).
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

from bioclip_fast.errors import EXIT_PEER_FAILED, UsageError, one_line
_COUNT_KEY = "bioclip_fast/failures"
_FIRST_KEY = "bioclip_fast/first_failure"
_PEER_WAIT_S = 5.0  # how long a rank with a broken collective waits for the failed rank's record
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "socket", "timed out",
                 "processgroup", "c10d", "peer")


def mark_every_rank(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same point (agreed by a collective): printed once, by rank 0."""
    exc.every_rank = True  # type: ignore[attr-defined]
    return exc


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=_PEER_WAIT_S))
        return store
    except Exception:  # noqa: BLE001 - no store, no record: the lines fall back to what this rank knows
        return None


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _COMM_MARKERS)


def _publish(store, rank: int, message: str) -> None:
    if store is None:
        return
    try:
        if store.add(_COUNT_KEY, 1) == 1:  # the first rank to fail is the one the others name
            store.set(_FIRST_KEY, json.dumps({"rank": rank, "message": message, "time": time.time()}))
    except Exception:  # noqa: BLE001 - the store lives in a process that may be gone
        pass


def _first_failure(store, wait_s: float) -> dict | None:
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_FIRST_KEY]):
                return json.loads(store.get(_FIRST_KEY))
        except Exception:  # noqa: BLE001
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def write_error_file(message: str, timestamp: float | None = None) -> None:
    """torchrun's per-worker error file: its ChildFailedError block then shows `message` for this rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    ts = str(int(timestamp if timestamp is not None else time.time()))
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": ts}}}, f)
    except OSError:
        pass


def handle(exc: BaseException, prog: str, *, debug: bool = False) -> int | None:
    """Report `exc` of a distributed `train` run; returns the exit status, or None to let the caller re-raise/report
    it as usual (one process, KeyboardInterrupt/SystemExit, --debug)."""
    rank, world = _rank_world()
    if world <= 1 or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    expected = isinstance(exc, (UsageError, OSError, ValueError))
    store = _store()
    if store is None:  # before the process group: validation is the same on every rank, rank 0 says it
        if not expected or debug:
            return None
        line = f"{prog}: error: {one_line(exc)}"
        write_error_file(line)
        if rank == 0:
            print(line, file=sys.stderr)
        return 2
    if expected and getattr(exc, "every_rank", False) and not debug:
        line = f"{prog}: error: {one_line(exc)}"
        write_error_file(line)
        if rank == 0:
            print(line, file=sys.stderr)
        return 2
    comm = _is_comm_error(exc)
    first = _first_failure(store, _PEER_WAIT_S if comm else 0.0)
    if first is not None and first.get("rank") != rank:
        failed = int(first["rank"])
        line = f"{prog}: stopped: rank {failed} failed (its error line names the cause); rank {rank} stopped too"
        write_error_file(line, max(time.time(), float(first.get("time", 0)) + 1))  # the launcher's root cause stays
        if rank == (1 if failed == 0 else 0):
            print(line, file=sys.stderr)
        return EXIT_PEER_FAILED
    if comm and not debug:  # a peer went away without a record (killed, out of memory, its launcher died)
        line = (f"{prog}: stopped: another rank exited without reporting an error (killed or out of memory?); the "
                f"launcher's report names it ({one_line(exc)[:160]})")
        write_error_file(line)
        if rank == 0:
            print(line, file=sys.stderr)
        return EXIT_PEER_FAILED
    message = one_line(exc) if expected else f"{type(exc).__name__}: {one_line(exc)}"
    _publish(store, rank, message)
    if not expected or debug:
        write_error_file(f"rank {rank}: {message}")
        return None  # a bug: its traceback, on this rank
    line = f"{prog}: error: rank {rank}: {message}"
    write_error_file(line)
    print(line, file=sys.stderr)
    return 2
