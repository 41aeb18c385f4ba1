"""The report on fabricated runs whose numbers are worked out by hand, and the t distribution."""

import json
import math

import pytest

from hvcodistill import report
from hvcodistill.studies.results import read_curve
from hvcodistill.studies.stats import describe, paired, t_cdf, t_quantile

# ----------------------------------------------------------------------------- the t distribution


@pytest.mark.parametrize(
    "df, q", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)]
)
def test_t_quantile_matches_the_printed_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-7)  # the table has 8 digits
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=1e-6)


def test_describe_and_paired_by_hand():
    s = describe([0.71, 0.73, 0.75])
    half = 4.3026527 * 0.02 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n) = 0.049683
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(0.73), pytest.approx(0.02))
    assert (s.lo, s.hi) == (pytest.approx(0.73 - half), pytest.approx(0.73 + half))
    one = describe([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.lo)
    # differences 0.03 and 0.04 over the seeds both sides have (seed 2 only on one side)
    p = paired({0: 0.74, 1: 0.77}, {0: 0.71, 1: 0.73, 2: 0.75})
    assert p.seeds == (0, 1) and p.n == 2
    assert p.diff.mean == pytest.approx(0.035) and p.diff.sd == pytest.approx(0.0070711, rel=1e-4)
    assert p.t == pytest.approx(7.0)  # 0.035 / (0.0070711 / sqrt 2)
    assert p.p == pytest.approx(2 * (1 - t_cdf(7.0, 1)))
    assert p.p == pytest.approx(0.09033447, rel=1e-6)  # two-sided, 1 degree of freedom


# ----------------------------------------------------------------------------- a fabricated study
def summary(
    accs, ensemble, disagreement, *, n_models, steps=20, exchange=(0, 0), step_s=0.0123, loss=1.0
):
    return {
        "topology": {"world_size": 4, "n_models": n_models, "group_size": 4 // n_models},
        "mode": "predictions" if n_models > 1 else "allreduce",
        "every": 1,
        "alpha": 1.0 if n_models > 1 else 0.0,
        "steps": steps,
        "wall_seconds": 10.0,
        "models": [{"id": i, "val_accuracy": a, "val_loss": loss} for i, a in enumerate(accs)],
        "ensemble_val_accuracy": ensemble,
        "disagreement": disagreement,
        "timing": {
            "compute_s": 0,
            "allreduce_s": 0,
            "exchange_s": 0,
            "loop_s": step_s * steps,
            "step_s": step_s,
        },
        "exchanged_bytes": sum(exchange) * steps,
        "bytes_per_step": {
            "allreduce": {"intra_node": 4000.0, "inter_node": 0.0},
            "exchange": {"intra_node": float(exchange[0]), "inter_node": float(exchange[1])},
            "total": {"intra_node": 4000.0 + exchange[0], "inter_node": float(exchange[1])},
        },
    }


def write_run(run_dir, s, curve=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(s))
    rows = []
    for step, accs in curve:
        rows += [
            {"step": step, "kind": "val", "model": i, "val_accuracy": a, "ensemble_val_accuracy": a}
            for i, a in enumerate(accs)
        ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def study_dir(tmp_path):
    """Baseline `base` (M = 1), `codi` (M = 2, seed 2 never ran) and `codi_k10` (seed 1 failed)."""
    d = tmp_path / "study"
    runs = [
        {"variant": v, "seed": s, "dir": str(d / v / f"seed_{s}")}
        for v in ("base", "codi", "codi_k10")
        for s in (0, 1, 2)
    ]
    d.mkdir()
    (d / "study.json").write_text(
        json.dumps(
            {
                "name": "fab",
                "source": "studies/fab.yaml",
                "seeds": [0, 1, 2],
                "baseline": "base",
                "compare": [["codi_k10", "codi"]],
                "variants": [
                    {"name": "base", "base": "base", "axes": {}},
                    {"name": "codi", "base": "codi", "axes": {}},
                    {"name": "codi_k10", "base": "codi", "axes": {"codistill.every": 10}},
                ],
                "runs": runs,
            }
        )
    )
    # base: one model; accuracies 0.71, 0.73, 0.75
    for seed, acc in enumerate((0.71, 0.73, 0.75)):
        write_run(
            d / "base" / f"seed_{seed}",
            summary([acc], acc, 0.0, n_models=1),
            curve=[(10, [acc - 0.1]), (20, [acc])],
        )
    # codi: two models, mean 0.74 and 0.77; ensemble 0.76, 0.79; disagreement 0.10, 0.14
    write_run(
        d / "codi" / "seed_0",
        summary([0.73, 0.75], 0.76, 0.10, n_models=2, exchange=(1000, 500), loss=0.9),
        curve=[(10, [0.6, 0.62]), (20, [0.73, 0.75])],
    )
    write_run(
        d / "codi" / "seed_1",
        summary([0.76, 0.78], 0.79, 0.14, n_models=2, exchange=(1000, 500), loss=0.8),
        curve=[(10, [0.6, 0.64]), (20, [0.76, 0.78])],
    )
    write_run(
        d / "codi_k10" / "seed_0", summary([0.70, 0.70], 0.72, 0.20, n_models=2, exchange=(100, 50))
    )
    write_run(
        d / "codi_k10" / "seed_2", summary([0.72, 0.74], 0.75, 0.18, n_models=2, exchange=(100, 50))
    )
    failed = d / "codi_k10" / "seed_1"
    failed.mkdir()
    (failed / "sweep_run.json").write_text(
        json.dumps({"exit_code": 1, "error": "hvcodistill: error: boom"})
    )
    return d


def test_report_numbers_by_hand(study_dir, capsys):
    assert report.main([str(study_dir)]) == 0
    md = (study_dir / "report.md").read_text()
    # base: mean 73.00, sd 2.00, interval 73 -+ 4.3026527 x 2 / sqrt 3 = [68.03, 77.97]
    assert (
        "| base | 1 x 4 | allreduce | – | 3/3 | 73.00 ± 2.00 [68.0, 78.0] | "
        "73.00 ± 2.00 [68.0, 78.0] | "
        "– | 1.000 ± 0.000 [1.00, 1.00] |" in md
    )
    # codi: model mean per seed 74, 77 -> 75.50 ± 2.12,
    # interval 75.5 -+ 12.706 x 2.1213 / sqrt 2 = [56.4, 94.6]
    # val loss 0.9 and 0.8: 0.850 ± 0.071,
    # interval 0.85 -+ 12.706 x 0.070711 / sqrt 2 = [0.21, 1.49]
    assert (
        "| codi | 2 x 2 | predictions | 1 | 2/3 | 75.50 ± 2.12 [56.4, 94.6] | "
        "77.50 ± 2.12 [58.4, 96.6] | "
        "12.00 ± 2.83 [-13.4, 37.4] | 0.850 ± 0.071 [0.21, 1.49] |" in md
    )
    # codi - base on seeds 0, 1: +3, +4 pp -> +3.50 ± 0.71,
    # t = 3.5 / (0.7071 / sqrt 2) = 7.00, p = 0.090
    # interval 3.5 -+ 12.706 x 0.5 = [-2.85, +9.85]
    assert (
        "| codi − base | model val accuracy (pp) | 2 | +3.50 | 0.71 | [-2.85, +9.85] | "
        "7.00 | 0.090 |" in md
    )
    # ensemble: 76 - 71 = 5, 79 - 73 = 6 -> the same spread
    assert (
        "| codi − base | ensemble val accuracy (pp) | 2 | +5.50 | 0.71 | [-0.85, +11.85] | "
        "11.00 | 0.058 |" in md
    )
    # loss: 0.9 - 1.0 and 0.8 - 1.0 -> -0.150 ± 0.071, t = -0.15 / 0.05 = -3.00, p = 0.205
    assert (
        "| codi − base | model val loss | 2 | -0.150 | 0.071 | [-0.785, +0.485] | -3.00 | 0.205 |"
        in md
    )
    assert "| codi − base | disagreement" not in md  # the baseline has one model: none to disagree
    # the study's compare: codi_k10 - codi on seed 0 only: 70 - 74 = -4, one seed: no sd, t or p
    assert "| codi_k10 − codi | model val accuracy (pp) | 1 | -4.00 | – | – | – | – |" in md
    assert "| codi_k10 − codi | disagreement (pp) | 1 | +10.00 | – | – | – | – |" in md
    # bytes: exchange 1000 + 500 per step; exchanged_bytes 1500 x 20 / 20 steps; total 4000 + 1500
    assert "| codi | 1.5 kB | 1.5 kB | 5.5 kB | 500 B | 12.30 | 10.0 |" in md
    assert "| base | 0 B | 0 B | 4 kB | 0 B | 12.30 | 10.0 |" in md
    # what is missing, and why
    assert "**Runs: 7 of 9 finished.**" in md
    assert "- `codi`: seed 2 not started" in md
    assert "- `codi_k10/seed_1`: failed (exit 1: hvcodistill: error: boom;" in md
    for png in ("accuracy.png", "tradeoff.png", "curves.png"):
        assert f"![{png[:-4]}]({png})" in md
        assert (study_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every axis only for codi_k10 (one point): no accuracy-against-k figure
    assert not (study_dir / "accuracy_vs_every.png").exists()
    assert "7 of 9 runs finished" in capsys.readouterr().out


def test_learning_curves_keep_the_last_rows_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "kind": "val", "model": 0, "val_accuracy": 0.1},
        {"step": 10, "kind": "train", "model": 0, "accuracy": 0.9},
        {"step": 10, "kind": "val", "model": 0, "val_accuracy": 0.3},  # the run started over
        {"step": 10, "kind": "val", "model": 1, "val_accuracy": 0.5, "ensemble_val_accuracy": 0.6},
    ]
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20, "ki'
    )  # cut by a crash
    assert read_curve(path) == {10: {"model_acc": pytest.approx(0.4), "ensemble_acc": 0.6}}


def test_accuracy_against_k_and_a_study_without_study_json(study_dir):
    (study_dir / "study.json").unlink()
    write_run(study_dir / "codi_k10" / "seed_1", summary([0.71, 0.71], 0.73, 0.2, n_models=2))
    assert report.main([str(study_dir), "--baseline", "base"]) == 0
    md = (study_dir / "report.md").read_text()
    assert "**Runs: 8 of 8 finished.**" in md  # only what is on disk
    assert "| codi_k10 − base | model val accuracy (pp) | 3 |" in md

    spec = json.loads('{"name": "k", "seeds": [0], "baseline": null, "variants": [], "runs": []}')
    for k, acc in ((1, 0.7), (10, 0.72), (100, 0.69)):
        name = f"p_every={k}"
        spec["variants"].append({"name": name, "base": "p", "axes": {"codistill.every": k}})
        spec["runs"].append(
            {"variant": name, "seed": 0, "dir": str(study_dir / "k" / name / "seed_0")}
        )
        write_run(study_dir / "k" / name / "seed_0", summary([acc, acc], acc, 0.1, n_models=2))
    (study_dir / "k" / "study.json").write_text(json.dumps(spec))
    assert report.main([str(study_dir / "k")]) == 0
    assert (study_dir / "k" / "accuracy_vs_every.png").read_bytes()[:4] == b"\x89PNG"


def test_report_input_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "no study.json" in capsys.readouterr().err
