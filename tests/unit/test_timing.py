"""The loop's Timer, on a fake clock: its laps partition the loop and take out the waits."""

import time

import pytest

from hvcodistill.training.timing import Timer


class FakeExchange:
    seconds = 0.0


def test_laps_partition_the_loop_and_take_out_the_waits(monkeypatch):
    clock = [100.0]  # time.perf_counter, advanced by the test: no real sleep, no race
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    timer, exchange = Timer(started=clock[0], wall_before=1.0), FakeExchange()
    timer.start(exchange)
    clock[0] += 0.02
    timer.lap("data_s")
    clock[0] += 0.01
    timer.allreduce_s += 0.004  # what train_step timed inside the lap
    exchange.seconds += 0.003  # what the exchange timed inside the lap
    timer.lap("compute_s")
    clock[0] += 0.01
    exchange.seconds += 0.002  # an exchange outside train_step still counts as exchange
    timer.lap("other_s")
    clock[0] += 0.03
    timer.lap("eval_s")
    assert sum(getattr(timer, k) for k in Timer.PARTS) == pytest.approx(timer.loop_s, rel=1e-12)
    assert timer.exchange_s == pytest.approx(0.005) and timer.allreduce_s == pytest.approx(0.004)
    assert timer.data_s == pytest.approx(0.02) and timer.eval_s == pytest.approx(0.03)
    assert timer.compute_s == pytest.approx(0.01 - 0.004 - 0.003)  # its lap less the two waits
    assert timer.other_s == pytest.approx(0.01 - 0.002)
    assert timer.loop_s == pytest.approx(0.07) and timer.checkpoint_s == 0.0
    assert timer.segment_seconds() == pytest.approx(0.07)
    assert timer.wall_seconds() == pytest.approx(1.07)  # earlier segments' time added


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
    timer.stop()  # the loop's CPU time is counted from start() to stop()
    assert timer.cpu_s >= 0 and timer.cpu_seconds() == timer.cpu_s
    other = Timer()
    other.load_state_dict(timer.state_dict())
    assert other.state_dict() == timer.state_dict() and set(timer.state_dict()) == {
        *Timer.PARTS,
        "loop_s",
        "cpu_s",
        "wall_s",
    }
    assert other.wall_before == 5.0  # a resumed run's wall time counts from the saved one
    with pytest.raises(KeyError):  # setup.build_trainer turns it into one line, exit 2
        Timer().load_state_dict(
            {"compute_s": 6.0, "allreduce_s": 3.0, "loop_s": 10.0, "wall_s": 12.0}
        )
