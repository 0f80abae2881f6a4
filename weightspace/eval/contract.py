"""How search and analysis talk to evaluation: what an evaluate function may return (``as_table``) and how
weights go straight into an Evaluator's model (``model_tensors``, ``write_stream``)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..io.outputs import TensorStream

__all__ = ["as_table", "is_evaluator", "model_tensors", "write_stream"]


def as_table(result: Any, default_name: str = "data") -> dict[str, dict[str, float]]:
    """Normalise what an evaluate function returns into dataset → metric → float.

    Accepted: a Metrics-like mapping {dataset: {metric: value}}, a flat mapping {metric: value} (one dataset
    called ``default_name``), or a number (taken as that dataset's accuracy). ``error`` is added as 1 − accuracy
    where only accuracy is given.
    """
    from collections.abc import Mapping
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


def is_evaluator(obj: Any) -> bool:
    """Whether ``obj`` behaves as an Evaluator: weights go in with ``load``, BN statistics with ``recalibrate_bn``."""
    return callable(getattr(obj, "load", None)) and callable(getattr(obj, "recalibrate_bn", None))


def model_tensors(evaluate: Any) -> dict[str, torch.Tensor] | None:
    """An Evaluator's own model tensors (parameters and buffers), when weights can be written into them in place."""
    model = getattr(evaluate, "model", None)
    if not is_evaluator(evaluate) or not isinstance(model, torch.nn.Module) or hasattr(model, "after_load"):
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
