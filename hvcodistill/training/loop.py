"""The training loop, read top to bottom: batch -> lr/wd -> step (the exchange inside) -> log ->
evaluate -> checkpoint -> stop? Then the end: checkpoint, validate, final model, summary.

Timed in laps (training/timing.py): each lap's time goes to the part its end names.
"""

from __future__ import annotations

import time

import torch

from hvcodistill.cadence import itstime
from hvcodistill.data import make_loader
from hvcodistill.errors import Preempted
from hvcodistill.losses import alpha_at, codistillation_loss
from hvcodistill.training import checkpoint
from hvcodistill.training.evaluate import averaged_buffers, validate
from hvcodistill.training.finite import stop_if_non_finite
from hvcodistill.training.metrics import LogWindow, Progress, group_mean
from hvcodistill.training.summary import save_final_model, summarize
from hvcodistill.training.trainer import Trainer


def train_step(tr: Trainer, step: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One update of this rank's model; returns the detached numbers worth logging."""
    c = tr.cfg.codistill
    alpha = alpha_at(step, alpha=c.alpha, burn_in_steps=c.burn_in_steps)
    with tr.autocast():
        logits = tr.model(x)
        # peer_comm (on exchange steps): the teachers' logits for this batch; constants
        teachers = tr.exchange.teacher_logits(step=step, x=x, y=y, logits=logits, alpha=alpha)
    loss, parts = codistillation_loss(
        logits=logits.float(), targets=y, alpha=alpha, distance=c.distance,
        temperature=c.temperature, teacher_logits=[t.float() for t in teachers],
    )  # fmt: skip
    tr.optimizer.zero_grad()
    tr.scaler.scale(loss).backward()
    start = time.perf_counter()
    tr.plane.wait_gradients(tr.optimizer)  # group_comm: the averaged gradients
    tr.timer.allreduce_s += time.perf_counter() - start
    tr.traffic.add("allreduce", tr.allreduce_sends)
    # kept, not looked at: a NaN/Inf is found when the ranks agree (training/finite.py)
    tr.finite.update(step, loss)
    tr.plane.step(tr.optimizer, tr.scaler)
    # the log window compares them with the labels when it logs: one op per step, not three
    parts["predicted"], parts["labels"] = logits.detach().argmax(-1), y
    return parts


def train(tr: Trainer, guard) -> None:
    """The loop, from tr.start_step to tr.total_steps; `guard` (PreemptionGuard) stops every
    rank at one step, with a checkpoint, when any rank is signalled or sees a NaN/Inf."""
    cfg, total, timer = tr.cfg, tr.total_steps, tr.timer
    loader = make_loader(
        tr.data.train,
        tr.plan.keys(tr.start_step, total),
        workers=cfg.data.workers,
        device=tr.device,
    )
    progress = Progress(
        total, tr.start_step, enabled=cfg.train.progress and tr.comms.world_rank == 0
    )
    window = LogWindow(tr.start_step, timer, tr.traffic, tr.comms.topology.group_size)
    timer.start(tr.exchange)
    try:
        for step, (x, y) in enumerate(loader, start=tr.start_step):
            x, y = x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)
            timer.lap("data_s")  # waiting for the loader, and the copy to the device
            lr, wd = tr.lr(step), tr.wd(step)
            for group in tr.optimizer.param_groups:
                group["lr"], group["weight_decay"] = lr, wd
            window.add(train_step(tr, step, x, y), y.numel())  # samples, or tokens of an LM
            timer.lap("compute_s")  # less the all-reduce wait and the exchange inside
            done = step + 1
            if itstime(done, cfg.train.log_every, total_steps=total, first=False, last=True):
                # group_comm: the model's figures, averaged over its ranks
                scalars = group_mean(tr.comms.group, window.scalars(done))
                scalars.update(lr=lr, weight_decay=wd)
                tr.logger.log(done, "train", scalars)
                info = {"loss": scalars["task_loss"], "acc": scalars["accuracy"]}
                progress.update(done, info, force_line=True)
                window = LogWindow(done, timer, tr.traffic, tr.comms.topology.group_size)
            else:
                progress.update(done)
            if itstime(done, cfg.train.eval_every, total_steps=total, first=False, last=False):
                timer.lap("other_s")
                tr.logger.log(done, "val", run_validation(tr))
                timer.lap("eval_s")
            if itstime(done, cfg.run.checkpoint_every, total_steps=total, first=False, last=False):
                save_checkpoint(tr, done)
            # COMM_WORLD, every few steps: has any rank been signalled, or seen a NaN/Inf?
            # True on all ranks at once.
            if done != total and guard.should_stop(done, tr.finite):
                if guard.saw_nonfinite:
                    stop_if_non_finite(tr.finite, tr.comms, tr.run_dir, done, known=True)
                save_checkpoint(tr, done)
                raise Preempted(done, guard.signal_name())
            timer.lap("other_s")
    finally:
        progress.close()
        tr.logger.flush()  # a preempted run keeps its last TensorBoard points
    # COMM_WORLD: nothing non-finite is saved at the end
    stop_if_non_finite(tr.finite, tr.comms, tr.run_dir, total)
    timer.lap("data_s")  # the loader's last call, which ended the loop
    timer.stop()
    timer.wall_s = timer.wall_seconds()


def save_checkpoint(tr: Trainer, step: int) -> None:
    """Every rank at the same step: the checkpoint holds the timer up to here; its own time
    goes to checkpoint_s. Nothing non-finite is saved: the ranks agree on that first."""
    stop_if_non_finite(tr.finite, tr.comms, tr.run_dir, step)  # COMM_WORLD
    tr.timer.lap("other_s")
    tr.timer.wall_s = tr.timer.wall_seconds()
    write_checkpoint(tr, step)
    tr.logger.flush()  # what was logged up to the checkpoint is on disk with it
    tr.timer.lap("checkpoint_s")


def write_checkpoint(tr: Trainer, step: int) -> None:
    rank_state = tr.rank_state_dict()  # every rank first: a refresh in flight completes
    checkpoint.save(
        tr.run_dir, step, comms=tr.comms, rank_state=rank_state,
        group_state=tr.group_state_dict(), settings=tr.resume_settings,
        keep=tr.cfg.run.keep_checkpoints, traffic=tr.traffic,
    )  # fmt: skip


def run_validation(tr: Trainer) -> dict:
    return validate(
        tr.model,
        tr.data,
        tr.comms,
        tr.plane,
        device=tr.device,
        workers=tr.cfg.data.workers,
        autocast=tr.autocast,
        traffic=tr.traffic,
    )


def finish(tr: Trainer) -> dict | None:
    """After the last step, every rank: the final checkpoint (a requeue after the end finds it
    and trains no more), validation, the final weights and summary.json (returned on world
    rank 0)."""
    if tr.start_step < tr.total_steps:
        write_checkpoint(tr, tr.total_steps)
    final = run_validation(tr)
    tr.logger.log(tr.total_steps, "val", final)
    with averaged_buffers(tr.model, tr.comms, tr.plane, tr.traffic):  # the model validated
        save_final_model(tr.model, tr.comms, tr.run_dir)
    summary = summarize(
        tr.comms, tr.cfg, tr.timer, tr.exchange, tr.traffic, final, steps=tr.total_steps,
        steps_per_epoch=tr.plan.steps_per_epoch, resumed_from=tr.start_step,
        algorithm=tr.plane.algorithm, run_dir=tr.run_dir,
    )  # fmt: skip
    tr.logger.close()
    return summary
