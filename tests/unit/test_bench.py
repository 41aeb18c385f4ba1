"""The benchmark (bench.py) without ranks: one line and exit 2 for bad input before any rank
starts, and its table, ratio and crossovers from fabricated runs. A small real run on this host:
tests/integration/test_bench.py."""

import subprocess
import sys

import pytest

from hvcodistill import bench as bench_command
from hvcodistill.bench import REFERENCE, VARIANTS, crossovers, render, rows_for
from tests.helpers import ROOT


@pytest.mark.parametrize(
    "args,says",
    [
        (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
        (["codistill.nope=1"], "codistill.nope"),
        (["-np", "3"], "-np"),
        (["--cluster", "--nodes", "3"], "--nodes"),
    ],
)
def test_bad_input_is_one_line_before_any_rank(args, says, capsys, monkeypatch):
    def ranks_started(*args, **kw):
        raise AssertionError("the benchmark started ranks")

    monkeypatch.setattr(bench_command, "measure", ranks_started)
    monkeypatch.setattr(bench_command, "bench_cluster", ranks_started)
    try:
        code = bench_command.main(args)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert says in lines[-1] and "Traceback" not in err and "bench: local" not in err


def test_bench_missing_config_one_line_before_any_rank():
    """`python -m hvcodistill.bench` as a user runs it: nothing but the one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "hvcodistill.bench", "--config", "/nonexistent.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "hvcodistill.bench: error: config file /nonexistent.yaml not found"
    ]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--rates", "nonsense"], "--rates needs --cluster"),
        (["--rates", "1gbit"], "--rates needs --cluster"),
        (["--cluster", "--rates", "nonsense"], "--rates: bad rate 'nonsense'"),
        (["--cluster", "--rates", ","], "--rates: no rate"),
    ],
)
def test_rates_are_refused_in_process_before_anything_runs(args, says, capsys):
    assert bench_command.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith("hvcodistill.bench: error: ") and says in err


def summary(step_s, inter=0.0, world=4, models=2):
    return {
        "topology": {"world_size": world, "n_models": models},
        "timing": {"step_s": step_s},
        "bytes_per_step": {"total": {"intra_node": 1e6, "inter_node": inter}},
        "nodes": {"count": 2},
        "batch_size_per_rank": 32,
    }


def test_rows_table_and_crossovers_from_fabricated_runs():
    measured = {v.name: summary(0.1) for v in VARIANTS}
    measured["all-reduce (M=1)"] = summary(0.2, inter=48e6, models=1)
    measured[REFERENCE.name] = {
        "topology": {"world_size": 4},
        "timing": {"step_s": 0.19},
        "batch_size_per_rank": 32,
    }
    rows = rows_for(measured, "1gbit", {"alpha=0": 110.0})
    by = {r["variant"]: r for r in rows}
    assert (
        by["all-reduce (M=1)"]["inter_node_MB_per_step"] == 48
        and by["alpha=0"]["samples_per_s"] == 1280
    )
    assert by[REFERENCE.name]["inter_node_MB_per_step"] == 0
    text = render(rows)
    assert "+10%" in text  # the planner's 110 ms against 100 measured
    lines = crossovers(rows, ["1gbit"])
    assert "0.950x the reference" in lines[0]
    assert any(
        line.startswith("predictions k=10") and "faster than all-reduce at: 1gbit" in line
        for line in lines
    )


def test_reference_ratio_is_the_median_of_paired_rounds():
    """Round by round the M = 1 run and the plain loop ran back to back: the ratio is taken per
    round, so a round on a slow machine (the third) moves both and not the ratio."""
    measured = {v.name: summary(0.1) for v in VARIANTS}
    measured["all-reduce (M=1)"] = {**summary(0.2, models=1), "round_step_s": [0.2, 0.25, 0.4]}
    measured[REFERENCE.name] = {
        "topology": {"world_size": 4},
        "timing": {"step_s": 0.19},
        "round_step_s": [0.19, 0.25, 0.36],
    }
    line = crossovers(rows_for(measured, "local"), ["local"])[0]
    assert "0.950x (median of 3 rounds paired, 0.900-1.000)" in line, line


def test_torch_backend_lines_pair_each_run_with_its_yardstick():
    """--backends horovod,torch: M = 1 on torch against the plain DDP loop, and torch against
    Horovod for M = 1, predictions k=10 and weights k=50, each the median of per-round ratios;
    on a cluster (no plain loop, one run each) the three step-time ratios."""
    from hvcodistill.bench import TORCH_VARIANTS

    measured = {v.name: summary(0.1) for v in VARIANTS}
    measured["all-reduce (M=1)"] = {**summary(0.2, models=1), "round_step_s": [0.2, 0.2, 0.2]}
    measured["predictions k=10"] = {**summary(0.1), "round_step_s": [0.1, 0.1, 0.1]}
    measured["weights k=50"] = {**summary(0.1), "round_step_s": [0.1, 0.1, 0.1]}
    m1, ddp, k10, w50 = (v.name for v in TORCH_VARIANTS)
    measured[m1] = {**summary(0.25, models=1), "round_step_s": [0.25, 0.2, 0.4]}
    measured[ddp] = {"topology": {"world_size": 4}, "timing": {"step_s": 0.2}}
    measured[ddp]["round_step_s"] = [0.2, 0.2, 0.2]
    measured[k10] = {**summary(0.05), "round_step_s": [0.05, 0.05, 0.05]}
    measured[w50] = {**summary(0.2), "round_step_s": [0.2, 0.2, 0.2]}
    lines = crossovers(rows_for(measured, "local"), ["local"])
    assert any(
        line.startswith("all-reduce, torch / plain DDP loop: 0.800x (median of 3 rounds paired")
        for line in lines
    ), lines
    assert any(
        line.startswith("torch / Horovod, speed: M=1 0.800x")
        and "predictions k=10 2.000x" in line
        and "weights k=50 0.500x" in line
        for line in lines
    ), lines
    del measured[ddp]  # --cluster: no plain loop
    lines = crossovers(rows_for(measured, "1gbit"), ["1gbit"])
    assert (
        "torch / Horovod, speed (Horovod's step time / torch's): all-reduce (M=1) 0.800x; "
        "predictions k=10 2.000x; weights k=50 0.500x"
    ) in lines, lines


@pytest.mark.parametrize("backends", ["torch", "horovod,nccl"])
def test_bad_backends_are_one_line(backends):
    from hvcodistill.bench import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--backends", *backends.split()])
    assert e.value.code == 2
