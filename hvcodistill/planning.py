"""The model (alpha-beta: one transfer of n bytes over a link takes alpha + n / beta):

- Cluster: W GPUs on W / L nodes of L, one rank per GPU, placed contiguously (world rank r on
  node r // L; model m on ranks [m G, (m+1) G); the peers of group rank g are g, G + g, 2G + g,
  ...). Intra-node link: alpha_intra, beta_intra per GPU (NVLink/NVSwitch give every GPU its own
  bandwidth). Inter-node link: alpha_inter, beta_inter = the node's network bandwidth in each
  direction (all its NICs together), shared by every flow that leaves the node. 1 Gbit/s =
  1.25e8 bytes/s; 1 MB = 1e6 bytes.
- Step time t = t_compute' + t_allreduce + t_exchange / k. Communication never overlaps compute:
  an upper bound on step time (Horovod overlaps the all-reduce with the backward pass, which
  would shorten all-reduce's step more than codistillation's, whose all-reduce is smaller).
- t_compute: forward + backward + optimizer of one step on one GPU, no communication, the same
  for both variants (same batch B per GPU). A mode that distils from copies of its peers (weights)
  adds a no-grad forward per teacher, about 1/3 of forward + backward:
  t_compute' = t_compute (1 + (M - 1) / 3). A compute time measured from a weights-mode run
  (`--compute-from` reads the run's mode, M and alpha from summary.json;
  `--compute-includes-teachers` says so for `--compute-ms`) already holds its teacher forwards
  and is divided by that run's factor first.
- t_allreduce: one all-reduce of S = 4 x trainable parameters bytes (fp32 gradients) per step on
  each group; the M groups run at once (with the same G, they take the same time). G = 1: 0.
  * ring: 2 (G - 1) steps, each moving S / G over every ring edge at once; the slowest edge sets
    the pace: t = 2 (G - 1) (alpha + (S / G) / beta), on the inter-node link if the group spans
    more than one node, else intra-node. The inter-node beta is divided by the most ring edges
    that leave one node (1 when groups are whole nodes; more when groups share a node they span).
  * hierarchical (Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE; the group has L' ranks on each of its
    n nodes): t = 2 (L' - 1) (alpha_intra + (S / L') / beta_intra)
                + 2 (n - 1) (alpha_inter + (S / (L' n)) / (beta_inter / L'))
    (reduce-scatter and allgather inside the node; the L' cross-node rings, one per local rank,
    each on an S / L' shard, share the node's NIC). Every node of a group must hold the same
    number of its ranks.
- t_exchange (every k steps, so t_exchange / k per step): an allgather among the M peers, a ring
  of M - 1 sequential transfers per rank of one payload: t = (M - 1) (alpha + payload / beta).
  The payload is the exchange mode's (hvcodistill/comm/modes.py): predictions B x C x
  payload_bytes + 8 (the batch checksum); weights: 1/G of the model's parameters and buffers as
  the trainer sends them (4 x P for fp32 when only P is known): the refresh is sharded, each of a
  model's G ranks sends its shard and the group reassembles the teachers inside the node (counted
  in the bytes; its time is left out). A weights refresh is installed `refresh_delay` =
  min(10, k // 2) steps after it is taken, so only the part of its transfer that outlasts those
  steps' compute and all-reduce shows in the step time. The link is inter-node when the peers sit
  on different nodes (contiguous placement gives it when G >= L), else intra-node. All G peer
  allgathers run at once, so each rank gets beta_inter / f, f = the most peer-ring edges that
  leave one node = min(L, G) (with G >= L all L ranks of a node send across at once).
- Bytes per step, whole job, by link, from `hvcodistill.comm.traffic` (the trainer reports its
  bytes with the same functions): all-reduce = `job_allreduce_bytes` of each group; exchange =
  the sum over ranks of `allgather_sends(peers, ...)`, divided by k.

Pure functions and frozen dataclasses (`Cluster`, `Workload`, `predict`, `compare`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

from hvcodistill.comm.modes import MODES, Mode
from hvcodistill.comm.topology import NodeLayout
from hvcodistill.comm.traffic import ALGORITHMS, LINKS, allgather_sends, job_allreduce_bytes
from hvcodistill.errors import ConfigError

NO_EXCHANGE = "none"  # the planner's own choice: alpha = 0, M independent all-reduce runs
PLANNER_MODES = (*MODES, NO_EXCHANGE)
BYTES_PER_GBIT = 1e9 / 8


@dataclass(frozen=True)
class Cluster:
    gpus: int  # W, one rank per GPU
    gpus_per_node: int  # L
    intra_gbps: float = 2400.0  # per GPU, each direction (A100 NVLink 3: 300 GB/s)
    inter_gbps: float = 200.0  # per node, each direction (one HDR InfiniBand NIC)
    intra_latency_us: float = 2.0
    inter_latency_us: float = 5.0

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def layout(self) -> NodeLayout:
        return NodeLayout.contiguous(self.gpus, self.gpus_per_node)

    def transfer_s(self, link: str, nbytes: float, share: int = 1) -> float:
        """alpha + n / beta on `link`; `share` flows divide the node's inter-node bandwidth."""
        if link == "intra_node":
            return self.intra_latency_us * 1e-6 + nbytes / (self.intra_gbps * BYTES_PER_GBIT)
        beta = self.inter_gbps * BYTES_PER_GBIT / share
        return self.inter_latency_us * 1e-6 + nbytes / beta


@dataclass(frozen=True)
class Workload:
    params: int  # trainable parameters: the gradient all-reduce is 4 x this
    batch: int  # B, per GPU
    classes: int  # C
    n_models: int = 2  # M
    mode: str = "predictions"  # a registered exchange mode, or "none" (no exchange)
    every: int = 1  # k
    compute_s: float = 0.0  # forward + backward + optimizer per step per GPU, no teachers
    payload_bytes: int = 4  # bytes per exchanged logit (the trainer sends fp32)
    algorithm: str = "ring"  # ring | hierarchical (the gradient all-reduce)
    state_bytes: Optional[int] = None  # parameters + buffers; None: 4 x params

    @property
    def gradient_bytes(self) -> int:
        return 4 * self.params

    @property
    def exchange_mode(self) -> type[Mode] | None:
        """The registered mode that `mode` names; None for "none"."""
        return MODES.get(self.mode)

    def exchange_payload(self, group_size: int = 1) -> int:
        """Bytes one rank sends its peers in one exchange, as the mode counts them."""
        mode = self.exchange_mode
        if self.n_models == 1 or mode is None:
            return 0
        state = self.state_bytes if self.state_bytes is not None else self.gradient_bytes
        return mode.payload_bytes(
            batch=self.batch,
            classes=self.classes,
            value_bytes=self.payload_bytes,
            state_bytes=state,
            group_size=group_size,
        )

    @property
    def refresh_delay(self) -> int:
        """Steps an exchange travels before it is needed (the mode's default delay)."""
        mode = self.exchange_mode
        return mode.hidden_steps(self.every) if mode is not None else 0

    def teacher_factor(self) -> float:
        """Compute with the mode's teacher forwards, relative to without."""
        mode = self.exchange_mode
        return mode.compute_factor(self.n_models) if mode is not None else 1.0


@dataclass(frozen=True)
class Prediction:
    variant: str  # all-reduce | codistillation
    gpus: int
    nodes: int
    n_models: int
    group_size: int
    compute_s: float  # per step, teacher forwards included
    allreduce_s: float  # per step
    exchange_s: float  # per step (one exchange / k)
    step_s: float
    allreduce_link: str  # the link that paces the all-reduce ("" when G = 1)
    exchange_link: str  # the link that paces the exchange ("" without one)
    exchange_payload_bytes: int  # per rank per exchange
    allreduce_bytes: dict  # {link: bytes per step}, whole job
    exchange_bytes: dict  # {link: bytes per step}, whole job
    inter_node_bytes: float  # per step, whole job
    intra_node_bytes: float


@dataclass(frozen=True)
class Comparison:
    allreduce: Prediction
    codistillation: Prediction
    speedup: float  # all-reduce step time / codistillation step time
    inter_node_ratio: Optional[float]  # codistillation / all-reduce inter-node bytes; None: x / 0


def validate(cluster: Cluster, workload: Workload) -> None:
    """Each failure is one line naming the flag (and the Workload/Cluster field it fills)."""
    w, nodes, m = cluster.gpus, cluster.gpus_per_node, workload.n_models
    positive = {
        "--gpus": w,
        "--gpus-per-node": nodes,
        "--models": m,
        "--batch": workload.batch,
        "--every": workload.every,
        "--payload-bytes": workload.payload_bytes,
        "--intra-gbps": cluster.intra_gbps,
        "--inter-gbps": cluster.inter_gbps,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    finite = {
        "--intra-latency-us": cluster.intra_latency_us,
        "--inter-latency-us": cluster.inter_latency_us,
        "--compute-ms": workload.compute_s * 1e3,
        "--params": workload.params,
    }
    for flag, value in finite.items():
        if not value >= 0 or not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if w % nodes:
        raise ConfigError(
            f"--gpus {w} is not a multiple of --gpus-per-node {nodes} (nodes are equal)"
        )
    if w % m:
        raise ConfigError(
            f"--gpus {w} is not a multiple of --models {m} (G = W / M GPUs per model)"
        )
    if workload.mode not in PLANNER_MODES:
        raise ConfigError(f"--mode {workload.mode!r} is not one of {', '.join(PLANNER_MODES)}")
    if workload.algorithm not in ALGORITHMS:
        raise ConfigError(
            f"--algorithm {workload.algorithm!r} is not one of {', '.join(ALGORITHMS)}"
        )
    if m > 1 and workload.exchange_mode is not None and workload.classes < 1:
        raise ConfigError(
            f"--classes must be >= 1 for {workload.mode} mode, got {workload.classes}"
        )


# ----------------------------------------------------------------------------- placement
def groups(world_size: int, n_models: int) -> list[tuple[int, ...]]:
    """Model m's ranks, contiguous: [m G, (m+1) G)."""
    g = world_size // n_models
    return [tuple(range(m * g, (m + 1) * g)) for m in range(n_models)]


def peer_rings(world_size: int, n_models: int) -> list[tuple[int, ...]]:
    """The peers of each group rank g (one rank per model), in model order."""
    g = world_size // n_models
    return [tuple(m * g + r for m in range(n_models)) for r in range(g)]


def egress_share(layout: NodeLayout, rings: Sequence[Sequence[int]]) -> int:
    """The most ring edges (rank -> its successor) leaving one node, over rings running at once:
    how many flows share that node's inter-node bandwidth. 0: no ring crosses a node."""
    leaving: Counter = Counter()
    for ring in rings:
        for i, rank in enumerate(ring if len(ring) > 1 else ()):
            successor = ring[(i + 1) % len(ring)]
            if layout.node_of[rank] != layout.node_of[successor]:
                leaving[layout.node_of[rank]] += 1
    return max(leaving.values(), default=0)


# ----------------------------------------------------------------------------- times
def ring_allreduce_s(
    cluster: Cluster, rings: Sequence[Sequence[int]], nbytes: float
) -> tuple[float, str]:
    """All groups' ring all-reduces of `nbytes` at once: 2 (G-1) steps of S/G, paced by the
    slowest edge."""
    g = len(rings[0])
    if g == 1:
        return 0.0, ""
    share = egress_share(cluster.layout(), rings)
    link = "inter_node" if share else "intra_node"
    return 2 * (g - 1) * cluster.transfer_s(link, nbytes / g, share or 1), link


def hierarchical_allreduce_s(
    cluster: Cluster, rings: Sequence[Sequence[int]], nbytes: float
) -> tuple[float, str]:
    """Reduce-scatter and allgather over the group's L' ranks of a node, a ring across its n nodes
    per local rank on an S/L' shard; the L' cross-node rings share the node's NIC."""
    layout = cluster.layout()
    per_node = Counter(layout.node_of[r] for r in rings[0])
    for ring in rings:
        counts = set(Counter(layout.node_of[r] for r in ring).values())
        if len(counts) > 1:
            raise ConfigError(
                f"--algorithm hierarchical needs each model's G = {len(ring)} GPUs to fill "
                f"whole nodes of --gpus-per-node {cluster.gpus_per_node} or fit in one"
            )
    local, n = next(iter(per_node.values())), len(per_node)
    t = 0.0
    if local > 1:
        t += 2 * (local - 1) * cluster.transfer_s("intra_node", nbytes / local)
    if n > 1:
        t += 2 * (n - 1) * cluster.transfer_s("inter_node", nbytes / (local * n), share=local)
    return t, ("inter_node" if n > 1 else "intra_node" if local > 1 else "")


def exchange_s(
    cluster: Cluster, rings: Sequence[Sequence[int]], payload: float
) -> tuple[float, str]:
    """One exchange: every peer ring allgathers `payload` per rank at once, M - 1 transfers each."""
    m = len(rings[0])
    if m == 1 or payload == 0:
        return 0.0, ""
    share = egress_share(cluster.layout(), rings)
    link = "inter_node" if share else "intra_node"
    return (m - 1) * cluster.transfer_s(link, payload, share or 1), link


# ----------------------------------------------------------------------------- bytes
def allreduce_bytes(cluster: Cluster, workload: Workload) -> dict:
    """Bytes per step, whole job, of the gradient all-reduces of all M groups (traffic.py's
    model)."""
    layout, total = cluster.layout(), dict.fromkeys(LINKS, 0)
    for group in groups(cluster.gpus, workload.n_models):
        sends = job_allreduce_bytes(workload.algorithm, layout, group, workload.gradient_bytes)
        for link, n in sends.items():
            total[link] += n
    return total


def exchange_bytes(cluster: Cluster, workload: Workload) -> dict:
    """Bytes per step, whole job, of the peer exchange: each exchange's allgather sends / k, and
    what a group sends inside itself afterwards (a sharded refresh reassembled)."""
    layout, total = cluster.layout(), dict.fromkeys(LINKS, 0.0)
    m, k = workload.n_models, workload.every
    payload = workload.exchange_payload(cluster.gpus // m)
    if not payload:
        return total
    for ring in peer_rings(cluster.gpus, m):
        for me in ring:
            for link, n in allgather_sends(ring, me, payload, layout).items():
                total[link] += n / k
    regroup = workload.exchange_mode.group_bytes(payload, m)
    if regroup:
        for group in groups(cluster.gpus, m):
            for me in group:
                for link, n in allgather_sends(group, me, regroup, layout).items():
                    total[link] += n / k
    return total


# ----------------------------------------------------------------------------- predictions
def predict(cluster: Cluster, workload: Workload) -> Prediction:
    """Step time and bytes per step of `workload` (its M) on `cluster`, by the model above."""
    validate(cluster, workload)
    w, m, k = cluster.gpus, workload.n_models, workload.every
    if workload.algorithm == "hierarchical":
        allreduce = hierarchical_allreduce_s
    else:
        allreduce = ring_allreduce_s
    t_allreduce, allreduce_link = allreduce(cluster, groups(w, m), workload.gradient_bytes)
    payload = workload.exchange_payload(w // m)
    t_exchange, exchange_link = exchange_s(cluster, peer_rings(w, m), payload)
    t_compute = workload.compute_s * (workload.teacher_factor() if m > 1 else 1.0)
    # an exchange travels while `refresh_delay` steps compute: only what is left shows
    t_exchange = max(0.0, t_exchange - workload.refresh_delay * (t_compute + t_allreduce))
    ar, ex = allreduce_bytes(cluster, workload), exchange_bytes(cluster, workload)
    return Prediction(
        variant="all-reduce" if m == 1 else "codistillation",
        gpus=w,
        nodes=cluster.nodes,
        n_models=m,
        group_size=w // m,
        compute_s=t_compute,
        allreduce_s=t_allreduce,
        exchange_s=t_exchange / k,
        step_s=t_compute + t_allreduce + t_exchange / k,
        allreduce_link=allreduce_link,
        exchange_link=exchange_link,
        exchange_payload_bytes=payload,
        allreduce_bytes=ar,
        exchange_bytes=ex,
        inter_node_bytes=ar["inter_node"] + ex["inter_node"],
        intra_node_bytes=ar["intra_node"] + ex["intra_node"],
    )


def compare(cluster: Cluster, workload: Workload) -> Comparison:
    """All-reduce (one model on all W GPUs) against `workload`'s codistillation (M models of
    W / M)."""
    base = predict(cluster, replace(workload, n_models=1))
    codist = predict(cluster, workload)
    ratio = codist.inter_node_bytes / base.inter_node_bytes if base.inter_node_bytes else None
    speedup = base.step_s / codist.step_s if codist.step_s else 1.0
    return Comparison(base, codist, speedup, ratio)


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelSize:
    params: int  # trainable parameters
    state_bytes: int  # parameters + buffers as the trainer's weight exchange sends them


def model_size(
    name: str, *, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)
) -> ModelSize:
    """Counted on torch's meta device: shapes only, no memory, no initialisation cost."""
    # torch is imported only when a model is counted: the planner runs without it otherwise
    import torch

    from hvcodistill.models import build_model

    with torch.device("meta"):
        model = build_model(
            name, input_shape=tuple(input_shape), num_classes=num_classes, hidden=hidden
        )
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return ModelSize(params, state)


def compute_from_summary(summary: dict) -> tuple[float, str]:
    """Seconds of compute per step without teacher forwards, from a run's summary.json, and how
    it was derived. A run whose mode distils from teachers holds their forwards in compute_s."""
    per_step = summary["timing"]["compute_s"] / max(1, summary["steps"])
    m = int(summary.get("topology", {}).get("n_models", 1))
    mode = MODES.get(str(summary.get("mode")))
    distilled = mode is not None and summary.get("alpha", 1) != 0
    factor = mode.compute_factor(m) if distilled else 1.0
    if factor != 1.0:
        note = f"measured {per_step * 1e3:.3g} ms / {factor:.3g} ({m - 1} teacher forward(s))"
        return per_step / factor, note
    return per_step, f"measured {per_step * 1e3:.3g} ms"
