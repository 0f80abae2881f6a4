"""Streamed ops on worker threads: the same bytes whatever the thread count and memory budget, equal to a
whole-tensor reference computed in the same order; memory options checked; CUDA refused clearly without a GPU."""
from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

import weightspace as ws
from weightspace import errors
from weightspace.io.sizes import parse_size
from weightspace.ops import parallel
from weightspace.ops import stream as ops

SETTINGS = [(1, None), (2, 1), (3, "64K"), (4, None)]  # (threads, max_memory): 1 byte gives the smallest pieces


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """Three checkpoints on disk with awkward sizes: a tensor split into many uneven pieces, bf16 and fp16
    tensors, an integer buffer, an empty tensor and a scalar."""
    folder = tmp_path_factory.mktemp("par")
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(3):
        sd = {"big": torch.randn(97, 1013, generator=g),          # 98 261 elements: ~96 pieces of 1 024
              "bf": (torch.randn(40_001, generator=g) * 3).bfloat16(),
              "half": torch.randn(5, 4099, generator=g).half(),
              "steps": torch.tensor([7 + i]),
              "empty": torch.empty(0, 3),
              "scalar": torch.tensor(1.5 + i)}
        paths.append(folder / f"m{i}.safetensors")
        st.save_file(sd, paths[-1])
    return paths


def reference(paths, coeffs):
    """Whole tensors, one thread, each element summed in input order in float32 (what every op promises);
    integer buffers take the largest value."""
    sds = [st.load_file(p) for p in paths]
    out = {}
    for k, t0 in sds[0].items():
        if not t0.is_floating_point():
            out[k] = torch.stack([sd[k] for sd in sds]).amax(0)  # integer buffers: the largest value
            continue
        acc = t0.to(torch.float32, copy=True)
        acc.mul_(coeffs[0])
        for sd, c in zip(sds[1:], coeffs[1:]):
            acc.add_(sd[k], alpha=c)
        out[k] = acc.to(t0.dtype)
    return out


def test_soups_are_bit_identical_across_threads_and_budgets(real_files, tmp_path):
    coeffs = [0.5, 0.3, 0.2]
    ref = reference(real_files, coeffs)
    with parallel.single_thread():
        blobs = set()
        for threads, mem in SETTINGS:
            stream = ops.weighted_average_stream(real_files, coeffs, threads=threads, max_memory=mem)
            path = ws.save(stream, tmp_path / f"w{threads}.safetensors")
            blobs.add(path.read_bytes())  # header (provenance) and data alike
            back = st.load_file(path)
            whole = dict(ops.weighted_average_stream(real_files, coeffs, threads=threads, max_memory=mem))
            for k in ref:
                assert back[k].dtype == ref[k].dtype and torch.equal(back[k], ref[k]), (threads, mem, k)
                assert torch.equal(whole[k], ref[k]), (threads, mem, k)
        assert len(blobs) == 1


def test_pieces_really_vary_with_the_budget(real_files):
    small = parallel.plan_execution(model_bytes=10**8, worker_bytes_per_elem=8, held_bytes_per_elem=4,
                                    threads=2, max_memory=1)
    large = parallel.plan_execution(model_bytes=10**8, worker_bytes_per_elem=8, held_bytes_per_elem=4,
                                    threads=2, max_memory="64M")
    assert small.piece == parallel.ALIGN and large.piece > 100 * parallel.ALIGN
    assert large.piece % parallel.ALIGN == 0
    # the pieces and scratch of the default plan fit its budget
    auto = parallel.plan_execution(model_bytes=10**8, worker_bytes_per_elem=8, held_bytes_per_elem=4, threads=2)
    assert auto.budget == 10**8 // 8
    assert auto.piece * (2 * 8 + (auto.depth + 2) * 4) <= auto.budget
    counts = [len(list(ops.uniform_soup_stream(real_files, threads=2, max_memory=m).pieces())) for m in (1, "64M")]
    assert counts[0] > counts[1] >= 6


def test_lerp_and_task_vector_across_threads(real_files):
    a, b = real_files[:2]
    for fn, coeffs in ((lambda **kw: ops.lerp_stream(a, b, 0.25, **kw), [0.75, 0.25]),
                       (lambda **kw: ops.task_vector_stream(a, b, **kw), [1.0, -1.0])):
        ref = reference([a, b], coeffs)
        for threads, mem in SETTINGS:
            got = fn(threads=threads, max_memory=mem).materialise()
            assert all(torch.equal(got[k], ref[k]) for k in ref), (threads, mem)


def test_a_bad_piece_is_named_and_nothing_is_written(real_files, tmp_path):
    bad = st.load_file(real_files[1])
    bad["big"][60, 5] = float("inf")
    path = tmp_path / "bad.safetensors"
    st.save_file(bad, path)
    with pytest.raises(errors.NonFiniteError, match=f"{path}: key 'big' holds Inf"):
        ws.save(ops.uniform_soup_stream([real_files[0], path], threads=3, max_memory=1), tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_memory_and_device_options_are_checked():
    assert parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("300MB") == 300_000_000 and parse_size("4096") == 4096
    for bad in ("lots", "-1G", "0", "5 parsecs"):
        with pytest.raises(errors.ConfigError, match="--max-memory"):
            parse_size(bad)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("5G") == 5 << 30 and parse_size(7) == 7


def test_one_size_rule_for_memory_and_shards(real_files, tmp_path):
    """--max-shard-size reads sizes by the rule --max-memory does: '4K' (binary) shards as '4KiB' does, and both
    options refuse what the other refuses, naming themselves."""
    shards = {}
    for size in ("4K", "4KiB", "4096"):
        out = ws.save(ops.uniform_soup_stream(real_files[:2]), tmp_path / f"s{size}", folder=True, max_shard_size=size)
        shards[size] = sorted(p.name for p in out.iterdir())
    assert shards["4K"] == shards["4KiB"] == shards["4096"] and len(shards["4K"]) > 2
    for bad in ("lots", "0", -5):
        with pytest.raises(errors.ConfigError, match="--max-shard-size"):
            ws.save(ops.uniform_soup_stream(real_files[:2]), tmp_path / "bad.safetensors", max_shard_size=bad)
    assert not (tmp_path / "bad.safetensors").exists()


def test_cuda_and_device_names_are_checked():
    if not torch.cuda.is_available():
        with pytest.raises(errors.ConfigError, match="CUDA is not available"):
            ops.uniform_soup_stream([{"w": torch.ones(3)}], device="cuda")
    with pytest.raises(errors.ConfigError, match="device=tpu"):
        ops.uniform_soup_stream([{"w": torch.ones(3)}], device="tpu")


def test_merges_and_distance_are_the_same_across_threads_and_budgets(real_files, tmp_path):
    base, models = real_files[0], real_files[1:]
    for method, extra in (("ties", {"keep": 0.2}), ("task-arithmetic", {"negate": [False, True]})):
        blobs = {ws.save(ws.merge(method, base, models, scale=0.7, threads=t, max_memory=m, **extra),
                         tmp_path / f"{method}{t}.safetensors").read_bytes() for t, m in SETTINGS}
        assert len(blobs) == 1, method
    ta = ws.task_arithmetic(base, models, negate=[False, True], threads=2, max_memory=1)
    sds = [st.load_file(p) for p in real_files]
    wide = torch.float32
    expect = (sds[0]["big"].to(wide) + ((sds[1]["big"] - sds[0]["big"]) - (sds[2]["big"] - sds[0]["big"])))
    assert torch.equal(ta["big"], expect.to(torch.float32))
    dists = {repr(ws.distance(real_files[0], real_files[1], per_module=True, threads=t)) for t in (1, 2, 4)}
    assert len(dists) == 1  # repr: the empty tensor's cosine is NaN, which == would never match


def test_cli_memory_and_device_options(real_files, tmp_path, cli):
    out = tmp_path / "soup.safetensors"
    r = cli("soup", *real_files, "-o", out, "--max-memory", "1M", "--device", "cpu", "-q")
    assert r.exit_code == 0, r.stderr
    ref = reference(real_files, [1 / 3] * 3)
    back = st.load_file(out)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    for args, msg in ((["--max-memory", "lots"], "--max-memory lots: expected a size"),
                      (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
                       "--device")):
        r = cli("soup", *real_files, "-o", tmp_path / "no.safetensors", *args)
        assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "no.safetensors").exists()
    r = cli("merge", "--method", "ties", "--base", real_files[0], *real_files[1:], "-o", tmp_path / "t.safetensors",
            "--max-memory", "64K", "-q")
    assert r.exit_code == 0, r.stderr
    r = cli("interpolate", *real_files[:2], "--alpha", "0.5", "-o", tmp_path / "mid.safetensors", "--max-memory",
            "2M", "-q")
    assert r.exit_code == 0, r.stderr
    assert all(torch.equal(v, reference(real_files[:2], [0.5, 0.5])[k])
               for k, v in st.load_file(tmp_path / "mid.safetensors").items())
