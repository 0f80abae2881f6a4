"""The saturation-pairs recipe at reduced size, end to end through `weightspace recipe run`: a grid of upstream
models scored upstream and downstream, the saturation law fitted per seed; the fits are redone here from the
listed points and the verdicts follow from intervals recomputed from the per-seed fits."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import judge, run_small_recipe

from weightspace.analysis.saturation import fit_saturation
from weightspace.errors import ConfigError
from weightspace.experiments.saturation_pairs import load_saturation_pairs_recipe
from weightspace.experiments.verdicts import combine

RECIPE = "recipes/saturation-pairs.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a recipe run end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saturation") / "run"
    return out, run_small_recipe(RECIPE, out)


def test_small_run_pairs_fits_and_verdicts(small_run):
    out, printed = small_run
    res = json.loads((out / "results.json").read_text())
    r = res["results"]
    pts = r["points"]
    assert len(pts) == 3 * 3 * 2 and {(p["width"], p["epochs"]) for p in pts} == {(w, e) for w in (2, 4, 8)
                                                                                  for e in (1, 3)}
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(x["upstream_accuracy"]) for x in rows] == pytest.approx([p["upstream"] for p in pts])
    # real training: per seed the widest, longest-trained model is the best upstream and beats the narrowest, shortest
    for s in (1, 2, 3):
        by = {(p["width"], p["epochs"]): p for p in pts if p["seed"] == s}
        assert by[(8, 3)]["upstream"] > by[(2, 1)]["upstream"] + 0.3
        assert max(p["upstream"] for p in by.values()) == by[(8, 3)]["upstream"]
    # every per-seed fit is fit_saturation on that seed's points (the listed mode)
    e_inf, left, drop = [], [], []
    for s, fit in r["fits"].items():
        mine = [p for p in pts if p["seed"] == int(s)]
        f = fit_saturation([p["upstream"] for p in mine], [p["downstream"] for p in mine], points=fit["points_mode"])
        assert fit["e_inf"] == pytest.approx(f.e_inf) and fit["k"] == pytest.approx(f.k)
        assert fit["best_downstream"] == max(p["downstream"] for p in mine)
        e_inf.append(f.e_inf)
        left.append(1 - f.e_inf - fit["best_downstream"])
        assert fit["points_fitted"] > 3  # never three parameters through three points
        # diminishing returns: the slope over the upper half of the points against the lower half's
        us = np.array([p["upstream"] for p in mine])
        ds = np.array([p["downstream"] for p in mine])
        o = np.argsort(us, kind="stable")
        low, high = (np.polyfit(us[idx], ds[idx], 1)[0] for idx in (o[:3], o[3:]))
        assert fit["diminishing_returns"]["slope_high"] == pytest.approx(high)
        drop.append(low - high)
    verdicts = {f["id"]: f["verdict"] for f in res["findings"]}
    dim = judge(drop, 0.0, "above")
    if dim != "reproduced":  # no diminishing returns shown: e_∞ and the headroom are not judged
        assert verdicts["a"] == verdicts["b"] == dim
    else:
        assert verdicts["a"] == combine([dim, judge(e_inf, r["min_gap"], "above")])
        assert verdicts["b"] == combine([dim, judge(left, r["headroom"], "below")])
    assert [f["verdict"] for f in printed["findings"]] == list(verdicts.values())
    report = (out / "REPORT.md").read_text()
    assert "reduced size" in report and f"**{verdicts['a'].upper()}.**" in report
    assert (out / "saturation.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_checks(tmp_path, cli):
    cfg = load_saturation_pairs_recipe(RECIPE, small=True)
    assert cfg["grid"]["widths"] == [2, 4, 8] and cfg["grid"]["param"] == "width"
    with pytest.raises(ConfigError, match="at least three configurations"):
        load_saturation_pairs_recipe(RECIPE, overrides=["grid.widths=[4]", "grid.epochs=[1, 2]"])
    with pytest.raises(ConfigError, match="positive integer"):
        load_saturation_pairs_recipe(RECIPE, overrides=["grid.epochs=[0, 2]"])
    r = cli("recipe", "run", RECIPE, "--out", tmp_path / "x", "--small", "--set", "downstream.spec=nosuch:data")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
