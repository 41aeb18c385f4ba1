"""The byte model (hvcodistill/comm/traffic.py) against hand counts; no MPI."""

import pytest

from hvcodistill.comm.topology import NodeLayout
from hvcodistill.comm.traffic import (
    COLLECTIVES,
    LINKS,
    Traffic,
    allgather_sends,
    gather_sends,
    hierarchical_allreduce_sends,
    horovod_algorithm,
    job_allreduce_bytes,
    per_step,
    ring_allreduce_sends,
)

TWO_BY_TWO = NodeLayout.contiguous(4, 2)  # ranks 0,1 on node 0; 2,3 on node 1
MB = 16_000_000


def test_layout_contiguous_and_links():
    assert TWO_BY_TWO.node_of == (0, 0, 1, 1) and TWO_BY_TWO.n_nodes == 2
    assert TWO_BY_TWO.ranks_per_node() == [2, 2]
    assert TWO_BY_TWO.link(0, 1) == "intra_node" and TWO_BY_TWO.link(1, 2) == "inter_node"


def test_ring_over_two_nodes_crosses_twice():
    # ring 0->1->2->3->0: each rank sends 2 (G-1)/G S = 1.5 S to its successor; 1->2 and 3->0 cross
    sends = {r: ring_allreduce_sends([0, 1, 2, 3], r, MB, TWO_BY_TWO) for r in range(4)}
    assert sends[0] == {"intra_node": 24_000_000, "inter_node": 0}
    assert sends[1] == {"intra_node": 0, "inter_node": 24_000_000}
    assert job_allreduce_bytes("ring", TWO_BY_TWO, [0, 1, 2, 3], MB) == {
        "intra_node": 48_000_000,
        "inter_node": 48_000_000,
    }


def test_group_inside_a_node_never_crosses_and_one_rank_sends_nothing():
    assert job_allreduce_bytes("ring", TWO_BY_TWO, [2, 3], MB) == {
        "intra_node": 32_000_000,
        "inter_node": 0,
    }  # S each
    assert ring_allreduce_sends([3], 3, MB, TWO_BY_TWO) == {"intra_node": 0, "inter_node": 0}


def test_hierarchical_sends_one_shard_across():
    layout = NodeLayout.contiguous(8, 4)  # 2 nodes of 4
    mine = hierarchical_allreduce_sends(list(range(8)), 5, MB, layout)
    # inside the node: 2 (L-1)/L S; across: a ring of n=2 nodes on an S/L shard: 2 (n-1)/n S/L
    assert mine == {"intra_node": 2 * 3 * MB // 4, "inter_node": MB // 4}
    total = job_allreduce_bytes("hierarchical", layout, list(range(8)), MB)
    assert total["inter_node"] == 2 * MB  # 2 (n-1) S for the whole job


def test_allgather_and_gather_attribute_each_transfer():
    # peers 1 and 3 (group rank 1 of models 0 and 1) sit on different nodes
    assert allgather_sends([1, 3], 1, 1000, TWO_BY_TWO) == {"intra_node": 0, "inter_node": 1000}
    assert allgather_sends([0, 1, 2], 0, 10, TWO_BY_TWO) == {"intra_node": 10, "inter_node": 10}
    assert gather_sends(0, 3, 7, TWO_BY_TWO) == {"intra_node": 0, "inter_node": 7}
    assert gather_sends(0, 0, 7, TWO_BY_TWO) == {"intra_node": 0, "inter_node": 0}


def test_traffic_round_trips_and_per_step():
    t = Traffic()
    t.add("allreduce", {"intra_node": 10, "inter_node": 30})
    t.add("exchange", {"inter_node": 5})
    back = Traffic()
    back.load_state_dict(t.state_dict())
    assert back.bytes == t.bytes and back.flat() == t.flat()
    assert Traffic.unflat(t.flat()) == t.bytes and len(t.flat()) == len(COLLECTIVES) * len(LINKS)
    rows = per_step(t.bytes, 5)
    assert rows["allreduce"] == {"intra_node": 2, "inter_node": 6}
    assert rows["total"] == {"intra_node": 2, "inter_node": 7}


@pytest.mark.parametrize(
    "device,env,want",
    [
        ("cpu", {"HOROVOD_HIERARCHICAL_ALLREDUCE": "1"}, "ring"),  # NCCL-only in Horovod
        ("cuda", {"HOROVOD_HIERARCHICAL_ALLREDUCE": "1"}, "hierarchical"),
        ("cuda", {}, "ring"),
    ],
)
def test_algorithm_follows_horovod(device, env, want):
    assert horovod_algorithm(device, env) == want
