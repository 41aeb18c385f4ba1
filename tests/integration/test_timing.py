"""Honest timing under real ranks: the summary's parts, delays landing in their own part, the
reference loop (hvcodistill.reference), and preemption checks on a cadence.

No test bounds a real time: the parts add up to loop_s (an equality; a whole run's summary, before
and after a resume, is test_weights_refresh.py's resume test), and the injected delays are counted
through a fake clock (tests/mpi/check_timing.py)."""

import json

import pytest

from tests.helpers import MPI_DIR, ROOT

pytestmark = pytest.mark.mpi

CODISTILL = str(ROOT / "configs" / "digits_codistill.yaml")
ALLREDUCE = str(ROOT / "configs" / "digits_allreduce.yaml")


def test_injected_delays_land_in_their_own_part(ranks, tmp_path):
    """Each delay injected into evaluation, checkpoints, the loader and the exchange's staging (a
    jump of the timer's clock, no sleep) lands in its own part and none in compute_s; the parts add
    up to loop_s on every rank."""
    proc = ranks(4, [str(MPI_DIR / "check_timing.py"), str(tmp_path / "run")])
    assert "timing ok" in proc.stdout


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
