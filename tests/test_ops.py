"""Streaming ops against numpy references, dtype handling, integer buffers, precision, and the in-memory Python API."""
from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.torch as st
import torch
from conftest import make_mlp

import weightspace as ws
from weightspace import errors
from weightspace.ops import stream as ops


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def assert_matches(result: torch.Tensor, reference: np.ndarray) -> None:
    """rtol 1e-6, with an absolute floor at float32 resolution of the tensor's scale (cancellation near zero)."""
    scale = float(np.abs(reference).max()) or 1.0
    np.testing.assert_allclose(np64(result), reference, rtol=1e-6, atol=scale * 2e-7)


@pytest.fixture
def mlp_files(tmp_path, trained_mlps):
    paths = []
    for i, sd in enumerate(trained_mlps):
        p = tmp_path / f"mlp{i}.safetensors"
        st.save_file(sd, p)
        paths.append(p)
    return paths


def test_uniform_soup_equals_numpy_mean(mlp_files, trained_mlps):
    soup = ws.uniform_soup(mlp_files)
    assert sorted(soup) == sorted(trained_mlps[0])
    for k, v in soup.items():
        if not v.is_floating_point():
            continue
        assert v.dtype == torch.float32
        assert_matches(v, np.mean([np64(sd[k]) for sd in trained_mlps], axis=0))
    assert soup.provenance["op"] == "uniform_soup"
    assert soup.provenance["coefficients"] == pytest.approx([1 / 3] * 3)
    assert [i["source"] for i in soup.provenance["ingredients"]] == [str(p) for p in mlp_files]


def test_weighted_average_normalises_weights(mlp_files, trained_mlps):
    w = [2.0, 3.0, 5.0]
    out = ws.weighted_average(mlp_files, w)
    for k in ("features.0.weight", "features.1.running_var", "head.bias"):
        ref = sum(wi * np64(sd[k]) for wi, sd in zip(w, trained_mlps)) / sum(w)
        assert_matches(out[k], ref)
    assert out.provenance["coefficients"] == pytest.approx([0.2, 0.3, 0.5])
    assert out.provenance["weights_given"] == w
    with pytest.raises(errors.ConfigError):
        ws.weighted_average(mlp_files, [1.0, -1.0, 0.0])  # sums to zero


def test_lerp_and_task_vector(mlp_files, trained_mlps):
    a, b = trained_mlps[0], trained_mlps[1]
    mid = ws.lerp(mlp_files[0], mlp_files[1], 0.3)
    tv = ws.task_vector(mlp_files[1], mlp_files[0])
    for k in a:
        if a[k].is_floating_point():
            assert_matches(mid[k], 0.7 * np64(a[k]) + 0.3 * np64(b[k]))
            assert_matches(tv[k], np64(b[k]) - np64(a[k]))
    assert mid.provenance["alpha"] == 0.3
    assert tv.provenance["op"] == "task_vector"
    # the endpoints are the inputs themselves
    end = ws.lerp(mlp_files[0], mlp_files[1], 1.0)
    assert all(torch.equal(end[k], b[k]) for k in b if b[k].is_floating_point())


def test_integer_buffers_take_the_largest_value(trained_mlps):
    sds = [dict(sd) for sd in trained_mlps]
    counts = [30, 70, 20][:len(sds)]
    for i, sd in enumerate(sds):
        sd["features.1.num_batches_tracked"] = torch.tensor(counts[i])
        sd["mask"] = torch.tensor([True, i % 2 == 0, False])
    soup = ws.uniform_soup(sds)
    assert soup["features.1.num_batches_tracked"].dtype == torch.int64
    assert int(soup["features.1.num_batches_tracked"]) == max(counts)  # not the first's, not the mean
    # whichever order the ingredients come in
    assert int(ws.uniform_soup(sds[::-1])["features.1.num_batches_tracked"]) == max(counts)
    assert soup["mask"].dtype == torch.bool and soup["mask"].tolist() == [True, True, False]
    # a shape mismatch in an integer buffer is still an error
    sds[1]["features.1.num_batches_tracked"] = torch.tensor([20])
    with pytest.raises(errors.IncompatibleCheckpoints, match="num_batches_tracked"):
        ws.uniform_soup(sds)


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)])
def test_half_precision_round_trip(tmp_path, trained_mlps, dtype, ulp):
    paths = []
    for i, sd in enumerate(trained_mlps):
        p = tmp_path / f"h{i}.safetensors"
        st.save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, p)
        paths.append(p)
    out = tmp_path / "soup.safetensors"
    ws.save(ops.uniform_soup_stream(paths), out)
    back = st.load_file(out)
    halves = [st.load_file(p) for p in paths]
    for k, v in back.items():
        if not v.is_floating_point():
            assert v.dtype == torch.int64
            continue
        assert v.dtype == dtype  # cast back to the stored dtype
        ref = np.mean([np64(h[k]) for h in halves], axis=0)
        # within one rounding of the stored dtype (plus float32 accumulation)
        np.testing.assert_allclose(np64(v), ref, rtol=ulp, atol=ulp * float(np.abs(ref).max()) * 2 ** -4)


def test_fp64_precision_is_exactly_rounded(tmp_path):
    """With --precision fp64 a float32 soup is the float64 mean rounded once (≤ ½ ulp); fp32 accumulation is not."""
    g = torch.Generator().manual_seed(7)
    sds = [{"w": 1.0 + torch.randn(20000, generator=g) * 1e-3, "d": torch.randn(50, generator=g, dtype=torch.float64)}
           for _ in range(7)]
    ref64 = np.mean([np64(sd["w"]) for sd in sds], axis=0)

    def ulps_off(t: torch.Tensor) -> np.ndarray:
        got = t.numpy()
        return np.abs(got.astype(np.float64) - ref64) / np.spacing(got)

    fp64 = ws.uniform_soup(sds, precision="fp64")
    fp32 = ws.uniform_soup(sds)
    assert fp64["w"].dtype == torch.float32 and fp64.provenance["precision"] == "fp64"
    assert ulps_off(fp64["w"]).max() <= 0.5 + 1e-6
    assert ulps_off(fp32["w"]).max() > 0.5 + 1e-6  # the option changes results, so it is really in effect
    # a float64 tensor stays float64 and is accumulated in float64 even at precision fp32
    assert fp32["d"].dtype == torch.float64
    np.testing.assert_allclose(fp32["d"].numpy(), np.mean([sd["d"].numpy() for sd in sds], axis=0), rtol=1e-12)
    with pytest.raises(errors.ConfigError):
        ws.uniform_soup(sds, precision="fp8")


def test_mixed_float_dtypes_take_the_widest(trained_mlps):
    a = trained_mlps[0]
    b = {k: v.half() if v.is_floating_point() else v for k, v in trained_mlps[1].items()}
    n_float = sum(v.is_floating_point() for v in a.values())
    for pair in ([a, b], [b, a]):  # the widest, whichever comes first
        soup = ws.uniform_soup(pair)
        assert soup["head.weight"].dtype == torch.float32
        assert_matches(soup["head.weight"], (np64(a["head.weight"]) + np64(b["head.weight"])) / 2)
        assert soup.provenance["dtypes_promoted"] == {"float16+float32→float32": n_float}
    # fp16 and bf16: neither holds the other, so float32; a merge follows the same rule
    c = {k: v.bfloat16() if v.is_floating_point() else v for k, v in trained_mlps[2].items()}
    assert ws.uniform_soup([b, c])["head.weight"].dtype == torch.float32
    assert ws.task_arithmetic(b, [a])["head.weight"].dtype == torch.float32
    # negative control: inputs that agree keep their dtype and record nothing
    same = ws.uniform_soup([b, b])
    assert same["head.weight"].dtype == torch.float16 and "dtypes_promoted" not in same.provenance


def test_mixed_dtypes_are_noted_unless_dtype_is_given(cli, tmp_path, trained_mlps):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file(trained_mlps[0], a)
    st.save_file({k: v.half() if v.is_floating_point() else v for k, v in trained_mlps[1].items()}, b)
    r = cli("soup", b, a, "-o", tmp_path / "s.safetensors")
    assert r.exit_code == 0, r.stderr
    assert "float16+float32→float32" in r.stderr and "--dtype" in r.stderr
    assert st.load_file(tmp_path / "s.safetensors")["head.weight"].dtype == torch.float32
    r = cli("interpolate", b, a, "--alpha", "0.5", "--dtype", "fp16", "-o", tmp_path / "i.safetensors")
    assert r.exit_code == 0 and "mix dtypes" not in r.stderr
    assert st.load_file(tmp_path / "i.safetensors")["head.weight"].dtype == torch.float16


def test_in_memory_ingredients_get_names(trained_mlps, tmp_path):
    a, b, c = trained_mlps[:3]
    by_map = ws.uniform_soup({"lr-0.1": a, "lr-0.3": b})
    by_names = ws.uniform_soup([a, b], names=["lr-0.1", "lr-0.3"])
    for soup in (by_map, by_names):
        assert [i["source"] for i in soup.provenance["ingredients"]] == ["lr-0.1", "lr-0.3"]
    assert all(torch.equal(by_map[k], by_names[k]) for k in by_map)
    merged = ws.merge("task-arithmetic", a, {"ft-b": b, "ft-c": c})
    assert [i["source"] for i in merged.provenance["ingredients"]] == ["<state dict>", "ft-b", "ft-c"]
    # unnamed in-memory ingredients keep the generic name; a file is named by its path
    assert ws.uniform_soup([a, b]).provenance["ingredients"][0]["source"] == "<state dict>"
    p = tmp_path / "a.safetensors"
    st.save_file(a, p)
    assert ws.uniform_soup({str(p): p, "b": b}).provenance["ingredients"][0]["source"] == str(p)
    for bad, match in [(dict(names=["x"]), "1 names for 2"), (dict(names=["x", "x"]), "'x' names two"),
                       ({"names": ["renamed", "b"], "_file": True}, "named by its path")]:
        srcs = [p, b] if bad.pop("_file", False) else [a, b]
        with pytest.raises(errors.ConfigError, match=match) as e:
            ws.uniform_soup(srcs, **bad)
        assert e.value.param == "names"
    with pytest.raises(errors.ConfigError, match="single state dict"):
        ws.uniform_soup(a)


def test_python_api_accepts_state_dicts_and_modules(trained_mlps, digits):
    models = []
    for sd in trained_mlps:
        m = make_mlp()
        m.load_state_dict(sd)
        models.append(m.eval())
    soup = ws.uniform_soup([trained_mlps[0], trained_mlps[1]])
    assert [i["source"] for i in soup.provenance["ingredients"]] == ["<state dict>", "<state dict>"]
    assert all(len(i["sha256"]) == 64 for i in soup.provenance["ingredients"])
    mid = ws.lerp(models[0], models[1], 0.3)
    for k, v in mid.items():
        if v.is_floating_point():
            assert_matches(v, 0.7 * np64(trained_mlps[0][k]) + 0.3 * np64(trained_mlps[1][k]))
    # the soup of fine-tunes of one init is a working model on the real data it was trained on
    x, y = digits
    net = make_mlp()
    net.load_state_dict(ws.uniform_soup(models))
    with torch.no_grad():
        acc = (net.eval()(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc


def test_distance_matches_numpy(trained_mlps):
    a, b = trained_mlps[0], trained_mlps[1]
    # parameters only: BatchNorm running statistics are reported apart (issue 20.5)
    keys = [k for k in sorted(a) if a[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    va = np.concatenate([np64(a[k]).ravel() for k in keys])
    vb = np.concatenate([np64(b[k]).ravel() for k in keys])
    r = ws.distance(a, b, per_module=True, depth=2)
    t = r["total"]
    assert t["l2"] == pytest.approx(np.linalg.norm(va - vb), rel=1e-9)
    assert t["relative"] == pytest.approx(np.linalg.norm(va - vb) / np.linalg.norm(va), rel=1e-9)
    assert t["cosine"] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), rel=1e-9)
    assert t["numel"] == va.size
    mods = {m["module"]: m for m in r["modules"]}
    assert set(mods) == {"features.0", "features.1", "head"}
    assert sum(m["l2"] ** 2 for m in mods.values()) == pytest.approx(t["l2"] ** 2, rel=1e-9)
    hw = np64(a["head.weight"]) - np64(b["head.weight"])
    hb = np64(a["head.bias"]) - np64(b["head.bias"])
    assert mods["head"]["l2"] == pytest.approx(math.sqrt((hw ** 2).sum() + (hb ** 2).sum()), rel=1e-9)
    by_regex = ws.distance(a, b, regex=r"^(\w+)\.")
    assert {m["module"] for m in by_regex["modules"]} == {"features", "head"}
    same = ws.distance(a, a)["total"]
    assert same["l2"] == 0.0 and same["cosine"] == pytest.approx(1.0)


def test_distance_reports_running_statistics_apart(trained_mlps):
    a, b = trained_mlps[0], trained_mlps[1]
    stats = ["features.1.running_mean", "features.1.running_var"]
    d_stats = np.concatenate([np64(a[k]).ravel() - np64(b[k]).ravel() for k in stats])
    r = ws.distance(a, b, per_module=True)
    assert r["buffers"]["l2"] == pytest.approx(np.linalg.norm(d_stats), rel=1e-9)
    assert r["buffers"]["numel"] == d_stats.size and not r["include_buffers"]
    both = ws.distance(a, b, per_module=True, include_buffers=True)
    assert both["total"]["l2"] ** 2 == pytest.approx(r["total"]["l2"] ** 2 + r["buffers"]["l2"] ** 2, rel=1e-9)
    bn = lambda res: next(m for m in res["modules"] if m["module"] == "features.1")  # noqa: E731
    assert bn(both)["numel"] == bn(r)["numel"] + d_stats.size  # γ, β (+ the statistics when included)
    plain = {"w": torch.ones(3)}
    assert "buffers" not in ws.distance(plain, plain)  # nothing to report apart


def test_distance_rows_in_natural_order():
    net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(12)])
    a = net.state_dict()
    b = {k: v + 1 for k, v in a.items()}
    mods = [m["module"] for m in ws.distance(a, b, per_module=True)["modules"]]
    assert mods == [str(i) for i in range(12)]  # 2 before 10, as the model orders them (sorted text: 0, 1, 10, 11, 2)


def test_stream_knows_its_output_before_reading_data(mlp_files, trained_mlps):
    stream = ops.uniform_soup_stream(mlp_files)
    assert [e[0] for e in stream.entries] == sorted(trained_mlps[0])
    assert dict((k, (d, s)) for k, d, s in stream.entries)["head.weight"] == (torch.float32, (10, 32))
    got = dict(stream)
    assert torch.allclose(got["head.bias"], sum(sd["head.bias"] for sd in trained_mlps) / 3, rtol=1e-6, atol=1e-7)


def test_large_tensors_are_combined_in_pieces_exactly(tmp_path):
    """Tensors bigger than one accumulation piece (1 MiB): streamed pieces, whole tensors and numpy all agree."""
    g = torch.Generator().manual_seed(11)
    sds = [{"big": torch.randn(1500, 1001, generator=g), "half": torch.randn(2_500_003, generator=g).half(),
            "small": torch.randn(7, generator=g)} for _ in range(3)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"big{i}.safetensors")
        st.save_file(sd, paths[-1])
    w = [0.5, 0.3, 0.2]
    streamed = ws.save(ops.weighted_average_stream(paths, w), tmp_path / "streamed.safetensors")
    whole = ws.weighted_average(paths, w)
    back = st.load_file(streamed)
    for k in sds[0]:
        assert back[k].dtype == sds[0][k].dtype and torch.equal(back[k], whole[k]), k
    ref = sum(wi * np64(sd["big"]) for wi, sd in zip(w, sds))
    assert_matches(back["big"], ref)
    ref_half = sum(wi * np64(sd["half"]) for wi, sd in zip(w, sds))
    np.testing.assert_allclose(np64(back["half"]), ref_half, rtol=2 ** -10, atol=2 ** -14)
    # a NaN deep inside the last piece is still found, and named
    bad = dict(sds[2])
    bad["big"] = bad["big"].clone()
    bad["big"][-1, -1] = float("nan")
    st.save_file(bad, paths[2])
    with pytest.raises(errors.NonFiniteError, match=f"{paths[2]}: key 'big' holds NaN"):
        ws.save(ops.weighted_average_stream(paths, w), tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_in_memory_non_contiguous_tensors(trained_mlps):
    """State dicts from a training loop may hold transposed views; they combine like their contiguous copies."""
    a = {k: v for k, v in trained_mlps[0].items()}
    b = {k: v for k, v in trained_mlps[1].items()}
    big = torch.randn(700, 900, generator=torch.Generator().manual_seed(5))
    a["wide"], b["wide"] = big.t(), (2 * big).t()  # 2.5 MB, non-contiguous: several pieces each
    out = ws.uniform_soup([a, b])
    assert torch.allclose(out["wide"], 1.5 * big.t(), rtol=1e-6)
