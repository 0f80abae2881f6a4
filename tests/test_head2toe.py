"""Head2Toe: f = 1 is the probe on all features, selection finds the informative layer, CV, folds, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from probehelpers import TINY_CNN, LabelCarrier, label_data, tiny_checkpoints  # noqa: F401

from weightspace.analysis.head2toe import (concat_features, group_lasso_scores, head2toe_features,
                                           stratified_folds, top_fraction)
from weightspace.analysis.probe import fit_linear
from weightspace.analysis.taps import FeatureTaps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn_features():
    """Pooled features of a random-init width-4 CNN on real digits (train and test)."""
    from weightspace.eval.data import load_data
    from weightspace.eval.zoo import small_cnn
    torch.manual_seed(0)
    taps = FeatureTaps(small_cnn(width=4), "all", target=64, device="cpu")
    return taps(load_data("digits:train")), taps(load_data("digits:test"))


def test_per_layer_l2_normalisation(cnn_features):
    train, _ = cnn_features
    z, spans = concat_features(train)
    assert [s[0] for s in spans] == train.layers and z.shape[1] == spans[-1][2]
    for _, a, b in spans:
        norms = z[:, a:b].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_keep_all_equals_a_probe_on_all_features(cnn_features):
    train, test = cnn_features
    res = head2toe_features(train, test, keep=[1.0], folds=2, lasso_iters=30)
    z_tr, _ = concat_features(train)
    z_te, _ = concat_features(test)
    head = fit_linear(z_tr, train.y, 10)
    assert torch.equal(res.predictions[1.0], head.predict(z_te))
    assert res.test[1.0] == head.accuracy(z_te, test.y) and res.chosen == 1.0
    assert sum(r["kept"] for r in res.layers) == z_tr.shape[1]
    assert res.baseline["layer"] == "fc:in"


def test_group_lasso_keeps_the_layer_that_carries_the_label():
    taps = FeatureTaps(LabelCarrier(noise_in=100).eval(), "noise:in,label", device="cpu")
    train, test = taps(label_data(500, 0, 100)), taps(label_data(300, 1, 100))
    res = head2toe_features(train, test, keep=[0.09, 1.0], folds=3, lasso_iters=200)
    kept = {r["layer"]: r["kept"] for r in res.layers}
    assert kept == {"label": 10, "noise:in": 0}  # round(0.09 · 110) = 10 features: exactly the one-hot
    assert res.chosen == 0.09 and res.test[0.09] == 1.0 and res.cv[0.09] == 1.0


def test_scores_rank_informative_features_first():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    z = torch.randn(300, 20, generator=g)
    z[:, 7] += 3 * (y == 1).float()
    z[:, 13] += 3 * (y == 2).float()
    scores = group_lasso_scores(z, y, 3, coef=1e-3, iters=200)
    assert set(top_fraction(scores, 0.1).tolist()) == {7, 13}
    assert torch.equal(top_fraction(scores, 1.0), torch.arange(20))
    # a strong penalty zeroes whole rows (group soft-thresholding): only the two informative features survive
    sparse = group_lasso_scores(z, y, 3, coef=0.05, iters=300)
    assert torch.nonzero(sparse).flatten().tolist() == [7, 13]


def test_stratified_folds_partition_every_class():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)
    folds = stratified_folds(y, 3, seed=0)
    vals = torch.cat([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(len(y)))
    for tr, va in folds:
        assert not set(tr.tolist()) & set(va.tolist())
        assert all(1 <= int((y[va] == c).sum()) <= 4 for c in range(3))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, stratified_folds(y, 3, seed=0)))


def test_head2toe_cli_end_to_end(cli, tmp_path, tiny_checkpoints):
    out = tmp_path / "h2t"
    r = cli("head2toe", tiny_checkpoints[-1], "--model", TINY_CNN, "--train", "digits:train", "--test",
            "digits:test", "--keep", "0.05,0.5", "--target", "64", "--folds", "2", "--lasso-iters", "50",
            "--device", "cpu", "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["head2toe.csv", "head2toe.png", "head2toe_layers.csv",
                                                     "results.json"]
    assert res["forward_passes"] == 2 and res["chosen_keep"] in (0.05, 0.5)
    assert set(res["cv_accuracy"]) == {"0.05", "0.5"}
    assert res["test_accuracy"] == res["test_accuracy_by_keep"][str(res["chosen_keep"])]
    assert res["baseline"]["layer"] == "fc:in" and res["test_accuracy"] > 0.5
    total = res["features_total"]
    assert sum(layer["kept"] for layer in res["layers"]) == round(res["chosen_keep"] * total)
    bad = cli("head2toe", tiny_checkpoints[-1], "--model", TINY_CNN, "--train", "digits:train", "--test",
              "digits:test", "--keep", "0,1.5", "--device", "cpu")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "--keep" in bad.stderr
