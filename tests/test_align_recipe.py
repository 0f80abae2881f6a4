"""The align-barrier recipe at reduced size, end to end through `weightspace recipe run`: a clear barrier between
two random-init models, at least halved by alignment + BatchNorm repair; the recipe format's checks."""
from __future__ import annotations

import json

import pytest
from conftest import jack95, run_small_recipe
import torch

from weightspace import load
from weightspace.errors import ConfigError
from weightspace.experiments.align import load_align_recipe
from weightspace.report.stats import Interval, with_test_noise

RECIPE = "recipes/align-barrier.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a recipe run end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "run"
    return out, run_small_recipe(RECIPE, out)


def test_small_run_shows_the_barrier_and_its_shrinking(small_run):
    out, printed = small_run
    res = json.loads((out / "results.json").read_text())
    pairs = res["results"]["pairs"]
    assert len(pairs) == 10 and res["results"]["fixes"] == ["none", "recalibrate_bn", "repair"]
    for pair in pairs:
        for fix in ("recalibrate_bn", "repair"):
            before = pair["curves"][fix]["B"]["error_barrier"]
            assert before >= 0.1, fix  # a clear barrier between the unaligned models
            for method in ("weights", "activations"):
                after = pair["curves"][fix][f"P_{method}(B)"]["error_barrier"]
                assert after <= 0.5 * before, (fix, method, before, after)
                assert pair["alignment"][method]["l2_after"] < pair["alignment"][method]["l2_before"]
    verdicts = {f["id"]: f["verdict"] for f in res["findings"]}
    assert verdicts["a"] == "reproduced" and verdicts["b"] == "reproduced"
    # (b) is judged on the jackknife interval over the models the pairs share, of shrink·before − after, widened by
    # the test set's noise (recomputed here)
    import numpy as np
    units = [[p["a"], p["b"]] for p in pairs]
    before = [p["curves"]["repair"]["B"]["error_barrier"] for p in pairs]
    after = [p["curves"]["repair"]["P_weights(B)"]["error_barrier"] for p in pairs]
    d = [0.5 * x - y for x, y in zip(before, after)]
    iv = res["results"]["summary"]["checks"]["b"]["repair+weights"]
    widened = with_test_noise(Interval(float(np.mean(d)), *jack95(d, units), 5), iv["n_test"])
    assert (iv["interval"]["low"], iv["interval"]["high"]) == pytest.approx((widened.low, widened.high))
    # (c) the width sweep: widths 4 and 16 (16 is the recipe's own model, reused), verdict from its interval
    sweep = res["results"]["width_sweep"]
    assert list(sweep["widths"]) == ["4", "16"] and sweep["widths"]["16"]["reused"]
    assert sweep["widths"]["16"]["after"] == [p["curves"]["recalibrate_bn"]["P_weights(B)"]["error_barrier"] for p in pairs]
    d = [x - y for x, y in zip(sweep["widths"]["4"]["after"], sweep["widths"]["16"]["after"])]
    lo = with_test_noise(Interval(float(np.mean(d)), *jack95(d, units), 5), iv["n_test"]).low
    assert (verdicts["c"] == "reproduced") == (lo > 0)
    assert [f["verdict"] for f in printed["findings"]] == list(verdicts.values())
    report = (out / "REPORT.md").read_text()
    assert "**REPRODUCED.**" in report and "reduced size" in report
    b = pair["curves"]["repair"]["B"]["error_barrier"]
    assert f"{b:.4f}" in report  # the report's numbers are results.json's
    for fig in res["figures"]:
        assert (out / fig).read_bytes()[:4] == b"\x89PNG" and f"]({fig})" in report
    assert (out / "barriers.csv").read_text().count("\n") == 1 + 10 * 3 * 3  # 10 pairs × 3 curves × 3 BN treatments


def test_aligned_checkpoints_compute_b(small_run):
    out, _ = small_run
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    x = load_data("digits:test").x[:64]
    net = build_model("weightspace.eval.zoo:small_cnn?width=16", num_classes=10)
    outs = []
    for name in ("model-2", "model-2-aligned-weights-to-1", "model-2-aligned-activations-to-1"):
        net.load_state_dict(load(out / "checkpoints" / f"{name}.safetensors").materialise())
        with torch.no_grad():
            outs.append(net.eval()(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)
    assert not torch.equal(load(out / "checkpoints" / "model-2.safetensors")["conv1.weight"],
                           load(out / "checkpoints" / "model-2-aligned-weights-to-1.safetensors")["conv1.weight"])


def test_recipe_checks(tmp_path, cli):
    cfg = load_align_recipe(RECIPE, small=True, overrides=["analysis.steps=3"])
    assert cfg["train"]["epochs"] == 3 and cfg["analysis"]["steps"] == 3 and cfg["train"]["seeds"] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="unknown method/fix 'magic'"):
        load_align_recipe(RECIPE, overrides=["analysis.methods=[magic]"])
    with pytest.raises(ConfigError, match="three different seeds"):
        load_align_recipe(RECIPE, overrides=["train.seeds=[1, 2]"])
    with pytest.raises(ConfigError, match="two or more positive integers"):
        load_align_recipe(RECIPE, overrides=["width_sweep.widths=[8]"])
    r = cli("recipe", "run", RECIPE, "--out", tmp_path / "x", "--set", "analysis.fixes=[sometimes]")
    assert r.exit_code == 2 and "sometimes" in r.stderr
