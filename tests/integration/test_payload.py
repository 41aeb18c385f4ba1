"""Half-precision prediction payloads (codistill.payload_dtype) under real ranks."""

import json

import pytest

from tests.helpers import ROOT
from tests.mpi.checks import ident, result

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("check", [(4, "payload:fp16"), (6, "payload:bf16")], ids=ident)
def test_payloads_are_rounded_logits_and_counted(request, check):
    np, dtype = check[0], check[1].split(":")[1]
    assert result(request, check) == f"payloads ok: W={np} M={np // 2}, trainer {dtype}"


def test_half_payload_halves_the_bytes_of_a_run(ranks, tmp_path):
    summaries = {}
    for dtype in ("fp32", "bf16"):
        ranks(
            4,
            [
                "-m",
                "hvcodistill.train",
                "--config",
                str(ROOT / "configs" / "digits_codistill.yaml"),
                "train.epochs=0",
                "train.steps=20",
                "codistill.burn_in_steps=0",
                "train.eval_every=0",
                "train.progress=false",
                f"codistill.payload_dtype={dtype}",
                f"run.dir={tmp_path / dtype}",
            ],
        )
        summaries[dtype] = json.loads((tmp_path / dtype / "summary.json").read_text())
    full, half = summaries["fp32"], summaries["bf16"]
    assert full["exchanges"] == half["exchanges"] == 20
    # per exchange each of the 4 ranks receives its one peer's B x C logits and an 8-byte checksum
    checksums = 4 * 20 * 8
    assert half["exchanged_bytes"] - checksums == (full["exchanged_bytes"] - checksums) // 2
    for s in (full, half):  # M = 2: what the ranks sent is what their peers received
        assert sum(s["bytes"]["exchange"].values()) == s["exchanged_bytes"]
    for m in half["models"]:
        assert m["val_accuracy"] > 0.5
