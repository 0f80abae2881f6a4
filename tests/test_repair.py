"""REPAIR: repair points, exact target statistics on data, identity at an end point, curves, soups and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from evalhelpers import save_all, train_cnns
from weightspace import load
from weightspace.eval.data import TensorData, load_data
from weightspace.errors import ConfigError
from weightspace.eval.evaluator import Evaluator
from weightspace.analysis.curve import interpolation_curve
from weightspace.ops.stream import lerp
from weightspace.eval.repair import Repairer, channel_stats, mix_stats, repair_scope
from weightspace.eval.train import train
from weightspace.eval.zoo import mlp, small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
CNN = "weightspace.eval.zoo:small_cnn?width=4"


@pytest.fixture(scope="module")
def nets(digits):
    """Random-init pairs: a CNN with BatchNorm on the 8×8 digits:train images, a BN-free MLP on flat digits."""
    x, y = digits
    flat = TensorData("digits", x[:1000].contiguous(), y[:1000], num_classes=10)
    pair = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = mlp(hidden=32)
        train(net, flat, epochs=2, lr=0.05, batch_size=64, seed=seed)
        pair.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    img = load_data("digits:train")
    img.name = "digits"
    return {"bn": (lambda: small_cnn(width=4), img, train_cnns([1, 2], shared_init=False, epochs=2, spec=CNN)),
            "no-bn": (lambda: mlp(hidden=32), flat, pair)}


def test_scope_finds_bn_outputs_and_bn_free_layers_but_not_the_logits():
    cnn = repair_scope(small_cnn(width=4), torch.zeros(2, 1, 8, 8))
    assert [(p.name, p.kind, p.channels) for p in cnn.points] == [("bn1", "batchnorm", 4), ("bn2", "batchnorm", 8),
                                                                 ("bn3", "batchnorm", 16)]
    assert cnn.skipped == [("fc", "produces the model's output")]  # conv1..3 feed BatchNorms: their BN is repaired
    m = repair_scope(mlp(hidden=32), torch.zeros(2, 64))
    assert [(p.name, p.kind, p.dim) for p in m.points] == [("layers.1", "linear", -1), ("layers.3", "linear", -1)]

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, bias=False)       # no BN after it, no bias: cannot absorb a shift
            self.bn = nn.BatchNorm2d(3, affine=False)
            self.shared = nn.Linear(3, 3)                      # called twice
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = self.bn(torch.relu(self.conv(x))).mean((2, 3))
            return self.head(self.shared(self.shared(h)))

    odd = repair_scope(Odd(), torch.zeros(2, 1, 5, 5))
    assert odd.points == []
    assert dict(odd.skipped) == {"conv": "no bias to absorb the shift (and no BatchNorm after it)",
                                 "bn": "BatchNorm without affine parameters",
                                 "shared": "called more than once per forward", "head": "produces the model's output"}


@pytest.mark.parametrize("kind", ["bn", "no-bn"])
def test_repair_matches_the_target_statistics_on_data(nets, kind):
    factory, data, (a, b) = nets[kind]
    ev = Evaluator(factory(), data, device="cpu")
    rep = Repairer(ev, data, batch_size=len(data))  # one batch: the match is exact (up to ε)
    rep.add(a)
    rep.add(b)
    alpha = 0.4
    target = mix_stats(rep.stats, [1 - alpha, alpha])
    ev.load(lerp(a, b, alpha))
    before = channel_stats(ev.model, data, rep.scope)
    # the variance collapse REPAIR is for: the mixed net's activations are too narrow somewhere
    assert min(float((before[n][1] / target[n][1].clamp(min=1e-3)).min()) for n in target) < 0.9
    rep.repair([1 - alpha, alpha])
    after = channel_stats(ev.model, data, rep.scope)
    for name, (t_mean, t_std) in target.items():
        m, s = after[name]
        live = t_std > 0.05
        assert torch.allclose(m, t_mean, atol=2e-4 * (1 + float(t_mean.abs().max()))), name
        assert torch.allclose(s[live], t_std[live], rtol=1e-3), name
    # with several batches each point is normalised with batch statistics on the way, as BatchNorm does:
    # close to the target, not exact
    ev.load(lerp(a, b, alpha))
    rep.batch_size = 128
    rep.repair([1 - alpha, alpha])
    approx = channel_stats(ev.model, data, rep.scope)
    for name, (_t_mean, t_std) in target.items():
        live = t_std > 0.05
        assert torch.allclose(approx[name][1][live], t_std[live], rtol=0.1), name


def test_repairing_an_end_point_toward_its_own_statistics_changes_nothing(nets):
    factory, data, (a, b) = nets["bn"]
    ev = Evaluator(factory(), data, device="cpu", keep_logits=True)
    rep = Repairer(ev, data, batch_size=len(data))
    rep.add(a)
    rep.add(b)
    plain = ev(a).logits["digits"]
    ev.load(a)
    rep.repair([1.0, 0.0])
    repaired = ev().logits["digits"]
    assert float((plain - repaired).abs().max()) < 1e-3 * float(plain.abs().max())


def test_curve_with_repair_keeps_the_ends_and_records_it(nets):
    factory, data, (a, b) = nets["bn"]
    ev = Evaluator(factory(), data, device="cpu")
    plain = interpolation_curve(a, b, ev, steps=3, progress=False)
    fixed = interpolation_curve(a, b, ev, steps=3, repair=data, progress=False)
    for i in (0, 2):
        assert fixed.metrics[i]["digits"]["accuracy"] == pytest.approx(plain.metrics[i]["digits"]["accuracy"], abs=2 / len(data))
    assert fixed.to_dict()["repair"] == "digits"
    # variance collapse makes the plain midpoint near chance; REPAIR restores it
    assert fixed.metrics[1]["digits"]["error"] < plain.metrics[1]["digits"]["error"]
    with pytest.raises(ConfigError, match="needs an Evaluator"):
        interpolation_curve(a, b, lambda w: 0.5, steps=2, repair=data, progress=False)


# ------------------------------------------------------------------------------------------ the CLI, end to end
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, nets):
    """The random-init CNN pair and three models trained from one shared init (soup ingredients), as files."""
    d = tmp_path_factory.mktemp("repair")
    paths = dict(zip(("r1", "r2"), save_all(nets["bn"][2], d, "r")))
    paths.update(zip(("ft0", "ft1", "ft2"), save_all(train_cnns([10, 11, 12], shared_init=True, epochs=1, spec=CNN),
                                                      d, "ft")))
    return d, paths


def test_cli_interpolate_align_compares_barriers_before_and_after(cli, ckpts):
    d, p = ckpts
    out = d / "curves"
    r = cli("interpolate", p["r1"], p["r2"], "--model", CNN, "--data", "digits:test", "--steps", "3", "--align",
            "--recalibrate-bn", "digits:train", "--repair", "digits:train", "--out", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    (entry,) = res["alignment"]
    assert entry["method"] == "weights" and entry["l2_after"] < entry["l2_before"]
    assert entry["labels"] == ["r0–r1", "r0–P(r1)"]
    curves = json.loads((out / "curve.json").read_text())["curves"]
    assert [c["label"] for c in curves] == entry["labels"] and all(c["repair"] == "digits:train" for c in curves)
    assert entry["before"] == curves[0]["barriers"] and entry["after"] == curves[1]["barriers"]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "alignment (weights matching): error barrier on digits:test" in r.stdout
    bad = cli("interpolate", p["r1"], p["r2"], "--model", CNN, "--data", "digits:test", "--align-method", "weights")
    assert bad.exit_code == 2 and "--align" in bad.stderr


@pytest.mark.parametrize("fix,method", [("--recalibrate-bn", "uniform"), ("--repair", "greedy")])
def test_cli_soup_saves_the_statistics_that_produced_its_score(cli, ckpts, fix, method):
    d, p = ckpts
    out = d / f"soup{fix}.safetensors"
    r = cli("soup", f"--{method}", p["ft0"], p["ft1"], p["ft2"], "--model", CNN, "--val", "digits:val",
            fix, "digits:train", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    reported = next(row for row in res["leaderboard"]["rows"] if row["method"] == f"{method} soup")
    prov = load(out).provenance
    assert prov[fix.strip("-").replace("-", "_")] == "digits:train"
    if method == "greedy":  # its decisions were taken on repaired candidates: the score is the last accepted one
        assert prov["soup_val_score"] == reported["metrics"]["digits:val"]["accuracy"]
        assert res["greedy"]["score"] == prov["soup_val_score"]
    # the saved file, evaluated as it is (no fix), scores what the leaderboard reported
    again = json.loads(cli("leaderboard", out, "--model", CNN, "--data", "digits:val", "--json", "--quiet").stdout)
    assert again["leaderboard"]["rows"][0]["metrics"]["digits:val"]["accuracy"] == reported["metrics"]["digits:val"]["accuracy"]
    # and it differs from the plain average (the statistics really were fixed)
    plain = load(p["ft0"])
    key = "bn1.running_var" if fix == "--recalibrate-bn" else "bn1.weight"
    kept = res["greedy"]["kept"] if method == "greedy" else [p["ft0"], p["ft1"], p["ft2"]]
    avg = sum(load(k)[key] for k in kept) / len(kept)
    assert not torch.allclose(load(out)[key], avg.to(plain[key].dtype))
