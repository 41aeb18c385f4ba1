"""A content fingerprint of a data set, computed once at start-up and compared between ranks.

Every rank reads its data from its own disk (node-local copies are common), so two ranks can
hold sets of the same shape but different content; they would then train, and in predictions
mode distil, across different samples with no error. The fingerprint is a hash of what the
set holds, not of where it lies, so copies of the same files at different paths agree:
- in-memory sets (digits, mnist1d, npz): every value of the train and validation arrays;
- CIFAR-10: its arrays and labels (torchvision holds them in memory);
- ImageFolder-like lazy sets: the file list (paths relative to the root), each file's size and
  class (one stat per file: no image is read);
- synthetic sets: their generator's parameters and prototype.
A data set of another kind may define `fingerprint() -> bytes`; otherwise its type and length
stand in (documented, weaker). No MPI here: train.check_same_data compares the results.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from hvcodistill.data.datasets import (
    DataSpec,
    SyntheticBatchDataset,
    TensorBatchDataset,
    TransformBatchDataset,
)


def data_fingerprint(data: DataSpec) -> str:
    """Hex digest of the train and validation sets' content, shape and classes. May raise OSError
    (a file of a lazy set vanished or is unreadable)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(
        repr((tuple(data.input_shape), data.num_classes, len(data.train), len(data.val))).encode()
    )
    for split in (data.train, data.val):
        _update(h, split)
    return h.hexdigest()


def _update(h, ds) -> None:
    h.update(type(ds).__name__.encode())
    if hasattr(ds, "fingerprint"):
        h.update(ds.fingerprint())
    elif isinstance(ds, TensorBatchDataset):
        _array(h, ds.x)
        _array(h, ds.y)
    elif isinstance(ds, SyntheticBatchDataset):
        h.update(repr((ds.shape, ds.num_classes, ds.size, ds.seed, ds.stream)).encode())
        _array(h, ds._base)
    elif isinstance(ds, TransformBatchDataset):
        h.update(repr(ds.seed).encode())
        base = ds.base
        if hasattr(base, "samples") and hasattr(base, "root"):  # ImageFolder: files, not pixels
            for path, label in base.samples:
                rel = os.path.relpath(path, base.root)
                h.update(f"{rel}\0{os.path.getsize(path)}\0{label}\n".encode())
        elif hasattr(base, "data") and hasattr(base, "targets"):  # CIFAR-10: arrays in memory
            _array(h, base.data)
            _array(h, base.targets)
        else:
            h.update(repr((type(base).__name__, len(base))).encode())
    else:
        h.update(repr(len(ds)).encode())


def _array(h, values) -> None:
    a = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    a = np.ascontiguousarray(a)
    h.update(repr((a.dtype.str, a.shape)).encode())
    h.update(memoryview(a).cast("B"))
