"""What the tests share: where things are, one way to start ranks, one way to read an error."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvcodistill.cluster import cluster_unavailable
from hvcodistill.mpirun import mpirun_command

ROOT = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).parent / "mpi"
# a promise to users: every rank ends within 30 s of a lost rank or node (docs/clusters.md)
FAIL_FAST_S = 30


def run_ranks(
    np: int, args: list[str], *, timeout: float = 300, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Start `np` real Open MPI ranks of `python args...` and return the finished process."""
    cmd, env = mpirun_command(np, [sys.executable, *args])
    proc = subprocess.run(
        cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{np} ranks of {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def ours(stderr: str) -> list[str]:
    """The lines hvcodistill itself wrote (not MPI's, not Python's)."""
    return [line for line in stderr.splitlines() if line.startswith("hvcodistill")]


def one_line_exit(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process exited `code` with exactly one hvcodistill error line and no traceback,
    and the line holds every needle; returns the line."""
    err = proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, not {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in ours(err) if "error" in line]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- a set-up without Horovod
# HVCODISTILL_HOROVOD=0 installs no Horovod: tests whose ranks run the default data plane skip,
# saying so; those marked torch_backend (train.backend=torch only) run (tests/conftest.py)
HOROVOD_MISSING = (
    None
    if importlib.util.find_spec("horovod") is not None
    else "Horovod is not installed (a set-up with HVCODISTILL_HOROVOD=0): these ranks run "
    "train.backend=horovod"
)
torch_backend = pytest.mark.torch_backend


# ---------------------------------------------------------------- the emulated cluster (root only)
CLUSTER_UNAVAILABLE = cluster_unavailable()
# a test that needs network namespaces: conftest skips it where they cannot be made
needs_cluster = pytest.mark.cluster
_names = itertools.count()


def unique_name() -> str:
    return f"t{os.getpid()}{next(_names)}"


def our_namespaces(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"hvc_{name}_")]
