"""Uncertainty over seeds: Student's t quantile, the mean with its 95 % t-interval, and the paired difference of two
methods run on the same seeds.

The t quantile inverts the CDF F(t; nu) = 1 - I_x(nu / 2, 1 / 2) / 2 for t >= 0, x = nu / (nu + t^2), with I the
regularised incomplete beta function (Abramowitz & Stegun 26.7.1 and 26.5.27), evaluated by its continued fraction
(Numerical Recipes, 3rd ed., Sec. 6.4, modified Lentz); scipy is not a dependency.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast below this point: use the symmetry
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    tail = 0.5 * _incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = ``p`` for Student's t with ``dof`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, dof) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


class Interval(NamedTuple):
    """A mean over ``n`` values with the half-width of its two-sided t-interval (None for n < 2)."""

    mean: float
    half_width: float | None
    n: int


def mean_interval(values: list[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and the half-width t_{(1+level)/2, n-1} s / sqrt(n) of its ``level`` t-interval, with s
    the sample standard deviation (n - 1): the interval of the mean of n independent seeds."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, n)
    return Interval(mean, t_quantile((1.0 + level) / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n), n)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Interval | None:
    """The mean of a[seed] - b[seed] over the seeds both have, with its t-interval (the runs paired by seed: the same
    data order, initialisation and held-out set); None when they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_interval([a[s] - b[s] for s in seeds], level)
