"""Barrier curves: barrier heights of constructed curves, lerp weights at each α, endpoints, BN recalibration."""
from __future__ import annotations

import copy

import pytest
import torch

import weightspace as ws
from weightspace import errors
from weightspace.eval.data import load_data
from weightspace.eval.evaluator import Evaluator, recalibrate_bn
from weightspace.analysis.curve import barrier_height, even_alphas, interpolation_curve
from weightspace.eval.models import build_model

from evalhelpers import CNN, save_all, train_cnns

pytestmark = pytest.mark.usefixtures("one_thread")


def test_barrier_height_both_conventions():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    # A bump over a line from 0.1 to 0.3: chord line at 0.5 is 0.2, ends' mean is 0.2.
    b = barrier_height(alphas, [0.1, 0.3, 0.5, 0.2, 0.3])
    assert b["chord"] == pytest.approx(0.3) and b["chord_peak_alpha"] == 0.5
    assert b["peak_over_ends"] == pytest.approx(0.3) and b["peak_over_ends_alpha"] == 0.5
    # A monotone curve from 0 to 1 that bends below its chord: no chord barrier, but the peak-over-ends
    # convention reports max f − mean(ends) = 1 − 0.5 at α = 1 (the value at α = ½ is 0.1 below the ends' mean:
    # not a midpoint barrier at all)
    b = barrier_height(alphas, [0.0, 0.0, 0.1, 0.5, 1.0])
    assert b["chord"] == 0.0 and b["chord_peak_alpha"] == 0.0
    assert b["peak_over_ends"] == pytest.approx(0.5) and b["peak_over_ends_alpha"] == 1.0
    assert b["midpoint"] == b["peak_over_ends"]  # the former name, kept for older readers
    # points outside [0, 1] (extrapolation) are plotted but do not count towards the barrier
    b = barrier_height([-0.5, 0.0, 0.5, 1.0, 1.5], [9.0, 1.0, 1.5, 1.0, 9.0])
    assert b["chord"] == pytest.approx(0.5) and b["chord_peak_alpha"] == 0.5
    with pytest.raises(errors.ConfigError):
        barrier_height([0.0, 0.5], [1.0, 2.0])


def test_curve_evaluates_lerp_weights_at_each_alpha():
    a = {"w": torch.tensor([0.0, 10.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 20.0]), "n": torch.tensor(7)}
    seen = []

    def evaluate(weights):
        seen.append(weights["w"].clone())
        assert weights["n"].item() == 7  # integer buffers are never interpolated: they take the largest value
        x = float(weights["w"][0])
        return {"loss": (x - 2.0) ** 2, "accuracy": 1.0 - abs(x - 2.0) / 4}  # best in the middle: no barrier
    curve = interpolation_curve(a, b, evaluate, steps=5, progress=False)
    assert curve.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    for alpha, w in zip(curve.alphas, seen):
        assert torch.allclose(w, (1 - alpha) * a["w"] + alpha * b["w"])
    assert curve.series("data", "loss") == [4.0, 1.0, 0.0, 1.0, 4.0]
    assert curve.barriers["data"]["loss"]["chord"] == 0.0
    assert curve.barriers["data"]["error"]["peak_over_ends"] == 0.0  # error 0.5 at both ends, lower inside
    # explicit alphas: the ends are added (barriers are measured against them), sorted, duplicates dropped
    seen.clear()
    curve = interpolation_curve(a, b, lambda w: float(w["w"][0]), alphas=[0.5, 0.5, 1.5], progress=False)
    assert curve.alphas == [0.0, 0.5, 1.0, 1.5]
    assert curve.series("data", "accuracy") == [0.0, 2.0, 4.0, 6.0]
    # NaN in an end is refused once, naming the key (the ends are checked once, not at every α)
    with pytest.raises(errors.NonFiniteError, match="'w'"):
        interpolation_curve(a, {**b, "w": torch.tensor([float("nan"), 1.0])}, evaluate, steps=3, progress=False)


def test_even_alphas():
    assert even_alphas(11)[1] == 0.1 and even_alphas(11)[-1] == 1.0 and len(even_alphas(11)) == 11
    with pytest.raises(errors.ConfigError):
        even_alphas(1)


@pytest.fixture(scope="module")
def cnn_pair(one_thread):
    """Two small CNNs (BatchNorm) trained from different random inits on real digits."""
    return train_cnns([0, 1], shared_init=False)


def test_curve_endpoints_equal_endpoints_own_evaluation(cnn_pair, tmp_path):
    a, b = cnn_pair
    ws.save(a, tmp_path / "a.safetensors")
    ws.save(b, tmp_path / "b.safetensors")
    ev = Evaluator(build_model(CNN, num_classes=10),
                   [load_data("digits:val"), load_data("digits:test")], device="cpu")
    curve = interpolation_curve(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), ev, steps=5,
                                progress=False)
    assert ev.forward_passes == 5 * 2  # one pass per α and dataset, nothing more
    assert curve.datasets == ["digits:val", "digits:test"]
    assert curve.metrics[0] == ev(a) and curve.metrics[-1] == ev(b)
    assert ev(a)["digits:val"]["accuracy"] > 0.8  # really trained
    assert curve.label == "a–b"
    # the midpoint really is the midpoint's evaluation
    mid = ev({k: ((a[k] + b[k]) / 2 if a[k].is_floating_point() else a[k]) for k in a})
    assert curve.metrics[2]["digits:test"]["loss"] == pytest.approx(mid["digits:test"]["loss"], rel=1e-5)


def test_in_place_path_equals_state_dict_path():
    """With an Evaluator the weights are written into the model in pieces; a plain function gets dicts.
    An MLP with a 4 MiB layer (hidden 1024) makes the pieces real; both paths must agree exactly."""
    spec = "weightspace.eval.zoo:mlp?hidden=1024"
    torch.manual_seed(0)
    a, b = (build_model(spec, num_classes=10).state_dict() for _ in range(2))
    big = max(a, key=lambda k: a[k].numel())
    assert sum(1 for k, _ in ws.lerp_stream(a, b, 0.5).pieces() if k == big) > 1  # really in pieces
    ev = Evaluator(build_model(spec, num_classes=10), load_data("digits:val"), device="cpu")
    in_place = interpolation_curve(a, b, ev, steps=4, progress=False)
    plain = interpolation_curve(a, b, lambda w: ev(w), steps=4, progress=False)
    assert in_place.metrics == plain.metrics
    ref = ev({k: (2 / 3) * a[k] + (1 / 3) * b[k] for k in a})["digits:val"]["loss"]
    assert in_place.metrics[1]["digits:val"]["loss"] == pytest.approx(ref, rel=1e-5)
    # the greedy soup's candidates go the same way
    soup_a, res_a = ws.greedy_soup([a, b, a], ev, progress=False)
    soup_b, res_b = ws.greedy_soup([a, b, a], lambda w: ev(w), progress=False)
    assert [s["soup_score_with"] for s in res_a.steps] == [s["soup_score_with"] for s in res_b.steps]
    assert all(torch.equal(soup_a[k], soup_b[k]) for k in soup_a)


def test_recalibrated_curve_matches_manual_update_bn(cnn_pair):
    a, b = cnn_pair
    train_data = load_data("digits:train")
    ev = Evaluator(build_model(CNN, num_classes=10), load_data("digits:val"),
                   device="cpu")
    curve = interpolation_curve(a, b, ev, steps=3, recalibrate_bn=train_data, progress=False)
    plain = interpolation_curve(a, b, ev, steps=3, progress=False)
    assert curve.recalibrate_bn == "digits:train"
    model = build_model(CNN, num_classes=10)
    mid = {k: ((a[k] + b[k]) / 2 if a[k].is_floating_point() else a[k]) for k in a}
    model.load_state_dict(mid)
    recalibrate_bn(model, train_data, batch_size=256)
    manual = Evaluator(copy.deepcopy(model), load_data("digits:val"), device="cpu")()
    assert curve.metrics[1]["digits:val"]["loss"] == pytest.approx(manual["digits:val"]["loss"], rel=1e-5)
    # re-estimated statistics change the midpoint (averaged running stats are not the stats of averaged weights)
    assert curve.metrics[1]["digits:val"]["loss"] != plain.metrics[1]["digits:val"]["loss"]


def test_cli_curve_mode_overlays_pairs(cli, cnn_pair, tmp_path):
    import json
    ft = train_cnns([5, 6], shared_init=True, epochs=1)
    a, b = save_all(cnn_pair, tmp_path, "rand")
    c, d = save_all(ft, tmp_path, "ft")
    out = tmp_path / "ab"
    r = cli("interpolate", a, b, "--pair", c, d, "--model", CNN, "--data", "digits:val", "--data", "digits:test",
            "--steps", "3", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert "## barrier heights" in r.stdout and f"wrote {out / 'curve.png'}" in r.stdout
    j = json.loads((out / "curve.json").read_text())
    assert [cv["label"] for cv in j["curves"]] == ["rand0–rand1", "ft0–ft1"]
    assert j["curves"][0]["alphas"] == [0.0, 0.5, 1.0]
    ev = Evaluator(build_model(CNN, num_classes=10), [load_data("digits:val"), load_data("digits:test")], device="cpu")
    assert j["curves"][1]["points"][2]["metrics"]["digits:test"]["loss"] == ev(ft[1])["digits:test"]["loss"]
    assert j["curves"][0]["barriers"]["digits:val"]["error"]["chord"] > 0.1  # independent inits: a real barrier
    rows = (out / "barriers.csv").read_text().splitlines()
    assert rows[0] == "pair,dataset,metric,chord,chord_peak_alpha,peak_over_ends,peak_over_ends_alpha" and len(rows) == 1 + 2 * 2 * 2
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # explicit alphas and BN recalibration; JSON on stdout
    r = cli("interpolate", c, d, "--model", CNN, "--data", "digits:val", "--alphas", "0.5",
            "--recalibrate-bn", "digits:train", "--json", "-q")
    j = json.loads(r.stdout)
    assert j["curves"][0]["alphas"] == [0.0, 0.5, 1.0] and j["curves"][0]["recalibrate_bn"] == "digits:train"
    # existing results are not overwritten without --force; bad usage is one line and exit 2
    r = cli("interpolate", a, b, "--model", CNN, "--data", "digits:val", "--out", out)
    assert r.exit_code == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert cli("interpolate", a, b, "--data", "digits:val").exit_code == 2
