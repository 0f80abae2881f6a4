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
