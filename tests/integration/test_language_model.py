"""A language model codistilled end to end under real MPI ranks: transformer_lm on CPython's help
text (data.name=text), 4 ranks (M=2, G=2), in both modes and with a top-k prediction payload."""

import json
import math

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.mpi

TINY = [
    "data.name=text",
    "model.name=transformer_lm",
    "model.layers=1",
    "model.heads=2",
    "model.width=32",
    "model.context=32",
    "optim.name=adamw",
    "optim.lr=0.01",
    "optim.weight_decay=0",
    "optim.unit=steps",
    "optim.lr_schedule=constant",
    "train.epochs=0",
    "train.steps=40",
    "train.batch_size=8",
    "train.log_every=10",
    "train.eval_every=20",
    "train.progress=false",
    "run.checkpoint_every=20",
]
MODES = {
    "predictions-top16": [
        "codistill.mode=predictions",
        "codistill.every=1",
        "codistill.topk=16",
        "codistill.payload_dtype=fp16",
    ],
    "weights": ["codistill.mode=weights", "codistill.every=10", "data.order=disjoint"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_language_model_codistillation_end_to_end(ranks, tmp_path, mode):
    run_dir = tmp_path / "run"
    ranks(
        4,
        [
            "-m",
            "hvcodistill.train",
            "--config",
            str(ROOT / "configs" / "lm_text_codistill.yaml"),
            *TINY,
            *MODES[mode],
            f"run.dir={run_dir}",
        ],
    )
    s = json.loads((run_dir / "summary.json").read_text())
    # the contract's keys, and the language model's
    for key in (
        "topology",
        "mode",
        "every",
        "steps",
        "wall_seconds",
        "models",
        "ensemble_val_accuracy",
        "disagreement",
        "timing",
        "exchanged_bytes",
        "ensemble_val_loss",
        "ensemble_val_perplexity",
    ):
        assert key in s, key
    assert s["mode"] == mode.split("-")[0] and s["steps"] == 40 and s["exchanged_bytes"] > 0
    assert {"compute_s", "allreduce_s", "exchange_s"} <= set(s["timing"])
    assert [m["id"] for m in s["models"]] == [0, 1]
    for m in s["models"]:
        # an untrained byte model scores ln 256 = 5.55 nats; 40 steps must take it well below
        assert m["val_loss"] < math.log(256) - 1.0, m
        assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-6)
        assert 0 < m["val_accuracy"] < 1
    assert s["ensemble_val_perplexity"] == pytest.approx(math.exp(s["ensemble_val_loss"]), rel=1e-6)
    # the ensemble of two models is no worse than its average member (Jensen on the mean
    # probability)
    assert s["ensemble_val_loss"] <= sum(m["val_loss"] for m in s["models"]) / 2 + 1e-9
    # validation loss falls between the two evaluations (steps 20 and 40)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {(r["model"], r["step"]): r for r in rows if r["kind"] == "val"}
    for model in (0, 1):
        assert val[(model, 40)]["val_loss"] < val[(model, 20)]["val_loss"]
        assert "val_perplexity" in val[(model, 40)]
    # and TensorBoard has the perplexity
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb" / "model_0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/val_perplexity")] == [20, 40]
    if mode.startswith("predictions"):
        # top-16 of 256 in fp16 + int32: 6 x 16 bytes per token, not 4 x 256
        tokens = 8 * 32
        assert s["exchanged_bytes"] == s["exchanges"] * 4 * (tokens * 16 * 6 + 8)
