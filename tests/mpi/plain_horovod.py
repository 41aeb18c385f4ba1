"""A plain Horovod data-parallel loop, written without hvcodistill's trainer, as the M = 1
reference. Arguments, model, data and data order: plain_loop.py.
"""

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from plain_loop import arguments, batches, digits_mlp, sgd

out, steps, batch, lr, seed = arguments()
hvd.init()
data, model = digits_mlp(seed)
opt = hvd.DistributedOptimizer(
    sgd(model, lr), named_parameters=model.named_parameters(), op=hvd.Average
)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
for x, y in batches(data, steps, batch, seed, hvd.rank(), hvd.size()):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
if hvd.rank() == 0:
    torch.save(model.state_dict(), out)
