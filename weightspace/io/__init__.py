"""io: bytes ⇄ Checkpoint, knowing no model — source strings, the formats (safetensors, weights-only pickles),
lazy checkpoints, and atomic saving with provenance. ``save`` itself is ``weightspace.save`` (or
``weightspace.io.save.save``): the name ``weightspace.io.save`` is its module."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = ["load", "Checkpoint", "StateDict", "TensorStream"]
