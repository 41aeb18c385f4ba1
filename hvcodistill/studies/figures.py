"""The figures of a study report (matplotlib, headless Agg): one function per figure, each taking
the report's StudyResult and writing one PNG. A variant keeps its colour in every figure."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 120


def colours(study) -> dict:
    cmap = plt.get_cmap("tab10" if len(study.variants) <= 10 else "tab20")
    return {v.name: cmap(i % cmap.N) for i, v in enumerate(study.variants)}


def _finish(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _interval(stat) -> tuple[float, float]:
    """Error-bar half-widths (below, above) of a Summary's 95% interval; 0 without one."""
    if stat.n < 2:
        return 0.0, 0.0
    return stat.mean - stat.lo, stat.hi - stat.mean


def accuracy_per_variant(study, path: Path) -> Path:
    """Every seed as a point (the mean of the run's models; the ensemble hollow beside it), the mean
    with its 95% interval as a bar."""
    variants = [v for v in study.variants if v.done]
    colour = colours(study)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(variants)), 4.5))
    for x, v in enumerate(variants):
        c = colour[v.name]
        for key, dx, marker, fill in (
            ("model_acc", -0.12, "o", c),
            ("ensemble_acc", 0.12, "D", "none"),
        ):
            values = v.values(key)
            seeds = sorted(values)
            jitter = [dx + 0.05 * ((i % 3) - 1) for i in range(len(seeds))]
            ax.scatter(
                [x + j for j in jitter],
                [values[s] * 100 for s in seeds],
                s=22,
                marker=marker,
                facecolors=fill,
                edgecolors=c,
                linewidths=1.1,
                zorder=3,
            )
            stat = v.stat(key)
            if stat.n:
                lo, hi = _interval(stat)
                ax.errorbar(
                    [x + dx * 2.2],
                    [stat.mean * 100],
                    yerr=[[lo * 100], [hi * 100]],
                    fmt="_",
                    color="black" if key == "model_acc" else "grey",
                    markersize=12,
                    capsize=3,
                    zorder=4,
                )
    ax.set_xticks(range(len(variants)), [v.name for v in variants], rotation=25, ha="right")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{study.name}: accuracy per variant")
    handles = [
        plt.Line2D(
            [],
            [],
            marker="o",
            ls="",
            color="grey",
            label="model (mean of the run's models), one per seed",
        ),
        plt.Line2D(
            [], [], marker="D", ls="", mfc="none", color="grey", label="ensemble, one per seed"
        ),
        plt.Line2D(
            [], [], marker="_", ls="", color="black", markersize=12, label="mean, 95% interval"
        ),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path)


def _log_positions(values: list[float]) -> tuple[list[float], float | None]:
    """Zero bytes cannot sit on a log axis: they go one decade left of the smallest positive
    value."""
    positive = [v for v in values if v > 0]
    if not positive:
        return values, None
    zero_at = min(positive) / 10
    return [v if v > 0 else zero_at for v in values], zero_at


def _dodge(xs: list[float]) -> list[float]:
    """Points at (nearly) the same x on a log axis spread a little sideways, so each stays visible:
    by a step of 1.2% of the axis' span in decades, so that on an axis spanning a fraction of a
    decade equal values do not look like different byte counts."""
    logs = [math.log10(x) for x in xs]
    span = max(max(logs) - min(logs), 0.3)
    step, out = 0.012 * span, list(xs)
    order = sorted(range(len(xs)), key=lambda i: logs[i])
    groups, current = [], [order[0]] if order else []
    for i in order[1:]:
        if logs[i] - logs[current[-1]] < step:
            current.append(i)
        else:
            groups.append(current)
            current = [i]
    groups.append(current)
    for members in (g for g in groups if g):
        centre = sum(logs[i] for i in members) / len(members)
        for j, i in enumerate(members):
            out[i] = 10 ** (centre + step * (j - (len(members) - 1) / 2))
    return out


def tradeoff(study, path: Path) -> Path:
    """Accuracy against bytes per step: the peer exchange alone, and every collective."""
    variants = [v for v in study.variants if v.done]
    colour = colours(study)
    panels = (
        ("exchange_bps", "peer exchange: bytes per step, all ranks (log)"),
        ("all_bps", "every collective (all-reduce, exchange, evaluation): bytes per step (log)"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        rows = [
            (v, v.stat(key), v.stat("model_acc"))
            for v in variants
            if v.stat(key).n and v.stat("model_acc").n
        ]
        xs, zero_at = _log_positions([b.mean for _, b, _ in rows])
        if zero_at is not None:
            xs = _dodge(xs)
        for (v, _, acc), x in zip(rows, xs):
            lo, hi = _interval(acc)
            ax.errorbar(
                [x],
                [acc.mean * 100],
                yerr=[[lo * 100], [hi * 100]],
                fmt="o",
                color=colour[v.name],
                capsize=3,
                markersize=6,
                label=v.name,
            )
        if zero_at is not None:
            ax.set_xscale("log")
            if any(b.mean == 0 for _, b, _ in rows):
                ax.set_xlim(zero_at / 3, max(xs) * 3)
                ax.axvline(zero_at * 2, color="grey", lw=0.8, ls=":")
                ax.text(
                    zero_at,
                    0.98,
                    "0 B",
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="top",
                    fontsize=8,
                    color="grey",
                )
            else:
                ax.set_xlim(min(xs) / 2, max(xs) * 2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("model validation accuracy (%), mean and 95% interval")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="variant", title_fontsize=8)
    fig.suptitle(f"{study.name}: accuracy against communication")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def learning_curves(study, path: Path) -> Path | None:
    """Validation accuracy over training, mean over seeds with a band from the lowest to the
    highest seed: the whole run, and its second half enlarged (where the variants part)."""
    colour = colours(study)
    lines = []
    for v in study.variants:
        curves = [r.curve for r in v.done if r.curve]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            per_step = [[c[s]["model_acc"] * 100 for c in curves] for s in steps]
            lines.append((v.name, len(curves), steps, per_step))
    if not lines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    last = max(steps[-1] for _, _, steps, _ in lines)
    for ax, start in zip(axes, (0, last / 2)):
        for name, n, steps, per_step in lines:
            keep = [i for i, s in enumerate(steps) if s >= start]
            xs = [steps[i] for i in keep]
            ax.plot(
                xs,
                [sum(per_step[i]) / n for i in keep],
                color=colour[name],
                lw=1.5,
                label=f"{name} ({n})",
            )
            if n > 1:
                ax.fill_between(
                    xs,
                    [min(per_step[i]) for i in keep],
                    [max(per_step[i]) for i in keep],
                    color=colour[name],
                    alpha=0.15,
                    lw=0,
                )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("model validation accuracy (%)")
    axes[0].set_title("the whole run")
    axes[1].set_title("second half, enlarged")
    axes[1].legend(fontsize=8, title="variant (seeds)", title_fontsize=8)
    fig.suptitle(
        f"{study.name}: validation accuracy, mean over seeds (band: lowest to highest seed)"
    )
    return _finish(fig, path)


def every_axis(study) -> dict:
    """base variant -> [(k, VariantResult)] for the grid variants that vary codistill.every."""
    out: dict = {}
    for v in study.variants:
        k = v.axes.get("codistill.every")
        if k is not None and v.done:
            out.setdefault(v.base, []).append((k, v))
    return {
        base: sorted(points, key=lambda p: p[0]) for base, points in out.items() if len(points) > 1
    }


def accuracy_vs_every(study, path: Path) -> Path | None:
    """Accuracy against the exchange interval k, per base variant, with the baseline's mean."""
    axes_by_base = every_axis(study)
    if not axes_by_base:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (base, points) in enumerate(axes_by_base.items()):
        ks = [k for k, _ in points]
        for key, style, label in (
            ("model_acc", "-o", "model"),
            ("ensemble_acc", "--D", "ensemble"),
        ):
            stats = [v.stat(key) for _, v in points]
            lo = [_interval(s)[0] * 100 for s in stats]
            hi = [_interval(s)[1] * 100 for s in stats]
            ax.errorbar(
                ks,
                [s.mean * 100 for s in stats],
                yerr=[lo, hi],
                fmt=style,
                color=cmap(i),
                capsize=3,
                mfc="none" if key == "ensemble_acc" else cmap(i),
                label=f"{base}: {label}",
            )
    base = study.variant(study.baseline) if study.baseline else None
    if base is not None and base.stat("model_acc").n:
        ax.axhline(
            base.stat("model_acc").mean * 100,
            color="black",
            ls=":",
            lw=1,
            label=f"{base.name} (baseline)",
        )
    ax.set_xscale("log")
    ks = sorted({k for points in axes_by_base.values() for k, _ in points})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k: steps between exchanges (codistill.every, log)")
    ax.set_ylabel("validation accuracy (%), mean and 95% interval")
    ax.set_title(f"{study.name}: accuracy against the exchange interval")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, path)


def draw_all(study, out: Path) -> dict:
    """name -> (path, caption) of every figure there is data for."""
    figures = {}
    if not any(v.done for v in study.variants):
        return figures
    figures["accuracy"] = (
        accuracy_per_variant(study, out / "accuracy.png"),
        "Validation accuracy per variant: each seed's run as a point (filled: the mean of its "
        "models; hollow: their ensemble), the mean with its 95% interval as a bar.",
    )
    figures["tradeoff"] = (
        tradeoff(study, out / "tradeoff.png"),
        "Accuracy against bytes per training step: left the peer exchange alone (variants that "
        "exchange nothing sit at the 0 B mark), right every collective, the gradient all-reduce "
        "included. Variants at the same value are spread a little sideways.",
    )
    curves = learning_curves(study, out / "curves.png")
    if curves:
        figures["curves"] = (
            curves,
            "Validation accuracy during training, mean over seeds, the band from the "
            "lowest to the highest seed.",
        )
    every = accuracy_vs_every(study, out / "accuracy_vs_every.png")
    if every:
        figures["accuracy_vs_every"] = (
            every,
            "Accuracy against the exchange interval k (the study's "
            "`codistill.every` axis), with the baseline's mean dotted.",
        )
    return figures
