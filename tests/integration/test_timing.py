"""Honest timing under real ranks: the summary's parts, delays landing in their own part, the
reference loop (hvcodistill.reference), and preemption checks on a cadence.

No test bounds a real time: the parts add up to loop_s (an equality), a part that holds something
is above zero, a resumed run's totals grow, and the injected delays are counted through a fake
clock (tests/mpi/check_timing.py)."""

import json

import pytest

from tests.helpers import MPI_DIR, ROOT

pytestmark = pytest.mark.mpi

CODISTILL = str(ROOT / "configs" / "digits_codistill.yaml")
ALLREDUCE = str(ROOT / "configs" / "digits_allreduce.yaml")
PARTS = ("compute_s", "allreduce_s", "exchange_s", "eval_s", "checkpoint_s", "data_s", "other_s")


def test_injected_delays_land_in_their_own_part(ranks, tmp_path):
    """Each delay injected into evaluation, checkpoints, the loader and the exchange's staging (a
    jump of the timer's clock, no sleep) lands in its own part and none in compute_s; the parts add
    up to loop_s on every rank."""
    proc = ranks(4, [str(MPI_DIR / "check_timing.py"), str(tmp_path / "run")])
    assert "timing ok" in proc.stdout


def assert_parts_add_up(timing):
    assert set(PARTS) | {"loop_s", "step_s"} <= timing.keys()
    assert sum(timing[k] for k in PARTS) == pytest.approx(timing["loop_s"], rel=1e-9)


def test_summary_parts_add_up_to_the_loop_also_after_a_resume(ranks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = [
        "-m",
        "hvcodistill.train",
        "--config",
        CODISTILL,
        "train.epochs=0",
        "codistill.burn_in_steps=0",
        "train.eval_every=10",
        "run.checkpoint_every=10",
        "train.log_every=10",
        "train.progress=false",
        f"run.dir={run}",
        # a run may be extended on resume under a schedule that does not depend on its length
        "optim.lr_schedule=constant",
    ]
    ranks(4, [*common, "train.steps=30"])
    first = json.loads((run / "summary.json").read_text())["timing"]
    assert_parts_add_up(first)
    assert first["eval_s"] > 0 and first["checkpoint_s"] > 0 and first["exchange_s"] > 0
    assert first["step_s"] == pytest.approx(first["loop_s"] / 30)
    ranks(4, [*common, "train.steps=50"])  # resumes from step 30: the timer too
    again = json.loads((run / "summary.json").read_text())["timing"]
    assert_parts_add_up(again)
    assert again["loop_s"] > first["loop_s"] and again["eval_s"] > first["eval_s"]
    acc = EventAccumulator(str(run / "tb" / "model_0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}_per_step" for k in PARTS} | {"train/step_s", "train/exchange_s"} <= tags, (
        tags
    )
    assert [e.step for e in acc.Scalars("train/compute_s_per_step")] == [10, 20, 30, 40, 50]


def test_reference_loop_writes_its_step_time(ranks, tmp_path):
    proc = ranks(
        2,
        [
            "-m",
            "hvcodistill.reference",
            "--config",
            ALLREDUCE,
            "train.epochs=0",
            "train.steps=20",
            f"run.dir={tmp_path}",
        ],
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 20 and s["topology"] == {"world_size": 2, "n_models": 1, "group_size": 2}
    assert 0 < s["timing"]["step_s"] == pytest.approx(s["timing"]["loop_s"] / 20)
    assert "hvcodistill.reference: 20 steps" in proc.stdout


def test_reference_bad_key_is_one_line_exit_2(ranks, tmp_path):
    proc = ranks(
        2,
        [
            "-m",
            "hvcodistill.reference",
            "--config",
            ALLREDUCE,
            "train.nope=1",
            f"run.dir={tmp_path}",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "train.nope" in proc.stderr and "Traceback" not in proc.stderr
