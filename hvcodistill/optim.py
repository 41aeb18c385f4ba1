"""Optimizers by name (optim.name), and their learning-rate and weight-decay schedules.

Schedules are pure functions of the step (updates done so far), so a resumed run recomputes
them. Config validation reads the names registered here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from hvcodistill.startup import defer_dynamo

# before any optimizer exists: torch.optim would import torch._dynamo (hvcodistill/startup.py)
defer_dynamo()

LR_SCHEDULES = ("step", "cosine", "constant")  # optim.lr_schedule: LRSchedule.kind
UNITS = ("epochs", "steps")  # optim.unit: what to_steps takes

# optim.name -> how the optimizer is built from the model's parameters and the config's optim.*
OPTIMIZERS = {
    "sgd": lambda params, o, lr: torch.optim.SGD(
        params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    ),
    "adamw": lambda params, o, lr: torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay),
}


def goyal_lr(per_model_batch: int) -> float:
    """Goyal et al. (2017) linear scaling: 0.1 for every 256 samples of a model's batch."""
    return 0.1 * per_model_batch / 256


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from ~0 to base_lr, then step decay, cosine to 0, or constant."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "step"  # step | cosine | constant
    milestones: Sequence[int] = ()  # steps at which lr *= gamma (kind == step)
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)
        return self.base_lr


@dataclass(frozen=True)
class WDSchedule:
    """Weight decay that drops to values[i] at milestones[i] (the paper: 1e-4 -> 1e-5 -> 0)."""

    initial: float
    milestones: Sequence[int] = ()
    values: Sequence[float] = ()

    def __call__(self, step: int) -> float:
        wd = self.initial
        for m, v in zip(self.milestones, self.values):
            if step >= m:
                wd = v
        return wd


def to_steps(value: float, *, unit: str, steps_per_epoch: int) -> int:
    """A length in `unit` (epochs | steps) as a whole number of steps."""
    return int(round(value * steps_per_epoch)) if unit == "epochs" else int(value)


def build_schedules(
    optim, *, per_model_batch: int, steps_per_epoch: int, total_steps: int
) -> tuple[LRSchedule, WDSchedule]:
    """The LR and weight-decay schedules that the `optim.*` config keys describe, in steps."""
    steps = lambda v: to_steps(v, unit=optim.unit, steps_per_epoch=steps_per_epoch)  # noqa: E731
    base_lr = optim.lr if optim.lr is not None else goyal_lr(per_model_batch)
    lr = LRSchedule(
        base_lr=base_lr,
        total_steps=total_steps,
        warmup_steps=steps(optim.warmup),
        kind=optim.lr_schedule,
        milestones=tuple(steps(m) for m in optim.lr_milestones),
        gamma=optim.lr_gamma,
    )
    wd = WDSchedule(
        initial=optim.weight_decay,
        milestones=tuple(steps(m) for m in optim.wd_milestones),
        values=tuple(float(v) for v in optim.wd_values),
    )
    return lr, wd
