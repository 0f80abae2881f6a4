"""Configs read strictly and merges checked whole (issue 19, guarantees 4 and 5): mergekit and recipe YAML refuse
unknown keys (naming the nearest known one), unsupported mergekit options, non-boolean booleans, non-finite or
out-of-range numbers, a model listed twice, anchors and aliases, repeated keys and non-UTF-8 — each one line, nothing
written; every merge path refuses λ and weights that are not finite and an output that overflows."""
from __future__ import annotations

import os

import pytest
import safetensors.torch as st
import torch

from weightspace.errors import ConfigError
from weightspace.experiments.config import read_recipe
from weightspace.experiments.trajectory import load_trajectory_recipe
from weightspace.io.yaml_file import read_yaml


def one_line(r, *needles: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightspace: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def models(tmp_path):
    """A base and two fine-tuned stand-ins with huge entries (a merge with a large λ overflows float32)."""
    paths = []
    for name, v in (("base", 0.0), ("a", 1e30), ("b", 2e30)):
        p = tmp_path / f"{name}.safetensors"
        st.save_file({"w": torch.full((4,), v), "n": torch.tensor([7])}, p)
        paths.append(p)
    return paths


def _config(tmp_path, body: str, name: str = "m.yaml"):
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    return p


def _ties(base, a, b, extra_top: str = "", a_params: str = "{weight: 0.5, density: 0.5}") -> str:
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {a_params}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n{extra_top}")


CONFIG_CASES = {
    "unknown top key": ("merge_methd: ties\n", "unknown key 'merge_methd' (did you mean 'merge_method'?)"),
    "unknown model key": ("PARAMS:{weight: 0.5, densty: 0.5}", "models[0]: parameters: unknown key 'densty' (did you "
                                                               "mean 'density'?)"),
    "unsupported top": ("tokenizer_source: union\n", "'tokenizer_source' is not supported by weightspace"),
    "unsupported param": ("PARAMS:{weight: 0.5, density: 0.5, rescale: true}", "'rescale' is not supported"),
    "bool as string": ("parameters: {normalize: 'true'}\n", "normalize: must be true or false, not 'true'"),
    "nan weight": ("PARAMS:{weight: .nan, density: 0.5}", "weight: must be a finite number"),
    "inf lambda": ("parameters: {lambda: .inf}\n", "lambda: must be a finite number"),
    "density out of range": ("PARAMS:{weight: 0.5, density: 1.5}", "density: 1.5 is out of range (0, 1]"),
    "bool weight": ("PARAMS:{weight: true, density: 0.5}", "weight: must be a number, not True"),
    "alias": ("parameters: &p {lambda: 1.0}\nx: *p\n", "anchors and aliases"),
    "repeated key": ("parameters: {lambda: 1.0}\nparameters: {lambda: 2.0}\n", "key 'parameters' is given twice"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_mergekit_config_is_read_strictly(case, models, tmp_path, cli):
    base, a, b = models
    change, needle = CONFIG_CASES[case]
    text = _ties(base, a, b, a_params=change[7:]) if change.startswith("PARAMS:") else _ties(base, a, b, change)
    if case == "unknown top key":
        text = text.replace("merge_method: ties\n", "")
    cfg = _config(tmp_path, text)
    out = tmp_path / "out.safetensors"
    one_line(cli("merge", "--config", cfg, "-o", out), str(cfg), needle)
    assert not out.exists()


def test_a_model_listed_twice_under_two_spellings_is_one_model(models, tmp_path, cli, monkeypatch):
    base, a, b = models
    monkeypatch.chdir(tmp_path)
    twice = _config(tmp_path, _ties(base, a, f"./{a.name}"))
    one_line(cli("merge", "--config", twice, "-o", tmp_path / "o.safetensors"), "models[1]", "list each model once")
    # the base under another spelling is the base (its task vector is zero), not a model
    (tmp_path / "link.safetensors").symlink_to(base)
    ok = _config(tmp_path, _ties(base, a, b).replace("models:\n", "models:\n  - model: link.safetensors\n"), "ok.yaml")
    r = cli("merge", "--config", ok, "-o", tmp_path / "o.safetensors", "--allow-nonfinite")
    assert r.exit_code == 0, r.stderr


def test_non_utf8_fifo_and_bombs_are_one_line(tmp_path, cli):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("merge_method: ties\nname: caf\xe9\n".encode("latin-1"))
    one_line(cli("merge", "--config", bad, "-o", tmp_path / "o.safetensors"), "not UTF-8 text (byte 0xe9")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    one_line(cli("merge", "--config", fifo, "-o", tmp_path / "o.safetensors"), "not a regular mergekit config file")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(ConfigError, match="anchors and aliases"):
        read_yaml(_config(tmp_path, laughs, "laughs.yaml"), "recipe")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        read_yaml(_config(tmp_path, "[" * 5000 + "]" * 5000, "deep.yaml"), "recipe")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ConfigError, match="at most 1048576 bytes"):
        read_yaml(big, "recipe")
    assert read_yaml(_config(tmp_path, "a: {b: [1, 2.5, true]}\n", "fine.yaml"), "recipe") == {"a": {"b": [1, 2.5, True]}}


RECIPE_CASES = {
    "unknown key": ("pretrian: {}\n", "unknown key 'pretrian' (did you mean 'pretrain'?)"),
    "nested unknown": ("pretrain: {epoch: 3}\n", "unknown key 'epoch' (did you mean 'epochs'?)"),
    "bool": ("analysis: {recalibrate_bn: 'yes'}\n", "recalibrate_bn: must be true or false"),
    "nan": ("pretrain: {lr: .nan}\n", "lr: must be a finite number"),
    "fraction for an integer": ("pretrain: {epochs: 2.5}\n", "epochs: must be an integer"),
    "string for a number": ("pretrain: {lr: fast}\n", "lr: must be a number"),
    "alias": ("pretrain: &p {epochs: 2}\nfinetune: *p\n", "anchors and aliases"),
    "batch size 0": ("finetune: {batch_size: 0}\n", "batch_size: 0 is out of range [1, inf]"),
    "negative threads": ("threads: -2\n", "threads: -2 is out of range [0, inf]"),
    "momentum over 1": ("pretrain: {momentum: 2}\n", "momentum: 2 is out of range [0, 1]"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_is_read_strictly(case, tmp_path):
    body, needle = RECIPE_CASES[case]
    p = _config(tmp_path, "kind: trajectory\n" + body, "r.yaml")
    with pytest.raises(ConfigError) as e:
        load_trajectory_recipe(p)
    assert str(p) in str(e.value) and needle in str(e.value), str(e.value)


def test_recipe_negative_control(tmp_path):
    """The same keys with right values load: the checks refuse the wrong values, not the keys."""
    p = _config(tmp_path, "kind: trajectory\npretrain: {epochs: 20, lr: 1}\nanalysis: {recalibrate_bn: false}\n",
                "r.yaml")
    cfg = load_trajectory_recipe(p)
    assert cfg["pretrain"]["epochs"] == 20 and cfg["pretrain"]["lr"] == 1 and cfg["analysis"]["recalibrate_bn"] is False
    assert read_recipe(p)[0]["kind"] == "trajectory"


@pytest.mark.parametrize("args, needle", [
    (("--method", "task-arithmetic", "--scale", "1e30"), "overflows torch.float32"),
    (("--method", "ties", "--scale", "1e30"), "overflows torch.float32"),
    (("--method", "task-arithmetic", "--scale", "nan"), "nan must be a finite number"),
    (("--method", "ties", "--scale", "1e39"), "is out of range"),
    (("--method", "ties", "--keep", "nan"), "must be a fraction in (0, 1]"),
])
def test_every_merge_checks_lambda_and_its_output(args, needle, models, tmp_path, cli):
    base, a, b = models
    out = tmp_path / "out.safetensors"
    one_line(cli("merge", *args, "--base", base, a, b, "-o", out), needle)
    assert not out.exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_mergekit_merges_check_their_output(method, models, tmp_path, cli):
    base, a, b = models
    weights = "{weight: 3.0e+38}" if method == "linear" else "{weight: 1.0, density: 1.0}"
    text = (f"merge_method: {method}\n" + (f"base_model: {base}\n" if method != "linear" else "")
            + f"models:\n  - model: {a}\n    parameters: {weights}\n  - model: {b}\n    parameters: {weights}\n"
            + ("parameters: {normalize: false}\n" if method == "linear" else "parameters: {lambda: 1.0e+30}\n"))
    out = tmp_path / "out.safetensors"
    one_line(cli("merge", "--config", _config(tmp_path, text), "-o", out), "overflow")
    assert not out.exists()
