"""Which ingredients share a basin? Pairwise midpoint barriers between checkpoints, and the rule that names the
ingredients that break a uniform soup.

For every pair (i, j) the midpoint barrier is err((θ_i + θ_j)/2) − (err(θ_i) + err(θ_j))/2 on the evaluation data
(validation data: it picks what to leave out). Fine-tunes of one pre-trained start sit in one basin and their
midpoints are about as good as the ends; a model from elsewhere (another initialisation, a diverged run) has a
large barrier to everyone. Rule: an ingredient breaks the basin when the median of its barriers to the other
ingredients exceeds ``tolerance`` — the median, so one bad partner does not condemn a good ingredient, which
holds while the breakers are fewer than half of the ingredients.

This midpoint barrier is one evaluation per pair, at α = ½; it is not the curve's ``peak_over_ends`` (the maximum
over α minus the ends' mean, Frankle et al. 2020's barrier height) nor its ``chord`` (:mod:`.curve`), and can only be
lower than the former. Wortsman et al. 2022 (model soups) compare soups with their ingredients, not midpoints; the
median rule is ours.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..io.sources import Source, load

__all__ = ["BasinResult", "pairwise_barriers"]


@dataclass
class BasinResult:
    """The matrix of midpoint barriers (metric on the first dataset), each ingredient's median, and the breakers."""

    names: list[str]
    barriers: list[list[float]]   # symmetric, 0 on the diagonal
    ends: list[float]             # each ingredient's own value
    tolerance: float
    metric: str = "error"
    dataset: str = ""
    extra: dict = field(default_factory=dict)

    FILES: ClassVar[tuple[str, ...]] = ("basin.json", "basin.csv", "basin.png")

    @property
    def medians(self) -> list[float]:
        """Each ingredient's median barrier to the others."""
        import statistics
        n = len(self.names)
        return [statistics.median([self.barriers[i][j] for j in range(n) if j != i]) if n > 1 else 0.0
                for i in range(n)]

    @property
    def breakers(self) -> list[str]:
        """Ingredients whose median barrier to the others exceeds the tolerance."""
        return [n for n, m in zip(self.names, self.medians) if m > self.tolerance]

    def table(self) -> tuple[list[str], list[list]]:
        """One row per ingredient: its value, median barrier, whether it breaks the basin, then the matrix."""
        headers = ["ingredient", self.metric, "median barrier", "breaks basin", *self.names]
        rows = [[n, e, m, n in self.breakers, *row] for n, e, m, row in
                zip(self.names, self.ends, self.medians, self.barriers)]
        return headers, rows

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"names": self.names, "barriers": self.barriers, "ends": self.ends, "medians": self.medians,
                "tolerance": self.tolerance, "breakers": self.breakers, "metric": self.metric,
                "dataset": self.dataset, "rule": "median midpoint barrier to the other ingredients > tolerance",
                **self.extra}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Heat map of the pairwise barriers.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        fig = report.heatmap(self.barriers, self.names, self.names, fmt="{:.3f}", cmap="magma",
                             title=f"midpoint {self.metric} barrier ({self.dataset})",
                             cbar_label=f"{self.metric} barrier")
        return report.save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """basin.json (``extra`` and the result), basin.csv and basin.png in ``folder``; role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        import weightspace.report as report
        return report.write_files(folder, {"json": (self.FILES[0], {**(extra or {}), **self.to_dict()}),
                                           "csv": (self.FILES[1], self.table()), "png": (self.FILES[2], self.plot)},
                                  force=force)


def pairwise_barriers(ingredients: Sequence[Source], evaluate: Callable[[Any], Any], *, tolerance: float = 0.03,
                      metric: str = "error", names: Sequence[str] | None = None,
                      ends: Sequence[float] | None = None) -> BasinResult:
    """Midpoint barriers between every pair of ``ingredients`` on ``evaluate``'s first dataset (n + n(n−1)/2
    evaluations; n fewer when the ingredients' own values are given as ``ends``), and which ingredients break
    the basin (median barrier > ``tolerance``).

    Raises:
        IncompatibleCheckpoints: two ingredients differ in keys or shapes (from the soup).
    """
    from ..ops.stream import lerp
    from ..eval.contract import as_table

    def value(weights: Any) -> tuple[str, float]:
        t = as_table(evaluate(weights))
        ds = next(iter(t))
        return ds, float(t[ds][metric])

    n = len(ingredients)
    labels = list(names) if names is not None else [load(s).source.rsplit("/", 1)[-1].split(".")[0]
                                                     for s in ingredients]
    ds = ""
    if ends is None:
        ends = []
        for s in ingredients:
            ds, v = value(load(s))
            ends.append(v)
    ends = [float(v) for v in ends]
    mat = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        ds, mid = value(lerp(ingredients[i], ingredients[j], 0.5))
        mat[i][j] = mat[j][i] = mid - (ends[i] + ends[j]) / 2
    return BasinResult(labels, mat, ends, float(tolerance), metric, ds)
