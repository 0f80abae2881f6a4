"""Saturation fit: known (k, α, e_∞) recovered, the hull against scipy's ConvexHull, the CSV verb end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from weightspace.analysis.saturation import diminishing_returns, fit_saturation, saturation_curve, upper_hull
from weightspace.errors import ConfigError

TRUE = {"k": 0.8, "alpha": 1.6, "e_inf": 0.12}


def synthetic(rng: np.random.Generator, n_curve: int = 12, n_below: int = 30, noise: float = 0.0):
    """Points on the true curve (the frontier) plus points strictly below it (worse downstream at equal upstream)."""
    e_us = np.linspace(0.05, 0.6, n_curve)
    e_ds = saturation_curve(e_us, TRUE["k"], TRUE["alpha"], TRUE["e_inf"]) + noise * rng.standard_normal(n_curve)
    us, ds = list(1 - e_us), list(1 - e_ds)
    for u in rng.uniform(0.4, 0.95, n_below):
        us.append(u)
        ds.append(1 - saturation_curve(1 - u, **TRUE) - rng.uniform(0.01, 0.2))
    return us, ds


def close(fit, rel: float = 0.05) -> bool:
    return all(abs(getattr(fit, k) - v) <= rel * v for k, v in TRUE.items())


def test_fit_on_the_hull_recovers_known_parameters():
    us, ds = synthetic(np.random.default_rng(0))
    fit = fit_saturation(us, ds)
    assert sorted(fit.used) == list(range(12))  # exactly the frontier points, none of the dominated ones
    assert close(fit), (fit.k, fit.alpha, fit.e_inf)
    assert fit.predicted_downstream_at_saturation == pytest.approx(1 - fit.e_inf)
    assert float(fit.predict(1.0)) == pytest.approx(1 - fit.e_inf)


def test_fit_on_all_points_with_noise_recovers_known_parameters():
    rng = np.random.default_rng(1)
    us, ds = synthetic(rng, n_curve=60, n_below=0, noise=0.001)
    fit = fit_saturation(us, ds, points="all")
    assert len(fit.used) == 60 and close(fit), (fit.k, fit.alpha, fit.e_inf)


def test_upper_hull_matches_scipy_convex_hull():
    from scipy.spatial import ConvexHull
    rng = np.random.default_rng(2)
    for _ in range(5):
        pts = rng.uniform(0, 1, (40, 2))
        ours = upper_hull(pts[:, 0].tolist(), pts[:, 1].tolist(), rising=False)
        verts = set(ConvexHull(pts).vertices.tolist())
        left, right = int(np.argmin(pts[:, 0])), int(np.argmax(pts[:, 0]))
        # scipy's vertices above the chord from the leftmost to the rightmost point, plus those two ends
        slope = (pts[right, 1] - pts[left, 1]) / (pts[right, 0] - pts[left, 0])
        upper = {i for i in verts if pts[i, 1] > pts[left, 1] + slope * (pts[i, 0] - pts[left, 0])} | {left, right}
        assert set(ours) == upper and ours == sorted(ours, key=lambda i: pts[i, 0])
        rising = upper_hull(pts[:, 0].tolist(), pts[:, 1].tolist())
        assert pts[rising[-1], 1] == pts[:, 1].max() and rising == ours[: len(rising)]


def test_too_few_hull_points_is_a_clear_error():
    with pytest.raises(ConfigError, match="try --points all"):
        fit_saturation([0.5, 0.9, 0.6, 0.7], [0.4, 0.8, 0.3, 0.35])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        fit_saturation([0.5, 1.2, 0.6], [0.4, 0.8, 0.3])


def test_saturation_cli_on_a_leaderboard_csv(cli, tmp_path):
    us, ds = synthetic(np.random.default_rng(3))
    csv = tmp_path / "leaderboard.csv"
    lines = ["method,imagenet top1,downstream acc,notes"]
    lines += [f"ckpt{i},{100 * u:.6f},{100 * d:.6f},x" for i, (u, d) in enumerate(zip(us, ds))]
    lines.append("broken,,50.0,missing upstream")
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sat"
    r = cli("saturation", csv, "--upstream", "imagenet top1", "--downstream", "downstream acc", "--label", "method",
            "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert "percentages" in r.stderr and "skipped 1 row" in r.stderr
    assert all(abs(res[k] - v) <= 0.05 * v for k, v in TRUE.items()), res
    assert res["predicted_downstream_accuracy_at_upstream_1"] == pytest.approx(1 - res["e_inf"])
    assert res["points"] == 42 and res["points_fitted"] == 12
    assert res["saturates"] is res["diminishing_returns"]["saturates"] and res["saturates"] in (True, False)
    assert {p["label"] for p in res["fitted_points"]} == {f"ckpt{i}" for i in range(12)}
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "saturation.csv", "saturation.png"]
    assert (out / "saturation.csv").read_text().splitlines()[0].startswith("point,upstream_accuracy")
    md = cli("saturation", csv, "--upstream", "imagenet top1", "--downstream", "downstream acc", "--quiet")
    assert md.exit_code == 0 and "| k | alpha | e_inf |" in md.stdout and md.stderr == ""
    bad = cli("saturation", csv, "--upstream", "top5", "--downstream", "downstream acc")
    assert bad.exit_code == 2 and "no column 'top5'" in bad.stderr and bad.stderr.count("\n") == 1


def test_diminishing_returns_against_a_straight_line():
    rng = np.random.default_rng(4)
    us, ds = synthetic(rng, n_curve=12, n_below=0, noise=0.003)
    t = diminishing_returns(us, ds)
    assert t["saturates"] is True and t["slope_high"] < t["slope_low"]
    assert t["loo_rmse_saturating"] < t["loo_rmse_linear"]
    # the negative control: linear data has no diminishing returns, although three of its points fit exactly
    u = np.linspace(0.5, 0.95, 12)
    lin = 0.1 + 0.6 * u + 0.003 * rng.standard_normal(12)
    assert fit_saturation(u[[0, 6, 11]].tolist(), lin[[0, 6, 11]].tolist(), points="all").r2 == pytest.approx(1.0)
    t = diminishing_returns(u.tolist(), lin.tolist())
    assert t["saturates"] is False, t
    # too few points to tell: undetermined, not a verdict
    assert diminishing_returns(us[:4], ds[:4])["saturates"] is None
