"""Run any recipe: its ``kind:`` picks the runner from the one registry (weightspace.registry, family ``recipe``).

``catalogue()`` lists every registered op, merge method and recipe kind (``weightspace methods``, docs/methods.md).
"""
from __future__ import annotations

import importlib
import os
from typing import Sequence

from ..ops import merge as _merge, stream as _stream  # noqa: F401  (these modules register the ops and merges)
from ..registry import REGISTRY, Entry
from ..search import align as _align, greedy as _greedy, learned as _learned  # noqa: F401
from .config import read_recipe

# The modules whose import registers a recipe kind. Imported by name rather than `from . import ...`, which would
# import the package, and the package imports this module.
KIND_MODULES = ("align", "cross_domain", "head2toe_targets", "merges", "saturation_pairs", "soup", "trajectory", "transfer")
for _kind_module in KIND_MODULES:
    importlib.import_module(f".{_kind_module}", __package__)

__all__ = ["run_recipe", "recipe_kind", "catalogue", "write_catalogue", "check_recipe_models"]


def catalogue(family: str | None = None) -> list[Entry]:
    """Every registered entry of ``family`` ('op', 'merge', 'recipe'; all when None), by family and name."""
    return REGISTRY.entries(family)


def write_catalogue() -> str:
    """Rewrite ``weightspace/catalogue.json`` (``registry.CATALOGUE``) from the live registry; returns its text.
    Run it after adding or changing an entry: ``python -c "from weightspace.experiments.runner import
    write_catalogue; write_catalogue()"``."""
    import json

    from ..files import atomic_output
    from ..registry import CATALOGUE
    text = json.dumps([e.to_dict() for e in catalogue()], indent=1, ensure_ascii=False) + "\n"
    with atomic_output(CATALOGUE, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


def recipe_kind(recipe: str | os.PathLike | dict):
    """The registry entry of a recipe's ``kind`` (``transfer`` when the recipe names none).

    Raises:
        ConfigError: the file cannot be read, or its kind is not registered (the message lists the known kinds).
    """
    raw, where = read_recipe(recipe)
    kind = raw.get("kind", "transfer")
    return REGISTRY.get("recipe", str(kind), what=f"{where}: unknown recipe kind '{kind}'")


def check_recipe_models(recipe: str | os.PathLike | dict, overrides: Sequence[str] = (), *,
                        trust: bool = False) -> None:
    """Refuse a recipe whose ``model`` keys (at any depth, ``small:`` included) name code off the closed list, unless
    ``trust``; values the user sets with KEY=VALUE ``overrides`` are the user's word and are not checked.

    Raises:
        ConfigError: the file cannot be read, or a model spec it holds names arbitrary code (key and file named).
    """
    from ..eval.models import check_model_spec
    from .config import parse_override
    raw, where = read_recipe(recipe)
    typed = {str(parse_override(o)[0] if isinstance(o, str) else o[0]) for o in overrides}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{path}.{k}" if path else str(k)
                if k == "model" and isinstance(v, str) and key not in typed and key.removeprefix("small.") not in typed:
                    check_model_spec(v, origin=f"{where}: {key}", trust=trust)
                walk(v, key)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
    walk(raw, "")


def run_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
               overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
               device: str = "cpu", batch_size: int = 256, trust_model_code: bool = False) -> dict:
    """Run a recipe end to end into ``out`` with the runner of its kind: checkpoints/, results.json, REPORT.md, ...

    Model specs the recipe file names resolve only through the closed list (weightspace.eval.models) unless
    ``trust_model_code``; the check runs before anything is imported, trained or written.

    Returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: unreadable or malformed recipe, an unknown kind, or a model spec naming code off the closed
            list without ``trust_model_code``.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    check_recipe_models(recipe, overrides, trust=trust_model_code)
    return recipe_kind(recipe).target(recipe, out, small=small, overrides=overrides, force=force,
                                      progress=progress, device=device, batch_size=batch_size)
