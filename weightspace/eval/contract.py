"""How search and analysis talk to evaluation.

An evaluate function is anything ``evaluate(weights) -> metrics`` (``as_table`` says which returns are accepted).
What more an evaluate offers is declared by the protocols below and asked with ``isinstance``; an ``Evaluator``
satisfies all of them:

- ``LoadsWeights``: it holds one model and takes weights into it in place (``load``, ``recalibrate_bn``), so
  barrier curves, BN recalibration and REPAIR can work on its model; ``model_tensors`` and ``write_stream`` then
  write streamed weights straight into that model.
- ``FitsKeys``: it can unwrap a checkpoint whose keys carry a wrapper's prefix (``fit``).
- ``TellsMembers``: it wants to know which ingredients the next weights mix (``set_members``, REPAIR's target).
- ``MultiDataset``: it evaluates several datasets at once, can score cached logits, and can ``derive`` a variant
  on some of its datasets that shares its model and device-resident data.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..io.outputs import TensorStream

__all__ = ["Evaluate", "LoadsWeights", "FitsKeys", "TellsMembers", "MultiDataset", "as_table", "model_tensors",
           "write_stream"]


@runtime_checkable
class Evaluate(Protocol):
    """``evaluate(weights) -> metrics``: a float, a flat mapping of metrics, or dataset → metrics."""

    def __call__(self, weights: Any) -> Any:
        """The metrics of ``weights``."""


@runtime_checkable
class LoadsWeights(Protocol):
    """An evaluate that holds one model and takes weights into it in place; ``evaluate()`` with no weights
    evaluates what is loaded."""

    model: torch.nn.Module

    def __call__(self, weights: Any = None) -> Any:
        """The metrics of ``weights`` (loaded first), or of what is loaded when None."""

    def load(self, weights: Any) -> None:
        """Copy ``weights`` into the model in place."""

    def recalibrate_bn(self, data: Any) -> None:
        """Re-estimate the model's BatchNorm statistics on ``data``."""


@runtime_checkable
class FitsKeys(Protocol):
    """An evaluate that can present a checkpoint with the keys its model expects (a wrapper's prefix removed)."""

    def fit(self, weights: Any) -> Any:
        """``weights`` with the keys the model expects."""


@runtime_checkable
class TellsMembers(Protocol):
    """An evaluate that wants to know which ingredients (indices, with coefficients) the next weights mix."""

    def set_members(self, members: Sequence[int] | None, weights: Sequence[float] | None = None) -> None:
        """Say which ingredients (and with which coefficients) the next weights mix."""


@runtime_checkable
class MultiDataset(Protocol):
    """An evaluate over several named datasets (the first is validation) that can score given logits and
    derive a variant on a subset of its datasets sharing its model and data."""

    datasets: Mapping[str, Any]
    keep_logits: bool

    def metrics_from_logits(self, logits: Mapping[str, torch.Tensor]) -> Any:
        """The metrics of given logits, dataset by dataset."""

    def derive(self, *, datasets: Sequence[str] | None = None, keep_logits: bool | None = None) -> Any:
        """A variant on some of the datasets, sharing the model and the device-resident data."""


def as_table(result: Any, default_name: str = "data") -> dict[str, dict[str, float]]:
    """Normalise what an evaluate function returns into dataset → metric → float.

    Accepted: a Metrics-like mapping {dataset: {metric: value}}, a flat mapping {metric: value} (one dataset
    called ``default_name``), or a number (taken as that dataset's accuracy). ``error`` is added as 1 − accuracy
    where only accuracy is given.
    """
    if isinstance(result, Mapping):
        if result and all(isinstance(v, Mapping) for v in result.values()):
            table = {str(k): {str(m): float(x) for m, x in v.items()} for k, v in result.items()}
        else:
            table = {default_name: {str(m): float(x) for m, x in result.items()}}
    else:
        table = {default_name: {"accuracy": float(result)}}
    for row in table.values():
        if "accuracy" in row and "error" not in row:
            row["error"] = 1.0 - row["accuracy"]
    return table


def model_tensors(evaluate: Any) -> dict[str, torch.Tensor] | None:
    """An Evaluator's own model tensors (parameters and buffers), when weights can be written into them in place."""
    if not isinstance(evaluate, LoadsWeights):
        return None
    model = evaluate.model
    if not isinstance(model, torch.nn.Module) or hasattr(model, "after_load"):
        return None  # a model that derives weights after loading (a CLIP zero-shot head) goes through load()
    targets = dict(model.state_dict(keep_vars=True))
    return targets if all(t.is_contiguous() for t in targets.values()) else None


def write_stream(stream: TensorStream, targets: Mapping[str, torch.Tensor]) -> None:
    """Write a streamed op's result straight into existing tensors (a model's), piece by piece: no state dict is
    built and nothing is allocated per tensor. Keys the targets lack are skipped (the caller checked the fit)."""
    filled: dict[str, int] = {}
    with torch.no_grad():
        for key, piece in (stream.pieces() if stream.pieces is not None else iter(stream)):
            t = targets.get(key)
            if t is None:
                continue
            start = filled.get(key, 0)
            if start == 0 and piece.shape == t.shape:
                t.copy_(piece, non_blocking=True)
                filled[key] = t.numel()
            else:  # flat pieces of a large floating tensor, in order
                t.view(-1)[start:start + piece.numel()].copy_(piece.reshape(-1), non_blocking=True)
                filled[key] = start + piece.numel()
