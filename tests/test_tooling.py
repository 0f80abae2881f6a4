"""The project's own tooling: the package root's static and lazy names agree, and the Makefile/CI gates run."""
from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import weightspace

ROOT = Path(__file__).resolve().parents[1]


def _root_tree() -> ast.Module:
    return ast.parse((ROOT / "weightspace" / "__init__.py").read_text())


def _type_checking_imports(tree: ast.Module) -> dict[str, str]:
    """name → module ('io.sources') of the imports under ``if TYPE_CHECKING:``."""
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname is None, alias.name
                    found[alias.name] = imp.module or ""
    return found


def test_type_checking_block_names_what_getattr_imports():
    """Editors and type checkers read the TYPE_CHECKING block, the interpreter reads _EXPORTS: one list, twice
    (huggingface_hub keeps its two the same with a check like this one)."""
    static = _type_checking_imports(_root_tree())
    assert static == weightspace._EXPORTS
    assert set(static) == set(weightspace.__all__)
    for name, module in static.items():  # each import resolves to the object the lazy path hands out
        assert getattr(weightspace, name) is getattr(__import__(f"weightspace.{module}", fromlist=[name]), name)


def test_type_checking_check_fails_on_a_missing_name():
    """The check above can fail: a block without one of the lazy names is caught."""
    tree = _root_tree()
    block = next(n for n in tree.body if isinstance(n, ast.If))
    first = block.body[0]
    assert isinstance(first, ast.ImportFrom)
    dropped = first.names.pop(0).name
    assert dropped not in _type_checking_imports(tree) and dropped in weightspace._EXPORTS


def _dry_run(target: str) -> str:
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_lint_installs_and_runs_ruff_and_mypy():
    recipe = _dry_run("lint")
    lines = recipe.splitlines()
    ruff = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/ruff check"))
    mypy = next(i for i, line in enumerate(lines) if line.strip() == ".venv/bin/mypy")
    assert ruff < mypy
    installs = [i for i, line in enumerate(lines) if "pip install" in line and "[test,lint]" in line]
    # a fresh machine installs first; an installed one (stamp newer than pyproject.toml) goes straight to the tools
    assert all(i < ruff for i in installs)
    assert "ruff" in (ROOT / "pyproject.toml").read_text().split("lint = [", 1)[1].split("]", 1)[0]


def test_ci_runs_lint_before_the_tests():
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert steps.index("make lint") < steps.index("make test")
