"""`kill -9` of one rank of slurm/codistill.sbatch on the one-machine SLURM (issue 10, point 5):
the job ends, failed, within 30 s (srun runs with --kill-on-bad-exit=0 --wait=30, so the
ranks' heartbeat, run.hang_timeout, bounds it), and its newest complete checkpoint stays."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.faults import (
    TRAIN_ARGS,
    complete_checkpoints,
    kill_all,
    rank_pids,
    wait_for,
)
from tests.helpers import FAIL_FAST_S
from tests.slurm_cluster import TERMINAL_STATES, read, submit

pytestmark = pytest.mark.slurm


def test_killed_rank_ends_the_job(slurm, tmp_path):
    """The run is 30000 steps long, far more than it trains before the kill: it cannot finish
    first. The cluster stays usable (the `slurm` fixture makes it ready for the next test)."""
    launcher = "srun" if slurm.mpi_plugins() & {"pmix", "pmi2"} else "mpirun"
    overrides = (
        " ".join(a for a in TRAIN_ARGS if not a.startswith("train.steps=")) + " train.steps=30000"
    )
    job, run_dir, out = submit(slurm, tmp_path, launcher=launcher, overrides=overrides)
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
