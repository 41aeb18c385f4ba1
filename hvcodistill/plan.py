"""The planner: per-step time and bytes by link of all-reduce vs codistillation, for a cluster we cannot run.

    python -m hvcodistill.plan --config configs/imagenet_resnet50_codistill.yaml --gpus 16 \\
        --gpus-per-node 8 --inter-gbps 200 --compute-ms 20
    python -m hvcodistill.plan --model resnet50 --data imagenet --batch 32 --mode predictions --every 10 \\
        --gpus-list 16,32,64,128 --compute-from runs/x/summary.json [--json | --markdown]

It compares, on W GPUs, (a) all-reduce: one model on all W (M = 1, G = W) and (b) codistillation:
M models of G = W / M GPUs each, exchanging predictions or weights every k steps.

The model (alpha-beta: one transfer of n bytes over a link takes alpha + n / beta):

- Cluster: W GPUs on W / L nodes of L, one rank per GPU, placed contiguously (world rank r on node
  r // L; model m on ranks [m G, (m+1) G); the peers of group rank g are g, G + g, 2G + g, ...).
  Intra-node link: alpha_intra, beta_intra per GPU (NVLink/NVSwitch give every GPU its own
  bandwidth). Inter-node link: alpha_inter, beta_inter = the node's network bandwidth in each
  direction (all its NICs together), shared by every flow that leaves the node. 1 Gbit/s =
  1.25e8 bytes/s; 1 MB = 1e6 bytes.
- Step time t = t_compute' + t_allreduce + t_exchange / k. Communication never overlaps compute:
  an upper bound on step time (Horovod overlaps the all-reduce with the backward pass, which
  would shorten all-reduce's step more than codistillation's, whose all-reduce is smaller).
- t_compute: forward + backward + optimizer of one step on one GPU, no communication, the same
  for both variants (same batch B per GPU). In weights mode each of the M - 1 teacher copies adds
  a no-grad forward, about 1/3 of forward + backward: t_compute' = t_compute (1 + (M - 1) / 3).
  A compute time measured from a weights-mode run (`--compute-from` reads the run's mode, M and
  alpha from summary.json; `--compute-includes-teachers` says so for `--compute-ms`) already holds
  its teacher forwards and is divided by that run's factor first.
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
  payload: predictions B x C x payload_bytes + 8 (the batch checksum); weights: 1/G of the model's
  parameters and buffers as the trainer sends them (4 x P for fp32 when only P is known): the
  refresh is sharded, each of a model's G ranks sends its shard and the group reassembles the
  teachers inside the node (counted in the bytes; its time is left out). A weights refresh is
  installed `refresh_delay` = min(10, k // 2) steps after it is taken, so only the part of its
  transfer that outlasts those steps' compute and all-reduce shows in the step time. The link
  is inter-node when the peers sit on different nodes (contiguous placement gives it when G >= L),
  else intra-node. All G peer allgathers run at once, so each rank gets beta_inter / f, f = the
  most peer-ring edges that leave one node = min(L, G) (with G >= L all L ranks of a node send
  across at once).
- Bytes per step, whole job, by link, from `hvcodistill.comm.traffic` (the trainer reports its
  bytes with the same functions): all-reduce = `job_allreduce_bytes` of each group; exchange =
  the sum over ranks of `allgather_sends(peers, ...)`, divided by k.

Pure functions and frozen dataclasses (`Cluster`, `Workload`, `predict`, `compare`); the command
line at the end. Bad input: one line `hvcodistill.plan: error: ...` naming the flag, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from hvcodistill.comm.traffic import ALGORITHMS, LINKS, NodeLayout, allgather_sends, job_allreduce_bytes
from hvcodistill.errors import ConfigError

PROG = "hvcodistill.plan"
MODES = ("predictions", "weights", "none")     # none: alpha = 0, M independent all-reduce runs
BYTES_PER_GBIT = 1e9 / 8
CHECKSUM_BYTES = 8                              # the batch checksum riding with the logits
TEACHER_FORWARD = 1 / 3                         # a no-grad forward / (forward + backward)
# Per-sample input shape and classes of the data sets whose shape is fixed (npz: give flags).
DATA_SHAPES = {"digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "imagenet": ((3, 224, 224), 1000)}


@dataclass(frozen=True)
class Cluster:
    gpus: int                        # W, one rank per GPU
    gpus_per_node: int               # L
    intra_gbps: float = 2400.0       # per GPU, each direction (A100 NVLink 3: 300 GB/s)
    inter_gbps: float = 200.0        # per node, each direction (one HDR InfiniBand NIC)
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
        return self.inter_latency_us * 1e-6 + nbytes / (self.inter_gbps * BYTES_PER_GBIT / share)


@dataclass(frozen=True)
class Workload:
    params: int                      # trainable parameters: the gradient all-reduce is 4 x this
    batch: int                       # B, per GPU
    classes: int                     # C
    n_models: int = 2                # M
    mode: str = "predictions"        # predictions | weights | none (no exchange)
    every: int = 1                   # k
    compute_s: float = 0.0           # forward + backward + optimizer per step per GPU, no teachers
    payload_bytes: int = 4           # bytes per exchanged logit (the trainer sends fp32)
    algorithm: str = "ring"          # ring | hierarchical (the gradient all-reduce)
    state_bytes: Optional[int] = None  # weights-mode payload: parameters + buffers; None: 4 x params

    @property
    def gradient_bytes(self) -> int:
        return 4 * self.params

    def exchange_payload(self, group_size: int = 1) -> int:
        """Bytes one rank sends its peers in one exchange. Weights mode is sharded: each of a
        model's G ranks sends 1/G of the model (the group reassembles it inside the node)."""
        if self.n_models == 1 or self.mode == "none":
            return 0
        if self.mode == "predictions":
            return self.batch * self.classes * self.payload_bytes + CHECKSUM_BYTES
        return -(-(self.state_bytes if self.state_bytes is not None else 4 * self.params) // group_size)

    @property
    def refresh_delay(self) -> int:
        """Steps a weights refresh has to travel before it is installed (the trainer's default)."""
        return min(10, self.every // 2) if self.mode == "weights" else 0

    def teacher_factor(self) -> float:
        """Compute with the M - 1 teacher forwards of weights mode, relative to without."""
        return 1 + (self.n_models - 1) * TEACHER_FORWARD if self.mode == "weights" else 1.0


@dataclass(frozen=True)
class Prediction:
    variant: str                     # all-reduce | codistillation
    gpus: int
    nodes: int
    n_models: int
    group_size: int
    compute_s: float                 # per step, teacher forwards included
    allreduce_s: float               # per step
    exchange_s: float                # per step (one exchange / k)
    step_s: float
    allreduce_link: str              # the link that paces the all-reduce ("" when G = 1)
    exchange_link: str               # the link that paces the exchange ("" without one)
    exchange_payload_bytes: int      # per rank per exchange
    allreduce_bytes: dict            # {link: bytes per step}, whole job
    exchange_bytes: dict             # {link: bytes per step}, whole job
    inter_node_bytes: float          # per step, whole job
    intra_node_bytes: float


@dataclass(frozen=True)
class Comparison:
    allreduce: Prediction
    codistillation: Prediction
    speedup: float                   # all-reduce step time / codistillation step time
    inter_node_ratio: Optional[float]  # codistillation / all-reduce inter-node bytes; None if 0 / 0 or x / 0


def validate(cluster: Cluster, workload: Workload) -> None:
    """Each failure is one line naming the flag (and the Workload/Cluster field it fills)."""
    w, l, m = cluster.gpus, cluster.gpus_per_node, workload.n_models
    positive = {"--gpus": w, "--gpus-per-node": l, "--models": m, "--batch": workload.batch,
                "--every": workload.every, "--payload-bytes": workload.payload_bytes,
                "--intra-gbps": cluster.intra_gbps, "--inter-gbps": cluster.inter_gbps}
    for flag, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    for flag, value in {"--intra-latency-us": cluster.intra_latency_us,
                        "--inter-latency-us": cluster.inter_latency_us,
                        "--compute-ms": workload.compute_s * 1e3, "--params": workload.params}.items():
        if not value >= 0 or not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if w % l:
        raise ConfigError(f"--gpus {w} is not a multiple of --gpus-per-node {l} (nodes are equal)")
    if w % m:
        raise ConfigError(f"--gpus {w} is not a multiple of --models {m} (G = W / M GPUs per model)")
    if workload.mode not in MODES:
        raise ConfigError(f"--mode {workload.mode!r} is not one of {', '.join(MODES)}")
    if workload.algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm {workload.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if workload.mode == "predictions" and m > 1 and workload.classes < 1:
        raise ConfigError(f"--classes must be >= 1 for predictions mode, got {workload.classes}")


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
def ring_allreduce_s(cluster: Cluster, rings: Sequence[Sequence[int]], nbytes: float) -> tuple[float, str]:
    """All groups' ring all-reduces of `nbytes` at once: 2 (G-1) steps of S/G, paced by the slowest edge."""
    g = len(rings[0])
    if g == 1:
        return 0.0, ""
    share = egress_share(cluster.layout(), rings)
    link = "inter_node" if share else "intra_node"
    return 2 * (g - 1) * cluster.transfer_s(link, nbytes / g, share or 1), link


def hierarchical_allreduce_s(cluster: Cluster, rings: Sequence[Sequence[int]], nbytes: float) -> tuple[float, str]:
    """Reduce-scatter and allgather over the group's L' ranks of a node, a ring across its n nodes
    per local rank on an S/L' shard; the L' cross-node rings share the node's NIC."""
    layout = cluster.layout()
    per_node = Counter(layout.node_of[r] for r in rings[0])
    for ring in rings:
        counts = set(Counter(layout.node_of[r] for r in ring).values())
        if len(counts) > 1:
            raise ConfigError(f"--algorithm hierarchical needs each model's G = {len(ring)} GPUs to fill "
                              f"whole nodes of --gpus-per-node {cluster.gpus_per_node} or fit in one")
    local, n = next(iter(per_node.values())), len(per_node)
    t = 0.0
    if local > 1:
        t += 2 * (local - 1) * cluster.transfer_s("intra_node", nbytes / local)
    if n > 1:
        t += 2 * (n - 1) * cluster.transfer_s("inter_node", nbytes / (local * n), share=local)
    return t, ("inter_node" if n > 1 else "intra_node" if local > 1 else "")


def exchange_s(cluster: Cluster, rings: Sequence[Sequence[int]], payload: float) -> tuple[float, str]:
    """One exchange: every peer ring allgathers `payload` per rank at once, M - 1 transfers each."""
    m = len(rings[0])
    if m == 1 or payload == 0:
        return 0.0, ""
    share = egress_share(cluster.layout(), rings)
    link = "inter_node" if share else "intra_node"
    return (m - 1) * cluster.transfer_s(link, payload, share or 1), link


# ----------------------------------------------------------------------------- bytes
def allreduce_bytes(cluster: Cluster, workload: Workload) -> dict:
    """Bytes per step, whole job, of the gradient all-reduces of all M groups (traffic.py's model)."""
    layout, total = cluster.layout(), dict.fromkeys(LINKS, 0)
    for group in groups(cluster.gpus, workload.n_models):
        for link, n in job_allreduce_bytes(workload.algorithm, layout, group, workload.gradient_bytes).items():
            total[link] += n
    return total


def exchange_bytes(cluster: Cluster, workload: Workload) -> dict:
    """Bytes per step, whole job, of the peer exchange: each exchange's allgather sends / k."""
    layout, total = cluster.layout(), dict.fromkeys(LINKS, 0.0)
    m = workload.n_models
    payload = workload.exchange_payload(cluster.gpus // m)
    if payload:
        for ring in peer_rings(cluster.gpus, m):
            for me in ring:
                for link, n in allgather_sends(ring, me, payload, layout).items():
                    total[link] += n / workload.every
        if workload.mode == "weights":   # the group reassembles the M-1 teachers from its shards
            for group in groups(cluster.gpus, m):
                for me in group:
                    for link, n in allgather_sends(group, me, (m - 1) * payload, layout).items():
                        total[link] += n / workload.every
    return total


# ----------------------------------------------------------------------------- predictions
def predict(cluster: Cluster, workload: Workload) -> Prediction:
    """Step time and bytes per step of `workload` (its M) on `cluster`, by the model in the docstring."""
    validate(cluster, workload)
    w, m = cluster.gpus, workload.n_models
    algorithm = hierarchical_allreduce_s if workload.algorithm == "hierarchical" else ring_allreduce_s
    t_allreduce, allreduce_link = algorithm(cluster, groups(w, m), workload.gradient_bytes)
    payload = workload.exchange_payload(w // m)
    t_exchange, exchange_link = exchange_s(cluster, peer_rings(w, m), payload)
    t_compute = workload.compute_s * (workload.teacher_factor() if m > 1 else 1.0)
    # a weights refresh travels while `refresh_delay` steps compute: only what is left shows
    t_exchange = max(0.0, t_exchange - workload.refresh_delay * (t_compute + t_allreduce))
    ar, ex = allreduce_bytes(cluster, workload), exchange_bytes(cluster, workload)
    return Prediction(
        variant="all-reduce" if m == 1 else "codistillation", gpus=w, nodes=cluster.nodes, n_models=m,
        group_size=w // m, compute_s=t_compute, allreduce_s=t_allreduce, exchange_s=t_exchange / workload.every,
        step_s=t_compute + t_allreduce + t_exchange / workload.every, allreduce_link=allreduce_link,
        exchange_link=exchange_link, exchange_payload_bytes=payload, allreduce_bytes=ar, exchange_bytes=ex,
        inter_node_bytes=ar["inter_node"] + ex["inter_node"], intra_node_bytes=ar["intra_node"] + ex["intra_node"])


def compare(cluster: Cluster, workload: Workload) -> Comparison:
    """All-reduce (one model on all W GPUs) against `workload`'s codistillation (M models of W / M)."""
    base = predict(cluster, replace(workload, n_models=1))
    codist = predict(cluster, workload)
    ratio = codist.inter_node_bytes / base.inter_node_bytes if base.inter_node_bytes else None
    return Comparison(base, codist, base.step_s / codist.step_s if codist.step_s else 1.0, ratio)


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelSize:
    params: int                      # trainable parameters
    state_bytes: int                 # parameters + buffers as the trainer's weight exchange sends them


def model_size(name: str, *, input_shape: Sequence[int], num_classes: int,
               hidden: Sequence[int] = (128,)) -> ModelSize:
    """Counted on torch's meta device: shapes only, no memory, no initialisation cost."""
    import torch

    from hvcodistill.models import build_model  # torch is imported only when a model is counted

    with torch.device("meta"):
        model = build_model(name, input_shape=tuple(input_shape), num_classes=num_classes, hidden=hidden)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return ModelSize(params, state)


def compute_from_summary(summary: dict) -> tuple[float, str]:
    """Seconds of compute per step without teacher forwards, from a run's summary.json, and how
    it was derived. A weights-mode run's compute_s includes its M - 1 teacher forwards."""
    per_step = summary["timing"]["compute_s"] / max(1, summary["steps"])
    m = int(summary.get("topology", {}).get("n_models", 1))
    if summary.get("mode") == "weights" and m > 1 and summary.get("alpha", 1) != 0:
        factor = Workload(1, 1, 1, n_models=m, mode="weights").teacher_factor()
        return per_step / factor, f"measured {per_step * 1e3:.3g} ms / {factor:.3g} ({m - 1} teacher forward(s))"
    return per_step, f"measured {per_step * 1e3:.3g} ms"


def _read_summary(path: str) -> dict:
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    try:
        summary = json.loads(p.read_text())
        summary["timing"]["compute_s"], summary["steps"]    # noqa: B018 (both must be there)
    except OSError as e:
        raise ConfigError(f"--compute-from {p}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--compute-from {p}: not a hvcodistill summary.json (needs timing.compute_s "
                          "and steps)") from None
    return summary


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: expected positive integers separated by commas, got {text!r}")
    return values


def _pick(flag_value, config_value):
    """An explicit flag wins over the config (or default), 0 included: validate() then names it."""
    return config_value if flag_value is None else flag_value


@dataclass(frozen=True)
class Inputs:
    """What the command line resolved to: the workload (its compute without teachers), the world
    sizes, the cluster's other numbers, and words for the header."""
    workload: Workload
    gpus: tuple[int, ...]
    cluster: Cluster                 # gpus = the first of `gpus`
    model: str
    compute_note: str
    gpus_per_model: Optional[int] = None   # G fixed (M = W / G per world size) instead of M fixed

    def workload_for(self, gpus: int) -> Workload:
        """The workload at world size `gpus`: M from --models, or W / G with --gpus-per-model."""
        if self.gpus_per_model:
            return replace(self.workload, n_models=max(1, gpus // self.gpus_per_model))
        return self.workload


def resolve(args: argparse.Namespace) -> Inputs:
    """Flags over config over defaults -> Inputs; every failure names its flag."""
    from hvcodistill.config import load_config

    cfg = load_config(args.config) if args.config else None
    data = args.data or (cfg.data.name if cfg else None)
    model = args.model or (cfg.model.name if cfg else None)
    hidden = _ints("--hidden", args.hidden) if args.hidden else (cfg.model.hidden if cfg else [128])
    shape, classes = DATA_SHAPES.get(data, (None, None))
    if data == "synthetic":
        shape, classes = (tuple(cfg.data.synthetic_shape), cfg.data.synthetic_classes) if cfg else ((3, 32, 32), 10)
    shape = tuple(_ints("--input-shape", args.input_shape)) if args.input_shape else shape
    classes = args.classes if args.classes is not None else classes
    if classes is None:
        raise ConfigError("missing classes: give --classes (or --data / --config with a known data set)")
    if args.params is not None:
        size, model = ModelSize(args.params, 4 * args.params), model or "model"
    elif model is None:
        raise ConfigError("missing model: give --model NAME, --params N or --config FILE")
    else:
        from hvcodistill.models import MODEL_NAMES  # imports torch: only when a model is counted

        if model not in MODEL_NAMES:
            raise ConfigError(f"--model {model!r} is not in the registry: {', '.join(MODEL_NAMES)}")
        if shape is None and model != "mlp":
            shape = (3, 224, 224)    # convolutional models here pool adaptively: only channels count
        if shape is None:
            raise ConfigError("--input-shape is needed for --model mlp (or --data / --config with a known data set)")
        size = model_size(model, input_shape=shape, num_classes=classes, hidden=hidden)
    if args.gpus_list:
        gpus = tuple(_ints("--gpus-list", args.gpus_list))
    elif args.gpus is not None:
        gpus = (args.gpus,)
    else:
        raise ConfigError("missing world size: give --gpus W or --gpus-list W1,W2,...")
    c = cfg.codistill if cfg else None
    workload = Workload(
        params=size.params, state_bytes=size.state_bytes, classes=classes,
        batch=_pick(args.batch, cfg.train.batch_size if cfg else 32),
        n_models=_pick(args.models, c.n_models if c else 2),
        mode=_pick(args.mode, c.mode if c else "predictions"),
        every=_pick(args.every, c.every if c else 1), payload_bytes=args.payload_bytes, algorithm=args.algorithm)
    if args.compute_from:
        compute_s, note = compute_from_summary(_read_summary(args.compute_from))
    elif args.compute_ms is not None:
        compute_s, note = args.compute_ms / 1e3, "given"
        if args.compute_includes_teachers and workload.mode == "weights" and workload.n_models > 1:
            compute_s /= workload.teacher_factor()
            note = f"given {args.compute_ms:.3g} ms with teachers / {workload.teacher_factor():.3g}"
    else:
        compute_s, note = 0.0, "not given (--compute-ms or --compute-from): times are communication only"
    cluster = Cluster(gpus[0], args.gpus_per_node, args.intra_gbps, args.inter_gbps,
                      args.intra_latency_us, args.inter_latency_us)
    workload = replace(workload, compute_s=compute_s)
    if args.gpus_per_model is not None:
        if args.models is not None:
            raise ConfigError("give --models M or --gpus-per-model G, not both")
        bad = [w for w in gpus if args.gpus_per_model < 1 or w % args.gpus_per_model]
        if bad:
            raise ConfigError(f"--gpus-per-model {args.gpus_per_model} must divide every world size (not {bad[0]})")
    inputs = Inputs(workload, gpus, cluster, model, note, args.gpus_per_model)
    for w in gpus:              # every world size is checked before anything is printed
        validate(replace(cluster, gpus=w), inputs.workload_for(w))
    return inputs


# ----------------------------------------------------------------------------- output
COLUMNS = ("GPUs", "nodes", "variant", "M x G", "step ms", "all-reduce ms", "exchange ms",
           "inter-node MB/step", "intra-node MB/step", "speed-up", "inter-node bytes vs all-reduce")


def table_rows(comparisons: Sequence[Comparison]) -> list[tuple[str, ...]]:
    rows = []
    for c in comparisons:
        variants = (c.allreduce,) if c.codistillation.n_models == 1 else (c.allreduce, c.codistillation)
        for p in variants:
            ratio = c.inter_node_ratio if p is c.codistillation else 1.0 if c.allreduce.inter_node_bytes else None
            speedup = c.speedup if p is c.codistillation else 1.0
            rows.append((str(p.gpus), str(p.nodes), p.variant, f"{p.n_models} x {p.group_size}",
                         f"{p.step_s * 1e3:.2f}", f"{p.allreduce_s * 1e3:.2f}", f"{p.exchange_s * 1e3:.3f}",
                         f"{p.inter_node_bytes / 1e6:.2f}", f"{p.intra_node_bytes / 1e6:.2f}",
                         f"{speedup:.2f}x", "-" if ratio is None else f"{ratio:.4g}"))
    return rows


def header(inputs: Inputs) -> list[str]:
    w, c = inputs.workload, inputs.cluster
    what = {"predictions": f"predictions ({w.exchange_payload():,} bytes per rank per exchange)",
            "weights": f"weights ({w.exchange_payload():,} bytes per model per refresh, 1/G from each rank; "
                       f"compute x {w.teacher_factor():.3g} for {w.n_models - 1} teacher forward(s))",
            "none": "no exchange"}[w.mode]
    return [
        f"model: {inputs.model}, {w.params:,} trainable parameters (gradients {w.gradient_bytes / 1e6:.2f} MB), "
        f"batch {w.batch} per GPU, {w.classes} classes",
        f"cluster: {c.gpus_per_node} GPUs per node; intra-node {c.intra_gbps:g} Gbit/s per GPU, "
        f"{c.intra_latency_us:g} us; inter-node {c.inter_gbps:g} Gbit/s per node, {c.inter_latency_us:g} us; "
        f"{w.algorithm} all-reduce",
        f"compute: {w.compute_s * 1e3:.3g} ms per step per GPU ({inputs.compute_note})",
        f"codistillation: {f'G = {inputs.gpus_per_model} GPUs per model (M = W / G)' if inputs.gpus_per_model else f'{w.n_models} models'}, "
        f"{what}, every {w.every} step(s)",
        "model of time and bytes: python -m hvcodistill.plan --help",
    ]


def render_text(inputs: Inputs, comparisons: Sequence[Comparison]) -> str:
    rows = [COLUMNS, *table_rows(comparisons)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(width) if i not in (2,) else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([*header(inputs), "", *lines])


def render_markdown(inputs: Inputs, comparisons: Sequence[Comparison]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(comparisons)]
    return "\n".join([*(f"- {line}" for line in header(inputs)[:-1]), "", *lines])


def render_json(inputs: Inputs, comparisons: Sequence[Comparison]) -> str:
    return json.dumps({"model": inputs.model, "compute_note": inputs.compute_note,
                       "workload": asdict(inputs.workload),
                       "cluster": {k: v for k, v in asdict(inputs.cluster).items() if k != "gpus"},
                       "rows": [asdict(c) for c in comparisons]}, indent=1)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line and exit 2, like every hvcodistill command
        raise ConfigError(message)


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML experiment: model, batch, data, M, k and mode (flags override it)")
    p.add_argument("--gpus", type=int, help="W, GPUs (= ranks) in the job")
    p.add_argument("--gpus-list", help="W1,W2,...: one row pair per world size")
    p.add_argument("--gpus-per-node", type=int, default=8, help="L (default 8)")
    p.add_argument("--models", type=int, help="M (default 2, or the config's)")
    p.add_argument("--gpus-per-model", type=int,
                   help="G: fix each model's GPUs instead of M (M = W / G for every world size)")
    p.add_argument("--model", help="model.name from the registry (mlp, cnn, resnet18_cifar, resnet50, ...)")
    p.add_argument("--params", type=int, help="trainable parameters, instead of --model (wins over it)")
    p.add_argument("--hidden", help="the MLP's hidden sizes, e.g. 128,64")
    p.add_argument("--input-shape", help="per-sample shape, e.g. 3,224,224")
    p.add_argument("--data", choices=(*DATA_SHAPES, "synthetic"), help="a data set with known shape and classes")
    p.add_argument("--classes", type=int, help="C")
    p.add_argument("--batch", type=int, help="B per GPU (default 32, or the config's)")
    p.add_argument("--every", type=int, help="k: exchange every k steps (default 1, or the config's)")
    p.add_argument("--mode", choices=MODES[:2], help="what peers exchange (default predictions, or the config's)")
    p.add_argument("--intra-gbps", type=float, default=Cluster.intra_gbps, help="per GPU (default %(default)g)")
    p.add_argument("--inter-gbps", type=float, default=Cluster.inter_gbps,
                   help="per node, all its NICs, each direction (default %(default)g)")
    p.add_argument("--intra-latency-us", type=float, default=Cluster.intra_latency_us, help="alpha (default %(default)g)")
    p.add_argument("--inter-latency-us", type=float, default=Cluster.inter_latency_us, help="alpha (default %(default)g)")
    compute = p.add_mutually_exclusive_group()
    compute.add_argument("--compute-ms", type=float, help="forward+backward+optimizer per step per GPU")
    compute.add_argument("--compute-from", metavar="RUN_DIR/summary.json",
                         help="timing.compute_s / steps of a measured run")
    p.add_argument("--compute-includes-teachers", action="store_true",
                   help="--compute-ms was measured in weights mode with these M (teacher forwards included)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="ring", help="the gradient all-reduce (default ring)")
    p.add_argument("--payload-bytes", type=int, default=4, help="bytes per exchanged logit (default 4)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--markdown", action="store_true", help="the table as markdown")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        inputs = resolve(args)
        comparisons = [compare(replace(inputs.cluster, gpus=w), inputs.workload_for(w)) for w in inputs.gpus]
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    render = render_json if args.json else render_markdown if args.markdown else render_text
    print(render(inputs, comparisons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
