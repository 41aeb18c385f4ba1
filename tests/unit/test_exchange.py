"""Prediction payloads (codistill.payload_dtype), packed and unpacked without MPI."""

import numpy as np
import pytest
import torch

from hvcodistill.comm.exchange import PAYLOAD_DTYPES, pack_logits, payload_checksum, unpack_logits
from hvcodistill.losses import distillation_distance

SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


def logits(seed=0, shape=(32, 10), scale=8.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("dtype", sorted(PAYLOAD_DTYPES))
def test_round_trip_is_the_logits_rounded_to_the_payload_dtype(dtype):
    x = logits()
    payload = pack_logits(x, dtype, checksum=0x0123456789ABCDEF)
    assert payload.dtype == np.uint8 and payload.nbytes == x.numel() * SIZES[dtype] + 8
    assert payload_checksum(payload) == 0x0123456789ABCDEF
    got = unpack_logits(payload, dtype, x.shape, torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == x.shape and not got.requires_grad
    assert torch.equal(got, x.to(PAYLOAD_DTYPES[dtype]).float())  # exactly the rounded values
    if dtype == "fp32":
        assert torch.equal(got, x)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("distance", ["kl", "ce", "mse"])
def test_half_payloads_change_the_distillation_loss_by_under_one_percent(dtype, distance):
    student, teacher = logits(1), logits(2)
    exact = distillation_distance(student, teacher, distance=distance, temperature=2.0)
    wire = unpack_logits(pack_logits(teacher, dtype, 0), dtype, teacher.shape, torch.device("cpu"))
    half = distillation_distance(student, wire, distance=distance, temperature=2.0)
    assert half.item() == pytest.approx(exact.item(), rel=1e-2)


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([[1e6, -1e6, 3.0]])
    got = unpack_logits(pack_logits(x, "fp16", 0), "fp16", x.shape, torch.device("cpu"))
    assert (
        torch.isfinite(got).all() and got[0, 0] == 65504 and got[0, 1] == -65504 and got[0, 2] == 3
    )


def test_bf16_autocast_logits_travel_exactly_as_bf16():
    x = logits().to(torch.bfloat16)
    got = unpack_logits(pack_logits(x, "bf16", 0), "bf16", x.shape, torch.device("cpu"))
    assert torch.equal(got, x.float())
