"""Stop every rank at one step when a loss or gradient turns NaN/Inf, and save nothing after it.

Each step, train_step folds the step's loss and its group-averaged gradients into one flag kept
on the device (`FiniteWatch.update`: a few tiny kernels, no device sync, no communication).
After Horovod's average a NaN on any rank of a group is in every rank's gradients, but the
models differ, so the ranks agree over COMM_WORLD, at steps that every rank reaches together:
- every preemption check (comm/preemption.py) carries the flag in its world all-reduce, read at
  the next check (about every 0.1 s): a NaN stops the run within two checks;
- before every checkpoint and after the last step, one blocking world all-reduce of the flag:
  so no checkpoint, final model or summary is ever written from a non-finite state.
When they agree that some rank saw one, every rank raises NonFiniteError at the same step; the
process exits EXIT_NON_FINITE (4) with one line naming the model, the step and the newest
checkpoint. With fp16 loss scaling the gradients are not checked (an overflow there is the
scaler's business: it skips that step), the loss is.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

_NONE = 2**62           # "no non-finite step yet"


class NonFiniteError(RuntimeError):
    """Raised on every rank at the same step; the message is the same on all of them."""


class FiniteWatch:
    """The first step (0-based, as train_step counts) at which this rank saw a non-finite loss or
    averaged gradient, kept on the device so that a step adds no sync."""

    def __init__(self, device: torch.device):
        self._first = torch.full((), _NONE, dtype=torch.int64, device=device)

    def update(self, step: int, loss: torch.Tensor, parameters=None) -> None:
        probe = loss.detach().float()
        grads = [p.grad for p in parameters if p.grad is not None] if parameters is not None else []
        if grads:
            # NaN or Inf anywhere makes its tensor's reduction non-finite. On a GPU, max |g| per
            # tensor in one fused kernel; on the CPU (where that kernel is slow) a plain sum per
            # tensor, the cheapest pass: a finite sum that overflows float32 (gradients near 1e31
            # and more, a diverged model) also counts as non-finite.
            reduced = torch._foreach_norm(grads, math.inf) if grads[0].is_cuda else [g.sum() for g in grads]
            probe = probe + torch.stack([r if r.dtype == torch.float32 else r.float() for r in reduced]).sum()
        self._first = torch.minimum(self._first, torch.where(torch.isfinite(probe), _NONE, step))

    def first(self) -> int | None:
        """The step, or None; reads the device (a sync): only at agreement points."""
        value = int(self._first)
        return None if value == _NONE else value


def stop_if_non_finite(tr, step: int, *, known: bool = False) -> None:
    """Every rank at the same `step` (updates done): agree over COMM_WORLD whether any rank saw a
    non-finite value; if one did, raise NonFiniteError on all. `known`: the preemption check has
    already agreed that one did (the gather below says where)."""
    from mpi4py import MPI

    world = tr.comms.world
    first = tr.finite.first()
    # COMM_WORLD: did any rank see one? One int per rank, only before checkpoints and at the end.
    if not known and not world.allreduce(first is not None, op=MPI.LOR):
        return
    # COMM_WORLD: which models, from which step: for the message (every rank builds the same one)
    seen = [(m, r, s) for r, (m, s) in enumerate(world.allgather((tr.comms.model_id, first))) if s is not None]
    s0 = min(s for _, _, s in seen)
    models = sorted({m for m, _, s in seen if s == s0})
    rank = min(r for _, r, s in seen if s == s0)
    newest = newest_checkpoint(tr.run_dir, tr.comms.topology.n_models)
    where = (f"newest checkpoint: step {newest} in {tr.run_dir / 'checkpoints'}; run the same command "
             "again to resume from it" if newest is not None else "no checkpoint was written: the run "
             "starts again from step 0")
    raise NonFiniteError(
        f"non-finite loss or gradient (NaN/Inf) in model {', '.join(map(str, models))} at step {s0} "
        f"(first seen on world rank {rank}); every rank stopped at step {step}, saving nothing; {where} (with the same settings it will diverge again: lower optim.lr "
        "or check the data, in a new run.dir)")


def newest_checkpoint(run_dir: Path, n_models: int) -> int | None:
    """The newest step that every model has a checkpoint and sidecar for (names only)."""
    from hvcodistill.training.checkpoint import model_dir

    per_model = []
    for m in range(n_models):
        d = model_dir(Path(run_dir), m)
        per_model.append({p.stem for p in d.glob("step_*.json") if p.with_suffix(".pt").is_file()})
    common = set.intersection(*per_model) if per_model else set()
    return max((int(s.split("_")[1]) for s in common), default=None)
