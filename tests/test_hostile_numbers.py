"""Hostile numbers (issue 11, class 4): coefficients normalised without overflow, overflowing results refused."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

from weightspace.ops.stream import normalised_weights


def expect_one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightspace: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("w,expected", [([1e308, 1e308], [0.5, 0.5]), ([1e-300, 1e-300], [0.5, 0.5]),
                                         ([5e-324, 5e-324], [0.5, 0.5]), ([1.5e308, 5e307], [0.75, 0.25]),
                                         ([3.0, -1.0], [1.5, -0.5])])
def test_weights_normalised_without_overflow(w, expected):
    assert normalised_weights(w) == pytest.approx(expected, rel=1e-12)


def test_weights_that_cancel_are_refused():
    from weightspace.errors import ConfigError
    for w in ([1.0, -1.0], [0.0, 0.0], [1e308, -1e308]):
        with pytest.raises(ConfigError, match="sum to zero"):
            normalised_weights(w)


def test_huge_weights_give_the_mean_not_zero(cli, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file({"w": torch.full((4,), 2.0)}, a)
    st.save_file({"w": torch.full((4,), 4.0)}, b)
    for weights in ("1e308,1e308", "1e-300,1e-300"):
        out = tmp_path / f"out{len(weights)}.safetensors"
        r = cli("soup", a, b, "--weights", weights, "-o", out, "--quiet")
        assert r.exit_code == 0, r.stderr
        assert torch.equal(st.load_file(out)["w"], torch.full((4,), 3.0))


@pytest.mark.parametrize("dtype,value,args", [
    (torch.float16, 60000.0, ["interpolate", "--alpha", "2"]),
    (torch.float32, 3e38, ["soup", "--weights", "2,-1"]),
])
def test_overflowing_result_is_refused_unless_allowed(cli, tmp_path, dtype, value, args):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file({"ok": torch.ones(3, dtype=dtype), "big": torch.tensor([-value, 1.0], dtype=dtype)}, a)
    st.save_file({"ok": torch.ones(3, dtype=dtype), "big": torch.tensor([value, 1.0], dtype=dtype)}, b)
    out = tmp_path / "out.safetensors"
    verb, *opts = args
    msg = expect_one_line(cli(verb, a, b, *opts, "-o", out, "--quiet"))
    assert "'big'" in msg and "overflows" in msg and str(dtype).split(".")[1] in msg and "--allow-nonfinite" in msg
    assert not out.exists()
    r = cli(verb, a, b, *opts, "-o", out, "--quiet", "--allow-nonfinite")
    assert r.exit_code == 0, r.stderr
    got = st.load_file(out)["big"]
    assert torch.isinf(got[0]) and got[1] == 1.0
    with st.safe_open(out, "pt") as f:
        prov = json.loads(f.metadata()["weightspace"])
    assert prov["allow_nonfinite"] is True


def _merge_files(tmp_path, dtype=torch.float32):
    """A base and two fine-tunes whose task vectors are ~1: λ = 1e38 overflows float32, λ = 1e300 cannot even
    scale a float32 tensor."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 8, generator=g).to(dtype), "steps": torch.tensor(3)}
    paths = []
    for i, sd in enumerate([base, *({"w": base["w"] + torch.randn(64, 8, generator=g).to(dtype), "steps":
                                     torch.tensor(5)} for _ in range(2))]):
        paths.append(tmp_path / f"m{i}.safetensors")
        st.save_file(sd, paths[-1])
    return paths


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_merge_output_is_checked_like_soups(cli, tmp_path, method):
    base, a, b = _merge_files(tmp_path)
    out = tmp_path / "out.safetensors"
    msg = expect_one_line(cli("merge", "--method", method, "--base", base, a, b, "--scale", "1e38", "-o", out,
                              "--quiet"))
    assert "'w'" in msg and "overflows" in msg and "float32" in msg and "--allow-nonfinite" in msg
    assert not out.exists()
    r = cli("merge", "--method", method, "--base", base, a, b, "--scale", "1e38", "-o", out, "--quiet",
            "--allow-nonfinite")
    assert r.exit_code == 0, r.stderr
    assert torch.isinf(st.load_file(out)["w"]).any()
    with st.safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["weightspace"])["allow_nonfinite"] is True
    # negative control: an ordinary λ writes finite weights with the same files
    ok = tmp_path / "ok.safetensors"
    assert cli("merge", "--method", method, "--base", base, a, b, "--scale", "0.5", "-o", ok, "--quiet").exit_code == 0
    assert torch.isfinite(st.load_file(ok)["w"]).all()


@pytest.mark.parametrize("args", [["merge", "--method", "task-arithmetic", "--scale", "1e300"],
                                  ["merge", "--method", "ties", "--scale", "-1e39"],
                                  ["interpolate", "--alpha", "1e300"]])
def test_coefficients_beyond_float32_are_one_line_errors(cli, tmp_path, args):
    base, a, b = _merge_files(tmp_path)
    out = tmp_path / "out.safetensors"
    verb, *opts = args
    inputs = ["--base", base, a, b] if verb == "merge" else [a, b]
    msg = expect_one_line(cli(verb, *inputs, *opts, "-o", out, "--quiet"))
    assert "out of range" in msg and ("scale" in msg or "alpha" in msg) and "fp64" in msg
    assert not out.exists()
    if verb == "merge":  # in float64 arithmetic 1e300 is a number: the error is then the float32 output's overflow
        msg = expect_one_line(cli(verb, *inputs, *opts, "--precision", "fp64", "-o", out, "--quiet"))
        assert "overflows" in msg and not out.exists()


def test_merge_scalars_are_validated_before_reading(tmp_path):
    from weightspace.errors import ConfigError
    from weightspace.ops.merge import merge
    from weightspace.search.scale import search_scale
    base, a, b = _merge_files(tmp_path)
    for kw, param in [({"scale": float("nan")}, "scale"), ({"scale": float("inf")}, "scale"),
                      ({"weights": [1.0, float("nan")]}, "weights"), ({"weights": [1.0, 1e39]}, "weights"),
                      ({"weights": [1.0]}, "weights")]:
        with pytest.raises(ConfigError) as e:
            merge("task-arithmetic", base, [a, b], **kw)
        assert e.value.param == param and len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="ties weights must be positive") as e:
        merge("ties", base, [a, b], weights=[1.0, -0.5])
    assert e.value.param == "weights"
    with pytest.raises(ConfigError) as e:
        search_scale("ties", base, [a, b], evaluate=lambda sd: 1.0, grid=[0.5, float("nan")])
    assert e.value.param == "grid"
    # negative controls: negative weights are fine for task arithmetic, and so is a negative λ
    sd = merge("task-arithmetic", base, [a, b], weights=[1.0, -0.5], scale=-0.3).materialise()
    assert torch.isfinite(sd["w"]).all()


def test_mergekit_lambda_overflow_is_refused(cli, tmp_path):
    base, a, b = _merge_files(tmp_path)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   f"parameters:\n  lambda: 1.0e+38\n")
    out = tmp_path / "out.safetensors"
    msg = expect_one_line(cli("merge", "--config", cfg, "-o", out, "--quiet"))
    assert "overflows" in msg and not out.exists()
