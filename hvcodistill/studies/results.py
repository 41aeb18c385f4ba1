"""A study's results as read from disk: each run's state, figures and learning curve, grouped by
variant, with the statistics over seeds (studies/stats.py). The report (studies/markdown.py,
studies/figures.py) renders them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hvcodistill.errors import EXIT_PREEMPTED
from hvcodistill.studies.spec import LOG_NAME, RESULT_NAME, checkpoint_step
from hvcodistill.studies.stats import Summary, describe


@dataclass(frozen=True)
class Metric:
    """A figure of a run that the tables compare across variants."""

    name: str  # as the tables name it
    scale: float  # 100: a fraction shown in % (differences in percentage points)
    digits: int


METRICS = {
    "model_acc": Metric("model val accuracy", 100, 2),
    "ensemble_acc": Metric("ensemble val accuracy", 100, 2),
    "disagreement": Metric("disagreement", 100, 2),
    "model_loss": Metric("model val loss", 1, 3),
}


@dataclass
class RunResult:
    variant: str
    seed: int
    dir: Path
    status: str = "not started"  # done | failed | interrupted | started | not started | unreadable
    note: str = ""
    summary: Optional[dict] = None
    metrics: dict = field(default_factory=dict)
    curve: dict = field(default_factory=dict)  # step -> {"model_acc": x, "ensemble_acc": y}


@dataclass
class VariantResult:
    name: str
    base: str
    axes: dict
    runs: list  # [RunResult], planned order

    @property
    def done(self) -> list:
        return [r for r in self.runs if r.status == "done"]

    def values(self, key: str) -> dict:
        """seed -> value of `key`, over the finished runs that have it."""
        return {r.seed: r.metrics[key] for r in self.done if r.metrics.get(key) is not None}

    def stat(self, key: str) -> Summary:
        return describe(list(self.values(key).values()))

    def first_summary(self) -> dict:
        return self.done[0].summary if self.done else {}


@dataclass
class StudyResult:
    name: str
    dir: Path
    source: str
    description: str
    seeds: list
    baseline: Optional[str]
    compare: list
    variants: list  # [VariantResult]

    def variant(self, name: str) -> Optional[VariantResult]:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def runs(self) -> list:
        return [r for v in self.variants for r in v.runs]


# ----------------------------------------------------------------------------- reading the runs
def run_metrics(summary: dict) -> dict:
    """The figures of one finished run, from its summary.json (older summaries lack some keys)."""
    steps = max(1, int(summary.get("steps") or 1))
    models = summary.get("models") or []
    accs = [m["val_accuracy"] for m in models if m.get("val_accuracy") is not None]
    losses = [m["val_loss"] for m in models if m.get("val_loss") is not None]
    per_step = summary.get("bytes_per_step") or {}
    timing = summary.get("timing") or {}
    step_s = timing.get("step_s")
    if step_s is None and timing.get("loop_s") is not None:
        step_s = timing["loop_s"] / steps
    topo = summary.get("topology") or {}
    total = per_step.get("total")
    exchanged = summary.get("exchanged_bytes")
    return {
        "model_acc": sum(accs) / len(accs) if accs else None,
        "model_loss": sum(losses) / len(losses) if losses else None,
        "ensemble_acc": summary.get("ensemble_val_accuracy"),
        # one model: nothing to disagree with
        "disagreement": summary.get("disagreement") if topo.get("n_models") != 1 else None,
        # all ranks' sends per training step, by collective (summary.json `bytes_per_step`)
        "exchange_bps": sum(per_step["exchange"].values()) if "exchange" in per_step else None,
        "all_bps": sum(total.values()) if total is not None else None,
        "inter_bps": total.get("inter_node") if total is not None else None,
        # the first key of the contract: bytes all ranks received from their peers, over the run
        "exchanged_bps": exchanged / steps if exchanged is not None else None,
        "step_ms": step_s * 1000 if step_s is not None else None,
        "wall_s": summary.get("wall_seconds"),
        "n_models": topo.get("n_models"),
        "group_size": topo.get("group_size"),
    }


def read_curve(path: Path) -> dict:
    """metrics.jsonl rows of kind val -> step -> mean over models of val_accuracy (and the
    ensemble's). A step logged twice (a run restarted from scratch) keeps its last rows."""
    rows: dict = {}
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if row.get("kind") == "val" and "val_accuracy" in row:
            rows[(row["step"], row.get("model", 0))] = row
    curve: dict = {}
    for (step, _), row in sorted(rows.items()):
        point = curve.setdefault(step, {"accs": [], "ensemble_acc": None})
        point["accs"].append(row["val_accuracy"])
        if row.get("ensemble_val_accuracy") is not None:  # every model's row holds the same
            point["ensemble_acc"] = row["ensemble_val_accuracy"]
    return {
        step: {"model_acc": sum(p["accs"]) / len(p["accs"]), "ensemble_acc": p["ensemble_acc"]}
        for step, p in curve.items()
    }


def read_run(result: RunResult) -> RunResult:
    d = result.dir
    attempt = {}
    try:
        attempt = json.loads((d / RESULT_NAME).read_text())  # a local sweep's last attempt
    except (OSError, ValueError):
        pass
    summary_path = d / "summary.json"
    if summary_path.is_file():
        try:
            result.summary = json.loads(summary_path.read_text())
            result.metrics = run_metrics(result.summary)
            result.status = "done"
        except (ValueError, KeyError, TypeError) as e:
            result.status, result.note = "unreadable", f"summary.json: {e}"
        # the whole attempt, starting the ranks included (absent for SLURM runs)
        result.metrics["sweep_s"] = (
            attempt.get("seconds") if attempt.get("exit_code") == 0 else None
        )
        result.curve = read_curve(d / "metrics.jsonl")
        return result
    step = checkpoint_step(d)
    if attempt.get("exit_code") not in (None, 0, EXIT_PREEMPTED):
        result.status = "failed"
        result.note = f"exit {attempt['exit_code']}: {attempt.get('error', '')}; log {d / LOG_NAME}"
    elif step:
        result.status, result.note = (
            "interrupted",
            f"checkpoint at step {step}; the sweep resumes it",
        )
    elif d.is_dir() and any(d.iterdir()):
        result.status = "started"
        result.note = f"running, or stopped before a checkpoint; log {d / LOG_NAME}"
    return result


def load_study_dir(study_dir: Path, baseline: Optional[str] = None) -> StudyResult:
    """The study in `study_dir`: as its study.json lists it, else every <variant>/seed_<s>/."""
    spec_path = study_dir / "study.json"
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        variants = []
        for v in spec["variants"]:
            runs = [
                read_run(RunResult(r["variant"], r["seed"], Path(r["dir"])))
                for r in spec["runs"]
                if r["variant"] == v["name"]
            ]
            variants.append(
                VariantResult(v["name"], v.get("base", v["name"]), v.get("axes", {}), runs)
            )
        return StudyResult(
            spec["name"],
            study_dir,
            spec.get("source", ""),
            spec.get("description", ""),
            spec["seeds"],
            baseline or spec.get("baseline"),
            [tuple(c) for c in spec.get("compare", [])],
            variants,
        )
    variants, seeds = [], set()
    for vdir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
        seed_dirs = sorted(
            (p for p in vdir.glob("seed_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
        )
        if seed_dirs:
            runs = [read_run(RunResult(vdir.name, int(p.name[5:]), p)) for p in seed_dirs]
            seeds.update(r.seed for r in runs)
            variants.append(VariantResult(vdir.name, vdir.name, {}, runs))
    return StudyResult(study_dir.name, study_dir, "", "", sorted(seeds), baseline, [], variants)
