"""Barrier curves: evaluate (1−α)·A + α·B at K values of α and measure the loss/error barrier between A and B.

The weights at each α are ``ops.lerp``'s, combined from both ends read once into memory. A plain
``evaluate`` function gets them as a state dict; with an ``Evaluator`` they are written piece by piece straight
into its one model, so a K-point curve costs K passes over the (device-resident) data and little else.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..io.checkpoint import Checkpoint, Source
from ..io.sources import load, short_name
from ..eval.distributed import sweep
import weightspace.report as report
from ..errors import ConfigError, NonFiniteError
from ..ops.engine import all_finite, check_compatible
from ..ops.stream import lerp_stream
from ..eval.contract import FitsKeys, LoadsWeights, as_table, model_tensors, write_stream

__all__ = ["BARRIER_METRICS", "HOLD_BYTES", "even_alphas", "barrier_height", "Curve", "barrier_table", "CurveSet",
           "interpolation_curve"]

BARRIER_METRICS = ("error", "loss")
HOLD_BYTES = 2 << 30  # a curve holds both ends in memory (read once) when together they take at most this


def even_alphas(steps: int) -> list[float]:
    """``steps`` evenly spaced α in [0, 1], both ends included (i/(K−1), so 0.1 is exactly 1/10).

    Raises:
        ConfigError: fewer than 2 steps.
    """
    if steps < 2:
        raise ConfigError(f"steps={steps}: a curve needs at least 2 points", param="steps")
    return [i / (steps - 1) for i in range(steps)]


def barrier_height(alphas: Sequence[float], values: Sequence[float]) -> dict[str, float | None]:
    """Barrier of f along the path, both conventions, over α ∈ [0, 1] (f(0) and f(1) must be among the points).

    chord:          max_α f(α) − ((1−α)·f(0) + α·f(1))   (height above the straight line between the ends; the
                    barrier of Entezari et al. 2022)
    peak_over_ends: max_α f(α) − ½(f(0) + f(1))          (height of the peak above the ends' mean: Frankle et
                    al. 2020's "error barrier height", Ainsworth et al. 2023's loss barrier)
    Neither is the value at α = ½ minus the ends' mean, which :mod:`.basin` calls the midpoint barrier. Returns the
    heights and, as ``chord_peak_alpha`` / ``peak_over_ends_alpha``, the α at which each height is reached (the
    first on ties). ``midpoint`` / ``midpoint_peak_alpha`` repeat ``peak_over_ends`` under its former, misleading
    name, for readers of older results.

    Raises:
        ConfigError: α=0 or α=1 is not among the points.
    """
    pts = dict(zip((float(a) for a in alphas), (float(v) for v in values)))
    if 0.0 not in pts or 1.0 not in pts:
        raise ConfigError("barrier height needs the curve's end points α=0 and α=1")
    f0, f1 = pts[0.0], pts[1.0]
    inside = [(a, v) for a, v in zip(alphas, values) if 0.0 <= a <= 1.0]
    chord = [(v - ((1 - a) * f0 + a * f1), a) for a, v in inside]
    mid = [(v - 0.5 * (f0 + f1), a) for a, v in inside]

    def best(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
        finite = [(h, a) for h, a in pairs if math.isfinite(h)]
        if not finite:
            return float("nan"), None
        h = max(p[0] for p in finite)
        return h, next(a for hh, a in finite if hh == h)

    (hc, ac), (hm, am) = best(chord), best(mid)
    return {"chord": hc, "chord_peak_alpha": ac, "peak_over_ends": hm, "peak_over_ends_alpha": am,
            "midpoint": hm, "midpoint_peak_alpha": am}


@dataclass
class Curve:
    """Metrics along the line (1−α)·A + α·B: ``metrics[i]`` is dataset → metric → value at ``alphas[i]``."""

    alphas: list[float]
    metrics: list[dict[str, dict[str, float]]]
    a: str = "A"
    b: str = "B"
    label: str = ""
    recalibrate_bn: str | None = None
    seconds: float = 0.0  # wall time; kept out of to_dict() so results files are byte-for-byte reproducible
    extra: dict = field(default_factory=dict)

    @property
    def datasets(self) -> list[str]:
        """Dataset names, in the order evaluate reported them."""
        return list(self.metrics[0]) if self.metrics else []

    def has(self, dataset: str, metric: str) -> bool:
        """Whether every point has this metric for this dataset."""
        return bool(self.metrics) and all(metric in m.get(dataset, {}) for m in self.metrics)

    def series(self, dataset: str, metric: str) -> list[float]:
        """The values of one metric on one dataset, in α order."""
        return [m[dataset][metric] for m in self.metrics]

    @property
    def barriers(self) -> dict[str, dict[str, dict]]:
        """dataset → metric (error, loss) → barrier_height(...) for the metrics the curve has."""
        return {ds: {m: barrier_height(self.alphas, self.series(ds, m)) for m in BARRIER_METRICS if self.has(ds, m)}
                for ds in self.datasets}

    def table(self) -> tuple[list[str], list[list]]:
        """Long format for CSV: one row per (α, dataset) with every metric as a column."""
        metric_names: list[str] = []
        for m in self.metrics:
            for row in m.values():
                metric_names += [k for k in row if k not in metric_names]
        headers = ["pair", "alpha", "dataset", *metric_names]
        rows = [[self.label, a, ds, *[m[ds].get(k) for k in metric_names]]
                for a, m in zip(self.alphas, self.metrics) for ds in m]
        return headers, rows

    def barrier_rows(self) -> tuple[list[str], list[list]]:
        """One row per (dataset, metric): chord and peak-over-ends barrier heights and where they peak."""
        headers = ["pair", "dataset", "metric", "chord", "chord_peak_alpha", "peak_over_ends", "peak_over_ends_alpha"]
        rows = [[self.label, ds, m, b["chord"], b["chord_peak_alpha"], b["peak_over_ends"], b["peak_over_ends_alpha"]]
                for ds, per in self.barriers.items() for m, b in per.items()]
        return headers, rows

    def to_dict(self) -> dict:
        """JSON-ready form (with barrier heights)."""
        return {"label": self.label, "a": self.a, "b": self.b, "alphas": self.alphas,
                "recalibrate_bn": self.recalibrate_bn,
                "points": [{"alpha": a, "metrics": m} for a, m in zip(self.alphas, self.metrics)],
                "barriers": self.barriers, **self.extra}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """curve.png: accuracy and loss vs α per dataset, the chord barrier in the legend, its peak circled.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        return CurveSet([self]).plot(path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """curve.json, curve.csv, barriers.csv and curve.png in ``folder`` (as CurveSet.write).

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        return CurveSet([self]).write(folder, force=force, extra=extra)


def barrier_table(curves: Sequence[Curve]) -> tuple[list[str], list[list]]:
    """Barrier heights of several curves in one table (one row per pair, dataset and metric)."""
    return curves[0].barrier_rows()[0], [r for c in curves for r in c.barrier_rows()[1]]


@dataclass
class CurveSet:
    """Several barrier curves reported together (pairs overlaid in one figure, one table): what ``interpolate``
    writes. A single Curve's ``plot`` and ``write`` go through a set of one."""

    curves: list[Curve]

    FILES: ClassVar[tuple[str, ...]] = ("curve.json", "curve.csv", "barriers.csv", "curve.png")

    def table(self) -> tuple[list[str], list[list]]:
        """Every point of every curve, one row per (pair, α, dataset); the curves must report the same metrics.

        Raises:
            ConfigError: the curves report different metrics.
        """
        headers, rows = self.curves[0].table()
        for c in self.curves[1:]:
            h, r = c.table()
            if h != headers:
                raise ConfigError("curves report different metrics")
            rows += r
        return headers, rows

    def barrier_table(self) -> tuple[list[str], list[list]]:
        """Barrier heights of every curve (one row per pair, dataset and metric)."""
        return barrier_table(self.curves)

    def to_dict(self) -> dict:
        """JSON-ready form: {"curves": [each curve's to_dict()]}."""
        return {"curves": [c.to_dict() for c in self.curves]}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """curve.png: accuracy and loss vs α, one line per (pair, dataset); each line's chord barrier (error on the
        accuracy panel, loss on the loss panel) is in its legend and its peak α is circled.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        panels = {m: {"series": [], "annotations": []} for m in ("accuracy", "loss")}
        barrier_of = {"accuracy": "error", "loss": "loss"}
        for i, c in enumerate(self.curves):
            color = report.COLORS[i % len(report.COLORS)]
            for j, ds in enumerate(c.datasets):
                tag = f"{c.label} · {ds}" if len(c.datasets) > 1 or len(self.curves) > 1 else ds
                for m, p in panels.items():
                    if not c.has(ds, m):
                        continue
                    ys = c.series(ds, m)
                    b = c.barriers.get(ds, {}).get(barrier_of[m])
                    label = tag
                    if b is not None and b["chord_peak_alpha"] is not None:
                        label += f"  ({barrier_of[m]} barrier {b['chord']:.3f})"
                        k = c.alphas.index(b["chord_peak_alpha"])
                        if b["chord"] > 0:  # circle the peak only where there is a barrier
                            p["annotations"].append({"x": b["chord_peak_alpha"], "y": ys[k], "text": "", "color": color})
                    p["series"].append({"x": c.alphas, "y": ys, "label": label, "color": color,
                                        "linestyle": report.LINESTYLES[j % len(report.LINESTYLES)]})
        xlabel = "α  ((1−α)·A + α·B)"
        shown = [{"xlabel": xlabel, "ylabel": m, "title": m, **p} for m, p in panels.items() if p["series"]]
        if not shown:  # a user's evaluate returned neither accuracy nor loss: plot its first metric
            ds = self.curves[0].datasets[0]
            m = next(iter(self.curves[0].metrics[0][ds]))
            shown = [{"xlabel": xlabel, "ylabel": m, "series": [{"x": c.alphas, "y": c.series(ds, m), "label": c.label}
                                                              for c in self.curves]}]
        return report.save_figure(report.line_panels(shown, title="interpolation barrier curve"), path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """curve.json (``extra`` and the curves), curve.csv (every point), barriers.csv and curve.png (all pairs
        overlaid) in ``folder``; returns {"json", "csv", "barriers", "png"} → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        return report.write_files(folder, {
            "json": (self.FILES[0], {**(extra or {}), **self.to_dict()}), "csv": (self.FILES[1], self.table()),
            "barriers": (self.FILES[2], self.barrier_table()), "png": (self.FILES[3], self.plot)}, force=force)


def _alphas(steps: int, alphas: Sequence[float] | None) -> list[float]:
    if alphas is None:
        return even_alphas(steps)
    vals = [float(a) for a in alphas]
    if any(not math.isfinite(a) for a in vals):
        raise ConfigError(f"alphas={vals}: must be finite numbers", param="alphas")
    # The ends are always evaluated: every barrier is measured against them.
    return sorted(set(vals) | {0.0, 1.0})


def _resident(ck: Checkpoint) -> Checkpoint:
    """``ck`` read into memory once (under its own source name), its floating tensors checked for NaN/Inf."""
    if not ck.files:
        mem = ck
    else:
        mem = load(ck.materialise())
        mem.source, mem.variant = ck.source, ck.variant
    for k in mem:
        t = mem[k]
        if not all_finite(t):
            raise NonFiniteError(f"{ck.source}: key '{k}' holds NaN or Inf values", path=ck.source, key=k)
    return mem


def interpolation_curve(a: Source, b: Source, evaluate: Callable[[Mapping], Any], steps: int = 11,
                        alphas: Sequence[float] | None = None, recalibrate_bn: Any = None, *,
                        label: str | None = None, progress: bool = True, precision: str = "fp32",
                        repair: Any = None, buffers: str = "mean",
                        hold_bytes: int = HOLD_BYTES) -> Curve:
    """Evaluate (1−α)·a + α·b at ``steps`` even α in [0, 1] (or at ``alphas``, ends added) and return the Curve.

    ``evaluate(weights)`` gets a state dict and returns Metrics, a {metric: value} mapping, or a number (an
    accuracy). ``recalibrate_bn`` re-estimates BatchNorm statistics at every α before evaluating: with an
    ``Evaluator`` pass the data (a TensorData) to recalibrate on; otherwise pass a function weights → weights.
    With an ``Evaluator``, the weights are written piece by piece straight into its model's tensors.
    ``repair`` (a TensorData; needs an Evaluator) applies REPAIR (weightspace.eval.repair) at every α: each channel's
    activation mean/std on that data is rescaled to (1−α)·A's + α·B's, measured once on both ends.
    ``buffers``: the running statistics' policy of ``ops.lerp`` ("mean": never extrapolated past the ends).

    Raises:
        ConfigError: fewer than two points or non-finite α; ``recalibrate_bn`` or ``repair`` data without an
            Evaluator to apply it to.
        IncompatibleCheckpoints: A and B differ in keys, shapes or dtype kinds, or do not fit the Evaluator's model.
        NonFiniteError: A or B holds NaN or Inf.
        CheckpointError, SourceError: A or B cannot be read.
    """
    grid = _alphas(steps, alphas)
    ca, cb = load(a), load(b)
    if isinstance(evaluate, FitsKeys):  # in-place writes go by key: unwrap prefixed keys first
        ca, cb = evaluate.fit(ca), evaluate.fit(cb)
    check_compatible([ca, cb])
    label = label or f"{short_name(ca.source)}–{short_name(cb.source)}"
    # Both ends are read once and checked for NaN/Inf once: every α then combines them from memory, with no
    # file reads and no finite checks (a mix of finite tensors is finite). Past hold_bytes they stay lazy.
    if ca.nbytes + cb.nbytes <= hold_bytes:
        ca, cb = _resident(ca), _resident(cb)
    lazy = ca.files or cb.files
    recal_name = None
    if recalibrate_bn is not None:
        if not callable(recalibrate_bn) and not isinstance(evaluate, LoadsWeights):
            raise ConfigError("recalibrate_bn: pass a function weights → weights, or use an Evaluator as evaluate")
        recal_name = getattr(recalibrate_bn, "name", None) or getattr(recalibrate_bn, "__name__", "custom")
    repairer = None
    if repair is not None:
        if not isinstance(evaluate, LoadsWeights):
            raise ConfigError("repair: needs an Evaluator as evaluate (its model is measured and repaired in place)")
        from ..eval.repair import Repairer
        repairer = Repairer(evaluate, repair)
        repairer.add(ca)
        repairer.add(cb)
    # In place only where nothing else needs the weights as a dict (a custom recalibration function does).
    targets = None if callable(recalibrate_bn) else model_tensors(evaluate)
    if targets is not None:
        evaluate.load(ca)  # one copy that checks the fit: missing/unexpected keys are one line naming them
    bar = None
    if progress:
        from ..progress import progress as _progress_bar
        bar = lambda xs: _progress_bar(xs, desc="curve", unit="α")  # noqa: E731

    def point(alpha: float) -> dict:
        # ops.lerp's arithmetic, streamed; no provenance (it would hash both files) since nothing is saved.
        stream = lerp_stream(ca, cb, alpha, precision=precision, allow_nonfinite=not lazy, buffers=buffers)
        if targets is not None:
            write_stream(stream, targets)
            if recalibrate_bn is not None:
                evaluate.recalibrate_bn(recalibrate_bn)
            if repairer is not None:
                repairer.repair([1.0 - alpha, alpha])
            return as_table(evaluate())
        w = dict(stream)
        if recalibrate_bn is None and repairer is None:
            return as_table(evaluate(w))
        if callable(recalibrate_bn):
            w2 = recalibrate_bn(w)
            if repairer is None:
                return as_table(evaluate(w if w2 is None else w2))
            evaluate.load(w if w2 is None else w2)
        else:
            evaluate.load(w)  # an Evaluator whose tensors cannot be written in place: weights in, fixes, evaluate
            if recalibrate_bn is not None:
                evaluate.recalibrate_bn(recalibrate_bn)
        if repairer is not None:
            repairer.repair([1.0 - alpha, alpha])
        return as_table(evaluate())

    t0 = time.perf_counter()
    points = sweep(point, grid, evaluate, bar=bar)  # under torchrun --parallel points: α points split across ranks
    seconds = time.perf_counter() - t0
    return Curve(grid, points, a=ca.source, b=cb.source, label=label, recalibrate_bn=recal_name, seconds=seconds,
                 extra={"repair": repairer.name} if repairer is not None else {})
