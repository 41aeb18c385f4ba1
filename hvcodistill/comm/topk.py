"""Top-k predictions: a compact payload for large vocabularies (or 1000 classes).

A language model's predictions are B x T x V logits; with V = 50k a full exchange is gigabytes.
Per row (a token, or a sample), the teacher sends only its k largest log-probabilities, in the
payload dtype (fp16 by default), and their indices as int32: 6k bytes instead of 4V.

The receiver rebuilds a full distribution: the k sent log-probabilities stay as they are, and the
mass they leave, 1 - sum(exp(top-k)), is spread evenly over the other V - k entries (so the
distribution sums to one, the KL stays finite for every student, and the teacher says nothing
about the order of the entries it did not send). The rebuilt log-probabilities are returned as
the teacher's logits: softmax(log p / T) is exactly the teacher's softmax at temperature T when
k = V, so every distillation distance works unchanged and k = V equals the full exchange up to
the payload's rounding.
"""

from __future__ import annotations

import math

import torch

INDEX_DTYPE = torch.int32


def topk_payload(
    logits: torch.Tensor, k: int, value_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (..., k): the k largest log-probabilities of each row, and where."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= {logits.shape[-1]}, got {k}")
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    values, indices = logp.topk(k, dim=-1, sorted=False)
    if value_dtype == torch.float16:
        values = values.clamp_min(
            torch.finfo(torch.float16).min
        )  # -inf and tiny probabilities saturate
    return values.to(value_dtype), indices.to(INDEX_DTYPE)


def topk_teacher_logits(
    values: torch.Tensor, indices: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Float32 log-probabilities (..., V) rebuilt from a top-k payload (the rest spread evenly)."""
    values = values.float()
    k = values.shape[-1]
    out_shape = (*values.shape[:-1], vocab_size)
    if k == vocab_size:
        rest = torch.full(out_shape, -math.inf, device=values.device)
    else:
        kept = torch.logsumexp(values, dim=-1, keepdim=True).clamp_max(0.0)  # log of the mass sent
        # log((1 - exp(kept)) / (V - k)), computed stably; a teacher certain of its top-k leaves
        # ~0 mass: clamp to the smallest normal float so the log stays finite
        left = torch.log(
            (-torch.expm1(kept)).clamp_min(torch.finfo(torch.float32).tiny)
        ) - math.log(vocab_size - k)
        rest = left.expand(out_shape).clone()
    return rest.scatter_(-1, indices.long(), values)


def topk_bytes(rows: int, k: int, value_dtype: torch.dtype = torch.float16) -> int:
    """Payload bytes for `rows` rows (tokens or samples): k values and k int32 indices each."""
    return rows * k * (torch.finfo(value_dtype).bits // 8 + torch.iinfo(INDEX_DTYPE).bits // 8)


__all__ = ["topk_payload", "topk_teacher_logits", "topk_bytes", "INDEX_DTYPE"]
