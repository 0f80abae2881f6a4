"""Fisher merging and RegMean against direct computations on small trained models: the Fisher from one backward
pass per example and class, RegMean from the layer inputs collected by hand and the least-squares optimum."""
from __future__ import annotations

import pytest
import torch
from conftest import make_mlp
from safetensors.torch import save_file

from weightspace.errors import ConfigError
from weightspace.eval.data import TensorData
from weightspace.search.fisher import diagonal_fisher, fisher_merge
from weightspace.search.regmean import regmean_merge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, trained_mlps, digits):
    d = tmp_path_factory.mktemp("datamerge")
    paths = []
    for i, sd in enumerate(trained_mlps):
        p = d / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, p)
        paths.append(p)
    x, y = digits
    data = [TensorData(f"part{i}", x[i * 40:(i + 1) * 40].contiguous(), y[i * 40:(i + 1) * 40], num_classes=10)
            for i in range(3)]
    return paths, data


def direct_fisher(sd, data):
    """Σ_x Σ_y p(y|x)·(∂ log p(y|x)/∂θ)² / n, one backward pass per example and class."""
    model = make_mlp()
    model.load_state_dict(sd)
    model.eval()
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
    for x in data.x:
        logp = torch.log_softmax(model(x[None].float()), dim=-1)[0]
        for c in range(logp.numel()):
            model.zero_grad()
            logp[c].backward(retain_graph=True)
            for k, p in model.named_parameters():
                total[k] += float(logp[c].detach().exp()) * p.grad.double() ** 2
    return {k: v / len(data.x) for k, v in total.items()}


def test_fisher_equals_the_direct_computation(setup, trained_mlps):
    paths, data = setup
    small = TensorData("small", data[0].x[:8].contiguous(), data[0].y[:8], num_classes=10)
    fast = diagonal_fisher(make_mlp(), trained_mlps[0], small, batch_size=3)
    slow = direct_fisher(trained_mlps[0], small)
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-5, atol=1e-9), k
    merged = fisher_merge(paths, make_mlp(), data, fisher_floor=1e-6)
    fishers = [diagonal_fisher(make_mlp(), sd, ds) for sd, ds in zip(trained_mlps, data)]
    diffs = []
    for k, v in merged.items():
        if k in fishers[0]:
            f = [fi[k] + 1e-6 for fi in fishers]
            ref = sum(fi * sd[k].double() for fi, sd in zip(f, trained_mlps)) / sum(f)
            diffs.append(float((v.double() - ref).abs().max()))
        elif v.is_floating_point():  # BatchNorm statistics: the plain mean
            diffs.append(float((v - sum(sd[k] for sd in trained_mlps) / 3).abs().max()))
        else:
            assert torch.equal(v, max(sd[k] for sd in trained_mlps))
    assert max(diffs) < 1e-5
    # negative control: Fisher weights really differ from the plain average
    k = next(k for k in merged if k in fishers[0] and merged[k].dim() == 2)
    plain = sum(sd[k] for sd in trained_mlps) / 3
    assert float((merged[k] - plain).abs().max()) > 1e-3
    assert merged.provenance["op"] == "fisher"


def test_regmean_is_the_least_squares_optimum(setup, trained_mlps):
    paths, data = setup
    merged = regmean_merge(paths, make_mlp(), data, alpha=1.0)
    linears = [k for k, v in trained_mlps[0].items() if v.dim() == 2]
    for k in linears:
        layer = k.rsplit(".", 1)[0]
        xs = []
        for sd, ds in zip(trained_mlps, data):
            model = make_mlp()
            model.load_state_dict(sd)
            model.eval()
            got = []
            h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o, got=got: got.append(i[0].double()))
            with torch.no_grad():
                model(ds.x.float())
            h.remove()
            xs.append(got[0])
        # the merged W minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²/n_t: its gradient vanishes (on the inputs' span)
        w = merged[k].double()
        grad = sum(x.T @ (x @ w.T - x @ sd[k].double().T) / len(x) for x, sd in zip(xs, trained_mlps))
        assert float(grad.abs().max()) < 1e-6, k
        # and equals the closed form computed here
        gram = sum(x.T @ x / len(x) for x in xs)
        rhs = sum(x.T @ x / len(x) @ sd[k].double().T for x, sd in zip(xs, trained_mlps))
        act = torch.diagonal(gram) > 0
        ref = (sum(sd[k].double() for sd in trained_mlps) / 3).clone()
        ref[:, act] = torch.linalg.solve(gram[act][:, act], rhs[act]).T
        assert float((w - ref).abs().max()) < 1e-5, k
    for k, v in merged.items():  # everything else is the mean
        if k not in linears and v.is_floating_point():
            assert torch.allclose(v, sum(sd[k] for sd in trained_mlps) / 3, atol=1e-6), k
    assert float((merged[linears[0]] - sum(sd[linears[0]] for sd in trained_mlps) / 3).abs().max()) > 1e-3
    with pytest.raises(ConfigError, match="alpha"):
        regmean_merge(paths, make_mlp(), data, alpha=1.5)
