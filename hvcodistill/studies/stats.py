"""The statistics of a study report: mean, sd, Student-t intervals and paired t tests (the t
distribution from scipy.stats)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from scipy import stats

NAN = float("nan")


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    return float(stats.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (e.g. p = 0.975 for a two-sided 95% interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Summary:
    """Values over seeds: n, mean, sample sd (n - 1), and the 95% interval of the mean
    (mean +- t_{0.975, n-1} sd / sqrt(n)); sd and interval are nan for n < 2."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float


def describe(values: Sequence[float], *, level: float = 0.95) -> Summary:
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return Summary(0, NAN, NAN, NAN, NAN)
    mean = sum(xs) / n
    if n < 2:
        return Summary(1, mean, NAN, NAN, NAN)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """Differences a - b over the seeds both have: their Summary, the paired t statistic
    t = mean / (sd / sqrt(n)) with n - 1 degrees of freedom, and its two-sided p-value."""

    diff: Summary
    t: float
    p: float
    seeds: tuple

    @property
    def n(self) -> int:
        return self.diff.n


def paired(a: Mapping[int, float], b: Mapping[int, float], *, level: float = 0.95) -> Paired:
    seeds = tuple(sorted(s for s in a if s in b and a[s] is not None and b[s] is not None))
    diff = describe([a[s] - b[s] for s in seeds], level=level)
    if diff.n < 2:
        return Paired(diff, NAN, NAN, seeds)
    if diff.sd == 0.0:
        t = 0.0 if diff.mean == 0.0 else math.copysign(math.inf, diff.mean)
    else:
        t = diff.mean / (diff.sd / math.sqrt(diff.n))
    p = 2.0 * float(stats.t.sf(abs(t), diff.n - 1))
    return Paired(diff, t, p, seeds)
