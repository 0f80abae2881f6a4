"""experiments: the recipe runner and its kinds (each behind the registry), and the demo."""
from __future__ import annotations

from .runner import run_recipe

__all__ = ["run_recipe"]
