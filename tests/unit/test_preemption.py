"""The preemption checks (comm/preemption.py) without ranks: their cadence on a fake world and a
fake clock, a signal agreed before it is acted on, and the non-finite flag they carry."""

import signal
import time
from types import SimpleNamespace

import numpy as np

from hvcodistill.comm.preemption import PreemptionGuard


class FakeRequest:
    def __init__(self, send, recv, others):
        self.result, self.recv = np.maximum(send, others), recv  # every rank's post, at post time

    def Wait(self):
        self.recv[:] = self.result


class FakeWorld:
    """One rank's view of a world whose other ranks post `others` (signal, seconds per step,
    non-finite), the guard's message."""

    def __init__(self):
        self.others = np.zeros(3)
        self.posted = []

    def Iallreduce(self, send, recv, op):
        self.posted.append(len(self.posted))
        return FakeRequest(send, recv, self.others)


def checks(guard, steps, on_step=None):
    """Steps at which the guard posted a check, and the step it stopped at (None)."""
    at = []
    for step in range(1, steps + 1):
        before = len(guard.world.posted)
        if on_step:
            on_step(step)
        if guard.should_stop(step):
            return at, step
        if len(guard.world.posted) > before:
            at.append(step)
    return at, None


def test_fixed_cadence_and_a_signal_on_another_rank_stops_within_two_checks():
    guard = PreemptionGuard(FakeWorld(), every=5)
    try:

        def signal_elsewhere(step):
            if step == 13:
                guard.world.others[0] = signal.SIGUSR1

        at, stopped = checks(guard, 100, signal_elsewhere)
        # posted at 1, 6, 11, 16; the signal is in the one posted at 16, read at 21
        assert at == [1, 6, 11, 16] and stopped == 21 and guard.signal_name() == "SIGUSR1"
    finally:
        guard.close()


def test_auto_cadence_follows_the_slowest_ranks_step_time(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    guard = PreemptionGuard(FakeWorld(), every=0)
    try:
        guard.world.others[1] = 0.01  # another rank: 10 ms per step (this one: 1 ms)

        def tick(step):
            clock[0] += 0.001

        at, stopped = checks(guard, 100, tick)
        # the first intervals are 1 step (no step time agreed yet), then 0.1 s / 10 ms = 10 steps
        assert (
            at[:2] == [1, 2]
            and all(b - a == 10 for a, b in zip(at[2:], at[3:]))
            and stopped is None
        )
    finally:
        guard.close()


def test_own_signal_is_agreed_not_acted_on_alone():
    guard = PreemptionGuard(FakeWorld(), every=3)
    try:
        assert not guard.should_stop(1)  # posts the first check
        guard.flag[0] = signal.SIGTERM  # the handler ran on this rank
        assert not any(guard.should_stop(s) for s in (2, 3, 4))  # check at 4 posts the flag
        assert not any(guard.should_stop(s) for s in (5, 6))
        assert guard.should_stop(7) and guard.signal_name() == "SIGTERM"
    finally:
        guard.close()


def test_preemption_check_carries_the_non_finite_flag():
    from mpi4py import MPI

    guard = PreemptionGuard(MPI.COMM_SELF, every=1)
    try:
        seen = [False]
        finite = SimpleNamespace(seen=lambda: seen[0])  # a FiniteWatch's answer at a check
        assert not guard.should_stop(1, finite) and not guard.should_stop(2, finite)
        seen[0] = True
        assert not guard.should_stop(3, finite)  # posted here, read at the next check
        assert (
            guard.should_stop(4, finite) and guard.saw_nonfinite and guard.signal_name() == "none"
        )
    finally:
        guard.close()
