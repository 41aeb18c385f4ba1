"""Helpers of the fault tests (tests/integration/test_faults*.py):
a training run to break, its ranks found by their run.dir, and the clock from fault to exit.

A fault test's run must not be able to end before its fault: train.steps=UNBOUNDED makes the fault
(or the signal) its only end; set-up held on the MNIST-1D lock (`setup_held`) makes a run that
cannot finish set-up. The user promises are the only time bounds: FAIL_FAST_S (tests/helpers.py),
CTRL_C_S and DISK_FULL_S."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import ROOT

CONFIG = str(ROOT / "configs" / "digits_codistill.yaml")
# promises to users (docs/clusters.md): Ctrl-C ends the job within 10 s, a full disk within 30 s
CTRL_C_S = 10
DISK_FULL_S = 30
# train.steps of a run whose only end is its fault: at the slowest step seen here (~50 ms) it
# would train for over a year
UNBOUNDED = 10**9
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
        # (not log(): reading a live process's pipes to the end would wait for its end)
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
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


@contextlib.contextmanager
def training(cmd: list[str], env: dict | None, run_dir: Path, timeout: float = 180):
    """The set-up every fault test of a training run shares: the launcher started and a complete
    checkpoint written (so the ranks are in the loop). Yields the launcher; on leaving, every
    trainer process of `run_dir` still there is killed."""
    proc = start(cmd, env)
    try:
        wait_for(
            "checkpoint",
            lambda: complete_checkpoints(run_dir),
            timeout,
            alive=lambda: proc.poll() is None,
            log=lambda: proc.stderr.read(),
        )
        yield proc
    finally:
        kill_all(run_dir)


def mnist1d_cache(data_dir: Path) -> Path:
    """The file the ranks cache MNIST-1D in under data.path (hvcodistill/data/datasets.py); they
    take `<it>.lock` before generating or reading it."""
    from importlib import metadata

    from hvcodistill.data.datasets import MNIST1D_ARGS

    key = json.dumps({**MNIST1D_ARGS, "version": metadata.version("mnist1d")}, sort_keys=True)
    return Path(data_dir) / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def waiting_on(lock: Path) -> set[int]:
    """Pids blocked in flock() on `lock` (/proc/locks: '-> FLOCK ... pid dev:inode')."""
    inode = str(lock.stat().st_ino)
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and fields[fields.index("->") + 1] == "FLOCK":
            pid, where = fields[fields.index("->") + 4 : fields.index("->") + 6]
            if where.rsplit(":", 1)[1] == inode:
                pids.add(int(pid))
    return pids


@contextlib.contextmanager
def setup_held(data_dir: Path):
    """The test holds the MNIST-1D cache's lock in `data_dir`: ranks of an mnist1d run there wait
    on it in set-up, and cannot leave set-up, until the block ends."""
    lock = mnist1d_cache(data_dir).with_suffix(".npz.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield lock


def pending(pid: int, sig: int) -> bool:
    """Is `sig` sent to `pid` and not yet delivered (blocked, or the process is stopped)? False
    once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    bit = 1 << (sig - 1)
    return bool((int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)) & bit)


def stopped(pid: int) -> bool:
    """Is `pid` stopped (SIGSTOP)?"""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


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
