"""Hostile and careless input (issue 11): every class refused with one line naming the file (exit 2), nothing read
outside a checkpoint, nothing written beside the output. The safetensors parser's own property and fuzz tests live
in test_safetensors_differential.py and test_fuzz_safetensors.py; hostile numbers in test_hostile_numbers.py."""
from __future__ import annotations

import json
import os
import struct
import sys
import time

import pytest
import safetensors.torch as st
import torch


def one_line(r) -> str:
    """The CLI's answer to bad input: exit 2 and exactly one 'weightspace: error:' line on stderr."""
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightspace: error: "), r.stderr
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file({"w": torch.ones(4), "b": torch.zeros(2)}, a)
    st.save_file({"w": torch.full((4,), 3.0), "b": torch.ones(2)}, b)
    return a, b


# class 1: reads outside the checkpoint ------------------------------------------------------------------------


def _index(folder, weight_map) -> os.PathLike:
    folder.mkdir(exist_ok=True)
    p = folder / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return p


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "empty", "nonstring"])
def test_shards_stay_inside_the_index_folder(cli, tmp_path, pair, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    st.save_file({"b": torch.full((2,), 100.0)}, outside / "x.safetensors")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    st.save_file({"w": torch.ones(4)}, folder / "part1.safetensors")
    maps = {"dotdot": {"w": "part1.safetensors", "b": "../outside/x.safetensors"},
            "absolute": {"w": "part1.safetensors", "b": str(outside / "x.safetensors")},
            "symlink": {"w": "part1.safetensors", "b": "link.safetensors"},
            "empty": {},
            "nonstring": {"w": "part1.safetensors", "b": 7}}
    if how == "symlink":
        (folder / "link.safetensors").symlink_to(outside / "x.safetensors")
    index = _index(folder, maps[how])
    for source in (index, folder):
        msg = one_line(cli("soup", pair[0], source, "-o", tmp_path / "out.safetensors"))
        assert str(index) in msg
        assert {"dotdot": "outside the index's folder", "absolute": "outside the index's folder",
                "symlink": "outside the index's folder", "empty": "empty 'weight_map'",
                "nonstring": "not a shard file name"}[how] in msg
    assert not (tmp_path / "out.safetensors").exists()


def test_shards_inside_the_folder_still_load(cli, tmp_path, pair):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "sub").mkdir()
    st.save_file({"w": torch.full((4,), 3.0)}, folder / "sub" / "p1.safetensors")
    st.save_file({"b": torch.ones(2)}, folder / "p2.safetensors")
    _index(folder, {"w": "sub/p1.safetensors", "b": "./p2.safetensors"})
    out = tmp_path / "out.safetensors"
    r = cli("soup", pair[0], folder, "-o", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(st.load_file(out)["w"], torch.full((4,), 2.0))


# class 5: denial of service from pickles ------------------------------------------------------------------------


def _pickle(path, obj, depth_hint: int = 0) -> None:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, depth_hint * 4 + 1000))  # pickling a deep object recurses once per level
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("how", ["self", "cycle", "deep", "shared"])
def test_pickled_containers_refused_in_bounded_time(cli, tmp_path, pair, how):
    if how == "self":
        obj: dict = {}
        obj["state_dict"] = obj
    elif how == "cycle":
        inner: dict = {"w": torch.ones(4)}
        obj = {"state_dict": {"layer": inner}}
        inner["again"] = obj["state_dict"]
    elif how == "deep":
        obj = {"w": torch.ones(4)}
        for _ in range(3000):
            obj = {"x": obj}
    else:  # 22 levels, each holding the level below twice: 4 million paths to one tensor
        obj = {"w": torch.ones(4)}
        for _ in range(22):
            obj = {"a": obj, "b": obj}
    bad = tmp_path / f"{how}.pt"
    _pickle(bad, obj, 3000)
    t0 = time.perf_counter()
    msg = one_line(cli("soup", pair[0], bad, "-o", tmp_path / "out.safetensors"))
    assert time.perf_counter() - t0 < 30
    assert str(bad) in msg and "refused" in msg


# class 9 and part of 7: the safetensors reader is exactly as strict as the format ----------------------------------


def _st_file(path, header: str, data: bytes = b"") -> None:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,why", [
    ('{"w":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}', b"\0" * 4, "non-negative 64-bit integer"),
    ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4, "non-negative 64-bit integer"),
    ('{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', b"\0" * 8, "non-negative 64-bit integer"),
    ('{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4, "non-negative 64-bit integer"),
    ('{"w":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}', b"\0" * 4, "out of range"),
    ('{"w":{"dtype":"F32","shape":[0, 9223372036854775808],"data_offsets":[0,0]}}', b"", "torch cannot hold"),
    ('{"__metadata__":"x","w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "__metadata__"),
    ('{"__metadata__":["x"],"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "__metadata__"),
    ('{"__metadata__":{"k":1},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "not a string"),
    ('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "lone surrogate"),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 3000 + "]" * 3000 + "}}", b"\0" * 4,
     "nested deeper"),
])
def test_reader_refuses_what_the_reference_refuses(cli, tmp_path, header, data, why):
    from safetensors_oracle import reference_read
    bad = tmp_path / "bad.safetensors"
    _st_file(bad, header, data)
    assert reference_read(bad) is None  # the reference refuses it too
    msg = one_line(cli("inspect", bad))
    assert str(bad) in msg and why in msg


def test_reader_accepts_complex_and_float8_as_the_reference_does(cli, tmp_path):
    from safetensors_oracle import agree
    good = tmp_path / "c64.safetensors"
    st.save_file({"c": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64),
                  "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)}, good)
    assert agree(good)
    r = cli("inspect", good)
    assert r.exit_code == 0, r.stderr
    assert "complex64" in r.stdout and "float8_e4m3fn" in r.stdout
