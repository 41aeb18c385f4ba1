"""`kill -9` of one rank of slurm/codistill.sbatch on the one-machine SLURM (issue 10, point 5):
the job ends, failed, within 30 s (srun runs with --kill-on-bad-exit=0 --wait=30, so the
ranks' heartbeat, run.hang_timeout, bounds it), and its newest complete checkpoint stays."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.faults import (
    FAIL_FAST_S,
    TRAIN_ARGS,
    complete_checkpoints,
    kill_all,
    rank_pids,
    wait_for,
)
from tests.slurm_cluster import TERMINAL_STATES
from tests.test_slurm import CODISTILL_SBATCH, ONE_NODE, read, slurm, slurm_cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


def test_killed_rank_ends_the_job(slurm, tmp_path):  # noqa: F811
    launcher = "srun" if slurm.mpi_plugins() & {"pmix", "pmi2"} else "mpirun"
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    overrides = (
        " ".join(a for a in TRAIN_ARGS if not a.startswith("train.steps=")) + " train.steps=30000"
    )
    env = {
        "RUN_DIR": str(run_dir),
        "OVERRIDES": overrides,
        "LAUNCHER": launcher,
        "PYTHON": sys.executable,
        "CONFIG": "configs/digits_codistill.yaml",
    }
    job, _ = slurm.sbatch(
        [*ONE_NODE, f"--output={out}", "--export=ALL", str(CODISTILL_SBATCH)], env=env, cwd=tmp_path
    )
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            180,
            alive=lambda: slurm.job(job).get("JobState") not in TERMINAL_STATES,
            log=lambda: read(out),
        )
        newest = complete_checkpoints(run_dir)[-1]
        start_at = time.monotonic()
        os.kill(rank_pids(run_dir)[1], signal.SIGKILL)
        fields = slurm.wait_job(job, timeout=120)
        took = time.monotonic() - start_at
    finally:
        kill_all(run_dir)
    print(
        f"{launcher} under sbatch: kill -9 of rank 1 -> job {fields.get('JobState')} "
        f"{fields.get('ExitCode')} after {took:.1f} s"
    )
    assert fields.get("JobState") == "FAILED" and took < FAIL_FAST_S, (
        took,
        fields,
        read(out)[-3000:],
    )
    assert newest in complete_checkpoints(run_dir), "the newest complete checkpoint was lost"
