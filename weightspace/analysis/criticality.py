"""Which modules matter? Rewinding modules (Zhang, Bengio & Singer 2019) and module criticality (Chatterji,
Neyshabur & Sedghi 2020).

Rewinding: for each module i, θ_i is set to a target (its INIT value, another checkpoint of the trajectory, or a
fresh draw from the model's own initialiser) while every other module keeps its FINAL value; then evaluate.

Module criticality: θ_i^α = (1−α)θ_i^0 + αθ_i^F, and
    μ_i = min over (α, σ) of α²‖θ_i^F − θ_i^0‖² / σ²   s.t.   E_{u~N(0,σ²I)} err(θ_i^α + u, θ_{−i}^F) ≤ ε,
searched over a grid of α ∈ [0, 1], with the largest feasible σ at each α found by bisection on fixed noise
draws (common random numbers). The network's criticality is Σ_i μ_i.
The choices the paper leaves open are documented in docs/criticality.md.
"""
from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..io.checkpoint import Source
from ..io.sources import load
from ..eval.contract import LoadsWeights, as_table
from ..eval.data import TensorData
from ..errors import ConfigError, IncompatibleCheckpoints
from ..eval.modules import ModuleUnit, grouping

__all__ = ["BN_STATS", "ModelLike", "Modules", "random_init", "resolve_modules", "safe_name", "RewindResult", "rewind",
           "CriticalityResult", "module_criticality"]

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
ModelLike = Union[nn.Module, Callable[[], nn.Module]]
Modules = Union[str, None, Mapping[str, Sequence[str]], Sequence[ModuleUnit]]


# ------------------------------------------------------------------------------------------------- helpers
def random_init(model: ModelLike, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh draw from the model's own initialiser, seeded (the global RNG is left as it was).

    A factory (a function returning a new model, e.g. ``lambda: build_model(spec)``) is called under the seed,
    so the architecture's own init scheme is used; an nn.Module is copied and every submodule that has
    ``reset_parameters`` is reset under the seed.

    Raises:
        ConfigError: ``model`` is neither an nn.Module nor a function that builds one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, nn.Module):
            m = copy.deepcopy(model).cpu()
            for sub in m.modules():
                if callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()
        elif callable(model):
            m = model()
        else:
            raise ConfigError("to=random needs the model (an nn.Module or a function that builds one)", param="to")
    return {k: v.detach().clone().cpu() for k, v in m.state_dict().items()}


def _materialise(src: Source) -> dict[str, torch.Tensor]:
    ck = load(src)
    return {k: ck[k] for k in ck}


def _structure(evaluate: Any, model: ModelLike | None) -> nn.Module | None:
    """An nn.Module to read the module tree from (the Evaluator's model, the given model, or a built one)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(evaluate, LoadsWeights) and isinstance(evaluate.model, nn.Module):
        return evaluate.model
    if callable(model):
        return model()
    return None


def resolve_modules(modules: Modules, names: Sequence[str], model: nn.Module | None) -> dict[str, list[str]]:
    """Module name → state-dict names, from a spec string, a mapping, or ModuleUnits (default: tree:layer).

    Raises:
        ConfigError: ``modules`` is no spec string, mapping or ModuleUnits, or a bad spec.
        IncompatibleCheckpoints: a module names a key the checkpoint lacks.
    """
    if isinstance(modules, Mapping):
        out = {str(k): list(v) for k, v in modules.items()}
    elif isinstance(modules, (list, tuple)) and all(isinstance(u, ModuleUnit) for u in modules):
        out = {u.name: list(u.keys) for u in modules}
    else:
        spec = modules if isinstance(modules, str) or modules is None else None
        if spec is None and modules is not None:
            raise ConfigError(f"modules: expected a spec string, a mapping or ModuleUnits, got {type(modules).__name__}")
        out = grouping(names, spec, model)
        out.pop("(other)", None)
    known = set(names)
    for name, keys in out.items():
        bad = [k for k in keys if k not in known]
        if bad:
            raise IncompatibleCheckpoints(f"module '{name}': key '{bad[0]}' is not in the checkpoint", key=bad[0])
    return {k: v for k, v in out.items() if v}


def _evaluate(evaluate: Callable, weights: Mapping, recalibrate: TensorData | None) -> dict[str, dict[str, float]]:
    if recalibrate is None:
        return as_table(evaluate(weights))
    if not isinstance(evaluate, LoadsWeights):
        raise ConfigError("recalibrate_bn needs an Evaluator as evaluate", param="recalibrate_bn")
    evaluate.load(weights)
    evaluate.recalibrate_bn(recalibrate)
    return as_table(evaluate())


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from ..progress import progress
    return progress(total=total, desc=desc)


def safe_name(name: str) -> str:
    """A module name usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "root"


# ------------------------------------------------------------------------------------------------ rewinding
@dataclass
class RewindResult:
    """Metrics with one module at a time rewound to each target, beside FINAL's own metrics."""

    final: str
    targets: list[str]
    modules: list[str]
    baseline: dict[str, dict[str, float]]
    metrics: dict[str, dict[str, dict[str, dict[str, float]]]]  # module → target → dataset → metric → value
    module_keys: dict[str, list[str]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def datasets(self) -> list[str]:
        """Dataset names, in evaluation order."""
        return list(self.baseline)

    def value(self, module: str, target: str, metric: str = "error", dataset: str | None = None) -> float:
        """One cell: a metric with ``module`` rewound to ``target``."""
        return self.metrics[module][target][dataset or self.datasets[0]][metric]

    def matrix(self, metric: str = "error", dataset: str | None = None) -> list[list[float]]:
        """modules × targets of one metric (for the heat map)."""
        return [[self.value(m, t, metric, dataset) for t in self.targets] for m in self.modules]

    def table(self) -> tuple[list[str], list[list]]:
        """Long form: one row per (module, target, dataset), FINAL's row first, with the change vs FINAL."""
        headers = ["module", "target", "dataset", "error", "loss", "accuracy", "delta_error", "delta_loss"]
        rows = [["(none: FINAL)", "final", ds, b.get("error"), b.get("loss"), b.get("accuracy"), 0.0, 0.0]
                for ds, b in self.baseline.items()]
        for m in self.modules:
            for t in self.targets:
                for ds, r in self.metrics[m][t].items():
                    b = self.baseline[ds]
                    rows.append([m, t, ds, r.get("error"), r.get("loss"), r.get("accuracy"),
                                 _delta(r, b, "error"), _delta(r, b, "loss")])
        return headers, rows

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"final": self.final, "targets": self.targets, "modules": self.modules, "baseline": self.baseline,
                "metrics": self.metrics, "module_keys": self.module_keys, "settings": self.settings}

    def plot(self, path: str | os.PathLike, *, metric: str = "error", dataset: str | None = None,
             force: bool = False) -> Path:
        """Heat map modules × rewind targets (FINAL's value in the title), like Zhang et al.'s figure.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        ds = dataset or self.datasets[0]
        fig = report.heatmap(self.matrix(metric, ds), self.modules, self.targets,
                             title=f"one module rewound\nFINAL {metric}: {self.baseline[ds][metric]:.3f}",
                             cbar_label=f"{metric} on {ds}", fmt="{:.3f}", cmap="magma")
        return report.save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json (``extra`` and the result), rewind.csv and rewind.png into a folder; role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        import weightspace.report as report
        return report.write_result(folder, self, {"csv": ("rewind.csv", self.table()),
                                                  "png": ("rewind.png", self.plot)}, extra=extra, force=force)


def _delta(r: Mapping, b: Mapping, metric: str) -> float | None:
    if metric in r and metric in b:
        return float(r[metric]) - float(b[metric])
    return None


def _target_name(t: Any) -> str:
    if isinstance(t, str):
        return t if t in ("init", "random", "final") else Path(t).stem or t
    return getattr(t, "source", None) or type(t).__name__


def rewind(final: Source, init: Source | None, evaluate: Callable, *, modules: Modules = None,
           to: Any = "init", model: ModelLike | None = None, recalibrate_bn: TensorData | None = None,
           bn_stats: str = "final", seed: int = 0, progress: bool = False) -> RewindResult:
    """Rewind one module at a time to each target in ``to`` ('init', 'random', a checkpoint), others FINAL.

    ``evaluate(weights) -> Metrics`` (an Evaluator, or any function). ``bn_stats='final'`` keeps FINAL's
    BatchNorm running statistics in the rewound module (the default), ``'target'`` takes them from the target;
    ``recalibrate_bn=data`` re-estimates all of them on ``data`` before each evaluation (needs an Evaluator).
    ``modules``: a grouping spec (tree:layer by default when the model is known, depth:N, regex:P, tree:block,
    tree:stage), a mapping name → keys, or ModuleUnits. ``random`` draws from the model's own initialiser.

    Raises:
        ConfigError: a bad ``bn_stats``, no target, a target given twice, ``init`` without INIT or ``random`` without
            the model.
        IncompatibleCheckpoints: a rewind target lacks a tensor of FINAL or has another shape.
    """
    if bn_stats not in ("final", "target"):
        raise ConfigError(f"bn_stats={bn_stats!r}: expected 'final' or 'target'")
    targets = list(to) if isinstance(to, (list, tuple)) else [to]
    if not targets:
        raise ConfigError("to: give at least one rewind target (init, random or a checkpoint)", param="to")
    final_sd = _materialise(final)
    final_name = load(final).source
    structure = _structure(evaluate, model)
    groups = resolve_modules(modules, list(final_sd), structure)
    sources: dict[str, dict[str, torch.Tensor]] = {}
    names: list[str] = []
    for t in targets:
        name = _target_name(t)
        if name in sources:
            raise ConfigError(f"to={name}: given twice", param="to")
        if isinstance(t, str) and t == "init":
            if init is None:
                raise ConfigError("to=init needs init, the checkpoint training started from", param="to")
            sd = _materialise(init)
        elif isinstance(t, str) and t == "random":
            if model is None and structure is None:
                raise ConfigError("to=random needs the model", param="to")
            sd = random_init(model if model is not None else structure, seed)
        elif isinstance(t, str) and t == "final":
            sd = final_sd
        else:
            sd = _materialise(t)
        missing = [k for ks in groups.values() for k in ks if k not in sd]
        if missing:
            raise IncompatibleCheckpoints(f"rewind target {name}: has no tensor '{missing[0]}'", key=missing[0])
        for ks in groups.values():
            for k in ks:
                if tuple(sd[k].shape) != tuple(final_sd[k].shape):
                    raise IncompatibleCheckpoints(f"rewind target {name}: key '{k}' has shape {list(sd[k].shape)}, "
                                                  f"FINAL has {list(final_sd[k].shape)}", key=k)
        sources[name] = sd
        names.append(name)
    bar = _progress(len(groups) * len(names) + 1, "rewind", progress)
    baseline = _evaluate(evaluate, final_sd, recalibrate_bn)
    if bar:
        bar.update()
    metrics: dict[str, dict[str, dict]] = {}
    work = dict(final_sd)
    for mod, keys in groups.items():
        metrics[mod] = {}
        swap = [k for k in keys if bn_stats == "target" or k.rsplit(".", 1)[-1] not in BN_STATS]
        for name in names:
            for k in swap:
                work[k] = sources[name][k]
            metrics[mod][name] = _evaluate(evaluate, work, recalibrate_bn)
            for k in swap:
                work[k] = final_sd[k]
            if bar:
                bar.update()
    if bar:
        bar.close()
    return RewindResult(final=final_name, targets=names, modules=list(groups), baseline=baseline, metrics=metrics,
                        module_keys=groups,
                        settings={"bn_stats": "recalibrated" if recalibrate_bn is not None else bn_stats,
                                  "recalibrate_bn": getattr(recalibrate_bn, "name", None), "seed": seed,
                                  "modules": modules if isinstance(modules, str) else
                                  ("tree:layer" if modules is None and structure is not None else "custom")})


# ---------------------------------------------------------------------------------------- module criticality
@dataclass
class CriticalityResult:
    """μ_i per module, Σμ_i, and each module's feasibility frontier σ_max(α) with every evaluation made."""

    final: str
    init: str
    epsilon: float
    metric: str
    alphas: list[float]
    sigma_range: list[float]
    baseline: float
    modules: list[dict]  # module, mu, alpha, sigma, sigma_scale, distance, weight_rms, numel, keys, frontier
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The network's criticality Σ_i μ_i."""
        return float(sum(m["mu"] for m in self.modules))

    def table(self) -> tuple[list[str], list[list]]:
        """One row per module: μ, the minimising (α, σ), ‖θ^F − θ^0‖, and the rewound (α=0, σ=low) value."""
        headers = ["module", "mu", "alpha", "sigma", "sigma_scale", "distance", "weight_rms", "numel",
                   f"{self.metric}_at_init"]
        rows = [[m["module"], m["mu"], m["alpha"], m["sigma"], m["sigma_scale"], m["distance"], m["weight_rms"],
                 m["numel"], m["value_at_init"]] for m in self.modules]
        rows.append(["(sum)", self.total, None, None, None, None, None, sum(m["numel"] for m in self.modules), None])
        return headers, rows

    def search_table(self) -> tuple[list[str], list[list]]:
        """Every evaluation of the bisection, long form: module, α, σ scale, σ, mean value, feasible."""
        rows = []
        for m in self.modules:
            for f in m["frontier"]:
                for scale, value in f["evaluations"]:
                    rows.append([m["module"], f["alpha"], scale, scale * m["weight_rms_scale"], value,
                                 value <= self.epsilon])
        return ["module", "alpha", "sigma_scale", "sigma", self.metric, "feasible"], rows

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"final": self.final, "init": self.init, "epsilon": self.epsilon, "metric": self.metric,
                "baseline": self.baseline, "alphas": self.alphas, "sigma_range": self.sigma_range,
                "total_mu": self.total, "modules": self.modules, "settings": self.settings, "notes": self.notes}

    def plot_valley(self, module: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
        """One module's search: every evaluated (α, σ) coloured by its mean value, the frontier σ_max(α), the argmin.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        fig, (ax,) = report.new_figure(size=(5.2, 4.0))
        pts = [(f["alpha"], scale * module["weight_rms_scale"], v) for f in module["frontier"]
               for scale, v in f["evaluations"]]
        if pts:
            a, s, v = (np.array(c, dtype=float) for c in zip(*pts))
            sc = ax.scatter(a, np.log10(np.maximum(s, 1e-300)), c=v, cmap="magma_r", vmin=0.0,
                            vmax=max(1e-6, float(np.nanmax(v))), s=18, edgecolors="none")
            fig.colorbar(sc, ax=ax).set_label(f"mean {self.metric} ({self.settings.get('samples')} draws)")
        front = [(f["alpha"], f["sigma_max"]) for f in module["frontier"] if f["sigma_max"]]
        if front:
            ax.plot([p[0] for p in front], [math.log10(p[1]) for p in front], color="cyan", linewidth=1.2,
                    label=f"σ_max(α): {self.metric} ≤ ε")
            ax.legend(fontsize=7, loc="lower left")
        if math.isfinite(module["mu"]) and module["sigma"]:
            ax.plot([module["alpha"]], [math.log10(module["sigma"])], marker="*", color="lime", markersize=12,
                    markeredgecolor="black")
        ax.set_xlabel("α  (θ^α = (1−α)θ⁰ + αθ^F)")
        ax.set_ylabel("log10 σ")
        ax.set_title(f"{module['module']}: μ = {module['mu']:.4g}  (ε = {self.epsilon:.4g})", fontsize=9)
        return report.save_figure(fig, path, force=force)

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Bar chart of μ_i per module (infinite μ drawn as empty).

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        vals = [m["mu"] if math.isfinite(m["mu"]) else None for m in self.modules]
        fig = report.bar_chart([m["module"] for m in self.modules], {"μ": vals}, xlabel="module criticality μ",
                               title=f"Σμ = {self.total:.4g}")
        return report.save_figure(fig, path, force=force)

    def valley_files(self) -> dict[str, str]:
        """module → the PNG file name of its search plot."""
        names: dict[str, str] = {}
        for m in self.modules:
            base = f"valley_{safe_name(m['module'])}"
            name, i = base, 1
            while f"{name}.png" in names.values():
                i += 1
                name = f"{base}_{i}"
            names[m["module"]] = f"{name}.png"
        return names

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json, criticality.csv, criticality_search.csv, criticality.png (μ per module) and one valley PNG
        per module (role "valley:MODULE"); role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        from functools import partial

        import weightspace.report as report
        files = self.valley_files()
        return report.write_files(folder, {
            "results": ("results.json", {**(extra or {}), **self.to_dict(), "valley_png": files}),
            "csv": ("criticality.csv", self.table()), "search": ("criticality_search.csv", self.search_table()),
            "png": ("criticality.png", self.plot),
            **{f"valley:{m['module']}": (files[m["module"]], partial(self.plot_valley, m)) for m in self.modules}},
            force=force)


def _grid(values: int | Sequence[float], lo: float, hi: float, what: str) -> list[float]:
    if isinstance(values, int):
        if values < 1:
            raise ConfigError(f"{what}={values}: needs at least one point", param=what)
        if values == 1:
            return [hi]
        return [float(v) for v in np.linspace(lo, hi, values)]
    vals = sorted({float(v) for v in values})
    if not vals or any(not math.isfinite(v) for v in vals):
        raise ConfigError(f"{what}: expected finite numbers", param=what)
    return vals


def _frontier(value: Callable[[float], float], eps: float, lo: float, hi: float, steps: int) -> tuple[float | None, list]:
    """The largest σ scale in [lo, hi] whose mean value is ≤ eps, by bisection in log σ; and every (scale, value).

    With fixed noise draws (σ scales one fixed draw) the value grows with σ in practice, so the feasible set is
    an interval [lo, σ_max] and bisection finds its end to a factor (hi/lo)^(1/2^steps). None: lo is infeasible.
    """
    evals = []

    def f(s: float) -> bool:
        v = value(s)
        evals.append([s, v])
        return v <= eps

    if not f(lo):
        return None, evals
    if lo == hi or f(hi):
        return hi, evals
    a, b = math.log(lo), math.log(hi)  # a feasible, b infeasible
    for _ in range(steps):
        m = (a + b) / 2
        if f(math.exp(m)):
            a = m
        else:
            b = m
    return math.exp(a), evals


# How module_criticality searches, recorded with every result.
_SEARCH_SETTINGS = {"search": "bisection on log σ at each α, common random numbers",
                   "sigma_relative_to": "RMS of the module's FINAL parameters"}


def _module_stats(final_sd: Mapping[str, torch.Tensor], init_sd: Mapping[str, torch.Tensor],
                  keys: Sequence[str]) -> tuple[dict, dict, float, int, float]:
    """A module's tensors in float64 (FINAL, INIT), its squared distance ‖θ^F − θ^0‖², element count and RMS."""
    f64 = {k: final_sd[k].double() for k in keys}
    i64 = {k: init_sd[k].double() for k in keys}
    dist2 = float(sum(((f64[k] - i64[k]) ** 2).sum() for k in keys))
    numel = int(sum(f64[k].numel() for k in keys))
    return f64, i64, dist2, numel, math.sqrt(float(sum((f64[k] ** 2).sum() for k in keys)) / max(numel, 1))


def _criticality_settings(metric: str, samples: int, bisect_steps: int, sigma_range: tuple[float, float],
                          alphas: int | Sequence[float]) -> tuple[float, float, list[float]]:
    """The σ range and α grid of ``module_criticality``, its settings checked (ConfigError naming the parameter)."""
    if metric not in ("error", "loss"):
        raise ConfigError(f"metric={metric}: expected error or loss", param="metric")
    if samples < 1:
        raise ConfigError(f"samples={samples}: needs at least 1", param="samples")
    if bisect_steps < 0:
        raise ConfigError(f"bisect_steps={bisect_steps}: needs 0 or more", param="bisect_steps")
    lo, hi = (float(v) for v in sigma_range)
    if not (0 < lo <= hi):
        raise ConfigError(f"sigma_range={lo},{hi}: needs 0 < low ≤ high", param="sigma_range")
    a_grid = _grid(alphas, 0.0, 1.0, "alphas")
    if any(a < 0 or a > 1 for a in a_grid):
        raise ConfigError("alphas: every α must lie in [0, 1]", param="alphas")
    return lo, hi, a_grid


def module_criticality(final: Source, init: Source, evaluate: Callable, *, modules: Modules = None,
                       model: ModelLike | None = None, epsilon: float = 0.1, alphas: int | Sequence[float] = 11,
                       sigma_range: tuple[float, float] = (1e-3, 1.0), bisect_steps: int = 8, samples: int = 3,
                       metric: str = "error", relative_epsilon: bool = False, seed: int = 0,
                       recalibrate_bn: TensorData | None = None, progress: bool = False) -> CriticalityResult:
    """Module criticality μ_i (Chatterji et al. 2020) of every module: σ found by bisection at each α.

    ``evaluate`` should measure on the TRAINING data (the definition uses the training error). At each α on the
    ``alphas`` grid, the largest feasible σ (mean ``metric`` over ``samples`` noise draws ≤ ε) is found by
    bisection in log σ over ``sigma_range`` (``bisect_steps`` halvings), with σ = s · RMS(θ_i^F), so one range fits
    modules of any scale; μ_i(α) = α²‖θ_i^F − θ_i^0‖² / σ_max(α)², and μ_i is the minimum over α. The noise draws
    of a module are drawn once and scaled (common random numbers), so every (α, σ) is compared on the same noise
    and the value is a smooth function of σ. Noise goes to the module's floating parameters; BatchNorm running
    statistics stay FINAL's, or are re-estimated on ``recalibrate_bn`` data before every evaluation (needs an
    Evaluator). A module whose α=0 point is feasible has μ_i = 0; one with no feasible point has μ_i = ∞; a
    frontier at the top of ``sigma_range`` is capped there (noted).

    Raises:
        ConfigError: a bad setting (metric, samples, bisect steps, σ range, α grid).
        IncompatibleCheckpoints: INIT lacks a tensor of FINAL.
    """
    lo, hi, a_grid = _criticality_settings(metric, samples, bisect_steps, sigma_range, alphas)
    final_sd, init_sd = _materialise(final), _materialise(init)
    missing = [k for k in final_sd if k not in init_sd]
    if missing:
        source = load(init).source
        raise IncompatibleCheckpoints(f"{source}: has no tensor '{missing[0]}' (FINAL has it)", path=source,
                                      key=missing[0])
    structure = _structure(evaluate, model)
    params = {k for k, _ in structure.named_parameters()} if structure is not None else None
    groups = resolve_modules(modules, list(final_sd), structure)
    base = _evaluate(evaluate, final_sd, recalibrate_bn)
    ds = next(iter(base))
    baseline = float(base[ds][metric])
    eps = baseline + epsilon if relative_epsilon else float(epsilon)
    notes = []
    if baseline > eps:
        notes.append(f"FINAL's own {metric} {baseline:.4f} exceeds ε = {eps:.4f}: no point can be feasible "
                     f"(every μ is ∞); raise --epsilon or use --relative-epsilon")
    bar = _progress(len(groups) * len(a_grid), "criticality", progress)
    rows = []
    work = dict(final_sd)
    for index, (mod, keys) in enumerate(groups.items()):
        noisy = [k for k in keys if final_sd[k].is_floating_point()
                 and (k in params if params is not None else k.rsplit(".", 1)[-1] not in BN_STATS)]
        if not noisy:
            continue
        f64, i64, dist2, numel, rms = _module_stats(final_sd, init_sd, noisy)
        scale = rms if rms > 0 else 1.0
        # common random numbers: one set of unit draws per module (seeded by module position), scaled by σ
        gen = torch.Generator().manual_seed(seed * 100_003 + index)
        draws = [{k: torch.randn(final_sd[k].shape, generator=gen, dtype=torch.float64) for k in noisy}
                 for _ in range(samples)]
        frontier = []
        best = (math.inf, None, None, None)
        for a in a_grid:
            centre = {k: (1 - a) * i64[k] + a * f64[k] for k in noisy}

            # value() is called only within this iteration's bisection, so the loop variables it reads are current
            def value(s: float) -> float:
                total = 0.0
                for z in draws:  # noqa: B023
                    for k in noisy:  # noqa: B023
                        work[k] = (centre[k] + z[k] * (s * scale)).to(final_sd[k].dtype)  # noqa: B023
                    total += float(_evaluate(evaluate, work, recalibrate_bn)[ds][metric])
                return total / samples

            # at α = 0 only feasibility matters (μ is 0 for any σ > 0): one evaluation at the low end
            s_max, evals = _frontier(value, eps, lo, hi, 0 if a == 0 else bisect_steps)
            if a == 0 and s_max is not None:
                s_max = lo
            mu_a = None if s_max is None else (a * a * dist2 / (s_max * scale) ** 2)
            frontier.append({"alpha": a, "sigma_scale_max": s_max, "sigma_max": None if s_max is None else s_max * scale,
                             "mu": mu_a, "capped": s_max is not None and a > 0 and s_max == hi,
                             "evaluations": evals})
            if mu_a is not None and mu_a < best[0]:
                best = (mu_a, a, s_max * scale, s_max)
            if bar:
                bar.update()
            if a == 0 and s_max is not None:
                break  # μ_i = 0 already: no α can do better
        if bar and len(frontier) < len(a_grid):
            bar.update(len(a_grid) - len(frontier))
        for k in noisy:
            work[k] = final_sd[k]
        if best[1] is not None and any(f["capped"] and f["alpha"] == best[1] for f in frontier):
            notes.append(f"{mod}: the largest feasible σ at the minimising α is the top of --sigma-range; "
                         f"μ is an upper bound (raise the range's high end)")
        first = frontier[0]["evaluations"][0][1] if frontier and frontier[0]["evaluations"] else None
        rows.append({"module": mod, "mu": best[0], "alpha": best[1], "sigma": best[2], "sigma_scale": best[3],
                     "distance": math.sqrt(dist2), "weight_rms": rms, "weight_rms_scale": scale, "numel": numel,
                     "keys": noisy, "value_at_init": first if a_grid[0] == 0 else None, "frontier": frontier})
    if bar:
        bar.close()
    return CriticalityResult(final=load(final).source, init=load(init).source, epsilon=eps, metric=metric,
                             alphas=a_grid, sigma_range=[lo, hi], baseline=baseline, modules=rows, notes=notes,
                             settings={"samples": samples, "seed": seed, "relative_epsilon": relative_epsilon,
                                       "epsilon_given": float(epsilon), "bisect_steps": int(bisect_steps),
                                       "bn_stats": "recalibrated" if recalibrate_bn is not None else "final", "dataset": ds,
                                       **_SEARCH_SETTINGS, "modules": modules if isinstance(modules, str) else "tree:layer"})
