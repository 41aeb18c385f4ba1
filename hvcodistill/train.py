"""Train M models at once with codistillation; M = 1 is the plain Horovod all-reduce baseline.

    python -m hvcodistill.train --config configs/digits_codistill.yaml [dotted.key=value ...]

Launch under mpirun, srun or horovodrun: every rank runs this. Read top to bottom:
prepare (local, agreed by all ranks) -> connect (split, Horovod) -> loop -> evaluate -> summary.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hvcodistill.comm.topology import Topology
from hvcodistill.comm.traffic import (COLLECTIVES, LINKS, Traffic, allgather_sends, allreduce_sends,
                                      horovod_algorithm, per_step)
from hvcodistill.config import Config, load_config, save_config
from hvcodistill.data import BatchPlan, DataSpec, build_datasets, make_loader, mix_seed
from hvcodistill.errors import ConfigError
from hvcodistill.models import build_model
from hvcodistill.training.finite import FiniteWatch, NonFiniteError, stop_if_non_finite
from hvcodistill.training.losses import alpha_at, codistillation_loss
from hvcodistill.training.schedules import LRSchedule, WDSchedule, build_schedules, itstime


RANK_STREAM = 0x72616E6B      # mix_seed(train.seed, RANK_STREAM, world rank): a rank's own RNG stream


@dataclass
class Timer:
    """Where this rank's training-loop time went, all segments of a resumed run added up.

    The loop is timed in laps: each lap's time goes to one part, less the waits timed inside it
    (the all-reduce wait by train_step, the exchange by the exchange's own `seconds`), which go
    to theirs. So the parts add up to loop_s exactly (up to float rounding). On a GPU, kernels
    run asynchronously: time lands where the host waits for them (the exchange synchronises the
    device around itself, see Exchange._timed; the all-reduce wait includes the backward still
    running when Horovod is asked for the gradients).
    """
    compute_s: float = 0.0      # forward, loss, backward, lr/wd and optimiser update (train_step less the waits)
    allreduce_s: float = 0.0    # waiting for Horovod's gradient all-reduce over group_comm
    exchange_s: float = 0.0     # peer exchanges, staging to and from the host included
    eval_s: float = 0.0         # validations inside the loop (train.eval_every)
    checkpoint_s: float = 0.0   # checkpoints inside the loop: gather, serialise, write, fsync, barrier
    data_s: float = 0.0         # waiting for the next batch from the loader, and its copy to the device
    other_s: float = 0.0        # the rest: schedules, metrics and logging, progress, preemption checks
    loop_s: float = 0.0         # the training loop, first batch requested to last update done
    wall_s: float = 0.0         # the whole run's wall time up to the last checkpoint, all segments

    PARTS = ("compute_s", "allreduce_s", "exchange_s", "eval_s", "checkpoint_s", "data_s", "other_s")

    def start(self, exchange) -> None:
        """Laps count from now; `exchange.seconds` is the exchange's running time."""
        self._exchange = exchange
        self._mark, self._waits = time.perf_counter(), (self.allreduce_s, exchange.seconds)

    def lap(self, part: str) -> None:
        """The time since the last lap goes to `part`, less the waits timed inside it."""
        now, allreduce, exchange = time.perf_counter(), self.allreduce_s, self._exchange.seconds
        exchanged = exchange - self._waits[1]
        self.exchange_s += exchanged
        self.__dict__[part] += now - self._mark - (allreduce - self._waits[0]) - exchanged
        self.loop_s += now - self._mark
        self._mark, self._waits = now, (allreduce, exchange)

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in (*self.PARTS, "loop_s", "wall_s")}

    def load_state_dict(self, state: dict) -> None:
        for name in (*self.PARTS, "loop_s", "wall_s"):
            setattr(self, name, float(state.get(name, 0.0)))
        if "exchange_s" not in state:
            # a checkpoint from before the parts: compute_s then was loop_s less the two waits,
            # so the exchange time is what is left (its evaluation and I/O stay in compute_s)
            self.exchange_s = self.loop_s - self.compute_s - self.allreduce_s


@dataclass
class Trainer:
    """Everything one rank holds for the run."""
    cfg: Config
    comms: object
    data: DataSpec
    plan: BatchPlan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    exchange: object
    logger: object
    device: torch.device
    lr: LRSchedule
    wd: WDSchedule
    total_steps: int
    run_dir: Path
    hvd: object
    traffic: Traffic                 # this rank's bytes sent, by collective and link
    allreduce_sends: dict            # what one gradient all-reduce sends from this rank, by link
    allreduce_algorithm: str         # the model behind allreduce_sends: ring | hierarchical
    start_step: int = 0
    timer: Timer = field(default_factory=Timer)
    started: float = field(default_factory=time.perf_counter)   # this process's start
    wall_before: float = 0.0                                      # earlier segments' wall time
    resumed_from: int = 0
    finite: FiniteWatch | None = None    # the first non-finite step this rank saw (set by connect)

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def autocast(self):
        amp = self.cfg.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


# ----------------------------------------------------------------------------- set-up
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m hvcodistill.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML experiment file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. codistill.every=10")
    return p.parse_args(argv)


def prepare(args, world_size: int, world_rank: int):
    """Everything that needs no communication; any bad input surfaces here, on every rank alike."""
    from mpi4py import MPI

    cfg = load_config(args.config, args.overrides)
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        raise ConfigError("MPI does not provide MPI_THREAD_MULTIPLE (Horovod and mpi4py share it); "
                          "use an MPI built with thread support")
    if cfg.train.amp == "fp16" and not (cfg.train.device != "cpu" and torch.cuda.is_available()):
        raise ConfigError("train.amp=fp16 needs a GPU; use train.amp=bf16 on CPU")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no GPU on this node")
    asked = gpu_request(os.environ)
    if cfg.train.device == "auto" and asked and not torch.cuda.is_available():
        # a job that asked for GPUs must not quietly train on CPU (hours at a fraction of the speed)
        raise ConfigError(f"the job asked for GPUs ({asked}) but torch sees none (a CPU-only torch, or no "
                          "driver on this node); set train.device=cpu to run on CPU anyway")
    topo = Topology(world_size, cfg.codistill.n_models)
    model_id, group_rank = topo.model_id(world_rank), topo.group_rank(world_rank)
    d, t = cfg.data, cfg.train
    data = build_datasets(d.name, path=d.path, seed=t.seed, augment=d.augment,
                          synthetic={"shape": d.synthetic_shape, "num_classes": d.synthetic_classes,
                                     "train_size": d.synthetic_train_size, "val_size": d.synthetic_val_size},
                          context=cfg.model.context)
    plan = BatchPlan(n_samples=len(data.train), batch_size=t.batch_size, group_size=topo.group_size,
                     group_rank=group_rank, n_models=topo.n_models, model_id=model_id, order=d.order,
                     seed=t.seed)
    # Models start from different seeds, so they differ; ranks of one group start identical.
    torch.manual_seed((t.seed if cfg.model.init_seed is None else cfg.model.init_seed) + model_id)
    model = build_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes,
                        hidden=cfg.model.hidden, dropout=cfg.model.dropout, layers=cfg.model.layers,
                        heads=cfg.model.heads, width=cfg.model.width)
    # From here on, torch's global RNG (dropout masks, on CPU and GPU) is this rank's own stream:
    # ranks of a group see different samples and must not draw identical masks. Checkpoints keep
    # every rank's RNG state, so a resumed run continues each stream exactly.
    torch.manual_seed(mix_seed(t.seed, RANK_STREAM, world_rank))
    return cfg, topo, data, plan, model      # run.dir is untouched: open_run_dir() checks it first


# Variables through which a launcher or scheduler hands a process GPUs. A value that gives none:
# CUDA_VISIBLE_DEVICES "" or "-1", SLURM's "NoDevFiles" (gres without device files), a count of 0.
GPU_REQUEST_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL")


def gpu_request(environ) -> str | None:
    """`NAME=value` of the first variable saying this process was given GPUs, else None."""
    names = [*GPU_REQUEST_VARS, *sorted(k for k in environ if k.startswith("SLURM_GPUS"))]
    for name in names:
        value = environ.get(name, "").strip()
        none = ("", "-1", "NoDevFiles") + (("0",) if name.startswith("SLURM_GPUS") else ())
        if name in environ and value not in none:
            return f"{name}={value}"
    return None


def check_same_data(world, data: DataSpec, path: str) -> None:
    """COMM_WORLD: every rank read its data from its own disk (`path`: its data.path); they must
    hold the same content, or ranks would take different numbers of steps (a hang) or train and
    distil across different samples. Compared once: the sizes and a content fingerprint (a hash
    of the arrays, or of a lazy set's file list and sizes: data/fingerprint.py). On a mismatch
    every rank exits EXIT_DATA_MISMATCH (3), as when peers find different batches in an exchange,
    and world rank 0 prints one line naming two ranks that differ and their data.path."""
    from hvcodistill.data.fingerprint import data_fingerprint
    from hvcodistill.training.checkpoint import EXIT_DATA_MISMATCH

    try:
        mine, error = (len(data.train), len(data.val), tuple(data.input_shape), data.num_classes,
                       data_fingerprint(data)), None
    except OSError as e:            # a lazy set's file vanished or is unreadable: bad input, exit 2
        mine, error = None, f"data.path {path!r}: cannot read {e.filename or ''}: {e.strerror or e}"
    # COMM_WORLD: everyone's summary (a few dozen bytes), so every rank reaches the same verdict.
    every = world.allgather((mine, error, path))
    errors = [e for _, e, _ in every if e]
    if errors:
        raise ConfigError(errors[0])
    odd = next((r for r, (s, _, _) in enumerate(every) if s != every[0][0]), None)
    if odd is None:
        return
    (*sizes0, fp0), _, path0 = every[0]
    (*sizes1, fp1), _, path1 = every[odd]
    what = (f"fingerprints {fp0[:12]} and {fp1[:12]}" if sizes0 == sizes1 else
            f"(train, val, shape, classes) = {tuple(sizes0)} and {tuple(sizes1)}")
    if world.Get_rank() == 0:
        print(f"hvcodistill: error: ranks hold different data: rank 0 (data.path={path0!r}) and rank {odd} "
              f"(data.path={path1!r}) differ, {what}; every rank must read identical data (the same "
              "files on every node, or data.path on a shared file system)", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_DATA_MISMATCH)


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    t = cfg.train
    return t.steps or max(1, int(round(t.epochs * plan.steps_per_epoch)))


def open_run_dir(world, cfg: Config, topo: Topology, data: DataSpec, total: int) -> tuple[int, dict | None]:
    """Check run.dir before writing anything there, then write config.yaml; returns the step to
    resume from and this rank's checkpoint state ((0, None): a fresh start). A refused start (other
    settings, checkpoints none usable, entries of the wrong kind, run.dir not shared) exits 2
    and leaves run.dir as it was, so config.yaml still describes the checkpoints beside it."""
    from mpi4py import MPI

    from hvcodistill.training import checkpoint, rundir

    run_dir, rank = Path(cfg.run.dir), world.Get_rank()
    agree(world, lambda: rundir.check_entries(run_dir, topo.n_models) if rank == 0 else None)
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
                raise ConfigError(f"run.dir {run_dir} cannot be written on {host}: {e.strerror or e}") from None

    try:
        agree(world, leave)
        agree(world, lambda: rundir.check_markers(run_dir, writers, token, host) if rank == 0 else None)
    finally:                          # every rank alike: agree raises on all of them together
        rundir.remove_marker(marker, run_dir, last=False)
        world.Barrier()               # COMM_WORLD: every mark is gone before rank 0 removes their folder
        rundir.remove_marker(None, run_dir, last=rank == 0)

    def refuse_fresh_start():
        if rank == 0 and any((run_dir / "checkpoints").glob("model_*/step_*.*")):
            # a fresh run would mix its checkpoints with the old ones, and a later resume pick either
            raise ConfigError(f"run.resume=false but {run_dir / 'checkpoints'} holds checkpoints: "
                              "use a new run.dir or delete them")
        return 0, None

    if cfg.run.resume:
        start = agree(world, lambda: checkpoint.find_resume(world, cfg, topo, data, total))
    else:
        start = agree(world, refuse_fresh_start)

    def write_config():
        if rank == 0:
            try:
                save_config(cfg, run_dir / "config.yaml")
            except OSError as e:
                raise ConfigError(f"run.dir {run_dir} cannot be written: {e.strerror or e}") from None

    agree(world, write_config)
    return start


def agree(world, fn):
    """Run `fn` on every rank; if any rank's input is bad, every rank exits 2 and one line is printed.

    Bad input can differ between ranks (a file missing on one node): the allgather on COMM_WORLD
    makes all ranks agree before the first collective that a failed rank would never join.
    """
    try:
        value, error = fn(), None
    except ConfigError as e:
        value, error = None, str(e)
    errors = world.allgather(error)
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        if world.Get_rank() == failed[0]:
            where = f" (rank {failed[0]})" if len(failed) < len(errors) else ""
            print(f"hvcodistill: error{where}: {errors[failed[0]]}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return value


def pick_device(cfg: Config, comms) -> torch.device:
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # The node-local rank (a shared-memory split of COMM_WORLD) picks the GPU.
    device = torch.device("cuda", comms.local.Get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def connect(cfg: Config, topo: Topology, data: DataSpec, plan: BatchPlan, model: torch.nn.Module,
            world) -> Trainer:
    """Split the world, start Horovod on the group, then optimiser, schedules, exchange and logs."""
    import horovod.torch as hvd

    from hvcodistill.comm.exchange import make_exchange
    from hvcodistill.training.metrics import RunLogger
    from hvcodistill.comm.topology import split_communicators

    comms = split_communicators(world, topo.n_models)
    hvd.init(comm=comms.group)          # Horovod's all-reduce runs on group_comm only
    device = pick_device(cfg, comms)
    c, t, o = cfg.codistill, cfg.train, cfg.optim

    spe = plan.steps_per_epoch
    total = total_steps(cfg, plan)
    model = model.to(device)
    lr, wd = build_schedules(o, per_model_batch=t.batch_size * topo.group_size, steps_per_epoch=spe,
                             total_steps=total)
    base_lr = lr.base_lr
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=o.weight_decay)
    # Horovod averages gradients over group_comm during backward.
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average)
    # group_comm: start every rank of the group from group rank 0's weights. The optimiser state is
    # empty here, and hvd.broadcast_optimizer_state would fill it by taking a step on zero gradients,
    # which applies weight decay once before training: so it is not called.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    # Bytes by link: the exchange counts its own; the gradient all-reduce follows a stated model
    # (hvcodistill/comm/traffic.py) applied to the real gradient sizes, once per step.
    traffic = Traffic()
    algorithm = horovod_algorithm(device.type, os.environ)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    allreduce = allreduce_sends(algorithm, comms.group_ranks, comms.world_rank, grad_bytes, comms.nodes)
    exchange = make_exchange(mode=c.mode, n_models=topo.n_models, alpha=c.alpha, every=c.every,
                             peer=comms.peer, model_id=comms.model_id, model=model, batch_key=plan.key,
                             traffic=traffic,
                             peers_by_link=allgather_sends(comms.peer_ranks, comms.world_rank, 1, comms.nodes),
                             group=comms.group, group_by_link=allgather_sends(comms.group_ranks, comms.world_rank, 1, comms.nodes),
                             burn_in_steps=c.burn_in_steps, refresh_delay=c.refresh_delay,
                             payload_dtype=c.payload_dtype, topk=c.topk)

    run_dir = Path(cfg.run.dir)      # checked and made by open_run_dir(), before the agreement
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    return Trainer(cfg=cfg, comms=comms, data=data, plan=plan, model=model, optimizer=opt, scaler=scaler,
                   exchange=exchange, logger=RunLogger(run_dir, comms), device=device, lr=lr, wd=wd,
                   total_steps=total, run_dir=run_dir, hvd=hvd, traffic=traffic, allreduce_sends=allreduce,
                   allreduce_algorithm=algorithm, finite=FiniteWatch(device, model.parameters()))


# ----------------------------------------------------------------------------- the loop
def set_hyperparameters(optimizer, *, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay


def train_step(tr: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One update of this rank's model; returns the detached numbers worth logging."""
    c = tr.cfg.codistill
    alpha = alpha_at(step, alpha=c.alpha, burn_in_steps=c.burn_in_steps)
    with tr.autocast():
        logits = tr.model(x)
        # peer_comm (on exchange steps): the teachers' logits for this batch; constants.
        teachers = tr.exchange.teacher_logits(step=step, x=x, y=y, logits=logits, alpha=alpha)
    loss, parts = codistillation_loss(logits=logits.float(), targets=y, alpha=alpha, distance=c.distance,
                                      temperature=c.temperature, teacher_logits=[t.float() for t in teachers])
    tr.optimizer.zero_grad()
    tr.scaler.scale(loss).backward()
    start = time.perf_counter()
    tr.optimizer.synchronize()      # group_comm: wait for Horovod's averaged gradients
    tr.timer.allreduce_s += time.perf_counter() - start
    tr.traffic.add("allreduce", tr.allreduce_sends)
    # kept, not looked at: a NaN/Inf in the loss, or in the weights after the update, is found
    # when the ranks agree (preemption checks, before checkpoints: training/finite.py)
    tr.finite.update(step, loss)
    if tr.scaler.is_enabled():
        tr.scaler.unscale_(tr.optimizer)
        with tr.optimizer.skip_synchronize():
            tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:                           # no loss scaling: the plain step (the scaler's calls cost a little)
        with tr.optimizer.skip_synchronize():
            tr.optimizer.step()
    # the window compares them with the labels when it logs: one op per step, not three
    parts["predicted"], parts["labels"] = logits.detach().argmax(-1), y
    return parts


def train(tr: Trainer, guard) -> None:
    """The loop: batch -> lr/wd -> step (exchange inside) -> log -> evaluate -> checkpoint -> stop?

    Timed in laps (Timer): each lap's time goes to the part its end names."""
    from hvcodistill.training.metrics import Progress, group_mean
    from hvcodistill.comm.preemption import Preempted

    t, every_ckpt, timer = tr.cfg.train, tr.cfg.run.checkpoint_every, tr.timer
    loader = make_loader(tr.data.train, tr.plan.keys(tr.start_step, tr.total_steps),
                         workers=tr.cfg.data.workers, device=tr.device)
    progress = Progress(tr.total_steps, tr.start_step, enabled=t.progress and tr.comms.world_rank == 0)
    window = LogWindow(tr, tr.start_step)
    # read at its checks (a device sync): the kept losses; the weights are looked at before
    # checkpoints and at the end (stop_if_non_finite), where no later loss shows the last update
    guard.nonfinite = lambda: tr.finite.first(weights=False) is not None
    timer.start(tr.exchange)
    try:
        for step, (x, y) in enumerate(loader, start=tr.start_step):
            x, y = x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)
            timer.lap("data_s")                 # waiting for the loader, and the copy to the device
            lr, wd = tr.lr(step), tr.wd(step)
            set_hyperparameters(tr.optimizer, lr=lr, weight_decay=wd)
            window.add(train_step(tr, step, x, y), y.numel())   # samples, or tokens of a language model
            timer.lap("compute_s")              # less the all-reduce wait and the exchange inside
            done = step + 1
            if itstime(done, t.log_every, total_steps=tr.total_steps, first=False, last=True):
                scalars = group_mean(tr.comms.group, window.scalars(done))   # group_comm: average over the group
                scalars.update(lr=lr, weight_decay=wd)
                tr.logger.log(done, "train", scalars)
                progress.update(done, {"loss": scalars["task_loss"], "acc": scalars["accuracy"]},
                                force_line=True)
                window = LogWindow(tr, done)
            else:
                progress.update(done)
            if itstime(done, t.eval_every, first=False) and done != tr.total_steps:
                timer.lap("other_s")
                validate(tr, done)
                timer.lap("eval_s")
            if itstime(done, every_ckpt, first=False) and done != tr.total_steps:
                save_checkpoint(tr, done)
            # COMM_WORLD, every few steps: has any rank been signalled, or seen a NaN/Inf? True on
            # all ranks at once.
            if guard.should_stop(done) and done != tr.total_steps:
                if guard.saw_nonfinite:
                    stop_if_non_finite(tr, done, known=True)
                save_checkpoint(tr, done)
                raise Preempted(done, guard.signal_name())
            timer.lap("other_s")
    finally:
        progress.close()
    stop_if_non_finite(tr, tr.total_steps)      # COMM_WORLD: nothing non-finite is saved at the end
    timer.lap("data_s")                         # the loader's last call, which ended the loop
    timer.wall_s = tr.wall_seconds()


def save_checkpoint(tr: Trainer, step: int) -> None:
    """Every rank, inside the loop: the checkpoint holds the timer up to here; its own time
    goes to checkpoint_s. Nothing non-finite is saved: the ranks agree on that first."""
    from hvcodistill.training import checkpoint

    stop_if_non_finite(tr, step)        # COMM_WORLD: a NaN/Inf on any rank stops all, here
    tr.timer.lap("other_s")
    tr.timer.wall_s = tr.wall_seconds()
    checkpoint.save(tr, step)
    tr.timer.lap("checkpoint_s")


class LogWindow:
    """The steps since the last log point: their figures are summed on the device when logged,
    so a step adds no device sync and no tensor op (the accuracy compares all the window's
    predictions with their labels at once); timing and bytes are logged per window."""

    FOLD = 1024                                 # a long window is summed every FOLD steps

    def __init__(self, tr: Trainer, start: int):
        self.tr, self.start, self.parts, self.samples = tr, start, [], 0
        self.traffic, self.timer = tr.traffic.flat(), tr.timer.state_dict()

    def add(self, parts: dict, samples: int) -> None:
        self.parts.append(parts)
        self.samples += samples
        if len(self.parts) == self.FOLD:
            self.parts = [self._sums()]

    def _sums(self) -> dict:
        """Totals on the device: a step brings its predictions and labels, a fold its `correct`."""
        sums = {k: torch.stack([p[k] for p in self.parts]).sum() for k in ("task_loss", "distill_loss")}
        counts = [p["correct"] for p in self.parts if "correct" in p]
        steps = [p for p in self.parts if "predicted" in p]
        if steps:
            counts.append((torch.cat([p["predicted"] for p in steps]) == torch.cat([p["labels"] for p in steps])).sum())
        sums["correct"] = sum(counts[1:], counts[0])
        return sums

    def scalars(self, done: int) -> dict:
        """This rank's means over the window: losses, accuracy, bytes by link, seconds per step by
        part (Timer), and the window's exchange seconds (exchange_s, as logged before)."""
        n, sums, timer = done - self.start, self._sums(), self.tr.timer.state_dict()
        per_step = {f"{k}_per_step": (timer[k] - self.timer[k]) / n for k in Timer.PARTS}
        return {"task_loss": float(sums["task_loss"]) / n, "distill_loss": float(sums["distill_loss"]) / n,
                "accuracy": float(sums["correct"]) / self.samples,
                **window_bytes(self.tr.traffic, self.traffic, n, self.tr.comms.topology.group_size),
                **per_step, "step_s": (timer["loop_s"] - self.timer["loop_s"]) / n,
                "exchange_s": timer["exchange_s"] - self.timer["exchange_s"]}


def window_bytes(traffic: Traffic, before: list, n_steps: int, group_size: int) -> dict:
    """This rank's bytes per step since `before`, by collective and link, scaled by the group size
    so that the group mean logged to TensorBoard is the whole model's bytes per step."""
    names = [f"bytes_{c}_{link}" for c in COLLECTIVES for link in LINKS]
    return {name: (now - then) * group_size / n_steps
            for name, now, then in zip(names, traffic.flat(), before)}


def validate(tr: Trainer, step: int) -> dict:
    from hvcodistill.training.evaluate import evaluate, evaluate_lm

    with averaged_buffers(tr):
        result = (evaluate_lm if tr.data.sequence else evaluate)(tr.model, tr.data.val, tr.comms, device=tr.device, workers=tr.cfg.data.workers,
                          autocast=tr.autocast, traffic=tr.traffic)
    tr.logger.log(step, "val", result)
    return result


@contextlib.contextmanager
def averaged_buffers(tr: Trainer):
    """group_comm: average BatchNorm statistics so every rank evaluates (and saves) the same model;
    each rank's own statistics come back afterwards, so evaluating never changes training."""
    own = {n: b.clone() for n, b in tr.model.named_buffers() if b.is_floating_point()}
    c = tr.comms
    nbytes = sum(b.numel() * b.element_size() for b in own.values())
    tr.traffic.add("evaluation", allreduce_sends(tr.allreduce_algorithm, c.group_ranks, c.world_rank, nbytes, c.nodes))
    for name, buf in tr.model.named_buffers():
        if buf.is_floating_point():
            tr.hvd.allreduce_(buf, op=tr.hvd.Average, name=f"buffer.{name}")
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in tr.model.named_buffers():
                if name in own:
                    buf.copy_(own[name])


# ----------------------------------------------------------------------------- the end
def summarize(tr: Trainer, final: dict) -> dict | None:
    """Gather every model's figures to world rank 0 and write summary.json there."""
    import numpy as np
    from mpi4py import MPI

    from hvcodistill.training.metrics import write_json_atomic

    world, topo = tr.comms.world, tr.comms.topology
    # COMM_WORLD: mean time per rank and total bytes received over peer_comm.
    times = [getattr(tr.timer, k) for k in (*Timer.PARTS, "loop_s")]
    local = np.array([*times, float(tr.exchange.bytes_received), float(tr.exchange.count),
                      *map(float, tr.traffic.flat())])
    total = np.empty_like(local)
    world.Allreduce(local, total, op=MPI.SUM)       # float64: bytes stay exact up to 2**53
    n = len(times)
    timing = dict(zip((*Timer.PARTS, "loop_s"), (total[:n] / topo.world_size).tolist()))
    moved = Traffic.unflat(total[n + 2:])
    mine = {"id": tr.comms.model_id, "val_accuracy": final["val_accuracy"], "val_loss": final["val_loss"]}
    if "val_perplexity" in final:                   # a language model: next-token figures
        mine["val_perplexity"] = final["val_perplexity"]
    models = world.gather(mine if tr.comms.group_rank == 0 else None, root=0)
    if world.Get_rank() != 0:
        return None
    w = topo.world_size
    summary = {
        "topology": topo.as_dict(),
        "mode": tr.cfg.codistill.mode if topo.n_models > 1 else "allreduce",
        "every": tr.cfg.codistill.every,
        "alpha": tr.cfg.codistill.alpha,
        "steps": tr.total_steps,
        "steps_per_epoch": tr.plan.steps_per_epoch,
        "wall_seconds": tr.wall_seconds(),        # all segments of a resumed run
        "segment_seconds": time.perf_counter() - tr.started,
        "resumed_from_step": tr.resumed_from,
        "models": sorted((m for m in models if m), key=lambda m: m["id"]),
        "ensemble_val_accuracy": final["ensemble_val_accuracy"],
        "disagreement": final["disagreement"],
        # a language model: the ensemble's next-token loss and perplexity (mean of the models' probabilities)
        **{k: final[k] for k in ("ensemble_val_loss", "ensemble_val_perplexity") if k in final},
        # mean per rank; the parts add up to loop_s (README: "What a run leaves")
        "timing": {**timing, "step_s": timing["loop_s"] / max(1, tr.total_steps)},
        "exchanged_bytes": int(total[n]),
        "exchanges": int(total[n + 1] / w),
        # where the bytes went: all ranks' sends, per training step and in all, by collective and link
        "nodes": tr.comms.nodes.as_dict(),
        "bytes_per_step": per_step(moved, tr.total_steps),
        "bytes": moved,
        "bytes_model": {"allreduce": tr.allreduce_algorithm, "exchange": "counted", "evaluation": "counted",
                        "checkpoint": "counted"},
    }
    write_json_atomic(tr.run_dir / "summary.json", summary)
    return summary


def save_final_model(tr: Trainer) -> None:
    """Group rank 0 writes its model's final weights to model_<id>.pt (the atomic-write rule)."""
    import io

    from hvcodistill.files import write_atomic

    if tr.comms.group_rank != 0:
        return
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in tr.model.state_dict().items()}, buf)
    write_atomic(tr.run_dir / f"model_{tr.comms.model_id}.pt", buf.getvalue())


def run(args) -> int:
    from mpi4py import MPI

    from hvcodistill.comm.preemption import Preempted, PreemptionGuard
    from hvcodistill.comm.watchdog import Watchdog
    from hvcodistill.training.checkpoint import EXIT_PREEMPTED

    world = MPI.COMM_WORLD
    start = time.perf_counter()
    # From here on SIGUSR1/SIGTERM are recorded, not fatal: from the first step on the guard stops
    # the run at a step with a checkpoint; during set-up the watchdog's thread ends every rank
    # (exit 75), as it does on SIGINT (exit 130) and when a rank stops answering (run.hang_timeout).
    guard = PreemptionGuard(world)
    watchdog = Watchdog(world, stepped=lambda: guard.started, exit_preempted=EXIT_PREEMPTED)
    try:
        return _run(args, world, guard, watchdog, start)
    except (Preempted, NonFiniteError, SystemExit):
        # all ranks stopped together (at the same step, or refusing the same input)
        guard.close(wait=not isinstance(sys.exc_info()[1], SystemExit))
        watchdog.close()
        raise
    except BaseException:
        guard.close(wait=False)       # failing: peers may be gone, do not wait on them
        raise                         # main() aborts the job: the watchdog's thread ends with it


def _run(args, world, guard, watchdog, start: float) -> int:
    from hvcodistill.training import checkpoint

    cfg, topo, data, plan, model = agree(world, lambda: prepare(args, world.Get_size(), world.Get_rank()))
    guard.every = cfg.run.preempt_check_every      # the same on every rank: one config
    watchdog.timeout = cfg.run.hang_timeout
    agree(world, lambda: check_same_data(world, data, cfg.data.path))   # exit 3 if ranks' data differ
    # run.dir: checked (and the checkpoint to resume from read) before anything is written there
    resume_step, state = open_run_dir(world, cfg, topo, data, total_steps(cfg, plan))
    tr = connect(cfg, topo, data, plan, model, world)
    tr.started = start
    if state is not None:
        checkpoint.apply(tr, state)
        tr.start_step = tr.resumed_from = resume_step
        tr.wall_before = tr.timer.wall_s
        tr.logger.resume_at(resume_step)
        del state
    start_step = tr.start_step
    try:
        train(tr, guard)
    finally:
        tr.logger.flush()             # a preempted run keeps its last TensorBoard points
    guard.close()
    if start_step < tr.total_steps:       # a requeue after the end finds this and trains no more
        checkpoint.save(tr, tr.total_steps)
    final = validate(tr, tr.total_steps)
    with averaged_buffers(tr):            # the saved model is the one validated
        save_final_model(tr)
    summary = summarize(tr, final)
    tr.logger.close()
    watchdog.close()                      # COMM_WORLD: every rank is here, the job is done
    if summary is not None:
        models = summary["models"]
        if "ensemble_val_perplexity" in summary:        # a language model: next-token figures
            perplexities = ", ".join(f"{m['val_perplexity']:.2f}" for m in models)
            figures = ("val loss " + ", ".join(f"model {m['id']} {m['val_loss']:.4f}" for m in models)
                       + f" (perplexity {perplexities}); "
                       f"ensemble perplexity {summary['ensemble_val_perplexity']:.2f}")
        else:
            figures = ("val accuracy " + ", ".join(f"model {m['id']} {m['val_accuracy']:.4f}" for m in models)
                       + f"; ensemble {summary['ensemble_val_accuracy']:.4f}")
        print(f"hvcodistill: done in {summary['wall_seconds']:.1f}s, {summary['steps']} steps; {figures}; "
              f"disagreement {summary['disagreement']:.4f}; summary {tr.run_dir / 'summary.json'}",
              flush=True)
    tr.hvd.shutdown()
    return 0


def stop_loader_workers() -> None:
    """End this rank's DataLoader workers before MPI_Abort: they are children of a forkserver,
    not of the rank, so the abort would leave them running (holding the launcher's output open)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()


def abort(code: int) -> None:
    """End the whole job from this rank (the others may wait in a collective), workers first."""
    from mpi4py import MPI

    stop_loader_workers()
    MPI.COMM_WORLD.Abort(code)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mpi4py import MPI

    from hvcodistill.training.checkpoint import EXIT_DATA_MISMATCH, EXIT_NON_FINITE, EXIT_PREEMPTED
    from hvcodistill.comm.exchange import BatchMismatchError
    from hvcodistill.comm.preemption import Preempted
    from hvcodistill.comm.watchdog import EXIT_INTERRUPTED

    try:
        return run(args)
    except SystemExit:
        raise
    except Preempted as e:
        # Every rank stopped at the same step and the checkpoint is written: exit for a requeue.
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"hvcodistill: {e}; checkpoint written, exiting {EXIT_PREEMPTED} to be requeued",
                  file=sys.stderr, flush=True)
        import horovod.torch as hvd
        hvd.shutdown()
        return EXIT_PREEMPTED
    except NonFiniteError as e:
        # Every rank stopped at the same step, before saving anything from it: one line, exit 4.
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"hvcodistill: error: {e}", file=sys.stderr, flush=True)
        import horovod.torch as hvd
        hvd.shutdown()
        return EXIT_NON_FINITE
    except BatchMismatchError as e:
        # Peers detect this together; one line from model 0's rank, then stop the whole job.
        if e.report:
            print(f"hvcodistill: error: {e}", file=sys.stderr, flush=True)
        abort(EXIT_DATA_MISMATCH)
    except ConfigError as e:
        # Bad input that only shows when it is used (an image file that is no image, met in a
        # batch): this rank alone knows, the others wait in a collective. One line, exit 2 for all.
        # A DataLoader worker's error comes back with its traceback in the message: keep its last line.
        line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        line = line.split(f"{ConfigError.__module__}.{ConfigError.__name__}: ", 1)[-1]
        print(f"hvcodistill: error (rank {MPI.COMM_WORLD.Get_rank()}): {line}", file=sys.stderr, flush=True)
        abort(2)
    except KeyboardInterrupt:
        # SIGINT outside the watchdog's span (it makes Ctrl-C exit 130 by itself): no traceback.
        print("hvcodistill: interrupted (SIGINT)", file=sys.stderr, flush=True)
        abort(EXIT_INTERRUPTED)
    except BaseException:
        # Any other failure on one rank would leave the others waiting in a collective: abort all.
        traceback.print_exc()
        sys.stderr.flush()
        abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
