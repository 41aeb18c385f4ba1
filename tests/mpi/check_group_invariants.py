"""After every optimiser step: parameters identical inside a group, different across groups,
and no gradient ever on a teacher. Case `invariants:MODE` of checks.py (12 steps)."""

from common import batch, fail, make_trainer, params_digest

from hvcodistill.training.loop import train_step

N_STEPS = 12


def run(mode, overrides):
    tr = make_trainer(
        [
            "data.name=digits",
            "model.name=cnn",
            f"codistill.mode={mode}",
            "codistill.every=3",
            "codistill.alpha=1.0",
            "codistill.burn_in_steps=2",
            "train.steps=50",
            f"data.order={'disjoint' if mode == 'weights' else 'shared'}",
            "train.batch_size=16",
            "optim.lr=0.05",
            *overrides,
        ]
    )
    c = tr.comms
    for step in range(N_STEPS):
        x, y = batch(tr, step)
        train_step(tr, step, x, y)
        group_digests = c.group.allgather(params_digest(tr.model))
        if len(set(group_digests)) != 1:
            fail(f"step {step}: parameters differ inside group {c.model_id}")
        peer_digests = c.peer.allgather(group_digests[0])
        if len(set(peer_digests)) != len(peer_digests):
            fail(f"step {step}: two models have identical parameters")
        for t in getattr(tr.exchange, "teachers", []):
            if any(p.grad is not None or p.requires_grad for p in t.parameters()):
                fail(f"step {step}: a teacher copy holds or wants a gradient")
        if tr.exchange.count == 0 and step >= 3:
            fail("no exchange happened")
    return (
        f"invariants ok: {mode}, W={c.topology.world_size} M={c.topology.n_models}, "
        f"{N_STEPS} steps, {tr.exchange.count} exchanges"
    )
