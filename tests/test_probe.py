"""Feature taps and layer probes: pooling rule, one backbone pass per dataset, caches, perfect-label layer, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from probehelpers import TINY_CNN, LabelCarrier, label_data, tiny_checkpoints  # noqa: F401

from weightspace.analysis.probe import fit_linear, probe_features
from weightspace.analysis.taps import FeatureTaps, pool_features, resolve_taps
from weightspace.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def block_mean(a: torch.Tensor, k: int) -> torch.Tensor:
    """Non-overlapping k×k means written out by hand (the reference for the pooling rule)."""
    n, c, h, w = a.shape
    a = a[:, :, : h // k * k, : w // k * k]
    return a.reshape(n, c, h // k, k, w // k, k).mean(dim=(3, 5)).flatten(1)


def test_pool_features_follows_head2toe_rule():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 16, 32, 32, generator=g)
    # C=16 < T=256: s = floor(sqrt(256 // 16)) = 4, window 32 // 4 = 8 → 16·4·4 = 256 features
    out = pool_features(a, 256)
    assert out.shape == (3, 256)
    torch.testing.assert_close(out, block_mean(a, 8))
    # C ≥ T: global average pooling
    torch.testing.assert_close(pool_features(a, 16), a.mean(dim=(2, 3)))
    # small maps are kept whole (window 1)
    assert torch.equal(pool_features(a[:, :, :4, :4], 8192), a[:, :, :4, :4].flatten(1))
    # 1-D signals (N, C, L): s = T // C positions, window L // s
    sig = torch.randn(2, 4, 40, generator=g)
    torch.testing.assert_close(pool_features(sig, 40, "NCL"), sig.reshape(2, 4, 10, 4).mean(3).flatten(1))
    # token sequences (N, L, C): the same in 1-D over tokens
    tok = sig.transpose(1, 2).contiguous()
    torch.testing.assert_close(pool_features(tok, 40, "NLC"), pool_features(sig, 40, "NCL"))
    # flat features: kept up to T, pooled as one channel beyond
    flat = torch.randn(2, 100, generator=g)
    assert torch.equal(pool_features(flat, 100), flat)
    torch.testing.assert_close(pool_features(flat, 50), flat.reshape(2, 50, 2).mean(2))


def test_layer_specs_on_a_real_cnn():
    from weightspace.eval.zoo import small_cnn
    m = small_cnn(width=4).eval()
    x = torch.zeros(1, 1, 8, 8)
    names = [t.name for t in resolve_taps(m, "all", x)]
    # leaves in execution order; the linear classifier is replaced by its input (the pre-logits features)
    assert names == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "pool", "fc:in"]
    assert [t.name for t in resolve_taps(m, "fc:in, conv2", x)] == ["conv2", "fc:in"]  # depth order
    assert [t.name for t in resolve_taps(m, "depth:1", x)] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc"]
    with pytest.raises(ConfigError, match="no module 'conv9'"):
        resolve_taps(m, "conv9", x)


def test_taps_see_activations_before_inplace_ops():
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 3)).eval()
    from weightspace.eval.data import TensorData
    g = torch.Generator().manual_seed(1)
    data = TensorData("d", torch.randn(50, 6, generator=g), torch.zeros(50, dtype=torch.long), num_classes=3)
    feats = FeatureTaps(net, "0,1", device="cpu")(data)
    with torch.no_grad():
        pre = net[0](data.x)
    torch.testing.assert_close(feats.x["0"], pre)   # still negative where the in-place ReLU later zeroed it
    assert (feats.x["0"] < 0).any()
    torch.testing.assert_close(feats.x["1"], pre.clamp_min(0))


def test_one_pass_per_dataset_and_disk_cache(tmp_path):
    from weightspace.eval.data import load_data
    from weightspace.eval.zoo import small_cnn
    torch.manual_seed(0)
    m = small_cnn(width=4)
    data = load_data("digits:test")
    taps = FeatureTaps(m, "all", target=64, device="cpu", cache_dir=tmp_path)
    a = taps(data)
    assert taps(data) is a and taps.forward_passes == 1
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1
    fresh = FeatureTaps(m, "all", target=64, device="cpu", cache_dir=tmp_path)
    b = fresh(data)
    assert fresh.forward_passes == 0 and b.layers == a.layers
    assert all(torch.equal(a.x[k], b.x[k]) for k in a.layers)
    with torch.no_grad():  # new weights copied in place: the cache must not answer for them
        m.conv1.weight.mul_(2)
    c = fresh(data)
    assert fresh.forward_passes == 1 and not torch.equal(c.x["conv1"], a.x["conv1"])


def test_probe_on_a_layer_that_is_the_label_reaches_100_percent():
    model = LabelCarrier().eval()
    taps = FeatureTaps(model, "label,noise", device="cpu")
    train, test = taps(label_data(600, 0)), taps(label_data(400, 1))
    rows = {r["layer"]: r for r in probe_features(train, test)}
    assert rows["label"]["test_accuracy"] == 1.0 and rows["label"]["train_accuracy"] == 1.0
    assert rows["noise"]["test_accuracy"] < 0.3  # pure noise: near chance (10 classes)


def test_linear_head_is_deterministic_and_standardises():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    a = fit_linear(x, y, 2)
    b = fit_linear(x * 1000 + 7, y, 2)  # z-scoring makes the probe blind to feature scale and offset
    assert torch.equal(a.weight, fit_linear(x, y, 2).weight)
    assert torch.equal(a.predict(x), b.predict(x * 1000 + 7))
    assert a.accuracy(x, y) > 0.95


def test_probe_cli_end_to_end(cli, tmp_path, tiny_checkpoints):
    out = tmp_path / "probe"
    args = ["probe", *tiny_checkpoints, "--model", TINY_CNN, "--train", "digits:train", "--test", "digits:test",
            "--dim", "64", "--device", "cpu", "--out", out, "--quiet"]
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.png", "results.json"]
    assert res["forward_passes"] == 4  # two checkpoints × (train, test), never more
    labels = [r["checkpoint"] for r in res["rows"]]
    assert labels[0] == "ep1" and labels[-1] == "ep3"
    last = [r for r in res["rows"] if r["layer"] == "fc:in"]
    assert len(last) == 2 and all(r["test_accuracy"] > 0.5 for r in last)  # a really trained net transfers
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    again = cli(*args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    md = cli(*args, "--force", "--layers", "fc:in")
    assert md.exit_code == 0 and "| ep3 | 0 | fc:in |" in md.stdout


def test_checkpoints_with_different_heads_share_one_plot(tmp_path, tiny_checkpoints):
    """A pre-training checkpoint (5-class head) beside a 10-class one: same backbone, so the same probe rows."""
    import weightspace as ws
    from weightspace.analysis.probe import probe
    sd = ws.load(tiny_checkpoints[0]).materialise()
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:5].clone(), sd["fc.bias"][:5].clone()
    five = tmp_path / "pretrain5.safetensors"
    ws.save(sd, five)
    res = probe([str(five), tiny_checkpoints[0]], TINY_CNN, "digits:train?limit=300", "digits:test", dim=32,
                device="cpu")
    a = [r for r in res.rows if r["checkpoint"] == "pretrain5"]
    b = [r for r in res.rows if r["checkpoint"] == "ep1"]
    assert [r["layer"] for r in a] == [r["layer"] for r in b] and len(a) == 8
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    assert res.config["forward_passes"] == 4
