"""One run per run directory: ``<out>/run.lock`` names its holder (host, boot id, pid, process start, start time).

A requeued job started while the old job's workers are still alive would otherwise train into the same ``--out``
(metrics out of order, checkpoints renamed under each other). Rank 0 creates the lock with ``O_CREAT | O_EXCL``
before anything is written into ``--out`` and removes it when the process ends; another run is refused with one
line naming the holder. A lock whose holder is gone is taken over (with a warning):

- same host (same hostname and boot id): the holder's pid no longer runs, or now belongs to another process (its
  start time differs);
- another host (a shared filesystem, where ``flock`` is unreliable): the holder refreshes the lock's mtime every
  :data:`HEARTBEAT_S` seconds; a lock not refreshed for :data:`STALE_AFTER_S` seconds is stale.

Taking over renames the stale lock aside first (an atomic rename: of two runs racing for it, one wins).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bioclip_fast.errors import ConfigError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: a holder on another host is gone


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def my_identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": pid, "pid_start": process_start(pid),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def holder_state(holder: dict, mtime: float) -> tuple[str, str]:
    """('self' | 'alive' | 'stale', why) for the holder recorded in a lock last refreshed at `mtime`.

    An unreadable lock (`holder` empty: being created right now, or left half-written by a crash) is alive while it
    is younger than HEARTBEAT_S, stale after."""
    if not holder:
        if time.time() - mtime < HEARTBEAT_S:
            return "alive", "its lock is being written"
        return "stale", "its lock is unreadable"
    me = my_identity()
    same_host = holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"]
    if same_host:
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return "stale", "it names no pid"
        if pid == me["pid"]:
            return "self", "this process"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "stale", f"pid {pid} is no longer running"
        except PermissionError:
            pass  # runs, under another user
        start = process_start(pid)
        if holder.get("pid_start") and start and start != holder["pid_start"]:
            return "stale", f"pid {pid} is another process now"
        return "alive", f"pid {pid} is running"
    age = time.time() - mtime
    if age > STALE_AFTER_S:
        return "stale", f"not refreshed for {age:.0f} s (holder on host {holder.get('host')} is gone)"
    return "alive", (f"refreshed {age:.0f} s ago; if that run is gone, its lock is taken over once it is "
                     f"{STALE_AFTER_S:.0f} s old, in {STALE_AFTER_S - age:.0f} s")


def _holder(path: Path) -> tuple[dict | None, float]:
    try:
        st = path.stat()
        return json.loads(path.read_text()), st.st_mtime
    except FileNotFoundError:
        return None, 0.0
    except (OSError, ValueError):  # being written right now, or damaged
        try:
            return {}, path.stat().st_mtime
        except OSError:
            return None, 0.0


def _in_use(out: Path, holder: dict, why: str) -> ConfigError:
    holder = holder or {"host": "?", "pid": "?", "started": "just now"}  # an unreadable lock names no holder
    return ConfigError(
        f"out: {out} is in use by another run ({describe(holder)}; {why}; lock {out / LOCK_NAME}). One run may own a "
        f"run directory at a time: wait for it to end or stop it, or choose another --out (a lock whose holder is "
        f"gone is taken over automatically)")


def check(out: str | os.PathLike) -> None:
    """Refuse `out` when a live run holds its lock (every rank, before any work; no file is written)."""
    out = Path(out)
    holder, mtime = _holder(out / LOCK_NAME)
    if holder is None:
        return
    state, why = holder_state(holder, mtime)
    if state == "alive":
        raise _in_use(out, holder, why)


# ------------------------------------------------------------------------------------------------ holding
_held: dict[str, str] = {}  # lock path -> the content we wrote
_held_lock = threading.Lock()
_beat: threading.Thread | None = None


def refresh() -> int:
    """Refresh the lease (mtime) of every lock this process still holds; returns how many. The heartbeat thread
    calls it every HEARTBEAT_S seconds."""
    with _held_lock:
        items = list(_held.items())
    n = 0
    for path, text in items:
        try:
            if Path(path).read_text() == text:  # still ours (not taken over as stale meanwhile)
                os.utime(path)
                n += 1
        except OSError:
            pass
    return n


def _heartbeat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        refresh()


def _release_all() -> None:
    with _held_lock:
        paths = list(_held)
    for p in paths:
        release(p)


def release(path: str | os.PathLike) -> None:
    """Remove the lock if this process still holds it."""
    path = str(path)
    with _held_lock:
        text = _held.pop(path, None)
    if text is None:
        return
    try:
        if Path(path).read_text() == text:
            os.unlink(path)
    except OSError:
        pass


def acquire(out: str | os.PathLike) -> tuple[Path, list[str]]:
    """Take the lock of run directory `out` (which exists) for this process; returns (lock path, warnings).

    Raises ConfigError naming the holder when a live run holds it."""
    global _beat
    out = Path(out)
    path = out / LOCK_NAME
    notes: list[str] = []
    me = my_identity()
    text = json.dumps(me)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, mtime = _holder(path)
            if holder is None:
                continue  # removed meanwhile: try again
            state, why = holder_state(holder, mtime)
            if state == "alive":
                raise _in_use(out, holder, why)
            if state == "self":
                path.write_text(text)
                break
            aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.rename(path, aside)  # of several runs taking over the same stale lock, one rename wins
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            notes.append(f"took over the lock of {out} from a run that is gone ({describe(holder)}: {why})")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        break
    else:
        raise ConfigError(f"out: could not take the lock {path} (other runs keep replacing it)")
    with _held_lock:
        _held[str(path)] = text
        if _beat is None:
            _beat = threading.Thread(target=_heartbeat, name="bioclip-fast-run-lock", daemon=True)
            _beat.start()
            atexit.register(_release_all)
    return path, notes
