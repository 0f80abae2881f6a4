"""Tune any merge method's main hyperparameter on validation data: λ for task-vector methods, the density for
sparsifying ones, t for slerp and nuslerp (the method's ``tuned`` attribute). The best merge is kept; the curve
(score against the hyperparameter) is the record of a ``SearchResult``, with ``table()``, ``to_dict()``, ``plot()`` and
``write(folder)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..io.checkpoint import Source
from ..io.outputs import StateDict
from ..ops.engine import finite_scalar
from ..ops.merge import MergeMethod, merge
from ..registry import REGISTRY
from .result import SearchResult

__all__ = ["DEFAULT_GRIDS", "MergeTuning", "tuned_parameter", "tune_merge", "needs_data", "data_merge"]

#: grids tried when none is given, by hyperparameter (λ's is the CLI's --scales default)
DEFAULT_GRIDS: dict[str, list[float]] = {
    "scale": [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5],
    "density": [0.2, 0.3, 0.5, 0.7, 0.8],  # inside (ε, 1 − ε) for DELLA's default ε = 0.15
    "select_topk": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
    "t": [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0],
}


def tuned_parameter(method: str) -> str:
    """The hyperparameter a search tunes for merge ``method`` ('scale' is λ).

    Raises:
        ConfigError: an unknown method (the message lists the known ones).
    """
    cls: type[MergeMethod] = REGISTRY.get("merge", method, what=f"--method {method}").target
    return cls.tuned


@dataclass
class MergeTuning:
    """A merge method's hyperparameter picked on validation data: the value chosen and the curve."""

    method: str
    parameter: str
    value: float
    scores: list[tuple[float, float]]
    options: dict = field(default_factory=dict)

    FILES = ("results.json", "curve.csv", "curve.png")

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """(headers, rows): one row per value tried."""
        return [self.parameter, "val score", "chosen"], [[v, s, "✓" if v == self.value else ""]
                                                        for v, s in self.scores]

    def to_dict(self) -> dict:
        """JSON-ready: the method, its tuned hyperparameter and value, every score, the fixed options."""
        return {"method": self.method, "parameter": self.parameter, "value": self.value,
                "scores": [{self.parameter: v, "val_score": s} for v, s in self.scores],
                "options": dict(self.options)}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Score against the hyperparameter, the chosen value circled (PNG)."""
        from ..report import line_panels, save_figure
        xs, ys = [v for v, _ in self.scores], [s for _, s in self.scores]
        best = dict(self.scores)[self.value]
        fig = line_panels([{"xlabel": self.parameter, "ylabel": "validation score", "title": self.method,
                            "series": [{"x": xs, "y": ys, "label": self.method}],
                            "annotations": [{"x": self.value, "y": best, "text": ""}]}])
        return save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json, curve.csv and curve.png in ``folder`` (refused if any exists, unless ``force``)."""
        from ..report import write_result
        return write_result(folder, self, {"table": ("curve.csv", self.table()), "plot": ("curve.png", self.plot)},
                            extra=extra, force=force)


def tune_merge(method: str, base: Source, models: Sequence[Source], *,
               evaluate: Callable[[Mapping[str, torch.Tensor]], float], grid: Sequence[float] | None = None,
               parameter: str | None = None, **options: Any) -> SearchResult[MergeTuning]:
    """Merge ``models`` onto ``base`` with ``method`` once per value of its tuned hyperparameter (``parameter``,
    default the method's: λ, density, select_topk or t) in ``grid`` (default ``DEFAULT_GRIDS``), score each with
    ``evaluate(state_dict) -> float`` (higher is better), keep the best (ties: the earliest value). Returns the best
    merge (``.weights``) and the curve (``.record``). For λ the merged
    task vector is computed once (``search.scale``); other hyperparameters redo the merge per value. ``options``
    are the method's other options and ``merge``'s keyword arguments.

    Raises:
        ConfigError: an unknown method, an empty grid or a value in it that is not finite, a ``parameter`` that is
            also in ``options``, no finite score; otherwise as ``ops.merge.merge``.
        IncompatibleCheckpoints, NonFiniteError: as ``ops.merge.merge``.
    """
    parameter = parameter or tuned_parameter(method)
    values = list(DEFAULT_GRIDS.get(parameter, []) if grid is None else grid)
    if not values:
        raise ConfigError(f"grid: needs at least one value of {parameter}", param="grid")
    values = [finite_scalar(v, "grid") for v in values]
    if parameter in options:
        raise ConfigError(f"{method}: {parameter} is tuned on --val; do not also fix it", param=parameter)
    if parameter == "scale":
        from .scale import search_scale
        res = search_scale(method, base, models, evaluate=evaluate, grid=values, **options)
        return SearchResult(res.weights, MergeTuning(method, parameter, res.record.scale, res.record.scores,
                                                     _public(options)))
    scores: list[tuple[float, float]] = []
    best: tuple[float, float, StateDict] | None = None
    for v in values:
        kwargs: dict[str, Any] = {**options, parameter: v}
        sd = merge(method, base, models, **kwargs).materialise()
        score = float(evaluate(sd))
        scores.append((v, score))
        if math.isfinite(score) and (best is None or score > best[1]):
            best = (v, score, sd)
    if best is None:
        raise ConfigError(f"{method}: evaluate returned no finite score over the grid of {parameter}")
    best[2].provenance[f"{parameter}_search"] = {"grid": values, "scores": [s for _, s in scores]}
    return SearchResult(best[2], MergeTuning(method, parameter, best[0], scores, _public(options)))


def _public(options: Mapping[str, Any]) -> dict:
    """The options worth reporting (the method's own, not how the work ran)."""
    hidden = {"progress", "threads", "max_memory", "device", "ema", "buffers", "precision", "allow_nonfinite", "negate"}
    return {k: v for k, v in options.items() if k not in hidden and v is not None}


def needs_data(method: str) -> bool:
    """Whether merge ``method`` needs a model and data (Fisher merging, RegMean) rather than weights alone.

    Raises:
        ConfigError: an unknown method.
    """
    return bool(getattr(REGISTRY.get("merge", method, what=f"--method {method}").target, "needs_data", False))


def data_merge(method: str, models: Sequence[Source], module: torch.nn.Module, data: Any, **options: Any) -> StateDict:
    """Fisher merging or RegMean of ``models`` with ``module`` on ``data`` (``search.fisher.fisher_merge`` or
    ``search.regmean.regmean_merge``; ``options`` are theirs).

    Raises:
        ConfigError: a method that needs no data, an option the method does not take; otherwise as the method.
    """
    import inspect

    from .fisher import fisher_merge
    from .regmean import regmean_merge
    runs: dict[str, Callable[..., StateDict]] = {"fisher": fisher_merge, "regmean": regmean_merge}
    run = runs.get(method)
    if run is None:
        raise ConfigError(f"{method}: not a merge that uses data ({', '.join(runs)})")
    unknown = sorted(set(options) - set(list(inspect.signature(run).parameters)[3:]))
    if unknown:
        raise ConfigError(f"--method {method}: does not take options {unknown}")
    return run(list(models), module, data, **options)
