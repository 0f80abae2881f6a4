"""Every bad input of issue 2 part 5 through the CLI: exit code 2, one line naming file (and key), nothing written."""
from __future__ import annotations

import argparse
import pathlib
import json
import os
import struct

import pytest
import safetensors.torch as st
import torch


@pytest.fixture
def good(tmp_path, trained_mlps):
    """Two real, compatible checkpoints."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file(trained_mlps[0], a)
    st.save_file(trained_mlps[1], b)
    return a, b


def expect_error(cli, folder, *args) -> str:
    """Run the CLI; it must exit 2 with one line on stderr and leave the folder exactly as it was."""
    before = sorted(os.listdir(folder))
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("weightspace: error: ")
    assert sorted(os.listdir(folder)) == before  # no output, no temp file left behind
    return lines[0]


def _variant(tmp_path, sd, name, **changes):
    sd = dict(sd)
    for k, v in changes.items():
        if v is None:
            sd.pop(k.replace("__", "."))
        else:
            sd[k.replace("__", ".")] = v
    p = tmp_path / name
    st.save_file(sd, p)
    return p


def test_mismatched_key_sets(cli, tmp_path, good, trained_mlps):
    bad = _variant(tmp_path, trained_mlps[1], "keys.safetensors", head__bias=None, head__extra=torch.zeros(3))
    msg = expect_error(cli, tmp_path, "soup", good[0], bad, "-o", tmp_path / "out.safetensors")
    assert str(bad) in msg and "'head.bias'" in msg and "'head.extra'" in msg


def test_shape_mismatch(cli, tmp_path, good, trained_mlps):
    bad = _variant(tmp_path, trained_mlps[1], "shape.safetensors", head__weight=torch.zeros(11, 32))
    msg = expect_error(cli, tmp_path, "interpolate", good[0], bad, "--alpha", "0.5", "-o", tmp_path / "out.safetensors")
    assert str(bad) in msg and "'head.weight'" in msg and "[11, 32]" in msg


def test_dtype_kind_mismatch(cli, tmp_path, good, trained_mlps):
    bad = _variant(tmp_path, trained_mlps[1], "kind.safetensors", head__weight=torch.zeros(10, 32, dtype=torch.int32))
    msg = expect_error(cli, tmp_path, "soup", good[0], bad, "-o", tmp_path / "out.safetensors")
    assert str(bad) in msg and "'head.weight'" in msg and "int32" in msg


def test_truncated_safetensors(cli, tmp_path, good):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good[1].read_bytes()[:-100])
    msg = expect_error(cli, tmp_path, "soup", good[0], bad, "-o", tmp_path / "out.safetensors")
    assert str(bad) in msg and "truncated" in msg
    expect_error(cli, tmp_path, "inspect", bad)


@pytest.mark.parametrize("how", ["json", "length", "offsets", "empty"])
def test_corrupt_safetensors(cli, tmp_path, good, how):
    data = good[1].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if how == "json":
        data = data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:]
    elif how == "length":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    elif how == "offsets":  # valid JSON, but a tensor claims bytes that are not its size
        header = json.loads(data[8:8 + n])
        header["head.bias"]["data_offsets"][1] += 4
        raw = json.dumps(header).encode().ljust(n)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    else:
        data = b""
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(data)
    msg = expect_error(cli, tmp_path, "soup", good[0], bad, "-o", tmp_path / "out.safetensors")
    assert str(bad) in msg
    if how == "offsets":
        assert "'head.bias'" in msg


def test_missing_file(cli, tmp_path, good):
    missing = tmp_path / "nope.safetensors"
    msg = expect_error(cli, tmp_path, "soup", good[0], missing, "-o", tmp_path / "out.safetensors")
    assert str(missing) in msg and "no such file" in msg


def test_unknown_scheme(cli, tmp_path, good):
    msg = expect_error(cli, tmp_path, "soup", good[0], "s3://bucket/model.safetensors", "-o", tmp_path / "out.safetensors")
    assert "s3://bucket/model.safetensors" in msg and "unknown scheme 's3:'" in msg


def test_pickle_needing_more_than_tensors_shows_how_to_convert(cli, tmp_path, good, trained_mlps):
    bad = tmp_path / "with-args.pt"
    # argparse.Namespace is allowed (timm's checkpoints hold one); any other class is refused
    torch.save({"state_dict": trained_mlps[1], "args": argparse.Namespace(lr=0.1), "log": pathlib.PurePosixPath("x")}, bad)
    msg = expect_error(cli, tmp_path, "soup", good[0], bad, "-o", tmp_path / "out.safetensors")
    assert str(bad) in msg and "needs pathlib.PurePosixPath" in msg
    assert "convert" in msg and "weights_only=False" in msg and "with-args.safetensors" in msg


def test_truncated_and_non_state_dict_pickles(cli, tmp_path, good, trained_mlps):
    whole = tmp_path / "whole.pt"
    torch.save(trained_mlps[1], whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:300])
    whole.unlink()
    assert str(cut) in expect_error(cli, tmp_path, "soup", good[0], cut, "-o", tmp_path / "out.safetensors")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle")
    msg = expect_error(cli, tmp_path, "soup", good[0], garbage, "-o", tmp_path / "out.safetensors")
    assert str(garbage) in msg and "not a readable PyTorch checkpoint" in msg and "convert" not in msg
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    msg = expect_error(cli, tmp_path, "soup", good[0], tensor_only, "-o", tmp_path / "out.safetensors")
    assert str(tensor_only) in msg and "not a state dict" in msg


class MarkerMaker:
    """Unpickling this (without weights_only) opens a file for writing: code execution from a 'checkpoint'."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_never_runs(cli, tmp_path, good, trained_mlps):
    marker = tmp_path.parent / (tmp_path.name + "-PWNED")
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": trained_mlps[1], "payload": MarkerMaker(str(marker))}, hostile)
    # control: the payload is real — an unsafe load of a copy aimed elsewhere does create its marker
    control_marker = tmp_path.parent / (tmp_path.name + "-control")
    control = tmp_path.parent / (tmp_path.name + "-control.pt")
    torch.save({"payload": MarkerMaker(str(control_marker))}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()
    for args in (["soup", good[0], hostile, "-o", tmp_path / "out.safetensors"], ["inspect", hostile],
                 ["distance", hostile, good[1]]):
        msg = expect_error(cli, tmp_path, *args)
        assert str(hostile) in msg and "refused" in msg
    assert not marker.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_refused_unless_allowed(cli, tmp_path, good, trained_mlps, value):
    w = trained_mlps[1]["features.0.weight"].clone()
    w[3, 5] = value
    bad = _variant(tmp_path, trained_mlps[1], "nonfinite.safetensors", features__0__weight=w)
    out = tmp_path / "out.safetensors"
    msg = expect_error(cli, tmp_path, "soup", good[0], bad, "-o", out)
    assert str(bad) in msg and "'features.0.weight'" in msg and ("NaN" if value != value else "Inf") in msg
    expect_error(cli, tmp_path, "distance", good[0], bad)
    r = cli("soup", good[0], bad, "-o", out, "--allow-nonfinite")
    assert r.exit_code == 0, r.stderr
    got = st.load_file(out)["features.0.weight"]
    assert not torch.isfinite(got[3, 5]) and torch.isfinite(got[0, 0])


def test_existing_output_needs_force(cli, tmp_path, good):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    msg = expect_error(cli, tmp_path, "soup", *good, "-o", out)
    assert str(out) in msg and "--force" in msg
    assert out.read_bytes() == b"precious"
    r = cli("soup", *good, "-o", out, "--force")
    assert r.exit_code == 0, r.stderr
    assert sorted(st.load_file(out)) == sorted(st.load_file(good[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "out.safetensors"]


def test_ema_required_but_absent(cli, tmp_path, good):
    # ?ema=1 requires EMA weights of that source; the global --ema only prefers them (see test_ecosystem)
    msg = expect_error(cli, tmp_path, "soup", f"{good[0]}?ema=1", good[1], "-o", tmp_path / "out.safetensors")
    assert str(good[0]) in msg and "no EMA weights" in msg
