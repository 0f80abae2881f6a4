"""Every soup of a set of ingredients, scored side by side on one evaluator: the leaderboard behind
``weightspace soup --model M --val DATA`` (individuals, uniform, greedy, learned, weighted soups, ensembles, merges),
and the one soup chosen for saving.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError
from ..eval.data import TensorData
from ..eval.evaluator import Evaluator
from ..eval.contract import as_table
from ..io.checkpoint import Checkpoint, Source
from ..io.outputs import StateDict
from ..io.sources import load
from ..ops.merge import Ties
from ..ops.stream import weighted_average
from ..options import OpOptions
from .greedy import GreedyResult, Leaderboard, merge_rows, soup_leaderboard, tell_members

__all__ = ["SOUP_METHODS", "LearnOptions", "SoupReport", "evaluate_soups"]

SOUP_METHODS = ("uniform", "weighted", "greedy", "learned")


@dataclass
class LearnOptions:
    """The learned soup's optimisation (search.learned.learned_soup)."""

    by_layer: bool = False
    steps: int = 100
    lr: float = 0.05
    batch_size: int | None = None
    seed: int = 0


@dataclass
class SoupReport:
    """The leaderboard of every soup, the soups themselves, and which one ``method`` chose."""

    method: str
    val: str
    leaderboard: Leaderboard
    greedy: GreedyResult
    soups: dict[str, StateDict]
    members: dict[str, tuple[list[int] | None, list[float] | None]]
    evaluator: Any
    fixed: bool = False
    config: dict = field(default_factory=dict)
    learned: dict | None = None

    @property
    def chosen(self) -> StateDict:
        """The soup ``method`` names, as it was scored (recalibrated / repaired weights when a fix was applied)."""
        sd = self.soups[self.method]
        return self.evaluator.fixed_weights(sd, *self.members[self.method]) if self.fixed else sd

    @property
    def val_score(self) -> float:
        """The chosen soup's accuracy on the selection data."""
        return self.leaderboard.row(f"{self.method} soup")["metrics"][self.val]["accuracy"]

    def to_dict(self) -> dict:
        """JSON-ready: the configuration, the greedy decisions, the learned soup, the leaderboard."""
        out = {**self.config, "method": self.method, "val": self.val, "greedy": self.greedy.to_dict()}
        if self.learned is not None:
            out["learned"] = self.learned
        return out


def evaluate_soups(checkpoints: Sequence[Source], evaluator: Evaluator, *, val: str, method: str = "greedy",
                   strict: bool = False, weights: Sequence[float] | None = None, learn: LearnOptions | None = None,
                   recalibrate_bn: TensorData | None = None, repair: TensorData | None = None,
                   merges: Sequence[str] = (), base: Source | None = None, scales: Sequence[float] | None = None,
                   keep: float | None = None, ops: OpOptions | None = None,
                   progress: bool = False) -> SoupReport:
    """Score the ingredients, the uniform and greedy soups and both ensembles on ``evaluator`` (its first dataset,
    ``val``, selects), plus the learned soup (``method='learned'``), a weighted soup (``weights``) and merges onto
    ``base`` (λ picked from ``scales`` on ``val``). With ``recalibrate_bn``/``repair`` data every evaluated model is
    fixed first.

    Raises:
        ConfigError: an unknown method, weights that do not match the checkpoints, merges without a base.
    """
    ops = ops or OpOptions()
    if method not in SOUP_METHODS:
        raise ConfigError(f"soup method {method}: expected one of {', '.join(SOUP_METHODS)}")
    if (method == "weighted") != (weights is not None):
        raise ConfigError("a weighted soup needs weights, and weights make a weighted soup")
    if weights is not None and len(weights) != len(checkpoints):
        raise ConfigError(f"--weights: {len(weights)} weights for {len(checkpoints)} checkpoints")
    if merges and base is None:
        raise ConfigError("--merge needs --base, the checkpoint the ingredients were fine-tuned from")
    ev = evaluator
    ingredients: list[Checkpoint] = [load(c, ema=ops.ema) for c in checkpoints]
    fixed = recalibrate_bn is not None or repair is not None
    if fixed:
        from ..eval.fixes import fix_evaluator
        ev = fix_evaluator(ev, ingredients, progress=progress, recalibrate_bn=recalibrate_bn, repair=repair)
    lb, soups, res = soup_leaderboard(ingredients, ev, strict=strict, progress=progress, precision=ops.precision)
    members: dict[str, tuple[list[int] | None, list[float] | None]] = {"uniform": (None, None),
                                                                        "greedy": (res.kept, None)}
    learned_info = None
    if method == "learned":
        from .learned import learned_soup
        learn = learn or LearnOptions()
        soups["learned"], lres = learned_soup(ingredients, ev.model, ev.datasets[val], by_layer=learn.by_layer,
                                              steps=learn.steps, lr=learn.lr, batch_size=learn.batch_size,
                                              seed=learn.seed, eval_batch_size=evaluator.batch_size, progress=progress)
        learned_info = lres.to_dict()
        members["learned"] = (list(range(len(ingredients))), lres.coefficients)
        tell_members(ev, *members["learned"])
        lb.rows.append({"method": "learned soup", "kind": "soup", "metrics": as_table(ev(soups["learned"])),
                        "detail": ", ".join(f"{c:.3f}" for c in lres.coefficients)
                                  + (" (mean over tensors)" if learn.by_layer else "")})
    if weights is not None:
        soups["weighted"] = weighted_average(ingredients, list(weights), precision=ops.precision)
        norm = list(soups["weighted"].provenance["coefficients"])
        members["weighted"] = (list(range(len(ingredients))), norm)
        tell_members(ev, *members["weighted"])
        lb.rows.append({"method": "weighted soup", "kind": "soup", "metrics": as_table(ev(soups["weighted"])),
                        "detail": ", ".join(f"{c:.3f}" for c in norm)})
    config: dict[str, Any] = {}
    if merges:
        keep = Ties.entry.defaults["keep"] if keep is None else keep
        rows, _ = merge_rows(base, ingredients, ev, list(merges), grid=list(scales or ()), keep=keep,
                             precision=ops.precision)
        lb.rows.extend(rows)
        config["merges"] = {"base": base, "grid": list(scales or ()), "keep": keep}
    return SoupReport(method, val, lb, res, soups, members, ev, fixed, config, learned_info)
