"""io: bytes ⇄ Checkpoint, knowing no model — source strings, the formats (safetensors, weights-only pickles),
lazy checkpoints, and atomic saving with provenance. ``save`` itself is ``weightspace.save`` (or
``weightspace.io.save.save``): the name ``weightspace.io.save`` is its module."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports on first use, so that a light module
    # of this package (a header reader, the data cache) is imported without torch
    from .checkpoint import Checkpoint
    from .outputs import StateDict, TensorStream
    from .sources import load

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Checkpoint",), "checkpoint"),
    **dict.fromkeys(("StateDict", "TensorStream"), "outputs"),
    **dict.fromkeys(("load",), "sources"),
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["load", "Checkpoint", "StateDict", "TensorStream"]
