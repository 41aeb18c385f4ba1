import pytest

from hvcodistill.comm.topology import Topology
from hvcodistill.errors import ConfigError


def test_contiguous_groups_and_peers():
    t = Topology(world_size=6, n_models=3)
    assert t.group_size == 2
    assert [t.model_id(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [t.group_rank(r) for r in range(6)] == [0, 1, 0, 1, 0, 1]
    assert t.group_members(1) == [2, 3]
    assert t.peers(1) == [1, 3, 5]
    assert t.as_dict() == {"world_size": 6, "n_models": 3, "group_size": 2}


def test_one_model_is_plain_allreduce():
    t = Topology(world_size=4, n_models=1)
    assert t.group_size == 4 and t.peers(2) == [2] and t.group_members(0) == [0, 1, 2, 3]


@pytest.mark.parametrize("w,m", [(4, 3), (4, 0), (2, 4), (0, 1), (4, -2)])
def test_impossible_layouts_name_w_m_and_g(w, m):
    with pytest.raises(ConfigError) as e:
        Topology(world_size=w, n_models=m)
    msg = str(e.value)
    assert f"W={w}" in msg and f"M={m}" in msg and "G=" in msg and "\n" not in msg
