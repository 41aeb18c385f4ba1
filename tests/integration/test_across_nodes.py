"""Across nodes, counted: the trainer on an emulated 2-node cluster (root only), one cluster for
the module, re-shaped by each test. Nothing here reads a clock: bytes, counts and the planner's
model on the run's own inputs. The wall-clock ratios (step times of all-reduce against
codistillation, and against the planner's predicted times) are the benchmark's printed output:
`python -m hvcodistill.bench --cluster`.

- summary.json knows the nodes from MPI, and its bytes by link match the kernel's byte counters on
  the nodes' links: the difference of a 10-step and a 30-step run, so set-up and the final
  evaluation cancel out. Tolerance 5%: what the kernel adds is TCP/IP and Ethernet headers (about 1%
  at MTU 9000, ACKs included) and the small messages the byte model leaves out (the per-step
  preemption flag, Horovod's coordination, metrics), a few hundred bytes per step. The links are
  unshaped there: a shaper's drops would add TCP's retransmissions to the kernel's count.
- the planner (hvcodistill/planning.py, as the benchmark calls it), given the run's own model,
  batch, classes and layout, predicts the bytes per step by collective and link that the run
  counted.
- weights mode's refresh: one copy of each model crosses between the nodes per refresh (a shard of
  1/G from each rank), counted and on the kernel's counters.
- on a 100 Mbit/s link, the benchmark's layout and variants: the shaper paces every run (its tbf
  holds packets back), the planner puts the all-reduce of M = 1 and the prediction exchange on the
  inter-node link, and the all-reduce moves several times the exchange's bytes between nodes, the
  ratio the planner predicts.
"""

import json
import subprocess
import sys

import pytest

from hvcodistill import bench
from tests.helpers import ROOT, needs_cluster
from tests.integration.test_cluster import held_back

pytestmark = [pytest.mark.mpi, needs_cluster]

BENCH = str(ROOT / "configs" / "bench_mlp_synthetic.yaml")
TOLERANCE = 0.05
VARIANTS = {v.name: v for v in bench.VARIANTS}
ALLREDUCE, PREDICTIONS = "all-reduce (M=1)", "predictions k=1"


def train(cluster, run_dir, *overrides):
    cmd, env = cluster.mpirun_command(
        4,
        [
            sys.executable,
            "-m",
            "hvcodistill.train",
            "--config",
            BENCH,
            f"run.dir={run_dir}",
            "train.progress=false",
            *overrides,
        ],
        slots=2,
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def sent(cluster) -> int:
    return sum(c["tx_bytes"] for c in cluster.counters().values())


def inter_node(summary) -> int:
    return sum(links["inter_node"] for links in summary["bytes"].values())


def planned(summary, overrides, variant_name, rate_bits=10**9):
    """The planner's Prediction for this run, from the run's own inputs (model size, batch and
    classes from its config, layout and k from its summary). Its bytes do not depend on the rate."""
    inputs = bench.planner_inputs(BENCH, list(overrides), summary)
    return bench.predict(inputs, summary, VARIANTS[variant_name], rate_bits, slots=2)


def assert_planned_bytes(summary, plan):
    per_step = summary["bytes_per_step"]
    for link in ("intra_node", "inter_node"):
        assert per_step["allreduce"][link] == pytest.approx(plan.allreduce_bytes[link], rel=1e-9)
        assert per_step["exchange"][link] == pytest.approx(plan.exchange_bytes[link], rel=1e-9)


@pytest.mark.parametrize(
    "variant,extra,collective",
    [
        (ALLREDUCE, [], "allreduce"),  # the ring crosses both links
        (PREDICTIONS, ["data.synthetic_classes=1000"], "exchange"),  # 128 KB of logits
    ],
    ids=["allreduce", "exchange"],
)
def test_bytes_by_link_match_the_kernel_counters_and_the_planner(
    cluster, tmp_path, variant, extra, collective
):
    cluster.shape(None)
    overrides = [*VARIANTS[variant].overrides, *extra]
    kernel, model = {}, {}
    for steps in (10, 30):
        before = sent(cluster)
        s = train(cluster, tmp_path / f"s{steps}", f"train.steps={steps}", *overrides)
        kernel[steps], model[steps] = sent(cluster) - before, inter_node(s)
    assert s["nodes"]["count"] == 2 and s["nodes"]["hosts"] == ["node0", "node1"]
    assert s["nodes"]["node_of_rank"] == [0, 0, 1, 1]
    # the collective under test carries (nearly) all of training's inter-node bytes (the final
    # evaluation's allgather of 1000-class probabilities crosses too); with M = 2 no gradient
    # crosses
    per_step = s["bytes_per_step"]
    training = per_step["total"]["inter_node"] - per_step["evaluation"]["inter_node"]
    assert per_step[collective]["inter_node"] > 0.98 * training
    if collective == "exchange":
        assert per_step["allreduce"]["inter_node"] == 0 and per_step["allreduce"]["intra_node"] > 0
    assert_planned_bytes(s, planned(s, overrides, variant))
    k, m = kernel[30] - kernel[10], model[30] - model[10]
    print(f"{collective}: kernel {k} B, model {m} B over 20 steps: kernel/model {k / m:.4f}")
    assert abs(k / m - 1) < TOLERANCE, (k, m)


def test_planner_on_a_shaped_link(cluster, tmp_path):
    """At 100 Mbit/s on 2 nodes x 2 ranks (the benchmark's layout) with a 1 M-parameter MLP over
    1000 classes, one benchmark run of the all-reduce (M = 1) and one of the prediction exchange
    (k = 1), the planner fed from the k = 1 run as the benchmark feeds it from its alpha = 0 run
    (a group inside one node): the planner's bytes are the counted ones; the kernel moved at least
    them (plus set-up, headers and retransmissions); the shaper held packets back in both runs (the
    link's rate paced them); the planner puts the all-reduce of M = 1 and the exchange on the
    inter-node link and the k = 1 group's all-reduce inside the node; and the all-reduce moves
    several times the exchange's inter-node bytes per step (4 MB of gradients around the ring
    against 512 KB of predictions per rank), the ratio the planner predicts."""
    cluster.shape("100mbit")
    common = [
        "train.steps=6",
        "model.hidden=[512]",
        "data.synthetic_classes=1000",
        "train.batch_size=128",
    ]
    marks = []  # (kernel bytes sent, shaper hold-backs) before and after each run, in run order

    def launch(np, command):
        marks.append((sent(cluster), held_back(cluster)))
        return cluster.mpirun_command(np, command, slots=2)

    def log(line):
        marks.append((sent(cluster), held_back(cluster)))
        print(line)

    variants = [VARIANTS[ALLREDUCE], VARIANTS[PREDICTIONS]]
    runs = bench.measure(launch, 4, BENCH, common, 1, tmp_path, "100mbit", log, variants)
    inputs = bench.planner_inputs(BENCH, common, runs[PREDICTIONS])
    plan = {v.name: bench.predict(inputs, runs[v.name], v, 100_000_000, slots=2) for v in variants}
    for i, v in enumerate(variants):
        (sent_before, held_before), (sent_after, held_after) = marks[2 * i : 2 * i + 2]
        s = runs[v.name]
        print(
            f"{v.name}: kernel {sent_after - sent_before} B, counted {inter_node(s)} B between "
            f"nodes; the shaper held packets back {held_after - held_before} times"
        )
        assert s["nodes"]["count"] == 2 and s["steps"] == 6
        assert_planned_bytes(s, plan[v.name])
        assert sent_after - sent_before >= inter_node(s) > 0
        assert held_after > held_before, f"{v.name}: the 100 Mbit/s shaper never held a packet"
    assert plan[ALLREDUCE].allreduce_link == "inter_node"
    assert plan[PREDICTIONS].allreduce_link == "intra_node"
    assert plan[PREDICTIONS].exchange_link == "inter_node"
    reduce = runs[ALLREDUCE]["bytes_per_step"]["allreduce"]["inter_node"]
    exchange = runs[PREDICTIONS]["bytes_per_step"]["exchange"]["inter_node"]
    print(
        f"inter-node bytes per step: all-reduce {reduce:,.0f}, prediction exchange {exchange:,.0f}"
    )
    assert reduce / exchange == pytest.approx(
        plan[ALLREDUCE].allreduce_bytes["inter_node"]
        / plan[PREDICTIONS].exchange_bytes["inter_node"]
    )
    assert reduce > 2 * exchange, (reduce, exchange)


def test_one_copy_of_each_model_crosses_between_nodes_per_refresh(cluster, tmp_path):
    """2 nodes x 2 ranks, M = 2 models of G = 2, contiguous (model i on node i), so each peer pair
    spans the nodes. The bench MLP (16.8 MB) refreshed every 5 steps from step 5: 8 steps take 1
    refresh (at 5), 23 take 4 (5, 10, 15, 20). Between the two runs the kernel's eth0 tx bytes
    (both nodes) grow by 3 x M (M-1) x the weights' bytes, within 1%: the two runs' other traffic
    (start-up, Horovod's coordination, TCP acks, whose number follows timing) differs by a few
    hundred KB either way, while a copy per rank of the group would be 2.0 and a lost shard 0.5.
    summary.json's counted inter-node exchange bytes say the same, exactly."""
    from hvcodistill.models import build_model

    cluster.shape(None)
    m, refreshes = 2, {8: 1, 23: 4}
    weight_bytes = 4 * sum(
        p.numel()
        for p in build_model(
            "mlp", input_shape=(1, 32, 32), num_classes=10, hidden=[2048, 1024]
        ).parameters()
    )
    kernel, counted = {}, {}
    for steps in refreshes:
        before = sent(cluster)
        summary = train(
            cluster,
            tmp_path / f"steps{steps}",
            "codistill.mode=weights",
            "codistill.every=5",
            "codistill.burn_in_steps=5",
            "data.order=disjoint",
            f"train.steps={steps}",
            "run.checkpoint_every=0",
        )
        kernel[steps] = sent(cluster) - before
        assert summary["nodes"]["count"] == 2 and summary["exchanges"] == refreshes[steps]
        counted[steps] = summary["bytes"]["exchange"]["inter_node"]
    n = refreshes[23] - refreshes[8]
    model = n * m * (m - 1) * weight_bytes
    kernel_diff, counted_diff = kernel[23] - kernel[8], counted[23] - counted[8]
    print(
        f"{n} refreshes: kernel tx {kernel_diff:,} B, counted {counted_diff:,} B, "
        f"M(M-1) x weights {model:,} B; "
        f"kernel/model {kernel_diff / model:.4f}, counted/model {counted_diff / model:.6f}"
    )
    # a shard is 1/G of the model, padded by < G bytes
    assert counted_diff == pytest.approx(model, rel=1e-5)
    assert abs(kernel_diff / model - 1) < 0.01
