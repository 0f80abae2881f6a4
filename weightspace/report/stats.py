"""Intervals behind every verdict: Student-t intervals over seeds, a delete-one-unit jackknife for quantities
measured on pairs of models (pairs that share a model are not independent), a floor for the test set's own
sampling noise, Wilson intervals for accuracies, and the rule that turns an interval of a difference into a verdict.

Pure arithmetic on Python floats (scipy only for the t quantile), so any layer may use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Interval", "t_interval", "difference", "pairwise_interval", "with_test_noise", "wilson", "paired_accuracy",
           "judge", "fmt_interval"]


@dataclass(frozen=True)
class Interval:
    """mean ± half-width at ``level`` over ``n`` values (half is nan for n < 2: no spread can be estimated)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95
    # how the interval was drawn: "t" over independent values, "jackknife-t" over the models that pairs share;
    # "+test" when the test set's sampling noise is added
    method: str = "t"

    @property
    def half(self) -> float:
        """Half the interval's width."""
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level,
                "method": self.method}

    def __str__(self) -> str:
        return fmt_interval(self)


def _clean(xs: Sequence[float | None]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def t_interval(xs: Sequence[float | None], level: float = 0.95) -> Interval:
    """Mean of ``xs`` with a two-sided Student-t interval (non-finite values and None are left out).

    With one value the interval is that value with nan bounds; with none, everything is nan.
    """
    from scipy.stats import t
    v = _clean(xs)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    m = sum(v) / n
    if n == 1:
        return Interval(m, math.nan, math.nan, 1, level)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    h = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(m, m - h, m + h, n, level)


def difference(a: Sequence[float | None], b: Sequence[float | None], *, paired: bool = False,
               level: float = 0.95) -> Interval:
    """Interval of mean(a) − mean(b): paired (t on the differences a_i − b_i, same seeds) or Welch's t.

    Raises ValueError when ``paired`` and the two lists differ in length.
    """
    from scipy.stats import t
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired difference: {len(a)} vs {len(b)} values")
        return t_interval([None if x is None or y is None else x - y for x, y in zip(a, b)], level)
    va, vb = _clean(a), _clean(b)
    if not va or not vb:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    ia, ib = t_interval(va, level), t_interval(vb, level)
    m = ia.mean - ib.mean
    if len(va) < 2 or len(vb) < 2:
        return Interval(m, math.nan, math.nan, min(len(va), len(vb)), level)
    sa = sum((x - ia.mean) ** 2 for x in va) / (len(va) - 1) / len(va)
    sb = sum((x - ib.mean) ** 2 for x in vb) / (len(vb) - 1) / len(vb)
    se = math.sqrt(sa + sb)
    if se == 0:
        return Interval(m, m, m, min(len(va), len(vb)), level)
    # Welch–Satterthwaite degrees of freedom
    df = (sa + sb) ** 2 / ((sa ** 2 / (len(va) - 1) if sa else 0.0) + (sb ** 2 / (len(vb) - 1) if sb else 0.0))
    h = float(t.ppf(0.5 + level / 2, df)) * se
    return Interval(m, m - h, m + h, min(len(va), len(vb)), level)


def pairwise_interval(values: Sequence[float | None], units: Sequence[Sequence[object]],
                      level: float = 0.95) -> Interval:
    """Mean of ``values`` where observation i depends on the units ``units[i]`` (the two models of a pair), with a
    delete-one-unit jackknife t-interval on (units − 1) degrees of freedom.

    Pairs drawn from m models share models, so a t-interval over the pairs is too narrow (it covers 63–89% at
    nominal 95% in tests/test_verdict_rules.py). Leaving out one model at a time (and every pair that touches it)
    estimates the variance with the model as the unit of replication: exact when the model effects dominate, and
    conservative (Efron–Stein) when each pair adds its own noise. When every observation has a unit of its own the
    interval equals :func:`t_interval`. None and non-finite values are left out; fewer than two units, or a unit
    whose removal leaves nothing, give nan bounds.

    Raises ValueError when ``values`` and ``units`` differ in length.
    """
    from scipy.stats import t
    if len(values) != len(units):
        raise ValueError(f"pairwise interval: {len(values)} values vs {len(units)} unit lists")
    obs = [(float(v), frozenset(u)) for v, u in zip(values, units) if v is not None and math.isfinite(float(v))]
    every = sorted({u for _, us in obs for u in us}, key=repr)
    m = len(every)
    if not obs:
        return Interval(math.nan, math.nan, math.nan, 0, level, "jackknife-t")
    mu = sum(v for v, _ in obs) / len(obs)
    loo = []
    for u in every:
        rest = [v for v, us in obs if u not in us]
        if not rest:
            return Interval(mu, math.nan, math.nan, m, level, "jackknife-t")
        loo.append(sum(rest) / len(rest))
    if m < 2:
        return Interval(mu, math.nan, math.nan, m, level, "jackknife-t")
    centre = sum(loo) / m
    se = math.sqrt((m - 1) / m * sum((x - centre) ** 2 for x in loo))
    h = float(t.ppf(0.5 + level / 2, m - 1)) * se
    return Interval(mu, mu - h, mu + h, m, level, "jackknife-t")


def with_test_noise(iv: Interval, n_test: int) -> Interval:
    """``iv`` widened by the sampling noise of the test set its values were measured on (``n_test`` examples).

    Every seed is scored on the same test set, so that set's noise does not average out over seeds and a t-interval
    cannot see it: identical seeds (quantised accuracies) give 0 ± 0. The value is a difference of error rates;
    at least |mean|·n_test examples changed outcome, so the Wilson half-width of |mean| as a proportion of n_test
    is a floor on its sampling noise, added in quadrature to the seeds' half-widths (0 becomes 0 ± z²/(n+z²)).
    An interval without a spread over seeds (n < 2) is returned unchanged.
    """
    if n_test <= 0 or iv.n < 2 or not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        return iv
    d = min(1.0, abs(iv.mean))
    lo, hi = wilson(d * n_test, n_test, iv.level)
    w = max(d - lo, hi - d)
    low = iv.mean - math.hypot(iv.mean - iv.low, w)
    high = iv.mean + math.hypot(iv.high - iv.mean, w)
    return Interval(iv.mean, low, high, iv.n, iv.level, iv.method + "+test")


def wilson(correct: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n`` (e.g. an accuracy over n examples)."""
    from scipy.stats import norm
    if n <= 0:
        return (math.nan, math.nan)
    z = float(norm.ppf(0.5 + level / 2))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_accuracy(a: Sequence[bool], b: Sequence[bool], level: float = 0.95) -> dict:
    """Accuracy of ``a`` minus accuracy of ``b``, scored on the same examples (``a[i]``: whether model a got
    example i right): the difference, its paired interval (Agresti–Min: Wald on the 2×2 table with ½ added to each
    cell) and McNemar's exact test on the discordant examples. Two overlapping per-model Wilson intervals say nothing
    about this difference; the examples both get right or both get wrong carry no information about it.

    Returns {"n", "a_only", "b_only", "difference", "low", "high", "p_value", "verdict"} where the verdict is
    "a better", "b better" (the interval excludes 0) or "no difference shown". Raises ValueError for lists of
    different lengths or no examples.
    """
    from scipy.stats import binomtest, norm
    if len(a) != len(b) or not a:
        raise ValueError(f"paired accuracy: {len(a)} vs {len(b)} examples")
    n = len(a)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n_adj, p12, p21 = n + 2, (a_only + 0.5), (b_only + 0.5)
    d_adj = (p12 - p21) / n_adj
    se = math.sqrt(max(0.0, (p12 + p21) / n_adj - d_adj ** 2) / n_adj)
    z = float(norm.ppf(0.5 + level / 2))
    low, high = max(-1.0, d_adj - z * se), min(1.0, d_adj + z * se)
    disc = a_only + b_only
    p = float(binomtest(min(a_only, b_only), disc, 0.5).pvalue) if disc else 1.0
    verdict = "a better" if low > 0 else ("b better" if high < 0 else "no difference shown")
    return {"n": n, "a_only": a_only, "b_only": b_only, "difference": (a_only - b_only) / n, "low": low,
            "high": high, "level": level, "p_value": p, "verdict": verdict}


def judge(interval: Interval, threshold: float, direction: str) -> str:
    """A verdict from the interval of a difference and the finding's threshold.

    ``direction`` "above": reproduced when the whole interval lies above ``threshold``; "not reproduced" when it
    lies entirely at or below it; otherwise "inconclusive" (the interval straddles the threshold, or it could not
    be estimated). "below" mirrors it. Raises ValueError for another direction.
    """
    if direction not in ("above", "below"):
        raise ValueError(f"direction {direction!r}: expected 'above' or 'below'")
    lo, hi = interval.low, interval.high
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if direction == "above":
        return "reproduced" if lo > threshold else ("not reproduced" if hi <= threshold else "inconclusive")
    return "reproduced" if hi < threshold else ("not reproduced" if lo >= threshold else "inconclusive")


def fmt_interval(iv: Interval, digits: int = 4) -> str:
    """'0.0123 ± 0.0045 (95% t, n=3)', or '0.0123 (n=1, no interval)'."""
    if iv.n == 0 or not math.isfinite(iv.mean):
        return "n/a"
    if not math.isfinite(iv.half):
        return f"{iv.mean:.{digits}f} (n={iv.n}, no interval)"
    unit = {"t": "", "t+test": ""}.get(iv.method, " models")
    return f"{iv.mean:.{digits}f} ± {iv.half:.{digits}f} ({round(iv.level * 100)}% {iv.method}, n={iv.n}{unit})"
