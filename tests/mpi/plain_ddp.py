"""A plain DistributedDataParallel loop over gloo, written without hvcodistill's trainer, as the
M = 1 reference of train.backend=torch (tests/mpi/plain_horovod.py's loop, with DDP).

argv: out.pt steps batch_size lr seed. The ranks are Open MPI's; torch.distributed meets at the
address world rank 0 broadcasts, as a user's script on mpirun would.
"""

import socket
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel

from hvcodistill.data import build_datasets
from hvcodistill.models import build_model

out, steps, batch, lr, seed = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
port = None
if rank == 0:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
port = world.bcast(port, root=0)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
data = build_datasets("digits")
torch.manual_seed(seed)
model = build_model(
    "mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=[128, 64]
)
ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
n = len(data.train)
per_epoch = n // (size * batch)
for step in range(steps):
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (j * size + rank) * batch
    x, y = data.train[(epoch, perm[start : start + batch])]
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
if rank == 0:
    torch.save(model.state_dict(), out)
dist.destroy_process_group()
