"""Nothing from data is code: model strings read from files resolve only through a closed list; an arbitrary
pkg.module:factory runs only on the user's word (typed on the command line, a callable in Python, or
--trust-model-code), and the refusal comes before anything is imported, trained or written."""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch

import weightspace as ws
from weightspace.errors import ConfigError, WeightspaceError
from weightspace.eval.models import build_model, check_model_spec

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """A module that, once imported, leaves a file behind; its factory raises (a model factory that fails)."""
    name = f"ws_marker_{uuid.uuid4().hex[:8]}"
    flag = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(flag)!r}).write_text('x')\n"
        "def factory(**kw):\n    raise RuntimeError('boom from the factory')\n"
        "def tiny(num_classes=10, **kw):\n    import torch\n    return torch.nn.Linear(64, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, flag
    sys.modules.pop(name, None)


def _recipe(tmp_path: Path, source: str, model: str, *, key: str = "model") -> Path:
    text = (RECIPES / source).read_text()
    lines = text.splitlines()
    if key == "model":
        lines = [f"model: {model}" if ln.startswith("model:") else ln for ln in lines]
    else:  # the nested small: model
        lines = [f"  model: {model}" if ln.startswith("  model:") else ln for ln in lines]
    assert f"model: {model}" in "\n".join(lines)
    p = tmp_path / "evil.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("source,key", [("trajectory.yaml", "model"), ("cross-domain.yaml", "small.model")])
def test_recipe_naming_a_module_is_refused_before_anything_runs(cli, tmp_path, marker, source, key):
    name, flag = marker
    recipe = _recipe(tmp_path, source, f"{name}:factory", key=key)
    out = tmp_path / "run"
    r = cli("recipe", "run", recipe, "--out", out, "--small")
    assert r.exit_code == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and str(recipe) in line and key in line and "--trust-model-code" in line
    assert name not in sys.modules and not flag.exists()     # nothing imported
    assert not out.exists()                                  # nothing written


def test_trusting_the_file_runs_its_factory(cli, tmp_path, marker):
    """Negative control: the same recipe with --trust-model-code imports the module (the marker works), and the
    factory's own error is one line, not a traceback."""
    name, flag = marker
    recipe = _recipe(tmp_path, "trajectory.yaml", f"{name}:factory")
    r = cli("recipe", "run", recipe, "--out", tmp_path / "run", "--trust-model-code")  # small: would replace it
    assert flag.exists() and name in sys.modules
    assert r.exit_code == 2 and "boom from the factory" in r.stderr and "RuntimeError" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_typed_override_is_the_users_word(tmp_path, marker):
    from weightspace.experiments.runner import check_recipe_models
    name, flag = marker
    recipe = _recipe(tmp_path, "trajectory.yaml", f"{name}:factory")
    with pytest.raises(ConfigError, match="trust-model-code"):
        check_recipe_models(recipe)
    check_recipe_models(recipe, [f"model={name}:tiny"])      # the file's value is replaced by the user's
    check_recipe_models(recipe, trust=True)
    assert not flag.exists()                                 # checking never imports


def test_closed_list_from_a_file(marker):
    name, flag = marker
    for ok in ("weightspace.eval.zoo:small_cnn?width=8", "timm:resnet18", "open_clip:ViT-B-32",
               "torchvision.models:resnet18"):
        check_model_spec(ok, origin="r.yaml: model")
    for bad in ("os:system", "subprocess:run", f"{name}:tiny", "torchvision.models:os", "weightspace.eval.zoo:torch",
                "weightspace.eval.zoo:NORMS", "builtins:eval"):
        with pytest.raises(ConfigError, match="r.yaml: model"):
            check_model_spec(bad, origin="r.yaml: model")
    assert not flag.exists()
    # typed by the user (origin None) or trusted: honoured, and only then imported
    net = build_model(f"{name}:tiny", num_classes=3)
    assert flag.exists() and net.out_features == 3


def test_callable_and_bad_spec_types():
    net = build_model(lambda num_classes=10: torch.nn.Linear(4, num_classes), num_classes=5)
    assert net.out_features == 5 and not net.training
    for bad in (None, 3, ""):
        with pytest.raises(ConfigError, match="model spec"):
            build_model(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not an nn.Module"):
        build_model(lambda **kw: "not a model")


def test_factory_that_raises_is_one_line(marker):
    name, _ = marker
    with pytest.raises(ConfigError, match="RuntimeError: boom from the factory"):
        build_model(f"{name}:factory")


def test_provenance_naming_a_module_is_never_imported(cli, tmp_path, marker, trained_mlps):
    """push reads model names from the provenance and results.json: a module there is neither imported nor used."""
    name, flag = marker
    ck = tmp_path / "ck.safetensors"
    ws.save(trained_mlps[0], ck, provenance={"ingredients": [{"source": f"{name}:factory"}], "model": f"{name}:tiny"})
    run = tmp_path / "runfolder"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"model": f"{name}:factory", "num_classes": 10}))
    r = cli("push", ck, "alice/x", "--card-from", run, "--dry-run", tmp_path / "dry")
    assert not flag.exists() and name not in sys.modules
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("where,prov,results", [
    ("ingredient source", {"ingredients": [{"source": "timm:resnet18?num_classes=ten"}]}, {}),
    ("results.json", {}, {"model": "timm:resnet18?num_classes=-3"}),
])
def test_provenance_with_a_non_integer_class_count(cli, tmp_path, trained_mlps, where, prov, results):
    ck = tmp_path / "ck.safetensors"
    ws.save(trained_mlps[0], ck, provenance=prov)
    run = tmp_path / "runfolder"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    r = cli("push", ck, "alice/x", "--card-from", run, "--dry-run", tmp_path / "dry")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert where in r.stderr and "not a positive integer" in r.stderr
    assert not (tmp_path / "dry").exists()
    assert issubclass(ws.errors.HubError, WeightspaceError)
