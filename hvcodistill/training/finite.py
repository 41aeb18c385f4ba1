"""Stop every rank at one step when a loss or gradient turns NaN/Inf, and save nothing after it.

A step costs nothing here: train_step hands its loss to `FiniteWatch.update`, which keeps it (no
kernel, no device sync, no communication). The kept losses are checked when the ranks agree:
- every preemption check (comm/preemption.py) carries the flag in its world all-reduce, read at
  the next check (about every 0.1 s): a NaN stops the run within two checks;
- before every checkpoint and after the last step, one blocking world all-reduce of the flag:
  so no checkpoint, final model or summary is ever written from a non-finite state.
A non-finite gradient shows without being looked at each step: the update it makes leaves a
NaN/Inf in the weights (SGD, momentum and AdamW all pass it on), so the next step's loss is
non-finite. So the preemption checks (about every 0.1 s, i.e. every step once steps take 0.1 s)
look at the kept losses only, with no pass over every parameter; the agreements before a
checkpoint and after the last step also look at the parameters, since no later loss shows what
the newest update did. Either names the step. (A pass over every gradient each step
would cost a small model a large share of its step.)
After the group's gradient average a NaN on any rank of a group is in every rank's gradients,
but the models differ, so the ranks agree over COMM_WORLD, at steps that every rank reaches
together.
When they agree that some rank saw one, every rank raises NonFiniteError at the same step; the
process exits EXIT_NON_FINITE (4) with one line naming the model, the step and the newest
checkpoint. With fp16 loss scaling an overflowing gradient is the scaler's business (it skips
that step and the weights stay finite).
"""

from __future__ import annotations

from pathlib import Path

import torch
from mpi4py import MPI

from hvcodistill.errors import NonFiniteError
from hvcodistill.training.checkpoint import model_dir

_NONE = 2**62  # "no non-finite step yet"


class FiniteWatch:
    """The first step (0-based, as train_step counts) whose loss, or the update it made, was
    non-finite on this rank. A step only keeps its loss; `first()` looks (a device sync)."""

    FOLD = 1024  # kept losses are reduced on the device every FOLD steps

    def __init__(self, device: torch.device, parameters=()):
        self.device = device
        self.parameters = list(parameters)  # the model's weights, looked at by first()
        self._first = torch.full((), _NONE, dtype=torch.int64, device=device)
        self._start = 0  # the step of _losses[0]: steps come one by one
        self._losses: list[torch.Tensor] = []
        self._last = -1  # the newest step handed in

    def update(self, step: int, loss: torch.Tensor) -> None:
        """Keep this step's loss until the next check: no sync (a few kernels every FOLD steps)."""
        if not self._losses:
            self._start = step
        self._losses.append(loss.detach())
        self._last = step
        if len(self._losses) == self.FOLD:
            self._fold()

    def _fold(self) -> None:
        """The first non-finite kept loss, folded into the device-side minimum; no sync."""
        if not self._losses:
            return
        finite = torch.isfinite(torch.stack(self._losses).float())
        steps = torch.arange(len(self._losses), device=finite.device) + self._start
        self._first = torch.minimum(
            self._first, torch.where(finite, _NONE, steps).min().to(self._first.device)
        )
        self._losses = []

    def seen(self) -> bool:
        """Has a kept loss been non-finite? (a device sync: the preemption checks ask)"""
        return self.first(weights=False) is not None

    def first(self, *, weights: bool = True) -> int | None:
        """The step, or None; reads the device (a sync): only at agreement points. `weights`: also
        look at the parameters for what the newest update did (a pass over every weight)."""
        self._fold()
        value = int(self._first)
        if weights and value == _NONE and self.parameters and self._last >= 0:
            # every loss so far finite: a NaN/Inf in the weights came from the newest update's
            # gradient (an older one would have made a later loss non-finite)
            sums = torch.stack([p.detach().sum(dtype=torch.float32) for p in self.parameters])
            if not bool(torch.isfinite(sums.sum())):
                value = self._last
                self._first.fill_(value)
        return None if value == _NONE else value


def stop_if_non_finite(
    finite: FiniteWatch, comms, run_dir: Path, step: int, *, known: bool = False
) -> None:
    """Every rank at the same `step` (updates done): agree over COMM_WORLD whether any rank saw a
    non-finite value; if one did, raise NonFiniteError on all. `known`: the preemption check has
    already agreed that one did (the gather below says where)."""
    world = comms.world
    first = finite.first()
    # COMM_WORLD: did any rank see one? One int per rank, only before checkpoints and at the end.
    if not known and not world.allreduce(first is not None, op=MPI.LOR):
        return
    # COMM_WORLD: which models, from which step: for the message (every rank builds the same one)
    seen = [
        (m, r, s)
        for r, (m, s) in enumerate(world.allgather((comms.model_id, first)))
        if s is not None
    ]
    s0 = min(s for _, _, s in seen)
    models = sorted({m for m, _, s in seen if s == s0})
    rank = min(r for _, r, s in seen if s == s0)
    newest = newest_checkpoint(run_dir, comms.topology.n_models)
    where = (
        f"newest checkpoint: step {newest} in {run_dir / 'checkpoints'}; run the same command "
        "again to resume from it"
        if newest is not None
        else "no checkpoint was written: the run starts again from step 0"
    )
    raise NonFiniteError(
        f"non-finite loss or gradient (NaN/Inf) in model {', '.join(map(str, models))} "
        f"at step {s0} "
        f"(first seen on world rank {rank}); every rank stopped at step {step}, saving nothing; "
        f"{where} (with the same settings it will diverge again: lower optim.lr "
        "or check the data, in a new run.dir)",
        agreed=True,
    )


def newest_checkpoint(run_dir: Path, n_models: int) -> int | None:
    """The newest step that every model has a checkpoint and sidecar for (names only)."""
    per_model = []
    for m in range(n_models):
        d = model_dir(Path(run_dir), m)
        per_model.append({p.stem for p in d.glob("step_*.json") if p.with_suffix(".pt").is_file()})
    common = set.intersection(*per_model) if per_model else set()
    return max((int(s.split("_")[1]) for s in common), default=None)
