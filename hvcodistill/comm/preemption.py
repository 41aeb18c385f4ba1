"""Stop cleanly when the scheduler says so: SIGUSR1 (SLURM's --signal) or SIGTERM.

A signal may reach some ranks and not others, or at different steps, so the ranks agree before
they stop. At a *check* each rank waits for the non-blocking MAX all-reduce over COMM_WORLD that
the previous check posted (long complete by then: no rank waits for another), then posts its own
flag in a new one. Every rank reads the same result at the same check, so all stop at the same step.

Checks are not made every step: a world all-reduce per step costs a plain Horovod loop a few
percent at millisecond steps. The next check is `every` steps after this one
(run.preempt_check_every), or with every = 0 (the default) after about CHECK_SECONDS of training:
the same all-reduce carries each rank's recent time per step, and the interval in steps is
computed from the slowest rank's, which every rank receives at the same check, so the cadence
is identical on all ranks. A signal stops the run within two check intervals (about 0.2 s with
the default) plus the step under way.

Checks happen between steps, so a signal before the first step (set-up) or while a rank is stuck
inside a step is the Watchdog's (comm/watchdog.py): it ends the run from its own thread.
"""

from __future__ import annotations

import signal
import time

import numpy as np
from mpi4py import MPI


class PreemptionGuard:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    CHECK_SECONDS = 0.1  # every = 0: time between checks

    def __init__(self, world, every: int = 0):
        self.world = world
        self.every = every  # steps between checks; 0: every CHECK_SECONDS
        self.flag = np.zeros(1, dtype=np.int32)  # set by the handler
        # [signal, seconds per step, non-finite]; untouched in flight
        self._send = np.zeros(3, dtype=np.float64)
        self._recv = np.zeros(3, dtype=np.float64)
        self._request = None
        self._next = None  # step of the next check; None: the first call
        self._last = None  # (step, time) of the last check
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag[0] = signum

    def should_stop(self, step: int, finite=None) -> bool:
        """Called by every rank after every step with the same `step` (updates done); True on all
        ranks at the same step. Between checks it is one comparison. `finite` (FiniteWatch):
        whether this rank saw a NaN/Inf rides in the same all-reduce."""
        if self._next is not None and step < self._next:
            return False
        return self._check(step, finite)

    def _check(self, step: int, finite) -> bool:
        now = time.perf_counter()
        if self._request is not None:
            self._request.Wait()
            self._request = None
            if self._recv[0] or self._recv[2]:
                return True  # every rank sees the same result: none posts another
        self._next = step + self._interval(float(self._recv[1]))  # the same on every rank
        self._send[0] = self.flag[0]
        self._send[2] = float(finite is not None and finite.seen())
        self._send[1] = (
            (now - self._last[1]) / (step - self._last[0])
            if self._last is not None and step > self._last[0]
            else 0.0
        )
        self._last = (step, now)
        # COMM_WORLD: has any rank been signalled or seen a NaN/Inf, and how long do the slowest
        # rank's steps take?
        # Read at the next check, so no rank waits now.
        self._request = self.world.Iallreduce(self._send, self._recv, op=MPI.MAX)
        return False

    def _interval(self, step_seconds: float) -> int:
        """Steps to the next check, from the agreed time per step (0: not known yet)."""
        if self.every > 0:
            return self.every
        if step_seconds <= 0:
            return 1
        return max(1, int(self.CHECK_SECONDS / step_seconds))

    @property
    def saw_nonfinite(self) -> bool:
        """The agreed result says some rank saw a NaN/Inf (training/finite.py): no checkpoint."""
        return bool(self._recv[2])

    def signal_name(self) -> str:
        return signal.Signals(int(self._recv[0])).name if self._recv[0] else "none"

    @property
    def started(self) -> bool:
        """This rank has finished its first step (its first check): from here on a stop signal is
        this guard's to act on; before, during set-up, the Watchdog's (comm/watchdog.py)."""
        return self._last is not None

    def __enter__(self) -> PreemptionGuard:
        return self

    def __exit__(self, kind, error, tb) -> None:
        # peers may be gone when failing: wait for the last all-reduce only on a shared ending
        self.close(wait=kind is None or getattr(error, "agreed", False))

    def close(self, wait: bool = True) -> None:
        """Finish the last all-reduce (not when failing: peers may be gone) and restore handlers."""
        if self._request is not None and wait:
            self._request.Wait()
        self._request = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)
