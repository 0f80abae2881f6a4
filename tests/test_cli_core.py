"""The core verbs end to end through the CLI: inspect, diff, soup, interpolate, distance."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch as st
import torch

import weightspace as ws


@pytest.fixture
def files(tmp_path, trained_mlps):
    paths = []
    for i, sd in enumerate(trained_mlps):
        paths.append(tmp_path / f"m{i}.safetensors")
        st.save_file(sd, paths[-1])
    pt = tmp_path / "m0.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in trained_mlps[0].items()}}, pt)
    return paths + [pt]


def ok(r):
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return r


def test_inspect_text_and_json(cli, files, trained_mlps, tmp_path):
    sd = trained_mlps[0]
    r = ok(cli("inspect", files[0]))
    n_params = sum(v.numel() for v in sd.values())
    assert f"params:   {n_params:,}" in r.stdout
    assert "| head.weight | float32 | 10×32 |" in r.stdout
    assert "| features.1.num_batches_tracked | int64 | scalar |" in r.stdout
    info = json.loads(ok(cli("inspect", "--json", files[0])).stdout)
    assert info["num_params"] == n_params
    assert info["bytes"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert {t["key"]: t["shape"] for t in info["tensors"]}["features.0.weight"] == [32, 64]
    assert info["provenance"] is None
    # a soup shows its provenance: op, coefficients, each ingredient with its hash
    out = tmp_path / "soup.safetensors"
    ok(cli("soup", "-q", files[0], files[1], "-o", out))
    r = ok(cli("inspect", out))
    assert "provenance: op=uniform_soup" in r.stdout and f"0.5 × {files[0].name}  sha256=" in r.stdout
    prov = json.loads(ok(cli("inspect", "--json", out)).stdout)["provenance"]
    # sources as seen from the output's folder: the same bytes wherever the run lives
    assert [i["source"] for i in prov["ingredients"]] == [files[0].name, files[1].name]


def test_diff_exit_codes(cli, files, trained_mlps, tmp_path):
    r = ok(cli("diff", files[0], files[3]))  # safetensors vs a nested, module.-prefixed .pt: same structure
    assert "0 only in" in r.stdout
    sd = dict(trained_mlps[1])
    sd.pop("head.bias")
    sd["head.weight"] = sd["head.weight"].half()
    sd["extra.weight"] = torch.zeros(2)
    other = tmp_path / "other.safetensors"
    st.save_file(sd, other)
    r = cli("diff", files[0], other)
    assert r.exit_code == 1
    assert "| head.bias | only in A |" in r.stdout and "| extra.weight | only in B |" in r.stdout
    assert "| head.weight | float32 [10, 32] | float16 [10, 32] |" in r.stdout
    j = json.loads(cli("diff", "--json", files[0], other).stdout)
    assert j["only_in_a"] == ["head.bias"] and j["only_in_b"] == ["extra.weight"]
    assert j["mismatched"][0]["key"] == "head.weight" and j["identical_structure"] is False


def test_soup_uniform_and_weights(cli, files, trained_mlps, tmp_path):
    uni = tmp_path / "uniform.safetensors"
    r = ok(cli("soup", "--uniform", *files[:3], "-o", uni))
    assert f"wrote {uni}" in r.stdout
    got = st.load_file(uni)
    want = ws.uniform_soup(files[:3])
    assert all(torch.equal(got[k], want[k]) for k in want)
    mix = tmp_path / "mix.safetensors"
    j = json.loads(ok(cli("soup", "--weights", "0.2,0.3,0.5", *files[:3], "-o", mix, "--json")).stdout)
    assert j["coefficients"] == pytest.approx([0.2, 0.3, 0.5]) and j["op"] == "weighted_average"
    got = st.load_file(mix)["head.weight"]
    ref = sum(w * sd["head.weight"].double() for w, sd in zip([0.2, 0.3, 0.5], trained_mlps))
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-7)
    r = cli("soup", "--weights", "0.5,0.5", *files[:3], "-o", tmp_path / "bad.safetensors")
    assert r.exit_code == 2 and not (tmp_path / "bad.safetensors").exists()
    # the .pt twin of files[0] (nested and module.-prefixed) averages like the file itself; fp64 and .pt output work
    pt_out = tmp_path / "soup.pt"
    ok(cli("soup", "-q", files[3], files[1], "--precision", "fp64", "-o", pt_out))
    back = ws.load(pt_out)
    assert back.provenance["precision"] == "fp64"
    assert torch.allclose(back["head.bias"], (trained_mlps[0]["head.bias"] + trained_mlps[1]["head.bias"]) / 2)


def test_interpolate(cli, files, trained_mlps, tmp_path):
    out = tmp_path / "mid.safetensors"
    ok(cli("interpolate", files[3], files[1], "--alpha", "0.3", "-o", out))
    got = st.load_file(out)
    a, b = trained_mlps[0], trained_mlps[1]
    for k in ("features.0.weight", "features.1.running_mean", "head.bias"):
        ref = 0.7 * a[k].double() + 0.3 * b[k].double()
        assert torch.allclose(got[k].double(), ref, rtol=1e-6, atol=1e-7), k
    assert torch.equal(got["features.1.num_batches_tracked"],
                       torch.maximum(a["features.1.num_batches_tracked"], b["features.1.num_batches_tracked"]))
    prov = ws.load(out).provenance
    assert prov["op"] == "lerp" and prov["alpha"] == 0.3 and prov["coefficients"] == [0.7, 0.3]


def test_distance_per_module_json(cli, files, trained_mlps):
    j = json.loads(ok(cli("distance", files[0], files[1], "--per-module", "--depth", "2", "--json")).stdout)
    api = ws.distance(trained_mlps[0], trained_mlps[1], per_module=True, depth=2)
    assert j["total"]["l2"] == pytest.approx(api["total"]["l2"], rel=1e-12)
    assert [m["module"] for m in j["modules"]] == ["features.0", "features.1", "head"]
    assert sum(m["numel"] for m in j["modules"]) == j["total"]["numel"]
    r = ok(cli("distance", files[0], files[1], "--per-module", "--depth", "1"))
    assert r.stdout.splitlines()[0] == "| module | l2 | relative | cosine | numel |"
    rows = [line for line in r.stdout.splitlines()[2:] if line.startswith("|")]
    assert {line.split("|")[1].strip() for line in rows} == {"(total)", "features", "head"}
    assert "running statistics (not in the distances above" in r.stdout  # BatchNorm's, reported apart
    inc = json.loads(ok(cli("distance", files[0], files[1], "--include-buffers", "--json")).stdout)
    assert inc["include_buffers"] and inc["total"]["numel"] == j["total"]["numel"] + j["buffers"]["numel"]
    same = json.loads(ok(cli("distance", files[0], files[3], "--json")).stdout)
    assert same["total"]["l2"] == 0.0


def test_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from weightspace_cli.main import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0 and 'soup' in r.output, r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
