"""io: bytes ⇄ Checkpoint, knowing no model — source strings, the formats (safetensors, weights-only pickles),
lazy checkpoints, and atomic saving with provenance. ``save`` itself is ``weightspace.save`` (or
``weightspace.io.save.save``): the name ``weightspace.io.save`` is its module."""
from __future__ import annotations

from .checkpoint import Checkpoint
from .outputs import StateDict, TensorStream
from .sources import load

__all__ = ["load", "Checkpoint", "StateDict", "TensorStream"]
