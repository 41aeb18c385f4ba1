"""A lost node on the emulated 2-node cluster (root only; issue 10, point 5): 2 models x 2 ranks,
model 0 on node0 (with mpirun), model 1 on node1. Losing node1, by killing all its ranks or by
cutting its link, ends the job within 30 s and never leaves it waiting in a collective; the
newest complete checkpoint stays. A cut link is what TCP alone would wait on for many minutes:
mpirun's keepalive on its daemons' connections (hvcodistill.cluster, OOB_KEEPALIVE) and the
ranks' heartbeat (run.hang_timeout) bound it. Each test prints its fault-to-exit time (pytest -s).
Both faults break the module's one cluster (conftest's `cluster`), which is restored after each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.faults import (
    STEPS,
    complete_checkpoints,
    kill_all,
    rank_pids,
    start,
    train_command,
    wait_for,
)
from tests.helpers import FAIL_FAST_S, needs_cluster

pytestmark = [pytest.mark.mpi, needs_cluster]


@pytest.mark.parametrize("fault", ["ranks killed", "link cut"])
def test_lost_node_ends_the_job(cluster, tmp_path, fault):
    run_dir = tmp_path / "run"
    cmd, env = cluster.mpirun_command(
        4, train_command(run_dir, f"train.steps={STEPS * 100}"), slots=2
    )
    proc = start(cmd, env)
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            180,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        newest = complete_checkpoints(run_dir)[-1]
        start_at = time.monotonic()
        if fault == "ranks killed":
            pids = rank_pids(run_dir)
            for rank in (2, 3):  # node1's ranks
                os.kill(pids[rank], signal.SIGKILL)
        else:
            subprocess.run(
                ["ip", "-n", cluster.namespace("node1"), "link", "set", "eth0", "down"], check=True
            )
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            pytest.fail(f"{fault}: the job still ran 90 s later\n{err[-3000:]}")
        took = time.monotonic() - start_at
        node0_left = {r: p for r, p in rank_pids(run_dir).items() if r in (0, 1)}
    finally:
        kill_all(run_dir)  # and `cluster` kills what is left on the nodes, sets the link up again
    print(f"{fault} on node1 -> mpirun exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode != 0 and took < FAIL_FAST_S, (took, err[-3000:])
    assert not node0_left, f"node0's ranks {sorted(node0_left)} outlived mpirun"
    assert newest in complete_checkpoints(run_dir), "the newest complete checkpoint was lost"
