"""The weights-mode refresh schedule under real ranks. Case `refresh` of checks.py (24 steps).

- nothing is sent during burn-in; a refresh is taken at burn_in, burn_in + k, ... ;
- the student distils from nothing before step burn_in + d, and from step burn_in + d on its
  first teachers are the peers as they were at step burn_in (never their random initial weights);
- at every later step the teachers are the refresh taken at the latest t with t + d <= step:
  the peer's parameters after t updates and its BatchNorm statistics (those of step t's forward)
  averaged over the peer's group, the same on every rank of a group.
The reference is every rank's state gathered over COMM_WORLD around each step, independently of
the exchange.
"""

import torch
from common import batch, fail, make_trainer, params_digest
from mpi4py import MPI

from hvcodistill.training.loop import train_step

N_STEPS = 24


def run(arg, overrides):
    n_steps = N_STEPS
    tr = make_trainer(
        [
            "data.name=digits",
            "model.name=cnn",
            "codistill.mode=weights",
            "codistill.every=4",
            "codistill.burn_in_steps=6",
            "codistill.refresh_delay=2",
            "codistill.alpha=1.0",
            "data.order=disjoint",
            "train.steps=100",
            "train.batch_size=16",
            "optim.lr=0.05",
            *overrides,
        ]
    )
    c, ex, world = tr.comms, tr.exchange, MPI.COMM_WORLD
    k, burn, d = (
        tr.cfg.codistill.every,
        tr.cfg.codistill.burn_in_steps,
        tr.cfg.codistill.refresh_delay,
    )
    M, G = c.topology.n_models, c.topology.group_size
    params = {n for n, _ in tr.model.named_parameters()}
    floats = {n for n, b in tr.model.named_buffers() if b.is_floating_point()}

    seen = {}  # step -> (number of teacher logits returned, the teachers' state, installed_from)
    original = ex.teacher_logits

    def recording(**kw):
        out = original(**kw)
        seen[kw["step"]] = (
            len(out),
            [{n: v.clone() for n, v in t.state_dict().items()} for t in ex.teachers],
            ex.installed_from,
        )
        return out

    ex.teacher_logits = recording
    before, after, counts = {}, {}, {}
    for step in range(n_steps):
        # COMM_WORLD: every rank's parameters after `step` updates, and its buffers after step's
        # forward
        before[step] = world.allgather({n: v.clone() for n, v in tr.model.state_dict().items()})
        train_step(tr, step, *batch(tr, step))
        after[step] = world.allgather({n: v.clone() for n, v in tr.model.state_dict().items()})
        counts[step] = ex.count

    def expected(j, t):
        """Peer model j as refreshed at step t: parameters from before the step, buffers after its
        forward, floating-point buffers averaged over the group."""
        out = {}
        for name in before[t][0]:
            if name in params:
                out[name] = before[t][j * G][name]
            elif name in floats:
                out[name] = torch.stack([after[t][j * G + g][name] for g in range(G)]).mean(0)
            else:
                out[name] = after[t][j * G][name]
        return out

    taken_steps = [t for t in range(n_steps) if t >= burn and (t - burn) % k == 0]
    if [s for s in range(n_steps) if counts[s] != sum(t <= s for t in taken_steps)]:
        fail(f"refreshes started per step {counts}, expected one at each of {taken_steps}")
    peers = [j for j in range(M) if j != c.model_id]
    first = None
    for step in range(n_steps):
        n_teachers, teachers, installed_from = seen[step]
        if step < burn + d:
            if n_teachers:
                fail(f"step {step}: distilled before burn_in + delay = {burn + d}")
            continue
        if n_teachers != M - 1:
            fail(f"step {step}: {n_teachers} teachers, expected {M - 1}")
        taken = max(t for t in taken_steps if t + d <= step)
        if installed_from != taken:
            fail(f"step {step}: teachers taken at {installed_from}, expected {taken}")
        for j, state in zip(peers, teachers):
            want = expected(j, taken)
            for name, value in state.items():
                if not torch.equal(value, want[name]):
                    fail(f"step {step}: teacher {j} {name} is not model {j} at step {taken}")
        first = first if first is not None else (step, taken)

    # the first distillation used teachers taken when burn-in ended, not the peers' initial weights
    if first != (burn + d, burn):
        fail(f"first distillation at step/taken {first}, expected ({burn + d}, {burn})")
    j = peers[0]
    if torch.equal(seen[burn + d][1][0][next(iter(params))], before[0][j * G][next(iter(params))]):
        fail("the first teachers are the peer's initial weights")
    digests = c.group.allgather([params_digest(t) for t in ex.teachers])
    if any(x != digests[0] for x in digests):
        fail("ranks of one group hold different teachers")
    return (
        f"refresh ok: W={c.topology.world_size} M={M} k={k} burn_in={burn} delay={d}: "
        f"first distillation at step {first[0]} from teachers taken at step {first[1]}; "
        f"{ex.count} refreshes"
    )
