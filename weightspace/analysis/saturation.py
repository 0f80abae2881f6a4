"""Downstream-vs-upstream saturation (Abnar, Dehghani, Neyshabur & Sedghi 2022): e_DS = k·e_US^α + e_∞.

Errors are e = 1 − accuracy. The fit uses the points on the upper convex hull of (upstream accuracy, downstream
accuracy) — the best downstream accuracy reached at each upstream accuracy — and reports e_∞, the downstream
error that remains as upstream accuracy → 1 (predicted downstream accuracy 1 − e_∞).

Our choices (the paper does not fix them): the hull is taken in accuracy space and cut at its highest downstream
point (only the rising part, where the monotone curve can apply); least squares on e_DS, unweighted; scipy
``curve_fit`` (trust-region reflective) with bounds k ∈ (0, ∞), α ∈ (0, 20], e_∞ ∈ [0, 1], started from a
small grid of (α, e_∞) values, keeping the lowest residual.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["ALPHA_MAX", "saturation_curve", "upper_hull", "SaturationFit", "fit_saturation", "diminishing_returns",
           "read_points", "saturation_from_csv"]

ALPHA_MAX = 20.0


def saturation_curve(e_us: np.ndarray, k: float, alpha: float, e_inf: float) -> np.ndarray:
    """e_DS = k·e_US^α + e_∞."""
    return k * np.power(np.asarray(e_us, dtype=float), alpha) + e_inf


def upper_hull(x: Sequence[float], y: Sequence[float], *, rising: bool = True) -> list[int]:
    """Indices of the upper convex hull of points (x, y), left to right; ``rising`` stops at the highest y."""
    pts = sorted(range(len(x)), key=lambda i: (x[i], -y[i], i))
    hull: list[int] = []
    for i in pts:
        if hull and x[hull[-1]] == x[i]:
            continue  # same x: the first (highest y) wins
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross >= 0:  # b lies on or below the chord a→i: not on the upper hull
                hull.pop()
            else:
                break
        hull.append(i)
    if rising and hull:
        top = max(range(len(hull)), key=lambda j: (y[hull[j]], -j))
        hull = hull[:top + 1]
    return hull


@dataclass
class SaturationFit:
    """Fitted k, α, e_∞ plus the points, the hull and goodness of fit."""

    k: float
    alpha: float
    e_inf: float
    upstream: list[float]
    downstream: list[float]
    used: list[int]               # indices of the points the curve was fitted to
    rmse: float
    r2: float
    labels: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    # the test of diminishing returns against a straight line (see diminishing_returns); empty when not run
    test: dict = field(default_factory=dict)

    @property
    def predicted_downstream_at_saturation(self) -> float:
        """Downstream accuracy as upstream accuracy → 1: 1 − e_∞."""
        return 1.0 - self.e_inf

    def predict(self, upstream_accuracy: float | np.ndarray) -> np.ndarray:
        """Predicted downstream accuracy at the given upstream accuracy."""
        return 1.0 - saturation_curve(1.0 - np.asarray(upstream_accuracy, dtype=float), self.k, self.alpha, self.e_inf)

    def table(self) -> tuple[list[str], list[list]]:
        """One row per point: label, accuracies, whether it is on the fitted hull, the fitted downstream value."""
        used = set(self.used)
        rows = []
        for i, (u, d) in enumerate(zip(self.upstream, self.downstream)):
            rows.append([self.labels[i] if self.labels else str(i), u, d, i in used, float(self.predict(u))])
        return ["point", "upstream_accuracy", "downstream_accuracy", "fitted", "predicted_downstream"], rows

    def to_dict(self) -> dict:
        """JSON-ready form: settings, the fitted k, α, e_∞, goodness of fit and the points fitted."""
        return {**self.config, "k": self.k, "alpha": self.alpha, "e_inf": self.e_inf,
                "predicted_downstream_accuracy_at_upstream_1": self.predicted_downstream_at_saturation,
                "points": len(self.upstream), "points_fitted": len(self.used), "rmse": self.rmse, "r2": self.r2,
                "saturates": self.test.get("saturates"), "diminishing_returns": self.test,
                "fitted_points": [{"label": self.labels[i] if self.labels else str(i),
                                   "upstream": self.upstream[i], "downstream": self.downstream[i]} for i in self.used]}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """PNG: all points, the hull used, the fitted curve and its asymptote 1 − e_∞.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        from ..report import COLORS, new_figure, save_figure
        fig, (ax,) = new_figure(size=(5.5, 4.2))
        ax.scatter(self.upstream, self.downstream, s=14, color=COLORS[7], alpha=0.6, label="points")
        hx = [self.upstream[i] for i in self.used]
        hy = [self.downstream[i] for i in self.used]
        ax.plot(hx, hy, color=COLORS[0], marker="o", markersize=5, linewidth=1, label="upper hull (fitted)")
        lo = min(self.upstream)
        xs = np.linspace(lo - 0.02 * (1 - lo), 1.0, 200)
        ax.plot(xs, self.predict(xs), color=COLORS[1], linewidth=1.5,
                label=f"fit: k={self.k:.3g}, α={self.alpha:.3g}, e∞={self.e_inf:.3g}")
        ax.axhline(self.predicted_downstream_at_saturation, color=COLORS[1], linestyle="--", linewidth=0.8,
                   label=f"saturation 1−e∞ = {self.predicted_downstream_at_saturation:.4f}")
        ax.set_xlabel(f"upstream accuracy ({self.config.get('upstream', 'US')})")
        ax.set_ylabel(f"downstream accuracy ({self.config.get('downstream', 'DS')})")
        ax.set_title("e_DS = k·e_US^α + e_∞", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        return save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json (``extra`` and the fit), saturation.csv (every point) and saturation.png in ``folder``;
        role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        from ..report import write_result
        return write_result(folder, self, {"csv": ("saturation.csv", self.table()),
                                           "png": ("saturation.png", self.plot)}, extra=extra, force=force)


def fit_saturation(upstream: Sequence[float], downstream: Sequence[float], *, points: str = "hull",
                   labels: Sequence[str] | None = None) -> SaturationFit:
    """Fit e_DS = k·e_US^α + e_∞ to (upstream, downstream) accuracies; ``points`` is "hull" or "all".

    Raises:
        ConfigError: lists of different lengths, accuracies outside [0, 1], a bad ``points``, fewer than three points to
            fit, or a fit that does not converge.
    """
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit
    us = np.asarray(upstream, dtype=float)
    ds = np.asarray(downstream, dtype=float)
    if us.shape != ds.shape or us.ndim != 1:
        raise ConfigError("saturation: upstream and downstream need the same number of points")
    if np.any(~np.isfinite(us)) or np.any(~np.isfinite(ds)) or us.min(initial=0) < 0 or ds.min(initial=0) < 0 \
            or us.max(initial=0) > 1 or ds.max(initial=0) > 1:
        raise ConfigError("saturation: accuracies must be finite numbers in [0, 1]")
    if points not in ("hull", "all"):
        raise ConfigError(f"points={points}: expected hull or all", param="points")
    used = upper_hull(us.tolist(), ds.tolist()) if points == "hull" else list(range(len(us)))
    if len(used) < 3:
        raise ConfigError(f"saturation: {len(used)} point(s) on the {'upper hull' if points == 'hull' else 'list'}; "
                          "fitting k, α and e_∞ needs at least 3" + (" (try --points all)" if points == "hull" else ""))
    x, y = 1.0 - us[used], 1.0 - ds[used]
    lower, upper = [1e-12, 1e-6, 0.0], [np.inf, ALPHA_MAX, 1.0]
    best = None
    for alpha0 in (0.5, 1.0, 2.0, 4.0):
        for frac in (0.0, 0.5, 0.9):
            e0 = frac * float(y.min())
            scale = float(np.max(x ** alpha0))
            k0 = max(float(y.max() - e0) / scale, 1e-6) if scale > 0 else 1.0
            try:
                with warnings.catch_warnings():  # an undefined covariance (e.g. 3 points, 3 parameters) is unused
                    warnings.simplefilter("ignore", OptimizeWarning)
                    p, _ = curve_fit(saturation_curve, x, y, p0=[k0, alpha0, e0], bounds=(lower, upper),
                                     maxfev=20000)
            except (RuntimeError, ValueError):
                continue
            sse = float(np.sum((saturation_curve(x, *p) - y) ** 2))
            if best is None or sse < best[0] - 1e-15:
                best = (sse, p)
    if best is None:
        raise ConfigError("saturation: the fit did not converge from any starting point")
    sse, (k, alpha, e_inf) = best
    sst = float(np.sum((y - y.mean()) ** 2))
    return SaturationFit(float(k), float(alpha), float(e_inf), us.tolist(), ds.tolist(), list(map(int, used)),
                         rmse=math.sqrt(sse / len(y)), r2=1.0 - sse / sst if sst > 0 else float("nan"),
                         labels=list(labels) if labels is not None else [], config={"points_mode": points})


def diminishing_returns(upstream: Sequence[float], downstream: Sequence[float], *, min_points: int = 6) -> dict:
    """Does downstream accuracy show diminishing returns in upstream accuracy, or would a straight line do?

    Three parameters fitted to three points always fit (R² = 1), so a good fit proves nothing. Two tests against
    the non-saturating alternative ds = a + b·us, on every point: the leave-one-out RMSE of the saturating curve
    (refitted without each point) against that of the line, and the slope of the line through the upper half of
    the points (by upstream accuracy) against that through the lower half. ``saturates`` is True when the curve
    predicts held-out points better than the line and the upper slope is the lower one; False when either fails;
    None (undetermined) with fewer than ``min_points`` points, fewer than two distinct upstream values in a half,
    or a fit that does not converge. Returns those numbers and the verdict.
    """
    us, ds = np.asarray(upstream, dtype=float), np.asarray(downstream, dtype=float)
    n = len(us)
    out: dict = {"points": n, "min_points": min_points, "loo_rmse_saturating": None, "loo_rmse_linear": None,
                 "slope_low": None, "slope_high": None, "saturates": None}
    order = np.argsort(us, kind="stable")
    lo, hi = order[: n // 2], order[n - n // 2:]
    if n < min_points or len(set(us[lo].tolist())) < 2 or len(set(us[hi].tolist())) < 2:
        return out
    out["slope_low"] = float(np.polyfit(us[lo], ds[lo], 1)[0])
    out["slope_high"] = float(np.polyfit(us[hi], ds[hi], 1)[0])
    err_sat, err_lin = [], []
    for i in range(n):
        keep = np.arange(n) != i
        try:
            f = fit_saturation(us[keep].tolist(), ds[keep].tolist(), points="all")
        except ConfigError:
            return out
        err_sat.append(float(f.predict(us[i])) - ds[i])
        if len(set(us[keep].tolist())) < 2:
            return out
        a, b = np.polyfit(us[keep], ds[keep], 1)
        err_lin.append(float(a * us[i] + b) - ds[i])
    out["loo_rmse_saturating"] = math.sqrt(sum(e * e for e in err_sat) / n)
    out["loo_rmse_linear"] = math.sqrt(sum(e * e for e in err_lin) / n)
    out["saturates"] = bool(out["loo_rmse_saturating"] < out["loo_rmse_linear"]
                            and out["slope_high"] < out["slope_low"])
    return out


def read_points(path: str | os.PathLike, upstream: str, downstream: str, *, label: str | None = None,
                errors: bool = False) -> tuple[list[float], list[float], list[str], dict]:
    """Read two named columns of a CSV as accuracies (percent and error columns converted); skips empty cells.

    Raises:
        ConfigError: a missing or unreadable file, a missing column, or a cell that is not a number.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            for c in (upstream, downstream) + ((label,) if label else ()):
                if c not in cols:
                    raise ConfigError(f"{path}: no column '{c}' (columns: {', '.join(cols) or 'none'})")
            rows = list(reader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: not a readable CSV file ({e})") from None
    us, ds, labels, skipped = [], [], [], 0
    for n, r in enumerate(rows, start=2):
        a, b = (r.get(upstream) or "").strip(), (r.get(downstream) or "").strip()
        if not a or not b:
            skipped += 1
            continue
        try:
            u, d = float(a.rstrip("%")), float(b.rstrip("%"))
        except ValueError:
            raise ConfigError(f"{path}: line {n}: '{a}' / '{b}' is not a number") from None
        if not (math.isfinite(u) and math.isfinite(d)):
            skipped += 1
            continue
        us.append(u)
        ds.append(d)
        labels.append((r.get(label) or "").strip() if label else str(n))
    notes = {"skipped_rows": skipped, "percent": False}
    if us and max(max(us), max(ds)) > 1.0 and min(min(us), min(ds)) >= 0 and max(max(us), max(ds)) <= 100:
        us, ds = [v / 100 for v in us], [v / 100 for v in ds]  # the columns hold percentages
        notes["percent"] = True
    if errors:
        us, ds = [1 - v for v in us], [1 - v for v in ds]
    return us, ds, labels, notes


def saturation_from_csv(path: str | os.PathLike, upstream: str, downstream: str, *, label: str | None = None,
                        errors: bool = False, points: str = "hull") -> SaturationFit:
    """Fit the saturation curve to two columns of a CSV (e.g. a leaderboard).

    Raises:
        ConfigError: as :func:`read_points` (the file and its columns) and :func:`fit_saturation` (the points and the
            fit).
    """
    us, ds, labels, notes = read_points(path, upstream, downstream, label=label, errors=errors)
    fit = fit_saturation(us, ds, points=points, labels=labels)
    fit.test = diminishing_returns(us, ds)
    fit.config = {"file": str(path), "upstream": upstream, "downstream": downstream, "columns_are": "errors" if errors
                  else "accuracies", **notes, **fit.config}
    return fit
