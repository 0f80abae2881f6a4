"""Learned soups (coefficients optimised on validation data) and merges as leaderboard rows / λ picked on --val."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_mlp
from evalhelpers import save_all, train_cnns
from weightspace import load
from weightspace.eval.data import TensorData
from weightspace.errors import ConfigError
from weightspace.search.learned import learned_soup

pytestmark = pytest.mark.usefixtures("one_thread")
CNN = "weightspace.eval.zoo:small_cnn?width=4"


@pytest.fixture(scope="module")
def val(digits) -> TensorData:
    x, y = digits
    return TensorData("val", x[1200:].contiguous(), y[1200:], num_classes=10)


@pytest.mark.parametrize("by_layer", [False, True])
def test_one_ingredient_returns_it(trained_mlps, val, by_layer):
    soup, res = learned_soup([trained_mlps[0]], make_mlp(), val, steps=5, by_layer=by_layer)
    assert soup.keys() == trained_mlps[0].keys()
    for k, v in trained_mlps[0].items():
        assert soup[k].dtype == v.dtype and torch.equal(soup[k], v), k
    assert res.coefficients == [1.0] and soup.provenance["coefficients"] == [1.0]


def test_learned_coefficients_lower_the_validation_loss(trained_mlps, val):
    found = learned_soup(trained_mlps, make_mlp(), val, steps=40, lr=0.1)
    soup, res = found.weights, found.record
    assert res.val_learned["loss"] < res.val_uniform["loss"]  # starts at the uniform soup, descends from there
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert sum(res.coefficients) == pytest.approx(1.0) and len(set(res.coefficients)) == 3
    # the soup is Σ c_i θ_i with the recorded coefficients; integer buffers come from the first ingredient
    c = soup.provenance["coefficients"]
    for k, v in soup.items():
        if v.is_floating_point():
            assert torch.allclose(v, sum(ci * sd[k] for ci, sd in zip(c, trained_mlps)), atol=1e-6), k
        else:
            assert torch.equal(v, trained_mlps[0][k])
    assert [i["coefficient"] for i in soup.provenance["ingredients"]] == c
    assert soup.provenance["op"] == "learned_soup" and soup.provenance["val"] == "val"


def test_by_layer_learns_a_mix_per_tensor(trained_mlps, val):
    soup, res = learned_soup(trained_mlps, make_mlp(), val, steps=20, lr=0.1, by_layer=True, batch_size=128)
    floats = [k for k, v in trained_mlps[0].items() if v.is_floating_point()]
    assert list(res.by_tensor) == floats
    assert all(sum(c) == pytest.approx(1.0) for c in res.by_tensor.values())
    assert len({tuple(c) for c in res.by_tensor.values()}) > 1  # tensors really got their own coefficients
    k = "features.0.weight"
    assert torch.allclose(soup[k], sum(ci * sd[k] for ci, sd in zip(res.by_tensor[k], trained_mlps)), atol=1e-6)
    assert soup.provenance["coefficients_by_tensor"] == res.by_tensor
    with pytest.raises(ConfigError, match="at least one ingredient"):
        learned_soup([], make_mlp(), val)


# ------------------------------------------------------------------------------------------ the CLI, end to end
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three small CNNs trained from one shared init (ingredients), and that init (the merges' base), as files."""
    from weightspace import save
    from weightspace.eval.models import build_model
    d = tmp_path_factory.mktemp("learned")
    torch.manual_seed(1000)  # the init train_cnns(shared_init=True) starts from
    base = str(save(build_model(CNN, num_classes=10).state_dict(), d / "base.safetensors"))
    return d, base, save_all(train_cnns([1, 2, 3], shared_init=True, epochs=1, spec=CNN), d, "ft")


def test_cli_learned_soup_and_merges_in_the_leaderboard(cli, files):
    d, base, fts = files
    out = d / "learned.safetensors"
    r = cli("soup", "--learned", *fts, "--model", CNN, "--val", "digits:val", "--test", "digits:test",
            "--learn-steps", "15", "--merge", "ties", "--merge", "task-arithmetic", "--base", base, "--scales",
            "0.5,1.0", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {row["method"]: row for row in res["leaderboard"]["rows"]}
    learned = rows["learned soup"]
    prov = load(out).provenance
    assert prov["op"] == "learned_soup" and prov["coefficients"] == res["learned"]["coefficients"]
    assert prov["val_score"] == learned["metrics"]["digits:val"]["accuracy"]
    again = json.loads(cli("leaderboard", out, "--model", CNN, "--data", "digits:val", "--json", "--quiet").stdout)
    assert again["leaderboard"]["rows"][0]["metrics"]["digits:val"]["accuracy"] == prov["val_score"]
    merges = [row for row in res["leaderboard"]["rows"] if row["kind"] == "merge"]
    assert [m["method"].split(" ")[0] for m in merges] == ["ties", "task-arithmetic"]
    for m in merges:
        scores = dict((lam, s) for lam, s in m["scale_scores"])
        assert m["scale"] in (0.5, 1.0) and scores[m["scale"]] == max(scores.values())
        assert m["scale_scores"] and set(m["metrics"]) == {"digits:val", "digits:test"}
    bad = cli("soup", *fts, "--model", CNN, "--val", "digits:val", "--merge", "ties")
    assert bad.exit_code == 2 and "--base" in bad.stderr


def test_cli_merge_picks_lambda_on_val(cli, files):
    d, base, fts = files
    out = d / "ta.safetensors"
    r = cli("merge", "--method", "task-arithmetic", "--base", base, *fts, "--model", CNN, "--val", "digits:val",
            "--scales", "0.2,0.6,1.0", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    accs = {s["scale"]: s["val_accuracy"] for s in res["scores"]}
    assert list(accs) == [0.2, 0.6, 1.0] and accs[res["scale"]] == max(accs.values())
    prov = load(out).provenance
    assert prov["scale"] == res["scale"] and prov["scale_search"]["grid"] == [0.2, 0.6, 1.0]
    lb = json.loads(cli("leaderboard", out, "--model", CNN, "--data", "digits:val", "--json", "--quiet").stdout)
    assert lb["leaderboard"]["rows"][0]["metrics"]["digits:val"]["accuracy"] == accs[res["scale"]]
