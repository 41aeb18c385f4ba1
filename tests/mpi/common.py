"""Helpers for the scripts that tests run under mpirun: build the real trainer from overrides."""
import argparse
import atexit
import hashlib
import shutil
import sys
import tempfile

from mpi4py import MPI

from hvcodistill import train as T


def private_run_dir(world) -> str:
    """A fresh temporary run.dir shared by this job's ranks (never the repository's runs/),
    removed when rank 0 exits."""
    path = tempfile.mkdtemp(prefix="hvcodistill-mpi-test-") if world.Get_rank() == 0 else None
    if path is not None:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return world.bcast(path, root=0)


def make_trainer(overrides, config=None):
    world = MPI.COMM_WORLD
    overrides = [o for o in overrides if not o.startswith("run.dir=")] + [f"run.dir={private_run_dir(world)}"]
    args = argparse.Namespace(config=config, overrides=overrides + ["train.progress=false"])
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
