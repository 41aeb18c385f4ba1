"""Helpers for the scripts that tests run under mpirun: build the real trainer from overrides, and
close what a check case opened before the next case of the same job (tests/mpi/checks.py)."""

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

CASE = None  # the check case running now (checks.py sets it): fail() names it
_opened = []  # the trainers and run dirs of the case running now, closed by close_case()


def private_run_dir(world) -> str:
    """A fresh temporary run.dir shared by this job's ranks (never the repository's runs/),
    removed at the end of the case (close_case) or when rank 0 exits."""
    path = tempfile.mkdtemp(prefix="hvcodistill-mpi-test-") if world.Get_rank() == 0 else None
    if path is not None:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _opened.append(path)
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
    tr = build_trainer(
        cfg, comms, make_data_plane(cfg.train.backend, comms, device.type), device, prepared
    )
    _opened.append(tr)
    # what travels between the models goes on the data plane's own wire (comm/dataplane.py)
    wire = getattr(tr.exchange, "wire", None)
    if wire is not None and wire.name != WIRES[tr.plane.name]:
        fail(f"the {tr.plane.name} data plane's exchange travels on {wire.name}")
    return tr


WIRES = {"horovod": "mpi", "torch": "torch"}  # a data plane -> its exchanges' wire


def close_case():
    """Every rank, at the same point, after a case: a weights refresh still in flight arrives,
    the logs close, the Horovod data plane shuts down (the next case starts Horovod again on its
    own group_comm) and the case's run dirs are removed."""
    world = MPI.COMM_WORLD
    for item in _opened:
        if not isinstance(item, str):
            finish = getattr(item.exchange, "finish", None)
            if finish is not None:
                finish()
            item.logger.close()
    world.Barrier()
    for item in _opened:
        if isinstance(item, str):
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.plane.shutdown()
    _opened.clear()


def batch(tr, step):
    x, y = tr.data.train[tr.plan.key(step)]
    return x.to(tr.device), y.to(tr.device)


def params_digest(module):
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fail(msg):
    case = f"{CASE}: " if CASE else ""
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: FAIL: {case}{msg}", file=sys.stderr, flush=True)
    MPI.COMM_WORLD.Abort(1)
