"""Bytes by link: how many bytes each collective puts on the wire, inside a node or between nodes.

The node layout (`NodeLayout`, comm/topology.py) is found from MPI, never from a setting. Every
figure here is what one rank *sends*; summed over the world it is what the job moved. Two ways
to know the bytes:

- counted: the peer exchange and the evaluation's peer allgather know their payloads exactly.
  An allgather of P bytes per rank is attributed as its logical transfers: each rank's P bytes
  reach each of the other members, and a transfer whose two ends sit on different nodes is
  inter-node. (For M = 2 this is exactly what crosses; for M > 2 an MPI may relay through a third
  peer, which moves the same number of bytes over other links.)
- modelled: Horovod's gradient all-reduce on group_comm, from the real gradient sizes and a
  stated algorithm:
  * `ring` (MPI_Allreduce pinned to Open MPI's ring on the emulated cluster, and NCCL's ring on
    GPUs): the group's ranks in group-rank order form a ring; each rank sends 2 (G-1)/G x S bytes
    to its successor (S/G per step, G-1 steps of reduce-scatter, G-1 of allgather). With
    contiguous placement a group that spans n > 1 nodes crosses n node boundaries.
  * `hierarchical` (Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE with NCCL): reduce-scatter inside the
    node over its L ranks, a ring all-reduce of each rank's S/L shard across the n nodes among the
    ranks of the same local rank, allgather inside the node. Per rank: 2 (L-1)/L x S intra-node,
    2 (n-1)/n x S/L inter-node.
  Blocks are taken as S/G exactly (an MPI splits them to the element: a difference of a few bytes).

Pure functions and plain objects: no MPI call.
"""

from __future__ import annotations

from collections.abc import Sequence

# NodeLayout is also imported from here by plan.py and tests/test_plan.py: once they import it from
# comm.topology, this import serves the annotations below only.
from hvcodistill.comm.topology import NodeLayout

LINKS = ("intra_node", "inter_node")
# Collectives whose bytes a run reports. Left out, and small: the per-step preemption flag (4
# bytes on COMM_WORLD), the metrics averages (a few doubles per log step), Horovod's own
# coordination messages, and set-up (the first broadcast of the parameters, MPI's wire-up).
COLLECTIVES = ("allreduce", "exchange", "evaluation", "checkpoint")
ALGORITHMS = ("ring", "hierarchical")


def zero() -> dict:
    return {link: 0 for link in LINKS}


def ring_allreduce_sends(ranks: Sequence[int], me: int, nbytes: int, layout: NodeLayout) -> dict:
    """Bytes world rank `me` sends in a ring all-reduce of `nbytes` over `ranks` (in ring order)."""
    g = len(ranks)
    out = zero()
    if g > 1:
        successor = ranks[(list(ranks).index(me) + 1) % g]
        out[layout.link(me, successor)] += 2 * (g - 1) * nbytes // g
    return out


def hierarchical_allreduce_sends(
    ranks: Sequence[int], me: int, nbytes: int, layout: NodeLayout
) -> dict:
    """Bytes world rank `me` sends in Horovod's hierarchical all-reduce over `ranks`
    (equal nodes)."""
    on_node = [r for r in ranks if layout.node_of[r] == layout.node_of[me]]
    local, nodes = len(on_node), len({layout.node_of[r] for r in ranks})
    out = zero()
    if local > 1:  # reduce-scatter, then allgather, inside the node
        out["intra_node"] += 2 * (local - 1) * nbytes // local
    if nodes > 1:  # the ring across nodes, on this rank's 1/L shard
        out["inter_node"] += 2 * (nodes - 1) * (nbytes // local) // nodes
    return out


def horovod_algorithm(device_type: str, environ: dict) -> str:
    """The all-reduce algorithm the byte model assumes for this run: Horovod's hierarchical
    all-reduce exists for NCCL only (GPU, HOROVOD_HIERARCHICAL_ALLREDUCE=1); otherwise a ring."""
    hierarchical = environ.get("HOROVOD_HIERARCHICAL_ALLREDUCE", "0").strip().lower() in (
        "1",
        "true",
        "yes",
    )
    return "hierarchical" if device_type == "cuda" and hierarchical else "ring"


def allreduce_sends(
    algorithm: str, ranks: Sequence[int], me: int, nbytes: int, layout: NodeLayout
) -> dict:
    if algorithm == "hierarchical":
        return hierarchical_allreduce_sends(ranks, me, nbytes, layout)
    return ring_allreduce_sends(ranks, me, nbytes, layout)


def allgather_sends(ranks: Sequence[int], me: int, nbytes: int, layout: NodeLayout) -> dict:
    """Bytes world rank `me` sends in an allgather of `nbytes` per rank (logical transfers)."""
    out = zero()
    for other in ranks:
        if other != me:
            out[layout.link(me, other)] += nbytes
    return out


def gather_sends(root: int, me: int, nbytes: int, layout: NodeLayout) -> dict:
    """Bytes world rank `me` sends to `root` in a gather."""
    out = zero()
    if me != root:
        out[layout.link(me, root)] += nbytes
    return out


def job_allreduce_bytes(
    algorithm: str, layout: NodeLayout, group: Sequence[int], nbytes: int
) -> dict:
    """What one all-reduce of `nbytes` over `group` moves, all its ranks together."""
    total = zero()
    for me in group:
        for link, n in allreduce_sends(algorithm, group, me, nbytes, layout).items():
            total[link] += n
    return total


class Traffic:
    """This rank's bytes sent, by collective and link, over the whole run (all segments of a
    resumed one: a checkpoint saves it). `add` is two integer additions, cheap on every step."""

    def __init__(self) -> None:
        self.bytes = {c: zero() for c in COLLECTIVES}

    def add(self, collective: str, sent: dict) -> None:
        counts = self.bytes[collective]
        for link, n in sent.items():
            counts[link] += n

    def flat(self) -> list[int]:
        """The counts in a fixed order (COLLECTIVES x LINKS), for one reduction over the world."""
        return [self.bytes[c][link] for c in COLLECTIVES for link in LINKS]

    @staticmethod
    def unflat(values: Sequence[float]) -> dict:
        it = iter(values)
        return {c: {link: int(next(it)) for link in LINKS} for c in COLLECTIVES}

    def state_dict(self) -> dict:
        return {"bytes": {c: dict(v) for c, v in self.bytes.items()}}

    def load_state_dict(self, state: dict) -> None:
        for c in COLLECTIVES:
            self.bytes[c] = {link: int(state["bytes"].get(c, {}).get(link, 0)) for link in LINKS}


def per_step(totals: dict, steps: int) -> dict:
    """{collective: {link: bytes}} totals -> bytes per training step, with a `total` row."""
    steps = max(1, steps)
    out = {c: {link: v / steps for link, v in links.items()} for c, links in totals.items()}
    out["total"] = {link: sum(out[c][link] for c in totals) for link in LINKS}
    return out
