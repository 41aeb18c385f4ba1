"""Across nodes, measured: the trainer on an emulated 2-node cluster (root only).

- summary.json knows the nodes from MPI, and its bytes by link match the kernel's byte counters on
  the nodes' links: the difference of a 10-step and a 30-step run, so set-up and the final
  evaluation cancel out. Tolerance 5%: what the kernel adds is TCP/IP and Ethernet headers (about 1%
  at MTU 9000, ACKs included) and the small messages the byte model leaves out (the per-step
  preemption flag, Horovod's coordination, metrics), a few hundred bytes per step.
- the planner predicts a link-bound all-reduce's step time on a shaped link within 20%, and an
  exchange never beats its wire time (a small case; `python -m hvcodistill.bench --cluster`
  compares more rates and variants).
"""

import json
import subprocess
import sys

import pytest

from hvcodistill import bench
from tests.conftest import ROOT, needs_cluster

pytestmark = [pytest.mark.mpi, needs_cluster]

BENCH = str(ROOT / "configs" / "bench_mlp_synthetic.yaml")
TOLERANCE = 0.05


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


@pytest.mark.parametrize(
    "variant,collective",
    [
        (["codistill.n_models=1"], "allreduce"),  # the ring crosses both links
        (
            ["codistill.mode=predictions", "data.synthetic_classes=1000"],
            "exchange",
        ),  # 128 KB of logits
    ],
)
def test_bytes_by_link_match_the_kernel_counters(make_cluster, tmp_path, variant, collective):
    cluster = make_cluster(2)
    kernel, model = {}, {}
    for steps in (10, 30):
        before = sent(cluster)
        s = train(cluster, tmp_path / f"s{steps}", f"train.steps={steps}", *variant)
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
    k, m = kernel[30] - kernel[10], model[30] - model[10]
    print(f"{collective}: kernel {k} B, model {m} B over 20 steps: kernel/model {k / m:.4f}")
    assert abs(k / m - 1) < TOLERANCE, (k, m)


def test_planner_predicts_link_bound_times(make_cluster, tmp_path):
    """At 100 Mbit/s on 2 nodes x 2 ranks (the benchmark's layout) with a 1 M-parameter MLP over
    1000 classes, predicted from the alpha = 0 run's compute time as the benchmark does:
    - the all-reduce's step time, which the link sets (4 MB of gradients, ~0.5 s per step), is
      predicted within 20%;
    - the prediction exchange (512 KB per rank crossing per step) takes at least the planner's wire
      time less 20% (the link's rate is a floor no run beats). It takes more on this machine: the
      exchange is a blocking collective, so its time holds the wait for the peer, and 4 ranks on
      2 cores slow each other while the kernel moves the bytes (measured 100-125 ms against a
      planned 82 ms) - a contention no alpha-beta model holds, and one that GPUs, whose compute
      does not share cores with the network stack, do not have."""
    cluster = make_cluster(2, rate="100mbit")
    common = [
        "train.steps=12",
        "model.hidden=[512]",
        "data.synthetic_classes=1000",
        "train.batch_size=128",
    ]
    launch = lambda np, command: cluster.mpirun_command(np, command, slots=2)  # noqa: E731
    wanted = ("all-reduce (M=1)", "predictions k=1", "alpha=0")
    variants = {v.name: v for v in bench.VARIANTS if v.name in wanted}
    # the median of 3 runs per variant, as the benchmark takes: one run slowed by something else on
    # this shared 2-core machine (a 20% bound on one timed run failed that way) does not decide
    runs = bench.measure(
        launch,
        4,
        BENCH,
        common,
        3,
        tmp_path,
        "100mbit",
        log=print,
        variants=list(variants.values()),
    )
    inputs = bench.planner_inputs(BENCH, common, runs[bench.CALIBRATION])
    plan = {
        name: bench.predict(inputs, runs[name], v, 100_000_000, slots=2)
        for name, v in variants.items()
    }

    allreduce = runs["all-reduce (M=1)"]["timing"]["step_s"], plan["all-reduce (M=1)"].step_s
    codist = runs["predictions k=1"]
    exchange = codist["timing"]["exchange_s"] / codist["steps"], plan["predictions k=1"].exchange_s
    print(
        f"all-reduce step: measured {allreduce[0] * 1e3:.1f} ms, "
        f"planner {allreduce[1] * 1e3:.1f} ms"
    )
    print(
        f"prediction exchange: measured {exchange[0] * 1e3:.1f} ms, "
        f"planner {exchange[1] * 1e3:.1f} ms"
    )
    assert abs(allreduce[1] / allreduce[0] - 1) < 0.2, allreduce
    assert exchange[0] > 0.8 * exchange[1], exchange
    # and the order: the all-reduce's wait per step is several times the exchange's (planned
    # ~6.7x: 4 MB of gradients against 512 KB of predictions per rank). The waits, as measured, not
    # the step times: a k = 1 step also holds its intra-node all-reduce and the distillation loss,
    # which 4 ranks on 2 cores slow (CI: all-reduce 615 ms/step, only 1.96x a k = 1 step, whose
    # exchange was 127-486 ms)
    reduce_run = runs["all-reduce (M=1)"]
    reduce_wait = reduce_run["timing"]["allreduce_s"] / reduce_run["steps"]
    print(
        f"waits per step: all-reduce {reduce_wait * 1e3:.1f} ms, "
        f"prediction exchange {exchange[0] * 1e3:.1f} ms"
    )
    assert reduce_wait > 2 * exchange[0], (reduce_wait, exchange[0])
