"""A plain DistributedDataParallel loop over gloo, written without hvcodistill's trainer, as the
M = 1 reference of train.backend=torch (tests/mpi/plain_horovod.py's loop, with DDP).

Arguments, model, data and data order: plain_loop.py. The ranks are Open MPI's; torch.distributed
meets at the address world rank 0 broadcasts, as a user's script on mpirun would.
"""

import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI
from plain_loop import arguments, batches, digits_mlp, sgd
from torch.nn.parallel import DistributedDataParallel

out, steps, batch, lr, seed = arguments()
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
port = None
if rank == 0:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
port = world.bcast(port, root=0)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
data, model = digits_mlp(seed)
ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
opt = sgd(model, lr)
for x, y in batches(data, steps, batch, seed, rank, size):
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
if rank == 0:
    torch.save(model.state_dict(), out)
dist.destroy_process_group()
