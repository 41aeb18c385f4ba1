"""Token data (data/tokens.py): text windows and token files, a pure function of seed, epoch and
indices; bad files named."""

import json

import numpy as np
import pytest
import torch

from hvcodistill.data.sharding import BatchPlan
from hvcodistill.data.tokens import pydoc_corpus, text_datasets, token_datasets
from hvcodistill.errors import ConfigError


def test_text_windows_are_a_pure_function_of_seed_epoch_and_indices(tmp_path):
    spec = text_datasets("", context=32, seed=5)
    assert spec.num_classes == 256 and spec.input_shape == (32,)
    corpus = np.frombuffer(pydoc_corpus(), dtype=np.uint8)
    assert len(spec.train) > 10_000
    idx = torch.tensor([3, 0, 7])
    x, y = spec.train.fetch(2, idx)
    again = text_datasets("", context=32, seed=5).train.fetch(2, idx)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs, one later
    start = spec.train.starts(2, idx)[0]
    assert x[0].tolist() == corpus[start : start + 32].tolist()
    # another epoch shifts the tiling; another seed too
    assert spec.train.offset(2) != spec.train.offset(3) or spec.train.offset(
        2
    ) != spec.train.offset(4)
    assert not torch.equal(x, text_datasets("", context=32, seed=6).train.fetch(2, idx)[0])


def test_peers_read_identical_windows_and_a_resume_reads_the_same():
    """Predictions mode: group rank r of every model holds the same batch at every step, and the
    batch at step s depends on s alone (not on what ran before: a resume reads the same)."""
    spec = text_datasets("", context=16, seed=0)
    plans = [
        BatchPlan(
            n_samples=len(spec.train),
            batch_size=4,
            group_size=2,
            group_rank=1,
            n_models=3,
            model_id=m,
            order="shared",
            seed=0,
        )
        for m in range(3)
    ]
    for step in (0, 5, 1000):
        batches = [spec.train.fetch(*plan.key(step)) for plan in plans]
        assert all(torch.equal(b[0], batches[0][0]) for b in batches)
    fresh = BatchPlan(
        n_samples=len(spec.train),
        batch_size=4,
        group_size=2,
        group_rank=1,
        n_models=3,
        model_id=0,
        order="shared",
        seed=0,
    )
    assert torch.equal(
        spec.train.fetch(*fresh.key(1000))[0], spec.train.fetch(*plans[0].key(1000))[0]
    )


def write_tokens(root, dtype="uint16", vocab=1000, n=5000, top=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        arr = rng.integers(0, vocab, n).astype(dtype)
        if top is not None:
            arr[-1] = top
        arr.tofile(root / f"{split}.bin")
    (root / "meta.json").write_text(json.dumps({"dtype": dtype, "vocab_size": vocab}))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_files(tmp_path, dtype):
    write_tokens(tmp_path / "d", dtype, vocab=70000 if dtype == "uint32" else 1000)
    spec = token_datasets(str(tmp_path / "d"), context=64, seed=0)
    x, y = spec.train.fetch(0, torch.arange(4))
    raw = np.fromfile(tmp_path / "d" / "train.bin", dtype=dtype)
    s = spec.train.starts(0, torch.arange(1))[0]
    assert x.dtype == torch.int64 and x[0].tolist() == raw[s : s + 64].tolist()
    assert spec.num_classes == (70000 if dtype == "uint32" else 1000)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no-meta", "meta.json: no such file"),
        ("bad-dtype", "dtype 'int8'"),
        ("id-too-large", "token id 1000 >= vocab_size 1000"),
        ("odd-size", "not a whole number of uint16 tokens"),
        ("too-short", "too short for model.context=64"),
    ],
)
def test_bad_token_files_are_named(tmp_path, problem, message):
    d = tmp_path / "d"
    write_tokens(
        d,
        n=100 if problem == "too-short" else 5000,
        top=1000 if problem == "id-too-large" else None,
    )
    if problem == "no-meta":
        (d / "meta.json").unlink()
    if problem == "bad-dtype":
        (d / "meta.json").write_text(json.dumps({"dtype": "int8", "vocab_size": 10}))
    if problem == "odd-size":
        with open(d / "val.bin", "ab") as f:
            f.write(b"\0")
    with pytest.raises(ConfigError, match=message):
        token_datasets(str(d), context=64, seed=0)


def test_text_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="a directory, not a file"):
        text_datasets(str(tmp_path), context=8, seed=0)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(ConfigError, match="not UTF-8"):
        text_datasets(str(bad), context=8, seed=0)
