"""The losses (losses.py): distances by hand, per-token losses, alpha and its burn-in."""

import math

import pytest
import torch
import torch.nn.functional as F

from hvcodistill.losses import alpha_at, codistillation_loss, distillation_distance

S = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
T = [[0.2, -0.3, 1.5], [2.0, 1.0, -0.5]]


def _softmax(row, t):
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def _hand(kind, temp):
    total = 0.0
    for s, t in zip(S, T):
        ps, pt = _softmax(s, temp), _softmax(t, temp)
        if kind == "kl":
            total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
        else:
            total += -sum(b * math.log(a) for a, b in zip(ps, pt))
    return temp * temp * total / len(S)


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_kl_and_ce_match_hand_computation(kind, temp):
    got = distillation_distance(torch.tensor(S), torch.tensor(T), distance=kind, temperature=temp)
    assert got.item() == pytest.approx(_hand(kind, temp), rel=1e-5)


def test_mse_is_mean_squared_logit_difference_and_ignores_temperature():
    want = sum((a - b) ** 2 for s, t in zip(S, T) for a, b in zip(s, t)) / 6
    for temp in (1.0, 3.0):
        got = distillation_distance(
            torch.tensor(S), torch.tensor(T), distance="mse", temperature=temp
        )
        assert got.item() == pytest.approx(want, rel=1e-6)


def test_kl_of_identical_logits_is_zero():
    x = torch.tensor(S)
    assert distillation_distance(
        x, x.clone(), distance="kl", temperature=2.0
    ).item() == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_gradcheck(kind):
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(T, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: distillation_distance(x, t, distance=kind, temperature=2.0), (s,)
    )


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_teacher_gets_no_gradient(kind):
    s = torch.tensor(S, requires_grad=True)
    teachers = [torch.tensor(T, requires_grad=True), torch.tensor(S[::-1], requires_grad=True)]
    loss, _ = codistillation_loss(
        logits=s,
        targets=torch.tensor([1, 2]),
        teacher_logits=teachers,
        alpha=1.0,
        distance=kind,
        temperature=2.0,
    )
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(t.grad is None for t in teachers)


@pytest.mark.parametrize("alpha,teachers", [(0.0, [torch.tensor(T)]), (1.0, [])])
def test_no_distillation_is_exactly_cross_entropy(alpha, teachers):
    s, y = torch.tensor(S), torch.tensor([1, 2])
    loss, parts = codistillation_loss(
        logits=s, targets=y, teacher_logits=teachers, alpha=alpha, distance="kl", temperature=1.0
    )
    assert torch.equal(loss, F.cross_entropy(s, y))
    assert torch.equal(parts["task_loss"], F.cross_entropy(s, y))
    assert "distill_loss" not in parts  # a step that did not distil adds nothing to it


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_two_teachers_are_averaged_and_weighted_by_alpha(kind):
    s, y = torch.tensor(S), torch.tensor([0, 2])
    t1, t2 = torch.tensor(T), torch.tensor([[0.0, 0.0, 0.0], [5.0, -2.0, 1.0]])
    d1 = distillation_distance(s, t1, distance=kind, temperature=1.5)
    d2 = distillation_distance(s, t2, distance=kind, temperature=1.5)
    assert abs(d1 - d2) > 1e-3
    loss, parts = codistillation_loss(
        logits=s, targets=y, teacher_logits=[t1, t2], alpha=0.3, distance=kind, temperature=1.5
    )
    assert parts["distill_loss"].item() == pytest.approx(((d1 + d2) / 2).item(), rel=1e-6)
    assert loss.item() == pytest.approx(
        F.cross_entropy(s, y).item() + 0.3 * (d1 + d2).item() / 2, rel=1e-6
    )


def test_unknown_distance_raises():
    with pytest.raises(ValueError, match="js"):
        distillation_distance(torch.tensor(S), torch.tensor(T), distance="js")


def test_alpha_at_burn_in():
    assert [alpha_at(s, alpha=0.5, burn_in_steps=3) for s in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    assert alpha_at(0, alpha=0.7, burn_in_steps=0) == 0.7


def test_per_token_kl_matches_a_hand_computation():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    temperature = 2.0
    expected = 0.0
    for b in range(2):
        for i in range(3):
            p = [math.exp(v / temperature) for v in t[b, i].tolist()]
            q = [math.exp(v / temperature) for v in s[b, i].tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 6 * temperature**2
    got = distillation_distance(s, t, distance="kl", temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_per_token_task_loss_is_next_token_cross_entropy():
    torch.manual_seed(2)
    logits, targets = torch.randn(2, 4, 7), torch.randint(7, (2, 4))
    loss, parts = codistillation_loss(
        logits=logits, targets=targets, teacher_logits=[], alpha=1.0, distance="kl"
    )
    manual = (
        -sum(F.log_softmax(logits[b, i], -1)[targets[b, i]] for b in range(2) for i in range(4)) / 8
    )
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert "distill_loss" not in parts
