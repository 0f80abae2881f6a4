"""The one shape every search returns: the weights it chose and the record of how it chose them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

from ..io.outputs import StateDict

__all__ = ["SearchResult"]

R = TypeVar("R")


@dataclass
class SearchResult(Generic[R]):
    """What a search (greedy soup, learned soup, a merge's λ) chose: ``weights``, a state dict whose provenance says
    how it was made, and ``record``, the search's own result type (``GreedyResult``, ``LearnedSoupResult``,
    ``ScaleSearch``: ``table()``, ``to_dict()``, ...).

    It unpacks as a pair, ``weights, record = greedy_soup(...)``."""

    weights: StateDict
    record: R

    def __iter__(self) -> Iterator[Any]:
        return iter((self.weights, self.record))

    def to_dict(self) -> dict:
        """JSON-ready: the record's ``to_dict()`` (the weights are saved with ``weightspace.save``)."""
        return self.record.to_dict()  # type: ignore[attr-defined]
