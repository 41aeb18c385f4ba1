"""The report of a study: report.md with tables, and PNG figures, from every run's results.

    python -m hvcodistill.report runs/studies/paper_miniature [--baseline NAME] [--out DIR]

Reads `<study dir>/study.json` (written by hvcodistill.sweep: the variants, seeds, baseline and
comparisons) and each run's summary.json and metrics.jsonl; without study.json it takes every
`<variant>/seed_<s>/` it finds. A partial study (runs missing, failed or still running) gives a
report of the finished runs that lists what is missing. Exit codes: 0 report written (also for a
partial study); 2 no such study directory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hvcodistill.studies.spec import checkpoint_step
from hvcodistill.studies.stats import Paired, Summary, describe, paired

@dataclass(frozen=True)
class Metric:
    """A figure of a run that the tables compare across variants."""
    name: str                 # as the tables name it
    scale: float              # 100: a fraction shown in % (differences in percentage points)
    digits: int


METRICS = {"model_acc": Metric("model val accuracy", 100, 2), "ensemble_acc": Metric("ensemble val accuracy", 100, 2),
           "disagreement": Metric("disagreement", 100, 2), "model_loss": Metric("model val loss", 1, 3)}


@dataclass
class RunResult:
    variant: str
    seed: int
    dir: Path
    status: str = "not started"     # done | failed | interrupted | started | not started | unreadable
    note: str = ""
    summary: Optional[dict] = None
    metrics: dict = field(default_factory=dict)
    curve: dict = field(default_factory=dict)     # step -> {"model_acc": x, "ensemble_acc": y}


@dataclass
class VariantResult:
    name: str
    base: str
    axes: dict
    runs: list                       # [RunResult], planned order

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
    variants: list                   # [VariantResult]

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
    return {
        "model_acc": sum(accs) / len(accs) if accs else None,
        "model_loss": sum(losses) / len(losses) if losses else None,
        "ensemble_acc": summary.get("ensemble_val_accuracy"),
        "disagreement": summary.get("disagreement") if topo.get("n_models") != 1 else None,   # one model: none
        # all ranks' sends per training step, by collective (summary.json `bytes_per_step`)
        "exchange_bps": sum(per_step["exchange"].values()) if "exchange" in per_step else None,
        "all_bps": sum(per_step["total"].values()) if "total" in per_step else None,
        "inter_bps": per_step["total"].get("inter_node") if "total" in per_step else None,
        # the first key of the contract: bytes all ranks received from their peers, over the run
        "exchanged_bps": summary["exchanged_bytes"] / steps if summary.get("exchanged_bytes") is not None else None,
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
            continue                 # a line cut by a crash
        if row.get("kind") == "val" and "val_accuracy" in row:
            rows[(row["step"], row.get("model", 0))] = row
    curve: dict = {}
    for (step, _), row in sorted(rows.items()):
        point = curve.setdefault(step, {"accs": [], "ensemble_acc": None})
        point["accs"].append(row["val_accuracy"])
        if row.get("ensemble_val_accuracy") is not None:      # every model's row holds the same
            point["ensemble_acc"] = row["ensemble_val_accuracy"]
    return {step: {"model_acc": sum(p["accs"]) / len(p["accs"]), "ensemble_acc": p["ensemble_acc"]}
            for step, p in curve.items()}


def read_run(result: RunResult) -> RunResult:
    d = result.dir
    attempt = {}
    try:
        attempt = json.loads((d / "sweep_run.json").read_text())    # a local sweep's last attempt
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
        result.metrics["sweep_s"] = attempt.get("seconds") if attempt.get("exit_code") == 0 else None
        result.curve = read_curve(d / "metrics.jsonl")
        return result
    step = checkpoint_step(d)
    if attempt.get("exit_code") not in (None, 0, 75):
        result.status = "failed"
        result.note = f"exit {attempt['exit_code']}: {attempt.get('error', '')}; log {d / 'run.log'}"
    elif step:
        result.status, result.note = "interrupted", f"checkpoint at step {step}; the sweep resumes it"
    elif d.is_dir() and any(d.iterdir()):
        result.status, result.note = "started", f"running, or stopped before a checkpoint; log {d / 'run.log'}"
    return result


def load_study_dir(study_dir: Path, baseline: Optional[str] = None) -> StudyResult:
    spec_path = study_dir / "study.json"
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        variants = []
        for v in spec["variants"]:
            runs = [read_run(RunResult(r["variant"], r["seed"], Path(r["dir"])))
                    for r in spec["runs"] if r["variant"] == v["name"]]
            variants.append(VariantResult(v["name"], v.get("base", v["name"]), v.get("axes", {}), runs))
        return StudyResult(spec["name"], study_dir, spec.get("source", ""), spec.get("description", ""),
                           spec["seeds"], baseline or spec.get("baseline"), [tuple(c) for c in spec.get("compare", [])],
                           variants)
    # No study.json: every <variant>/seed_<s>/ on disk.
    variants, seeds = [], set()
    for vdir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
        seed_dirs = sorted((p for p in vdir.glob("seed_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        if seed_dirs:
            runs = [read_run(RunResult(vdir.name, int(p.name[5:]), p)) for p in seed_dirs]
            seeds.update(r.seed for r in runs)
            variants.append(VariantResult(vdir.name, vdir.name, {}, runs))
    return StudyResult(study_dir.name, study_dir, "", "", sorted(seeds), baseline, [], variants)


# ----------------------------------------------------------------------------- formatting
def fmt_stat(s: Summary, *, scale: float = 1.0, digits: int = 2) -> str:
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{s.mean * scale:.{digits}f} (1 seed)"
    return (f"{s.mean * scale:.{digits}f} ± {s.sd * scale:.{digits}f} "
            f"[{s.lo * scale:.{digits - 1}f}, {s.hi * scale:.{digits - 1}f}]")


def fmt_bytes(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_number(value: float, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def layout(v: VariantResult) -> tuple[str, str, str]:
    """(M x G, mode, k) of a variant, from its first finished run."""
    s = v.first_summary()
    if not s:
        return "–", "–", "–"
    t = s.get("topology", {})
    mode = s.get("mode", "–")
    alpha = s.get("alpha")
    if mode != "allreduce" and alpha == 0:
        mode = f"{mode}, alpha 0"
    k = "–" if s.get("mode") == "allreduce" or alpha == 0 else str(s.get("every", "–"))
    return f"{t.get('n_models', '?')} x {t.get('group_size', '?')}", mode, k


def paired_rows(a: VariantResult, b: VariantResult) -> list[str]:
    """a - b per seed, for every metric; disagreement only where both sides have several models."""
    rows = []
    single = any((v.first_summary().get("topology") or {}).get("n_models") == 1 for v in (a, b))
    for key, metric in METRICS.items():
        if key == "disagreement" and single:
            continue
        pr: Paired = paired(a.values(key), b.values(key))
        if pr.n == 0:
            continue
        d, k, f = pr.diff, metric.scale, metric.digits
        interval = f"[{d.lo * k:+.{f}f}, {d.hi * k:+.{f}f}]" if pr.n > 1 else "–"
        sd = f"{d.sd * k:.{f}f}" if pr.n > 1 else "–"
        unit = " (pp)" if k == 100 else ""
        rows.append(f"| {a.name} − {b.name} | {metric.name}{unit} | {pr.n} | {d.mean * k:+.{f}f} | {sd} | "
                    f"{interval} | {fmt_number(pr.t)} | {fmt_p(pr.p)} |")
    return rows


PAIRED_HEADER = ["| difference | metric | seeds | mean | sd | 95% interval | paired t | p (two-sided) |",
                 "|---|---|---|---|---|---|---|---|"]


def status_lines(study: StudyResult) -> list[str]:
    """How many runs finished, and for the others why not: one line per run with something to say
    (failed, interrupted, ...), one per variant for the seeds not started."""
    runs = study.runs
    done = [r for r in runs if r.status == "done"]
    lines = [f"**Runs: {len(done)} of {len(runs)} finished.**"]
    missing = [r for r in runs if r.status != "done"]
    if missing:
        lines[0] += " The tables and figures use the finished runs only. Not finished:"
        lines.append("")
        for v in study.variants:
            idle = [r.seed for r in v.runs if r.status == "not started"]
            if idle:
                lines.append(f"- `{v.name}`: seed{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} not started")
            for r in v.runs:
                if r.status not in ("done", "not started"):
                    lines.append(f"- `{r.variant}/seed_{r.seed}`: {r.status}" + (f" ({r.note})" if r.note else ""))
    return lines



def shown_path(path) -> str:
    """`path` relative to the working directory when it lies below it (a report committed with
    the code then names `runs/studies/...`, not one machine's absolute path), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

def write_markdown(study: StudyResult, figures: dict, out: Path) -> Path:
    base = study.variant(study.baseline) if study.baseline else None
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    done = [r for r in study.runs if r.status == "done"]
    total_s = sum(r.metrics.get("wall_s") or 0 for r in done)
    swept = [r.metrics["sweep_s"] for r in done if r.metrics.get("sweep_s") is not None]
    timing = (f"The finished runs trained for {total_s / 60:.1f} min in all ({total_s / max(1, len(done)):.1f} s "
              "per run, summary.json `wall_seconds`)")
    if swept:
        timing += (f"; the sweep spent {sum(swept) / 60:.1f} min on {len(swept)} of them "
                   f"({sum(swept) / len(swept):.1f} s per run, starting the ranks included)")
    source, where = shown_path(study.source) if study.source else "(none)", shown_path(study.dir)
    lines += [f"Study file `{source}`; seeds {', '.join(map(str, study.seeds))}; "
              f"directory `{where}`. Written {time.strftime('%Y-%m-%d %H:%M')} by "
              f"`python -m hvcodistill.report {where}`. {timing}.", ""]
    lines += status_lines(study) + [""]

    lines += ["## Accuracy per variant", "",
              "Mean ± sd over seeds, [95% interval of the mean, Student t with n − 1 degrees of freedom]. "
              "Model accuracy is the mean of the run's M models; the ensemble averages their probabilities; "
              "disagreement is the fraction of validation samples on which the models' top-1 differ; "
              "val loss is the models' mean cross-entropy on the validation set.", "",
              "| variant | M x G | mode | k | seeds | " +
              " | ".join(m.name + (" (%)" if m.scale == 100 else "") for m in METRICS.values()) + " |",
              "|---|---|---|---|---|" + "---|" * len(METRICS)]
    for v in study.variants:
        mg, mode, k = layout(v)
        cells = [fmt_stat(v.stat(key), scale=m.scale, digits=m.digits) for key, m in METRICS.items()]
        lines.append(f"| {v.name} | {mg} | {mode} | {k} | {len(v.done)}/{len(v.runs)} | " + " | ".join(cells) + " |")

    lines += ["", "## Communication and time", "",
              "Bytes per training step sent by all ranks together (summary.json `bytes_per_step`): the peer "
              "exchange alone, then every collective (gradient all-reduce, exchange, evaluation, checkpoint) and "
              "the part of it that crossed nodes; `exchanged_bytes` / steps is the older count (bytes received "
              "from peers; in weights mode the first also counts the allgather inside a group that spreads a "
              "refresh over its ranks). Step time is the training loop's time per step (timing.step_s), mean over ranks. "
              "Means over seeds.", "",
              "| variant | exchange / step | exchanged_bytes / steps | all collectives / step | inter-node / step "
              "| step time (ms) | run time (s) |", "|---|---|---|---|---|---|---|"]
    for v in study.variants:
        mean = lambda key: v.stat(key).mean if v.stat(key).n else None  # noqa: E731
        step_ms, wall = v.stat("step_ms"), v.stat("wall_s")
        times = f"{fmt_number(step_ms.mean, 2) if step_ms.n else '–'} | {fmt_number(wall.mean, 1) if wall.n else '–'}"
        lines.append(f"| {v.name} | {fmt_bytes(mean('exchange_bps'))} | {fmt_bytes(mean('exchanged_bps'))} | "
                     f"{fmt_bytes(mean('all_bps'))} | {fmt_bytes(mean('inter_bps'))} | {times} |")

    if base is not None:
        lines += ["", f"## Paired differences against the baseline `{base.name}`", "",
                  "Per seed, variant minus baseline (the same seed on both sides; accuracies in percentage points); "
                  "mean and sd of those differences, the 95% interval of their mean, the paired t statistic "
                  "t = mean / (sd / √n) and its two-sided p-value (n − 1 degrees of freedom).", ""]
        lines += PAIRED_HEADER
        for v in study.variants:
            if v is not base:
                lines += paired_rows(v, base)
    elif study.baseline:
        lines += ["", f"Baseline `{study.baseline}` has no runs here: no paired differences."]
    pairs = [(study.variant(a), study.variant(b)) for a, b in study.compare]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if pairs:
        lines += ["", "## Comparisons the study names", "", "As above, for the pairs in the study's `compare`.", ""]
        lines += PAIRED_HEADER
        for a, b in pairs:
            lines += paired_rows(a, b)

    if figures:
        lines += ["", "## Figures", ""]
        for name, (path, caption) in figures.items():
            lines += [f"![{name}]({path.name})", "", caption, ""]
    lines += ["", "## How the numbers are computed", "",
              "- Each run's figures come from its `summary.json` (final validation) and `metrics.jsonl` (rows of kind "
              "`val`, for the learning curves).",
              "- 95% intervals use the t quantile t(0.975, n − 1) and p-values the t distribution, both computed "
              "in `hvcodistill/studies/stats.py` from the regularised incomplete beta function (scipy is not "
              "needed; they match scipy.stats.t to 1e-10). With 1 seed there is no sd or interval.",
              "- Seeds pair runs: seed s of every variant starts model i from seed s + i and reads the same "
              "sample order, so paired differences remove the seed-to-seed spread that the variants share.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvcodistill.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dir", help="the study directory (the sweep's --dir, default runs/studies/<name>)")
    p.add_argument("--baseline", help="the variant to pair against (default: the study's baseline)")
    p.add_argument("--out", help="where report.md and the PNGs go (default: the study directory)")
    args = p.parse_args(argv)
    study_dir = Path(args.study_dir)
    if not study_dir.is_dir():
        print(f"hvcodistill.report: error: study directory {study_dir} not found", file=sys.stderr)
        return 2
    study = load_study_dir(study_dir.resolve(), args.baseline)
    if not study.variants:
        print(f"hvcodistill.report: error: {study_dir} holds no study.json and no <variant>/seed_<s>/ runs",
              file=sys.stderr)
        return 2
    if study.baseline and study.variant(study.baseline) is None:
        print(f"hvcodistill.report: error: baseline {study.baseline!r} is not a variant of this study "
              f"({', '.join(v.name for v in study.variants)})", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else study_dir
    out.mkdir(parents=True, exist_ok=True)
    from hvcodistill.studies.figures import draw_all

    figures = draw_all(study, out)
    path = write_markdown(study, figures, out)
    done = sum(r.status == "done" for r in study.runs)
    print(f"hvcodistill.report: {done} of {len(study.runs)} runs finished; wrote {path}"
          + "".join(f", {f.name}" for f, _ in figures.values()))
    for v in study.variants:
        s, e = v.stat("model_acc"), v.stat("ensemble_acc")
        if s.n:
            print(f"  {v.name:<28} model {s.mean * 100:6.2f}%  ensemble {e.mean * 100:6.2f}%  ({s.n} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
