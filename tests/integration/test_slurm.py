"""slurm/*.sbatch on a real one-machine SLURM (slurmctld + slurmd + munged, started here).

The cluster comes from tests/slurm_cluster.py: slurm-wlm and munge are installed with apt-get
when missing (as root; the tests are skipped, saying why, only when that is impossible), the
daemons run with their own key, ports and directories, and are stopped by pid afterwards.
The node declares 4 CPUs on a 2-core machine, so the 4-rank jobs below are oversubscribed, as
`make demo` is, and the scripts set OMPI_MCA_mpi_yield_when_idle=1 for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.slurm_cluster import TERMINAL_STATES, SlurmCluster, SlurmError, ensure_installed

pytestmark = pytest.mark.slurm

CODISTILL_SBATCH = ROOT / "slurm" / "codistill.sbatch"
ALLREDUCE_SBATCH = ROOT / "slurm" / "allreduce.sbatch"
# One node, 4 tasks of 1 CPU, no GPUs: command-line options override the scripts' #SBATCH lines.
ONE_NODE = [
    "--nodes=1",
    "--ntasks=4",
    "--ntasks-per-node=4",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=20",
]
QUIET = "train.epochs=0 train.progress=false train.eval_every=0"


@pytest.fixture(scope="module")
def slurm_cluster():
    """One cluster for the module: installed if need be, started, and stopped (by pid) at the
    end."""
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="hvslurm-"))  # short: munged's socket path must fit
    cluster = SlurmCluster(workdir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster, emptied of jobs after each test, so a failed test leaves none in the way."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def srun_mpi_or_skip(cluster: SlurmCluster) -> None:
    plugins = cluster.mpi_plugins()
    if not plugins & {"pmix", "pmi2"}:
        pytest.skip(
            f"srun offers no PMIx/PMI2 plugin here (srun --mpi=list: {sorted(plugins)}); "
            "LAUNCHER=mpirun is tested instead"
        )


def submit(
    cluster: SlurmCluster,
    script: Path,
    tmp_path: Path,
    *,
    launcher: str,
    overrides: str,
    config: str | None = "configs/digits_codistill.yaml",
) -> tuple[int, Path, Path]:
    """sbatch `script` the way a user does, from a directory other than the repository (so the
    script must find the repository itself); CONFIG etc. travel in the environment
    (--export=ALL)."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = {
        "RUN_DIR": str(run_dir),
        "OVERRIDES": overrides,
        "LAUNCHER": launcher,
        "PYTHON": sys.executable,
    }
    if config:
        env["CONFIG"] = config
    job, _ = cluster.sbatch(
        [*ONE_NODE, f"--output={out}", "--export=ALL", str(script)], env=env, cwd=tmp_path
    )
    return job, run_dir, out


def finished(cluster: SlurmCluster, job: int, out: Path, *, timeout: float = 240) -> dict:
    """Wait for the job to end for good (polling scontrol: `sbatch --wait` polls with a doubling
    interval and would add up to a minute here); returns its scontrol fields."""
    try:
        return cluster.wait_job(job, timeout=timeout)
    except SlurmError as e:
        raise AssertionError(f"{e}\n--- job output ---\n{read(out)}") from None


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written)"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu")


def assert_completed(fields: dict, out: Path) -> str:
    log = read(out)
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", (
        f"job {fields.get('JobId')} ended {fields.get('JobState')} {fields.get('ExitCode')}\n{log}"
    )
    return log


def test_sbatch_scripts_parse_and_request_requeue():
    """Cheap, cluster-free: both scripts are valid bash with the preemption directives."""
    for script in (CODISTILL_SBATCH, ALLREDUCE_SBATCH):
        subprocess.run(["bash", "-n", str(script)], check=True)
        directives = [
            line for line in script.read_text().splitlines() if line.startswith("#SBATCH")
        ]
        assert any(d.split()[1].startswith("--signal=B:USR1@") for d in directives), script
        assert "#SBATCH --requeue" in directives, script


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_codistill_sbatch_runs_to_the_end(slurm, tmp_path, launcher):
    """4 tasks on one node, 2 models x 2 ranks: the run completes and leaves its results."""
    if launcher == "srun":
        srun_mpi_or_skip(slurm)
    start = time.monotonic()
    job, run_dir, out = submit(
        slurm, CODISTILL_SBATCH, tmp_path, launcher=launcher, overrides=f"{QUIET} train.steps=60"
    )
    log = assert_completed(finished(slurm, job, out), out)
    print(f"{launcher}: job {job} took {time.monotonic() - start:.1f}s")
    assert f"] {launcher} " in log, log  # the launch line the script logged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["topology"] == {"world_size": 4, "n_models": 2, "group_size": 2}
    assert summary["steps"] == 60
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
        ALLREDUCE_SBATCH,
        tmp_path,
        launcher=launcher,
        overrides=f"{QUIET} train.steps=30",
        config="configs/digits_allreduce.yaml",
    )
    assert_completed(finished(slurm, job, out), out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["topology"] == {"world_size": 4, "n_models": 1, "group_size": 4}
    assert (run_dir / "model_0.pt").exists()


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_preemption_requeues_and_resumes_bitwise(slurm, tmp_path, ranks, launcher):
    """SIGUSR1 to the batch shell (what --signal=B:USR1 does) mid-run: the script forwards it
    through the launcher, the ranks checkpoint and exit 75, the script requeues the job, the same
    job id runs again and resumes; the final weights are bitwise those of an uninterrupted run."""
    if launcher == "srun":
        srun_mpi_or_skip(slurm)
    steps = 600
    overrides = f"{QUIET} train.steps={steps} train.log_every=10 run.checkpoint_every=0"
    job, run_dir, out = submit(
        slurm, CODISTILL_SBATCH, tmp_path, launcher=launcher, overrides=overrides
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):  # training is under way
        fields = slurm.job(job)
        assert fields.get("JobState") not in TERMINAL_STATES, (
            f"job ended before training began\n{read(out)}"
        )
        assert time.monotonic() < deadline, f"no metrics after 180s\n{read(out)}"
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])

    # Requeued: back to PENDING with Restarts=1 (until the credential lifetime passes), same id.
    try:
        fields = slurm.wait_job(
            job,
            timeout=120,
            until=lambda f: (
                int(f.get("Restarts", "0")) >= 1 or f.get("JobState") in TERMINAL_STATES
            ),
        )
    except SlurmError as e:
        raise AssertionError(f"{e}\n{read(out)}") from None
    assert int(fields.get("Restarts", "0")) >= 1, f"job was not requeued: {fields}\n{read(out)}"
    checkpoints = [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()]
    assert checkpoints, (
        f"no checkpoint in {run_dir / 'checkpoints'} after the preemption\n{read(out)}"
    )
    assert not (run_dir / "summary.json").exists(), "the run had already finished when preempted"

    log = assert_completed(finished(slurm, job, out), out)
    assert "(exit 75): requeueing job" in log and "restart 1:" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps

    # The same run without interruption, started directly under mpirun.
    ranks(
        4,
        [
            "-m",
            "hvcodistill.train",
            "--config",
            str(ROOT / "configs" / "digits_codistill.yaml"),
            *overrides.split(),
            f"run.dir={tmp_path / 'reference'}",
        ],
    )
    for i in (0, 1):
        resumed, reference = (
            load(run_dir / f"model_{i}.pt"),
            load(tmp_path / "reference" / f"model_{i}.pt"),
        )
        assert resumed.keys() == reference.keys()
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), (
                f"model {i} {name}: the requeued run differs from the uninterrupted one"
            )
