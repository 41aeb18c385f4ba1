"""Integrity without MPI: the batch content digest, the data fingerprint, the non-finite watch,
per-rank dropout streams and the dropout option (issue 10, points 2, 4, 6)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hvcodistill.config import load_config
from hvcodistill.data import build_datasets
from hvcodistill.data.fingerprint import data_fingerprint
from hvcodistill.data.sharding import batch_checksum, content_digest
from hvcodistill.errors import ConfigError
from hvcodistill.models import build_model
from hvcodistill.training.finite import FiniteWatch, newest_checkpoint


def batch(seed=0, n=8, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(10, (n,), generator=g)


# ---------------------------------------------------------------- point 2: what peers compare
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


def write_npz(path, seed, n=64, shape=(1, 4, 4)):
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.normal(size=(n, *shape)).astype(np.float32),
        y_train=np.arange(n) % 3,
        x_val=rng.normal(size=(16, *shape)).astype(np.float32),
        y_val=np.arange(16) % 3,
    )
    return str(path)


def test_data_fingerprint_is_content_not_place(tmp_path):
    a = write_npz(tmp_path / "a.npz", 0)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    a2 = write_npz(copy / "a.npz", 0)
    b = write_npz(tmp_path / "b.npz", 1)  # same shapes and labels, other values
    fa, fa2, fb = (data_fingerprint(build_datasets("npz", path=p)) for p in (a, a2, b))
    assert fa == fa2 and fa != fb
    digits = data_fingerprint(build_datasets("digits"))
    assert digits == data_fingerprint(build_datasets("digits"))
    syn = {"shape": [1, 4, 4], "num_classes": 3, "train_size": 8, "val_size": 4}
    assert data_fingerprint(build_datasets("synthetic", seed=0, synthetic=syn)) != data_fingerprint(
        build_datasets("synthetic", seed=1, synthetic=syn)
    )


def test_data_fingerprint_of_an_image_folder_is_its_file_list_and_sizes(tmp_path):
    from PIL import Image

    def folder(root, side_of_last=8, name_of_last="1.png"):
        for split in ("train", "val"):
            for c in ("cat", "dog"):
                (root / split / c).mkdir(parents=True)
                for side, name in ((8, "0.png"), (side_of_last, name_of_last)):
                    pixels = np.random.default_rng(side).integers(
                        0, 255, (side, side, 3), dtype=np.uint8
                    )
                    Image.fromarray(pixels).save(root / split / c / name)
        return str(root)

    paths = [
        folder(tmp_path / "one"),
        folder(tmp_path / "copy"),
        folder(tmp_path / "size", side_of_last=16),
        folder(tmp_path / "name", name_of_last="2.png"),
    ]
    f = [data_fingerprint(build_datasets("imagenet", path=p)) for p in paths]
    assert f[0] == f[1] and len({f[0], f[2], f[3]}) == 3


# ---------------------------------------------------------------- point 4: dropout
def test_dropout_option_and_its_range():
    m = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16, 8], dropout=0.5)
    assert [type(layer).__name__ for layer in m].count("Dropout") == 2
    plain = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16, 8])
    assert "Dropout" not in [type(layer).__name__ for layer in plain]
    assert load_config(None, ["model.dropout=0.3", "train.steps=1"]).model.dropout == 0.3
    for bad in (
        ["model.dropout=1"],
        ["model.dropout=-0.1"],
        ["model.dropout=.nan"],
        ["model.dropout=0.2", "model.name=cnn"],
    ):
        with pytest.raises(ConfigError, match="model.dropout"):
            load_config(None, [*bad, "train.steps=1"])


# ---------------------------------------------------------------- point 6: non-finite values
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


def test_preemption_check_carries_the_non_finite_flag():
    from mpi4py import MPI

    from hvcodistill.comm.preemption import PreemptionGuard

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
