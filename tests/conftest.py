import subprocess
import sys
from pathlib import Path

import pytest

from hvcodistill.launch import mpirun_command

ROOT = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).parent / "mpi"


def run_ranks(np: int, args: list[str], *, timeout: float = 300, cwd: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Start `np` real Open MPI ranks of `python args...` and return the finished process."""
    cmd, env = mpirun_command(np, [sys.executable, *args])
    proc = subprocess.run(cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{np} ranks of {' '.join(args)} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def ranks():
    return run_ranks
