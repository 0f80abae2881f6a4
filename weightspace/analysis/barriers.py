"""Barrier curves for pairs of checkpoints, and, on request, the same pairs after permutation alignment: the
before/after comparison behind ``weightspace interpolate --align`` (Git Re-Basin: does aligning B to A remove
the barrier?).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..eval.data import TensorData
from ..eval.evaluator import Evaluator
from ..io.checkpoint import Source
from ..io.sources import load, short_name
from ..options import OpOptions
from ..search.align import align
from .curve import Curve, interpolation_curve

__all__ = ["BarrierComparison", "barrier_curves"]


@dataclass
class BarrierComparison:
    """One curve per pair (and per aligned pair), and per pair the barriers before and after alignment."""

    curves: list[Curve]
    alignment: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: every curve, and the alignment entries (empty without alignment)."""
        return {"curves": [c.to_dict() for c in self.curves], "alignment": self.alignment}


def barrier_curves(pairs: Sequence[tuple[Source, Source]], evaluator: Evaluator, *, steps: int = 11,
                   alphas: Sequence[float] | None = None, recalibrate_bn: TensorData | None = None,
                   repair: TensorData | None = None, align_method: str | None = None,
                   align_data: TensorData | None = None, ops: OpOptions | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> BarrierComparison:
    """The interpolation curve of every pair (A, B) on ``evaluator``; with ``align_method`` ('weights' or
    'activations', the latter on ``align_data``) also the curve from A to B permuted to match A, and per pair the
    barriers and distances before and after.

    Raises:
        ConfigError: activation matching without data, or an unknown method.
        IncompatibleCheckpoints: a pair that does not fit together or the model.
    """
    ops = ops or OpOptions()
    if align_method not in (None, "weights", "activations"):
        raise ConfigError(f"align_method={align_method}: expected weights or activations", param="align_method")
    if align_method == "activations" and align_data is None:
        raise ConfigError("activation matching needs --align-data (or --recalibrate-bn/--repair data)")
    say = log or (lambda msg: None)
    out = BarrierComparison([])
    for a, b in pairs:
        ca, cb = load(a, ema=ops.ema), load(b, ema=ops.ema)
        todo: list[tuple[Any, str | None]] = [(cb, None)]
        if align_method:
            net = copy.deepcopy(evaluator.model).cpu()  # align traces and runs its own copy, on the CPU
            pb, info = align(ca, cb, net, method=align_method, data=align_data, progress=progress)
            say(f"aligned {cb.source} to {ca.source} ({align_method} matching): ‖A−B‖ {info['l2_before']:.4g} → "
                f"‖A−P(B)‖ {info['l2_after']:.4g}")
            todo.append((pb, f"{short_name(ca.source)}–P({short_name(cb.source)})"))
        for b_, label in todo:
            c = interpolation_curve(ca, b_, evaluator, steps=steps, alphas=alphas, recalibrate_bn=recalibrate_bn,
                                    repair=repair, label=label, progress=progress, precision=ops.precision,
                                    buffers=ops.buffer_policy())
            out.curves.append(c)
            say(f"{c.label}: {len(c.alphas)} points in {c.seconds:.2f} s")
        if align_method:
            before, after = out.curves[-2], out.curves[-1]
            out.alignment.append({"a": ca.source, "b": cb.source, "method": align_method,
                                  "l2_before": info["l2_before"], "l2_after": info["l2_after"],
                                  "before": before.barriers, "after": after.barriers,
                                  "labels": [before.label, after.label]})
    return out
