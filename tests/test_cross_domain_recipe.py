"""The cross-domain recipe at reduced size, end to end through `weightspace recipe run`: P-T models fine-tuned on
digits and on inverted digits (one label set); within- and cross-domain barriers on each domain's test set under
both BatchNorm protocols; verdicts that follow from intervals recomputed here from the per-pair numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import jack95, run_small_recipe, verdict

from weightspace import load
from weightspace.errors import ConfigError
from weightspace.ops.engine import running_statistic
from weightspace.experiments.cross_domain import load_cross_domain_recipe
from weightspace.experiments.verdicts import by_protocol, combine
from weightspace.report.stats import Interval, with_test_noise

RECIPE = "recipes/cross-domain.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a recipe run end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross") / "run"
    return out, run_small_recipe(RECIPE, out)


def test_small_run_barriers_and_verdicts(small_run):
    out, printed = small_run
    res = json.loads((out / "results.json").read_text())
    r = res["results"]
    assert list(r["domains"]) == ["digits", "inverted"] and r["protocols"] == ["stored", "re-estimated"]
    for n, d in r["domains"].items():
        assert d["train"] == 200 and d["train"] + d["test"] == 719
        for a in d["accuracy"].values():
            # each model is best on its own domain: the two domains really differ
            other = "inverted" if n == "digits" else "digits"
            assert a[f"on {n}"] > a[f"on {other}"]
    # the fine-tuned models start from one P-T init: the head is the same random head for both domains
    init = load(out / "checkpoints" / "pt-init.safetensors").materialise()
    src = load(out / "checkpoints" / "source.safetensors").materialise()
    assert torch.equal(init["conv1.weight"], src["conv1.weight"])
    for n in ("digits", "inverted"):
        for p in r["protocols"]:
            assert len(r["within"][n][p]) == len(r["cross"][n][p]) == 3
            assert all(0 <= x <= 1 for x in r["within"][n][p] + r["cross"][n][p])
    # the cross pair of seed 1 on the digits test set: its L2 distance recomputed from the checkpoints
    a = load(out / "checkpoints" / "digits-seed-1.safetensors").materialise()
    b = load(out / "checkpoints" / "inverted-seed-1.safetensors").materialise()
    l2 = float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a
                              if a[k].is_floating_point() and not running_statistic(k))))  # parameters only
    assert r["l2"]["cross"][0] == pytest.approx(l2, rel=1e-6)
    verdicts = {f["id"]: f["verdict"] for f in res["findings"]}
    tol, margin = r["no_barrier_below"], r["margin"]
    # recomputed: cyclic pairs share seeds, so a jackknife over the seeds, widened by the test set's noise; a refuted
    # domain refutes the protocol's verdict, and both protocols must agree for "reproduced"
    seeds = [1, 2, 3]
    units = [[seeds[i], seeds[(i + 1) % 3]] for i in range(3)]

    def judged(xs, n, threshold, direction):
        lo, hi = jack95(xs, units)
        iv = with_test_noise(Interval(float(np.mean(xs)), lo, hi, 3), r["domains"][n]["test"])
        return verdict(iv.low, iv.high, threshold, direction)

    for fid, per in (("a", lambda n, p: judged(r["within"][n][p], n, tol, "below")),
                     ("b", lambda n, p: judged([c - w for c, w in zip(r["cross"][n][p], r["within"][n][p])], n,
                                               margin, "above"))):
        by_p = {p: combine([per(n, p) for n in ("digits", "inverted")]) for p in r["protocols"]}
        assert verdicts[fid] == by_protocol(by_p)
    assert [f["verdict"] for f in printed["findings"]] == list(verdicts.values())
    report = (out / "REPORT.md").read_text()
    assert "reduced size" in report and f"**{verdicts['b'].upper()}.**" in report
    assert (out / "cross_domain.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "cross_domain.csv").read_text().count("\n") == 1 + 2 * 2 * 3


def test_recipe_checks(tmp_path, cli):
    cfg = load_cross_domain_recipe(RECIPE, small=True)
    assert cfg["seeds"] == [1, 2, 3] and [d["name"] for d in cfg["domains"]] == ["digits", "inverted"]
    with pytest.raises(ConfigError, match="exactly two entries"):
        load_cross_domain_recipe(RECIPE, overrides=["domains=[{name: a}]"])
    with pytest.raises(ConfigError, match="exactly two entries"):
        load_cross_domain_recipe(RECIPE, overrides=["domains=[{name: a}, {name: a}]"])
    r = cli("recipe", "run", RECIPE, "--out", tmp_path / "x", "--small",
            "--set", "domains=[{name: a}, {name: b, relabel: [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]}]")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "one label set" in r.stderr
    assert not (tmp_path / "x").exists()
