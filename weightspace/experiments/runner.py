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
KIND_MODULES = ("align", "cross_domain", "head2toe_targets", "saturation_pairs", "soup", "trajectory", "transfer")
for _kind_module in KIND_MODULES:
    importlib.import_module(f".{_kind_module}", __package__)

__all__ = ["run_recipe", "recipe_kind", "catalogue"]


def catalogue(family: str | None = None) -> list[Entry]:
    """Every registered entry of ``family`` ('op', 'merge', 'recipe'; all when None), by family and name."""
    return REGISTRY.entries(family)


def recipe_kind(recipe: str | os.PathLike | dict):
    """The registry entry of a recipe's ``kind`` (``transfer`` when the recipe names none).

    Raises:
        ConfigError: the file cannot be read, or its kind is not registered (the message lists the known kinds).
    """
    raw, where = read_recipe(recipe)
    kind = raw.get("kind", "transfer")
    return REGISTRY.get("recipe", str(kind), what=f"{where}: unknown recipe kind '{kind}'")


def run_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
               overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
               device: str = "cpu", batch_size: int = 256) -> dict:
    """Run a recipe end to end into ``out`` with the runner of its kind: checkpoints/, results.json, REPORT.md, ...

    Returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: unreadable or malformed recipe, or an unknown kind.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    return recipe_kind(recipe).target(recipe, out, small=small, overrides=overrides, force=force,
                                      progress=progress, device=device, batch_size=batch_size)
