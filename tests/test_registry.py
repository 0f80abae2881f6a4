"""The one registry of ops, merge methods and recipe kinds: what reads it (CLI, model card, docs, recipe dispatch)."""
from __future__ import annotations

from pathlib import Path

import pytest

import weightspace as ws
from weightspace.errors import ConfigError
from weightspace.experiments.runner import catalogue  # imports every module that registers an entry
from weightspace.registry import REGISTRY, Entry, Registry

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_is_filled_and_every_entry_is_complete():
    assert {"task-arithmetic", "ties", "slerp", "karcher", "dare-ties", "della"} <= set(REGISTRY.names("merge"))
    assert {"transfer", "align-barrier", "soup"} <= set(REGISTRY.names("recipe"))
    assert {"uniform-soup", "weighted-average", "greedy-soup", "learned-soup", "lerp"} <= set(REGISTRY.names("op"))
    for e in REGISTRY:
        assert e.title and e.formula and e.summary and e.target is not None, e.name
        assert e.paper is not None and e.paper.url.startswith("https://"), e.name


def test_names_match_with_underscores_and_unknown_names_list_the_known():
    assert REGISTRY.get("merge", "task_arithmetic") is REGISTRY.get("merge", "Task-Arithmetic")
    assert REGISTRY.find("greedy_soup").title == "Greedy soup"  # a provenance op finds its entry
    assert REGISTRY.find("no_such_op") is None
    with pytest.raises(ConfigError, match=r"--method dare: expected one of breadcrumbs, dare-linear, .*, task-arithmetic, ties"):
        REGISTRY.get("merge", "dare", what="--method dare")


def test_a_name_is_registered_once():
    reg = Registry()
    reg.add(Entry("op", "x", "X", "x", "x", target=len))
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(Entry("op", "x", "X again", "x", "x", target=max))
    with pytest.raises(ValueError, match="unknown family"):
        reg.add(Entry("plugin", "y", "Y", "y", "y"))


def test_merge_method_defaults_come_from_the_registry():
    from weightspace.ops.merge import Ties
    assert Ties.entry is REGISTRY.get("merge", "ties")
    assert Ties().keep == REGISTRY.get("merge", "ties").defaults["keep"]


def test_docs_methods_page_is_the_commands_output(cli):
    r = cli("methods")
    assert r.exit_code == 0, r.stderr
    table = r.stdout.strip()
    assert table.count("\n") == len(catalogue()) + 1
    assert table in (ROOT / "docs" / "methods.md").read_text(), "regenerate docs/methods.md with `weightspace methods`"


def test_a_recipe_kind_is_dispatched_through_the_registry(cli, tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("kind: soup-of-the-day\n")
    r = cli("recipe", "run", bad, "--out", tmp_path / "run")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "unknown recipe kind 'soup-of-the-day'" in r.stderr and all(k in r.stderr for k in REGISTRY.names("recipe"))
    assert not (tmp_path / "run").exists()


def test_the_package_root_is_lazy_and_complete():
    import subprocess
    import sys
    code = "import sys, weightspace.registry, weightspace.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert all(getattr(ws, name) is not None for name in ws.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ws.nope  # noqa: B018


def test_the_static_catalogue_is_the_registry():
    """``weightspace methods`` and the CLI's choices read catalogue.json (no torch); it must say what the registry
    says, entry for entry. On failure, after adding or changing an entry, rewrite it with
    python -c "from weightspace.experiments.runner import write_catalogue; write_catalogue()"."""
    import json

    from weightspace.registry import CATALOGUE, static_entries
    live = json.loads(json.dumps([e.to_dict() for e in catalogue()]))
    assert json.loads(CATALOGUE.read_text(encoding="utf-8")) == live, "run write_catalogue() (see this test's doc)"
    assert [e.to_dict() for e in static_entries("merge")] == [e.to_dict() for e in catalogue("merge")]
    assert [Entry.from_dict(d).to_dict() for d in live] == live  # the file keeps every field an entry has
