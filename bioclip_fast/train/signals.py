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

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

import torch

from bioclip_fast.distributed import DistInfo, any_rank

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
    """Should the run stop? This rank's request (a stop signal while :meth:`watching`, or its launcher's death), read
    into the step's reduction, and what every rank has agreed in it (:meth:`agree`): a stop signal on some rank
    (`agreed`), a rank's loader past --max-bad-fraction (`data_agreed`)."""

    def __init__(self, rank: int = 0, launcher: int | None = None):
        self.rank = rank
        self.launcher_pid = launcher
        self.signals: StopSignals | None = None
        self.agreed = False  # every rank has learned (in the same reduction) that a stop signal arrived
        self.data_agreed = False  # ... that a rank's loader passed --max-bad-fraction

    @contextlib.contextmanager
    def watching(self) -> Iterator[StopSignals]:
        """The stop signals' handlers installed (the training loop's span); yields them (`.received` names one)."""
        with StopSignals() as signals:
            self.signals = signals
            try:
                yield signals
            finally:
                self.signals = None

    def agree(self, stops: float, data_stops: float) -> None:
        """The step reduction's sums of the ranks' stop and bad-data flags: every rank records the same."""
        if stops > 0:
            self.agreed = True
        if data_stops > 0:
            self.data_agreed = True

    @property
    def stopping(self) -> bool:
        """Every rank has agreed to stop after this step (a signal or the data)."""
        return self.agreed or self.data_agreed

    def agree_at_end(self, info: DistInfo, device: torch.device) -> bool:
        """Collective: did any rank receive a stop signal? (One all-reduce, once per run: a signal that landed after
        the last step's reduction.)"""
        return any_rank(self.agreed or self.requested_here(), info, device)

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
