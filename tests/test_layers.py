"""The package's layers, read from the source: no import cycle, and no import against the layer order.

Every ``import`` statement counts — at module level, inside functions, under ``if TYPE_CHECKING:`` — and so does
``importlib.import_module("literal")``. The order (a module may import its own layer and the layers below):

    errors, _version, _lazy, progress, files, registry, options, report   bottom: any layer may use them, they import no domain module
    io → ops → eval → search → analysis → hub / experiments → weightspace (the package root) → cli

The package root re-exports the user-facing names, so no module of the package may import it.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"weightspace": ROOT / "weightspace", "weightspace_cli": ROOT / "cli"}

# (layer rank, unit): an import must go to a lower rank, or stay inside its own unit. hub and experiments share a
# rank but are separate units, so neither may import the other.
BOTTOM = ("weightspace.errors", "weightspace._version", "weightspace._lazy", "weightspace.progress", "weightspace.files",
          "weightspace.registry", "weightspace.options", "weightspace.report")
LAYERS = [("weightspace.io", 1), ("weightspace.ops", 2), ("weightspace.eval", 3), ("weightspace.search", 4),
          ("weightspace.analysis", 5), ("weightspace.hub", 6), ("weightspace.experiments", 6), ("weightspace", 7),
          ("weightspace_cli", 8)]


def modules(packages: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package __init__), for every .py file under each package folder."""
    out = {}
    for name, folder in packages.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [name, *f.relative_to(folder).with_suffix("").parts]
            init = parts[-1] == "__init__"
            out[".".join(parts[:-1] if init else parts)] = (f, init)
    return out


def _resolve(target: str, known: dict) -> str | None:
    """The longest known module that ``target`` names or lies in (``a.b.func`` → ``a.b``); None if external."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph(packages: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module → {imported module of these packages: line of the first such import}."""
    known = modules(packages)
    graph: dict[str, dict[str, int]] = {}
    for mod, (path, init) in known.items():
        base = mod if init else mod.rpartition(".")[0]  # what a relative import of level 1 starts from
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                pkg = node.module or ""
                if node.level:
                    up = base.split(".")
                    up = up[:len(up) - (node.level - 1)]
                    pkg = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in known else pkg for a in node.names]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
                targets = [node.args[0].value]
            for t in targets:
                hit = _resolve(t, known)
                if hit is not None and hit != mod:
                    edges.setdefault(hit, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth ≤ number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(mod: str, bottom=BOTTOM, layers=LAYERS) -> tuple[int, str]:
    """(rank, unit) of a module: the bottom modules are rank 0; otherwise the longest matching layer prefix. A
    package root listed as a layer ("weightspace") is that one module only: a new top-level module must be placed."""
    if any(mod == b or mod.startswith(b + ".") for b in bottom):
        return 0, "bottom"
    roots = {p for p, _ in layers if "." not in p and any(q.startswith(p + ".") for q, _ in layers)}
    best = max((p for p, _ in layers if mod == p or (mod.startswith(p + ".") and p not in roots)), key=len,
               default=None)
    if best is None:
        raise AssertionError(f"{mod}: in no layer; add it to LAYERS in tests/test_layers.py")
    return dict(layers)[best], best


def violations(graph: dict[str, dict[str, int]], bottom=BOTTOM, layers=LAYERS) -> list[str]:
    """Every import that runs against the layer order, as 'a (line n) imports b: why'."""
    bad = []
    for mod, edges in sorted(graph.items()):
        rank, unit = layer(mod, bottom, layers)
        for dep, line in sorted(edges.items()):
            drank, dunit = layer(dep, bottom, layers)
            if drank < rank or (drank == rank and dunit == unit):
                continue
            bad.append(f"{mod} (line {line}) imports {dep}: {unit} may not import {dunit}")
    return bad


# ------------------------------------------------------------------------------------------------- the real tree
def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGES)
    assert len(graph) > 50 and graph["weightspace.io.save"]  # the walk found the tree and its imports
    assert cycles(graph) == []


def test_every_import_follows_the_layer_order():
    assert violations(import_graph(PACKAGES)) == []


def declared_all(path: Path) -> list[str] | None:
    """The module's literal ``__all__`` (None when it declares none)."""
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "__all__" and getattr(node, "value", None) is not None:
            return list(ast.literal_eval(node.value))
    return None


def test_every_module_declares_all_and_every_name_in_it_exists():
    """A newcomer reads a module's offer at its top; a name listed there that the module lacks is a lie."""
    import importlib
    undeclared, wrong = [], []
    for mod, (path, _) in modules(PACKAGES).items():
        names = declared_all(path)
        if names is None:
            undeclared.append(mod)
            continue
        if len(set(names)) != len(names) or any(n.startswith("_") and n != "__version__" for n in names):
            wrong.append(f"{mod}: duplicate or private names in __all__")
        if mod.endswith(".__main__"):  # importing it runs the CLI
            continue
        module = importlib.import_module(mod)
        wrong += [f"{mod}.{n}: listed in __all__ but missing" for n in names if not hasattr(module, n)]
    assert undeclared == []
    assert wrong == []


def test_no_package_exports_a_name_that_is_also_its_submodule():
    """``from weightspace.ops import merge`` must keep meaning the module: a package exporting a function of the same
    name would hide it (and ``mock.patch("weightspace.ops.merge.x")`` would patch the function)."""
    clashes = []
    for mod, (path, init) in modules(PACKAGES).items():
        if init:
            subs = {f.stem for f in path.parent.glob("*.py")} | {d.name for d in path.parent.iterdir()
                                                                if (d / "__init__.py").is_file()}
            clashes += [f"{mod}.{n}" for n in declared_all(path) or [] if n in subs]
    assert clashes == []


# ------------------------------------------------------------------------------- the checker on a planted tree
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        f = tmp_path / "pkg" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return {"pkg": tmp_path / "pkg"}


def test_a_planted_cycle_is_found_through_function_and_type_checking_imports(tmp_path):
    tree = _tree(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from ..high.b import B
        """,
        "high/__init__.py": "",
        "high/b.py": """
            def f():
                from ..low import a
                return a
        """,
        "high/c.py": "import importlib\nm = importlib.import_module('pkg.high.b')\n",
    })
    graph = import_graph(tree)
    assert graph["pkg.low.a"] == {"pkg.high.b": 4}
    assert graph["pkg.high.b"] == {"pkg.low.a": 3}
    assert graph["pkg.high.c"] == {"pkg.high.b": 2}
    assert cycles(graph) == [["pkg.high.b", "pkg.low.a"]]
    layers = [("pkg.low", 1), ("pkg.high", 2), ("pkg", 3)]
    assert violations(graph, bottom=("pkg.base",), layers=layers) == [
        "pkg.low.a (line 4) imports pkg.high.b: pkg.low may not import pkg.high"]


def test_importing_the_package_root_or_a_sibling_unit_is_a_violation(tmp_path):
    tree = _tree(tmp_path, {
        "__init__.py": "from .hub import push\n__version__ = '1'\n",
        "base.py": "",
        "hub.py": "from . import __version__\nfrom .base import x\n",
        "exp.py": "from .hub import push\n",
    })
    graph = import_graph(tree)
    assert graph["pkg.hub"] == {"pkg": 1, "pkg.base": 2}
    assert cycles(graph) == [["pkg", "pkg.hub"]]
    layers = [("pkg.hub", 6), ("pkg.exp", 6), ("pkg", 7)]
    assert violations(graph, bottom=("pkg.base",), layers=layers) == [
        "pkg.exp (line 1) imports pkg.hub: pkg.exp may not import pkg.hub",
        "pkg.hub (line 1) imports pkg: pkg.hub may not import pkg"]
    with pytest.raises(AssertionError, match="pkg.new: in no layer"):  # a new top-level module must be placed
        layer("pkg.new", bottom=("pkg.base",), layers=layers)


def test_architecture_page_lists_every_module_and_no_stale_one():
    """docs/architecture.md's module table is where a newcomer looks for a module: every module of the tree is named
    there (by its file stem, in backticks), and every name there is a module or package of the tree."""
    import re
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = page[page.index("| layer | modules |"):].split("\n\n", 1)[0].splitlines()[2:]
    listed = {n.rstrip("/") for r in rows for n in re.findall(r"`([^`]+)`", r.split("|")[2])}
    files = [f for folder in PACKAGES.values() for f in folder.rglob("*.py")]
    stems = {f.stem for f in files if f.stem != "__init__"}
    folders = {f.parent.name for f in files if f.stem == "__init__"}
    assert sorted(stems - listed) == []
    assert sorted(listed - stems - folders) == []
