"""Case `topology` of checks.py (4 ranks, M = 2): the split, Horovod on group_comm, peers,
THREAD_MULTIPLE."""

import horovod.torch as hvd
import torch
from mpi4py import MPI

from hvcodistill.comm.topology import split_communicators


def run(arg, overrides):
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    assert world.Get_size() == 4, "the topology case runs on 4 ranks"
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE, "MPI is not THREAD_MULTIPLE"
    comms = split_communicators(world, n_models=2)
    assert comms.topology.group_size == 2
    assert comms.model_id == rank // 2, (rank, comms.model_id)  # contiguous placement
    assert comms.group.Get_size() == 2 and comms.group_rank == rank % 2

    hvd.init(comm=comms.group)
    assert hvd.size() == 2 and hvd.rank() == comms.group_rank
    # A Horovod sum stays inside the group: model 0 sees 0+1, model 1 sees 2+3.
    total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum, name="probe").item()
    expected = sum(comms.topology.group_members(comms.model_id))
    assert total == expected, f"rank {rank}: group sum {total} != {expected}"

    # The peer communicator pairs 0 with 2 and 1 with 3.
    peers = comms.peer.allgather(rank)
    assert peers == comms.topology.peers(comms.group_rank), (rank, peers)
    assert peers == [rank % 2, rank % 2 + 2], (rank, peers)
    world.Barrier()
    hvd.shutdown()  # every rank: the next case starts Horovod on its own group_comm
    return "topology ok: groups [0,1] [2,3]; peers [0,2] [1,3]; THREAD_MULTIPLE"
