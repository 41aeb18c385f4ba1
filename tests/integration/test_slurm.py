"""slurm/*.sbatch on a real one-machine SLURM (slurmctld + slurmd + munged, started here).

The cluster is the session's (tests/slurm_cluster.py, fixtures `slurm_cluster` and `slurm`):
slurm-wlm and munge are installed with apt-get when missing (as root; the tests are skipped,
saying why, only when that is impossible), the daemons run with their own key, ports and
directories, and are stopped by pid at the end of the session. The node declares 4 CPUs on a
2-core machine, so the 4-rank jobs below are oversubscribed, as `make demo` is, and the scripts
set OMPI_MCA_mpi_yield_when_idle=1 for them.

One job per launcher runs RUN to the end (`completed`): test_codistill_sbatch_runs_to_the_end
checks it, and it is the uninterrupted run that the preempted job must match bit for bit.

Where network namespaces can be made (root), tests/integration/test_slurm_nodes.py runs the same
two tests, with both launchers, on two emulated nodes, asserting everything these do and more
(each model on its own node, SIGUSR1 reaching both nodes); these two then skip, saying so, and
only run where the two-node cluster cannot be built. Four 4-rank jobs fewer, about 50 s.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import CLUSTER_UNAVAILABLE, ROOT
from tests.slurm_cluster import (
    CODISTILL_SBATCH,
    QUIET,
    Hold,
    SlurmCluster,
    assert_completed,
    finished,
    read,
    requeued,
    submit,
    wait_for_training,
)

pytestmark = pytest.mark.slurm

ALLREDUCE_SBATCH = ROOT / "slurm" / "allreduce.sbatch"
STEPS = 60
# the run every test here trains; the guard agrees on a signal every step, so a preempted run
# stops 2 steps after its ranks go on from a Hold
RUN = (
    f"{QUIET} train.steps={STEPS} train.log_every=10 run.checkpoint_every=0 "
    "run.preempt_check_every=1"
)
HOLD_STEP = 20  # the preempted run waits before this step (it has logged step 10) for its signal


# the two tests that test_slurm_nodes.py runs on two nodes, where it can
on_two_nodes_instead = pytest.mark.skipif(
    CLUSTER_UNAVAILABLE is None,
    reason="run on two emulated nodes instead (tests/integration/test_slurm_nodes.py, the same "
    "test there, both launchers)",
)


def srun_mpi_or_skip(cluster: SlurmCluster) -> None:
    plugins = cluster.mpi_plugins()
    if not plugins & {"pmix", "pmi2"}:
        pytest.skip(
            f"srun offers no PMIx/PMI2 plugin here (srun --mpi=list: {sorted(plugins)}); "
            "LAUNCHER=mpirun is tested instead"
        )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu")


@pytest.fixture(scope="module")
def completed(slurm_cluster, tmp_path_factory):
    """launcher -> (scontrol fields, run dir, output) of codistill.sbatch running RUN to the end,
    submitted once per launcher by the first test that asks (which holds the `slurm` fixture, so
    the cluster is ready and idle)."""
    jobs = {}

    def get(launcher: str) -> tuple[dict, Path, Path]:
        if launcher not in jobs:
            tmp = tmp_path_factory.mktemp(f"completed-{launcher}")
            start = time.monotonic()
            job, run_dir, out = submit(slurm_cluster, tmp, launcher=launcher, overrides=RUN)
            jobs[launcher] = (finished(slurm_cluster, job, out), run_dir, out)
            print(f"{launcher}: job {job} took {time.monotonic() - start:.1f}s")
        return jobs[launcher]

    return get


def test_sbatch_scripts_parse_and_request_requeue():
    """Cheap, cluster-free: both scripts are valid bash with the preemption directives."""
    for script in (CODISTILL_SBATCH, ALLREDUCE_SBATCH):
        subprocess.run(["bash", "-n", str(script)], check=True)
        directives = [
            line for line in script.read_text().splitlines() if line.startswith("#SBATCH")
        ]
        assert any(d.split()[1].startswith("--signal=B:USR1@") for d in directives), script
        assert "#SBATCH --requeue" in directives, script


@on_two_nodes_instead
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_codistill_sbatch_runs_to_the_end(slurm, completed, launcher):
    """4 tasks on one node, 2 models x 2 ranks: the run completes and leaves its results."""
    if launcher == "srun":
        srun_mpi_or_skip(slurm)
    fields, run_dir, out = completed(launcher)
    log = assert_completed(fields, out)
    assert f"] {launcher} " in log, log  # the launch line the script logged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["topology"] == {"world_size": 4, "n_models": 2, "group_size": 2}
    assert summary["steps"] == STEPS
    assert [m["id"] for m in summary["models"]] == [0, 1]
    for i in (0, 1):
        weights = load(run_dir / f"model_{i}.pt")
        assert weights and all(
            torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()
        )


def test_allreduce_sbatch_runs_the_same_body(slurm, tmp_path):
    """allreduce.sbatch sets its own CONFIG and execs codistill.sbatch; here on the digits
    baseline."""
    launcher = "srun" if slurm.mpi_plugins() & {"pmix", "pmi2"} else "mpirun"
    job, run_dir, out = submit(
        slurm,
        tmp_path,
        script=ALLREDUCE_SBATCH,
        launcher=launcher,
        overrides=f"{QUIET} train.steps=30",
        config="configs/digits_allreduce.yaml",
    )
    assert_completed(finished(slurm, job, out), out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["topology"] == {"world_size": 4, "n_models": 1, "group_size": 4}
    assert (run_dir / "model_0.pt").exists()


@on_two_nodes_instead
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_preemption_requeues_and_resumes_bitwise(slurm, tmp_path, completed, launcher):
    """SIGUSR1 to the batch shell (what --signal=B:USR1 does) mid-run: the script forwards it
    through the launcher, the ranks checkpoint and exit 75, the script requeues the job, the same
    job id runs again and resumes; the final weights are bitwise those of the uninterrupted run
    (the mpirun job of `completed`). The run waits before step HOLD_STEP until its ranks have the
    signal, so it cannot finish first."""
    if launcher == "srun":
        srun_mpi_or_skip(slurm)
    hold = Hold(tmp_path, tmp_path / "run", step=HOLD_STEP)
    job, run_dir, out = submit(slurm, tmp_path, launcher=launcher, overrides=RUN, env=hold.env)
    wait_for_training(slurm, job, run_dir, out)
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])

    # Requeued: back to PENDING with Restarts=1 (until the credential lifetime passes), same id.
    fields = requeued(slurm, job, out)
    hold.release()
    assert int(fields.get("Restarts", "0")) >= 1, f"job was not requeued: {fields}\n{read(out)}"
    checkpoints = [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()]
    assert checkpoints, (
        f"no checkpoint in {run_dir / 'checkpoints'} after the preemption\n{read(out)}"
    )
    assert not (run_dir / "summary.json").exists(), "the run had already finished when preempted"

    log = assert_completed(finished(slurm, job, out), out)
    assert "(exit 75): requeueing job" in log and "restart 1:" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0 < summary["resumed_from_step"] <= HOLD_STEP + 2, summary

    reference_fields, reference_dir, reference_out = completed("mpirun")
    assert_completed(reference_fields, reference_out)
    for i in (0, 1):
        resumed, reference = (
            load(run_dir / f"model_{i}.pt"),
            load(reference_dir / f"model_{i}.pt"),
        )
        assert resumed.keys() == reference.keys()
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), (
                f"model {i} {name}: the requeued run differs from the uninterrupted one"
            )
