"""The loop's Timer and the preemption checks' cadence, without MPI."""

import signal
import time

import numpy as np
import pytest

from hvcodistill.comm.preemption import PreemptionGuard
from hvcodistill.training.timing import Timer


class FakeExchange:
    seconds = 0.0


def test_laps_partition_the_loop_and_take_out_the_waits():
    timer, exchange = Timer(), FakeExchange()
    timer.start(exchange)
    time.sleep(0.02)
    timer.lap("data_s")
    time.sleep(0.01)
    timer.allreduce_s += 0.004  # what train_step timed inside the lap
    exchange.seconds += 0.003  # what the exchange timed inside the lap
    timer.lap("compute_s")
    time.sleep(0.01)
    exchange.seconds += 0.002  # an exchange outside train_step still counts as exchange
    timer.lap("other_s")
    time.sleep(0.03)
    timer.lap("eval_s")
    assert sum(getattr(timer, k) for k in Timer.PARTS) == pytest.approx(timer.loop_s, rel=1e-12)
    assert timer.exchange_s == pytest.approx(0.005)
    assert timer.data_s >= 0.02 and timer.eval_s >= 0.03
    assert 0.01 - 0.007 <= timer.compute_s < 0.01  # its lap less the two waits
    assert timer.loop_s >= 0.07


def test_state_round_trip_and_a_state_without_a_part_is_refused():
    timer = Timer(
        compute_s=1.0,
        allreduce_s=2.0,
        exchange_s=0.5,
        eval_s=0.25,
        checkpoint_s=0.125,
        data_s=0.0625,
        other_s=0.03125,
        loop_s=3.96875,
        wall_s=5.0,
    )
    timer.start(FakeExchange())  # private lap state stays out of the checkpoint
    other = Timer()
    other.load_state_dict(timer.state_dict())
    assert other.state_dict() == timer.state_dict() and set(timer.state_dict()) == {
        *Timer.PARTS,
        "loop_s",
        "wall_s",
    }
    assert other.wall_before == 5.0  # a resumed run's wall time counts from the saved one
    with pytest.raises(KeyError):  # setup.build_trainer turns it into one line, exit 2
        Timer().load_state_dict(
            {"compute_s": 6.0, "allreduce_s": 3.0, "loop_s": 10.0, "wall_s": 12.0}
        )


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
