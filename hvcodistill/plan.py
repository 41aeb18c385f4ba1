"""The planner: per-step time and bytes by link of all-reduce vs codistillation, for a cluster
we cannot run.

    python -m hvcodistill.plan --config configs/imagenet_resnet50_codistill.yaml --gpus 16 \\
        --gpus-per-node 8 --inter-gbps 200 --compute-ms 20
    python -m hvcodistill.plan --model resnet50 --data imagenet --batch 32 --mode predictions \\
        --every 10 --gpus-list 16,32,64,128 --compute-from runs/x/summary.json [--json | --markdown]

It compares, on W GPUs, (a) all-reduce: one model on all W (M = 1, G = W) and (b)
codistillation: M models of G = W / M GPUs each, exchanging predictions or weights every k steps.
The model is hvcodistill/planning.py (below); this command resolves its inputs (flags over the
config over defaults) and prints the table. Bad input: one line `hvcodistill.plan: error: ...`
naming the flag, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from hvcodistill import planning
from hvcodistill.comm.modes import MODES
from hvcodistill.comm.traffic import ALGORITHMS
from hvcodistill.errors import EXIT_BAD_INPUT, ConfigError
from hvcodistill.planning import (
    Cluster,
    Comparison,
    ModelSize,
    Workload,
    compare,
    compute_from_summary,
    model_size,
)

PROG = "hvcodistill.plan"
# Per-sample input shape and classes of the data sets whose shape is fixed (npz: give flags).
DATA_SHAPES = {
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
}


# ----------------------------------------------------------------------------- inputs
def _read_summary(path: str) -> dict:
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    try:
        summary = json.loads(p.read_text())
        summary["timing"]["compute_s"], summary["steps"]  # noqa: B018 (both must be there)
    except OSError as e:
        raise ConfigError(f"--compute-from {p}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"--compute-from {p}: not a hvcodistill summary.json (needs timing.compute_s and steps)"
        ) from None
    return summary


def _ints(flag: str, text: str, *, by_x: bool = False) -> list[int]:
    """Positive integers separated by commas (or by `x` too, for a shape: 3x224x224); an empty
    item is refused, so a typo never drops a value silently."""
    items = str(text).replace("x", ",") if by_x else str(text)
    try:
        values = [int(v) for v in items.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: expected positive integers separated by commas, got {text!r}")
    return values


def _read_config(path: str):
    # config validation reads the registries, which import torch: only when --config is given
    from hvcodistill.config import load_config

    return load_config(path)


def _pick(flag_value, config_value):
    """An explicit flag wins over the config (or default), 0 included: validate() then names it."""
    return config_value if flag_value is None else flag_value


@dataclass(frozen=True)
class Inputs:
    """What the command line resolved to: the workload (its compute without teachers), the world
    sizes, the cluster's other numbers, and words for the header."""

    workload: Workload
    gpus: tuple[int, ...]
    cluster: Cluster  # gpus = the first of `gpus`
    model: str
    compute_note: str
    gpus_per_model: Optional[int] = None  # G fixed (M = W / G per world size) instead of M fixed

    def workload_for(self, gpus: int) -> Workload:
        """The workload at world size `gpus`: M from --models, or W / G with --gpus-per-model."""
        if self.gpus_per_model:
            return replace(self.workload, n_models=max(1, gpus // self.gpus_per_model))
        return self.workload


def _model_size(args, model, shape, classes, hidden) -> tuple[ModelSize, str]:
    """The model's parameters and state bytes: given (--params) or counted from the registry."""
    if args.params is not None:
        return ModelSize(args.params, 4 * args.params), model or "model"
    if model is None:
        raise ConfigError("missing model: give --model NAME, --params N or --config FILE")
    # the registry imports torch: only when a model is counted
    from hvcodistill.models import MODEL_NAMES

    if model not in MODEL_NAMES:
        raise ConfigError(f"--model {model!r} is not in the registry: {', '.join(MODEL_NAMES)}")
    if shape is None and model != "mlp":
        shape = (3, 224, 224)  # convolutional models here pool adaptively: only channels count
    if shape is None:
        raise ConfigError(
            "--input-shape is needed for --model mlp (or --data / --config with a known data set)"
        )
    return model_size(model, input_shape=shape, num_classes=classes, hidden=hidden), model


def _compute(args, workload: Workload) -> tuple[float, str]:
    """Seconds of compute per step without teacher forwards, and how they were found."""
    if args.compute_from:
        return compute_from_summary(_read_summary(args.compute_from))
    if args.compute_ms is None:
        return 0.0, "not given (--compute-ms or --compute-from): times are communication only"
    factor = workload.teacher_factor()
    if args.compute_includes_teachers and factor != 1.0:
        note = f"given {args.compute_ms:.3g} ms with teachers / {factor:.3g}"
        return args.compute_ms / 1e3 / factor, note
    return args.compute_ms / 1e3, "given"


def resolve(args: argparse.Namespace) -> Inputs:
    """Flags over config over defaults -> Inputs; every failure names its flag."""
    cfg = _read_config(args.config) if args.config else None
    data = args.data or (cfg.data.name if cfg else None)
    model = args.model or (cfg.model.name if cfg else None)
    if args.hidden:
        hidden = _ints("--hidden", args.hidden, by_x=True)
    else:
        hidden = cfg.model.hidden if cfg else [128]
    shape, classes = DATA_SHAPES.get(data, (None, None))
    if data == "synthetic":
        if cfg:
            shape, classes = tuple(cfg.data.synthetic_shape), cfg.data.synthetic_classes
        else:
            shape, classes = (3, 32, 32), 10
    if args.input_shape:
        shape = tuple(_ints("--input-shape", args.input_shape, by_x=True))
    classes = args.classes if args.classes is not None else classes
    if classes is None:
        raise ConfigError(
            "missing classes: give --classes (or --data / --config with a known data set)"
        )
    size, model = _model_size(args, model, shape, classes, hidden)
    if args.gpus_list:
        gpus = tuple(_ints("--gpus-list", args.gpus_list))
    elif args.gpus is not None:
        gpus = (args.gpus,)
    else:
        raise ConfigError("missing world size: give --gpus W or --gpus-list W1,W2,...")
    c = cfg.codistill if cfg else None
    workload = Workload(
        params=size.params,
        state_bytes=size.state_bytes,
        classes=classes,
        batch=_pick(args.batch, cfg.train.batch_size if cfg else 32),
        n_models=_pick(args.models, c.n_models if c else 2),
        mode=_pick(args.mode, c.mode if c else "predictions"),
        every=_pick(args.every, c.every if c else 1),
        payload_bytes=args.payload_bytes,
        algorithm=args.algorithm,
    )
    compute_s, note = _compute(args, workload)
    cluster = Cluster(
        gpus[0],
        args.gpus_per_node,
        args.intra_gbps,
        args.inter_gbps,
        args.intra_latency_us,
        args.inter_latency_us,
    )
    workload = replace(workload, compute_s=compute_s)
    if args.gpus_per_model is not None:
        if args.models is not None:
            raise ConfigError("give --models M or --gpus-per-model G, not both")
        bad = [w for w in gpus if args.gpus_per_model < 1 or w % args.gpus_per_model]
        if bad:
            raise ConfigError(
                f"--gpus-per-model {args.gpus_per_model} must divide every world size "
                f"(not {bad[0]})"
            )
    inputs = Inputs(workload, gpus, cluster, model, note, args.gpus_per_model)
    for w in gpus:  # every world size is checked before anything is printed
        planning.validate(replace(cluster, gpus=w), inputs.workload_for(w))
    return inputs


# ----------------------------------------------------------------------------- output
COLUMNS = (
    "GPUs",
    "nodes",
    "variant",
    "M x G",
    "step ms",
    "all-reduce ms",
    "exchange ms",
    "inter-node MB/step",
    "intra-node MB/step",
    "speed-up",
    "inter-node bytes vs all-reduce",
)


def table_rows(comparisons: Sequence[Comparison]) -> list[tuple[str, ...]]:
    rows = []
    for c in comparisons:
        one_model = c.codistillation.n_models == 1
        variants = (c.allreduce,) if one_model else (c.allreduce, c.codistillation)
        for p in variants:
            if p is c.codistillation:
                ratio, speedup = c.inter_node_ratio, c.speedup
            else:
                ratio, speedup = (1.0 if c.allreduce.inter_node_bytes else None), 1.0
            rows.append(
                (
                    str(p.gpus),
                    str(p.nodes),
                    p.variant,
                    f"{p.n_models} x {p.group_size}",
                    f"{p.step_s * 1e3:.2f}",
                    f"{p.allreduce_s * 1e3:.2f}",
                    f"{p.exchange_s * 1e3:.3f}",
                    f"{p.inter_node_bytes / 1e6:.2f}",
                    f"{p.intra_node_bytes / 1e6:.2f}",
                    f"{speedup:.2f}x",
                    "-" if ratio is None else f"{ratio:.4g}",
                )
            )
    return rows


def exchange_words(w: Workload) -> str:
    """What the peers exchange, in the header's words."""
    mode = w.exchange_mode
    if mode is None:
        return "no exchange"
    if mode.group_bytes(1, 2):  # the group reassembles the exchange from its ranks' shards
        what = f"{w.exchange_payload():,} bytes per model per refresh, 1/G from each rank"
    else:
        what = f"{w.exchange_payload():,} bytes per rank per exchange"
    if mode.teacher_forwards:
        what += f"; compute x {w.teacher_factor():.3g} for {w.n_models - 1} teacher forward(s)"
    return f"{mode.name} ({what})"


def header(inputs: Inputs) -> list[str]:
    w, c = inputs.workload, inputs.cluster
    if inputs.gpus_per_model:
        models = f"G = {inputs.gpus_per_model} GPUs per model (M = W / G)"
    else:
        models = f"{w.n_models} models"
    return [
        f"model: {inputs.model}, {w.params:,} trainable parameters "
        f"(gradients {w.gradient_bytes / 1e6:.2f} MB), batch {w.batch} per GPU, "
        f"{w.classes} classes",
        f"cluster: {c.gpus_per_node} GPUs per node; intra-node {c.intra_gbps:g} Gbit/s per GPU, "
        f"{c.intra_latency_us:g} us; inter-node {c.inter_gbps:g} Gbit/s per node, "
        f"{c.inter_latency_us:g} us; {w.algorithm} all-reduce",
        f"compute: {w.compute_s * 1e3:.3g} ms per step per GPU ({inputs.compute_note})",
        f"codistillation: {models}, {exchange_words(w)}, every {w.every} step(s)",
        "model of time and bytes: python -m hvcodistill.plan --help",
    ]


def render_text(inputs: Inputs, comparisons: Sequence[Comparison]) -> str:
    rows = [COLUMNS, *table_rows(comparisons)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    return "\n".join([*header(inputs), "", *lines])


def render_markdown(inputs: Inputs, comparisons: Sequence[Comparison]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(comparisons)]
    return "\n".join([*(f"- {line}" for line in header(inputs)[:-1]), "", *lines])


def render_json(inputs: Inputs, comparisons: Sequence[Comparison]) -> str:
    cluster = {k: v for k, v in asdict(inputs.cluster).items() if k != "gpus"}
    return json.dumps(
        {
            "model": inputs.model,
            "compute_note": inputs.compute_note,
            "workload": asdict(inputs.workload),
            "cluster": cluster,
            "rows": [asdict(c) for c in comparisons],
        },
        indent=1,
    )


# ----------------------------------------------------------------------------- the command
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every hvcodistill command
        raise ConfigError(message)


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(
        prog=f"python -m {PROG}",
        description=f"{__doc__}\n{planning.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--config", help="YAML experiment: model, batch, data, M, k and mode (flags override it)")
    add("--gpus", type=int, help="W, GPUs (= ranks) in the job")
    add("--gpus-list", help="W1,W2,...: one row pair per world size")
    add("--gpus-per-node", type=int, default=8, help="L (default 8)")
    add("--models", type=int, help="M (default 2, or the config's)")
    add(
        "--gpus-per-model",
        type=int,
        help="G: fix each model's GPUs instead of M (M = W / G for every world size)",
    )
    add("--model", help="model.name from the registry (mlp, cnn, resnet18_cifar, resnet50, ...)")
    add("--params", type=int, help="trainable parameters, instead of --model (wins over it)")
    add("--hidden", help="the MLP's hidden sizes, e.g. 128,64")
    add("--input-shape", help="per-sample shape, e.g. 3,224,224")
    add(
        "--data",
        choices=(*DATA_SHAPES, "synthetic"),
        help="a data set with known shape and classes",
    )
    add("--classes", type=int, help="C")
    add("--batch", type=int, help="B per GPU (default 32, or the config's)")
    add("--every", type=int, help="k: exchange every k steps (default 1, or the config's)")
    add(
        "--mode",
        choices=tuple(MODES),
        help="what peers exchange (default predictions, or the config's)",
    )
    add(
        "--intra-gbps",
        type=float,
        default=Cluster.intra_gbps,
        help="per GPU (default %(default)g)",
    )
    add(
        "--inter-gbps",
        type=float,
        default=Cluster.inter_gbps,
        help="per node, all its NICs, each direction (default %(default)g)",
    )
    add(
        "--intra-latency-us",
        type=float,
        default=Cluster.intra_latency_us,
        help="alpha (default %(default)g)",
    )
    add(
        "--inter-latency-us",
        type=float,
        default=Cluster.inter_latency_us,
        help="alpha (default %(default)g)",
    )
    compute = p.add_mutually_exclusive_group()
    compute.add_argument(
        "--compute-ms", type=float, help="forward+backward+optimizer per step per GPU"
    )
    compute.add_argument(
        "--compute-from",
        metavar="RUN_DIR/summary.json",
        help="timing.compute_s / steps of a measured run",
    )
    add(
        "--compute-includes-teachers",
        action="store_true",
        help="--compute-ms was measured in weights mode with these M (teacher forwards included)",
    )
    add(
        "--algorithm",
        choices=ALGORITHMS,
        default="ring",
        help="the gradient all-reduce (default ring)",
    )
    add("--payload-bytes", type=int, default=4, help="bytes per exchanged logit (default 4)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--markdown", action="store_true", help="the table as markdown")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        inputs = resolve(args)
        comparisons = [
            compare(replace(inputs.cluster, gpus=w), inputs.workload_for(w)) for w in inputs.gpus
        ]
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    render = render_json if args.json else render_markdown if args.markdown else render_text
    print(render(inputs, comparisons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
