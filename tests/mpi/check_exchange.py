"""Exchange correctness under real ranks. Case `exchange:predictions|mismatch|weights` of checks.py.

predictions: the logits a rank receives equal what each peer's model computes on the same batch
             (recomputed here from the peer's own seed, independently of the exchange);
mismatch:    a peer whose data differ from its peers' (one input value, or one label, of the batch
             they share under the same plan) is caught by every rank of that peer_comm, and only
             there; with identical data nothing is caught;
weights:     right after a (blocking) refresh every teacher copy equals its peer model: the peer's
             parameters, and its buffers averaged over the peer's group (the teacher is the same on
             every rank of a group; the student's own buffers are untouched).
"""

import hashlib

import torch
from common import batch, fail, make_trainer
from mpi4py import MPI

from hvcodistill.comm.exchange import BatchMismatchError
from hvcodistill.models import build_model
from hvcodistill.training.loop import train_step


def state_digest(module):
    h = hashlib.sha256()
    for value in module.state_dict().values():
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(what, overrides):
    mode = "weights" if what == "weights" else "predictions"
    tr = make_trainer(
        [
            "data.name=digits",
            "model.name=cnn",
            f"codistill.mode={mode}",
            "codistill.every=4",
            "train.steps=40",
            "train.batch_size=16",
            "optim.lr=0.05",
            *overrides,
        ]
    )
    c = tr.comms
    M = c.topology.n_models
    for step in range(6):  # train a little so models have moved away from their inits
        train_step(tr, step, *batch(tr, step))

    if what == "predictions":
        step = 8
        x, _ = batch(tr, step)
        tr.model.train()
        logits = tr.model(x)
        received = tr.exchange.teacher_logits(step=step, x=x, logits=logits, alpha=1.0)
        if len(received) != M - 1:
            fail(f"expected {M - 1} teachers, got {len(received)}")
        # Independent reference: every model's state, sent as pickles over COMM_WORLD; rebuild
        # peer j here and run it on this rank's batch, which peers share (data.order=shared).
        states = MPI.COMM_WORLD.allgather({k: v.clone() for k, v in tr.model.state_dict().items()})
        G = c.topology.group_size
        peers = [j for j in range(M) if j != c.model_id]
        for j, got in zip(peers, received):
            ref = build_model(
                "cnn", input_shape=tr.data.input_shape, num_classes=tr.data.num_classes
            )
            ref.load_state_dict(states[j * G + c.group_rank])
            ref.train()  # same mode as the student's forward (BatchNorm batch statistics)
            with torch.no_grad():
                want = ref(x)
            if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                fail(
                    f"logits from model {j} differ from its recomputation: "
                    f"{(got - want).abs().max()}"
                )
            if got.requires_grad:
                fail("received logits require grad")
        result = "predictions ok"

    elif what == "mismatch":
        # The real exchange, the same plan on every rank: only the content delivered differs.
        # The last model's group rank 0 reads data that differ from its peers' in one input value
        # (by one ulp), then in one label, of the batch they share; every rank of that peer_comm
        # must stop, and no other rank.
        step = 8  # an exchange step (every=4)
        odd = c.model_id == M - 1 and c.group_rank == 0
        sample = int(tr.plan.key(step)[1][3])
        data = tr.data.train

        def exchange_caught():
            x, y = batch(tr, step)
            with torch.no_grad():
                logits = tr.model(x)
            try:
                tr.exchange.teacher_logits(step=step, x=x, y=y, logits=logits, alpha=1.0)
                return False
            except BatchMismatchError as e:
                if "different batches" not in str(e):
                    fail(f"unexpected message: {e}")
                return True

        caught = []
        for case in ("none", "value", "label"):
            saved = data.x[sample].clone(), data.y[sample].clone()
            if odd and case == "value":
                flat = data.x[sample].view(-1)
                flat[5] = torch.nextafter(flat[5], torch.tensor(float("inf")))
            if odd and case == "label":
                data.y[sample] = (data.y[sample] + 1) % tr.data.num_classes
            flags = MPI.COMM_WORLD.allgather((c.group_rank, exchange_caught()))
            data.x[sample], data.y[sample] = saved
            want = [case != "none" and gr == 0 for gr, _ in flags]
            if [f for _, f in flags] != want:
                fail(f"{case}: mismatch detection per rank {flags}, expected {want}")
            if case != "none":
                caught.append(case)
        result = f"mismatch caught ({', '.join(caught)})"

    else:
        own_before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        tr.exchange.exchange()  # a refresh from step 4 is in flight here: it completes first
        own = tr.model.state_dict()
        if any(not torch.equal(own[k], own_before[k]) for k in own):
            fail("the refresh changed the student's own parameters or buffers")
        # every rank's state, over COMM_WORLD, independently of the exchange
        states = MPI.COMM_WORLD.allgather(own_before)
        G = c.topology.group_size
        peers = [j for j in range(M) if j != c.model_id]
        buffers = {n for n, b in tr.model.named_buffers() if b.is_floating_point()}
        if not buffers:
            fail("test model has no buffers to compare")
        if G > 1 and all(torch.equal(states[0][n], states[1][n]) for n in buffers):
            fail("buffers are equal inside a group: the group mean would test nothing")
        for j, teacher in zip(peers, tr.exchange.teachers):
            group = [states[j * G + g] for g in range(G)]
            for name, value in teacher.state_dict().items():
                want = (
                    torch.stack([s[name] for s in group]).mean(0)
                    if name in buffers
                    else group[0][name]
                )
                if not torch.equal(value, want):
                    fail(
                        f"teacher {j}: {name} differs from the peer's "
                        "(buffers: the peer group's mean)"
                    )
            if teacher.training:
                fail("teacher copy is not in eval mode")
        teacher_digests = c.group.allgather([state_digest(t) for t in tr.exchange.teachers])
        if any(d != teacher_digests[0] for d in teacher_digests):
            fail("ranks of one group hold different teachers")
        if all(torch.equal(own[k], states[peers[0] * G + c.group_rank][k]) for k in own):
            fail("teacher equals the student: models did not differ")
        result = "weights ok"

    return f"{result}: W={c.topology.world_size} M={M}"
