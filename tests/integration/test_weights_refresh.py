"""Weights mode's refresh under real ranks: the schedule and the first teachers, exact resume with a
refresh in flight (whose summary's time parts add up, before and after the resume). One copy of
each model crossing between nodes per refresh is counted on the emulated cluster, in
tests/integration/test_across_nodes.py."""

import json

import pytest
import torch

from tests.helpers import ROOT, torch_backend
from tests.mpi.checks import ident, result

pytestmark = pytest.mark.mpi

CODISTILL = str(ROOT / "configs" / "digits_codistill.yaml")


# the torch data plane's wire (private process groups) in the 4-rank job, beside Horovod's mpi4py
@pytest.mark.parametrize(
    "check",
    [
        (4, "refresh"),
        (6, "refresh"),
        pytest.param((4, "refresh/torch"), marks=torch_backend, id="refresh/torch-np4"),
    ],
    ids=ident,
)
def test_schedule_install_step_and_first_teachers(request, check):
    """Nothing sent in burn-in; teachers taken at t are installed at t + d exactly; the first
    distillation uses the peers as they were when burn-in ended (check_refresh.py, 24 steps:
    refreshes taken at 6, 10, 14, 18, 22)."""
    np = check[0]
    assert result(request, check) == (
        f"refresh ok: W={np} M={np // 2} k=4 burn_in=6 delay=2: "
        "first distillation at step 8 from teachers taken at step 6; 5 refreshes"
    )


# k = 7, burn-in 7, delay 3: refreshes taken at 7, 14, 21, 28 and installed at 10, 17, 24, (31)
WEIGHTS = [
    "codistill.mode=weights",
    "codistill.every=7",
    "codistill.burn_in_steps=7",
    "codistill.refresh_delay=3",
    "data.order=disjoint",
    "model.name=cnn",
    "train.epochs=0",
    "train.eval_every=10",
    "train.log_every=10",
    "train.progress=false",
    "optim.lr_schedule=constant",
]  # a run extended on resume: a schedule not tied to its length
# the summary's time parts (hvcodistill/training/timing.py)
PARTS = ("compute_s", "allreduce_s", "exchange_s", "eval_s", "checkpoint_s", "data_s", "other_s")


def assert_parts_add_up(timing):
    assert set(PARTS) | {"loop_s", "step_s"} <= timing.keys()
    assert sum(timing[k] for k in PARTS) == pytest.approx(timing["loop_s"], rel=1e-9)


@pytest.mark.parametrize("backend", ["horovod", pytest.param("torch", marks=torch_backend)])
def test_resume_with_a_refresh_in_flight_is_exact_and_its_time_adds_up(ranks, tmp_path, backend):
    """A checkpoint at step 16 catches the refresh taken at 14 in flight (installed at 17): stopped
    there and resumed, or checkpointed there and continued, the run ends bitwise the same, on
    each data plane (the refresh's all-gathers on mpi4py, or on torch's process groups).
    The time parts of its summary add up to loop_s in each segment (an equality, no clock bound),
    the ones that held something are above zero, the resumed segment's timer goes on from the
    checkpoint's, and TensorBoard has every part per step at every log step and at the end of each
    segment."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train(run_dir, *overrides):
        ranks(
            4,
            [
                "-m",
                "hvcodistill.train",
                "--config",
                CODISTILL,
                *WEIGHTS,
                f"train.backend={backend}",
                f"run.dir={run_dir}",
                *overrides,
            ],
        )

    cut = tmp_path / "cut"
    train(cut, "train.steps=16", "run.checkpoint_every=8")
    pending = torch.load(cut / "checkpoints" / "model_0" / "step_000000016.pt", weights_only=False)[
        "exchange"
    ]["pending_refresh"]
    assert pending["taken_at"] == 14 and pending["install_at"] == 17
    first = json.loads((cut / "summary.json").read_text())["timing"]
    assert_parts_add_up(first)
    assert first["eval_s"] > 0 and first["checkpoint_s"] > 0 and first["exchange_s"] > 0
    assert first["step_s"] == pytest.approx(first["loop_s"] / 16)

    train(cut, "train.steps=30", "run.checkpoint_every=8")
    train(tmp_path / "whole", "train.steps=30", "run.checkpoint_every=16")
    for m in (0, 1):
        a, b = (torch.load(tmp_path / run / f"model_{m}.pt") for run in ("cut", "whole"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
            f"model {m} differs"
        )
    a, b = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("cut", "whole"))
    assert a["resumed_from_step"] == 16 and a["exchanges"] == b["exchanges"] == 4
    assert (
        a["exchanged_bytes"] == b["exchanged_bytes"]
        and a["bytes"]["exchange"] == b["bytes"]["exchange"]
    )
    again = a["timing"]
    assert_parts_add_up(again)
    assert again["loop_s"] > first["loop_s"] and again["eval_s"] > first["eval_s"]
    acc = EventAccumulator(str(cut / "tb" / "model_0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}_per_step" for k in PARTS} | {"train/step_s", "train/exchange_s"} <= tags, (
        tags
    )
    # every log step, and the end of each segment, once each
    assert [e.step for e in acc.Scalars("train/compute_s_per_step")] == [10, 16, 20, 30]
