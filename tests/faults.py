"""Helpers of the fault tests (test_faults_mpi.py, test_faults_cluster.py, test_faults_slurm.py):
a training run to break, its ranks found by their run.dir, and the clock from fault to exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")
STEPS = 300
# constant lr: the run may be resumed with the same command; checkpoints every 20 steps
TRAIN_ARGS = [
    "train.epochs=0",
    f"train.steps={STEPS}",
    "train.progress=false",
    "train.eval_every=0",
    "train.log_every=10",
    "run.checkpoint_every=20",
    "optim.lr_schedule=constant",
]
FAIL_FAST_S = 30  # issue 10, point 5: every rank ends within 30 s of a lost rank or node


def train_command(run_dir: Path, *overrides: str, python: str = sys.executable) -> list[str]:
    return [
        python,
        "-m",
        "hvcodistill.train",
        "--config",
        CONFIG,
        *TRAIN_ARGS,
        f"run.dir={run_dir}",
        *overrides,
    ]


def rank_pids(run_dir: Path) -> dict[int, int]:
    """world rank -> pid of every live trainer process of `run_dir` (on any launcher)."""
    tag = f"run.dir={run_dir}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if tag not in argv or b"hvcodistill.train" not in argv:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has ended
            env = dict(
                item.split(b"=", 1)
                for item in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )
        except (OSError, ValueError):
            continue
        rank = env.get(b"OMPI_COMM_WORLD_RANK") or env.get(b"PMIX_RANK") or env.get(b"SLURM_PROCID")
        if rank is not None:
            found[int(rank)] = int(entry.name)
    return found


def wait_for(what: str, ready, timeout: float, alive=lambda: True, log=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert alive(), f"the run ended while waiting for {what}\n{log()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s\n{log()}"
        time.sleep(0.05)


def complete_checkpoints(run_dir: Path) -> list[int]:
    """Steps that every model has a checkpoint with its sidecar for (the sidecar comes last)."""
    models = sorted((run_dir / "checkpoints").glob("model_*"))
    steps = [{int(p.stem.split("_")[1]) for p in m.glob("step_*.json")} for m in models]
    return sorted(set.intersection(*steps)) if len(steps) >= 2 else []


def ranks_gone(run_dir: Path, timeout: float) -> float | None:
    """Seconds until no trainer process of `run_dir` is left, None if some still are after
    `timeout`."""
    start = time.monotonic()
    while rank_pids(run_dir):
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def kill_all(run_dir: Path) -> None:
    """Clean-up after a failed test: SIGKILL every trainer process of this run (ours, by pid)."""
    for pid in rank_pids(run_dir).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def summary_steps(run_dir: Path) -> int:
    return json.loads((run_dir / "summary.json").read_text())["steps"]


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """The launcher in a session of its own (as a terminal or batch shell would run it)."""
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
