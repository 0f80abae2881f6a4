"""Loading (files, shards, nesting, prefixes, EMA, tied tensors) and what we write (safetensors, provenance, bytes)."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

import weightspace as ws
from weightspace import errors
from weightspace.ops import stream as ops
from weightspace.ops.parallel import single_thread


def same(ck, sd) -> None:
    assert sorted(ck) == sorted(sd)
    for k in sd:
        assert torch.equal(ck[k], sd[k]), k
        assert ck.info(k) == (sd[k].dtype, tuple(sd[k].shape))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- what we write ---------------------------------------------------------------------------------------------

def test_written_safetensors_load_with_the_reference_library(tmp_path, trained_mlps):
    srcs = []
    for i, sd in enumerate(trained_mlps[:2]):
        srcs.append(tmp_path / f"m{i}.safetensors")
        st.save_file(sd, srcs[-1])
    out = ws.save(ops.uniform_soup_stream(srcs), tmp_path / "soup.safetensors")
    loaded = st.load_file(out)
    expect = ws.uniform_soup(srcs)
    assert sorted(loaded) == sorted(expect)
    assert all(torch.equal(loaded[k], expect[k]) for k in loaded)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(expect)
        assert torch.equal(f.get_tensor("head.weight"), expect["head.weight"])
    prov = json.loads(meta["weightspace"])
    assert prov["op"] == "uniform_soup" and prov["coefficients"] == [0.5, 0.5]
    assert prov["weightspace_version"] == ws.__version__
    # local sources are recorded relative to the output's folder, so the bytes do not depend on where the run lives
    assert prov["ingredients"] == [{"source": p.name, "sha256": sha(p)} for p in srcs]
    assert ws.load(out).provenance == prov


def test_same_inputs_give_identical_bytes(tmp_path, trained_mlps):
    srcs = []
    for i, sd in enumerate(trained_mlps):
        srcs.append(tmp_path / f"m{i}.safetensors")
        st.save_file(sd, srcs[-1])
    a = ws.save(ops.weighted_average_stream(srcs, [1, 2, 3]), tmp_path / "a.safetensors")
    b = ws.save(ops.weighted_average_stream(srcs, [1, 2, 3]), tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    # the streamed writer and the in-memory writer agree byte for byte
    c = ws.save(ws.weighted_average(srcs, [1, 2, 3]), tmp_path / "c.safetensors")
    assert c.read_bytes() == a.read_bytes()


def test_save_plain_dicts_noncontiguous_and_pt(tmp_path):
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"t": w.t(), "e": torch.empty(0, 3), "s": torch.tensor(2.5, dtype=torch.float64)}
    p = ws.save(sd, tmp_path / "x.safetensors", provenance={"note": "hand-made"})
    back = st.load_file(p)
    assert torch.equal(back["t"], w.t()) and back["e"].shape == (0, 3) and back["s"].item() == 2.5
    assert ws.load(p).provenance["note"] == "hand-made"
    pt = ws.save(sd, tmp_path / "x.pt", provenance={"note": "hand-made"})
    raw = torch.load(pt, weights_only=True)
    assert sorted(raw) == ["e", "s", "t"] and torch.equal(raw["t"], w.t())  # a plain state dict ...
    assert json.loads((tmp_path / "x.pt.weightspace.json").read_text())["note"] == "hand-made"  # ... provenance beside
    ck = ws.load(pt)
    same(ck, {k: v for k, v in sd.items()})
    assert ck.provenance["note"] == "hand-made"  # provenance survives the .pt format too
    with pytest.raises(errors.OutputExists):
        ws.save(sd, p)
    ws.save({"t": w}, p, force=True)
    assert sorted(st.load_file(p)) == ["t"]


# --- shards -----------------------------------------------------------------------------------------------------

def _write_shards(folder, sd, name: str, save, index: dict) -> None:
    """Two shards named like HF's (name has {i}), plus their index file."""
    folder.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = name.format(i=i + 1)
        save({k: sd[k] for k in part}, folder / shard)
        weight_map.update({k: shard for k in part})
    index_name, extra = next(iter(index.items()))
    (folder / index_name).write_text(json.dumps({**extra, "weight_map": weight_map}))


def test_safetensors_shards_with_index(tmp_path, trained_mlps):
    sd = trained_mlps[0]
    folder = tmp_path / "sharded"
    _write_shards(folder, sd, "model-0000{i}-of-00002.safetensors", st.save_file,
                  {"model.safetensors.index.json": {"metadata": {}}})
    ck = ws.load(folder)
    same(ck, sd)
    assert len(ck.files) == 2 and ck.note == "2 shards"
    same(ws.load(folder / "model.safetensors.index.json"), sd)
    # a shard named in the index but absent is one clear error
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(errors.SourceError, match="'model-00002-of-00002.safetensors' is missing"):
        ws.load(folder)


def test_pytorch_bin_shards_with_index(tmp_path, trained_mlps):
    sd = trained_mlps[1]
    folder = tmp_path / "binshards"
    _write_shards(folder, sd, "pytorch_model-0000{i}-of-00002.bin", torch.save, {"pytorch_model.bin.index.json": {}})
    same(ws.load(folder), sd)
    # the soup of a sharded checkpoint with a single-file one works and hashes both
    single = tmp_path / "single.safetensors"
    st.save_file(trained_mlps[0], single)
    soup = ws.uniform_soup([folder, single])
    assert torch.allclose(soup["head.weight"], (sd["head.weight"] + trained_mlps[0]["head.weight"]) / 2)
    assert soup.provenance["ingredients"][1]["sha256"] == sha(single)


def test_folder_resolution(tmp_path, trained_mlps):
    one = tmp_path / "one"
    one.mkdir()
    st.save_file(trained_mlps[0], one / "model.safetensors")
    torch.save(trained_mlps[1], one / "pytorch_model.bin")
    same(ws.load(one), trained_mlps[0])  # safetensors preferred over a pickle
    many = tmp_path / "many"
    many.mkdir()
    st.save_file(trained_mlps[0], many / "a.safetensors")
    st.save_file(trained_mlps[1], many / "b.safetensors")
    with pytest.raises(errors.SourceError, match="several weight files"):
        ws.load(many)


# --- nesting, prefixes, EMA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 7},
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
    lambda sd: {"module": {"module._orig_mod." + k: v for k, v in sd.items()}},
], ids=["state_dict+module.", "model+optimizer", "_orig_mod.", "module+module._orig_mod."])
def test_nesting_and_prefixes_are_normalised(tmp_path, trained_mlps, wrap):
    p = tmp_path / "wrapped.pt"
    torch.save(wrap(trained_mlps[0]), p)
    same(ws.load(p), trained_mlps[0])


def test_prefixed_safetensors_and_key_collisions(tmp_path, trained_mlps):
    sd = trained_mlps[0]
    p = tmp_path / "compiled.safetensors"
    st.save_file({"_orig_mod." + k: v for k, v in sd.items()}, p)
    same(ws.load(p), sd)
    clash = tmp_path / "clash.safetensors"
    st.save_file({"head.bias": sd["head.bias"], "module.head.bias": sd["head.bias"].clone()}, clash)
    with pytest.raises(errors.CheckpointError, match="both normalise to 'head.bias'"):
        ws.load(clash)


def _ema_of(sd):
    return {k: v * 0.5 if v.is_floating_point() else v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("regular, ema_name", [("model", "model_ema"), ("state_dict", "state_dict_ema")])
def test_ema_containers(tmp_path, trained_mlps, regular, ema_name):
    sd = trained_mlps[0]
    p = tmp_path / "ema.pt"
    torch.save({regular: sd, ema_name: _ema_of(sd), "epoch": 3}, p)
    plain = ws.load(p)
    same(plain, sd)
    assert ema_name in plain.variant and "ignored" in plain.variant
    ema = ws.load(p, ema=True)
    same(ema, _ema_of(sd))
    assert "EMA" in ema.variant and ema_name in ema.variant
    soup = ws.uniform_soup([p, p], ema=True)
    assert soup.provenance["ingredients"][0]["variant"] == ema.variant


def test_ema_only_container_is_taken_and_reported(tmp_path, trained_mlps):
    p = tmp_path / "only-ema.pt"
    torch.save({"state_dict_ema": trained_mlps[0]}, p)
    ck = ws.load(p)
    same(ck, trained_mlps[0])
    assert "EMA" in ck.variant


def test_ema_prefixed_keys(tmp_path, trained_mlps):
    sd = trained_mlps[0]
    p = tmp_path / "ema-keys.safetensors"
    st.save_file({**sd, **{"ema." + k: v for k, v in _ema_of(sd).items()}}, p)
    plain = ws.load(p)
    same(plain, sd)
    assert "non-EMA" in plain.variant
    ema = ws.load(p, ema=True)
    same(ema, _ema_of(sd))
    assert ema.variant.startswith("EMA")
    no_ema = tmp_path / "plain.safetensors"
    st.save_file(sd, no_ema)
    same(ws.load(no_ema, ema=True), sd)  # ema=True prefers EMA weights (timm's use_ema): none here, so the weights
    with pytest.raises(errors.CheckpointError, match="no EMA weights"):
        ws.load(f"{no_ema}?ema=1")  # ?ema=1 requires them


# --- tied tensors -------------------------------------------------------------------------------------------------

def _tied_bigram_lm(digits, seed: int) -> torch.nn.Module:
    """A bigram model over the digits' pixel intensities (tokens 0–16) whose output head is tied to its embedding."""
    x, _ = digits
    tokens = (x[:400] * 16).round().long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(OrderedDict(emb=torch.nn.Embedding(17, 8), head=torch.nn.Linear(8, 17, bias=False)))
    model.head.weight = model.emb.weight
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with single_thread():
        for _ in range(20):
            opt.zero_grad()
            logits = model(tokens[:, :-1].reshape(-1))
            torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1)).backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def tied_pts(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("tied")
    paths = []
    for seed in (0, 1):
        paths.append(folder / f"lm{seed}.pt")
        torch.save(_tied_bigram_lm(digits, seed).state_dict(), paths[-1])
    return paths


def test_tied_tensors_detected_averaged_once_and_written(tmp_path, tied_pts, cli):
    ck = ws.load(tied_pts[0])
    assert ck.aliases == {"head.weight": "emb.weight"}
    assert ck.num_params == 17 * 8  # counted once
    out = tmp_path / "soup.safetensors"
    r = cli("soup", *tied_pts, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "tied" in r.stderr and "head.weight" in r.stderr
    back = st.load_file(out)  # safetensors accepts the file: the alias is written as its own copy
    sds = [torch.load(p, weights_only=True) for p in tied_pts]
    mean = (sds[0]["emb.weight"] + sds[1]["emb.weight"]) / 2
    assert torch.allclose(back["emb.weight"], mean, rtol=1e-6) and torch.equal(back["head.weight"], back["emb.weight"])
    assert ws.load(out).provenance["tied"] == {"head.weight": "emb.weight"}
    # a .pt output keeps the sharing, so loading it finds the tie again
    pt = ws.save(ops.uniform_soup_stream(tied_pts), tmp_path / "soup.pt")
    assert ws.load(pt).aliases == {"head.weight": "emb.weight"}


# --- the file-hash cache ------------------------------------------------------------------------------------------

def test_hash_cache_remembers_unchanged_files_only(tmp_path, monkeypatch, trained_mlps):
    import time

    cache = tmp_path / "cache" / "sha256.json"
    monkeypatch.setenv("WEIGHTSPACE_HASH_CACHE", str(cache))
    a = tmp_path / "a.safetensors"
    st.save_file(trained_mlps[0], a)

    def digest() -> str:
        return ws.uniform_soup([a]).provenance["ingredients"][0]["sha256"]

    assert digest() == sha(a)
    assert not cache.exists()  # just written: too fresh to trust its timestamps ("racy" window)
    time.sleep(2.1)
    assert digest() == sha(a)
    entries = json.loads(cache.read_text())
    assert entries[str(a.resolve())][1] == sha(a)
    # the cache is what answers now: a planted digest comes back while the file's inode and times are unchanged
    entries[str(a.resolve())][1] = "f" * 64
    cache.write_text(json.dumps(entries))
    assert digest() == "f" * 64
    # rewriting the file in place with the same size changes its ctime, so the real digest is computed again
    other = trained_mlps[1]
    with open(a, "r+b") as f:
        f.write(st.save(other))
    assert a.stat().st_size == len(st.save(other))
    assert digest() == sha(a) != "f" * 64
    monkeypatch.setenv("WEIGHTSPACE_HASH_CACHE", "off")
    cache.unlink()
    assert digest() == sha(a) and not cache.exists()


def test_a_refused_file_never_closes_another_files_descriptor(tmp_path, trained_mlps):
    """A reader that fails on a corrupt header closes its descriptor once; when the failed object is collected later
    it must not close the same number again, which by then belongs to another open file."""
    import gc

    from weightspace.io.formats import SafetensorsReader
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    good = tmp_path / "good.safetensors"
    st.save_file({k: v.contiguous() for k, v in trained_mlps[0].items()}, good)
    err = None
    try:
        SafetensorsReader(bad)
    except errors.CheckpointError as e:
        err = e  # the traceback keeps the failed reader alive until the error is dropped
    reader = SafetensorsReader(good)
    del err
    gc.collect()
    assert torch.equal(reader.read("head.bias"), trained_mlps[0]["head.bias"])
