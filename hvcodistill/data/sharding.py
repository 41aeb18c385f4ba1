"""Which samples each rank takes at each step: a pure function of (seed, epoch, step, rank).

Every epoch is one random permutation of the training set, shared by all ranks. A model's batch at
step j of the epoch is the j-th block of G x B samples; group rank r takes its B-sample slice, so
the group covers the block exactly once. With `shared` order peers (same group rank, different
models) take the very same slice; with `disjoint` order model m is rotated by m/M of an epoch,
so at every step peers hold disjoint samples and each model still sees the whole set per epoch.
The last incomplete block is dropped: every rank takes the same number of steps.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import torch

from hvcodistill.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    n_samples: int
    batch_size: int          # per rank
    group_size: int
    group_rank: int
    n_models: int
    model_id: int
    order: str               # shared | disjoint
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size={self.batch_size} x group size {self.group_size} is larger than the "
                f"training set ({self.n_samples} samples): lower train.batch_size")
        if self.order == "disjoint" and self.steps_per_epoch < self.n_models:
            raise ConfigError(f"data.order=disjoint needs at least codistill.n_models={self.n_models} "
                              f"steps per epoch, got {self.steps_per_epoch}")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // (self.group_size * self.batch_size)

    def key(self, step: int) -> tuple[int, torch.Tensor]:
        """(epoch, sample indices) of this rank's batch at `step` (updates done before it)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if self.order == "disjoint":
            j = (j + self.model_id * self.steps_per_epoch // self.n_models) % self.steps_per_epoch
        start = (j * self.group_size + self.group_rank) * self.batch_size
        return epoch, _permutation(self.n_samples, self.seed, epoch)[start:start + self.batch_size].clone()

    def keys(self, start: int, stop: int):
        """The keys of steps [start, stop): the sampler a DataLoader iterates."""
        return _Keys(self, start, stop)


class _Keys:
    """A re-iterable, picklable sequence of batch keys (DataLoader sampler)."""

    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return (self.plan.key(s) for s in range(self.start, self.stop))


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_checksum(epoch: int, indices: torch.Tensor) -> int:
    """A cheap fingerprint of a batch (its epoch and sample indices), compared between peers."""
    h = hashlib.blake2b(epoch.to_bytes(8, "little", signed=True), digest_size=8)
    h.update(indices.to(torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little")
