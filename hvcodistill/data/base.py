"""What every data source builds on: batch datasets keyed by ``(epoch, indices)``, the spec a
builder returns, the seed mixer, and the loader that fetches batches by key.

Every random draw (synthetic samples, augmentation, token offsets) is a pure function of (seed,
epoch or split, sample index), so peers fetching the same key get bit-identical batches and a
resumed run sees the same batches again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Batch = tuple[torch.Tensor, torch.Tensor]


def mix_seed(*parts: int) -> int:
    """One 64-bit seed from several integers (numpy's SeedSequence hash: nearby inputs give
    unrelated seeds, unlike ``seed + epoch + index``)."""
    entropy = [int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``ds[(epoch, indices)] -> (x, y)`` with
    x float32 (B, *input_shape) and y int64 (B,). Used through a DataLoader with batch_size=None
    and a sampler that yields keys."""

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, epoch: int, indices: torch.Tensor) -> Batch:
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, torch.Tensor | Sequence[int]]) -> Batch:
        epoch, indices = key
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        # Lazily generated sets would happily make up samples past the end; refuse like a list.
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"batch indices must lie in [0, {len(self)})")
        return self.fetch(int(epoch), indices)


@dataclass
class DataSpec:
    train: BatchDataset
    val: BatchDataset
    input_shape: tuple[int, ...]  # per-sample shape, e.g. (1, 8, 8); token windows: (context,)
    num_classes: int  # token data: the vocabulary size
    sequence: bool = False  # token windows: targets (N, T), logits (N, T, V)


def make_loader(dataset: BatchDataset, keys, *, workers: int, device: torch.device) -> DataLoader:
    """Batches by key. Workers start by forkserver (forking after MPI_Init is unsafe on InfiniBand)
    and an own generator keeps the loader from drawing on the global RNG (exact resume)."""
    return DataLoader(
        dataset,
        sampler=keys,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        multiprocessing_context="forkserver" if workers > 0 else None,
        generator=torch.Generator(),
    )


__all__ = ["Batch", "BatchDataset", "DataSpec", "make_loader", "mix_seed"]
