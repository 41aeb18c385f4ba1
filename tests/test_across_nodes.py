"""Across nodes, measured: the trainer on an emulated 2-node cluster (root only).

- summary.json knows the nodes from MPI, and its bytes by link match the kernel's byte counters on
  the nodes' links: the difference of a 10-step and a 30-step run, so set-up and the final
  evaluation cancel out. Tolerance 5%: what the kernel adds is TCP/IP and Ethernet headers (about 1%
  at MTU 9000, ACKs included) and the small messages the byte model leaves out (the per-step
  preemption flag, Horovod's coordination, metrics), a few hundred bytes per step.
- the planner predicts measured step times on a shaped link within 20% (a small case; the benchmark
  `python -m hvcodistill.bench --cluster` checks more rates and topologies).
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
    cmd, env = cluster.mpirun_command(4, [sys.executable, "-m", "hvcodistill.train", "--config", BENCH,
                                          f"run.dir={run_dir}", "train.progress=false", *overrides], slots=2)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def sent(cluster) -> int:
    return sum(c["tx_bytes"] for c in cluster.counters().values())


def inter_node(summary) -> int:
    return sum(links["inter_node"] for links in summary["bytes"].values())


@pytest.mark.parametrize("variant,collective", [
    (["codistill.n_models=1"], "allreduce"),                      # the ring crosses both links
    (["codistill.mode=predictions", "data.synthetic_classes=1000"], "exchange"),   # 128 KB of logits
])
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
    # evaluation's allgather of 1000-class probabilities crosses too); with M = 2 no gradient crosses
    per_step = s["bytes_per_step"]
    training = per_step["total"]["inter_node"] - per_step["evaluation"]["inter_node"]
    assert per_step[collective]["inter_node"] > 0.98 * training
    if collective == "exchange":
        assert per_step["allreduce"]["inter_node"] == 0 and per_step["allreduce"]["intra_node"] > 0
    k, m = kernel[30] - kernel[10], model[30] - model[10]
    print(f"{collective}: kernel {k} B, model {m} B over 20 steps: kernel/model {k / m:.4f}")
    assert abs(k / m - 1) < TOLERANCE, (k, m)


def test_planner_predicts_step_time_within_20_percent(make_cluster, tmp_path):
    """At 100 Mbit/s on 2 nodes x 2 ranks with a 0.53 M-parameter MLP: all-reduce and prediction
    exchange, predicted from the alpha = 0 run's compute time (as the benchmark does)."""
    cluster = make_cluster(2, rate="100mbit")
    common = ["train.steps=12", "model.hidden=[512]"]
    launch = lambda np, command: cluster.mpirun_command(np, command, slots=2)  # noqa: E731
    runs = {v.name: bench.run_variant(launch, 4, BENCH, [*common, *v.overrides], tmp_path / str(i))
            for i, v in enumerate(bench.VARIANTS) if v.name in ("all-reduce (M=1)", "predictions k=1", "alpha=0")}
    inputs = bench.planner_inputs(BENCH, common, runs[bench.CALIBRATION])
    for v in bench.VARIANTS:
        if v.name in runs:
            measured = runs[v.name]["timing"]["step_s"]
            predicted = bench.predict(inputs, runs[v.name], v, 100_000_000, slots=2)
            print(f"{v.name}: measured {measured * 1e3:.1f} ms, planner {predicted * 1e3:.1f} ms")
            assert abs(predicted / measured - 1) < 0.2, (v.name, measured, predicted)
