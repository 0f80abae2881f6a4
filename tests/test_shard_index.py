"""A shard index is held to what its shards hold, the same way for safetensors and pickled .bin shards: a listed
key that is absent, a key in two shards, and a key that the index does not list are each refused in one line."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

import weightspace as ws
from weightspace.errors import CheckpointError

FORMATS = {"safetensors": ("model-{i}-of-00002.safetensors", "model.safetensors.index.json", st.save_file),
           "bin": ("pytorch_model-{i}-of-00002.bin", "pytorch_model.bin.index.json", torch.save)}
W = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2), "b.weight": torch.full((3,), 2.0)}


def _sharded(folder, fmt: str, shards: list[dict], weight_map: dict[str, int]):
    """Shards written as given; the index maps each key to shard number weight_map[key] (1-based)."""
    name, index_name, save = FORMATS[fmt]
    folder.mkdir()
    names = [name.format(i=f"{i + 1:05d}") for i in range(len(shards))]
    for n, sd in zip(names, shards):
        save(sd, folder / n)
    index = folder / index_name
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: names[i - 1] for k, i in weight_map.items()}}))
    return index


def _one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_consistent_index_loads_every_key(tmp_path, fmt):
    """Control: an index that matches its shards reads exactly the shards' tensors."""
    index = _sharded(tmp_path / "m", fmt, [{"a.weight": W["a.weight"], "a.bias": W["a.bias"]},
                                           {"b.weight": W["b.weight"]}], {"a.weight": 1, "a.bias": 1, "b.weight": 2})
    for source in (index, index.parent):
        ck = ws.load(source)
        assert set(ck) == set(W) and all(torch.equal(ck[k], W[k]) for k in W)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case, expect", [
    ("absent", "lists 'b.weight' in {s2}, which does not hold it"),
    ("elsewhere", "lists 'b.weight' in {s1}, which does not hold it (it is in {s2})"),
    ("twice", "key 'a.bias' is in two shards ({s1} and {s2})"),
    ("unlisted", "shard {s2} holds 'c', which the index does not list"),
])
def test_index_inconsistencies_are_one_line(cli, tmp_path, fmt, case, expect):
    one = {"a.weight": W["a.weight"], "a.bias": W["a.bias"]}
    listed = {"a.weight": 1, "a.bias": 1, "b.weight": 2}
    shards = {"absent": [one, {"other": torch.ones(1)}],
              "elsewhere": [one, {"b.weight": W["b.weight"], "x": torch.ones(1)}],
              "twice": [one, {"b.weight": W["b.weight"], "a.bias": W["a.bias"]}],
              "unlisted": [one, {"b.weight": W["b.weight"], "c": torch.ones(1)}]}[case]
    if case == "absent":
        listed = {"a.weight": 1, "a.bias": 1, "b.weight": 2, "other": 2}
    if case == "elsewhere":
        listed = {"a.weight": 1, "a.bias": 1, "b.weight": 1, "x": 2}
    index = _sharded(tmp_path / "m", fmt, shards, listed)
    name = FORMATS[fmt][0]
    s1, s2 = (name.format(i=f"{i:05d}") for i in (1, 2))
    with pytest.raises(CheckpointError) as e:
        ws.load(index.parent)
    assert expect.format(s1=s1, s2=s2) in str(e.value)
    msg = _one_line(cli("inspect", index.parent))
    assert str(index.parent) in msg and expect.format(s1=s1, s2=s2) in msg
