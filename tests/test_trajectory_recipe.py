"""The trajectory recipe at reduced size, end to end through `weightspace recipe run`: checkpoints along one
pre-training run, fine-tuned with three seeds each; accuracies, pair barriers and distances per start point; the
verdicts follow from intervals recomputed here from the per-seed numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import jack95, run_small_recipe, t95

from weightspace import load
from weightspace.errors import ConfigError
from weightspace.ops.engine import running_statistic
from weightspace.experiments.trajectory import load_trajectory_recipe
from weightspace.experiments.verdicts import by_protocol
from weightspace.report.stats import Interval, with_test_noise

RECIPE = "recipes/trajectory.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a recipe run end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trajectory") / "run"
    return out, run_small_recipe(RECIPE, out)


def test_small_run_start_points_and_verdicts(small_run):
    out, printed = small_run
    res = json.loads((out / "results.json").read_text())
    r, seeds = res["results"], ["1", "2", "3"]
    starts = r["starts"]
    assert list(starts) == ["0", "1", "3", "6"] and r["protocols"] == ["stored", "re-estimated"]
    # pre-training is real: the source task is learnt along the run, and the random init is far from the end
    src = [starts[e]["source_accuracy"] for e in starts]
    assert src[0] < 0.3 < 0.9 < src[-1] and starts["6"]["barrier_to_final"] == 0.0
    assert starts["0"]["barrier_to_final"] > 0.1
    for e, st in starts.items():
        assert list(st["accuracy"]) == seeds and len(st["pairs"]) == 3
        for p in st["pairs"]:
            a, b = (load(out / "checkpoints" / f"finetuned-from-{e}-seed-{x}.safetensors").materialise() for x in p["pair"])
            l2 = float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a
                                      if a[k].is_floating_point() and not running_statistic(k))))  # parameters
            assert p["l2"] == pytest.approx(l2, rel=1e-6) and p["l2"] > 0
            assert 0 <= p["barrier_stored"] <= 1 and 0 <= p["barrier_re-estimated"] <= 1
    # fine-tuning from the end of pre-training beats fine-tuning from the random init
    acc = {e: [starts[e]["accuracy"][s] for s in seeds] for e in starts}
    assert np.mean(acc["6"]) > np.mean(acc["0"]) + 0.1
    # (a) recomputed: shortfall to the last start point, paired by seed; the first start point from which on every
    # interval lies below `within`
    within, n_test = r["within"], r["data"]["target_test"]

    def widened(xs, lo, hi):  # the seeds' interval plus the test set's sampling noise
        iv = with_test_noise(Interval(float(np.mean(xs)), lo, hi, len(xs)), n_test)
        return iv.low, iv.high

    suffices = {}
    for e in ["0", "1", "3"]:
        d = [x - y for x, y in zip(acc["6"], acc[e])]
        lo, hi = widened(d, *t95(d))
        assert r["checks"]["a"][e]["interval"]["high"] == pytest.approx(hi)
        suffices[e] = hi < within
    first = None
    for e in ["3", "1", "0"]:
        if not suffices[e]:
            break
        first = int(e)
    assert r["first_sufficient"] == first
    verdicts = {f["id"]: f["verdict"] for f in res["findings"]}
    assert (verdicts["a"] == "reproduced") == (first is not None)
    # (b) recomputed at the first sufficient start point under both BatchNorm protocols, jackknifed over the three
    # fine-tuned models that the three pairs share
    if first is not None:
        per_protocol = {}
        for p in r["protocols"]:
            pairs = starts[str(first)]["pairs"]
            xs = [q[f"barrier_{p}"] for q in pairs]
            lo, hi = widened(xs, *jack95(xs, [q["pair"] for q in pairs]))
            per_protocol[p] = ("reproduced" if hi < r["no_barrier_below"] else
                               "not reproduced" if lo >= r["no_barrier_below"] else "inconclusive")
        assert verdicts["b"] == by_protocol(per_protocol)
    else:
        assert verdicts["b"] == "inconclusive"
    assert [f["verdict"] for f in printed["findings"]] == list(verdicts.values())
    report = (out / "REPORT.md").read_text()
    assert "reduced size" in report and f"**{verdicts['a'].upper()}.**" in report
    assert f"{np.mean(acc['6']):.4f}" in report
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "trajectory.csv").read_text().count("\n") == 1 + 4 * 3


def test_recipe_checks(tmp_path, cli):
    cfg = load_trajectory_recipe(RECIPE, small=True)
    assert cfg["checkpoints"] == [0, 1, 3, 6] and cfg["seeds"] == [1, 2, 3]
    with pytest.raises(ConfigError, match="increasing epochs"):
        load_trajectory_recipe(RECIPE, overrides=["checkpoints=[0, 5, 2, 20]"])
    with pytest.raises(ConfigError, match="increasing epochs"):
        load_trajectory_recipe(RECIPE, overrides=["checkpoints=[0, 5]"])  # must end at pretrain.epochs
    with pytest.raises(ConfigError, match="three different integer seeds"):
        load_trajectory_recipe(RECIPE, overrides=["seeds=[1, 2]"])
    r = cli("recipe", "run", RECIPE, "--out", tmp_path / "x", "--set", "pretrain.epochz=3")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "epochz" in r.stderr
    r = cli("recipe", "run", RECIPE, "--out", tmp_path / "y", "--small", "--set", "target.spec=nosuch:data")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "nosuch" in r.stderr
    assert not (tmp_path / "y").exists()


def test_an_existing_run_is_not_overwritten(small_run, cli):
    out, _ = small_run
    before = (out / "results.json").read_bytes()
    r = cli("recipe", "run", RECIPE, "--out", out, "--small")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "results.json" in r.stderr
    assert (out / "results.json").read_bytes() == before
