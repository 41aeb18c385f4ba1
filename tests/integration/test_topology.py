import pytest

from tests.conftest import MPI_DIR

pytestmark = pytest.mark.mpi


def test_groups_peers_and_thread_multiple_on_4_ranks(ranks):
    proc = ranks(4, [str(MPI_DIR / "check_topology.py")], timeout=120)
    assert "topology ok" in proc.stdout
