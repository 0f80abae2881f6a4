"""Intervals behind the verdicts, checked against scipy's own t-test and confidence intervals."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from weightspace.report.stats import Interval, difference, judge, t_interval, wilson


def test_t_interval_matches_scipy():
    xs = [0.031, 0.052, 0.047, 0.018]
    iv = t_interval(xs)
    lo, hi = st.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=st.sem(xs))
    assert (iv.low, iv.high) == pytest.approx((lo, hi)) and iv.n == 4
    assert math.isnan(t_interval([0.5]).half) and t_interval([]).n == 0
    assert t_interval([1.0, None, float("nan"), 3.0]).n == 2


def test_differences_paired_and_welch_match_scipy():
    a, b = [0.91, 0.93, 0.90, 0.95], [0.85, 0.90, 0.86, 0.88]
    paired = difference(a, b, paired=True)
    res = st.ttest_rel(a, b).confidence_interval(0.95)
    assert (paired.low, paired.high) == pytest.approx((res.low, res.high))
    welch = difference(a, b)
    res = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (welch.low, welch.high) == pytest.approx((res.low, res.high))
    with pytest.raises(ValueError, match="paired"):
        difference(a, b[:2], paired=True)


def test_wilson_matches_scipy_binomtest():
    for k, n in [(0, 20), (17, 20), (912, 1000), (1000, 1000)]:
        ci = st.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high))


def test_judge_needs_the_whole_interval_beyond_the_threshold():
    assert judge(Interval(0.05, 0.03, 0.07, 3), 0.02, "above") == "reproduced"
    assert judge(Interval(0.05, 0.01, 0.09, 3), 0.02, "above") == "inconclusive"
    assert judge(Interval(0.00, -0.02, 0.02, 3), 0.02, "above") == "not reproduced"
    assert judge(Interval(-0.05, -0.07, -0.03, 3), 0.0, "below") == "reproduced"
    assert judge(Interval(0.05, math.nan, math.nan, 1), 0.0, "above") == "inconclusive"
    with pytest.raises(ValueError):
        judge(Interval(0, 0, 0, 2), 0.0, "sideways")


def test_paired_accuracy_uses_only_the_discordant_examples():
    from weightspace.report.stats import paired_accuracy
    # 1,000 examples: a right on 30 that b misses, b right on 10 that a misses, the rest shared
    a = [True] * 30 + [False] * 10 + [True] * 800 + [False] * 160
    b = [False] * 30 + [True] * 10 + [True] * 800 + [False] * 160
    r = paired_accuracy(a, b)
    assert (r["a_only"], r["b_only"], r["difference"]) == (30, 10, pytest.approx(0.02))
    assert r["p_value"] == pytest.approx(st.binomtest(10, 40, 0.5).pvalue)  # McNemar's exact test
    assert r["low"] > 0 and r["verdict"] == "a better"
    # the negative control: as many discordant examples each way — no difference, whatever the accuracies' overlap
    r = paired_accuracy(a[20:], b[20:])
    assert r["verdict"] == "no difference shown" and r["p_value"] == pytest.approx(1.0)
    # the per-model Wilson intervals of the first case overlap, though the paired difference is clear
    ka, kb = sum(a), sum(b)
    assert wilson(ka, 1000)[0] < wilson(kb, 1000)[1]
    with pytest.raises(ValueError):
        paired_accuracy([True], [True, False])
