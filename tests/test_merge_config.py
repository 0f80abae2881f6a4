"""`weightspace merge --config merge.yaml`: mergekit's YAML for linear, task_arithmetic and ties, meaning what it
means in mergekit (checked against mergekit's formulas transcribed here, not against our own code)."""
from __future__ import annotations

import json

import safetensors.torch as st
import torch


def _files(tmp_path, trained_mlps):
    paths = []
    for i, sd in enumerate(trained_mlps):
        p = tmp_path / f"m{i}.safetensors"
        st.save_file({k: v.contiguous() for k, v in sd.items()}, p)
        paths.append(p)
    return paths


def mergekit_ties(base, models, weights, densities, lam=1.0):
    """mergekit's generalized task arithmetic with sparsification 'magnitude' and consensus 'sum' (ties)."""
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        deltas = []
        for m, d in zip(models, densities):
            tv = m[k].float() - b.float()
            n, kk = tv.numel(), int(d * tv.numel())
            mask = torch.zeros(n, dtype=torch.bool)
            if kk > 0:
                mask[tv.abs().reshape(-1).topk(kk).indices] = True
            deltas.append(tv * mask.view_as(tv))
        deltas = torch.stack(deltas)
        w = torch.tensor(weights).view(-1, *[1] * b.dim())
        deltas = deltas * w
        majority = (deltas.sum(0) >= 0).float() * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
        out[k] = b.float() + lam * mixed / div
    return out


def test_ties_config_means_what_mergekit_means(cli, tmp_path, trained_mlps):
    base, a, b = _files(tmp_path, trained_mlps)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""\
models:
  - model: {base}
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.7
  - model: {b}
    parameters:
      density: 0.3
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
""")
    out = tmp_path / "merged.safetensors"
    r = cli("merge", "--config", cfg, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["trim"] == "per-tensor" and res["density"] == [0.5, 0.3] and res["dtype"] == "bf16"
    got = st.load_file(out)
    ref = mergekit_ties(*trained_mlps[:1], trained_mlps[1:], [0.7, 0.3], [0.5, 0.3])
    for k, v in ref.items():
        if k.endswith(("running_mean", "running_var")):  # statistics: the models' convex mean, by their weights
            v = 0.7 * trained_mlps[1][k] + 0.3 * trained_mlps[2][k]
        if v.is_floating_point():
            assert got[k].dtype == torch.bfloat16  # out_dtype
            assert torch.allclose(got[k].float(), v.to(torch.bfloat16).float(), atol=1e-2, rtol=0), k
        else:
            assert torch.equal(got[k], v)
    # the per-tensor trim really differs from the global top-k one: both are on offer, and runs say which
    r = cli("merge", "--method", "ties", "--base", base, a, b, "--density", "0.5", "-o", tmp_path / "d.safetensors")
    assert r.exit_code == 0 and "per tensor" in r.stdout
    r = cli("merge", "--method", "ties", "--base", base, a, b, "--keep", "0.5", "-o", tmp_path / "k.safetensors")
    assert r.exit_code == 0 and "whole model" in r.stdout
    d, g = st.load_file(tmp_path / "d.safetensors"), st.load_file(tmp_path / "k.safetensors")
    assert any(not torch.equal(d[k], g[k]) for k in d if d[k].is_floating_point())


def test_linear_and_task_arithmetic_configs(cli, tmp_path, trained_mlps):
    base, a, b = _files(tmp_path, trained_mlps)
    lin = tmp_path / "linear.yaml"
    lin.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 3.0}}\n  - model: {b}\n"
                   f"    parameters: {{weight: 1.0}}\nmerge_method: linear\ndtype: float32\n")
    assert cli("merge", "--config", lin, "-o", tmp_path / "lin.safetensors").exit_code == 0
    got = st.load_file(tmp_path / "lin.safetensors")
    k = "head.weight"
    assert torch.allclose(got[k], 0.75 * trained_mlps[1][k] + 0.25 * trained_mlps[2][k], atol=1e-6)
    ta = tmp_path / "ta.yaml"
    ta.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n"
                  f"    parameters: {{weight: 0.5}}\nmerge_method: task_arithmetic\nbase_model: {base}\n"
                  f"parameters: {{lambda: 2.0}}\n")
    assert cli("merge", "--config", ta, "-o", tmp_path / "ta.safetensors").exit_code == 0
    got = st.load_file(tmp_path / "ta.safetensors")
    t0, t1, t2 = (sd[k] for sd in trained_mlps)
    assert torch.allclose(got[k], t0 + 2.0 * (0.5 * (t1 - t0) + 0.5 * (t2 - t0)), atol=1e-5)


def test_what_mergekit_has_and_we_do_not_is_one_line(cli, tmp_path, trained_mlps):
    base, a, _ = _files(tmp_path, trained_mlps)
    cases = {
        "slerp": f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n",  # no t
        "slerp-gradient": f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                          f"parameters: {{t: [0, 0.5, 1]}}\n",
        "passthrough": f"merge_method: passthrough\nmodels:\n  - model: {a}\n",
        "slices": f"merge_method: linear\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n",
        "gradient": f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                    f"    parameters: {{density: [0.1, 0.5], weight: 1.0}}\n",
    }
    for name, text in cases.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text)
        r = cli("merge", "--config", cfg, "-o", tmp_path / f"{name}.safetensors")
        assert r.exit_code == 2 and str(cfg) in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not (tmp_path / f"{name}.safetensors").exists()


def test_other_methods_take_mergekit_names_and_defaults(cli, tmp_path, trained_mlps):
    """slerp (t), nuslerp (weights → t), model_stock, breadcrumbs (mergekit's default density 1: the plain sum),
    della with density and epsilon: each config equals the Python call with the options mergekit's names mean."""
    from weightspace.ops.merge import merge
    base, a, b = _files(tmp_path, trained_mlps)
    m = f"models:\n  - model: {a}\n    parameters: {{weight: 0.25}}\n  - model: {b}\n    parameters: {{weight: 0.75}}\n"
    cases = {
        "slerp": (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
                  f"parameters: {{t: 0.3}}\n", ("slerp", base, [a], {"t": 0.3})),
        "nuslerp": (f"merge_method: nuslerp\nbase_model: {base}\n{m}", ("nuslerp", base, [a, b], {"t": 0.75})),
        "nuslerp-nobase": (f"merge_method: nuslerp\n{m}", ("nuslerp", a, [b], {"t": 0.75})),
        "karcher": (f"merge_method: karcher\n{m}", ("karcher", a, [b], {})),
        "model_stock": (f"merge_method: model_stock\nbase_model: {base}\n{m}", ("model-stock", base, [a, b], {})),
        "breadcrumbs": (f"merge_method: breadcrumbs\nbase_model: {base}\n{m}",
                        ("task-arithmetic", base, [a, b], {"weights": [0.25, 0.75]})),
        "della": (f"merge_method: della\nbase_model: {base}\n{m}parameters: {{density: 0.6, epsilon: 0.2}}\n",
                  ("della", base, [a, b], {"density": 0.6, "epsilon": 0.2, "weights": [0.25, 0.75],
                                           "normalize": True, "rescale": "l1"})),
    }
    for name, (text, (method, b0, models, opts)) in cases.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text)
        out = tmp_path / f"{name}.safetensors"
        r = cli("merge", "--config", cfg, "-o", out, "--quiet")
        assert r.exit_code == 0, (name, r.stderr)
        got, ref = st.load_file(out), merge(method, b0, models, **opts).materialise()
        assert all(torch.allclose(got[k].float(), ref[k].float(), atol=1e-6) for k in ref), name
