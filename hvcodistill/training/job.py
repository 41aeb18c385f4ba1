"""One training job on every rank: read the config, build the trainer, train, finish; an error
becomes its line and exit code through comm.agreement.speak."""

from __future__ import annotations

from mpi4py import MPI

from hvcodistill.comm.agreement import agree, check_same_data, speak
from hvcodistill.comm.dataplane import make_data_plane
from hvcodistill.comm.preemption import PreemptionGuard
from hvcodistill.comm.topology import split_communicators
from hvcodistill.comm.watchdog import Watchdog
from hvcodistill.config import load_config
from hvcodistill.errors import HvcodistillError
from hvcodistill.training.loop import finish, train
from hvcodistill.training.setup import build_trainer, open_run_dir, pick_device, prepare
from hvcodistill.training.summary import done_line
from hvcodistill.training.timing import Timer


def main(config: str, overrides: list[str]) -> int:
    """The job's exit code on this rank (or an abort of the whole job)."""
    try:
        return run(config, overrides)
    except BaseException as error:  # every ending speaks through one function
        return speak(error)


def run(config: str, overrides: list[str]) -> int:
    world = MPI.COMM_WORLD
    timer = Timer()  # the run's wall clock starts here
    cfg = agree(world, lambda: load_config(config, overrides))
    # From here on SIGUSR1/SIGTERM are recorded, not fatal: from the first step on the guard stops
    # the run at a step with a checkpoint; during set-up the watchdog's thread ends every rank
    # (exit 75), as it does on SIGINT (exit 130) and when a rank stops answering.
    with (
        PreemptionGuard(world, every=cfg.run.preempt_check_every) as guard,
        Watchdog(world, timeout=cfg.run.hang_timeout, stepped=lambda: guard.started),
    ):
        prepared = agree(world, lambda: prepare(cfg, world.Get_size(), world.Get_rank()))
        check_same_data(world, prepared.data, cfg.data.path)  # exit 3 if ranks' data differ
        # run.dir: checked (and the checkpoint to resume from read) before anything is written
        resume_step, state, _lock = open_run_dir(world, cfg, prepared)
        comms = split_communicators(world, cfg.codistill.n_models)
        device = pick_device(cfg, comms)
        plane = agree(world, lambda: make_data_plane(cfg.train.backend, comms, device.type))
        try:
            tr = build_trainer(
                cfg,
                comms,
                plane,
                device,
                prepared,
                resume_step=resume_step,
                state=state,
                timer=timer,
            )
            del state
            train(tr, guard)
            guard.close()
            summary = finish(tr)
        except HvcodistillError as e:
            if e.agreed:  # every rank is here: the data plane stops together
                plane.shutdown()
            raise
    if summary is not None:
        print(done_line(summary, tr.run_dir), flush=True)
    plane.shutdown()
    return 0
