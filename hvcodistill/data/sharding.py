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
    batch_size: int  # per rank
    group_size: int
    group_rank: int
    n_models: int
    model_id: int
    order: str  # shared | disjoint
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size={self.batch_size} x group size {self.group_size} is larger "
                f"than the training set ({self.n_samples} samples): lower train.batch_size"
            )
        if self.order == "disjoint" and self.steps_per_epoch < self.n_models:
            raise ConfigError(
                f"data.order=disjoint needs at least codistill.n_models={self.n_models} "
                f"steps per epoch, got {self.steps_per_epoch}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // (self.group_size * self.batch_size)

    def key(self, step: int) -> tuple[int, torch.Tensor]:
        """(epoch, sample indices) of this rank's batch at `step` (updates done before it)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if self.order == "disjoint":
            j = (j + self.model_id * self.steps_per_epoch // self.n_models) % self.steps_per_epoch
        start = (j * self.group_size + self.group_rank) * self.batch_size
        return epoch, _permutation(self.n_samples, self.seed, epoch)[
            start : start + self.batch_size
        ].clone()

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
    # modulo 2**64, as torch itself takes a seed: any train.seed gives a valid one
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randperm(n, generator=g)


def batch_checksum(
    epoch: int, indices: torch.Tensor, x: torch.Tensor | None = None, y: torch.Tensor | None = None
) -> int:
    """A cheap fingerprint of a batch, compared between peers: the plan (epoch and sample indices)
    and, given the batch delivered (x, y), its content (`content_digest`), so that peers reading
    different data of the same shape disagree although they follow the same plan."""
    h = hashlib.blake2b(epoch.to_bytes(8, "little", signed=True), digest_size=8)
    h.update(indices.to(torch.int64).contiguous().numpy().tobytes())
    if x is not None and y is not None:
        h.update(content_digest(x, y))
    return int.from_bytes(h.digest(), "little")


def content_digest(x: torch.Tensor, y: torch.Tensor) -> bytes:
    """The labels and, per sample, a weighted sum of the bit patterns of every input value.

    Exact integer arithmetic, on x's device: each value's bits (folded to 32 bits) times a fixed
    pseudo-random weight, summed in int64 with no overflow (the weights are bounded by the sample
    size), so the result does not depend on summation order or thread count, and identical
    batches give identical bytes on any machine. Any change to one value, one label, or the
    order of the samples changes it (a swap of two values within a sample almost surely). The
    host copy is 16 bytes per sample: one small transfer, on a step that syncs the device anyway."""
    bits = _bits32(x.detach().reshape(len(x), -1))
    sums = (bits * _weights(bits.shape[1], bits.device)).sum(1)
    return torch.cat([sums, y.detach().reshape(-1).to(torch.int64)]).cpu().numpy().tobytes()


def _bits32(x: torch.Tensor) -> torch.Tensor:
    """Each value's bit pattern as an int64 in [0, 2**32): 4-byte dtypes as they are, 2-byte
    floats widened to float32 (exact), 8-byte values folded (high word XOR low word)."""
    if x.dtype in (torch.float16, torch.bfloat16) or x.dtype == torch.bool or x.element_size() == 1:
        x = x.float()
    x = x.contiguous()
    if x.element_size() == 4:
        return x.view(torch.int32).to(torch.int64) & 0xFFFF_FFFF
    wide = x.view(torch.int64) if x.element_size() == 8 else x.to(torch.int64)
    return (wide ^ (wide >> 32)) & 0xFFFF_FFFF


@lru_cache(maxsize=8)
def _weights(n: int, device: torch.device) -> torch.Tensor:
    """n fixed pseudo-random weights in [1, bound]: n * 2**32 * bound < 2**63, so sums never
    overflow."""
    bound = max(1, min(2**16, 2**31 // max(n, 1)))
    g = torch.Generator().manual_seed(0x6876_6364)
    return torch.randint(1, bound + 1, (n,), generator=g, dtype=torch.int64).to(device)
