"""The loop's timing parts under real ranks, with known delays injected.

argv: run_dir [overrides...]

Evaluation, checkpoints, the data loader and the exchange's staging (packing the payload) are
each slowed by a sleep; each sleep must land in its own part (eval_s, checkpoint_s, data_s,
exchange_s), not in compute_s, and the parts must add up to loop_s on every rank.
"""

import sys
import time

from common import fail, make_trainer
from mpi4py import MPI

from hvcodistill.comm import exchange as E
from hvcodistill.comm.preemption import PreemptionGuard
from hvcodistill.training import checkpoint
from hvcodistill.training import loop as L

EVAL, CKPT, DATA, PACK = 0.3, 0.5, 0.02, 0.02  # seconds each time
STEPS = 20  # evaluations at 5, 10, 15; a checkpoint at 10
tr = make_trainer(
    [
        "data.name=digits",
        "model.name=mlp",
        "codistill.mode=predictions",
        "codistill.every=1",
        "codistill.burn_in_steps=0",
        f"train.steps={STEPS}",
        "train.eval_every=5",
        "train.log_every=5",
        "run.checkpoint_every=10",
        f"run.dir={sys.argv[1]}",
        *sys.argv[2:],
    ]
)


def slowed(fn, seconds):
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapper


def slow_loader(make_loader):
    def wrapper(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            time.sleep(DATA)
            yield batch

    return wrapper


L.run_validation = slowed(L.run_validation, EVAL)
checkpoint.save = slowed(checkpoint.save, CKPT)
E.pack_logits = slowed(E.pack_logits, PACK)
L.make_loader = slow_loader(L.make_loader)
guard = PreemptionGuard(MPI.COMM_WORLD)
L.train(tr, guard)
guard.close()

tm = tr.timer
parts = {k: getattr(tm, k) for k in tm.PARTS}
if abs(sum(parts.values()) - tm.loop_s) > 1e-9 * tm.loop_s:
    fail(f"parts {parts} add up to {sum(parts.values())}, loop_s is {tm.loop_s}")
for part, least in (
    ("eval_s", 3 * EVAL),
    ("checkpoint_s", CKPT),
    ("data_s", STEPS * DATA),
    ("exchange_s", STEPS * PACK),
):
    if parts[part] < least:
        fail(f"{part} = {parts[part]:.3f} s, less than the {least:.2f} s injected: {parts}")
if tm.compute_s >= min(3 * EVAL, CKPT, STEPS * DATA, STEPS * PACK):
    fail(f"compute_s = {tm.compute_s:.3f} s holds injected delays: {parts}")
if tr.exchange.count != STEPS or abs(tm.exchange_s - tr.exchange.seconds) > 1e-9:
    fail(f"exchange_s {tm.exchange_s} differs from the exchange's own {tr.exchange.seconds}")
MPI.COMM_WORLD.Barrier()
if tr.comms.world_rank == 0:
    print(
        "timing ok: "
        + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
        + f"; loop_s {tm.loop_s:.3f}"
    )
