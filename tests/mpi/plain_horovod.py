"""A plain Horovod data-parallel loop, written without hvcodistill's trainer, as the M = 1
reference.

argv: out.pt steps batch_size lr seed. Same data order as documented in
hvcodistill/data/sharding.py: one shared permutation per epoch (seeded seed*1000003+epoch), rank r
takes its slice of each block.
"""

import sys

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvcodistill.data import build_datasets
from hvcodistill.models import build_model

out, steps, batch, lr, seed = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
hvd.init()
data = build_datasets("digits")
torch.manual_seed(seed)
model = build_model(
    "mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=[128, 64]
)
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
n = len(data.train)
per_epoch = n // (hvd.size() * batch)
for step in range(steps):
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (j * hvd.size() + hvd.rank()) * batch
    x, y = data.train[(epoch, perm[start : start + batch])]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
if hvd.rank() == 0:
    torch.save(model.state_dict(), out)
