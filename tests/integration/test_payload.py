"""Half-precision prediction payloads (codistill.payload_dtype) under real ranks."""

import json

import pytest

from tests.helpers import ROOT, torch_backend
from tests.mpi.checks import ident, result

pytestmark = pytest.mark.mpi


# the torch data plane's wire (the peers' process group) in the 4-rank job, beside Horovod's mpi4py
@pytest.mark.parametrize(
    "check",
    [
        (4, "payload:fp16"),
        (6, "payload:bf16"),
        pytest.param((4, "payload:bf16/torch"), marks=torch_backend, id="payload:bf16/torch-np4"),
    ],
    ids=ident,
)
def test_payloads_are_rounded_logits_and_counted(request, check):
    np, dtype = check[0], check[1].split(":")[1].split("/")[0]
    assert result(request, check) == f"payloads ok: W={np} M={np // 2}, trainer {dtype}"


def test_half_payload_halves_the_bytes_of_a_run(ranks, tmp_path):
    """bf16 logits: per exchange each of the 4 ranks receives its one peer's B x C logits at 2
    bytes each (half of fp32's 4, which the planner tests count on the wire) and an 8-byte
    checksum; the models still learn."""
    batch, classes, steps = 32, 10, 20  # digits_codistill.yaml's batch, the digits' classes
    ranks(
        4,
        [
            "-m",
            "hvcodistill.train",
            "--config",
            str(ROOT / "configs" / "digits_codistill.yaml"),
            "train.epochs=0",
            f"train.steps={steps}",
            "codistill.burn_in_steps=0",
            "train.eval_every=0",
            "train.progress=false",
            "codistill.payload_dtype=bf16",
            f"run.dir={tmp_path}",
        ],
    )
    half = json.loads((tmp_path / "summary.json").read_text())
    assert half["exchanges"] == steps
    assert half["exchanged_bytes"] == 4 * steps * (batch * classes * 2 + 8)
    # M = 2: what the ranks sent is what their peers received
    assert sum(half["bytes"]["exchange"].values()) == half["exchanged_bytes"]
    for m in half["models"]:
        assert m["val_accuracy"] > 0.5
