"""The exchanges (comm/exchange.py) without MPI: prediction payloads (codistill.payload_dtype and
top-k) packed and unpacked, and which exchange a config builds."""

from types import SimpleNamespace

import pytest
import torch

from hvcodistill.comm.exchange import (
    PAYLOAD_DTYPES,
    NoExchange,
    PredictionExchange,
    WeightExchange,
    build_exchange,
    pack_logits,
    pack_topk,
    payload_checksum,
    unpack_logits,
    unpack_topk,
)
from hvcodistill.comm.topk import topk_payload, topk_teacher_logits
from hvcodistill.comm.topology import Topology
from hvcodistill.config import load_config
from hvcodistill.losses import distillation_distance
from tests.helpers import ROOT

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")

SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


def logits(seed=0, shape=(32, 10), scale=8.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("dtype", sorted(PAYLOAD_DTYPES))
def test_round_trip_is_the_logits_rounded_to_the_payload_dtype(dtype):
    x = logits()
    payload = pack_logits(x, dtype, checksum=0x0123456789ABCDEF)
    assert payload.dtype == torch.uint8 and payload.numel() == x.numel() * SIZES[dtype] + 8
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


def test_top_k_payload_round_trip_through_the_exchange_packing():
    """What a peer unpacks from a top-k payload row is the rebuilt teacher, checksum intact."""
    torch.manual_seed(4)
    logits = torch.randn(3, 5, 50)
    row = pack_topk(logits, 8, "fp16", checksum=0xDEADBEEF)
    assert row.dtype == torch.uint8 and row.numel() == 3 * 5 * 8 * (2 + 4) + 8
    assert payload_checksum(row) == 0xDEADBEEF
    got = unpack_topk(row, 8, "fp16", logits.shape, torch.device("cpu"))
    expected = topk_teacher_logits(*topk_payload(logits, 8, torch.float16), 50)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def cfg_with(*overrides):
    return load_config(CONFIG, list(overrides))


def test_the_no_exchange_case_is_named():
    one_model = SimpleNamespace(topology=Topology(1, 1))
    ex = build_exchange(cfg_with().codistill, comms=one_model, model=None, batch_key=None)
    assert (
        type(ex) is NoExchange and ex.teacher_logits(step=0, x=None, logits=None, alpha=1.0) == []
    )
    assert ex.group_state_dict() == {}
    no_alpha = cfg_with(
        "codistill.mode=weights", "codistill.alpha=0", "codistill.every=2"
    ).codistill
    assert (
        type(
            build_exchange(
                no_alpha, comms=SimpleNamespace(topology=Topology(2, 2)), model=None, batch_key=None
            )
        )
        is NoExchange
    )
    assert not issubclass(PredictionExchange, NoExchange) and not issubclass(
        WeightExchange, NoExchange
    )
    # what the exchanges that send share stays on the base class
    assert "_allgather_bytes" not in vars(NoExchange) and hasattr(
        PredictionExchange, "_allgather_bytes"
    )
