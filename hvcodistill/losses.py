"""Codistillation losses as pure functions of tensors: no MPI, no state.

loss_i = CE(f_i(x), y) + alpha * 1/(M-1) * sum_{j != i} D(f_i(x), f_j(x)), with every teacher
f_j(x) detached: no gradient ever reaches a peer's predictions or a teacher copy.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DISTANCES = ("kl", "ce", "mse")


def distillation_distance(
    student: torch.Tensor, teacher: torch.Tensor, *, distance: str, temperature: float = 1.0
) -> torch.Tensor:
    """Batch-mean D(student, teacher) on logits (N, C); the teacher is treated as a constant.
    Sequence logits (B, T, V) are per-token predictions: the mean is over all B x T tokens.

    kl:  T^2 * KL(softmax(t/T) || softmax(s/T)); T^2 keeps the gradient's size independent of T.
    ce:  T^2 * cross-entropy of softmax(s/T) against the soft targets softmax(t/T).
    mse: mean squared difference of the logits (per element).
    """
    student, teacher = student.flatten(0, -2), teacher.detach().to(student.dtype).flatten(0, -2)
    if distance == "mse":
        return F.mse_loss(student, teacher)
    t = float(temperature)
    log_p_student = F.log_softmax(student / t, dim=-1)
    p_teacher = F.softmax(teacher / t, dim=-1)
    if distance == "kl":
        per_sample = (p_teacher * (torch.log(p_teacher.clamp_min(1e-30)) - log_p_student)).sum(-1)
    elif distance == "ce":
        per_sample = -(p_teacher * log_p_student).sum(-1)
    else:
        raise ValueError(f"codistill.distance must be one of {DISTANCES}, got {distance!r}")
    return per_sample.mean() * t * t


def codistillation_loss(
    *,
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    alpha: float,
    distance: str,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Task cross-entropy plus alpha times the mean distance to the teachers.

    Returns the loss to back-propagate and the detached parts worth logging. For a language model
    (logits (B, T, V), targets (B, T)) both terms are means over tokens: next-token cross-entropy
    and the per-token distance.
    With no teachers or alpha == 0 this is exactly the task loss (the all-reduce baseline), and
    the parts hold no distill_loss: a step that did not distil adds nothing to it.
    """
    if logits.dim() > 2:
        logits, targets = logits.flatten(0, -2), targets.flatten()
    task = F.cross_entropy(logits, targets)
    if alpha == 0 or not teacher_logits:
        return task, {"task_loss": task.detach()}
    distill = sum(
        distillation_distance(logits, t, distance=distance, temperature=temperature)
        for t in teacher_logits
    ) / len(teacher_logits)
    return task + alpha * distill, {"task_loss": task.detach(), "distill_loss": distill.detach()}


def alpha_at(step: int, *, alpha: float, burn_in_steps: int) -> float:
    """The distillation weight at `step` (updates done so far): 0 during burn-in, then alpha."""
    return 0.0 if step < burn_in_steps else float(alpha)
