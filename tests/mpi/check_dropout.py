"""Per-rank RNG streams under real ranks. Case `dropout` of checks.py.

Initialisation is identical inside a group (checked on prepare()'s model, before Horovod's
broadcast could hide a difference) and differs between models; with dropout, the ranks of one
group draw different masks (the same model on the same input gives different outputs); after a
few steps with dropout the group's parameters are still identical.
"""

import torch
from common import batch, connect, fail, params_digest, private_run_dir
from mpi4py import MPI

from hvcodistill.config import load_config
from hvcodistill.training.loop import train_step
from hvcodistill.training.setup import prepare


def run(arg, overrides):
    world = MPI.COMM_WORLD
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.name=mlp",
            "model.hidden=[64]",
            "model.dropout=0.5",
            "train.steps=4",
            "train.batch_size=8",
            "train.progress=false",
            *overrides,
            f"run.dir={private_run_dir(world)}",
        ],
    )
    prepared = prepare(cfg, world.Get_size(), world.Get_rank())
    topo, data, model = prepared.topo, prepared.data, prepared.model
    me = world.Get_rank()
    inits = world.allgather((topo.model_id(me), params_digest(model)))
    for r, (m, digest) in enumerate(inits):
        if digest != inits[m * topo.group_size][1]:
            fail(f"rank {r} of model {m} starts from other weights than its group")
    if len({d for _, d in inits}) != topo.n_models:
        fail("models start from the same weights")

    tr = connect(cfg, prepared)
    tr.model.train()
    with torch.no_grad():
        probe = tr.model(
            torch.ones(16, *data.input_shape, device=tr.device)
        )  # same input, same weights
    outs = tr.comms.group.allgather(probe.cpu())
    if any(torch.equal(outs[0], o) for o in outs[1:]):
        fail("ranks of one group drew identical dropout masks")
    for step in range(3):
        train_step(tr, step, *batch(tr, step))
    digests = tr.comms.group.allgather(params_digest(tr.model))
    if len(set(digests)) != 1:
        fail("a group's parameters differ after steps with dropout")
    return f"dropout ok: W={topo.world_size} M={topo.n_models}"
