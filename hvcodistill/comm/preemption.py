"""Stop cleanly when the scheduler says so: SIGUSR1 (SLURM's --signal) or SIGTERM.

A signal may reach some ranks and not others, or at different steps. Every step each rank posts
its flag in a non-blocking MAX all-reduce over COMM_WORLD and reads the previous step's result,
so all ranks learn of the signal at the same step without waiting for one another.
"""
from __future__ import annotations

import signal

import numpy as np


class PreemptionGuard:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, world):
        self.world = world
        self.flag = np.zeros(1, dtype=np.int32)      # set by the handler
        self._send = np.zeros(1, dtype=np.int32)     # untouched while a request is in flight
        self._recv = np.zeros(1, dtype=np.int32)
        self._request = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag[0] = signum

    def should_stop(self) -> bool:
        """Called by every rank once per step; True on all ranks at the same step."""
        from mpi4py import MPI

        if self._request is not None:
            self._request.Wait()
            self._request = None
            if self._recv[0]:
                return True             # every rank sees the same result: none posts another
        self._send[0] = self.flag[0]
        # COMM_WORLD: has any rank been signalled? Read at the next step, so no rank waits now.
        self._request = self.world.Iallreduce(self._send, self._recv, op=MPI.MAX)
        return False

    def signal_name(self) -> str:
        return signal.Signals(int(self._recv[0])).name if self._recv[0] else "none"

    def close(self, wait: bool = True) -> None:
        """Finish the last all-reduce (not when failing: peers may be gone) and restore handlers."""
        if self._request is not None and wait:
            self._request.Wait()
        self._request = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the process exits EXIT_PREEMPTED."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal_name = step, signal_name
