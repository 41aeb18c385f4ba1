"""Run with 4 ranks on an emulated cluster of 2 nodes x 2 slots (tests/integration/test_cluster.py).

Checks that Open MPI sees two nodes: processor names, the shared-memory split {0,1} on node0 and
{2,3} on node1, Horovod's local ranks and a Horovod sum over the world; then all-reduces 4 MiB with
MPI so that the test can compare the bytes each node's link carried with the ring's share.
"""

import socket
import sys

import horovod.torch as hvd
import numpy as np
import torch
from mpi4py import MPI

ALLREDUCE_BYTES = 4 * 2**20

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()


def fail(msg):
    print(f"rank {rank}: FAIL: {msg}", file=sys.stderr, flush=True)
    world.Abort(1)


host = socket.gethostname()
name = MPI.Get_processor_name()
node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks Open MPI considers on this rank's node
members = node.allgather(rank)
placement = world.gather((rank, host, name, members), root=0)
if rank == 0:
    for r, h, n, m in placement:
        print(f"rank {r}: hostname {h}, processor name {n}, shared-memory group {m}")
expected_host = f"node{rank // 2}"
if host != expected_host or name != expected_host:
    fail(f"on {host} (processor name {name}), expected {expected_host}")
if members != [2 * (rank // 2), 2 * (rank // 2) + 1]:
    fail(f"shared-memory group {members}, expected the two ranks of {expected_host}")

# Horovod over the world: its local rank/size come from the same shared-memory split.
hvd.init()
if (hvd.size(), hvd.local_size(), hvd.local_rank()) != (size, 2, rank % 2):
    fail(f"horovod size {hvd.size()} local {hvd.local_rank()}/{hvd.local_size()}")
total = (
    hvd.allreduce(torch.full((1000,), float(rank + 1)), op=hvd.Sum, name="sum").unique().tolist()
)
if total != [size * (size + 1) / 2]:
    fail(f"horovod sum {total} != {size * (size + 1) / 2}")

# One 4 MiB MPI_Allreduce on the world (ring, pinned by the cluster's mpirun): each rank sends
# 2 (W-1)/W x 4 MiB to the next rank, and one rank per node sends it over the link.
buf = np.full(ALLREDUCE_BYTES // 4, rank + 1, dtype=np.float32)
out = np.empty_like(buf)
world.Allreduce(buf, out, op=MPI.SUM)
if not np.all(out == size * (size + 1) / 2):
    fail("MPI allreduce sum wrong")
world.Barrier()
if rank == 0:
    print(
        f"nodes ok: 2 nodes x 2 ranks, horovod sum {total[0]:g}, allreduce {ALLREDUCE_BYTES} bytes",
        flush=True,
    )
