"""Batch plans (data/sharding.py): who reads which samples at which step, and the batch
checksum and content digest that peers compare."""

import math

import pytest
import torch

from hvcodistill.data.sharding import BatchPlan, batch_checksum, content_digest
from hvcodistill.errors import ConfigError

N, B, G = 103, 4, 3  # 103 // 12 = 8 steps per epoch, 7 samples dropped


def plan(rank=0, model=0, order="shared", m=2, **kw):
    args = dict(
        n_samples=N,
        batch_size=B,
        group_size=G,
        group_rank=rank,
        n_models=m,
        model_id=model,
        order=order,
        seed=5,
    )
    args.update(kw)
    return BatchPlan(**args)


def epoch_indices(model, order, epoch=0):
    p = plan(model=model, order=order)
    steps = range(epoch * p.steps_per_epoch, (epoch + 1) * p.steps_per_epoch)
    return [i for r in range(G) for s in steps for i in plan(r, model, order).key(s)[1].tolist()]


def test_steps_per_epoch():
    assert plan().steps_per_epoch == 8
    assert plan(n_samples=96).steps_per_epoch == 8 and plan(n_samples=95).steps_per_epoch == 7


@pytest.mark.parametrize("order", ["shared", "disjoint"])
def test_group_covers_epoch_once(order):
    for model in (0, 1):
        idx = epoch_indices(model, order)
        assert len(idx) == len(set(idx)) == N - N % (G * B) == 96
        assert set(idx) <= set(range(N))
    assert set(epoch_indices(0, order)) == set(epoch_indices(1, order))


def test_shared_peers_get_identical_keys():
    for r in range(G):
        for s in range(20):
            e0, i0 = plan(r, 0).key(s)
            e1, i1 = plan(r, 1).key(s)
            assert e0 == e1 and torch.equal(i0, i1) and len(i0) == B


@pytest.mark.parametrize("m", [2, 3])
def test_disjoint_peers_are_disjoint_every_step(m):
    for r in range(G):
        for s in range(plan().steps_per_epoch * 2):
            sets = [set(plan(r, k, "disjoint", m).key(s)[1].tolist()) for k in range(m)]
            assert sum(map(len, sets)) == len(set().union(*sets)) == m * B


def test_new_epoch_reshuffles():
    p = plan()
    e0, a = p.key(0)
    e1, b = p.key(p.steps_per_epoch)
    assert (e0, e1) == (0, 1) and not torch.equal(a, b)
    assert epoch_indices(0, "shared", 0) != epoch_indices(0, "shared", 1)


def test_keys_range():
    p = plan(1, 1, "disjoint")
    ks = p.keys(5, 19)
    got = list(ks)
    assert len(ks) == len(got) == 14
    for s, (e, idx) in zip(range(5, 19), got):
        e2, idx2 = p.key(s)
        assert e == e2 and torch.equal(idx, idx2)
    assert [e for e, _ in got] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    assert len(list(ks)) == 14  # re-iterable


def test_batch_too_large():
    with pytest.raises(ConfigError, match="train.batch_size"):
        plan(batch_size=40)


def test_checksum():
    idx = torch.tensor([3, 1, 4, 1, 5])
    c = batch_checksum(2, idx)
    assert (
        c
        == batch_checksum(2, idx.clone())
        == batch_checksum(2, torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32))
    )
    assert c != batch_checksum(2, torch.tensor([3, 1, 4, 1, 6]))
    assert c != batch_checksum(3, idx)


def test_keys_are_copies_not_views_of_the_epoch_order():
    plan = BatchPlan(
        n_samples=64,
        batch_size=4,
        group_size=2,
        group_rank=0,
        n_models=1,
        model_id=0,
        order="shared",
        seed=0,
    )
    _, first = plan.key(0)
    first.fill_(-1)
    assert (plan.key(0)[1] >= 0).all()


def batch(seed=0, n=8, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(10, (n,), generator=g)


def test_batch_checksum_covers_content_delivered_under_one_plan():
    x, y = batch()
    idx = torch.arange(8)
    same = batch_checksum(0, idx, x=x.clone(), y=y.clone())
    assert same == batch_checksum(0, idx, x=x, y=y)
    one_ulp = x.clone()
    one_ulp.view(-1)[17] = torch.nextafter(one_ulp.view(-1)[17], torch.tensor(math.inf))
    label = y.clone()
    label[3] = (label[3] + 1) % 10
    swapped_samples = x[[1, 0, *range(2, 8)]]
    swapped_values = x.clone().view(8, -1)
    swapped_values[0, [0, 1]] = swapped_values[0, [1, 0]]
    variants = [(one_ulp, y), (x, label), (swapped_samples, y), (swapped_values.view_as(x), y)]
    sums = {batch_checksum(0, idx, x=a, y=b) for a, b in variants}
    assert same not in sums and len(sums) == len(variants)


def test_content_digest_is_exact_whatever_the_threads_and_dtype():
    x, y = batch(n=16, shape=(3, 32, 32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = content_digest(x, y)
        torch.set_num_threads(max(2, threads))
        assert content_digest(x, y) == one
    finally:
        torch.set_num_threads(threads)
    assert len(one) == 16 * 16  # one int64 per sample and per label
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64):
        assert content_digest(x.to(dtype), y) == content_digest(x.to(dtype).clone(), y)
    # large samples: the weights shrink so that the int64 sums cannot overflow
    big = torch.full((2, 3, 224, 224), -float("nan"))
    assert content_digest(big, torch.zeros(2)) == content_digest(big.clone(), torch.zeros(2))
