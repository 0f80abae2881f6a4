"""Task arithmetic and TIES: hand-worked examples, numpy references, streaming vs in-memory, the CLI, λ search."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import weightspace as ws
from weightspace.errors import ConfigError, IncompatibleCheckpoints
from weightspace.ops.engine import running_statistic
from weightspace.ops.merge import kth_largest_magnitudes, method_names, merge, plan_merge
from weightspace.search.scale import search_scale



def make_mlp() -> torch.nn.Module:
    """64 → 32 (BatchNorm: an int64 num_batches_tracked buffer that merges must copy from the base) → 10."""
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory, digits):
    """A base MLP trained on digits 0–4, and three fine-tunes of it on other class subsets, saved as safetensors."""
    x, y = digits
    d = tmp_path_factory.mktemp("merge")

    def fit(model, mask, steps, seed):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        xs, ys = x[mask], y[mask]
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~10× faster than two when the cores are shared
    torch.manual_seed(0)
    model = make_mlp()
    base = fit(model, y < 5, 60, 0)
    paths = {"base": d / "base.safetensors"}
    save_file(base, paths["base"])
    for i, classes in enumerate([(5, 6), (7, 8), (9, 0)]):
        model.load_state_dict(base)
        sd = fit(model, (y == classes[0]) | (y == classes[1]), 30, i + 1)
        paths[f"ft{i}"] = d / f"ft{i}.safetensors"
        save_file(sd, paths[f"ft{i}"])
    torch.set_num_threads(threads)
    return paths


def test_registry_names():
    assert sorted(method_names()) == ["breadcrumbs", "dare-linear", "dare-ties", "della", "della-linear", "fisher", "karcher", "model-stock", "nuslerp", "regmean", "sce", "slerp", "task-arithmetic", "ties"]


def test_ties_worked_example():
    # Base: w = [[1, 1, 1], [1, 1, 1]], b = [0, 0]; plus an int buffer that must come from the base.
    # Task vectors (θ_t − θ_pre), 8 floating entries per model (w then b):
    #   τ1: w = [[ 4, -1, 0.5], [-3, 2,   0]], b = [ 1, -6]
    #   τ2: w = [[-2,  3, 1  ], [-4, 0.5, 0]], b = [-5,  2]
    #   τ3: w = [[ 1, -2, -3 ], [ 5, 0.1, 0]], b = [ 3, -1]
    # Trim, keep = 0.5 → round(0.5·8) = 4 entries per task vector, over the WHOLE model (w and b together):
    #   |τ1| sorted: 6 4 3 2 1 1 0.5 0 → threshold 2 → τ̂1: w = [[4,0,0],[-3,2,0]],  b = [0,-6]
    #   |τ2| sorted: 5 4 3 2 2 1 0.5 0 → threshold 2 → τ̂2: w = [[-2,3,0],[-4,0,0]], b = [-5,2]
    #        (a tie at the threshold: both 2s are kept, so τ2 keeps 5 entries)
    #   |τ3| sorted: 5 3 3 2 1 1 0.1 0 → threshold 2 → τ̂3: w = [[0,-2,-3],[5,0,0]],  b = [3,0]
    #   (per-tensor trimming would differ: e.g. τ1's w alone keeps 3 of 6 with threshold 2, and b keeps 1 of 2.)
    # Elect: sign of Σ τ̂:  w sums [[2,1,-3],[-2,2,0]] → [[+,+,-],[-,+,0]]; b sums [-2,-4] → [-,-]
    # Disjoint mean of the entries that agree with the elected sign (zeros excluded):
    #   w[0,0]: +4 (τ1) → 4;  w[0,1]: +3 (τ2) → 3;  w[0,2]: -3 (τ3) → -3
    #   w[1,0]: -3, -4 → -3.5;  w[1,1]: +2 → 2;  w[1,2]: nothing → 0
    #   b[0]: -5 → -5;  b[1]: -6 → -6
    # θ = θ_pre + λ·τ with λ = 0.5: w = [[3, 2.5, -0.5], [-0.75, 2, 1]], b = [-2.5, -3]
    base = {"w": torch.ones(2, 3), "b": torch.zeros(2), "n": torch.tensor(7)}
    t1 = {"w": torch.tensor([[4.0, -1, 0.5], [-3, 2, 0]]), "b": torch.tensor([1.0, -6])}
    t2 = {"w": torch.tensor([[-2.0, 3, 1], [-4, 0.5, 0]]), "b": torch.tensor([-5.0, 2])}
    t3 = {"w": torch.tensor([[1.0, -2, -3], [5, 0.1, 0]]), "b": torch.tensor([3.0, -1])}
    models = [{"w": base["w"] + t["w"], "b": base["b"] + t["b"], "n": torch.tensor(i)} for i, t in enumerate([t1, t2, t3])]
    out = ws.ties_merge(base, models, keep=0.5, scale=0.5)
    assert torch.equal(out["w"], torch.tensor([[3.0, 2.5, -0.5], [-0.75, 2, 1]]))
    assert torch.equal(out["b"], torch.tensor([-2.5, -3.0]))
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64
    assert out.provenance["thresholds"] == [2.0, 2.0, 2.0]
    assert out.provenance["kept_per_task"] == 4


def test_task_arithmetic_matches_numpy(finetunes):
    sds = {k: load_file(v) for k, v in finetunes.items()}
    out = ws.task_arithmetic(finetunes["base"], [finetunes["ft0"], finetunes["ft1"], finetunes["ft2"]],
                             scale=0.4, negate=[False, True, False])
    for key, b in sds["base"].items():
        if not b.is_floating_point():
            # num_batches_tracked: the largest count of the base and the models, never averaged
            assert torch.equal(out[key], torch.stack([sds[n][key] for n in ("base", "ft0", "ft1", "ft2")]).amax(0))
            continue
        if running_statistic(key):  # not extrapolated: the mean of the models added (ft1 is negated)
            torch.testing.assert_close(out[key], (sds["ft0"][key] + sds["ft2"][key]) / 2)
            continue
        nb = b.numpy().astype(np.float64)
        taus = [sds[f"ft{i}"][key].numpy().astype(np.float64) - nb for i in range(3)]
        ref = nb + 0.4 * (taus[0] - taus[1] + taus[2])
        np.testing.assert_allclose(out[key].numpy(), ref, rtol=1e-5, atol=1e-6)
    prov = out.provenance
    assert prov["op"] == "task_arithmetic" and prov["scale"] == 0.4
    assert [i["role"] for i in prov["ingredients"]] == ["base", "task", "task", "task"]
    assert [i.get("sign") for i in prov["ingredients"][1:]] == [1, -1, 1]
    assert all(len(i["sha256"]) == 64 for i in prov["ingredients"])


def test_ties_matches_numpy_reference(finetunes):
    # An independent in-memory TIES over the concatenated model, as the reference code does it, over the
    # parameters: BatchNorm running statistics are the models' mean (the buffer policy) and set no threshold.
    sds = {k: load_file(v) for k, v in finetunes.items()}
    keys = [k for k in sorted(sds["base"]) if sds["base"][k].is_floating_point() and not running_statistic(k)]
    flat = lambda sd: np.concatenate([sd[k].numpy().astype(np.float32).ravel() for k in keys])  # noqa: E731
    base = flat(sds["base"])
    taus = np.stack([flat(sds[f"ft{i}"]) - base for i in range(3)])
    k = round(0.3 * base.size)
    thr = -np.sort(-np.abs(taus), axis=1)[:, k - 1:k]
    trimmed = np.where(np.abs(taus) >= thr, taus, 0)
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = np.where(agree, trimmed, 0).sum(0) / np.maximum(agree.sum(0), 1)
    ref = base + 1.3 * merged
    out = ws.ties_merge(finetunes["base"], [finetunes[f"ft{i}"] for i in range(3)], keep=0.3, scale=1.3)
    got = np.concatenate([out[k].numpy().ravel() for k in keys])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    stats = [k for k in sds["base"] if running_statistic(k)]
    assert stats  # the control: the model has BatchNorm statistics, and they are the fine-tunes' mean
    for k in stats:
        torch.testing.assert_close(out[k], sum(sds[f"ft{i}"][k] for i in range(3)) / 3)
    assert out.provenance["thresholds"] == pytest.approx(thr.ravel().tolist(), rel=0, abs=0)


def test_streamed_threshold_is_exact_kth_largest():
    # Several tensors of mixed dtypes, many exact ties and zeros: the radix selection equals a full sort.
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(300, 7, generator=g), "b": torch.zeros(1000, dtype=torch.float16),
            "c": torch.randn(5, generator=g).double()}
    ft = {"a": base["a"] + torch.randint(-3, 4, (300, 7), generator=g).float() * 0.25,
          "b": (torch.randn(1000, generator=g) * 1e-3).half(), "c": base["c"] + 1e-30}
    _, plan, _ = plan_merge("task-arithmetic", base, [ft])
    everything = torch.cat([(ft[k].double() - base[k].double()).abs().float().ravel() for k in sorted(base)])
    for k in (1, 2, 17, 100, 2100, everything.numel()):
        expected = torch.sort(everything, descending=True).values[k - 1].item()
        assert kth_largest_magnitudes(plan, k) == [expected]


def test_stream_to_disk_equals_in_memory(finetunes, tmp_path):
    models = [finetunes["ft0"], finetunes["ft1"]]
    for method, extra in [("task-arithmetic", {}), ("ties", {"keep": 0.2})]:
        stream = merge(method, finetunes["base"], models, scale=0.7, **extra)
        path = ws.save(stream, tmp_path / f"{method}.safetensors")
        mem = merge(method, finetunes["base"], models, scale=0.7, **extra).materialise()
        on_disk = ws.load(path)
        assert sorted(on_disk) == sorted(mem)
        for k in mem:
            assert torch.equal(on_disk[k], mem[k]), k
        expect = json.loads(json.dumps(mem.provenance))
        for ing in expect["ingredients"]:  # the file records local sources relative to its own folder
            ing["source"] = os.path.relpath(ing["source"], tmp_path)
        assert on_disk.provenance == expect
        # Deterministic: the same merge twice gives the same bytes.
        again = ws.save(merge(method, finetunes["base"], models, scale=0.7, **extra), tmp_path / "again.safetensors",
                        force=True)
        assert again.read_bytes() == path.read_bytes()


def test_small_pieces_and_threads_give_the_same_bytes(finetunes, tmp_path):
    # Every key split into the smallest pieces, on 1 to 4 worker threads, must give exactly the whole-key result.
    models = [finetunes["ft0"], finetunes["ft1"], finetunes["ft2"]]
    for method, extra in [("task-arithmetic", {"negate": [False, True, False]}), ("ties", {"keep": 0.3})]:
        ref = merge(method, finetunes["base"], models, scale=0.8, threads=1, max_memory="1G", **extra).materialise()
        for threads in (1, 2, 4):
            stream = merge(method, finetunes["base"], models, scale=0.8, threads=threads, max_memory=1, **extra)
            assert stream.provenance.get("thresholds") == ref.provenance.get("thresholds")
            small = ws.load(ws.save(stream, tmp_path / f"{method}{threads}.safetensors"))
            assert all(torch.equal(small[k], ref[k]) for k in ref), (method, threads)


def test_merges_change_the_model_sensibly(finetunes, digits):
    # λ = 0 gives the base back exactly; a task vector added fully (one model, λ = 1) gives that model back.
    base = load_file(finetunes["base"])
    zero = ws.ties_merge(finetunes["base"], [finetunes["ft0"], finetunes["ft1"]], scale=0.0)
    one = ws.task_arithmetic(finetunes["base"], [finetunes["ft0"]], scale=1.0)
    ft0 = load_file(finetunes["ft0"])
    for k in base:
        if running_statistic(k):  # the fine-tunes' mean whatever λ
            torch.testing.assert_close(zero[k], (ft0[k] + load_file(finetunes["ft1"])[k]) / 2)
        elif base[k].is_floating_point():
            assert torch.equal(zero[k], base[k])
            assert torch.allclose(one[k], ft0[k], atol=1e-6)
        else:  # buffers such as num_batches_tracked take the largest count, here the fine-tuned model's
            assert torch.equal(one[k], torch.maximum(base[k], ft0[k])) and not torch.equal(one[k], base[k])
    # Trimming keeps at most ~keep of each task vector: the TIES update is sparser than the plain sum.
    ties = ws.ties_merge(finetunes["base"], [finetunes["ft0"]], keep=0.1)
    params = [k for k in base if base[k].is_floating_point() and not running_statistic(k)]
    changed = sum(int((ties[k] != base[k]).sum()) for k in params)
    total = sum(base[k].numel() for k in params)
    assert 0.09 * total <= changed <= 0.11 * total + 1


def test_tied_weights_are_merged_once_and_stay_equal():
    shared = torch.ones(4)
    base = {"emb": shared, "head": shared, "bias": torch.zeros(2)}
    ft = {"emb": torch.full((4,), 3.0), "head": torch.full((4,), 3.0), "bias": torch.ones(2)}
    out = ws.task_arithmetic(base, [ft], scale=0.5)
    assert torch.equal(out["emb"], torch.full((4,), 2.0)) and torch.equal(out["head"], out["emb"])
    assert out.provenance["tied"] == {"head": "emb"}


def test_search_scale_with_scripted_evaluate(finetunes):
    base = load_file(finetunes["base"])
    target = ws.task_arithmetic(finetunes["base"], [finetunes["ft0"], finetunes["ft1"]], scale=0.6)
    calls = []

    def evaluate(sd):  # closest to the λ = 0.6 merge wins; records what it was shown
        calls.append(sd)
        return -sum(float((sd[k].double() - target[k].double()).norm()) for k in base if base[k].is_floating_point())

    res = search_scale("task-arithmetic", finetunes["base"], [finetunes["ft0"], finetunes["ft1"]],
                       evaluate=evaluate, grid=[0.2, 0.4, 0.6, 0.8, 1.0])
    assert res.record.scale == 0.6
    assert [s for s, _ in res.record.scores] == [0.2, 0.4, 0.6, 0.8, 1.0] and len(calls) == 5
    assert res.record.scores[2][1] == pytest.approx(0.0, abs=1e-5)
    for k in target:
        assert torch.allclose(res.weights[k], target[k], atol=1e-6)
    assert res.weights.provenance["scale"] == 0.6
    assert res.weights.provenance["scale_search"]["scores"] == [s for _, s in res.record.scores]
    assert res.to_dict()["method"] == "task-arithmetic" and json.loads(json.dumps(res.to_dict()))["scale"] == 0.6
    # Ties go to the earliest grid value; minimising works too.
    flat = search_scale("ties", finetunes["base"], [finetunes["ft0"]], evaluate=lambda sd: 1.0, grid=[0.5, 0.3, 0.9])
    assert flat.record.scale == 0.5
    # Minimising: the merge closest to the base is the smallest λ of the grid.
    dist = lambda sd: sum(float((sd[k] - base[k]).abs().sum()) for k in base if base[k].is_floating_point())  # noqa: E731
    low = search_scale("ties", finetunes["base"], [finetunes["ft0"]], grid=[0.5, 0.3, 0.9], maximize=False,
                       evaluate=dist)
    assert low.record.scale == 0.3 and low.record.scores[1][1] < low.record.scores[0][1] < low.record.scores[2][1]


def test_bad_input_is_a_one_line_error(finetunes, tmp_path):
    with pytest.raises(ConfigError, match="keep"):
        ws.ties_merge(finetunes["base"], [finetunes["ft0"]], keep=0.0)
    with pytest.raises(ConfigError, match="expected one of"):
        merge("dare", finetunes["base"], [finetunes["ft0"]])
    with pytest.raises(ConfigError, match="at least one"):
        merge("ties", finetunes["base"], [])
    sd = load_file(finetunes["ft0"])
    dropped = sorted(sd)[0]
    save_file({k: v for k, v in sd.items() if k != dropped}, tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleCheckpoints, match=dropped):
        merge("task-arithmetic", finetunes["base"], [tmp_path / "other.safetensors"])


def test_cli_merge(cli, finetunes, tmp_path):
    out = tmp_path / "merged.safetensors"
    r = cli("merge", "--method", "ties", "--base", finetunes["base"], finetunes["ft0"], finetunes["ft1"],
            "--scale", "0.4", "--keep", "0.2", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["output"] == str(out) and info["method"] == "ties" and info["scale"] == 0.4
    assert len(info["thresholds"]) == 2
    ref = ws.ties_merge(finetunes["base"], [finetunes["ft0"], finetunes["ft1"]], scale=0.4, keep=0.2)
    got = ws.load(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert got.provenance["op"] == "ties"
    # No overwrite without --force: one line, exit code 2.
    r = cli("merge", "--method", "ties", "--base", finetunes["base"], finetunes["ft0"], "-o", out)
    assert r.exit_code == 2 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # Negation from the command line: --negate names a model whose task vector is subtracted.
    r = cli("merge", "--method", "task-arithmetic", "--base", finetunes["base"], finetunes["ft0"],
            "--negate", finetunes["ft1"], "--scale", "0.5", "-o", out, "--force", "--quiet")
    assert r.exit_code == 0, r.output
    ref = ws.task_arithmetic(finetunes["base"], [finetunes["ft0"], finetunes["ft1"]], scale=0.5, negate=[False, True])
    got = ws.load(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    r = cli("merge", "--method", "ties", "--base", finetunes["base"], "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2
