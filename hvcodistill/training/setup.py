"""Everything before the first step: the local set-up every rank runs alike, the run directory's
checks and the checkpoint to resume from, then the Trainer, built complete in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from mpi4py import MPI

from hvcodistill.comm.agreement import agree, say
from hvcodistill.comm.dataplane import DataPlane
from hvcodistill.comm.exchange import build_exchange
from hvcodistill.comm.topology import Comms, Topology
from hvcodistill.comm.traffic import Traffic, allgather_sends, allreduce_sends
from hvcodistill.config import Config, check_against_data, save_config, start_warnings
from hvcodistill.data import BatchPlan, DataSpec, mix_seed
from hvcodistill.errors import ConfigError
from hvcodistill.training import checkpoint, rundir
from hvcodistill.training.build import (
    build_data,
    build_model_for,
    build_optimizer,
    build_plan,
    schedules,
    total_steps,
)
from hvcodistill.training.finite import FiniteWatch
from hvcodistill.training.metrics import RunLogger
from hvcodistill.training.timing import Timer
from hvcodistill.training.trainer import Trainer, autocast_for

RANK_STREAM = 0x72616E6B  # mix_seed(train.seed, RANK_STREAM, world rank): a rank's own RNG stream

# Variables through which a launcher or scheduler hands a process GPUs. A value that gives none:
# CUDA_VISIBLE_DEVICES "" or "-1", SLURM's "NoDevFiles" (gres without device files), a count of 0.
GPU_REQUEST_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "GPU_DEVICE_ORDINAL",
)

# Settings a checkpoint must share with the run that resumes it: every key that changes the
# trajectory. The rest may change: logging, evaluation, checkpoint cadence and retention,
# progress, data.workers, data.path (the data's size and shape are compared), train.device, and
# the step count (train.steps/epochs) unless optim.lr_schedule=cosine, whose curve depends on it.
RESUME_KEYS = (
    "codistill.n_models", "codistill.mode", "codistill.every", "codistill.alpha",
    "codistill.distance", "codistill.temperature", "codistill.burn_in_steps",
    "codistill.refresh_delay", "codistill.payload_dtype", "codistill.topk", "data.name",
    "data.order", "data.augment", "model.name", "model.hidden", "model.dropout",
    "model.init_seed", "model.layers", "model.heads", "model.width", "model.context",
    "optim.name", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay",
    "optim.unit", "optim.lr_schedule", "optim.warmup", "optim.lr_milestones", "optim.lr_gamma",
    "optim.wd_milestones", "optim.wd_values", "train.batch_size", "train.seed", "train.amp",
)  # fmt: skip
TOTAL_STEPS_KEY = "train.steps/epochs (total steps; optim.lr_schedule=cosine depends on it)"
DATA_KEY = "data (train samples, input shape, classes)"


@dataclass
class Prepared:
    """What a rank builds alone, before any communication but the agreement."""

    topo: Topology
    data: DataSpec
    plan: BatchPlan
    model: torch.nn.Module
    total_steps: int


def check_environment(cfg: Config) -> None:
    """What this node offers against what the config asks; every rank alike."""
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        raise ConfigError(
            "MPI does not provide MPI_THREAD_MULTIPLE (Horovod and mpi4py share it); "
            "use an MPI built with thread support"
        )
    t = cfg.train
    if t.amp == "fp16" and not (t.device != "cpu" and torch.cuda.is_available()):
        raise ConfigError("train.amp=fp16 needs a GPU; use train.amp=bf16 on CPU")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no GPU on this node")
    asked = gpu_request(os.environ)
    if t.device == "auto" and asked and not torch.cuda.is_available():
        # a job that asked for GPUs must not quietly train on CPU (hours at a fraction of the speed)
        raise ConfigError(
            f"the job asked for GPUs ({asked}) but torch sees none (a CPU-only torch, or no "
            "driver on this node); set train.device=cpu to run on CPU anyway"
        )


def gpu_request(environ) -> str | None:
    """`NAME=value` of the first variable saying this process was given GPUs, else None."""
    names = [*GPU_REQUEST_VARS, *sorted(k for k in environ if k.startswith("SLURM_GPUS"))]
    for name in names:
        value = environ.get(name, "").strip()
        none = ("", "-1", "NoDevFiles") + (("0",) if name.startswith("SLURM_GPUS") else ())
        if name in environ and value not in none:
            return f"{name}={value}"
    return None


def prepare(cfg: Config, world_size: int, world_rank: int) -> Prepared:
    """Everything that needs no communication; any bad input surfaces here, on every rank alike."""
    check_environment(cfg)
    topo = Topology(world_size, cfg.codistill.n_models)
    data = build_data(cfg)
    check_against_data(cfg, data.num_classes)
    plan = build_plan(cfg, topo, world_rank, len(data.train))
    model = build_model_for(cfg, data, topo.model_id(world_rank))
    # From here on, torch's global RNG (dropout masks, on CPU and GPU) is this rank's own stream:
    # ranks of a group see different samples and must not draw identical masks. Checkpoints keep
    # every rank's RNG state, so a resumed run continues each stream exactly.
    torch.manual_seed(mix_seed(cfg.train.seed, RANK_STREAM, world_rank))
    return Prepared(topo, data, plan, model, total_steps(cfg, plan))


def resume_settings(cfg: Config, data: DataSpec, total: int) -> dict:
    """What a checkpoint must share with the run that resumes it, the data's shape included."""
    out = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in RESUME_KEYS}
    out[DATA_KEY] = [len(data.train), list(data.input_shape), data.num_classes]
    out[TOTAL_STEPS_KEY] = total if cfg.optim.lr_schedule == "cosine" else None
    return out


def open_run_dir(world, cfg: Config, p: Prepared) -> tuple[int, dict | None, object]:
    """Check run.dir before writing anything there, then write config.yaml; returns the step to
    resume from, this rank's checkpoint state ((0, None): a fresh start) and the run.dir lock
    (world rank 0 holds it for the run). A refused start (another job on it, other settings,
    checkpoints none usable, entries of the wrong kind, run.dir not shared) raises ConfigError
    on every rank and leaves run.dir as it was, so config.yaml still describes the checkpoints."""
    run_dir, rank, topo = Path(cfg.run.dir), world.Get_rank(), p.topo
    agree(world, lambda: rundir.check_entries(run_dir, topo.n_models) if rank == 0 else None)
    lock = agree(world, lambda: rundir.lock(run_dir) if rank == 0 else None)
    # COMM_WORLD: every checkpoint writer (group rank 0) leaves a mark; after the allgather inside
    # agree (a barrier), world rank 0 must see every mark, or run.dir is node-local somewhere.
    host = MPI.Get_processor_name()
    token = world.bcast(os.urandom(6).hex() if rank == 0 else None, root=0)
    hosts = world.allgather(host)
    writers = {m: hosts[topo.group_members(m)[0]] for m in range(topo.n_models)}
    marker = None

    def leave():
        nonlocal marker
        if topo.group_rank(rank) == 0:
            try:
                marker = rundir.leave_marker(run_dir, topo.model_id(rank), host, token)
            except OSError as e:
                raise ConfigError(
                    f"run.dir {run_dir} cannot be written on {host}: {e.strerror or e}"
                ) from None

    try:
        agree(world, leave)
        agree(
            world,
            lambda: rundir.check_markers(run_dir, writers, token, host) if rank == 0 else None,
        )
    finally:  # every rank alike: agree raises on all of them together
        rundir.remove_marker(marker, run_dir, last=False)
        world.Barrier()  # COMM_WORLD: every mark is gone before rank 0 removes their folder
        rundir.remove_marker(None, run_dir, last=rank == 0)

    def refuse_fresh_start():
        if rank == 0 and any((run_dir / "checkpoints").glob("model_*/step_*.*")):
            # a fresh run would mix its checkpoints with the old ones, and a resume pick either
            raise ConfigError(
                f"run.resume=false but {run_dir / 'checkpoints'} holds checkpoints: "
                "use a new run.dir or delete them"
            )
        return 0, None

    expected = resume_settings(cfg, p.data, p.total_steps)
    if cfg.run.resume:
        start = agree(world, lambda: checkpoint.find_resume(world, run_dir, topo, expected))
    else:
        start = agree(world, refuse_fresh_start)

    def write_config():
        if rank == 0:
            try:
                save_config(cfg, run_dir / "config.yaml")
            except OSError as e:
                raise ConfigError(
                    f"run.dir {run_dir} cannot be written: {e.strerror or e}"
                ) from None

    agree(world, write_config)
    if rank == 0:
        for warning in [lock.warning] * bool(lock.warning) + start_warnings(cfg, p.total_steps):
            say(f"hvcodistill: warning: {warning}")
    return (*start, lock)


def pick_device(cfg: Config, comms: Comms) -> torch.device:
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # The node-local rank (a shared-memory split of COMM_WORLD) picks the GPU.
    device = torch.device("cuda", comms.local.Get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def build_trainer(
    cfg: Config,
    comms: Comms,
    plane: DataPlane,
    device: torch.device,
    p: Prepared,
    *,
    resume_step: int = 0,
    state: dict | None = None,
    timer: Timer | None = None,
) -> Trainer:
    """The optimiser, schedules, exchange and logs around the prepared model, on group_comm's
    data plane; resumed from `state` (find_resume's, at `resume_step`) when given."""
    c, t = cfg.codistill, cfg.train
    model = p.model.to(device)
    lr, wd = schedules(cfg, comms.topology, p.plan)
    optimizer = plane.wrap_optimizer(build_optimizer(cfg.optim, model, lr.base_lr), model)
    plane.broadcast_initial(model)
    # Bytes by link: the exchange counts its own; the gradient all-reduce follows a stated model
    # (comm/traffic.py) applied to the real gradient sizes, once per step.
    traffic = Traffic()
    grad_bytes = sum(q.numel() * q.element_size() for q in model.parameters() if q.requires_grad)
    sends = allreduce_sends(
        plane.algorithm, comms.group_ranks, comms.world_rank, grad_bytes, comms.nodes
    )
    exchange = build_exchange(
        c, comms=comms, model=model, batch_key=p.plan.key, wire=plane.wire, traffic=traffic,
        peers_by_link=allgather_sends(comms.peer_ranks, comms.world_rank, 1, comms.nodes),
        group_by_link=allgather_sends(comms.group_ranks, comms.world_rank, 1, comms.nodes),
    )  # fmt: skip
    run_dir = Path(cfg.run.dir)
    tr = Trainer(
        cfg=cfg, comms=comms, plane=plane, data=p.data, plan=p.plan, model=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=t.amp == "fp16"),
        exchange=exchange, logger=RunLogger(run_dir, comms), device=device, lr=lr, wd=wd,
        total_steps=p.total_steps, run_dir=run_dir, traffic=traffic, allreduce_sends=sends,
        finite=FiniteWatch(device, model.parameters()), timer=timer or Timer(),
        autocast=autocast_for(t.amp, device), start_step=resume_step,
        resume_settings=resume_settings(cfg, p.data, p.total_steps),
    )  # fmt: skip
    if state is not None:

        def resume():
            try:
                tr.load_state_dict(state)
            except KeyError as e:  # refused, never half-resumed
                raise ConfigError(
                    f"checkpoint step {resume_step} in {run_dir / 'checkpoints'} has no "
                    f"{e.args[0]!r} (written by another version of hvcodistill): "
                    "use another run.dir"
                ) from None

        agree(comms.world, resume)
        tr.logger.resume_at(resume_step)
    return tr
