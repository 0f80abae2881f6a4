"""What an op hands to ``save``: a StateDict (tensors plus the provenance of the op that made them) or a
TensorStream (an op's result before it is computed, written tensor by tensor)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .checkpoint import Checkpoint

__all__ = ["StateDict", "TensorStream", "finish_provenance"]


class StateDict(dict):
    """A plain state dict that also carries the provenance of the op that made it."""

    provenance: dict

    def __init__(self, *args, provenance: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.provenance = provenance or {}


@dataclass
class TensorStream:
    """An op's result before it is computed: output keys, dtypes and shapes are known up front."""

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    produce: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    provenance: dict
    ingredients: list[Checkpoint] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    # optional: the same data as flat pieces in header order (several per large tensor), for writers that stream;
    # a piece stays valid until the piece after the next one is requested
    pieces: Callable[[], Iterator[tuple[str, torch.Tensor]]] | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.produce()

    def materialise(self) -> StateDict:
        """Compute every tensor; the result also records provenance (with ingredient hashes)."""
        out = StateDict(self.produce())
        out.provenance = finish_provenance(self.provenance, self.ingredients)
        return out


def finish_provenance(prov: dict, ingredients: Sequence[Checkpoint], hashes: Sequence[str] | None = None) -> dict:
    """Fill in each ingredient's sha256 (computed now unless given) and, for Hub sources, the commit it resolved to."""
    prov = dict(prov)
    hs = list(hashes) if hashes is not None else [c.sha256() for c in ingredients]
    commits = [getattr(c, "resolved_commit", None) for c in ingredients]
    prov["ingredients"] = [dict(i, sha256=h, **({"commit": c} if c else {}))
                           for i, h, c in zip(prov.get("ingredients", []), hs, commits)]
    return prov
