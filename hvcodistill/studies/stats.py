"""The statistics of a study report: mean, sd, Student-t intervals and paired t tests.

scipy is not a dependency, so the t distribution is computed here: its CDF from the regularised
incomplete beta function (continued fraction, Lentz's method, as in Numerical Recipes 6.4), its
quantile by bisection on the CDF. Both agree with scipy.stats.t to ~1e-10 (tests/test_report.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

NAN = float("nan")


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (e.g. p = 0.975 for a two-sided 95% interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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
    p = 2.0 * (1.0 - t_cdf(abs(t), diff.n - 1))
    return Paired(diff, t, p, seeds)
