"""Greedy soups (Wortsman et al. 2022) and greedy ensembles from cached logits (leaderboards: ``search.soups``).

The greedy soup is the paper's recipe: score every ingredient on held-out validation data, sort best first
(ties keep the input order and are reported), start from the best, and add each next ingredient if the soup's
validation score with it is ≥ the score without it (``strict=True``: >, as the reference code does). Memory
stays at about two models: a running float32 sum of the kept ingredients and the candidate soup; candidates
are read lazily, one tensor at a time.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._version import __version__
from ..io.checkpoint import Checkpoint, Source
from ..io.sources import load, short_name
from ..eval.distributed import sweep
import weightspace.report as report
from ..errors import ConfigError
from ..io.outputs import StateDict, finish_provenance
from ..ops.parallel import Execution, ordered_map, plan_execution, thread_scratch
from ..ops.engine import PRECISIONS, check_compatible, named_sources
from ..ops.stream import SOUPS_PAPER
from ..registry import Entry, register
from .result import SearchResult
from ..eval.contract import Evaluate, FitsKeys, TellsMembers, model_tensors

__all__ = ["rank", "scalar_score", "LazyProvenanceDict", "GreedyResult", "greedy_soup", "greedy_ensemble",
           "mean_logits", "tell_members"]


def scalar_score(x: Any) -> float:
    """A scalar score from whatever evaluate returned (a float, or Metrics: accuracy on the first dataset)."""
    s = float(x)
    return s if not math.isnan(s) else -math.inf  # a NaN score ranks last and never wins a comparison


def _bar(it, total: int, desc: str, enabled: bool):
    from ..progress import progress
    return progress(it, total=total, desc=desc, enabled=enabled)


def rank(scores: Sequence[float]) -> tuple[list[int], list[list[int]]]:
    """Indices sorted by score, best first, ties in input order; and the groups of tied indices (size ≥ 2)."""
    key = [(-s if not math.isnan(s) else math.inf) for s in scores]
    order = sorted(range(len(scores)), key=lambda i: (key[i], i))
    ties: list[list[int]] = []
    for i in order:
        if ties and scores[ties[-1][0]] == scores[i]:
            ties[-1].append(i)
        else:
            ties.append([i])
    return order, [g for g in ties if len(g) > 1]


def _accepts(new: float, old: float, strict: bool) -> bool:
    return new > old if strict else new >= old


def _for_pieces(ex: Execution, total: Mapping[str, torch.Tensor], floats: Sequence[str],
                fn: Callable[[str, int, int], None]) -> None:
    """fn(key, start, stop) for every piece of the floating keys, on the worker threads (each piece is written by
    one worker: disjoint slices, so the result does not depend on the thread count)."""
    def run(task: tuple[str, int, int]) -> None:
        with torch.no_grad():  # grad mode is per thread: targets may be a model's parameters
            fn(*task)

    tasks = ((k, a, b) for k in floats for a, b in ex.ranges(total[k].numel()))
    for _ in ordered_map(run, tasks, ex.threads, ex.depth):
        pass


def _write_trial(targets: Mapping[str, torch.Tensor], total: Mapping[str, torch.Tensor], cand: Checkpoint,
                 count: int, floats: Sequence[str], keys: Sequence[str], ex: Execution) -> None:
    """targets ← (total + cand) / count, cast to each target's dtype; integer buffers ← total's (the best's)."""
    floating = set(floats)
    with torch.no_grad():
        for k in keys:
            dst = targets[k]
            if k not in floating and dst is not total[k]:
                dst.copy_(total[k])

    def piece(k: str, a: int, b: int) -> None:
        src, out = total[k].view(-1), targets[k].view(-1)
        read = cand.read_range(k, a, b, thread_scratch("read", (b - a) * cand.info(k)[0].itemsize))
        if out.dtype == src.dtype and out.device == src.device:
            torch.add(src[a:b], read, out=out[a:b]).div_(count)
        else:  # accumulate in the wide dtype, then cast (and move) into the target
            out[a:b].copy_(torch.add(src[a:b], read).div_(count), non_blocking=True)

    _for_pieces(ex, total, floats, piece)


class LazyProvenanceDict(StateDict):
    """A StateDict whose provenance is computed when first read (by ``save``, say): hashing every kept
    ingredient's file costs as much as reading it, and a soup that is only evaluated never needs it."""

    _make: Callable[[], dict] | None = None
    _provenance: dict

    def provenance_from(self, make: Callable[[], dict]) -> None:
        """Compute the provenance with ``make()`` on first access."""
        self._make = make

    @property
    def provenance(self) -> dict:  # type: ignore[override]
        if self._make is not None:
            self._provenance, self._make = self._make(), None
        return self._provenance

    @provenance.setter
    def provenance(self, value: dict) -> None:
        self._make, self._provenance = None, value


@dataclass
class GreedyResult:
    """What the greedy soup did: the ranking, each candidate's decision, and the kept ingredients."""

    sources: list[str]
    scores: list[float]        # each ingredient's own validation score, input order
    order: list[int]           # input indices, best first
    kept: list[int]            # input indices in the soup, in the order they were added
    steps: list[dict]          # one per candidate after the first
    ties: list[list[int]]      # groups of input indices with equal validation scores (broken by input order)
    score: float               # the final soup's validation score
    strict: bool = False
    evaluations: int = 0       # evaluate calls made (individual scores given by the caller not counted)

    @property
    def kept_sources(self) -> list[str]:
        """Sources of the kept ingredients, in the order they were added."""
        return [self.sources[i] for i in self.kept]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"rule": ">" if self.strict else ">=", "score": self.score, "evaluations": self.evaluations,
                "ranking": [{"rank": r + 1, "source": self.sources[i], "val_score": self.scores[i],
                             "kept": i in self.kept} for r, i in enumerate(self.order)],
                "kept": self.kept_sources, "steps": self.steps,
                "ties": [[self.sources[i] for i in g] for g in self.ties]}

    def table(self) -> tuple[list[str], list[list]]:
        """The ranking: one row per ingredient, best first, with its validation score and whether it was kept."""
        return (["rank", "source", "val_score", "kept"],
                [[r + 1, self.sources[i], self.scores[i], i in self.kept] for r, i in enumerate(self.order)])

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """greedy.png: each ingredient's validation score, best first; the kept ones in bold."""
        names = [short_name(self.sources[i]) for i in self.order]
        kept = [short_name(self.sources[i]) for i in self.kept]
        fig = report.bar_chart(names, {"val score": [self.scores[i] for i in self.order]}, xlabel="validation score",
                               title=f"greedy soup ({'>' if self.strict else '>='}): {len(self.kept)} of "
                                     f"{len(self.sources)} kept, score {self.score:.4f}", highlight=kept)
        return report.save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """greedy.json (``extra`` plus the decisions), greedy.csv (the ranking) and greedy.png in ``folder``."""
        return report.write_files(folder, {
            "json": ("greedy.json", {**(extra or {}), **self.to_dict()}), "csv": ("greedy.csv", self.table()),
            "png": ("greedy.png", self.plot)}, force=force)


def greedy_soup(ingredients: Sequence[Source] | Mapping[str, Source], evaluate: Evaluate, *, strict: bool = False,
                progress: bool = True, scores: Sequence[float] | None = None, precision: str = "fp32",
                names: Sequence[str] | None = None) -> SearchResult[GreedyResult]:
    """Greedy soup (Wortsman et al. 2022): add ingredients best-first while the validation score does not drop.
    Returns the soup (``.weights``) and its decisions (``.record``); it unpacks as ``soup, record``.

    ``evaluate(weights)`` returns a float or anything ``float()`` accepts (Metrics: accuracy on its first dataset);
    ``scores`` (the ingredients' own validation scores, if already known) saves their evaluation. In-memory
    ingredients are named by a mapping name → state dict or by ``names`` (``ops.engine.named_sources``).

    Raises:
        ConfigError: no ingredients, bad ``names`` or an unknown ``precision``.
        IncompatibleCheckpoints: the ingredients differ in keys, shapes or dtype kinds.
        CheckpointError, SourceError: an ingredient cannot be read.
    """
    ingredients = named_sources(ingredients, names)
    if not ingredients:
        raise ConfigError("greedy soup: needs at least one ingredient")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision}: expected one of {', '.join(PRECISIONS)}", param="precision")
    cks: list[Checkpoint] = [load(s) for s in ingredients]
    if isinstance(evaluate, FitsKeys):  # in-place writes below go by key: unwrap prefixed keys first
        cks = [evaluate.fit(c) for c in cks]
    check_compatible(cks)
    evaluations = 0
    if scores is None:  # independent evaluations: split across ranks under torchrun --parallel points
        scores = [scalar_score(r) for r in sweep(evaluate, cks, evaluate,
                                           bar=lambda xs: _bar(xs, len(xs), "val scores", progress))]
        evaluations += len(cks)
    elif len(scores) != len(cks):
        raise ConfigError(f"greedy soup: {len(scores)} scores for {len(cks)} ingredients")
    scores = [float(s) for s in scores]
    order, ties = rank(scores)

    best = cks[order[0]]
    keys = sorted(best)
    dtypes = {k: best.info(k)[0] for k in keys}
    floats = [k for k in keys if dtypes[k].is_floating_point]
    acc = {k: (torch.float64 if dtypes[k] == torch.float64 else PRECISIONS[precision]) for k in floats}
    # Integer/bool buffers (e.g. num_batches_tracked) are never averaged: they come from the best ingredient.
    total: dict[str, torch.Tensor] = {k: best[k].to(acc[k], copy=True) if k in acc else best[k] for k in keys}
    # Candidate soups are written into one place, reused: an Evaluator's own model tensors, else one state dict
    # allocated once (so a plain evaluate function must not keep the weights it is given past its call).
    targets = model_tensors(evaluate)
    in_model = targets is not None
    if in_model:
        evaluate.load(best)  # one copy that checks the fit (the scores may have come from elsewhere)
    else:
        targets = StateDict({k: torch.empty_like(total[k], dtype=dtypes[k]) if k in acc else total[k] for k in keys})
    # pieces on every core; each worker reads one piece of the candidate and writes one piece of the targets
    ex = plan_execution(model_bytes=best.nbytes, worker_bytes_per_elem=16, held_bytes_per_elem=0)
    kept = [order[0]]
    current = scores[order[0]]
    steps = []
    bar = _bar(order[1:], len(order) - 1, "greedy soup", progress)
    for i in bar:
        cand, n = cks[i], len(kept)
        _write_trial(targets, total, cand, n + 1, floats, keys, ex)
        tell_members(evaluate, [*kept, i])
        s = scalar_score(evaluate() if in_model else evaluate(targets))
        evaluations += 1
        keep = _accepts(s, current, strict)
        steps.append({"source": cand.source, "val_score": scores[i], "soup_score_before": current,
                      "soup_score_with": s, "kept": keep})
        if keep:
            def add(k: str, a: int, b: int, cand: Checkpoint = cand) -> None:
                nbytes = (b - a) * cand.info(k)[0].itemsize
                total[k].view(-1)[a:b].add_(cand.read_range(k, a, b, thread_scratch("read", nbytes)))

            _for_pieces(ex, total, floats, add)
            kept.append(i)
            current = s
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(kept=len(kept), score=f"{current:.4f}")
    n = len(kept)
    soup = LazyProvenanceDict({k: (total[k] / n).to(dtypes[k]) if dtypes[k].is_floating_point else total[k]
                               for k in keys})
    result = GreedyResult([c.source for c in cks], scores, order, kept, steps, ties, current, strict, evaluations)
    prov = {"op": "greedy_soup", "coefficients": [1.0 / n] * n, "precision": precision,
            "rule": ">" if strict else ">=",
            "ingredients": [{"source": cks[i].source, "val_score": scores[i]} for i in kept],
            "candidates": [{"source": cks[i].source, "val_score": scores[i], "kept": i in kept} for i in order],
            "soup_val_score": current, "weightspace_version": __version__}
    soup.provenance_from(lambda: finish_provenance(prov, [cks[i] for i in kept]))
    return SearchResult(soup, result)



register(Entry("op", "greedy-soup", "Greedy soup", "θ = mean of {θ_i kept}, adding θ_(1), θ_(2), … by validation "
               "score while score(soup) ≥ score(soup without it)",
               "ingredients sorted by held-out validation accuracy and added one at a time, kept only when the "
               "soup's validation accuracy does not drop; the kept ones are averaged", SOUPS_PAPER,
               {"strict": False}, target=greedy_soup))

def greedy_ensemble(logits: Sequence[Mapping[str, torch.Tensor]], val_scores: Sequence[float],
                    score_logits: Callable[[dict[str, torch.Tensor]], float], *,
                    strict: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Greedy ensemble from cached logits: best-first, keep a model if the mean-logit ensemble's score holds.

    ``logits[i]`` is dataset → logits of model i; ``score_logits`` scores a {dataset: mean logits} mapping on
    validation. Returns the kept models' mean logits and their indices. No forward passes.
    """
    order, _ = rank([float(s) for s in val_scores])
    total = {k: v.to(torch.float64) for k, v in logits[order[0]].items()}
    kept, current = [order[0]], float(val_scores[order[0]])
    for i in order[1:]:
        n = len(kept)
        trial = {k: ((total[k] + logits[i][k].to(torch.float64)) / (n + 1)).float() for k in total}
        s = scalar_score(score_logits(trial))
        if _accepts(s, current, strict):
            for k in total:
                total[k] += logits[i][k].to(torch.float64)
            kept.append(i)
            current = s
    return {k: (v / len(kept)).float() for k, v in total.items()}, kept


def mean_logits(logits: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The output ensemble: per dataset, the mean of every model's logits (accumulated in float64)."""
    out = {k: v.to(torch.float64).clone() for k, v in logits[0].items()}
    for lg in logits[1:]:
        for k in out:
            out[k] += lg[k].to(torch.float64)
    return {k: (v / len(logits)).float() for k, v in out.items()}


def tell_members(evaluate: Any, members: Sequence[int], weights: Sequence[float] | None = None) -> None:
    """Tell a member-aware evaluate (``repair.FixedEvaluator``, whose REPAIR target is the mean statistics of the
    ingredients mixed) which ingredients the next evaluated weights mix; other evaluate functions ignore it."""
    if isinstance(evaluate, TellsMembers):
        evaluate.set_members(list(members), None if weights is None else list(weights))
