"""The planner: hand-computed alpha-beta times and byte counts, the registry's parameter counts, and
the command line (one-line errors with exit 2, JSON that parses). No MPI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvcodistill import plan as plan_command
from hvcodistill.comm.topology import NodeLayout
from hvcodistill.comm.traffic import job_allreduce_bytes
from hvcodistill.errors import ConfigError
from hvcodistill.planning import (
    Cluster,
    Workload,
    compare,
    compute_from_summary,
    egress_share,
    groups,
    model_size,
    peer_rings,
    predict,
)

ROOT = Path(__file__).resolve().parents[2]
MB = 1e6
GBIT = 1.25e8  # bytes/s in 1 Gbit/s


def workload(**kw) -> Workload:
    base = dict(params=4_000_000, batch=32, classes=1000, n_models=1, every=1)  # S = 16 MB
    return Workload(**{**base, **kw})


def test_ring_over_two_nodes_of_two_by_hand():
    # G = 4 on 2 nodes of 2, S = 16 MB, alpha 0: 2 (G-1) = 6 steps of S/G = 4 MB, each paced by the
    # 1 Gbit/s inter-node edge (the 1000 Gbit/s intra-node edges wait on it): 6 x 4 MB / 125 MB/s.
    cluster = Cluster(4, 2, intra_gbps=1000, inter_gbps=1, intra_latency_us=0, inter_latency_us=0)
    p = predict(cluster, workload())
    assert p.allreduce_s == pytest.approx(6 * 4 * MB / (1 * GBIT)) == pytest.approx(0.192)
    assert p.allreduce_link == "inter_node"
    # ring 0 -> 1 -> 2 -> 3 -> 0: edges 1 -> 2 and 3 -> 0 cross; each rank sends
    # 2 (G-1)/G x S = 24 MB
    assert p.inter_node_bytes == 2 * 1.5 * 16 * MB == 48 * MB
    assert p.intra_node_bytes == 48 * MB
    assert p.allreduce_bytes == job_allreduce_bytes(
        "ring", NodeLayout.contiguous(4, 2), range(4), 16_000_000
    )
    assert p.exchange_s == 0 and p.step_s == p.allreduce_s


def test_latency_counts_once_per_ring_step():
    cluster = Cluster(4, 2, intra_gbps=1000, inter_gbps=1, intra_latency_us=2, inter_latency_us=5)
    assert predict(cluster, workload()).allreduce_s == pytest.approx(6 * (5e-6 + 4 * MB / GBIT))
    one_node = Cluster(4, 4, intra_gbps=1, intra_latency_us=2)
    p = predict(one_node, workload())
    assert (
        p.allreduce_s == pytest.approx(6 * (2e-6 + 4 * MB / GBIT))
        and p.allreduce_link == "intra_node"
    )
    assert p.inter_node_bytes == 0


def test_one_gpu_per_model_has_no_allreduce():
    p = predict(Cluster(2, 1, inter_latency_us=5), workload(n_models=2))
    assert (
        p.group_size == 1
        and p.allreduce_s == 0
        and p.allreduce_bytes == {"intra_node": 0, "inter_node": 0}
    )
    assert p.exchange_s > 0


def test_codistillation_with_one_node_per_model_crosses_only_to_exchange():
    cluster = Cluster(
        16, 8, intra_gbps=2400, inter_gbps=200, intra_latency_us=2, inter_latency_us=5
    )
    w = workload(n_models=2, mode="predictions", every=10)
    p = predict(cluster, w)
    s = 16 * MB
    assert p.allreduce_bytes == {"intra_node": 2 * 8 * 2 * 7 * s / 8, "inter_node": 0}
    payload = 32 * 1000 * 4 + 8  # logits + batch checksum
    assert p.exchange_payload_bytes == payload
    assert p.exchange_bytes == {"intra_node": 0, "inter_node": pytest.approx(16 * payload / 10)}
    assert p.inter_node_bytes == pytest.approx(16 * payload / 10)
    # all-reduce inside the node; the exchange: M-1 = 1 transfer, the node's 8 ranks share its NIC
    assert p.allreduce_s == pytest.approx(2 * 7 * (2e-6 + (s / 8) / (2400 * GBIT)))
    assert p.exchange_s == pytest.approx((5e-6 + payload / (200 * GBIT / 8)) / 10)
    assert p.exchange_link == "inter_node"
    c = compare(cluster, w)
    assert c.allreduce.n_models == 1 and c.allreduce.allreduce_link == "inter_node"
    assert c.inter_node_ratio == pytest.approx(p.inter_node_bytes / (2 * 2 * 15 / 16 * s))
    assert c.speedup == pytest.approx(c.allreduce.step_s / p.step_s)


def test_hierarchical_by_hand():
    # L = 2 ranks on each of n = 2 nodes, S = 16 MB; intra 8 Gbit/s = 1e9 B/s, inter 1 Gbit/s shared
    # by the L = 2 cross-node rings:
    # 2 (L-1)(a + S/L / b_intra) + 2 (n-1)(a + S/(L n) / (b_inter / L))
    cluster = Cluster(4, 2, intra_gbps=8, inter_gbps=1, intra_latency_us=2, inter_latency_us=5)
    p = predict(cluster, workload(algorithm="hierarchical"))
    assert p.allreduce_s == pytest.approx(
        2 * (2e-6 + 8 * MB / 1e9) + 2 * (5e-6 + 4 * MB / (GBIT / 2))
    )
    # per rank: 2 (L-1)/L x S = 16 MB inside the node, 2 (n-1)/n x S/L = 8 MB across
    assert p.allreduce_bytes == {"intra_node": 4 * 16 * MB, "inter_node": 4 * 8 * MB}
    # a group inside one node is a plain intra-node ring
    inside = predict(
        Cluster(16, 8, intra_gbps=8, intra_latency_us=2),
        workload(n_models=2, algorithm="hierarchical"),
    )
    assert inside.allreduce_s == pytest.approx(2 * 7 * (2e-6 + 2 * MB / 1e9))
    with pytest.raises(ConfigError, match="--algorithm hierarchical"):  # groups of 12 on nodes of 8
        predict(Cluster(24, 8), workload(n_models=2, algorithm="hierarchical"))


def test_placement_and_shared_node_bandwidth():
    assert groups(8, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert peer_rings(8, 2) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    layout = NodeLayout.contiguous(16, 8)
    assert egress_share(layout, groups(16, 1)) == 1  # one ring: one edge leaves each node
    assert egress_share(layout, groups(16, 2)) == 0  # each group on its node
    assert egress_share(layout, peer_rings(16, 2)) == 8  # G >= L: every rank sends across
    assert egress_share(layout, peer_rings(16, 4)) == 4  # G = 4 < L: min(L, G)
    # groups of 12 on nodes of 8: node 1 holds the end of group 0 and the start of group 1
    assert egress_share(NodeLayout.contiguous(24, 8), groups(24, 2)) == 2


def test_weights_mode_payload_and_teacher_forwards():
    cluster = Cluster(16, 8)
    p = predict(
        cluster,
        workload(n_models=4, mode="weights", every=100, compute_s=0.030, state_bytes=16_000_100),
    )
    assert p.compute_s == pytest.approx(0.030 * (1 + 3 / 3))
    assert p.exchange_payload_bytes == 4_000_025  # sharded: 1/G of the model per rank
    # G = 4 < L = 8: peers (g, 4+g) share a node, (4+g, 8+g) do not; logical transfers per
    # traffic.py;
    # then each group reassembles its 3 teachers: every rank sends its 3 received shards to 3 others
    shard = 4_000_025
    assert p.exchange_bytes["inter_node"] + p.exchange_bytes["intra_node"] == pytest.approx(
        (16 * 3 * shard + 16 * 3 * 3 * shard) / 100
    )
    # one copy of each model crosses per refresh, not G: M (M-1) x the model between nodes at most
    assert p.exchange_bytes["inter_node"] <= 4 * 3 * 16_000_100 / 100 * 1.001
    assert (
        predict(cluster, workload(n_models=2, mode="weights")).exchange_payload_bytes
        == 16 * MB // 8
    )  # 4 x P / G
    # the transfer hides behind refresh_delay = min(10, k // 2) steps of compute and all-reduce
    slow = Cluster(16, 8, inter_gbps=0.001)
    hidden = predict(
        Cluster(16, 8), workload(n_models=2, mode="weights", every=100, compute_s=0.03)
    )
    assert (
        hidden.exchange_s == 0
        and predict(slow, workload(n_models=2, mode="weights", every=100)).exchange_s > 0
    )
    assert (
        compare(cluster, workload(n_models=4, mode="weights", compute_s=0.03)).allreduce.compute_s
        == 0.03
    )


def test_compute_from_summary_removes_a_weights_runs_teachers():
    plain = {
        "mode": "predictions",
        "steps": 100,
        "timing": {"compute_s": 2.0},
        "topology": {"n_models": 2},
    }
    assert compute_from_summary(plain)[0] == pytest.approx(0.02)
    weights = {**plain, "mode": "weights", "alpha": 1.0}
    assert compute_from_summary(weights)[0] == pytest.approx(0.02 / (4 / 3))
    assert compute_from_summary({**weights, "alpha": 0})[0] == pytest.approx(0.02)


def test_parameter_counts_from_the_registry():
    r50 = model_size("resnet50", input_shape=(3, 224, 224), num_classes=1000)
    assert r50.params == 25_557_032
    assert r50.state_bytes > 4 * r50.params  # + BatchNorm running statistics
    mlp = model_size("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[128])
    assert mlp.params == (64 * 128 + 128) + (128 * 10 + 10) and mlp.state_bytes == 4 * mlp.params


def test_bad_layouts_name_the_flag():
    with pytest.raises(ConfigError, match="--gpus 16 is not a multiple of --models 3"):
        predict(Cluster(16, 8), workload(n_models=3))
    with pytest.raises(ConfigError, match="--gpus-per-node"):
        predict(Cluster(12, 8), workload())


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hvcodistill.plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--gpus", "16", "--models", "3", "--params", "1000", "--classes", "10"], "--models 3"),
        (["--gpus", "12", "--params", "1000", "--classes", "10"], "--gpus-per-node 8"),
        (["--gpus", "16", "--model", "nosuch", "--classes", "10"], "--model 'nosuch'"),
        (["--gpus", "16", "--model", "resnet50"], "missing classes"),
        (
            [
                "--gpus",
                "16",
                "--params",
                "1000",
                "--classes",
                "10",
                "--compute-from",
                "/nonexistent/summary.json",
            ],
            "--compute-from",
        ),
        (["--gpus", "sixteen"], "--gpus"),
        (
            ["--gpus", "16", "--gpus-per-model", "3", "--params", "1000", "--classes", "10"],
            "--gpus-per-model 3",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, says):
    proc = plan(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvcodistill.plan: error: ") and says in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("value", ["16,,x", "16,32,", "x", ",", "16,0", "16;32"])
def test_gpus_list_refuses_what_is_not_a_list_of_world_sizes(value, capsys):
    args = ["--params", "1000", "--classes", "10", "--gpus-list", value]
    assert plan_command.main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("hvcodistill.plan: error: --gpus-list") and repr(value) in lines[0]


def test_shapes_may_still_be_written_with_x(capsys):
    args = [
        "--model",
        "mlp",
        "--input-shape",
        "1x8x8",
        "--hidden",
        "32x16",
        "--classes",
        "10",
        "--gpus",
        "16",
        "--json",
    ]
    assert plan_command.main(args) == 0
    params = json.loads(capsys.readouterr().out)["workload"]["params"]
    assert params == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)


def test_cli_json_and_table(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps(
            {
                "mode": "predictions",
                "steps": 10,
                "timing": {"compute_s": 1.0},
                "topology": {"n_models": 2},
            }
        )
    )
    proc = plan(
        "--config",
        "configs/imagenet_resnet50_codistill.yaml",
        "--gpus-list",
        "16,32",
        "--mode",
        "predictions",
        "--every",
        "10",
        "--compute-from",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["workload"]["params"] == 25_557_032 and out["workload"][
        "compute_s"
    ] == pytest.approx(0.1)
    assert [r["codistillation"]["gpus"] for r in out["rows"]] == [16, 32]
    first = out["rows"][0]
    assert first["codistillation"]["exchange_payload_bytes"] == 32 * 1000 * 4 + 8
    assert first["inter_node_ratio"] == pytest.approx(
        16 * 128_008 / 10 / (2 * 2 * 15 / 16 * 4 * 25_557_032)
    )
    text = plan(
        "--config", "configs/imagenet_resnet50_codistill.yaml", "--gpus", "16", "--compute-ms", "20"
    )
    assert text.returncode == 0, text.stderr
    assert (
        "25,557,032" in text.stdout
        and "codistillation" in text.stdout
        and "every 2500" in text.stdout
    )


def test_cli_gpus_per_model_keeps_every_model_inside_a_node():
    """--gpus-per-model 8 on nodes of 8: M = W / 8, so no gradient byte crosses a node and only the
    exchange does (M - 1 payloads per rank every k steps)."""
    proc = plan(
        "--params",
        "1000000",
        "--classes",
        "10",
        "--batch",
        "32",
        "--gpus-list",
        "16,64",
        "--gpus-per-model",
        "8",
        "--every",
        "10",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    for row, w in zip(json.loads(proc.stdout)["rows"], (16, 64)):
        codist = row["codistillation"]
        assert codist["n_models"] == w // 8 and codist["group_size"] == 8
        assert codist["allreduce_bytes"]["inter_node"] == 0
        assert codist["exchange_bytes"]["inter_node"] == pytest.approx(
            w * (w // 8 - 1) * (32 * 10 * 4 + 8) / 10
        )
