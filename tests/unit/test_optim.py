import pytest

from hvcodistill.cadence import itstime
from hvcodistill.optim import LRSchedule, WDSchedule, goyal_lr, to_steps


def test_warmup_is_linear_and_reaches_base_lr():
    s = LRSchedule(base_lr=0.4, total_steps=100, warmup_steps=4, kind="constant")
    assert [s(i) for i in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert s(3) == pytest.approx(0.4) and s(4) == pytest.approx(0.4)


def test_step_decay_at_milestones():
    s = LRSchedule(
        base_lr=1.0, total_steps=100, warmup_steps=5, kind="step", milestones=(30, 60), gamma=0.1
    )
    assert s(5) == pytest.approx(1.0)
    assert s(29) == pytest.approx(1.0) and s(30) == pytest.approx(0.1)
    assert (
        s(59) == pytest.approx(0.1)
        and s(60) == pytest.approx(0.01)
        and s(99) == pytest.approx(0.01)
    )


def test_cosine_from_base_to_zero_monotone():
    s = LRSchedule(base_lr=0.2, total_steps=100, warmup_steps=10, kind="cosine")
    assert s(10) == pytest.approx(0.2)
    assert s(55) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    after = [s(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_constant():
    s = LRSchedule(base_lr=0.3, total_steps=50, kind="constant", milestones=(10,))
    assert {s(i) for i in range(0, 51, 7)} == {0.3}


def test_paper_weight_decay_recipe():
    wd = WDSchedule(initial=1e-4, milestones=(30, 60), values=(1e-5, 0.0))
    assert [wd(0), wd(29), wd(30), wd(59), wd(60), wd(1000)] == [1e-4, 1e-4, 1e-5, 1e-5, 0.0, 0.0]


def test_goyal_lr():
    assert goyal_lr(256) == pytest.approx(0.1) and goyal_lr(512) == pytest.approx(0.2)
    assert goyal_lr(64) == pytest.approx(0.025)


def test_to_steps():
    assert to_steps(2.5, unit="epochs", steps_per_epoch=100) == 250
    assert to_steps(1, unit="epochs", steps_per_epoch=7) == 7
    got = to_steps(40, unit="steps", steps_per_epoch=100)
    assert got == 40 and isinstance(got, int)


def test_itstime():
    assert not any(itstime(s, 0) for s in range(20))
    assert itstime(20, 0, total_steps=20, last=True) and not itstime(
        19, 0, total_steps=20, last=True
    )
    assert [s for s in range(10) if itstime(s, 3)] == [0, 3, 6, 9]
    assert [s for s in range(10) if itstime(s, 3, first=False)] == [3, 6, 9]
    assert itstime(10, 3, total_steps=10, last=True) and not itstime(10, 3, total_steps=10)
    # the end does its own validation and checkpoint: last=False skips the final step
    assert itstime(9, 3, total_steps=10, last=False) and not itstime(
        9, 3, total_steps=9, last=False
    )
    # a schedule that starts at an offset (a weights refresh after burn-in)
    assert [s for s in range(12) if itstime(s, 4, offset=3)] == [3, 7, 11]
    assert [s for s in range(12) if itstime(s, 4, offset=3, first=False)] == [7, 11]
