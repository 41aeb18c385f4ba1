"""Helpers for the scripts that tests run under mpirun: build the real trainer from overrides."""
import argparse
import hashlib
import sys

from mpi4py import MPI

from hvcodistill import train as T


def make_trainer(overrides, config=None):
    world = MPI.COMM_WORLD
    args = argparse.Namespace(config=config, overrides=list(overrides) + ["train.progress=false"])
    cfg, topo, data, plan, model = T.agree(world, lambda: T.prepare(args, world.Get_size(), world.Get_rank()))
    return T.connect(cfg, topo, data, plan, model, world)


def batch(tr, step):
    x, y = tr.data.train[tr.plan.key(step)]
    return x.to(tr.device), y.to(tr.device)


def params_digest(module):
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fail(msg):
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: FAIL: {msg}", file=sys.stderr, flush=True)
    MPI.COMM_WORLD.Abort(1)
