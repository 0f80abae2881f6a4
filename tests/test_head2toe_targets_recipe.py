"""The head2toe-targets recipe at reduced size, end to end through `weightspace recipe run`: per target and seed the
probe, Head2Toe and scratch accuracies; domain affinity and gain derived from them; verdicts that follow from
intervals recomputed here from the per-seed numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_small_recipe, t95, verdict
from scipy import stats

from weightspace.errors import ConfigError
from weightspace.report.stats import Interval, with_test_noise
from weightspace.experiments.head2toe_targets import load_head2toe_targets_recipe

RECIPE = "recipes/head2toe-targets.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a recipe run end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("h2t") / "run"
    return out, run_small_recipe(RECIPE, out)


def test_small_run_derives_affinity_gain_and_verdicts(small_run):
    out, printed = small_run
    res = json.loads((out / "results.json").read_text())
    r, seeds = res["results"], ["1", "2", "3"]
    targets = r["targets"]
    assert list(targets) == ["same digits", "inverted", "2×2 blocks shuffled", "pixels shuffled"]
    for t in targets.values():
        assert t["train"] == 150 and t["train"] + t["test"] == 719 and list(t["per_seed"]) == seeds
        for row in t["per_seed"].values():
            assert 0.0 <= min(row["probe"], row["head2toe"], row["scratch"]) <= 1.0
            assert row["affinity"] == pytest.approx(row["probe"] - row["scratch"])
            assert row["gain"] == pytest.approx(row["head2toe"] - row["probe"])
        lo, hi = t95([t["per_seed"][s]["gain"] for s in seeds])
        assert (t["gain"]["low"], t["gain"]["high"]) == pytest.approx((lo, hi))
    # the near target (same digits, new images) has the highest affinity: a real source model transfers to it
    assert r["order"][-1] == "same digits" and targets["same digits"]["affinity"]["mean"] > 0
    mean_aff = {n: np.mean([t["per_seed"][s]["affinity"] for s in seeds]) for n, t in targets.items()}
    assert r["order"] == sorted(mean_aff, key=mean_aff.get)
    assert r["far"] == r["order"][:2] and r["near"] == r["order"][2:]
    # (a) recomputed from the per-seed gains: far − near mean gain, paired by seed
    d = [np.mean([targets[n]["per_seed"][s]["gain"] for n in r["far"]])
         - np.mean([targets[n]["per_seed"][s]["gain"] for n in r["near"]]) for s in seeds]
    lo, hi = t95(d)  # widened by the sampling noise of the smallest test set (every seed scores the same sets)
    widened = with_test_noise(Interval(float(np.mean(d)), lo, hi, 3), min(t["test"] for t in targets.values()))
    lo, hi = widened.low, widened.high
    iv = r["checks"]["a"]["interval"]
    assert (iv["low"], iv["high"]) == pytest.approx((lo, hi))
    verdicts = {f["id"]: f["verdict"] for f in res["findings"]}
    assert verdicts["a"] == verdict(lo, hi, r["margin"], "above")
    # (b) Spearman's ρ per seed, recomputed with scipy
    rho = [stats.spearmanr([targets[n]["per_seed"][s]["affinity"] for n in targets],
                           [targets[n]["per_seed"][s]["gain"] for n in targets]).statistic for s in seeds]
    assert r["rank_correlation"] == pytest.approx(rho)
    lo, hi = t95(rho)
    assert verdicts["b"] == verdict(lo, hi, 0.0, "below")
    assert [f["verdict"] for f in printed["findings"]] == list(verdicts.values())
    report = (out / "REPORT.md").read_text()
    assert "reduced size" in report and f"**{verdicts['a'].upper()}.**" in report
    assert f"{targets['inverted']['gain']['mean']:.4f}" in report  # the report's numbers are results.json's
    assert (out / "head2toe_targets.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "head2toe_targets.csv").read_text().count("\n") == 1 + 4 * 3
    assert sorted(res["checkpoints"]) == ["source-1", "source-2", "source-3"]


def test_recipe_checks(tmp_path, cli):
    cfg = load_head2toe_targets_recipe(RECIPE, small=True)
    assert cfg["seeds"] == [1, 2, 3] and len(cfg["targets"]) == 4
    assert len(load_head2toe_targets_recipe(RECIPE)["targets"]) == 6
    with pytest.raises(ConfigError, match="at least four entries"):
        load_head2toe_targets_recipe(RECIPE, overrides=["targets=[{name: a}, {name: b}, {name: c}]"])
    with pytest.raises(ConfigError, match="three different integer seeds"):
        load_head2toe_targets_recipe(RECIPE, overrides=["seeds=[1, 1, 2]"])
    with pytest.raises(ConfigError, match="its own name"):
        load_head2toe_targets_recipe(RECIPE, overrides=["targets=[{name: a}, {name: a}, {name: c}, {name: d}]"])
    r = cli("recipe", "run", RECIPE, "--out", tmp_path / "x", "--small",
            "--set", "targets=[{name: a, transform: rotate}, {name: b}, {name: c}, {name: d}]")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "unknown transform 'rotate'" in r.stderr
    assert not (tmp_path / "x").exists()
