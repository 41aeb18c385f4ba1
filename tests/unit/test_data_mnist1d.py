"""data.name=mnist1d: the canonical MNIST-1D generated offline, cached once for all ranks."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import hvcodistill.data.datasets as datasets
from hvcodistill.data import build_datasets

pytest.importorskip("mnist1d")


def test_the_canonical_set_generated_once_then_read(tmp_path, monkeypatch):
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    spec = build_datasets("mnist1d", path=str(tmp_path), seed=5)
    assert np.random.random() == before, "generating must leave the caller's numpy generator alone"
    assert (len(spec.train), len(spec.val), spec.input_shape, spec.num_classes) == (
        4000,
        1000,
        (1, 40),
        10,
    )
    x, y = spec.train[(0, torch.arange(4000))]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp*"))

    def no_generation():
        raise AssertionError("regenerated although the cache holds the set")

    monkeypatch.setattr(datasets, "_generate_mnist1d", no_generation)
    again = build_datasets("mnist1d", path=str(tmp_path), seed=6)  # the split ignores the run seed
    assert torch.equal(again.val.x, spec.val.x) and torch.equal(again.train.y, spec.train.y)


def test_ranks_starting_together_read_one_whole_file(tmp_path):
    code = (
        "import sys, hashlib; from hvcodistill.data import build_datasets; "
        "s = build_datasets('mnist1d', path=sys.argv[1]); "
        "print(hashlib.sha256(s.train.x.numpy().tobytes() + s.val.y.numpy().tobytes()).hexdigest())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    digests = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(digests) == 1
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1 and not list(tmp_path.glob("*.tmp*"))
