"""Prediction payloads under real ranks. Case `payload:TRAINER_DTYPE` of checks.py.

For fp32, fp16 and bf16 on the real peer_comm: the logits a rank receives are exactly its peers'
rounded to the payload dtype (each peer's logits are regenerated here from its model id), the
distillation loss against them is within 1e-2 relative of the loss against the exact fp32
logits, and the bytes received and counted as traffic are (M-1) x (B x C x dtype size + 8).
Then the trainer with codistill.payload_dtype=trainer_dtype counts those bytes on every step.
"""

import torch
from common import batch, fail, make_trainer

from hvcodistill.comm.exchange import PAYLOAD_DTYPES, PredictionExchange
from hvcodistill.comm.traffic import Traffic
from hvcodistill.losses import distillation_distance
from hvcodistill.training.loop import train_step

SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}
B, STEPS = 16, 5


def run(trainer_dtype, overrides):
    tr = make_trainer(
        [
            "data.name=digits",
            "model.name=mlp",
            "codistill.mode=predictions",
            "codistill.every=1",
            "codistill.burn_in_steps=0",
            f"codistill.payload_dtype={trainer_dtype}",
            "train.steps=10",
            f"train.batch_size={B}",
            *overrides,
        ]
    )
    c, M = tr.comms, tr.comms.topology.n_models
    C = tr.data.num_classes
    peers = [j for j in range(M) if j != c.model_id]

    def model_logits(m):
        """What model m 'predicts' here: wide-ranging logits, known to every rank."""
        return torch.randn(B, C, generator=torch.Generator().manual_seed(1000 + m)) * 8

    for dtype in PAYLOAD_DTYPES:
        traffic = Traffic()
        ex = PredictionExchange(
            tr.plane.wire(),
            c.model_id,
            every=1,
            batch_key=tr.plan.key,
            payload_dtype=dtype,
            traffic=traffic,
            peers_by_link=tr.exchange.peers_by_link,
        )
        own = model_logits(c.model_id)
        got = ex.teacher_logits(step=0, x=None, logits=own, alpha=1.0)
        if len(got) != M - 1:
            fail(f"{dtype}: expected {M - 1} teachers, got {len(got)}")
        for j, teacher in zip(peers, got):
            exact = model_logits(j)
            if teacher.dtype != torch.float32 or not torch.equal(
                teacher, exact.to(PAYLOAD_DTYPES[dtype]).float()
            ):
                fail(
                    f"{dtype}: logits from model {j} are not its fp32 logits rounded to {dtype}: "
                    f"max diff {(teacher - exact.to(PAYLOAD_DTYPES[dtype]).float()).abs().max()}"
                )
            want = distillation_distance(own, exact, distance="kl", temperature=1.0).item()
            have = distillation_distance(own, teacher, distance="kl", temperature=1.0).item()
            if abs(have - want) > 1e-2 * abs(want):
                fail(f"{dtype}: distillation loss {have} vs {want} with fp32 logits")
        per_peer = B * C * SIZES[dtype] + 8
        if (
            ex.bytes_received != (M - 1) * per_peer
            or sum(traffic.bytes["exchange"].values()) != (M - 1) * per_peer
        ):
            fail(
                f"{dtype}: received {ex.bytes_received} B, traffic {traffic.bytes['exchange']}, "
                f"expected {(M - 1) * per_peer} B"
            )

    for step in range(STEPS):
        train_step(tr, step, *batch(tr, step))
    want = STEPS * (M - 1) * (B * C * SIZES[trainer_dtype] + 8)
    ex = tr.exchange
    if ex.bytes_received != want or ex.count != STEPS or not ex.seconds > 0:
        fail(
            f"trainer with {trainer_dtype}: received {ex.bytes_received} B in "
            f"{ex.count} exchanges ({ex.seconds} s), expected {want} B in {STEPS}"
        )
    return f"payloads ok: W={c.topology.world_size} M={M}, trainer {trainer_dtype}"
