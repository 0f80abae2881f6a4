"""Outputs other tools load directly: plain pickled state dicts, Hugging Face folders (sharded as save_pretrained
shards, config and tokenizer files carried over), --dtype, and what --force may remove."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

import weightspace as ws
from conftest import make_mlp


@pytest.fixture
def ingredients(tmp_path, trained_mlps):
    """Two fine-tunes as Hub-style folders (weights + config.json + tokenizer files + a model card)."""
    paths = []
    for i, sd in enumerate(trained_mlps[:2]):
        d = tmp_path / f"ft{i}"
        d.mkdir()
        st.save_file({k: v.contiguous() for k, v in sd.items()}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"architecture": "mlp", "num_classes": 10, "ft": i}))
        (d / "tokenizer.json").write_text('{"version": "1.0"}')
        (d / "README.md").write_text(f"# fine-tune {i}\n")
        paths.append(d)
    return paths


def _mean(trained_mlps, k):
    return (trained_mlps[0][k].float() + trained_mlps[1][k].float()) / 2


def test_pickled_output_is_a_plain_state_dict_with_provenance_beside_it(cli, tmp_path, ingredients, trained_mlps):
    out = tmp_path / "out" / "pytorch_model.bin"  # the folder does not exist yet: it is created
    r = cli("soup", *ingredients, "-o", out)
    assert r.exit_code == 0, r.stderr
    model = make_mlp()
    model.load_state_dict(torch.load(out, weights_only=True))  # what a user of any other tool does
    assert torch.allclose(model.state_dict()["head.weight"], _mean(trained_mlps, "head.weight"))
    side = json.loads((tmp_path / "out" / "pytorch_model.bin.weightspace.json").read_text())
    assert side["op"] == "uniform_soup" and len(side["ingredients"][0]["sha256"]) == 64
    assert ws.load(out).provenance == side  # and weightspace reads it back
    # local ingredients are named from the output's folder, as in a safetensors output: the run can move
    assert [i["source"] for i in side["ingredients"]] == [f"../{p.name}" for p in ingredients]
    st_out = tmp_path / "out" / "soup.safetensors"
    assert cli("soup", *ingredients, "-o", st_out).exit_code == 0
    assert [i["source"] for i in ws.load(st_out).provenance["ingredients"]] == [f"../{p.name}" for p in ingredients]


def test_hf_folder_with_shards_config_and_dtype(cli, tmp_path, ingredients, trained_mlps):
    import huggingface_hub
    out = tmp_path / "soup"
    r = cli("soup", *ingredients, "-o", f"{out}/", "--max-shard-size", "4KB", "--dtype", "bf16")
    assert r.exit_code == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    # non-weight files of the first ingredient come along; its model card and weights do not
    assert json.loads((out / "config.json").read_text())["ft"] == 0
    assert (out / "tokenizer.json").exists() and not (out / "README.md").exists()
    # huggingface_hub's own sharded loader reads it into the model; floats are bf16, integer buffers untouched
    model = make_mlp().to(torch.bfloat16)
    huggingface_hub.load_torch_model(model, out)
    sd = model.state_dict()
    assert sd["head.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["head.weight"], _mean(trained_mlps, "head.weight").to(torch.bfloat16))
    ck = ws.load(out)
    assert ck.info("features.1.num_batches_tracked")[0] == torch.int64
    assert ck.provenance["dtype"] == "bf16"
    # each shard holds at most 4 KB, or one tensor larger than that alone
    for name in shards:
        tensors = st.load_file(out / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 4000 or len(tensors) == 1, (name, size)


def test_force_removes_exactly_the_previous_shards(cli, tmp_path, ingredients):
    out = tmp_path / "soup"
    assert cli("soup", *ingredients, "-o", f"{out}/", "--max-shard-size", "2KB").exit_code == 0
    before = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    (out / "notes.txt").write_text("mine")
    (out / "other.safetensors").write_bytes((ingredients[0] / "model.safetensors").read_bytes())
    r = cli("soup", *ingredients, "-o", f"{out}/", "--max-shard-size", "2KB")
    assert r.exit_code == 2 and "--force" in r.stderr  # never replaced without --force
    r = cli("soup", *ingredients, "-o", f"{out}/", "--max-shard-size", "100KB", "--force")
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert not (before & names)  # every shard of the previous index is gone (the new weights are one file) ...
    assert {"model.safetensors", "notes.txt", "other.safetensors", "config.json"} <= names  # ... nothing else
    assert "model.safetensors.index.json" not in names


def test_single_file_past_the_shard_size_is_refused_and_suggests_a_folder(cli, tmp_path, ingredients):
    out = tmp_path / "big.safetensors"
    r = cli("soup", *ingredients, "-o", out, "--max-shard-size", "2KB")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"-o {tmp_path / 'big'}/" in r.stderr and not out.exists()
