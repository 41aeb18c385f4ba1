"""Helpers for the scripts that tests run under mpirun: build the real trainer from overrides."""

import atexit
import hashlib
import shutil
import sys
import tempfile

from mpi4py import MPI

from hvcodistill.comm.dataplane import make_data_plane
from hvcodistill.comm.topology import split_communicators
from hvcodistill.config import load_config
from hvcodistill.training.setup import build_trainer, pick_device, prepare


def private_run_dir(world) -> str:
    """A fresh temporary run.dir shared by this job's ranks (never the repository's runs/),
    removed when rank 0 exits."""
    path = tempfile.mkdtemp(prefix="hvcodistill-mpi-test-") if world.Get_rank() == 0 else None
    if path is not None:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return world.bcast(path, root=0)


def make_trainer(overrides, config=None):
    world = MPI.COMM_WORLD
    overrides = [o for o in overrides if not o.startswith("run.dir=")] + [
        f"run.dir={private_run_dir(world)}"
    ]
    cfg = load_config(config, overrides + ["train.progress=false"])
    return connect(cfg, prepare(cfg, world.Get_size(), world.Get_rank()))


def connect(cfg, prepared):
    """The trainer around a prepared model: the split, the data plane, no run.dir checks."""
    comms = split_communicators(MPI.COMM_WORLD, cfg.codistill.n_models)
    device = pick_device(cfg, comms)
    return build_trainer(
        cfg, comms, make_data_plane("horovod", comms.group, device.type), device, prepared
    )


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
