"""Leaderboards: checkpoints ranked by an evaluator, and every soup of a set of ingredients scored side by side —
the leaderboard behind ``weightspace soup --model M --val DATA`` (individuals, uniform, greedy, learned, weighted
soups, ensembles, merges) and the one soup chosen for saving.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

import weightspace.report as report
from ..errors import ConfigError
from ..eval.contract import Evaluate, MultiDataset, as_table
from ..eval.data import TensorData
from ..eval.distributed import sweep
from ..eval.evaluator import Evaluator
from ..io.checkpoint import Checkpoint, Source
from ..io.outputs import StateDict
from ..io.sources import load, short_name
from ..ops.engine import named_sources
from ..ops.merge import Ties
from ..ops.stream import uniform_soup, weighted_average
from ..options import SOUP_METHODS, OpOptions
from ..progress import progress as progress_bar
from .greedy import GreedyResult, greedy_ensemble, greedy_soup, mean_logits, rank, scalar_score, tell_members

__all__ = ["AVG_SHIFTS", "Leaderboard", "evaluate_each", "leaderboard", "validation_view", "soup_leaderboard",
           "merge_rows", "SOUP_METHODS", "LearnOptions", "SoupReport", "evaluate_soups"]

AVG_SHIFTS = "avg shifts"


@dataclass
class Leaderboard:
    """Rows = methods, columns = datasets; each cell holds that method's metrics on that dataset."""

    columns: list[str]
    rows: list[dict]          # {"method", "kind", "metrics": {column: {metric: value}}, optional "detail"}
    title: str = "leaderboard"
    extra: dict = field(default_factory=dict)
    shifts: list[str] = field(default_factory=list)  # distribution-shift test sets, averaged when two or more

    def with_avg_shifts(self) -> tuple[list[str], list[dict]]:
        """Columns and rows with an "avg shifts" column (the model-soups papers' summary: mean accuracy, error and
        loss over the shift sets) when there are at least two shift sets; computed afresh, so rows added later count."""
        if len(self.shifts) < 2:
            return self.columns, self.rows
        rows = []
        for r in self.rows:
            cells = [r["metrics"].get(c, {}) for c in self.shifts]
            avg = {m: sum(c[m] for c in cells) / len(cells) for m in ("accuracy", "error", "loss")
                   if all(isinstance(c.get(m), (int, float)) for c in cells)}
            rows.append({**r, "metrics": {**r["metrics"], AVG_SHIFTS: avg}})
        return [*self.columns, AVG_SHIFTS], rows

    FILES: ClassVar[tuple[str, ...]] = ("results.json", "leaderboard.csv", "leaderboard.png")

    def interval(self, method: str | dict, column: str) -> tuple[float, float] | None:
        """95% Wilson interval of a row's accuracy (the row, or its method name) on one column, from the example
        count its metrics carry (``n``); None when the count is unknown."""
        from ..report.stats import wilson
        row = method if isinstance(method, dict) else self.row(method)
        cell = row["metrics"].get(column, {})
        n, acc = cell.get("n"), cell.get("accuracy")
        if not n or acc is None or "auc" in cell:  # multi-label accuracy is a mean over labels, not a count
            return None
        return wilson(round(acc * n), int(n))

    def table(self, metric: str = "accuracy") -> tuple[list[str], list[list]]:
        """Method × column table of one metric (for Markdown); accuracies get a 95% Wilson interval column when
        the example counts are known (the binomial spread of an accuracy measured on n examples)."""
        columns, rows_ = self.with_avg_shifts()
        with_ci = {c: metric == "accuracy" and any(r["metrics"].get(c, {}).get("n") for r in rows_)
                   for c in columns}
        headers = ["method"]
        for c in columns:
            headers += [c, f"{c} 95% CI"] if with_ci[c] else [c]
        rows = []
        for r in rows_:
            row = [r["method"]]
            for c in columns:
                row.append(r["metrics"].get(c, {}).get(metric))
                if with_ci[c]:
                    iv = self.interval(r, c)
                    row.append(f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv else None)
            rows.append(row)
        return headers, rows

    def long_table(self) -> tuple[list[str], list[list]]:
        """Every metric of every column, one row per method (for CSV)."""
        columns, rows_ = self.with_avg_shifts()
        names: list[str] = []
        for r in rows_:
            for c in columns:
                names += [m for m in r["metrics"].get(c, {}) if m not in names]
        headers = ["method", "kind"] + [f"{c}/{m}" for c in columns for m in names]
        rows = [[r["method"], r.get("kind", "")] + [r["metrics"].get(c, {}).get(m) for c in columns for m in names]
                for r in rows_]
        return headers, rows

    def row(self, method: str) -> dict:
        """The row of one method."""
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(method)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        columns, rows = self.with_avg_shifts()
        return {"title": self.title, "columns": columns, "rows": rows, **self.extra}

    def plot(self, path: str | os.PathLike, *, force: bool = False, metric: str = "accuracy") -> Path:
        """leaderboard.png: one bar per method and dataset column (soups and ensembles in bold)."""
        cats = [r["method"] for r in self.rows]
        groups = {col: [r["metrics"].get(col, {}).get(metric) for r in self.rows] for col in self.columns}
        hl = [r["method"] for r in self.rows if r.get("kind") in ("soup", "ensemble")]
        fig = report.bar_chart(cats, groups, xlabel=metric, title=self.title, highlight=hl)
        return report.save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json (``extra`` plus the leaderboard), leaderboard.csv (every metric) and leaderboard.png in
        ``folder``; returns {"results", "csv", "png"} → path."""
        return report.write_files(folder, {
            "results": (self.FILES[0], {**(extra or {}), "leaderboard": self.to_dict()}),
            "csv": (self.FILES[1], self.long_table()), "png": (self.FILES[2], self.plot)}, force=force)


def _names(sources: Sequence[str]) -> list[str]:
    short = [short_name(s) for s in sources]
    # File stems clash when files of the same name sit in different folders: fall back to the full source.
    return [s if short.count(s) == 1 else src for s, src in zip(short, sources)]


def evaluate_each(ingredients: Sequence[Source], evaluate: Evaluate, *, progress: bool = True) -> list[Any]:
    """Evaluate each ingredient once (opened lazily, one at a time); returns what evaluate returned."""
    # Under torchrun --parallel points the entries are split across ranks and every rank gets all results.
    return sweep(lambda src: evaluate(load(src)), ingredients, evaluate,
                 bar=lambda xs: progress_bar(xs, total=len(xs), desc="evaluate", enabled=progress))


def leaderboard(ingredients: Sequence[Source] | Mapping[str, Source], evaluate: Evaluate, *, progress: bool = True,
                title: str = "leaderboard", names: Sequence[str] | None = None) -> Leaderboard:
    """Rank checkpoints by evaluate's accuracy on its first dataset (ties in input order): rows = checkpoints
    (in-memory ones named as ``ops.engine.named_sources`` says)."""
    ingredients = named_sources(ingredients, names)
    results = evaluate_each(ingredients, evaluate, progress=progress)
    tables = [as_table(r) for r in results]
    columns = list(tables[0])
    order, ties = rank([scalar_score(r) for r in results])
    sources = [load(s).source for s in ingredients]
    names = _names(sources)
    rows = [{"method": names[i], "kind": "checkpoint", "rank": r + 1, "source": sources[i], "metrics": tables[i]}
            for r, i in enumerate(order)]
    # ranked on the first data set; the others are its distribution shifts
    return Leaderboard(columns, rows, title, {"ties": [[names[i] for i in g] for g in ties]}, shifts=columns[1:])


def validation_view(evaluator: MultiDataset) -> Any:
    """The same Evaluator (same model instance, same device-resident tensors) restricted to its first dataset."""
    return evaluator.derive(datasets=[next(iter(evaluator.datasets))], keep_logits=False)


def soup_leaderboard(ingredients: Sequence[Source] | Mapping[str, Source], evaluate: Evaluate, *,
                     val_evaluate: Evaluate | None = None,
                     metrics_from_logits: Callable[[dict[str, torch.Tensor]], Any] | None = None,
                     strict: bool = False, progress: bool = True, title: str = "soup leaderboard",
                     precision: str = "fp32", names: Sequence[str] | None = None,
                     ) -> tuple[Leaderboard, dict[str, StateDict], GreedyResult]:
    """Individual models, best individual on val, uniform soup, greedy soup, output and greedy ensembles.

    ``evaluate(weights)`` returns Metrics over validation (first dataset) and the test sets; with
    ``metrics_from_logits`` its Metrics must carry ``.logits`` (an Evaluator with keep_logits=True), and the two
    ensemble rows are computed from those cached logits without further forward passes. ``val_evaluate``
    (defaults to ``evaluate``) scores greedy candidates on validation only. Returns the leaderboard, the soups
    {"uniform", "greedy"} and the greedy soup's decisions. In-memory ingredients are named by a mapping name →
    state dict or by ``names`` (``ops.engine.named_sources``).

    Raises:
        ConfigError: no ingredients, bad ``names``, an unknown ``precision``, or ensembles asked for without cached logits.
        IncompatibleCheckpoints, NonFiniteError: as the uniform and greedy soups.
        CheckpointError, SourceError: an ingredient cannot be read.
    """
    ingredients = named_sources(ingredients, names)
    if not ingredients:
        raise ConfigError("soup leaderboard: needs at least one ingredient")
    if isinstance(evaluate, MultiDataset):
        if metrics_from_logits is None and evaluate.keep_logits:
            metrics_from_logits = evaluate.metrics_from_logits
        if val_evaluate is None and len(evaluate.datasets) > 1:
            val_evaluate = validation_view(evaluate)
    results = evaluate_each(ingredients, evaluate, progress=progress)
    tables = [as_table(r) for r in results]
    columns = list(tables[0])
    val = columns[0]
    val_scores = [tables[i][val]["accuracy"] for i in range(len(tables))]
    sources = [load(s).source for s in ingredients]
    names = _names(sources)
    rows: list[dict] = [{"method": names[i], "kind": "individual", "source": sources[i], "metrics": tables[i]}
                        for i in range(len(tables))]
    order, ties = rank(val_scores)
    best = order[0]
    rows.append({"method": "best individual (val)", "kind": "baseline", "detail": names[best],
                 "metrics": tables[best]})

    uniform = uniform_soup(list(ingredients), precision=precision)
    rows.append({"method": "uniform soup", "kind": "soup", "detail": f"{len(ingredients)} ingredients",
                 "metrics": as_table(evaluate(uniform))})
    greedy, res = greedy_soup(ingredients, val_evaluate or evaluate, strict=strict, progress=progress,
                              scores=val_scores, precision=precision)
    tell_members(evaluate, res.kept)
    rows.append({"method": "greedy soup", "kind": "soup", "detail": ", ".join(names[i] for i in res.kept),
                 "metrics": as_table(evaluate(greedy))})

    if metrics_from_logits is not None:
        logits = [getattr(r, "logits", None) for r in results]
        if any(lg is None for lg in logits):
            raise ConfigError("soup leaderboard: ensembles need cached logits (an Evaluator with keep_logits=True)")
        rows.append({"method": "output ensemble", "kind": "ensemble", "detail": f"{len(logits)} models",
                     "metrics": as_table(metrics_from_logits(mean_logits(logits)))})
        ens, kept = greedy_ensemble(logits, val_scores, lambda lg: metrics_from_logits({val: lg[val]}),
                                    strict=strict)
        rows.append({"method": "greedy ensemble", "kind": "ensemble", "detail": ", ".join(names[i] for i in kept),
                     "metrics": as_table(metrics_from_logits(ens))})
    extra = {"val": val, "greedy": res.to_dict(), "ties": [[names[i] for i in g] for g in ties],
             "rule": ">" if strict else ">="}
    lb = Leaderboard(columns, rows, title, extra, shifts=columns[2:])  # val, then the test set, then its shifts
    return lb, {"uniform": uniform, "greedy": greedy}, res


def merge_rows(base: Source, ingredients: Sequence[Source], evaluate: Evaluate, methods: Sequence[str], *,
               grid: Sequence[float], val_evaluate: Evaluate | None = None, keep: float = 0.2,
               precision: str = "fp32", progress: bool = False) -> tuple[list[dict], dict[str, StateDict]]:
    """Leaderboard rows for merges of ``ingredients`` onto ``base`` (any registered method): its tuned
    hyperparameter (λ from ``grid``; density, select_topk or t from the method's default grid) picked by
    validation accuracy (``val_evaluate``, default ``evaluate``'s first dataset), then evaluated like a soup."""
    from .tune import data_merge, needs_data, tune_merge, tuned_parameter
    if val_evaluate is None:
        val_evaluate = validation_view(evaluate) if isinstance(evaluate, MultiDataset) and len(evaluate.datasets) > 1 else evaluate
    rows, merged = [], {}
    for m in methods:
        if needs_data(m):  # Fisher merging, RegMean: their statistics on the validation set
            model, datasets = getattr(evaluate, "model", None), getattr(evaluate, "datasets", None)
            if model is None or not datasets:
                raise ConfigError(f"--merge {m}: needs an evaluator with a model and a validation set")
            val = next(iter(datasets))
            merged[m] = data_merge(m, ingredients, model, datasets[val])
            rows.append({"method": m, "kind": "merge", "detail": f"statistics on {val}",
                         "metrics": as_table(evaluate(merged[m]))})
            continue
        param = tuned_parameter(m)
        res = tune_merge(m, base, ingredients, evaluate=lambda sd: scalar_score(val_evaluate(sd)),
                         grid=grid if param == "scale" else None, precision=precision, progress=progress,
                         **({"keep": keep} if m == "ties" else {}))
        merged[m], rec = res.weights, res.record
        label = "λ" if param == "scale" else param
        tried = ", ".join(f"{v:g}" for v, _ in rec.scores)
        row = {"method": f"{m} ({label}={rec.value:g})", "kind": "merge",
               "detail": f"base {short_name(load(base).source)}, {label}={rec.value:g} of {tried} on val",
               "parameter": param, "value": rec.value, "scores": [list(p) for p in rec.scores],
               "metrics": as_table(evaluate(res.weights))}
        if param == "scale":
            row.update(scale=rec.value, scale_scores=[list(p) for p in rec.scores])
        rows.append(row)
    return rows, merged


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
        raise ConfigError(f"weights: {len(weights)} weights for {len(checkpoints)} checkpoints", param="weights")
    if merges and base is None:
        raise ConfigError("base: merges need the checkpoint the ingredients were fine-tuned from", param="base")
    ev = evaluator
    ingredients: list[Checkpoint] = [load(c, ema=ops.ema) for c in checkpoints]
    fixed = recalibrate_bn is not None or repair is not None
    if fixed:
        from ..eval.repair import fix_evaluator
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
