"""The split, Horovod on group_comm and the peer communicators on 4 real ranks."""

import pytest

from tests.mpi.checks import ident, result

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("check", [(4, "topology")], ids=ident)
def test_groups_peers_and_thread_multiple_on_4_ranks(request, check):
    assert (
        result(request, check)
        == "topology ok: groups [0,1] [2,3]; peers [0,2] [1,3]; THREAD_MULTIPLE"
    )
