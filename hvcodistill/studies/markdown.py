"""report.md of a study: accuracy per variant, communication and time, paired differences
against the baseline and the study's own comparisons, the figures, and how the numbers are
computed. Takes the StudyResult of studies/results.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

from hvcodistill.studies.results import METRICS, StudyResult, VariantResult
from hvcodistill.studies.stats import Paired, Summary, paired

PAIRED_HEADER = [
    "| difference | metric | seeds | mean | sd | 95% interval | paired t | p (two-sided) |",
    "|---|---|---|---|---|---|---|---|",
]


# ----------------------------------------------------------------------------- formatting
def fmt_stat(s: Summary, *, scale: float = 1.0, digits: int = 2) -> str:
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{s.mean * scale:.{digits}f} (1 seed)"
    return (
        f"{s.mean * scale:.{digits}f} ± {s.sd * scale:.{digits}f} "
        f"[{s.lo * scale:.{digits - 1}f}, {s.hi * scale:.{digits - 1}f}]"
    )


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


def shown_path(path) -> str:
    """`path` relative to the working directory when it lies below it (a report committed with
    the code then names `runs/studies/...`, not one machine's absolute path), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- rows
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
    """a - b per seed, for every metric; disagreement only where both sides have several
    models."""
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
        rows.append(
            f"| {a.name} − {b.name} | {metric.name}{unit} | {pr.n} | {d.mean * k:+.{f}f} | {sd} | "
            f"{interval} | {fmt_number(pr.t)} | {fmt_p(pr.p)} |"
        )
    return rows


def status_lines(study: StudyResult) -> list[str]:
    """How many runs finished, and for the others why not: one line per run with something to
    say (failed, interrupted, ...), one per variant for the seeds not started."""
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
                seeds = "seeds" if len(idle) > 1 else "seed"
                lines.append(f"- `{v.name}`: {seeds} {', '.join(map(str, idle))} not started")
            for r in v.runs:
                if r.status not in ("done", "not started"):
                    note = f" ({r.note})" if r.note else ""
                    lines.append(f"- `{r.variant}/seed_{r.seed}`: {r.status}{note}")
    return lines


# ----------------------------------------------------------------------------- sections
def intro(study: StudyResult) -> list[str]:
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    done = [r for r in study.runs if r.status == "done"]
    total_s = sum(r.metrics.get("wall_s") or 0 for r in done)
    swept = [r.metrics["sweep_s"] for r in done if r.metrics.get("sweep_s") is not None]
    timing = (
        f"The finished runs trained for {total_s / 60:.1f} min in all "
        f"({total_s / max(1, len(done)):.1f} s per run, summary.json `wall_seconds`)"
    )
    if swept:
        timing += (
            f"; the sweep spent {sum(swept) / 60:.1f} min on {len(swept)} of them "
            f"({sum(swept) / len(swept):.1f} s per run, starting the ranks included)"
        )
    source = shown_path(study.source) if study.source else "(none)"
    where = shown_path(study.dir)
    lines += [
        f"Study file `{source}`; seeds {', '.join(map(str, study.seeds))}; "
        f"directory `{where}`. Written {time.strftime('%Y-%m-%d %H:%M')} by "
        f"`python -m hvcodistill.report {where}`. {timing}.",
        "",
    ]
    return lines + status_lines(study) + [""]


def accuracy_table(study: StudyResult) -> list[str]:
    names = " | ".join(m.name + (" (%)" if m.scale == 100 else "") for m in METRICS.values())
    lines = [
        "## Accuracy per variant",
        "",
        "Mean ± sd over seeds, [95% interval of the mean, Student t with n − 1 degrees of "
        "freedom]. Model accuracy is the mean of the run's M models; the ensemble averages their "
        "probabilities; disagreement is the fraction of validation samples on which the models' "
        "top-1 differ; val loss is the models' mean cross-entropy on the validation set.",
        "",
        f"| variant | M x G | mode | k | seeds | {names} |",
        "|---|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for v in study.variants:
        mg, mode, k = layout(v)
        cells = [
            fmt_stat(v.stat(key), scale=m.scale, digits=m.digits) for key, m in METRICS.items()
        ]
        lines.append(
            f"| {v.name} | {mg} | {mode} | {k} | {len(v.done)}/{len(v.runs)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def communication_table(study: StudyResult) -> list[str]:
    lines = [
        "",
        "## Communication and time",
        "",
        "Bytes per training step sent by all ranks together (summary.json `bytes_per_step`): the "
        "peer exchange alone, then every collective (gradient all-reduce, exchange, evaluation, "
        "checkpoint) and the part of it that crossed nodes; `exchanged_bytes` / steps is the older "
        "count (bytes received from peers; in weights mode the first also counts the allgather "
        "inside a group that spreads a refresh over its ranks). Step time is the training loop's "
        "time per step (timing.step_s), mean over ranks. Means over seeds.",
        "",
        "| variant | exchange / step | exchanged_bytes / steps | all collectives / step "
        "| inter-node / step | step time (ms) | run time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in study.variants:
        sent = [fmt_bytes(_mean(v, key)) for key in ("exchange_bps", "exchanged_bps", "all_bps")]
        step_ms, wall = v.stat("step_ms"), v.stat("wall_s")
        step = fmt_number(step_ms.mean, 2) if step_ms.n else "–"
        run = fmt_number(wall.mean, 1) if wall.n else "–"
        inter = fmt_bytes(_mean(v, "inter_bps"))
        lines.append(f"| {v.name} | {' | '.join(sent)} | {inter} | {step} | {run} |")
    return lines


def _mean(v: VariantResult, key: str) -> Optional[float]:
    stat = v.stat(key)
    return stat.mean if stat.n else None


def paired_sections(study: StudyResult) -> list[str]:
    lines = []
    base = study.variant(study.baseline) if study.baseline else None
    if base is not None:
        lines += [
            "",
            f"## Paired differences against the baseline `{base.name}`",
            "",
            "Per seed, variant minus baseline (the same seed on both sides; accuracies in "
            "percentage points); mean and sd of those differences, the 95% interval of their "
            "mean, the paired t statistic t = mean / (sd / √n) and its two-sided p-value "
            "(n − 1 degrees of freedom).",
            "",
        ]
        lines += PAIRED_HEADER
        for v in study.variants:
            if v is not base:
                lines += paired_rows(v, base)
    elif study.baseline:
        lines += ["", f"Baseline `{study.baseline}` has no runs here: no paired differences."]
    pairs = [(study.variant(a), study.variant(b)) for a, b in study.compare]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if pairs:
        lines += [
            "",
            "## Comparisons the study names",
            "",
            "As above, for the pairs in the study's `compare`.",
            "",
        ]
        lines += PAIRED_HEADER
        for a, b in pairs:
            lines += paired_rows(a, b)
    return lines


def figure_section(figures: dict) -> list[str]:
    if not figures:
        return []
    lines = ["", "## Figures", ""]
    for name, (path, caption) in figures.items():
        lines += [f"![{name}]({path.name})", "", caption, ""]
    return lines


METHOD = [
    "",
    "## How the numbers are computed",
    "",
    "- Each run's figures come from its `summary.json` (final validation) and `metrics.jsonl` "
    "(rows of kind `val`, for the learning curves).",
    "- 95% intervals use the t quantile t(0.975, n − 1) and p-values the t distribution, both "
    "from scipy.stats.t. With 1 seed there is no sd or interval.",
    "- Seeds pair runs: seed s of every variant starts model i from seed s + i and reads the same "
    "sample order, so paired differences remove the seed-to-seed spread that the variants share.",
    "",
]


def write_markdown(study: StudyResult, figures: dict, out: Path) -> Path:
    """report.md in `out`; `figures`: {name: (PNG path, caption)}."""
    lines = intro(study) + accuracy_table(study) + communication_table(study)
    lines += paired_sections(study) + figure_section(figures) + METHOD
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
