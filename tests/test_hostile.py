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


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "empty", "nonstring", "folder"])
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
            "nonstring": {"w": "part1.safetensors", "b": 7},
            "folder": {"w": "part1.safetensors", "b": "."}}
    if how == "symlink":
        (folder / "link.safetensors").symlink_to(outside / "x.safetensors")
    index = _index(folder, maps[how])
    for source in (index, folder):
        msg = one_line(cli("soup", pair[0], source, "-o", tmp_path / "out.safetensors"))
        assert str(index) in msg
        assert {"dotdot": "outside the index's folder", "absolute": "outside the index's folder",
                "symlink": "outside the index's folder", "empty": "empty 'weight_map'",
                "nonstring": "not a shard file name", "folder": "shard '.' is not a file"}[how] in msg
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


def test_a_hub_cache_snapshot_folder_given_as_a_local_path_loads(cli, tmp_path, pair):
    """A snapshot's files are links into the cache repo's blobs/: that is where they belong, not an escape."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("c0" * 20)
    snap.mkdir(parents=True)
    st.save_file({"w": torch.full((4,), 3.0)}, repo / "blobs" / "1111")
    st.save_file({"b": torch.ones(2)}, repo / "blobs" / "2222")
    (repo / "blobs" / "3333").write_text(json.dumps({"weight_map": {"w": "m-1.safetensors", "b": "m-2.safetensors"}}))
    for name, blob in (("m-1.safetensors", "1111"), ("m-2.safetensors", "2222"), ("model.safetensors.index.json", "3333")):
        (snap / name).symlink_to(f"../../blobs/{blob}")
    out = tmp_path / "out.safetensors"
    r = cli("soup", pair[0], snap, "-o", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(st.load_file(out)["w"], torch.full((4,), 2.0))
    # a snapshot's link that leaves the cache repo is still an escape
    outside = tmp_path / "x.safetensors"
    st.save_file({"b": torch.full((2,), 100.0)}, outside)
    (snap / "m-2.safetensors").unlink()
    (snap / "m-2.safetensors").symlink_to(outside)
    msg = one_line(cli("soup", pair[0], snap, "-o", tmp_path / "out2.safetensors"))
    assert "outside the index's folder" in msg and not (tmp_path / "out2.safetensors").exists()


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


# class 2: runaway output from a tiny file ------------------------------------------------------------------------


def test_expanded_views_refused_unless_allowed(cli, tmp_path):
    tiny = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(10**12)}, tiny)
    assert tiny.stat().st_size < 4000
    out = tmp_path / "out.safetensors"
    msg = one_line(cli("soup", tiny, tiny, "-o", out))
    assert str(tiny) in msg and "'w'" in msg and "4,000,000,000,000 bytes" in msg and "--allow-expanded" in msg
    msg = one_line(cli("inspect", tiny))
    assert "--allow-expanded" in msg
    overlapping = tmp_path / "overlap.pt"
    torch.save({"w": torch.zeros(2000).as_strided((1000, 1000), (1, 1))}, overlapping)
    assert "overlapping" in one_line(cli("soup", overlapping, overlapping, "-o", out))
    # a view that does not grow when written out passes, and the flag lets a growing one through
    ok = tmp_path / "ok.pt"
    torch.save({"position_ids": torch.arange(8).expand((1, -1)), "w": torch.zeros(2, 3).expand(2, 2, 3)[:1]}, ok)
    r = cli("soup", ok, ok, "-o", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(st.load_file(out)["position_ids"], torch.arange(8).reshape(1, 8))
    small = tmp_path / "small-expanded.pt"
    torch.save({"w": torch.ones(1).expand(5)}, small)
    r = cli("soup", small, small, "-o", tmp_path / "allowed.safetensors", "--quiet", "--allow-expanded")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(st.load_file(tmp_path / "allowed.safetensors")["w"], torch.ones(5))
    assert not out.with_name("x").exists()


def test_legacy_pickle_declaring_more_storage_than_the_file_holds(cli, tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, legacy, _use_new_zipfile_serialization=False)
    data = bytearray(legacy.read_bytes())
    # the storage's element count (4) sits in the pickle as BININT1 4 after the 'cpu' location string
    at = data.index(b"X\x03\x00\x00\x00cpuq") + 9
    at = data.index(b"K\x04", at)
    data[at:at + 2] = b"J" + struct.pack("<i", 2**31 - 1)  # BININT 2^31-1 elements: 8 GB declared
    patched = tmp_path / "patched.pt"
    patched.write_bytes(bytes(data))
    msg = one_line(cli("inspect", patched))
    assert str(patched) in msg and "declares" in msg and "8,589,934,588 bytes" in msg


# class 7: pickled tensors that are not plain dense data, and dtypes the ops cannot combine --------------------------


@pytest.mark.parametrize("kind,tensor,words", [
    ("sparse", lambda: torch.eye(3).to_sparse(), "sparse_coo tensor"),
    ("meta", lambda: torch.empty(3, device="meta"), "meta tensor"),
    ("quantised", lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8), "quantised"),
    ("nested", lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensor"),
    ("csr", lambda: torch.eye(3).to_sparse_csr(), "sparse_csr tensor"),
])
def test_pickled_tensors_that_are_not_dense_data(cli, tmp_path, kind, tensor, words):
    bad = tmp_path / f"{kind}.pt"
    torch.save({"w": tensor()}, bad)
    msg = one_line(cli("inspect", bad))
    assert str(bad) in msg and "'w'" in msg and words in msg


def test_float8_is_combined_and_complex_is_named(cli, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file({"w": torch.tensor([0.5, 1.0, 448.0]).to(torch.float8_e4m3fn)}, a)
    st.save_file({"w": torch.tensor([1.5, 2.0, 448.0]).to(torch.float8_e4m3fn)}, b)
    out = tmp_path / "out.safetensors"
    r = cli("soup", a, b, "-o", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    got = st.load_file(out)["w"]
    assert got.dtype == torch.float8_e4m3fn and got.float().tolist() == [1.0, 1.5, 448.0]
    ca, cb = tmp_path / "ca.safetensors", tmp_path / "cb.safetensors"
    st.save_file({"w": torch.ones(2, dtype=torch.complex64)}, ca)
    st.save_file({"w": torch.ones(2, dtype=torch.complex64)}, cb)
    msg = one_line(cli("soup", ca, cb, "-o", tmp_path / "c.safetensors"))
    assert str(ca) in msg and "'w'" in msg and "complex64" in msg and "cannot combine" in msg


# class 8: one line, never more ----------------------------------------------------------------------------------


def test_a_key_with_a_newline_cannot_forge_a_second_line(cli, tmp_path, pair):
    forged = tmp_path / "forged.safetensors"
    st.save_file({"w\nweightspace: error: forged": torch.ones(4), "b": torch.zeros(2)}, forged)
    msg = one_line(cli("soup", pair[0], forged, "-o", tmp_path / "out.safetensors"))
    assert "\\n" in msg and "forged" in msg


def test_bad_option_values_are_one_line(cli, tmp_path, pair):
    msg = one_line(cli("soup", *pair, "--weights", "1,x", "-o", tmp_path / "out.safetensors"))
    assert "--weights" in msg and "soup" in msg and "--help" in msg
    assert "--alpha" in one_line(cli("interpolate", *pair, "--alpha", "zz", "-o", tmp_path / "o.safetensors"))
    # an option without its value: click raises that without a context, yet the line still names the verb
    msg = one_line(cli("soup", *pair, "-o", tmp_path / "o.safetensors", "--weights"))
    assert " soup: Option '--weights' requires an argument" in msg and " soup --help)" in msg
    assert "--weights 1,-1: they sum to zero" in one_line(cli("soup", *pair, "--weights", "1,-1", "-o",
                                                            tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


def test_library_warnings_do_not_precede_the_error_line(cli, tmp_path, pair, monkeypatch):
    import logging
    import warnings

    import weightspace.io.checkpoint as checkpoint
    real = checkpoint.load_pickle

    def noisy(path):
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        logging.getLogger().error("a root error line, as open_clip writes it")
        logging.getLogger("huggingface_hub").warning("a retry line")
        return real(path)
    monkeypatch.setattr(checkpoint, "load_pickle", noisy)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    msg = one_line(cli("soup", pair[0], junk, "-o", tmp_path / "out.safetensors"))
    assert str(junk) in msg


# class 10: memory that grows with N for .pt ingredients --------------------------------------------------------------


def test_legacy_pickles_soup_exactly_as_zip_pickles(cli, tmp_path):
    """Legacy (non-zip) pickles are moved out of the process's memory on load: views, offsets, tied weights and
    integer buffers come back as they were stored."""
    outs = []
    for fmt in ("zip", "legacy"):
        paths = []
        for i in range(2):
            base = torch.arange(24, dtype=torch.float32) * (i + 1)
            sd = {"w": base.view(4, 6), "w_t": base.view(4, 6).t(), "part": base[5:9], "h": base[:3].half(),
                  "steps": torch.tensor(7 + i), "empty": torch.zeros(0, 3)}
            paths.append(tmp_path / f"{fmt}{i}.pt")
            torch.save({"state_dict": sd}, paths[-1], _use_new_zipfile_serialization=(fmt == "zip"))
        out = tmp_path / f"{fmt}.safetensors"
        r = cli("soup", *paths, "-o", out, "--quiet")
        assert r.exit_code == 0, r.stderr
        outs.append(st.load_file(out))
    assert sorted(outs[0]) == sorted(outs[1])
    for k in outs[0]:
        assert outs[0][k].dtype == outs[1][k].dtype and torch.equal(outs[0][k], outs[1][k]), k
    assert torch.equal(outs[1]["w_t"], (torch.arange(24.0) * 1.5).view(4, 6).t())


MEASURE_ANON = """
import sys, torch
from weightspace.io.sources import load
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
before = anon()
held = [load(p) for p in sys.argv[1:]]  # every ingredient open at once, as a soup holds them
print(anon() - before)
"""


def test_pickled_ingredients_do_not_stay_in_anonymous_memory(tmp_path):
    """N open legacy pickles cost about one file of anonymous memory (the one being loaded), not N: measured as
    RssAnon (mapped pages of files do not count) in a fresh process. bench/pt_memory.py prints the figures."""
    import subprocess
    n, mb = 12, 8
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        paths.append(tmp_path / f"legacy{i}.pt")
        torch.save({f"layer{j}": torch.randn(mb << 16, generator=g) for j in range(4)}, paths[-1],
                   _use_new_zipfile_serialization=False)
    r = subprocess.run([sys.executable, "-c", MEASURE_ANON, *map(str, paths)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.split()[-1])
    assert grew < 3 * (mb << 20), f"{grew / 2**20:.0f} MiB of anonymous memory for {n} files of {mb} MiB"


# class 11: the same inputs give the same bytes wherever the run lives ----------------------------------------------


def test_outputs_in_different_folders_are_identical(cli, tmp_path, pair):
    outs = []
    for name in ("run-one", "deeper/run-two"):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        # the ingredients sit beside each run's output, as a demo's do
        for p in pair:
            (run / p.name).write_bytes(p.read_bytes())
        out = run / "soup.safetensors"
        r = cli("soup", run / "a.safetensors", run / "b.safetensors", "-o", out, "--quiet")
        assert r.exit_code == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with st.safe_open(str(tmp_path / "runs" / "run-one" / "soup.safetensors"), "pt") as f:
        prov = json.loads(f.metadata()["weightspace"])
    assert [i["source"] for i in prov["ingredients"]] == ["a.safetensors", "b.safetensors"]
    assert all(len(i["sha256"]) == 64 for i in prov["ingredients"])
