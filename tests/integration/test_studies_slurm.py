"""`python -m hvcodistill.sweep --slurm` on the real one-node SLURM of tests/slurm_cluster.py: one
job array, a task per run, slurm/sweep.sbatch handing each run to slurm/codistill.sbatch; one task
is preempted (SIGUSR1 to its batch shell), requeued alone, and resumes its run. The cluster is
the session's (tests/slurm_cluster.py)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT
from tests.slurm_cluster import Hold

pytestmark = pytest.mark.slurm

ONE_NODE = "--nodes=1 --ntasks-per-node=4 --cpus-per-task=1 --gpus-per-node=0 --time=20"
STEPS = 60
HOLD_STEP = 20  # task 0 waits before this step (it has logged step 10) until it is signalled


def test_sweep_sbatch_parses_and_requests_requeue():
    script = ROOT / "slurm" / "sweep.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives and any("--signal=B:USR1@" in d for d in directives)


def test_study_as_a_job_array_with_a_preempted_task(slurm, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        textwrap.dedent(f"""\
        name: arr
        config: {ROOT / "configs" / "digits_codistill.yaml"}
        ranks: 4
        seeds: [0, 1]
        checkpoint_every: 0
        overrides: [train.epochs=0, train.steps={STEPS}, train.log_every=10, train.progress=false,
                    run.preempt_check_every=1]
        variants:
          predictions: {{}}
        """)
    )
    study_dir = tmp_path / "runs"
    runs = [study_dir / "predictions" / f"seed_{s}" for s in (0, 1)]
    # task 0 cannot finish before it is preempted; task 1 runs through
    hold = Hold(tmp_path, runs[0], step=HOLD_STEP)
    launcher = "srun" if slurm.mpi_plugins() & {"pmix", "pmi2"} else "mpirun"
    env = dict(slurm.env, LAUNCHER=launcher, **hold.env)
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvcodistill.sweep",
            str(study),
            "--dir",
            str(study_dir),
            "--slurm",
            "--sbatch-args",
            ONE_NODE,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "submitted job array" in submit.stdout, submit.stdout
    array = submit.stdout.split("submitted job array ")[1].split(":")[0]
    busy = subprocess.run(
        [sys.executable, "-m", "hvcodistill.sweep", str(study), "--dir", str(study_dir), "--slurm"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert busy.returncode == 2 and "still queued or running" in busy.stderr, (
        busy.stdout + busy.stderr
    )

    def read(path):
        return path.read_text(errors="replace") if path.exists() else f"({path} not written)"

    def logs():
        return "\n".join(
            f"--- {p} ---\n{read(p)}"
            for p in [r / "run.log" for r in runs] + sorted((study_dir / "slurm").glob("*.out"))
        )

    # Preempt task 0 once it trains: what --signal=B:USR1@300 does before a time limit.
    metrics = runs[0] / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, f"task 0 did not start training in 180 s\n{logs()}"
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", "--batch", f"{array}_0"])
    squeue = ["squeue", "-h", "-j", f"{array}_0", "-o", "%T"]
    deadline = time.monotonic() + 120
    while slurm.run(squeue, check=False).stdout.strip() == "RUNNING":  # until it is requeued
        assert time.monotonic() < deadline, f"task 0 still running 120 s after USR1\n{logs()}"
        time.sleep(0.5)
    hold.release()

    deadline = time.monotonic() + 300
    while slurm.run(["squeue", "-h", "-j", array], check=False).stdout.strip():
        assert time.monotonic() < deadline, f"array {array} still queued after 300 s\n{logs()}"
        time.sleep(0.5)
    for run in runs:
        assert (run / "summary.json").exists(), f"{run} has no summary\n{logs()}"
    preempted = json.loads((runs[0] / "summary.json").read_text())
    resumed = preempted["resumed_from_step"]
    assert preempted["steps"] == STEPS and 0 < resumed <= HOLD_STEP + 2, logs()
    assert "(exit 75): requeueing job" in read(runs[0] / "run.log"), logs()
    other = json.loads((runs[1] / "summary.json").read_text())
    assert other["resumed_from_step"] == 0 and other["topology"]["n_models"] == 2
    assert f"] {launcher} " in read(runs[1] / "run.log")  # codistill.sbatch's launch line
    assert "run predictions/seed_1 on 4 ranks" in read(next((study_dir / "slurm").glob("*_1.out")))

    # Submitting again finds nothing left to do.
    again = subprocess.run(
        [sys.executable, "-m", "hvcodistill.sweep", str(study), "--dir", str(study_dir), "--slurm"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "0 to submit" in again.stdout, again.stdout
