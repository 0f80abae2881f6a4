"""One option vocabulary across verbs: the same flag means the same thing everywhere (name, metavar, default,
multiplicity, type), data roles are --val / --data / --train, -o is weights and --out a report folder."""
from __future__ import annotations

import click
import pytest

from weightspace_cli.main import COMMANDS, main

# Flags whose meaning differs between verbs on purpose, with the reason (a reviewer can argue each one).
DIFFERENT_ON_PURPOSE = {
    "--method": "merge --method picks a merge method, soup --method a soup, align --method a matching method (each "
                "its own choices)",
    "--keep": "a fraction kept: of each task vector (soup/merge, one value) or candidate feature fractions (head2toe)",
    "--alphas": "interpolate takes α values; criticality a count or values for its α grid",
}
DEFAULT_ON_PURPOSE = {("demo", "--out"): "runs/demo, where the README's quickstart reads the demo's files"}


def _verbs() -> dict[str, click.Command]:
    ctx = click.Context(main)
    out = {}
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def _signature(p: click.Option) -> tuple:
    t = p.type
    kind = ("choice", tuple(t.choices)) if isinstance(t, click.Choice) else (type(t).__name__, getattr(t, "min", None))
    default = None if "UNSET" in repr(p.default) else p.default  # click's "no default" (required options)
    return (p.name, p.metavar, default, p.multiple, p.is_flag, kind)


VERBS = _verbs()


def test_same_flag_same_meaning_across_verbs():
    seen: dict[str, tuple[str, tuple]] = {}
    clashes = []
    for verb, cmd in VERBS.items():
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            for flag in p.opts + p.secondary_opts:
                if flag in DIFFERENT_ON_PURPOSE or (verb, flag) in DEFAULT_ON_PURPOSE:
                    continue
                sig = _signature(p)
                first = seen.setdefault(flag, (verb, sig))
                if first[1] != sig:
                    clashes.append(f"{flag}: {first[0]} {first[1]} vs {verb} {sig}")
    assert not clashes, "\n".join(clashes)
    assert len(seen) > 40  # the walk really saw every verb's options


def _option(verb: str, flag: str) -> click.Option | None:
    return next((p for p in VERBS[verb].params if isinstance(p, click.Option) and flag in p.opts), None)


def test_data_roles_and_outputs():
    for verb, cmd in VERBS.items():
        opts = {f: p for p in cmd.params if isinstance(p, click.Option) for f in p.opts}
        for flag in ("--val", "--data", "--train", "--recalibrate-bn", "--repair", "--align-data"):
            if flag in opts:
                assert opts[flag].metavar == "DATA", (verb, flag)
        if "--data" in opts:
            assert opts["--data"].multiple, verb
        if "--device" in opts:
            assert opts["--device"].default == "auto", verb
        if "--out" in opts:
            assert opts["--out"].metavar == "DIR", verb
        if "-o" in opts:
            assert "--output" in opts["-o"].opts and opts["-o"].metavar == "FILE", verb
        assert "--test" not in opts or opts["--test"] is opts.get("--data"), f"{verb}: --test is an alias of --data"
    for verb in ("soup", "merge"):
        assert _option(verb, "--val") is not None
    for verb in ("probe", "head2toe"):
        assert _option(verb, "--train").required and "--test" in _option(verb, "--data").opts
    assert "--test" in _option("soup", "--data").opts
    assert _option("soup", "--seed") is not None
    assert {"--token", "--commit-message", "-m"} <= {f for p in VERBS["push"].params for f in p.opts}


def test_modules_lists_no_data_or_evaluation_options():
    flags = {f for p in VERBS["modules"].params for f in getattr(p, "opts", [])}
    assert not flags & {"--data", "--val", "--train", "--transform", "--batch-size", "--device", "--parallel"}
    assert {"--model", "--num-classes", "--in-chans", "--modules", "--out"} <= flags


def test_merge_choices_are_the_registry(cli):
    from weightspace.ops.merge import method_names
    assert list(_option("merge", "--method").type.choices) == method_names()
    assert list(_option("soup", "--merge").type.choices) == method_names()


def test_soup_methods_are_registered_ops_and_the_flags_are_aliases(cli, tmp_path):
    from weightspace.registry import REGISTRY
    from weightspace.options import SOUP_METHODS
    assert list(_option("soup", "--method").type.choices) == ["uniform", "weighted", "greedy", "learned"]
    assert all(("op", op) in REGISTRY for op in SOUP_METHODS.values())
    out = tmp_path / "x.safetensors"
    r = cli("soup", "--method", "greedy", "--learned", "a.safetensors", "-o", out)
    assert r.exit_code == 2 and "--method greedy and --learned exclude each other" in r.stderr
    r = cli("soup", "--method", "weighted", "a.safetensors", "-o", out)
    assert r.exit_code == 2 and "--method weighted needs --weights" in r.stderr
    r = cli("soup", "--method", "blend", "a.safetensors", "-o", out)
    assert r.exit_code == 2 and "'blend' is not one of 'uniform', 'weighted', 'greedy', 'learned'" in r.stderr
    # an alias and the method it names together are one choice, not a conflict: refused only for the missing --model
    r = cli("soup", "--method", "greedy", "--greedy", "a.safetensors", "-o", out)
    assert r.exit_code == 2 and "--model" in r.stderr and "exclude" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("verb", ["soup", "leaderboard", "interpolate", "rewind", "probe", "demo", "recipe run"])
def test_out_never_takes_a_checkpoint_name(cli, tmp_path, verb):
    bad = tmp_path / "mysoup.safetensors"
    r = cli(*verb.split(), "x.safetensors", "--out", bad, "--quiet") if verb != "demo" else cli("demo", "--out", bad)
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "-o" in r.stderr and "mysoup.safetensors" in r.stderr, r.stderr
    assert not bad.exists()


def test_mutually_exclusive_soups_are_refused(cli, tmp_path):
    r = cli("soup", "--uniform", "--greedy", "a.safetensors", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "--uniform and --greedy exclude each other" in r.stderr
    r = cli("soup", "--greedy", "--weights", "1,2", "a.safetensors", "b.safetensors", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "--weights makes a weighted soup" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_soup_method_uniform_is_the_plain_soup(cli, tmp_path):
    import torch
    from safetensors.torch import save_file
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.tensor([1.0, 2.0])}, a)
    save_file({"w": torch.tensor([3.0, 6.0])}, b)
    plain, named, alias = (tmp_path / f"{n}.safetensors" for n in ("plain", "named", "alias"))
    assert cli("soup", a, b, "-o", plain).exit_code == 0
    assert cli("soup", "--method", "uniform", a, b, "-o", named).exit_code == 0
    assert cli("soup", "--uniform", a, b, "-o", alias).exit_code == 0
    assert plain.read_bytes() == named.read_bytes() == alias.read_bytes()
    weighted = tmp_path / "weighted.safetensors"
    assert cli("soup", "--method", "weighted", "--weights", "3,1", a, b, "-o", weighted).exit_code == 0
    assert weighted.read_bytes() != plain.read_bytes()  # the method reaches the op


def test_every_ema_parameter_takes_the_one_ema_choice_type():
    """`ema` means one thing in the whole library: options.EmaChoice ("off" | "prefer" | "require"; a bool is the
    older spelling where a user may pass one)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    found, other = 0, []
    for f in sorted((root / "weightspace").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.args + node.args.kwonlyargs:
                    if a.arg == "ema":
                        found += 1
                        if a.annotation is None or "EmaChoice" not in ast.unparse(a.annotation):
                            other.append(f"{f.relative_to(root)}:{node.lineno} {node.name}")
    assert found > 10 and other == []
