"""Validation of each model, of the models' ensemble, and of how often the models disagree.

Group rank r of every model evaluates the same shard (samples r, r+G, ...), so peers can combine
their predictions sample by sample; the group then sums its shards into whole-set figures.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from hvcodistill.comm.traffic import allgather_sends
from hvcodistill.data import make_loader


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, indices: torch.Tensor, *, device: torch.device,
            batch_size: int = 256, workers: int = 0, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the host) and labels of `indices`, the model in eval mode."""
    keys = [(0, indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    loader = make_loader(dataset, keys, workers=workers, device=device)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with autocast():
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(y)
    model.train(was_training)
    if not logits:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model, dataset, comms, *, device, workers: int = 0, autocast=contextlib.nullcontext,
             traffic=None) -> dict:
    """val_loss and val_accuracy of this model; ensemble_val_accuracy and disagreement of all models.
    `traffic` (optional) counts the bytes of the peer allgather by link."""
    g, r, m = comms.topology.group_size, comms.group_rank, comms.topology.n_models
    indices = torch.arange(r, len(dataset), g)
    logits, labels = predict(model, dataset, indices, device=device, workers=workers, autocast=autocast)
    probs = F.softmax(logits, dim=-1).numpy().astype(np.float32)
    n, c = len(indices), (logits.shape[1] if len(logits) else 0)
    # peer_comm: every peer evaluated the same shard; gather all models' probabilities for it.
    all_probs = np.empty((m, n, c), dtype=np.float32)
    comms.peer.Allgather(np.ascontiguousarray(probs), all_probs)
    if traffic is not None:
        traffic.add("evaluation", allgather_sends(comms.peer_ranks, comms.world_rank, probs.nbytes, comms.nodes))
    preds = all_probs.argmax(-1) if n else np.zeros((m, 0), dtype=np.int64)
    y = labels.numpy()
    counts = np.array([
        F.cross_entropy(logits, labels, reduction="sum").item() if n else 0.0,
        float((preds[comms.model_id] == y).sum()),
        float((all_probs.mean(0).argmax(-1) == y).sum()) if n else 0.0,   # ensemble: mean probability
        float((preds != preds[:1]).any(0).sum()),                         # any model's top-1 differs
        float(n),
    ])
    # group_comm: add up the shards of the group's ranks into whole-validation-set counts.
    total = np.empty_like(counts)
    comms.group.Allreduce(counts, total, op=MPI.SUM)
    loss_sum, correct, ensemble_correct, disagree, count = total.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count,
            "ensemble_val_accuracy": ensemble_correct / count, "disagreement": disagree / count}
