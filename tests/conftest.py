import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvcodistill.cluster import EmulatedCluster, cluster_unavailable
from hvcodistill.mpirun import mpirun_command

ROOT = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).parent / "mpi"


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


def _repo_runs() -> set[str]:
    runs = ROOT / "runs"
    return {str(p.relative_to(runs)) for p in runs.rglob("*")} if runs.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def repository_runs_untouched():
    """Tests write under tmp_path only: the repository's runs/ (a user's results) is left as
    found."""
    before = _repo_runs()
    yield
    new = sorted(_repo_runs() - before)
    assert not new, f"tests wrote into the repository's runs/: {new[:5]}"


@pytest.fixture
def ranks():
    return run_ranks


# ---------------------------------------------------------------- the emulated cluster (root only)
UNAVAILABLE = cluster_unavailable()
needs_cluster = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
_names = itertools.count()


def unique_name() -> str:
    return f"t{os.getpid()}{next(_names)}"


def our_namespaces(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"hvc_{name}_")]


@pytest.fixture
def make_cluster(tmp_path):
    """Build clusters with unique names in a private state dir; take every one down afterwards."""
    made = []

    def make(nodes=2, **kw):
        c = EmulatedCluster(nodes, name=unique_name(), state_dir=tmp_path / "state", **kw)
        made.append(c)
        return c.up()

    yield make
    for c in made:
        c.down(quiet=True)
        assert our_namespaces(c.name) == [], f"namespaces of {c.name} left behind"
