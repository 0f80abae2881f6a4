"""Recipe kind `merges`: every merge method beside the soups, tuned on val, ranked over seeds (run at --small)."""
from __future__ import annotations

import csv
import json

import pytest

from weightspace.errors import ConfigError
from weightspace.experiments.merges import load_merges_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_small_run_ranks_every_method_with_intervals(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("recipe", "run", "recipes/merges.yaml", "--out", out, "--small", "-q")
    assert r.exit_code == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    cfg = load_merges_recipe("recipes/merges.yaml", small=True)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    names = [row["method"] for row in rows]
    assert set(cfg["methods"]) | {"best individual (val)", "uniform soup", "greedy soup", "ft0"} <= set(names)
    means = [float(row["test mean"]) for row in rows]
    assert means == sorted(means, reverse=True)
    for row in rows:
        assert float(row["test low"]) <= float(row["test mean"]) <= float(row["test high"])
    best = next(row for row in rows if row["method"] == "best individual (val)")
    assert float(best["Δ vs best individual"]) == 0.0
    (finding,) = res["findings"]
    assert finding["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert len(res["results"]["per_seed"]) == 3 and "Leaderboard" in (out / "REPORT.md").read_text()


def test_bad_recipes_are_refused(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("kind: merges\nmethods: [ties, nope]\n")
    with pytest.raises(ConfigError, match="methods: nope"):
        load_merges_recipe(bad)
    bad.write_text("kind: merges\nlrs: [0.01]\n")
    with pytest.raises(ConfigError, match="two or more"):
        load_merges_recipe(bad)
