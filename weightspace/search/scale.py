"""Choose a merge's scale λ with an evaluator: the merged task vector δ is computed once, each candidate
θ_pre + λ·δ is scored, the best kept."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ConfigError, NonFiniteError
from ..options import EmaChoice
from ..io.checkpoint import Source
from ..io.outputs import StateDict, finish_provenance
from ..ops.engine import PRECISIONS, all_finite, finite_scalar
from ..ops.merge import MergeMethod, apply_delta, plan_merge
from .result import SearchResult

__all__ = ["ScaleSearch", "search_scale"]


@dataclass
class ScaleSearch:
    """The record of picking λ on validation data: the merge method, the best scale and every (λ, score)."""

    method: str
    scale: float
    scores: list[tuple[float, float]]
    maximize: bool = True

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"method": self.method, "scale": self.scale, "maximize": self.maximize,
                "scores": [{"scale": lam, "score": s} for lam, s in self.scores]}

    def table(self) -> tuple[list[str], list[list]]:
        """One row per λ of the grid: λ and its score."""
        return ["scale", "score"], [[lam, s] for lam, s in self.scores]


def search_scale(method: str | MergeMethod, base: Source, models: Sequence[Source], *,
                 evaluate: Callable[[Mapping[str, torch.Tensor]], float], grid: Sequence[float],
                 maximize: bool = True, negate: Sequence[bool] | None = None, precision: str = "fp32",
                 allow_nonfinite: bool = False, progress: bool = False, ema: EmaChoice | bool | None = None,
                 threads: int | None = None, max_memory: int | str | None = None,
                 **options: Any) -> SearchResult[ScaleSearch]:
    """Pick λ from ``grid`` by ``evaluate(state_dict) -> score``; ties go to the earliest grid value. Returns the
    merge at the chosen λ (``.weights``) and the record of the search (``.record.scale``, ``.record.scores``).

    The merged task vector does not depend on λ, so it is computed once (θ_pre and δ held in memory, two models'
    worth) and each candidate costs one axpy and one call of ``evaluate``.

    Raises:
        ConfigError: an empty grid or a value in it that is not finite or beyond the accumulation dtype's range;
            otherwise as ``plan_merge``.
        IncompatibleCheckpoints: as ``plan_merge``.
        NonFiniteError: as ``plan_merge``; also the chosen merge overflows its dtype (unless ``allow_nonfinite``).
    """
    if not grid:
        raise ConfigError("grid: needs at least one value", param="grid")
    grid = [finite_scalar(x, "grid", PRECISIONS.get(precision, torch.float32)) for x in grid]
    m, plan, prov = plan_merge(method, base, models, negate=negate, precision=precision,
                               allow_nonfinite=allow_nonfinite, progress=progress, ema=ema, threads=threads,
                               max_memory=max_memory, **options)
    # θ_pre and δ of every floating key, whole and in the wide dtype (tied names share one entry), filled piece
    # by piece on the workers.
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in plan.float_keys():
        shape = plan.base.info(key)[1]
        parts[key] = (torch.empty(shape, dtype=plan.wide(key)), torch.empty(shape, dtype=plan.wide(key)))

    def fill(key: str, start: int, stop: int, base: torch.Tensor, taus: list[torch.Tensor]) -> None:
        b, d = parts[key]
        b.view(-1)[start:stop].copy_(base)
        d.view(-1)[start:stop].copy_(m.delta(key, base, taus))

    for _ in plan.map_pieces(fill, m.name):
        pass

    # running statistics do not depend on λ (the engine's buffer policy): computed once, checked once
    stats = {k: plan.engine.statistics(k) for k in parts if plan.engine.statistic(k)}

    def merged(lam: float) -> StateDict:
        out = StateDict()
        for key in plan.keys:
            canon = plan.base.aliases.get(key, key)
            dtype, shape = plan.engine.info(canon)
            if canon in stats:
                out[key] = stats[canon]
            elif canon not in parts:
                out[key] = plan.engine.buffer(canon)
            elif canon != key and canon in out:
                out[key] = out[canon]
            else:
                b, d = parts[canon]
                out[key] = apply_delta(b, d, lam, torch.empty(shape, dtype=dtype))
        return out

    scores: list[tuple[float, float]] = []
    best: tuple[float, float] | None = None
    for lam in grid:
        score = float(evaluate(merged(lam)))
        scores.append((lam, score))
        better = best is None or (score > best[1] if maximize else score < best[1])
        if better and math.isfinite(score):
            best = (lam, score)
    if best is None:
        raise ConfigError("scale grid: evaluate returned no finite score")
    prov.update(scale=best[0], scale_search={"grid": grid, "scores": [s for _, s in scores], "maximize": maximize})
    out = merged(best[0])
    if not allow_nonfinite:
        for key, t in out.items():
            if not all_finite(t):
                raise NonFiniteError(f"{plan.base.source}: key {key!r}: {m.name} with scale={best[0]:g} overflows "
                                     f"{t.dtype} (the result holds Inf); use allow_nonfinite=True to keep it anyway",
                                     path=plan.base.source, key=key)
    out.provenance = finish_provenance(prov, [plan.base, *plan.models])
    return SearchResult(out, ScaleSearch(m.name, best[0], scores, maximize))
