"""The loop's timing parts under real ranks, with known delays injected through a fake clock.

argv: run_dir [overrides...]

The clock the timer reads (time.perf_counter in training/timing.py, training/loop.py and
comm/exchange.py) is the real one plus an offset. Evaluation, checkpoints, the data loader and the
exchange's staging (packing the payload) are each slowed by a delay that advances that offset by
one UNIT (2**20 s, some 12 days) instead of sleeping. Every part is then a whole number of UNITs
plus the real time it took (a few seconds, far below half a UNIT), so rounding each part to UNITs
says exactly how many delays landed in it: each delay must land in its own part (eval_s,
checkpoint_s, data_s, exchange_s), none in compute_s, allreduce_s or other_s, and the parts must add
up to loop_s on every rank. No bound on real time: the counts are equalities.
"""

import sys
import time
from collections import Counter

from common import fail, make_trainer
from mpi4py import MPI

from hvcodistill.comm import exchange as E
from hvcodistill.comm.preemption import PreemptionGuard
from hvcodistill.training import checkpoint
from hvcodistill.training import loop as L
from hvcodistill.training import timing as T

UNIT = float(2**20)  # seconds one injected delay adds to the fake clock
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


class FakeTime:
    """The `time` module, but perf_counter runs ahead by the delays injected so far."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self):
        return time.perf_counter() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


clock = FakeTime()
injected = Counter()  # part -> delays injected that belong to it


def delay(part):
    injected[part] += 1
    clock.offset += UNIT


def slowed(fn, part):
    def wrapper(*args, **kwargs):
        delay(part)
        return fn(*args, **kwargs)

    return wrapper


def slow_loader(make_loader):
    def wrapper(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            delay("data_s")
            yield batch

    return wrapper


T.time = L.time = E.time = clock
L.run_validation = slowed(L.run_validation, "eval_s")
checkpoint.save = slowed(checkpoint.save, "checkpoint_s")
E.pack_logits = slowed(E.pack_logits, "exchange_s")
L.make_loader = slow_loader(L.make_loader)
guard = PreemptionGuard(MPI.COMM_WORLD)
L.train(tr, guard)
guard.close()

tm = tr.timer
parts = {k: getattr(tm, k) for k in tm.PARTS}
if abs(sum(parts.values()) - tm.loop_s) > 1e-11 * tm.loop_s:
    fail(f"parts {parts} add up to {sum(parts.values())}, loop_s is {tm.loop_s}")
landed = {k: round(v / UNIT) for k, v in parts.items()}
wanted = {k: injected[k] for k in parts}
# 3 evaluations, 1 checkpoint, a batch and a packed payload per step
if (injected["eval_s"], injected["checkpoint_s"]) != (3, 1) or injected["data_s"] != STEPS:
    fail(f"delays injected {dict(injected)}: not 3 evaluations, 1 checkpoint, {STEPS} batches")
if injected["exchange_s"] != STEPS or tr.exchange.count != STEPS:
    fail(f"{injected['exchange_s']} payloads packed, {tr.exchange.count} exchanges, not {STEPS}")
if landed != wanted:
    fail(f"delays landed in {landed} (in UNITs), injected {wanted}: {parts}")
if abs(tm.exchange_s - tr.exchange.seconds) > 1e-11 * tr.exchange.seconds:
    fail(f"exchange_s {tm.exchange_s} differs from the exchange's own {tr.exchange.seconds}")
MPI.COMM_WORLD.Barrier()
if tr.comms.world_rank == 0:
    real = {k: v - landed[k] * UNIT for k, v in parts.items()}
    print(
        "timing ok: delays landed "
        + ", ".join(f"{k} {n}" for k, n in landed.items())
        + "; real time "
        + ", ".join(f"{k} {v:.3f}" for k, v in real.items())
    )
