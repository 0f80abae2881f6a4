"""Permutation alignment: groups derived from the graph, function preserved exactly, identity on itself, real gains."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import weightspace as ws
from weightspace.search.align import (AlignmentError, align, apply_permutations, permutation_spec,
                                        random_permutations)
from weightspace.errors import IncompatibleCheckpoints


class MLP(nn.Module):
    def __init__(self, hidden: int = 48, bn: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.fc2 = nn.Linear(hidden, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.fc1(x.flatten(1))))
        return self.fc3(F.relu(self.fc2(x)))


class PlainCNN(nn.Module):
    """conv-BN-ReLU ×2, max-pool, then a flatten of 16 channels × 4×4 positions into a Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.features(x.view(x.size(0), 1, 8, 8))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class CatNet(nn.Module):
    """Two branches joined by torch.cat: alignment does not understand cat, so both branches must stay fixed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(64, 16)
        self.mid = nn.Linear(32, 24)
        self.out = nn.Linear(24, 10)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.out(F.relu(self.mid(h)))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics, so a wrong permutation cannot go unnoticed."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.3)
            m.bias.data.normal_(0, 0.3)
    return model.eval()


def _logits(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model.eval()(x)


def _copy(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5


@pytest.fixture(scope="module")
def digit_mlps(digits):
    """Two MLPs (no shared init) really trained on sklearn digits (train split: the first 1,400)."""
    x, y = digits
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~10× faster than two when the cores are shared
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = MLP(hidden=64, bn=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(8):
            for idx in torch.randperm(1400, generator=g).split(64):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        out.append(_copy(model.eval()))
    torch.set_num_threads(threads)
    return out


def test_mlp_groups_and_function(digits):
    model = _randomised(MLP(), 0)
    spec = permutation_spec(model)
    assert [(g.name, g.size) for g in spec.groups] == [("fc1", 48), ("fc2", 32)]
    hidden = {(k, a) for k, a, _ in spec.groups[0].axes}
    assert hidden == {("fc1.weight", 0), ("fc1.bias", 0), ("bn.weight", 0), ("bn.bias", 0), ("bn.running_mean", 0),
                      ("bn.running_var", 0), ("fc2.weight", 1)}
    assert "fc3" in spec.fixed  # the logits are never permuted
    sd = _copy(model)
    x = digits[0][:200]
    for seed in range(3):
        assert _close(_logits(model, sd, x), _logits(model, apply_permutations(sd, spec, random_permutations(spec, seed)), x))
    b = _copy(_randomised(MLP(), 1))
    aligned, info = align(sd, b, model)
    assert _close(_logits(model, b, x), _logits(model, aligned, x))
    assert info["converged"] and info["l2_after"] < info["l2_before"]


def test_plain_cnn_with_bn_and_flatten(digits):
    model = _randomised(PlainCNN(), 0)
    spec = permutation_spec(model)
    assert [(g.name, g.size) for g in spec.groups] == [("features.0", 8), ("features.3", 16), ("fc1", 32)]
    # 16 channels × 4×4 positions flattened into fc1: fc1's input axis moves in blocks of 16 entries.
    assert ("fc1.weight", 1, 16) in spec.groups[1].axes
    assert ("features.4.running_var", 0, 1) in spec.groups[1].axes
    x = digits[0][:200]
    a, b = _copy(model), _copy(_randomised(PlainCNN(), 1))
    assert _close(_logits(model, a, x), _logits(model, apply_permutations(a, spec, random_permutations(spec, 5)), x))
    aligned, info = align(a, b, model, seed=3)
    assert _close(_logits(model, b, x), _logits(model, aligned, x))
    assert info["l2_after"] < info["l2_before"] and not info["identity"]
    assert aligned.provenance["op"] == "align" and len(aligned.provenance["ingredients"]) == 2


def test_timm_resnet18_groups_and_function():
    model = _randomised(timm.create_model("resnet18", num_classes=10), 0)
    spec = permutation_spec(model)
    # 4 residual streams (the stem joins layer1's, which has no downsample) + one inner group per BasicBlock.
    assert len(spec.groups) == 12
    streams = {g.name: g for g in spec.groups if len(g.producers) > 1}
    assert sorted((n, g.size) for n, g in streams.items()) == [
        ("conv1", 64), ("layer2.0.conv2", 128), ("layer3.0.conv2", 256), ("layer4.0.conv2", 512)]
    assert sorted(streams["layer2.0.conv2"].producers) == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    keys = {k for k, _, _ in streams["layer4.0.conv2"].axes}
    assert {"fc.weight", "layer4.1.bn2.running_mean", "layer4.0.downsample.1.weight", "layer4.1.conv1.weight"} <= keys
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = _copy(model)
    assert _close(_logits(model, a, x), _logits(model, apply_permutations(a, spec, random_permutations(spec, 1)), x))
    b = _copy(_randomised(timm.create_model("resnet18", num_classes=10), 1))
    aligned, info = align(a, b, model, max_rounds=1, example_input=x)  # one round keeps the test quick
    assert _close(_logits(model, b, x), _logits(model, aligned, x))
    assert info["max_abs_output_change"] <= 1e-5 and info["l2_after"] < info["l2_before"]


def test_timm_resnet50_groups_and_function():
    model = _randomised(timm.create_model("resnet50", num_classes=10), 0)
    spec = permutation_spec(model)
    # stem + 4 residual streams + two inner groups per Bottleneck (16 blocks).
    assert len(spec.groups) == 1 + 4 + 32
    assert sorted(g.size for g in spec.groups if len(g.producers) > 1) == [256, 512, 1024, 2048]
    # In float64: 50 layers with random BatchNorm statistics give logits of ~10, whose float32 rounding alone nears 1e-5.
    model = model.double()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = _copy(model)
    assert _close(_logits(model, a, x), _logits(model, apply_permutations(a, spec, random_permutations(spec, 2)), x))


def test_aligning_to_itself_is_the_identity(digit_mlps, digits):
    model = MLP(hidden=64, bn=False)
    a = digit_mlps[0]
    for method in ("weights", "activations"):
        out, info = align(a, a, model, method=method, data=digits[0][:512])
        assert info["identity"], method
        assert all(torch.equal(out[k], a[k]) for k in a)
    cnn = _randomised(PlainCNN(), 4)
    out, info = align(_copy(cnn), _copy(cnn), cnn)
    assert info["identity"] and info["rounds"] == 1 and info["l2_after"] == 0.0


def test_recovers_a_known_permutation(digit_mlps, digits):
    # B is a secretly permuted copy of A: both matchings must undo the permutation exactly.
    model = MLP(hidden=64, bn=False)
    a = digit_mlps[1]
    spec = permutation_spec(model)
    b = apply_permutations(a, spec, random_permutations(spec, 7))
    assert not torch.equal(b["fc1.weight"], a["fc1.weight"])
    for method in ("weights", "activations"):
        out, info = align(a, b, model, method=method, data=[(digits[0][:300], digits[1][:300])])
        assert all(torch.equal(out[k], a[k]) for k in a), method
        assert info["l2_after"] == 0.0


def test_trained_mlps_get_closer(digit_mlps, digits):
    model = MLP(hidden=64, bn=False)
    a, b = digit_mlps
    x, y = digits
    norm = lambda p, q: float(sum(((p[k] - q[k]) ** 2).sum() for k in p)) ** 0.5  # noqa: E731
    before = norm(a, b)
    for method in ("weights", "activations"):
        out, info = align(a, b, model, method=method, data=lambda: iter([x[:700], x[700:1400]]))
        after = norm(a, out)
        assert after < 0.9 * before, (method, before, after)
        assert info["l2_before"] == pytest.approx(before, rel=1e-6) and info["l2_after"] == pytest.approx(after, rel=1e-6)
        # The same function: identical predictions on held-out digits.
        assert torch.equal(_logits(model, out, x[1400:]).argmax(1), _logits(model, b, x[1400:]).argmax(1))
    # Deterministic under a seed.
    p1, i1 = align(a, b, model, seed=11)
    p2, i2 = align(a, b, model, seed=11)
    assert i1["permutations"] == i2["permutations"] and all(torch.equal(p1[k], p2[k]) for k in p1)


def test_unknown_ops_are_left_fixed():
    model = _randomised(CatNet(), 0)
    spec = permutation_spec(model)
    assert [g.name for g in spec.groups] == ["mid"]
    assert {"a", "b"} <= set(spec.fixed)
    x = torch.randn(16, 64)
    a, b = _copy(model), _copy(_randomised(CatNet(), 1))
    aligned, info = align(a, b, model, example_input=x)
    assert _close(_logits(model, b, x), _logits(model, aligned, x))
    assert torch.equal(aligned["a.weight"], b["a.weight"])


def test_errors_are_one_line(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(AlignmentError, match="Branchy: cannot be traced"):
        permutation_spec(Branchy())
    model = MLP()
    sd = _copy(model)
    del sd["fc2.bias"]
    with pytest.raises(IncompatibleCheckpoints, match="fc2.bias"):
        align(_copy(model), sd, model)
    with pytest.raises(AlignmentError, match="needs data"):
        align(_copy(model), _copy(model), model, method="activations")
    path = tmp_path / "b.safetensors"
    ws.save(_copy(model), path)
    out, _ = align(_copy(model), path, model)  # sources of any kind
    assert out.provenance["ingredients"][1]["source"] == str(path)


def test_cli_align(cli, tmp_path, digits):
    from weightspace.eval.zoo import mlp
    x, y = digits
    paths, models = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = mlp(hidden=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for idx in torch.randperm(1400, generator=torch.Generator().manual_seed(seed)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        paths.append(tmp_path / f"m{seed}.safetensors")
        ws.save(model, paths[-1])
        models.append(model.eval())
    torch.set_num_threads(threads)
    spec = "weightspace.eval.zoo:mlp?hidden=32"
    out = tmp_path / "aligned.safetensors"
    r = cli("align", *paths, "--model", spec, "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    import json
    info = json.loads(r.stdout)
    assert info["method"] == "weights" and info["l2_after"] < info["l2_before"] and len(info["groups"]) == 2
    aligned = ws.load(out)
    model = mlp(hidden=32).eval()
    assert _close(_logits(model, dict(aligned), x), models[1](x).detach())
    assert aligned.provenance["op"] == "align"
    # --data switches to activation matching and checks B's outputs on it.
    r = cli("align", *paths, "--model", spec, "--data", "digits:val", "-o", tmp_path / "act.safetensors", "--json", "-q")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["method"] == "activations" and info["max_abs_output_change"] <= 1e-5
    # The human form prints the groups and the distances.
    r = cli("align", *paths, "--model", spec, "-o", out, "--force")
    assert r.exit_code == 0 and "| group |" in r.stdout and "‖A−P(B)‖" in r.stdout
    # Bad input: one line, exit code 2.
    r = cli("align", *paths, "--model", spec, "-o", out)
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = cli("align", *paths, "--model", spec, "--method", "activations", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "--data" in r.output + r.stderr
    r = cli("align", *paths, "--model", "weightspace.eval.zoo:mlp?hidden=16", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "has shape" in r.stderr
