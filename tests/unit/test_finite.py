"""The non-finite watch (training/finite.py) without MPI: the first bad step is remembered, also
across folds, and the newest checkpoint named is one every model has."""

import torch

from hvcodistill.training.finite import FiniteWatch, newest_checkpoint


def test_finite_watch_remembers_the_first_bad_step():
    p = torch.nn.Parameter(torch.ones(3))
    w = FiniteWatch(torch.device("cpu"), [p])
    for step in range(3):
        w.update(step, torch.tensor(1.0))
    assert w.first() is None
    w.update(3, torch.tensor(1.0))  # a finite loss whose gradient was Inf: the update
    with torch.no_grad():  # leaves an Inf in the weights
        p[1] = float("inf")
    assert w.first(weights=False) is None  # a preemption check: the losses only; the next
    assert w.first() == 3  # loss shows it; an agreement sees the weights
    w.update(4, torch.tensor(float("nan")))
    assert w.first() == 3  # the first one stays
    loss_only = FiniteWatch(torch.device("cpu"))
    loss_only.update(7, torch.tensor(float("-inf")))
    assert loss_only.first() == 7


def test_finite_watch_folds_long_stretches_without_losing_the_step():
    w = FiniteWatch(torch.device("cpu"), [torch.nn.Parameter(torch.ones(2))])
    w.FOLD = 4
    for step in range(10, 30):  # a resumed run: steps from 10; folded at 14, 18, ...
        w.update(step, torch.tensor(float("nan") if step in (17, 25) else 0.5))
        assert len(w._losses) < 4
    assert w.first() == 17
    clean = FiniteWatch(torch.device("cpu"), [torch.nn.Parameter(torch.ones(2))])
    clean.FOLD = 4
    for step in range(9):
        clean.update(step, torch.tensor(0.5))
    assert clean.first() is None


def test_newest_checkpoint_is_one_every_model_has(tmp_path):
    for m, steps in ((0, (2, 4, 6)), (1, (2, 4))):
        d = tmp_path / "checkpoints" / f"model_{m}"
        d.mkdir(parents=True)
        for s in steps:
            for suffix in (".pt", ".json"):
                (d / f"step_{s:09d}{suffix}").write_text("x")
    assert newest_checkpoint(tmp_path, 2) == 4
    assert newest_checkpoint(tmp_path / "none", 2) is None
