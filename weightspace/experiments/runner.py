"""Run any recipe: its ``kind:`` picks the runner from the one registry (weightspace.registry, family ``recipe``)."""
from __future__ import annotations

import os
from typing import Sequence

from ..registry import REGISTRY
from . import align, recipes  # noqa: F401  (each module registers its recipe kind on import)

__all__ = ["run_recipe", "recipe_kind"]


def recipe_kind(recipe: str | os.PathLike | dict):
    """The registry entry of a recipe's ``kind`` (``transfer`` when the recipe names none).

    Raises:
        ConfigError: the file cannot be read, or its kind is not registered (the message lists the known kinds).
    """
    raw, where = recipes.read_recipe(recipe)
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
