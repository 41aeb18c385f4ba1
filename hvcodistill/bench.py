"""When does codistillation pay? Step time and bytes by link of all-reduce and codistillation,
at the same ranks, on this machine or on an emulated cluster at several link rates.

    make bench                                   (= python -m hvcodistill.bench: 4 ranks, one host)
    python -m hvcodistill.bench --cluster        (root: 2 emulated nodes x 2 ranks, 4 link rates)
    python -m hvcodistill.bench --cluster --nodes 4 --rates 100mbit,1gbit --plot bench.png \\
        --json bench.json

Variants, all on the same W ranks with the same per-rank batch and updates
(configs/bench_mlp_synthetic.yaml: an MLP with 4.2 M parameters, 16.8 MB of gradients, so that
the network matters):
  all-reduce (M = 1)           one model on all W ranks: the run a user would otherwise do
  predictions k=1, k=10        M = 2 models of W/2 ranks exchanging logits every k steps
  weights k=50                 M = 2, stale weight copies refreshed every 50 steps
  alpha=0                      M = 2 independent models: nothing crosses between models
For each: step time of the training loop (set-up and the final evaluation excluded), samples per
second (all ranks), and bytes per step inside nodes and between nodes (summary.json's
bytes_per_step.total). With --cluster each variant runs on the emulated cluster
(hvcodistill/cluster) at each link rate, and the planner's prediction (hvcodistill/planning.py)
stands beside each measurement; the planner takes its compute time per step and its intra-node
rate from the alpha=0 run at the first rate (which moves nothing between nodes), so every
figure it predicts at the other rates and for the other variants is a prediction.
The variants take turns (--repeat rounds of all of them), so a machine whose speed drifts slows
them alike; on one host the all-reduce run's speed over the plain Horovod loop's is the median of
the rounds' pairwise ratios, with their range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hvcodistill import planning
from hvcodistill.cluster import EmulatedCluster, cluster_unavailable, parse_rate
from hvcodistill.config import load_config
from hvcodistill.errors import EXIT_BAD_INPUT, ConfigError
from hvcodistill.mpirun import mpirun_command
from hvcodistill.resources import config_path

DEFAULT_CONFIG = config_path("bench_mlp_synthetic")
DEFAULT_RATES = "100mbit,1gbit,10gbit,none"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    mode: str  # the planner's mode: none | predictions | weights (all-reduce: n_models 1)
    module: str = "hvcodistill.train"


VARIANTS = (
    Variant("all-reduce (M=1)", ("codistill.n_models=1",), "none"),
    Variant("predictions k=1", ("codistill.mode=predictions", "codistill.every=1"), "predictions"),
    Variant(
        "predictions k=10", ("codistill.mode=predictions", "codistill.every=10"), "predictions"
    ),
    Variant("weights k=50", ("codistill.mode=weights", "codistill.every=50"), "weights"),
    Variant("alpha=0", ("codistill.alpha=0",), "none"),
)
CALIBRATION = "alpha=0"  # the run whose compute time and intra-node all-reduce feed the planner
# One host only: the plain Horovod loop a user would write (hvcodistill/reference.py), the yardstick
# for the all-reduce run: M = 1 must cost what it costs.
REFERENCE = Variant(
    "plain Horovod loop", ("codistill.n_models=1",), "none", module="hvcodistill.reference"
)
# --backends horovod,torch: the torch data plane beside Horovod, and (one host) its yardstick
TORCH = "train.backend=torch"
TORCH_VARIANTS = (
    Variant("all-reduce, torch", ("codistill.n_models=1", TORCH), "none"),
    Variant(
        "plain DDP loop", ("codistill.n_models=1", TORCH), "none", module="hvcodistill.reference"
    ),
    Variant(
        "predictions k=10, torch",
        ("codistill.mode=predictions", "codistill.every=10", TORCH),
        "predictions",
    ),
    Variant(
        "weights k=50, torch", ("codistill.mode=weights", "codistill.every=50", TORCH), "weights"
    ),
)
# with --cluster: the torch runs of the training variants (the plain loops are one host's)
TORCH_CLUSTER_VARIANTS = tuple(v for v in TORCH_VARIANTS if v.module == "hvcodistill.train")
BACKEND_NAMES = ("horovod", "torch")


def run_variant(
    launch,
    np: int,
    config: str,
    overrides: list[str],
    run_dir: Path,
    module: str = "hvcodistill.train",
) -> dict:
    """One training run under `launch(np, command) -> (argv, env)`; its summary.json."""
    cmd, env = launch(
        np,
        [
            sys.executable,
            "-m",
            module,
            "--config",
            config,
            *overrides,
            f"run.dir={run_dir}",
            "train.progress=false",
            "train.eval_every=0",
            "codistill.burn_in_steps=0",
            "run.checkpoint_every=0",
        ],
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("hvcodistill")]
        raise SystemExit(
            f"bench: run with {' '.join(overrides)} exited {proc.returncode}: "
            f"{lines[-1] if lines else proc.stderr[-2000:]}"
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["batch_size_per_rank"] = load_config(config, overrides).train.batch_size
    return summary


def measure(
    launch,
    np: int,
    config: str,
    common: list[str],
    repeat: int,
    tmp: Path,
    label: str,
    log=print,
    variants=VARIANTS,
) -> dict:
    """{variant name: the median run's summary (by step time) of `repeat` runs}.

    The variants take turns, round after round (A B C, A B C, ...), so a drift in the machine's
    speed during the benchmark touches every variant alike; each summary also keeps every round's
    step time (`round_step_s`, in round order), so that two variants compare pair by pair."""
    runs = {v.name: [] for v in variants}
    for r in range(repeat):
        for i, v in enumerate(variants):
            t0 = time.perf_counter()
            s = run_variant(
                launch, np, config, [*common, *v.overrides], tmp / f"{label}-{i}-{r}", v.module
            )
            runs[v.name].append(s)
            log(
                f"bench: {label} {v.name}: {s['timing']['step_s'] * 1e3:.1f} ms/step "
                f"(round {r + 1}/{repeat}, {time.perf_counter() - t0:.0f}s)"
            )
    return {
        name: {
            **sorted(rs, key=lambda s: s["timing"]["step_s"])[len(rs) // 2],
            "round_step_s": [s["timing"]["step_s"] for s in rs],
            "round_cpu_step_s": [s["timing"].get("cpu_step_s") for s in rs],
        }
        for name, rs in runs.items()
    }


# ----------------------------------------------------------------------------- the planner
def planner_inputs(config: str, common: list[str], calibration: dict) -> dict:
    """What the planner needs that a run measures or the config says: the model's size, the batch,
    the classes, the compute time per step and the intra-node rate (both from `calibration`)."""
    cfg = load_config(config, common)
    d = cfg.data
    if d.name != "synthetic":
        raise ConfigError(
            "bench --cluster predicts with the planner for data.name=synthetic configs only"
        )
    size = planning.model_size(
        cfg.model.name,
        input_shape=d.synthetic_shape,
        num_classes=d.synthetic_classes,
        hidden=cfg.model.hidden,
    )
    steps = calibration["steps"]
    g = calibration["topology"]["group_size"]
    tm = calibration["timing"]
    allreduce_per_step = tm["allreduce_s"] / steps
    # ring inside one node: 2 (G-1) transfers of S/G; solved for the rate that took this long
    moved = 2 * (g - 1) * 4 * size.params / g
    intra_gbps = moved / max(allreduce_per_step, 1e-9) / planning.BYTES_PER_GBIT if g > 1 else 1e3
    return {
        "size": size,
        "batch": cfg.train.batch_size,
        "classes": d.synthetic_classes,
        # everything but communication (compute, data loading, bookkeeping): what the planner
        # adds to
        "compute_s": (tm["loop_s"] - tm["allreduce_s"] - tm["exchange_s"]) / steps,
        "intra_gbps": intra_gbps,
    }


def predict(inputs: dict, summary: dict, variant: Variant, rate_bits: int | None, slots: int):
    """The planner's Prediction (step time and its parts) for this measured run, or None on an
    unshaped link (no rate)."""
    if rate_bits is None:
        return None
    t = summary["topology"]
    cluster = planning.Cluster(
        gpus=t["world_size"],
        gpus_per_node=slots,
        intra_gbps=inputs["intra_gbps"],
        inter_gbps=rate_bits / 1e9,
        intra_latency_us=5.0,
        inter_latency_us=50.0,
    )
    workload = planning.Workload(
        params=inputs["size"].params,
        batch=inputs["batch"],
        classes=inputs["classes"],
        n_models=t["n_models"],
        mode=variant.mode if t["n_models"] > 1 else planning.NO_EXCHANGE,
        every=summary["every"],
        compute_s=inputs["compute_s"],
        state_bytes=inputs["size"].state_bytes,
    )
    return planning.predict(cluster, workload)


# ----------------------------------------------------------------------------- output
def rows_for(measured: dict, rate: str, predictions: dict | None = None) -> list[dict]:
    rows = []
    for v in (v for v in (*VARIANTS, REFERENCE, *TORCH_VARIANTS) if v.name in measured):
        s = measured[v.name]
        t = s["topology"]
        per = s.get("bytes_per_step", {}).get(
            "total", {"intra_node": 0, "inter_node": 0}
        )  # reference: not counted
        step = s["timing"]["step_s"]
        batch = s.get("batch_size_per_rank")
        rows.append(
            {
                "rate": rate,
                "variant": v.name,
                "step_ms": step * 1e3,
                "samples_per_s": t["world_size"] * batch / step if batch else None,
                "intra_node_MB_per_step": per["intra_node"] / 1e6,
                "inter_node_MB_per_step": per["inter_node"] / 1e6,
                "predicted_step_ms": (predictions or {}).get(v.name),
                "round_step_ms": [x * 1e3 for x in s.get("round_step_s", [step])],
                "round_cpu_step_ms": [
                    x * 1e3 for x in s.get("round_cpu_step_s", []) if x is not None
                ],
                "nodes": s.get("nodes", {}).get("count", 1),
                "world_size": t["world_size"],
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    head = (
        f"{'link':<9}{'variant':<24}{'step ms':>9}{'planner ms':>11}{'error':>7}{'samples/s':>11}"
        f"{'intra MB/step':>15}{'inter MB/step':>15}"
    )
    lines = [head]
    for r in rows:
        pred = r["predicted_step_ms"]
        err = f"{(pred - r['step_ms']) / r['step_ms'] * 100:+.0f}%" if pred else "-"
        sps = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "-"
        lines.append(
            f"{r['rate']:<9}{r['variant']:<24}{r['step_ms']:>9.1f}"
            f"{(f'{pred:.1f}' if pred else '-'):>11}{err:>7}{sps:>11}"
            f"{r['intra_node_MB_per_step']:>15.3f}{r['inter_node_MB_per_step']:>15.3f}"
        )
    return "\n".join(lines)


def crossovers(rows: list[dict], rates: list[str]) -> list[str]:
    """For each codistillation variant: at which measured rates it beats all-reduce."""
    by = {(r["rate"], r["variant"]): r["step_ms"] for r in rows}
    out = []
    for rate in rates:
        if (rate, REFERENCE.name) in by:
            out.append(
                f"all-reduce (M=1) / plain Horovod loop: {reference_ratio(rows, rate)} "
                "the reference's speed (1.00 = no overhead); CPU time per step, plain loop's / "
                f"all-reduce's: {reference_cpu_ratio(rows, rate)}"
            )
        if (rate, TORCH_VARIANTS[1].name) in by:
            steps = {r["variant"]: r["round_step_ms"] for r in rows if r["rate"] == rate}
            m1, ddp, k10, w50 = (v.name for v in TORCH_VARIANTS)
            out.append(
                f"all-reduce, torch / plain DDP loop: {_paired(steps[ddp], steps[m1])} "
                "the reference's speed (1.00 = no overhead)"
            )
            out.append(
                f"torch / Horovod, speed: M=1 {_paired(steps[VARIANTS[0].name], steps[m1])}; "
                f"predictions k=10 {_paired(steps[VARIANTS[2].name], steps[k10])}; "
                f"weights k=50 {_paired(steps[VARIANTS[3].name], steps[w50])}"
            )
        elif (rate, TORCH_VARIANTS[0].name) in by:  # --cluster: one run each, no yardstick
            out.append(
                "torch / Horovod, speed (Horovod's step time / torch's): "
                + "; ".join(
                    f"{h.name} {by[(rate, h.name)] / by[(rate, t.name)]:.3f}x"
                    for h, t in zip(
                        (VARIANTS[0], VARIANTS[2], VARIANTS[3]), TORCH_CLUSTER_VARIANTS, strict=True
                    )
                )
            )
    for v in VARIANTS[1:]:
        faster = [rate for rate in rates if by[(rate, v.name)] < by[(rate, VARIANTS[0].name)]]
        ratio = ", ".join(
            f"{rate} {by[(rate, VARIANTS[0].name)] / by[(rate, v.name)]:.2f}x" for rate in rates
        )
        out.append(
            f"{v.name:<19} faster than all-reduce at: {', '.join(faster) or 'no rate measured'}"
            f"  (all-reduce / this: {ratio})"
        )
    return out


def reference_ratio(rows: list[dict], rate: str) -> str:
    """The all-reduce run's speed over the plain Horovod loop's: round by round (the two ran one
    after the other in each round), the median of those ratios and their range; a single pair
    where there was one round."""
    by = {r["variant"]: r["round_step_ms"] for r in rows if r["rate"] == rate}
    return _paired(by[REFERENCE.name], by[VARIANTS[0].name])


def reference_cpu_ratio(rows: list[dict], rate: str) -> str:
    """The same pairing for CPU time per step (process time, all threads), which a loaded
    machine inflates less than wall time: the plain loop's over the all-reduce run's."""
    by = {r["variant"]: r.get("round_cpu_step_ms") for r in rows if r["rate"] == rate}
    if not by.get(REFERENCE.name) or not by.get(VARIANTS[0].name):
        return "-"
    return _paired(by[REFERENCE.name], by[VARIANTS[0].name])


def _paired(plain: list, ours: list) -> str:
    ratios = sorted(p / o for p, o in zip(plain, ours, strict=True))
    if len(ratios) == 1:
        return f"{ratios[0]:.3f}x"
    return (
        f"{statistics.median(ratios):.3f}x (median of {len(ratios)} rounds paired, "
        f"{ratios[0]:.3f}-{ratios[-1]:.3f})"
    )


def plot(rows: list[dict], rates: list[str], path: Path, title: str) -> None:
    """Step time against link rate, one line per variant; the planner's predictions dashed."""
    # matplotlib only when a plot is asked for
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = list(range(len(rates)))
    for i, v in enumerate(VARIANTS):
        color = f"C{i}"
        measured = [
            next(r["step_ms"] for r in rows if r["rate"] == rate and r["variant"] == v.name)
            for rate in rates
        ]
        ax.plot(xs, measured, "o-", color=color, label=v.name)
        pred = [
            (x, r["predicted_step_ms"])
            for x, rate in zip(xs, rates)
            for r in rows
            if r["rate"] == rate and r["variant"] == v.name and r["predicted_step_ms"]
        ]
        if pred:
            ax.plot(*zip(*pred), "x--", color=color, alpha=0.6)
    ax.set_xticks(
        xs,
        [("unshaped" if r in ("none", "unshaped") else r.replace("bit", "bit/s")) for r in rates],
    )
    ax.set_yscale("log")
    ax.set_xlabel("link rate between nodes (each direction)")
    ax.set_ylabel("step time, ms (log)")
    ax.set_title(title, fontsize=10)
    ax.plot([], [], "kx--", alpha=0.6, label="planner's prediction")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m hvcodistill.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-np", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--steps", type=int, default=100, help="updates per run (default 100)")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds: runs per variant, the variants taking turns in each round; the median "
        "is shown (default 3 on one host, 1 with --cluster)",
    )
    p.add_argument(
        "--backends",
        default="horovod",
        help="data planes (train.backend), comma-separated: horovod (default), or horovod,torch "
        "to add M = 1, predictions k=10 and weights k=50 on torch.distributed, and on one host "
        "the plain DDP loop",
    )
    p.add_argument("--cluster", action="store_true", help="run on an emulated cluster (root)")
    p.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="emulated nodes (default 2); ranks per node = np / nodes",
    )
    p.add_argument(
        "--rates", help=f"--cluster: link rates, comma-separated (default {DEFAULT_RATES})"
    )
    p.add_argument("--plot", help="write the step-time plot (PNG) here (--cluster)")
    p.add_argument("--json", help="write every row as JSON here")
    p.add_argument(
        "overrides", nargs="*", metavar="dotted.key=value", help="applied to every variant"
    )
    args = p.parse_args(argv)
    if args.np < 2 or args.np % 2:
        p.error("-np must be an even number >= 2 (codistillation runs 2 models on the same ranks)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.cluster and (args.nodes < 2 or args.np % args.nodes):
        p.error(f"--nodes must be >= 2 and divide -np={args.np}")
    args.backends = [b.strip() for b in args.backends.split(",")]
    if "horovod" not in args.backends or any(b not in BACKEND_NAMES for b in args.backends):
        p.error(f"--backends: horovod, or horovod,torch (got {','.join(args.backends)})")
    return args  # --config is read by main(): a missing or bad file is one line there, exit 2


def main(argv=None) -> int:
    args = parse_args(argv)
    common = [f"train.steps={args.steps}", "train.epochs=0", *args.overrides]
    try:
        if args.rates is not None and not args.cluster:
            raise ConfigError("--rates needs --cluster (they shape the emulated cluster's links)")
        load_config(args.config, common)  # bad overrides: one line now, not after 4 ranks start
        if args.cluster:
            rows, rates, title = bench_cluster(args, common)
        else:
            rows, rates, title = bench_local(args, common)
    except ConfigError as e:
        print(f"hvcodistill.bench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"\n{title}")
    print(render(rows))
    print()
    print("\n".join(crossovers(rows, rates)))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"title": title, "rates": rates, "rows": rows}, indent=1) + "\n"
        )
    if args.plot and args.cluster:
        plot(rows, rates, Path(args.plot), title)
        print(f"plot: {args.plot}")
    return 0


def bench_local(args, common):
    repeat = args.repeat or 3
    with tempfile.TemporaryDirectory(prefix="hvcodistill-bench-") as tmp:
        measured = measure(
            mpirun_command,
            args.np,
            args.config,
            common,
            repeat,
            Path(tmp),
            "local",
            log=lambda m: print(m, file=sys.stderr, flush=True),
            variants=(
                VARIANTS[0],
                REFERENCE,
                *VARIANTS[1:],
                *(TORCH_VARIANTS if "torch" in args.backends else ()),
            ),
        )  # each pair back to back
    title = (
        f"one host, {args.np} ranks; {Path(args.config).name}, {args.steps} steps; "
        f"median of {repeat} run(s)"
    )
    return rows_for(measured, "local"), ["local"], title


def parse_rates(text: str) -> dict:
    """{rate as typed: bits per second, None unshaped}; a bad rate fails naming --rates."""
    rates = [r.strip() for r in text.split(",") if r.strip()]
    if not rates:
        raise ConfigError(f"--rates: no rate in {text!r}")
    try:
        return {r: parse_rate(r) for r in rates}
    except ConfigError as e:
        raise ConfigError(f"--rates: {e}") from None


def bench_cluster(args, common):
    bits = parse_rates(args.rates or DEFAULT_RATES)  # bad rates fail here, before any run
    rates = list(bits)
    reason = cluster_unavailable()
    if reason:
        raise ConfigError(f"--cluster: {reason}")
    repeat, slots = args.repeat or 1, args.np // args.nodes
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="hvcodistill-bench-") as tmp,
        EmulatedCluster(args.nodes, name="bench") as cluster,
    ):
        launch = lambda np, command: cluster.mpirun_command(np, command, slots=slots)  # noqa: E731
        inputs = None
        for rate in rates:
            cluster.shape(None if bits[rate] is None else rate)
            measured = measure(
                launch,
                args.np,
                args.config,
                common,
                repeat,
                Path(tmp),
                rate,
                log=lambda m: print(m, file=sys.stderr, flush=True),
                variants=(
                    *VARIANTS,
                    *(TORCH_CLUSTER_VARIANTS if "torch" in args.backends else ()),
                ),
            )
            if inputs is None:
                inputs = planner_inputs(args.config, common, measured[CALIBRATION])
            predictions = {
                v.name: (lambda p: p.step_s * 1e3 if p is not None else None)(
                    predict(inputs, measured[v.name], v, bits[rate], slots)
                )
                for v in VARIANTS
            }
            rows += rows_for(measured, rate, predictions)
    title = (
        f"emulated cluster: {args.nodes} nodes x {slots} ranks, {Path(args.config).name}, "
        f"{args.steps} steps, median of {repeat} run(s)"
    )
    return rows, rates, title


if __name__ == "__main__":
    sys.exit(main())
