"""Graceful stop on SIGTERM / SIGINT / SIGUSR1: finish the current step, checkpoint on every rank, exit 75.

Cluster schedulers preempt with a signal and a grace period (SLURM: SIGTERM, then SIGKILL after `KillWait`, 30 s by
default; `#SBATCH --signal=USR1@120` sends SIGUSR1 two minutes before the time limit). The handler only records the
signal; the training loop notices it after the current step, every rank writes the checkpoint at the same step, and
the process exits with :data:`bioclip_fast.errors.EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), so a job script
can requeue on 75 and `--resume auto` continues exactly.

Agreement across ranks costs no extra collective and no extra host sync: the flag rides in the all-reduce that
already averages the loss every step (and has to be read on the host for the non-finite check). If any rank has seen
a signal before step N's loss reduction, every rank learns it in that reduction, finishes step N and saves at N.
A signal that lands after the last step's reduction is settled by one more all-reduce when the loop ends.

A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once, for a user who does not want to wait.

A worker started by a launcher (torchrun's agent, the deepspeed launcher) also stops like on SIGTERM when that launcher
dies (e.g. SIGKILLed by the scheduler): nothing supervises it any more, and a requeued job may start on the same
--out. :class:`StopWatch` holds both for the loop: this rank's request, and what every rank has agreed.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("bioclip_fast.train")

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopSignals:
    """Context manager installing the handlers (main thread only; elsewhere it records nothing)."""

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS):
        self.names = names
        self.received: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.names:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)
        if getattr(self._old.get(signal.SIGINT), "received", False):
            # a Ctrl-C during start-up whose KeyboardInterrupt was swallowed (bioclip_fast.cli.SigintGuard saw it):
            # nothing is trained yet, so it interrupts now
            self.__exit__()
            raise KeyboardInterrupt
        return self

    def _handle(self, signum, frame) -> None:
        # only record: logging or I/O inside a signal handler can re-enter a lock held by the interrupted code
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None


def launcher_pid() -> int | None:
    """The launcher that started this worker (torchrun, deepspeed): its parent at start; None outside a launcher."""
    launched = "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    return os.getppid() if launched and os.getppid() > 1 else None


class StopWatch:
    """Why this rank should stop: a stop signal (while :meth:`watching`) or its launcher's death."""

    def __init__(self, rank: int = 0, launcher: int | None = None):
        self.rank = rank
        self.launcher_pid = launcher
        self.signals: StopSignals | None = None

    def requested_here(self) -> bool:
        if self.signals is None:
            return False
        if (not self.signals.requested and self.launcher_pid is not None
                and os.getppid() != self.launcher_pid):  # one syscall per step, no host sync
            # the launcher (torchrun's agent, the deepspeed launcher) died, e.g. SIGKILLed by the scheduler: nothing
            # supervises this worker any more, and a requeued job may start on the same --out. Stop like on SIGTERM:
            # every rank agrees in the step's reduction, writes the checkpoint and exits.
            self.signals.received = f"the launcher's exit (parent pid {self.launcher_pid} is gone)"
            log.warning("rank %d: %s; stopping after this step with a checkpoint", self.rank,
                        self.signals.received)
        return self.signals.requested
