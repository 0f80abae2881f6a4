"""slerp, nuslerp, karcher, model stock, breadcrumbs, SCE: each against a small numpy implementation of the published
formula written here (not imported from weightspace), on trained models and on random tensors with near-parallel
cases; the random methods (DARE, DELLA) statistically and for reproducibility."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightspace.errors import ConfigError
from weightspace.ops.merge import merge

TOL = 1e-5
RUNNING = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def tensors(tmp_path_factory, trained_mlps):
    """A base and three models: real trained MLPs (base: the first, models: the others), plus random tensors, a
    tensor nearly parallel to the base's (cos > 0.9995) and one exactly parallel, and a zero task vector."""
    d = tmp_path_factory.mktemp("methods")
    g = torch.Generator().manual_seed(0)
    base = {k: v.float() for k, v in trained_mlps[0].items() if v.is_floating_point()}
    base["rand"] = torch.randn(7, 5, generator=g)
    base["near"] = torch.randn(40, generator=g)
    base["same"] = torch.randn(6, 3, generator=g)
    models = []
    for i, sd in enumerate(trained_mlps[1:4]):
        m = {k: v.float() for k, v in sd.items() if v.is_floating_point()}
        m["rand"] = torch.randn(7, 5, generator=g)
        m["near"] = base["near"] * (1 + 0.01 * (i + 1)) + 1e-3 * torch.randn(40, generator=g)
        m["same"] = base["same"] * (2.0 + i)
        models.append(m)
    paths = [d / "base.safetensors", *[d / f"m{i}.safetensors" for i in range(len(models))]]
    for p, sd in zip(paths, [base, *models]):
        save_file(sd, p)
    return paths, base, models


def np_(t):
    return t.double().numpy()


def ref_slerp(t, a, b, threshold=0.9995):
    """Shoemake (1985): sin((1−t)Ω)/sin Ω·a + sin(tΩ)/sin Ω·b; linear where the vectors are (nearly) parallel; a
    zero vector is taken as orthogonal to everything (Ω = π/2)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else 0.0
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b


def maxdiff(out, ref):
    """Over the weights; running statistics (BatchNorm's) are the models' mean in every merge, not the formula's."""
    return max(float(np.abs(np_(out[k]) - ref[k]).max()) for k in ref if k.rsplit(".", 1)[-1] not in RUNNING)


def test_slerp_equals_the_formula_and_lerps_near_parallel_tensors(tensors):
    paths, base, models = tensors
    for t in (0.0, 0.3, 0.5, 1.0):
        out = merge("slerp", paths[0], [paths[1]], t=t).materialise()
        ref = {k: ref_slerp(t, np_(base[k]), np_(models[0][k])) for k in base}
        assert maxdiff(out, ref) < TOL, t
    # negative control: the near-parallel tensor is a lerp, the random one is not
    out = merge("slerp", paths[0], [paths[1]], t=0.5).materialise()
    lerp = lambda k: 0.5 * np_(base[k]) + 0.5 * np_(models[0][k])  # noqa: E731
    assert np.abs(np_(out["near"]) - lerp("near")).max() < TOL
    assert np.abs(np_(out["rand"]) - lerp("rand")).max() > 1e-2


def test_slerp_refuses_what_it_does_not_do(tensors):
    paths, *_ = tensors
    with pytest.raises(ConfigError, match="exactly 1 model"):
        merge("slerp", paths[0], paths[1:3], t=0.5)
    with pytest.raises(ConfigError, match="per-layer gradients of t"):
        merge("slerp", paths[0], [paths[1]], t=[0, 0.5, 1])


def test_nuslerp_two_task_vectors_and_rows(tensors):
    paths, base, models = tensors
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        out = merge("nuslerp", paths[0], paths[1:3], t=0.3, nuslerp_flatten=flatten,
                    nuslerp_row_wise=row_wise).materialise()
        ref = {}
        for k in base:
            b = np_(base[k])
            a0, a1 = np_(models[0][k]) - b, np_(models[1][k]) - b
            if flatten or a0.ndim < 2:
                r = ref_slerp(0.3, a0.ravel(), a1.ravel(), threshold=1 - 1e-16).reshape(b.shape)
            else:
                x0, x1 = (a0.T, a1.T) if row_wise else (a0, a1)
                r = np.stack([ref_slerp(0.3, u, v, threshold=1 - 1e-16) for u, v in zip(x0, x1)])
                r = r.T if row_wise else r
            ref[k] = b + r
        assert maxdiff(out, ref) < 1e-4 * max(1.0, max(np.abs(v).max() for v in ref.values())), (flatten, row_wise)


def ref_karcher(points, iters=500):
    """Karcher (1977) mean on the unit sphere by Riemannian gradient descent (log map, step, exp map), times the
    mean norm of the points."""
    norms = [np.linalg.norm(p) for p in points]
    units = [p.ravel() / n for p, n in zip(points, norms)]
    u = sum(units) / len(units)
    u /= np.linalg.norm(u)
    for _ in range(iters):
        g = np.zeros_like(u)
        for x in units:
            c = np.clip(u @ x, -1, 1)
            th = math.acos(c)
            if th > 1e-12:
                g += th / math.sin(th) * (x - c * u) / len(units)
        ng = np.linalg.norm(g)
        if ng < 1e-14:
            break
        u = math.cos(ng) * u + math.sin(ng) * g / ng
        u /= np.linalg.norm(u)
    return (np.mean(norms) * u).reshape(points[0].shape)


def test_karcher_is_the_riemannian_mean_of_all_models(tensors):
    paths, base, models = tensors
    out = merge("karcher", paths[0], paths[1:], max_iter=200, tol=1e-9).materialise()
    ref = {k: ref_karcher([np_(base[k])] + [np_(m[k]) for m in models]) for k in base}
    assert maxdiff(out, ref) < TOL
    # two models: the Karcher mean of two directions is their slerp midpoint (scaled by the mean norm)
    out = merge("karcher", paths[0], [paths[1]], max_iter=200, tol=1e-9).materialise()
    a, b = np_(base["rand"]), np_(models[0]["rand"])
    assert abs(np.linalg.norm(np_(out["rand"])) - (np.linalg.norm(a) + np.linalg.norm(b)) / 2) < TOL
    cosine = lambda x, y: x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y)  # noqa: E731
    assert abs(cosine(np_(out["rand"]), a) - cosine(np_(out["rand"]), b)) < TOL  # equidistant on the sphere


def test_model_stock_ratio_from_the_angle(tensors):
    paths, base, models = tensors
    for filter_wise in (False, True):
        out = merge("model-stock", paths[0], paths[1:], filter_wise=filter_wise).materialise()
        ref = {}
        for k in base:
            w0 = np_(base[k])
            taus = [np_(m[k]) - w0 for m in models]
            rows = [t.reshape(1, -1) if not filter_wise or t.ndim < 2 else t for t in taus]
            n = len(rows)
            cos = np.mean([np.sum(rows[i] * rows[j], -1) / np.maximum(
                np.linalg.norm(rows[i], axis=-1) * np.linalg.norm(rows[j], axis=-1), 1e-6)
                for i in range(n) for j in range(i + 1, n)], axis=0)[..., None]
            t = n * cos / ((n - 1) * cos + 1)  # Jang et al. 2024, eq. (the interpolation ratio for N models)
            avg = np.mean([w0.reshape(rows[0].shape) + r for r in rows], axis=0)
            ref[k] = (t * avg + (1 - t) * w0.reshape(rows[0].shape)).reshape(w0.shape)
        assert maxdiff(out, ref) < TOL, filter_wise
    with pytest.raises(ConfigError, match="at least 2 models"):
        merge("model-stock", paths[0], [paths[1]])


def test_breadcrumbs_drops_the_largest_and_smallest(tensors):
    paths, base, models = tensors
    density, gamma = 0.6, 0.05
    out = merge("breadcrumbs", paths[0], paths[1:], density=density, gamma=gamma, scale=0.7).materialise()
    ref = {}
    for k in base:
        w0 = np_(base[k])
        total = np.zeros_like(w0)
        for m in models:
            tau = (np_(m[k]) - w0).ravel()
            n = tau.size
            keep, top = int(density * n), int(gamma * n)
            rank = np.argsort(np.argsort(np.abs(tau), kind="stable"), kind="stable")  # 0 = smallest
            mask = (rank >= n - keep - top) & (rank < n - top)
            total += (tau * mask).reshape(w0.shape)
        ref[k] = w0 + 0.7 * total
    assert maxdiff(out, ref) < TOL
    kept = np.count_nonzero(np_(out["rand"]) - np_(base["rand"]))
    assert kept > 0


def test_sce_select_calculate_erase(tensors):
    paths, base, models = tensors
    for topk in (1.0, 0.5):
        out = merge("sce", paths[0], paths[1:], select_topk=topk).materialise()
        ref = {}
        for k in base:
            w0 = np_(base[k]).ravel()
            tv = np.stack([np_(m[k]).ravel() - w0 for m in models])
            if topk < 1:
                var = tv.var(axis=0)
                kk = int(np.count_nonzero(var) * topk)
                sel = np.zeros_like(var)
                sel[np.argsort(-var, kind="stable")[:kk]] = 1
                tv = tv * sel
            elect = np.where(tv.sum(0) >= 0, 1.0, -1.0)
            erase = (np.sign(tv) == elect).astype(float)
            w = (tv ** 2).mean(1)
            w = w / w.sum() if w.sum() > 1e-6 else np.full_like(w, 1 / len(w))
            ew = w[:, None] * erase
            ref[k] = (w0 + (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)).reshape(base[k].shape)
        assert maxdiff(out, ref) < TOL, topk


def test_methods_are_registered_with_paper_and_defaults():
    from weightspace.registry import REGISTRY
    for name in ("slerp", "nuslerp", "karcher", "model_stock", "breadcrumbs", "sce", "dare_linear", "dare_ties",
                 "della"):
        e = REGISTRY.get("merge", name)
        assert e.paper and e.paper.url.startswith("https://") and "scale" in e.defaults, name


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    """A base and two models with dense random task vectors (no zero entries)."""
    d = tmp_path_factory.mktemp("dare")
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(100, 120, generator=g), "b": torch.randn(30, generator=g)}
    paths = [d / "base.safetensors", d / "m0.safetensors", d / "m1.safetensors"]
    save_file(base, paths[0])
    for p in paths[1:]:
        save_file({k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, p)
    return paths


@pytest.mark.parametrize("method", ["dare-linear", "della-linear"])
def test_random_drop_keeps_density_and_is_unbiased(random_pair, method):
    paths = random_pair
    density = 0.3
    out = merge(method, paths[0], [paths[1]], density=density, seed=7).materialise()
    from safetensors.torch import load_file
    base = load_file(paths[0])
    n = base["w"].numel()
    kept = int(torch.count_nonzero(out["w"] - base["w"]))
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 5 * sd, (kept, n * density)
    # the mean over seeds is the undropped sum: each entry's mean is within 5 standard errors
    seeds = 60
    total = torch.zeros_like(base["w"], dtype=torch.float64)
    for s in range(seeds):
        total += merge(method, paths[0], paths[1:], density=density, seed=s).materialise()["w"].double()
    mean = total / seeds
    tau = [load_file(p)["w"].double() - base["w"].double() for p in paths[1:]]
    undropped = base["w"].double() + tau[0] + tau[1]
    # per-entry variance of Σ_t m_t·τ_t/p_t is at most Σ_t τ_t²·(1−p_min)/p_min (p_min = density − ε for DELLA)
    p_min = density - (0.15 if method == "della-linear" else 0.0)
    se = torch.sqrt((tau[0] ** 2 + tau[1] ** 2) * (1 - p_min) / p_min / seeds)
    z = ((mean - undropped).abs() / se)
    assert float(z.mean()) < 1.2 and float((z > 5).float().mean()) < 1e-3, float(z.mean())
    # negative control: one draw is far from the undropped merge
    one = merge(method, paths[0], paths[1:], density=density, seed=0).materialise()["w"].double()
    assert float(((one - undropped).abs() / (se * math.sqrt(seeds))).mean()) > 0.3


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties", "della", "della-linear"])
def test_random_methods_give_the_same_bytes_on_any_thread_count(random_pair, method):
    paths = random_pair
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            sd = merge(method, paths[0], paths[1:], density=0.4, seed=3, threads=threads,
                       max_memory="64MB" if threads == 1 else None).materialise()
        finally:
            torch.set_num_threads(old)
        runs.append(sd)
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    other = merge(method, paths[0], paths[1:], density=0.4, seed=4).materialise()
    assert not torch.equal(other["w"], runs[0]["w"])  # the seed matters
    assert merge(method, paths[0], paths[1:], density=0.4, seed=3).provenance["seed"] == 3


def test_dare_ties_elects_signs_on_the_dropped_vectors(random_pair):
    """With density 1 nothing is dropped: dare_ties is TIES without trimming (mergekit: normalize false, a sum of the
    agreeing entries)."""
    from safetensors.torch import load_file
    paths = random_pair
    out = merge("dare-ties", paths[0], paths[1:], density=1.0).materialise()
    base = np_(load_file(paths[0])["w"])
    tv = np.stack([np_(load_file(p)["w"]) - base for p in paths[1:]])
    elect = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    ref = base + (tv * (np.sign(tv) == elect)).sum(0)
    assert np.abs(np_(out["w"]) - ref).max() < TOL
    with pytest.raises(ConfigError, match="must stay inside"):
        merge("della", paths[0], paths[1:], density=0.1, epsilon=0.15)


def test_docs_have_a_section_per_method_from_the_registry():
    from pathlib import Path

    from weightspace.registry import REGISTRY
    text = (Path(__file__).resolve().parents[1] / "docs" / "merge.md").read_text()
    for e in REGISTRY.entries("merge"):
        head = f"### `{e.name}`: {e.title}\n\n{e.formula}\n"
        assert head in text, f"docs/merge.md: regenerate the section of {e.name} from the registry"
        assert ", ".join(f"{k}={v}" for k, v in e.defaults.items()) in text, e.name
        assert e.paper.cite() in text, e.name


def test_model_stock_keeps_the_base_where_the_ratio_is_singular(tmp_path):
    """Two opposite task vectors: cos θ = −1, 1 + (N−1)·cos θ = 0, no finite ratio; the base is kept there."""
    g = torch.Generator().manual_seed(5)
    base, tau = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    paths = [tmp_path / f"{n}.safetensors" for n in ("b", "p", "m")]
    for p, sd in zip(paths, [base, base + tau, base - tau]):
        save_file({"w": sd}, p)
    out = merge("model-stock", paths[0], paths[1:]).materialise()
    assert torch.allclose(out["w"], base, atol=1e-6) and torch.isfinite(out["w"]).all()
