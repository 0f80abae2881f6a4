"""CKA against known values and its invariances; per-module similarity of really trained digit models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import weightspace as ws
from weightspace.eval.data import load_data
from weightspace.eval.models import build_model
from weightspace.analysis.similarity import (MinibatchCKA, gram_linear, hsic1, linear_cka, minibatch_cka,
                                    model_similarity, prediction_agreement, rbf_cka)
from weightspace.eval.train import train

SPEC = "weightspace.eval.zoo:small_cnn?width=8"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xy():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def test_known_values(xy):
    x, y = xy
    assert round(linear_cka(x, y), 5) == 0.55761
    assert round(rbf_cka(x, y, threshold=0.5), 5) == 0.65483
    assert round(linear_cka(x, y, debiased=True), 5) == 0.51346


def test_minibatch_cka_is_the_unbiased_estimator(xy):
    x, y = xy
    # one batch holding every example is exactly debiased CKA (both use HSIC₁)
    assert minibatch_cka(x, y, batch_size=100) == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-12)
    # summing HSIC₁ over batches estimates the same quantity
    assert minibatch_cka(x, y, batch_size=25) == pytest.approx(linear_cka(x, y, debiased=True), abs=0.05)
    acc = MinibatchCKA(2, 2)
    acc.update([x[:50], y[:50]], [x[:50], y[:50]])
    acc.update([x[50:], y[50:]], [x[50:], y[50:]])
    m = acc.value()
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)
    assert m[0, 1] == pytest.approx(m[1, 0])


def test_hsic1_of_a_kernel_matches_its_definition(xy):
    x, _ = xy
    k = gram_linear(x[:20])
    n = 20
    kt = k.clone()
    kt.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    ref = (torch.trace(kt @ kt) + (one @ kt @ one) ** 2 / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ kt @ kt @ one) / (n * (n - 3))
    assert hsic1(k, k) == pytest.approx(float(ref), rel=1e-10)


def test_invariances(xy):
    x, y = xy
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((10, 10)))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)  # centring removes offsets
    assert rbf_cka(x, 2.0 * x @ q) == pytest.approx(1.0, abs=1e-12)  # σ follows the median distance
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    wide = np.concatenate([x, np.random.default_rng(1).standard_normal((100, 200))], 1)  # features > examples
    assert linear_cka(wide, y) == pytest.approx(float(_gram_cka(wide, y)), abs=1e-10)


def _gram_cka(x, y):
    h = np.eye(len(x)) - 1.0 / len(x)
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two small CNNs really trained on digits from different inits; saved as safetensors."""
    d = load_data("digits:train")
    folder = tmp_path_factory.mktemp("sim")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model(SPEC)
        train(m, d, epochs=2, seed=seed)
        p = folder / f"m{seed}.safetensors"
        ws.save(m.state_dict(), p)
        paths.append(str(p))
    return paths


def test_a_model_is_identical_to_itself(pair):
    test = load_data("digits:test?limit=200")
    r = model_similarity(pair[0], pair[0], build_model(SPEC), test, batch_size=64)
    for m in r.modules:
        assert m["linear_cka"] == pytest.approx(1.0, abs=1e-9)
        assert m["debiased_cka"] == pytest.approx(1.0, abs=1e-9)
        assert m["rbf_cka"] == pytest.approx(1.0, abs=1e-9)
        assert m["minibatch_cka"] == pytest.approx(1.0, abs=1e-9)
        assert m["l2"] == 0.0
    assert r.agreement["a_right_b_wrong"] == [] and r.agreement["a_wrong_b_right"] == []
    assert r.agreement["same_prediction"] == 1.0


def test_two_models_module_outputs_and_mistakes(pair):
    test = load_data("digits:test")
    r = model_similarity(pair[0], pair[1], build_model(SPEC), test, batch_size=100)
    assert [m["module"] for m in r.modules] == ["conv1", "conv2", "conv3", "fc"]
    # the 'fc' unit's output is the logits: recompute its CKA by hand from plain forward passes
    models = []
    for p in pair:
        m = build_model(SPEC)
        m.load_state_dict(ws.load(p).materialise())
        models.append(m.eval())
    with torch.no_grad():
        la, lb = models[0](test.x), models[1](test.x)
    fc = r.modules[-1]
    assert fc["linear_cka"] == pytest.approx(linear_cka(la, lb), abs=1e-6)
    assert fc["features"] == 10
    conv1 = r.modules[0]
    assert conv1["features"] == 8 * 8 * 8  # bn1's output (the unit's last module), flattened
    assert 0 < fc["linear_cka"] < 1
    # L2 per module over parameters only, and the totals add up
    assert sum(m["l2"] ** 2 for m in r.modules) == pytest.approx(r.total["l2"] ** 2, rel=1e-9)
    d = ws.distance(pair[0], pair[1], per_module=True)
    conv2 = next(x for x in d["modules"] if x["module"] == "conv2")  # no buffers in conv2
    assert r.modules[1]["l2"] > 0 and conv2["l2"] < r.modules[1]["l2"] + 1e-9
    # the 2×2 table and the indices of each off-diagonal cell
    ag = r.agreement
    c = ag["counts"]
    assert sum(c.values()) == len(test)
    ra, rb = la.argmax(1) == test.y, lb.argmax(1) == test.y
    assert ag["a_right_b_wrong"] == torch.nonzero(ra & ~rb).squeeze(1).tolist()
    assert ag["a_wrong_b_right"] == torch.nonzero(~ra & rb).squeeze(1).tolist()
    assert c["a_right_b_wrong"] == len(ag["a_right_b_wrong"]) and c["both_right"] == int((ra & rb).sum())
    # minibatch CKA matrix: A's modules × B's, its diagonal is the per-module value
    assert len(r.matrix) == 4 and all(len(row) == 4 for row in r.matrix)
    assert [r.matrix[i][i] for i in range(4)] == [m["minibatch_cka"] for m in r.modules]


def test_large_sets_fall_back_to_minibatch_cka(pair):
    test = load_data("digits:test")
    r = model_similarity(pair[0], pair[1], build_model(SPEC), test, batch_size=90, full_limit=100, cross=False,
                   modules="tree:layer")
    assert all("linear_cka" not in m and m["minibatch_cka"] is not None for m in r.modules)
    assert r.notes and "minibatch" in r.notes[0]
    assert r.matrix == []


def test_prediction_agreement_counts():
    y = torch.tensor([0, 1, 2, 0])
    la = torch.eye(3)[torch.tensor([0, 1, 0, 1])]
    lb = torch.eye(3)[torch.tensor([0, 2, 2, 0])]
    ag = prediction_agreement(la, lb, y)
    assert ag["counts"] == {"both_right": 1, "a_right_b_wrong": 1, "a_wrong_b_right": 2, "both_wrong": 0}
    assert ag["a_right_b_wrong"] == [1] and ag["a_wrong_b_right"] == [2, 3]


def test_cli_similarity(cli, pair, tmp_path):
    out = tmp_path / "sim"
    r = cli("similarity", pair[0], pair[1], "--model", SPEC, "--data", "digits:val", "--out", out, "--json",
            "--quiet", "--batch-size", "64", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    assert [m["module"] for m in payload["modules"]] == ["conv1", "conv2", "conv3", "fc"]
    for f in ("results.json", "similarity.csv", "agreement.csv", "cka.png", "cka_matrix.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = cli("similarity", pair[0], pair[1], "--model", SPEC, "--data", "digits:val", "--out", out, "--quiet")
    assert again.exit_code == 2 and "already exists" in again.stderr
    table = cli("similarity", pair[0], pair[1], "--model", SPEC, "--data", "digits:val", "--quiet", "--max-indices", "3")
    assert table.exit_code == 0 and "| A right |" in table.stdout and "a_right_b_wrong:" in table.stdout
