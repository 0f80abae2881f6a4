"""Rewinding and module criticality on tiny models really trained on digits; module grouping by the tree."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import weightspace as ws
from weightspace.analysis.criticality import module_criticality, random_init, resolve_modules, rewind
from weightspace.eval.data import load_data
from weightspace.errors import ConfigError, IncompatibleCheckpoints
from weightspace.eval.evaluator import Evaluator
from weightspace.eval.models import build_model
from weightspace.eval.modules import build_model_for, model_units, tree_units
from weightspace.eval.train import train

CNN = "weightspace.eval.zoo:small_cnn?width=8"
MLP = "weightspace.eval.zoo:mlp?hidden=32"


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(spec: str, tmp, epochs: int, lr: float, seed: int = 0) -> tuple[str, str]:
    torch.manual_seed(seed)
    m = build_model(spec)
    init = copy.deepcopy(m.state_dict())
    train(m, load_data("digits:train"), epochs=epochs, lr=lr, seed=seed)
    paths = (tmp / f"{seed}-final.safetensors", tmp / f"{seed}-init.safetensors")
    ws.save(m.state_dict(), paths[0])
    ws.save(init, paths[1])
    return str(paths[0]), str(paths[1])


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return _trained(CNN, tmp_path_factory.mktemp("cnn"), epochs=2, lr=0.05)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return _trained(MLP, tmp_path_factory.mktemp("mlp"), epochs=10, lr=0.1)


@pytest.fixture(scope="module")
def test_eval():
    return Evaluator(build_model(CNN), load_data("digits:test"), device="cpu")


def test_tree_units_pair_each_layer_with_its_norm():
    units = tree_units(build_model(CNN), "layer")
    assert [u.name for u in units] == ["conv1", "conv2", "conv3", "fc"]
    assert units[0].keys == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                             "bn1.num_batches_tracked"]
    assert units[0].output == "bn1"
    resnet = build_model("timm:resnet18", num_classes=10)
    blocks = tree_units(resnet, "block")
    assert [u.name for u in blocks] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                        "layer3.1", "layer4.0", "layer4.1", "fc"]
    assert "layer2.0.downsample.0.weight" in blocks[3].keys
    assert [u.name for u in tree_units(resnet, "stage")] == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    for level in ("layer", "block", "stage"):  # every state-dict tensor in exactly one unit
        keys = [k for u in tree_units(resnet, level) for k in u.keys]
        assert sorted(keys) == sorted(resnet.state_dict())
    assert [u.name for u in model_units(build_model(MLP), "tree:layer")] == ["layers.1", "layers.3", "layers.5"]
    assert [u.name for u in model_units(resnet, "depth:1")][:3] == ["conv1", "bn1", "layer1"]
    with pytest.raises(ConfigError, match="tree:layer"):
        tree_units(resnet, "blocks")


def test_build_model_for_reads_the_classifier_from_the_checkpoint():
    sd = build_model(CNN, num_classes=5).state_dict()
    assert build_model_for(CNN, sd).fc.out_features == 5
    assert build_model_for(CNN, sd, num_classes=5).fc.out_features == 5
    assert build_model_for("timm:resnet18", build_model("timm:resnet18", num_classes=3, in_chans=1).state_dict()).conv1.in_channels == 1


def test_rewinding_to_final_changes_nothing(cnn, test_eval):
    final, init = cnn
    r = rewind(final, init, test_eval, to=["final", "init"])
    base = r.baseline["digits:test"]
    for m in r.modules:
        assert r.metrics[m]["final"]["digits:test"] == base
    assert any(r.value(m, "init") > base["error"] for m in r.modules)  # and rewinding to init does hurt


def test_rewinding_every_module_to_init_is_init(cnn, mlp, test_eval):
    final, init = cnn
    everything = {"all": list(ws.load(final))}
    r = rewind(final, init, test_eval, modules=everything, to="init", bn_stats="target")
    assert r.metrics["all"]["init"] == test_eval(init)
    # per-module rewinds of the MLP (no BatchNorm) put back exactly the init's tensors, all at once
    f, i = mlp
    ev = Evaluator(build_model(MLP), load_data("digits:test"), device="cpu")
    groups = resolve_modules(None, list(ws.load(f)), ev.model)
    r = rewind(f, i, ev, modules={"all": [k for ks in groups.values() for k in ks]})
    assert r.metrics["all"]["init"] == ev(i)


def test_only_the_rewound_module_changes_and_bn_stats_stay_final(cnn):
    final, init = cnn
    fin, ini = ws.load(final).materialise(), ws.load(init).materialise()
    seen = []

    def record(w):
        seen.append({k: v.clone() for k, v in w.items()})
        return {"error": 0.0}

    rewind(final, init, record, modules="tree:layer", model=build_model(CNN), to="init")
    assert seen[0].keys() == fin.keys() and all(torch.equal(seen[0][k], fin[k]) for k in fin)
    conv1 = seen[1]
    changed = sorted(k for k in fin if not torch.equal(conv1[k], fin[k]))
    assert changed == ["bn1.bias", "bn1.weight", "conv1.weight"]  # running stats stay FINAL's by default
    assert all(torch.equal(conv1[k], ini[k]) for k in changed)


def test_random_target_draws_from_the_models_initialiser(cnn, test_eval):
    final, init = cnn
    factory = lambda: build_model(CNN)  # noqa: E731
    a, b = random_init(factory, seed=3), random_init(factory, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ref = build_model(CNN).state_dict()
    assert all(torch.equal(a[k], ref[k]) for k in a)
    reset = random_init(build_model(CNN), seed=4)  # an nn.Module: reset_parameters under the seed
    assert not torch.equal(reset["conv1.weight"], a["conv1.weight"])
    r = rewind(final, init, test_eval, to=["init", "random"], model=factory, seed=3)
    assert r.targets == ["init", "random"]
    assert r.value("conv2", "random") != r.value("conv2", "init")


def test_recalibrated_bn_and_errors(cnn, test_eval):
    final, init = cnn
    plain = rewind(final, init, test_eval, to="init")
    recal = rewind(final, init, test_eval, to="init", recalibrate_bn=load_data("digits:train"))
    assert recal.settings["bn_stats"] == "recalibrated"
    assert any(recal.value(m, "init") != plain.value(m, "init") for m in plain.modules)
    with pytest.raises(ConfigError, match="needs an Evaluator"):
        rewind(final, init, lambda w: {"error": 0.0}, model=build_model(CNN), recalibrate_bn=load_data("digits:val"))
    with pytest.raises(IncompatibleCheckpoints, match=r"fc\.(weight|bias)"):
        rewind(final, build_model(CNN, num_classes=3).state_dict(), test_eval, to="init")
    with pytest.raises(ConfigError, match="^to=init needs init") as e:  # the library speaks Python
        rewind(final, None, test_eval, to="init")
    assert e.value.param == "to"


def test_module_criticality_on_a_tiny_trained_model(mlp, tmp_path):
    final, init = mlp
    ev = Evaluator(build_model(MLP), load_data("digits:train"), device="cpu")
    base = ev(final)["digits:train"]["error"]
    assert base < 0.1  # really trained, so ε = 0.1 can be met
    steps, lo, hi = 5, 0.01, 1.0
    r = module_criticality(final, init, ev, alphas=4, sigma_range=(lo, hi), bisect_steps=steps, samples=2, seed=0)
    assert [m["module"] for m in r.modules] == ["layers.1", "layers.3", "layers.5"]
    for m in r.modules:
        assert math.isfinite(m["mu"]) and m["mu"] >= 0
        if m["alpha"]:
            assert m["mu"] == pytest.approx(m["alpha"] ** 2 * m["distance"] ** 2 / m["sigma"] ** 2)
        for f in m["frontier"]:
            if f["sigma_scale_max"] is None:
                assert f["evaluations"][0][1] > 0.1  # infeasible already at the low end
                continue
            values = dict((s, v) for s, v in f["evaluations"])
            assert values[f["sigma_scale_max"]] <= 0.1  # the frontier point itself was measured feasible
            above = [s for s, v in f["evaluations"] if v > 0.1]
            if f["alpha"] and above:  # bisection pins σ_max to (hi/lo)^(1/2^steps) of the first infeasible σ
                assert min(above) / f["sigma_scale_max"] <= (hi / lo) ** (1 / 2 ** steps) * (1 + 1e-9)
            if f["mu"] is not None:
                assert m["mu"] <= f["mu"] + 1e-12  # μ is the minimum over α
    assert r.total == pytest.approx(sum(m["mu"] for m in r.modules))
    # common random numbers: the same seed draws the same noise, so the search repeats exactly
    again = module_criticality(final, init, ev, alphas=4, sigma_range=(lo, hi), bisect_steps=steps, samples=2, seed=0)
    assert [m["frontier"] for m in again.modules] == [m["frontier"] for m in r.modules]
    # a looser bound can only lower μ (same noise draws, value increasing in σ on them)
    loose = module_criticality(final, init, ev, alphas=4, sigma_range=(lo, hi), bisect_steps=steps, samples=2,
                               seed=0, epsilon=0.5)
    assert all(lo_["mu"] <= m["mu"] for lo_, m in zip(loose.modules, r.modules))
    everything = module_criticality(final, init, ev, alphas=2, samples=1, epsilon=1.0)
    assert all(m["mu"] == 0.0 and m["alpha"] == 0.0 for m in everything.modules)  # α=0 feasible: not critical
    impossible = module_criticality(final, init, ev, alphas=2, samples=1, epsilon=base / 2)
    assert all(m["mu"] == math.inf for m in impossible.modules) and "exceeds" in impossible.notes[0]
    files = list(r.write(tmp_path / "crit").values())
    names = {f.name for f in files}
    assert {"results.json", "criticality.csv", "criticality_search.csv", "criticality.png",
            "valley_layers.1.png", "valley_layers.3.png", "valley_layers.5.png"} <= names
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files if f.suffix == ".png")
    saved = json.loads((tmp_path / "crit" / "results.json").read_text())
    assert saved["total_mu"] == pytest.approx(r.total)


def test_cli_modules_rewind_criticality(cli, cnn, tmp_path):
    final, init = cnn
    r = cli("modules", final, "--model", CNN, "--json")
    assert r.exit_code == 0, r.stderr
    listing = json.loads(r.stdout)
    assert [m["name"] for m in listing["modules"]] == ["conv1", "conv2", "conv3", "fc"]
    assert listing["total_parameters"] == sum(p.numel() for p in build_model(CNN).parameters())
    r = cli("modules", "--model", "timm:resnet18", "--modules", "tree:stage", "--out", tmp_path / "mods", "--quiet")
    assert r.exit_code == 0 and "| layer3 |" in r.stdout and (tmp_path / "mods" / "modules.png").exists()

    out = tmp_path / "rw"
    r = cli("rewind", final, "--init", init, "--model", CNN, "--data", "digits:test", "--to", "init", "--to", "random",
            "--to", final, "--out", out, "--quiet", "--batch-size", "128", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "| (none: FINAL) | final | digits:test |" in r.stdout
    saved = json.loads((out / "results.json").read_text())
    stem = final.rsplit("/", 1)[-1].split(".")[0]
    assert saved["targets"] == ["init", "random", stem]
    assert all(saved["metrics"][m][stem] == saved["baseline"] for m in saved["modules"])
    assert (out / "rewind.png").read_bytes()[:4] == b"\x89PNG" and (out / "rewind.csv").exists()
    bad = cli("rewind", final, "--model", CNN, "--data", "digits:test", "--quiet")
    assert bad.exit_code == 2 and "--init" in bad.stderr

    out = tmp_path / "crit"
    r = cli("criticality", final, "--init", init, "--model", CNN, "--data", "digits:train?limit=300", "--alphas", "3",
            "--sigma-range", "0.01,0.1", "--bisect-steps", "2", "--samples", "1", "--epsilon", "0.3", "--out", out,
            "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["alphas"] == [0.0, 0.5, 1.0] and payload["sigma_range"] == [0.01, 0.1]
    assert payload["settings"]["bn_stats"] == "final"
    assert len(payload["modules"]) == 4 and (out / "valley_conv1.png").exists()
    # both BatchNorm protocols: statistics re-estimated on training data before every evaluation
    r = cli("criticality", final, "--init", init, "--model", CNN, "--data", "digits:train?limit=300", "--alphas", "2",
            "--sigma-range", "0.01,0.1", "--bisect-steps", "1", "--samples", "1", "--epsilon", "0.3",
            "--recalibrate-bn", "digits:train?limit=300", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    recal = json.loads(r.stdout)
    assert recal["settings"]["bn_stats"] == "recalibrated"
    # the α = 1, σ = low point differs from the stored-statistics run only through the re-estimated statistics
    assert recal["baseline"] != payload["baseline"] or recal["modules"] != payload["modules"]
