"""slurm/*.sbatch on a real 2-node SLURM built on the emulated cluster (root only).

Each emulated node (a network namespace with its own hostname, hvcodistill.cluster) runs its own
slurmd (`slurmd -N node0` / `-N node1`, NodeAddr 198.18.0.1 / .2); slurmctld and every client
command run on node0 (tests/slurm_cluster.py, EmulatedSlurmCluster). The jobs are 2 nodes x 2
tasks: codistillation of 2 models x 2 ranks, so with contiguous placement each model has a node to
itself and only the peer exchange crosses the link between the nodes. Covered:
- both launchers (srun --mpi=pmix, and mpirun inside the allocation, whose daemons srun starts);
- placement, from the run's own record (summary.json nodes.hosts / nodes.node_of_rank);
- SIGUSR1 to the batch shell -> checkpoint -> exit 75 -> scontrol requeue -> resume, with final
  weights bitwise equal to an uninterrupted run;
- node1 killed mid-run (SIGKILL to its slurmd, the job step and the ranks): the job ends within 30 s
  with a reason in its log, and the checkpoints it wrote stay resumable.

One cluster for the module (`nodes_cluster`), made ready before each test (`two_nodes`: a killed
node's slurmd is started again). One job per launcher runs RUN to the end (`completed`): the
placement test checks it, and it is the uninterrupted run the preempted job must match. A run
that is signalled or loses a node waits before a step until then (tests/slurm_cluster.py, Hold),
so it cannot finish first.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hvcodistill.cluster import EmulatedCluster
from tests.faults import complete_checkpoints
from tests.helpers import FAIL_FAST_S, needs_cluster, our_namespaces, unique_name
from tests.slurm_cluster import (
    QUIET,
    EmulatedSlurmCluster,
    Hold,
    assert_completed,
    ensure_installed,
    finished,
    read,
    requeued,
    submit,
    wait_for_training,
)

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, needs_cluster]

# Two nodes, 2 tasks of 1 CPU each, no GPUs: command-line options override the scripts' #SBATCH
# lines.
TWO_NODES = [
    "--nodes=2",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=20",
]
STEPS = 60
# the run of `completed` and of the preemption test; the guard agrees on a signal every step
RUN = (
    f"{QUIET} train.steps={STEPS} train.log_every=10 run.checkpoint_every=0 "
    "run.preempt_check_every=1"
)
HOLD_STEP = 20  # a held run waits before this step (it has logged step 10)


@pytest.fixture(scope="module")
def nodes_cluster():
    """node0 and node1 (namespaces), SLURM on them, for the whole module (no test here needs
    another link than the default, so nothing is re-shaped between tests); everything stopped
    and removed at the end, also after a failure."""
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="hvslurm2-"))  # short: munged's socket path must fit
    emulated = EmulatedCluster(2, name=unique_name(), state_dir=workdir / "emulated")
    cluster = None
    try:
        emulated.up()
        cluster = EmulatedSlurmCluster(workdir / "slurm", emulated)
        cluster.start()
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.stop()
        finally:
            emulated.down(quiet=True)
            shutil.rmtree(workdir, ignore_errors=True)
        assert our_namespaces(emulated.name) == [], f"namespaces of {emulated.name} left behind"


@pytest.fixture
def two_nodes(nodes_cluster):
    """The module's cluster ready before each test (a killed node's slurmd started again, both
    nodes idle, no job) and emptied of jobs after it."""
    nodes_cluster.ensure_ready()
    yield nodes_cluster
    nodes_cluster.cancel_all()


def submit2(cluster, tmp_path: Path, *, launcher: str, overrides: str, env=None):
    return submit(
        cluster, tmp_path, launcher=launcher, overrides=overrides, resources=TWO_NODES, env=env
    )


@pytest.fixture(scope="module")
def completed(nodes_cluster, tmp_path_factory):
    """launcher -> (scontrol fields, run dir, output) of codistill.sbatch running RUN to the end
    on both nodes, once per launcher, submitted by the first test that asks (which holds
    `two_nodes`): test_codistill_sbatch_on_two_nodes checks it, and it is the uninterrupted run
    that the preempted job must match bit for bit."""
    jobs = {}

    def get(launcher: str) -> tuple[dict, Path, Path]:
        if launcher not in jobs:
            tmp = tmp_path_factory.mktemp(f"completed-{launcher}")
            start = time.monotonic()
            job, run_dir, out = submit2(nodes_cluster, tmp, launcher=launcher, overrides=RUN)
            fields = finished(nodes_cluster, job, out)
            print(f"{launcher}: job {job} on {fields.get('NodeList')} took "
                  f"{time.monotonic() - start:.1f}s")  # fmt: skip
            jobs[launcher] = (fields, run_dir, out)
        return jobs[launcher]

    return get


def wait_for_line(out: Path, texts: tuple[str, ...], timeout: float = 10) -> bool:
    """Whether one of `texts` shows up in the job's output within `timeout` (it is written while the
    job is being torn down, after the state changed)."""
    deadline = time.monotonic() + timeout
    while not any(t in read(out) for t in texts):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_contiguous(summary: dict) -> None:
    """From the run's own record: world ranks 0,1 (model 0) on node0, ranks 2,3 (model 1) on
    node1."""
    nodes, topology = summary["nodes"], summary["topology"]
    assert topology == {"world_size": 4, "n_models": 2, "group_size": 2}
    assert nodes["count"] == 2 and nodes["hosts"] == ["node0", "node1"], nodes
    assert nodes["node_of_rank"] == [0, 0, 1, 1], nodes
    g = topology["group_size"]
    for model in range(topology["n_models"]):
        assert len({nodes["node_of_rank"][r] for r in range(model * g, (model + 1) * g)}) == 1, (
            f"model {model}'s ranks span nodes: {nodes}"
        )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu")


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_codistill_sbatch_on_two_nodes(two_nodes, completed, launcher):
    """2 nodes x 2 tasks: the job completes and leaves its results (finite weights of both
    models), each model's ranks sit on one node, the nodes are the two slurmds' (node0, node1),
    and bytes crossed between the nodes. (test_slurm.py's one-node twin skips where this runs.)"""
    fields, run_dir, out = completed(launcher)
    log = assert_completed(fields, out, two_nodes)
    assert fields.get("NodeList") == "node[0-1]" and f"] {launcher} " in log, (fields, log)
    assert "4 ranks on 2 node(s) [node[0-1]], 2 per node" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert [m["id"] for m in summary["models"]] == [0, 1]
    assert_contiguous(summary)
    for i in (0, 1):
        weights = load(run_dir / f"model_{i}.pt")
        assert weights and all(
            torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()
        )
    inter = sum(links["inter_node"] for links in summary["bytes"].values())
    assert inter > 0, summary["bytes"]


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_preemption_on_two_nodes_requeues_and_resumes_bitwise(
    two_nodes, tmp_path, completed, launcher
):
    """SIGUSR1 to the batch shell on node0 (what --signal=B:USR1 does) reaches the ranks on both
    nodes; they checkpoint and exit 75, the job is requeued, runs again on both nodes, resumes, and
    ends with weights bitwise equal to the uninterrupted run of `completed` (same launcher, same
    placement). The run waits before step HOLD_STEP until its ranks have the signal, so it cannot
    finish first."""
    slurm = two_nodes
    hold = Hold(tmp_path, tmp_path / "run", step=HOLD_STEP)
    job, run_dir, out = submit2(slurm, tmp_path, launcher=launcher, overrides=RUN, env=hold.env)
    wait_for_training(slurm, job, run_dir, out)
    signalled = time.monotonic()
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    fields = requeued(slurm, job, out)
    hold.release()
    print(f"{launcher}: USR1 -> requeued in {time.monotonic() - signalled:.1f}s")
    assert int(fields.get("Restarts", "0")) >= 1, f"job was not requeued: {fields}\n{read(out)}"
    checkpoints = sorted((run_dir / "checkpoints").rglob("step_*.pt"))
    assert {p.parent.name for p in checkpoints} == {"model_0", "model_1"}, (checkpoints, read(out))
    assert not (run_dir / "summary.json").exists(), "the run had already finished when preempted"

    log = assert_completed(finished(slurm, job, out), out)
    assert "(exit 75): requeueing job" in log and "restart 1:" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0 < summary["resumed_from_step"] <= HOLD_STEP + 2, summary
    assert_contiguous(summary)

    reference_fields, reference_dir, reference_out = completed(launcher)
    assert_completed(reference_fields, reference_out, slurm)
    for i in (0, 1):
        resumed, reference = load(run_dir / f"model_{i}.pt"), load(reference_dir / f"model_{i}.pt")
        assert resumed.keys() == reference.keys()
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), (
                f"model {i} {name}: the requeued run differs from the uninterrupted one"
            )


def newest_complete_step(run_dir: Path) -> int:
    """The newest step for which every model has a checkpoint with its sidecar, which is written
    last (what a resume starts from); 0 if none. A .pt without its sidecar is a write in
    progress: a node killed then leaves that model without the step."""
    return max(complete_checkpoints(run_dir), default=0)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_killed_node_ends_the_job_fast(two_nodes, tmp_path, launcher):
    """node1 dies mid-run (SIGKILL to everything in its namespace: slurmd, the step, ranks 2 and 3).
    The job stops running within 30 s and is requeued (srun: SLURM's NODE_FAIL) or fails with the
    reason in its log (mpirun: the lost daemon); nothing is lost past the newest checkpoint: once
    node1 is back, the requeued job, or the same command again, resumes from that checkpoint and
    completes. The run waits before step 30, after its checkpoint of step 20, until node1 is
    killed, so it cannot finish (or checkpoint again) first. This test breaks node1 and brings it
    back itself; `two_nodes` also revives it before the next test."""
    slurm = two_nodes
    steps, checkpointed = STEPS, 20
    overrides = (
        f"{QUIET} train.steps={steps} train.log_every=10 run.checkpoint_every={checkpointed}"
    )
    hold = Hold(tmp_path, tmp_path / "run", step=checkpointed + 10)
    job, run_dir, out = submit2(
        slurm, tmp_path, launcher=launcher, overrides=overrides, env=hold.env
    )
    wait_for_training(slurm, job, run_dir, out)
    deadline = time.monotonic() + 120
    while newest_complete_step(run_dir) == 0:
        assert time.monotonic() < deadline, f"no checkpoint of both models after 120s\n{read(out)}"
        time.sleep(0.2)
    killed = time.monotonic()
    slurm.kill_node("node1")
    hold.release()  # the ranks on node0 go on into the step, whose peers are gone
    fields = finished(slurm, job, out, timeout=120, until=lambda f: f.get("JobState") != "RUNNING")
    took = time.monotonic() - killed
    log = read(out)
    newest = newest_complete_step(run_dir)
    print(
        f"{launcher}: node1 killed -> job {fields.get('JobState')} (exit {fields.get('ExitCode')}, "
        f"restarts {fields.get('Restarts')}) after {took:.1f}s; newest checkpoint step {newest}\n"
        f"{log[-1500:]}"
    )
    assert took < FAIL_FAST_S, f"job still running {took:.0f}s after node1 died: {fields}\n{log}"
    assert not (run_dir / "summary.json").exists(), (fields, log)
    # node1 comes back at once (what it did while down is asserted above): a job the dead node
    # kept COMPLETING ends as soon as its slurmd answers again, not after SLURM's timeouts
    slurm.revive("node1")
    if int(fields.get("Restarts", "0")) >= 1:
        # requeued by SLURM: slurmctld declared node1 DOWN (SlurmdTimeout) and ended the job as
        # NODE_FAIL (srun today: the ranks on node0 wait for their peers until then)
        assert wait_for_line(out, ("Node failure on node1", "DUE TO NODE FAILURE")), read(out)
    else:
        # ended by the launcher, which says why (mpirun: its daemon on node1 is gone), and the
        # script
        fields = finished(slurm, job, out, timeout=60)
        log = read(out)
        assert fields.get("JobState") == "FAILED" and fields.get("ExitCode") != "0:0", (fields, log)
        assert "launcher exited" in log, log
        if launcher == "mpirun":
            assert "ORTE has lost communication with a remote daemon" in log, log

    # the requeued job starts again by itself, or the same command is run again; either resumes
    # from the newest complete checkpoint and runs to the end
    if int(fields.get("Restarts", "0")) == 0:
        job, run_dir, out = submit2(slurm, tmp_path, launcher=launcher, overrides=overrides)
    assert_completed(finished(slurm, job, out), out, slurm)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert newest == checkpointed, newest
    assert summary["steps"] == steps and summary["resumed_from_step"] == newest, (
        summary,
        read(out),
    )
    assert_contiguous(summary)
