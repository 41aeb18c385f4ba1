"""Top-k teacher payloads (comm/topk.py): k = V is the full exchange; the rest spread evenly."""

import pytest
import torch

from hvcodistill.comm.topk import topk_bytes, topk_payload, topk_teacher_logits
from hvcodistill.losses import distillation_distance


@pytest.mark.parametrize("distance", ["kl", "ce", "mse"])
def test_topk_with_k_equal_to_the_vocabulary_equals_the_full_exchange(distance):
    torch.manual_seed(3)
    student = torch.randn(2, 5, 40, requires_grad=True)
    teacher = torch.randn(2, 5, 40) * 3
    values, indices = topk_payload(teacher, 40, torch.float32)
    rebuilt = topk_teacher_logits(values, indices, 40)
    if distance == "mse":
        # mse compares logits, and logits are defined up to a shift: the payload holds log-probs
        teacher = torch.log_softmax(teacher, -1)
    full = distillation_distance(student, teacher, distance=distance, temperature=2.0)
    top = distillation_distance(student, rebuilt, distance=distance, temperature=2.0)
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    (g_full,) = torch.autograd.grad(full, student)
    (g_top,) = torch.autograd.grad(top, student)
    torch.testing.assert_close(g_top, g_full, rtol=1e-4, atol=1e-7)


def test_topk_keeps_the_top_and_spreads_the_rest_evenly():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    values, indices = topk_payload(logits, 2)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32
    assert sorted(indices[0].tolist()) == [0, 1]
    p = topk_teacher_logits(values, indices, 5).exp()
    full = torch.softmax(logits, -1)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert p[0, :2].tolist() == pytest.approx(full[0, :2].tolist(), rel=1e-3)
    rest = (1 - full[0, :2].sum()) / 3
    assert p[0, 2:].tolist() == pytest.approx([rest.item()] * 3, rel=1e-2)
    # a teacher sure of its top-k leaves no mass: the rest stays finite, not -inf or nan
    sure = topk_teacher_logits(*topk_payload(torch.tensor([[100.0, -100.0, -100.0]]), 1), 3)
    assert torch.isfinite(sure).all()
    assert topk_bytes(rows=8 * 1024, k=32) == 8 * 1024 * 32 * 6
