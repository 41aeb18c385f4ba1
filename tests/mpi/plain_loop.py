"""What the plain data-parallel loops (plain_horovod.py, plain_ddp.py) share, written without
hvcodistill's trainer: their arguments, the model and data, and the data order.

argv: out.pt steps batch_size lr seed. The data order is the one documented in
hvcodistill/data/sharding.py: one shared permutation per epoch (seeded seed*1000003+epoch), rank r
takes its slice of each block.
"""

import sys

import torch

from hvcodistill.data import build_datasets
from hvcodistill.models import build_model


def arguments() -> tuple[str, int, int, float, int]:
    """(out, steps, batch, lr, seed) from argv."""
    out, steps, batch, lr, seed = sys.argv[1:6]
    return out, int(steps), int(batch), float(lr), int(seed)


def digits_mlp(seed: int):
    """(data, model): the digits data and the MLP of digits_allreduce.yaml, seeded as a run."""
    data = build_datasets("digits")
    torch.manual_seed(seed)
    model = build_model(
        "mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=[128, 64]
    )
    return data, model


def sgd(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def batches(data, steps: int, batch: int, seed: int, rank: int, size: int):
    """This rank's (x, y) for each step."""
    n = len(data.train)
    per_epoch = n // (size * batch)
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        start = (j * size + rank) * batch
        yield data.train[(epoch, perm[start : start + batch])]
