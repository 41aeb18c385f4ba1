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

from hvcodistill.comm.traffic import allgather_sends, allreduce_sends
from hvcodistill.data import make_loader


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset,
    indices: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    autocast=contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the host) and labels of `indices`, the model in eval mode."""
    keys = [(0, indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
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


def shard(dataset, comms) -> torch.Tensor:
    """This rank's validation samples: group rank r of every model takes r, r + G, ..., so peers
    hold the same shard and can combine their predictions sample by sample."""
    return torch.arange(comms.group_rank, len(dataset), comms.topology.group_size)


def combine(rows: np.ndarray, counts, comms, traffic=None) -> list[float]:
    """peer_comm: gather every model's float32 `rows` for this shard, (M, *rows.shape); then
    `counts(every)` gives this shard's sums, which group_comm adds up over the group's ranks into
    whole-validation-set figures. `traffic` (optional) counts the allgather's bytes by link."""
    mine = np.ascontiguousarray(rows, dtype=np.float32)
    every = np.empty((comms.topology.n_models, *mine.shape), dtype=np.float32)
    comms.peer.Allgather(mine, every)
    if traffic is not None:
        traffic.add(
            "evaluation",
            allgather_sends(comms.peer_ranks, comms.world_rank, mine.nbytes, comms.nodes),
        )
    mine_counts = np.asarray(counts(every), dtype=np.float64)
    total = np.empty_like(mine_counts)
    comms.group.Allreduce(mine_counts, total, op=MPI.SUM)
    return total.tolist()


def evaluate(
    model,
    dataset,
    comms,
    *,
    device,
    workers: int = 0,
    autocast=contextlib.nullcontext,
    traffic=None,
) -> dict:
    """val_loss and val_accuracy of this model; ensemble_val_accuracy and disagreement of all
    models.
    `traffic` (optional) counts the bytes of the peer allgather by link."""
    indices = shard(dataset, comms)
    logits, labels = predict(
        model, dataset, indices, device=device, workers=workers, autocast=autocast
    )
    probs = F.softmax(logits, dim=-1).numpy().astype(np.float32)
    n, m, y = len(indices), comms.topology.n_models, labels.numpy()

    def counts(all_probs: np.ndarray) -> np.ndarray:
        preds = all_probs.argmax(-1) if n else np.zeros((m, 0), dtype=np.int64)
        return np.array(
            [
                F.cross_entropy(logits, labels, reduction="sum").item() if n else 0.0,
                float((preds[comms.model_id] == y).sum()),
                float((all_probs.mean(0).argmax(-1) == y).sum())
                if n
                else 0.0,  # ensemble: mean probability
                float((preds != preds[:1]).any(0).sum()),  # any model's top-1 differs
                float(n),
            ]
        )

    loss_sum, correct, ensemble_correct, disagree, count = combine(probs, counts, comms, traffic)
    count = max(count, 1.0)
    return {
        "val_loss": loss_sum / count,
        "val_accuracy": correct / count,
        "ensemble_val_accuracy": ensemble_correct / count,
        "disagreement": disagree / count,
    }


ENSEMBLE_TOP_K = 16  # candidates per model and token for the ensemble's next-token argmax


@torch.no_grad()
def token_rows(
    model: torch.nn.Module,
    dataset,
    indices: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    autocast=contextlib.nullcontext,
) -> np.ndarray:
    """Per validated token, what a language model's peers need to score the ensemble, batch by
    batch (never the (n, T, V) logits at once): float32 rows [log p(target), k top probabilities,
    their k indices] with k = min(V, ENSEMBLE_TOP_K), the first index being the top-1."""
    keys = [(0, indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    was_training = model.training
    model.eval()
    rows = []
    for x, y in make_loader(dataset, keys, workers=workers, device=device):
        with autocast():
            logits = model(x.to(device, non_blocking=True))
        logp = torch.log_softmax(logits.float(), dim=-1).flatten(0, -2)
        y = y.to(logp.device).flatten()
        top_p, top_i = logp.topk(min(logp.shape[-1], ENSEMBLE_TOP_K), dim=-1)  # sorted: top-1 first
        rows.append(
            torch.cat(
                [logp.gather(1, y[:, None]), top_p.exp(), top_i.float(), y[:, None].float()], 1
            ).cpu()
        )
    model.train(was_training)
    return torch.cat(rows).numpy() if rows else np.zeros((0, 0), dtype=np.float32)


def evaluate_lm(
    model,
    dataset,
    comms,
    *,
    device,
    workers: int = 0,
    autocast=contextlib.nullcontext,
    traffic=None,
) -> dict:
    """A language model's next-token figures over the validation windows (group rank r takes
    windows r, r+G, ..., the same on every peer):
    - val_loss (mean next-token cross-entropy), val_perplexity = exp(val_loss), val_accuracy;
    - ensemble_val_loss and ensemble_val_perplexity from the mean of the models' probabilities of
      each next token (exact), and ensemble_val_accuracy from the argmax of the mean of the models'
      top-16 probabilities per token (a token outside a model's top 16 counts 0 for it);
    - disagreement: the fraction of tokens on which the models' top-1 differ.
    Peers exchange 136 bytes per token (target log-probability, top-16 probabilities and indices,
    the target), not V floats."""
    rows = token_rows(
        model, dataset, shard(dataset, comms), device=device, workers=workers, autocast=autocast
    )
    nll, correct, ens_nll, ens_correct, disagree, count = combine(
        rows, lambda every: token_counts(every, comms.model_id), comms, traffic
    )
    count = max(count, 1.0)
    loss, ens_loss = nll / count, ens_nll / count
    return {
        "val_loss": loss,
        "val_perplexity": float(np.exp(min(loss, 700))),
        "val_accuracy": correct / count,
        "ensemble_val_loss": ens_loss,
        "ensemble_val_perplexity": float(np.exp(min(ens_loss, 700))),
        "ensemble_val_accuracy": ens_correct / count,
        "disagreement": disagree / count,
    }


def token_counts(every: np.ndarray, model_id: int) -> np.ndarray:
    """Sums over one shard from all M models' token rows (M, n, 2 + 2k), see token_rows:
    [nll of model_id, its correct, ensemble nll, ensemble correct, disagreeing tokens, tokens]."""
    m, n = every.shape[:2]
    if not n:
        return np.zeros(6)
    k = (every.shape[2] - 2) // 2
    target_logp, top_p = (
        every[:, :, 0].astype(np.float64),
        every[:, :, 1 : 1 + k].astype(np.float64),
    )
    top_i, y = every[:, :, 1 + k : 1 + 2 * k].astype(np.int64), every[0, :, -1].astype(np.int64)
    top1 = top_i[:, :, 0]
    # the ensemble's probability of each candidate: the sum over the models that have it in
    # their top-k
    cand = top_i.transpose(1, 0, 2).reshape(n, m * k)  # (n, M k) candidates
    score = np.zeros((n, m * k))
    for j in range(m):
        hit = cand[:, :, None] == top_i[j][:, None, :]  # (n, M k, k)
        score += (hit * top_p[j][:, None, :]).sum(-1)
    ensemble_top1 = cand[np.arange(n), score.argmax(1)]
    ensemble_logp = np.logaddexp.reduce(target_logp, axis=0) - np.log(m)
    return np.array(
        [
            -target_logp[model_id].sum(),
            float((top1[model_id] == y).sum()),
            -ensemble_logp.sum(),
            float((ensemble_top1 == y).sum()),
            float((top1 != top1[:1]).any(0).sum()),
            float(n),
        ]
    )


def validate(model, data, comms, plane, *, device, workers: int, autocast, traffic) -> dict:
    """Every rank at the same step: this model's figures and the ensemble's, on the model with
    its group-averaged buffers (training's own come back afterwards)."""
    run = evaluate_lm if data.sequence else evaluate
    with averaged_buffers(model, comms, plane, traffic):
        return run(
            model,
            data.val,
            comms,
            device=device,
            workers=workers,
            autocast=autocast,
            traffic=traffic,
        )


@contextlib.contextmanager
def averaged_buffers(model, comms, plane, traffic):
    """group_comm: average BatchNorm statistics so every rank evaluates (and saves) the same model;
    each rank's own statistics come back afterwards, so evaluating never changes training."""
    floating = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    own = [b.clone() for _, b in floating]
    nbytes = sum(b.numel() * b.element_size() for b in own)
    traffic.add(
        "evaluation",
        allreduce_sends(plane.algorithm, comms.group_ranks, comms.world_rank, nbytes, comms.nodes),
    )
    plane.average_([b for _, b in floating])
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, buffer), saved in zip(floating, own):
                buffer.copy_(saved)
