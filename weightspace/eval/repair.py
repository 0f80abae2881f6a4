"""REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging the weights of two networks shrinks the variance of their hidden activations ("variance collapse"),
and that alone causes much of the barrier between aligned networks. REPAIR measures, on data, the per-channel
mean and standard deviation of chosen activations in both end points, and rescales every channel of the mixed
network so its statistics become the mixture of the end points' (μ = Σ c_i μ_i, σ = Σ c_i σ_i). The correction
is an affine map per channel, fused into the layer that produces the activation, so the repaired network is an
ordinary set of weights of the same architecture.

Where it applies (the *repair points*, found by one probe forward pass with hooks):

* the output of every ``BatchNorm1d/2d/3d`` with ``affine=True``: γ ← γ·k, β ← (β − μ)·k + t;
* the output of every ``Conv1d/2d/3d`` and ``Linear`` **with a bias** whose output does not go straight into a
  BatchNorm (BN-free CNNs and MLPs): W ← W·k (per output channel), b ← (b − μ)·k + t;
* not the layer whose output is the network's output (the logits), not modules called more than once per
  forward, not a BN without affine parameters or a bias-free conv/linear outside a BN (nothing to absorb the
  shift): those are listed as skipped. LayerNorm/GroupNorm networks (transformers) are out of scope.

with k = σ_target / σ and t = μ_target for the measured μ, σ of the mixed network (a channel whose σ is below
1e-6 of the largest σ or σ_target at that point is constant on the data: it is shifted, not scaled). All points are
repaired in one pass over the data: each point's output is renormalised on the fly with the batch's statistics
(as BatchNorm does in train mode), so every later point is measured with the earlier ones already repaired;
then the population statistics of the pass are fused into the weights. With the whole repair set in one batch
the repaired network matches the target statistics exactly (up to float rounding); with several batches, as closely as a
BatchNorm re-estimated the same way. Cost: one forward pass over the repair data per repaired network, plus one
per end point (measured once and reused for every α or soup candidate).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..io.checkpoint import Source
from ..io.sources import load
from .data import TensorData
from ..errors import ConfigError
from .contract import LoadsWeights
from .evaluator import Evaluator
from ..io.outputs import StateDict

__all__ = ["FLOOR", "Stats", "RepairPoint", "RepairScope", "repair_scope", "channel_stats", "mix_stats",
           "repair_model", "Repairer", "FixedEvaluator", "fix_evaluator"]

FLOOR = 1e-6  # relative: a σ below FLOOR × the largest σ at its point counts as zero (constant channel)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # repair point → (per-channel mean, per-channel std), float64


@dataclass
class RepairPoint:
    """One activation REPAIR corrects: the output of module ``name`` (channels along ``dim``)."""

    name: str
    kind: str  # "batchnorm", "conv" or "linear"
    dim: int
    channels: int


@dataclass
class RepairScope:
    """The repair points of a model, and the candidate modules left alone with the reason why."""

    points: list[RepairPoint]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"points": [p.name for p in self.points], "skipped": [{"module": n, "why": w} for n, w in self.skipped]}


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(m, _CONV):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def repair_scope(model: nn.Module, example: torch.Tensor) -> RepairScope:
    """Find the repair points of ``model`` with one forward pass of ``example`` (a few inputs) through hooks."""
    candidates = {name: m for name, m in model.named_modules() if _kind(m) is not None}
    calls: dict[str, int] = {n: 0 for n in candidates}
    outputs: dict[str, torch.Tensor] = {}
    feeds_bn: set[str] = set()
    handles = []

    def after(name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                outputs[name] = out
        return hook

    def before_bn(mod: nn.Module, inp: Any) -> None:
        x = inp[0] if inp else None
        for n, o in outputs.items():
            if o is x:  # the very tensor a conv/linear returned goes into this BatchNorm
                feeds_bn.add(n)

    for name, m in candidates.items():
        handles.append(m.register_forward_hook(after(name)))
        if _kind(m) == "batchnorm":
            handles.append(m.register_forward_pre_hook(before_bn))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    final = result if isinstance(result, torch.Tensor) else None
    points, skipped = [], []
    for name, m in candidates.items():
        kind = _kind(m)
        if calls[name] == 0:
            continue  # not on the forward path (e.g. an unused head)
        if calls[name] > 1:
            skipped.append((name, "called more than once per forward"))
        elif final is not None and outputs.get(name) is final:
            skipped.append((name, "produces the model's output"))
        elif kind == "batchnorm":
            if m.affine:
                points.append(RepairPoint(name, kind, 1, m.num_features))
            else:
                skipped.append((name, "BatchNorm without affine parameters"))
        elif name in feeds_bn:
            continue  # the BatchNorm after it is repaired
        elif m.bias is None:
            skipped.append((name, "no bias to absorb the shift (and no BatchNorm after it)"))
        elif kind == "conv":
            points.append(RepairPoint(name, kind, 1, m.out_channels))
        else:
            points.append(RepairPoint(name, kind, -1, m.out_features))
    return RepairScope(points, skipped)


class _Moments:
    """Per-channel running sums (float64) of one activation: count, Σz, Σz²."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | float = 0.0
        self.ss: torch.Tensor | float = 0.0

    def add(self, z: torch.Tensor, dim: int) -> None:
        c = z.shape[dim]
        flat = z.detach().movedim(dim, -1).reshape(-1, c).to(torch.float64)
        self.n += flat.shape[0]
        self.s = self.s + flat.sum(0)
        self.ss = self.ss + (flat * flat).sum(0)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp(min=0).sqrt()


def _pass(model: nn.Module, data: TensorData, scope: RepairScope, batch_size: int, device: torch.device,
          make_hook) -> dict[str, _Moments]:
    modules = dict(model.named_modules())
    moments = {p.name: _Moments() for p in scope.points}
    handles = [modules[p.name].register_forward_hook(make_hook(p, moments[p.name])) for p in scope.points]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for xb, _ in data.batches(batch_size):
                model(xb.to(device, non_blocking=True))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(m.n == 0 for m in moments.values()):
        raise ConfigError(f"repair data {data.name}: empty, or a repair point saw no activations")
    return moments


def channel_stats(model: nn.Module, data: TensorData, scope: RepairScope, *, batch_size: int = 256,
                  device: torch.device | None = None) -> Stats:
    """Per-channel mean and std (population, float64) of every repair point's output on ``data`` (eval mode)."""
    dev = device or next(model.parameters()).device

    def make_hook(p: RepairPoint, mom: _Moments):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            mom.add(out, p.dim)
        return hook

    return {name: m.stats() for name, m in _pass(model, data, scope, batch_size, dev, make_hook).items()}


def _scale(t_std: torch.Tensor, std: torch.Tensor, floor: float = FLOOR) -> torch.Tensor:
    """k = σ_target / σ per channel; 1 for channels that are constant on the data (nothing to rescale)."""
    tiny = floor * torch.maximum(std.max(), t_std.max()).clamp(min=1e-30)
    return torch.where(std > tiny, t_std / std.clamp(min=tiny), torch.ones_like(std))


def mix_stats(stats: Sequence[Stats], coefficients: Sequence[float]) -> Stats:
    """The REPAIR target of a mixture Σ c_i θ_i: μ = Σ c_i μ_i and σ = Σ c_i σ_i per channel.

    Raises:
        ConfigError: the number of coefficients differs from the number of sets of statistics.
    """
    if len(stats) != len(coefficients) or not stats:
        raise ConfigError(f"repair: {len(coefficients)} coefficients for {len(stats)} sets of statistics")
    out: Stats = {}
    for name in stats[0]:
        out[name] = (sum(c * s[name][0] for c, s in zip(coefficients, stats)),
                     sum(c * s[name][1] for c, s in zip(coefficients, stats)))
    return out


def repair_model(model: nn.Module, data: TensorData, target: Stats, scope: RepairScope, *, batch_size: int = 256,
                 device: torch.device | None = None) -> dict:
    """Rescale every repair point of ``model`` in place so its channel statistics on ``data`` become ``target``.

    Raises:
        ConfigError: ``target`` lacks statistics for a repair point.
    """
    dev = device or next(model.parameters()).device
    modules = dict(model.named_modules())
    missing = [p.name for p in scope.points if p.name not in target]
    if missing:
        raise ConfigError(f"repair: no target statistics for {', '.join(missing[:3])}")
    goal = {n: (m.to(dev, torch.float32), s.to(dev, torch.float32)) for n, (m, s) in target.items()}

    def make_hook(p: RepairPoint, mom: _Moments):
        t_mean, t_std = goal[p.name]

        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor:
            mom.add(out, p.dim)
            # Renormalise with this batch's statistics so the points after this one see repaired inputs.
            z = out.movedim(p.dim, -1)
            dims = tuple(range(z.dim() - 1))
            mean = z.mean(dims)
            std = z.var(dims, unbiased=False).sqrt()
            z = (z - mean) * _scale(t_std, std) + t_mean
            return z.movedim(-1, p.dim)
        return hook

    moments = _pass(model, data, scope, batch_size, dev, make_hook)
    scales = []
    with torch.no_grad():
        for p in scope.points:
            mean, std = moments[p.name].stats()
            t_mean, t_std = (v.to(torch.float64) for v in target[p.name])
            k = _scale(t_std.to(mean.device), std)
            shift = t_mean.to(mean.device) - mean * k
            m = modules[p.name]
            w = m.weight
            k_w = k.to(w.device, w.dtype)
            w.mul_(k_w.view(-1, *([1] * (w.dim() - 1))))  # axis 0 is the output channel of BN, conv and linear
            m.bias.mul_(k_w).add_(shift.to(w.device, m.bias.dtype))
            scales.append(float(k.mean()))
    return {"points": len(scope.points), "mean_scale": sum(scales) / len(scales) if scales else None}


class Repairer:
    """REPAIR for an Evaluator's model: statistics of the end points measured once, then any mixture repaired."""

    def __init__(self, evaluator: Evaluator, data: TensorData, *, batch_size: int | None = None) -> None:
        """REPAIR of ``evaluator``'s model on ``data`` (in batches of ``batch_size``, by default the evaluator's).

        Raises:
            ConfigError: ``evaluator`` is not an Evaluator, ``data`` is empty, or the model has nothing REPAIR can
                correct.
        """
        if not isinstance(evaluator, LoadsWeights) or not isinstance(evaluator.model, nn.Module):
            raise ConfigError("repair: needs an Evaluator (its model is measured and repaired in place)")
        if len(data) == 0:
            raise ConfigError(f"repair data {data.name}: empty")
        self.evaluator = evaluator
        self.model = evaluator.model
        self.device = evaluator.device
        self.data = data.to(self.device)
        self.name = data.name
        self.batch_size = int(batch_size or evaluator.batch_size)
        self.scope = repair_scope(self.model, self.data.prepare(self.data.x[:2]))
        if not self.scope.points:
            why = "; ".join(f"{n}: {w}" for n, w in self.scope.skipped[:3])
            raise ConfigError("repair: the model has no BatchNorm, conv or linear activation REPAIR can correct"
                              + (f" ({why})" if why else ""))
        self.stats: list[Stats] = []

    def measure(self, weights: Source | None = None) -> Stats:
        """Statistics of ``weights`` (loaded into the model) or of the model as it is.

        Raises:
            IncompatibleCheckpoints: ``weights`` do not fit the model.
            SourceError, CheckpointError: ``weights`` name a checkpoint that cannot be found or read.
        """
        if weights is not None:
            self.evaluator.load(weights)
        return channel_stats(self.model, self.data, self.scope, batch_size=self.batch_size, device=self.device)

    def add(self, weights: Source) -> int:
        """Measure one end point / ingredient; returns its index for ``repair``."""
        self.stats.append(self.measure(weights))
        return len(self.stats) - 1

    def target(self, coefficients: Sequence[float], members: Sequence[int] | None = None) -> Stats:
        """Mixed statistics of the measured end points (``members``: their indices; default all)."""
        chosen = [self.stats[i] for i in members] if members is not None else self.stats
        return mix_stats(chosen, coefficients)

    def repair(self, coefficients: Sequence[float], members: Sequence[int] | None = None) -> dict:
        """Repair the weights now in the model, a mixture Σ c_i θ_{members[i]}, in place.

        Raises:
            ConfigError: ``coefficients`` and the measured statistics differ in number.
        """
        return repair_model(self.model, self.data, self.target(coefficients, members), self.scope,
                            batch_size=self.batch_size, device=self.device)


class FixedEvaluator(Evaluator):
    """An Evaluator that fixes every candidate's statistics before evaluating it: BatchNorm recalibration on
    ``recalibrate_bn`` data, then REPAIR toward the mean statistics of the ingredients it mixes.

    Soups tell it which ingredients the next weights mix with ``set_members``; a weight set that is one of the
    ingredients is recognised by its source; anything else (a uniform soup, a merge) mixes all of them.
    """

    def __init__(self, model: nn.Module, data: Any, *, recal_data: TensorData | None = None,
                 repairer: Repairer | None = None, ingredients: Sequence[Source] = (), **options: Any):
        """An Evaluator (``options`` as Evaluator's) that recalibrates BatchNorm on ``recal_data`` (already on the
        device) and REPAIRs with ``repairer`` (its ingredients' statistics measured). ``wrap`` builds one from an
        Evaluator.

        Raises:
            ConfigError: as Evaluator's (device, parallel mode, dataset names).
            IncompatibleCheckpoints, SourceError, CheckpointError: an ingredient cannot be read or does not fit the
                model.
        """
        super().__init__(model, data, **options)
        self.recal_data = recal_data
        self.repairer = repairer
        self.ingredients = [load(s) for s in ingredients]  # Checkpoints stay the same objects (member_of)
        self._members: tuple[list[int], list[float] | None] | None = None

    @classmethod
    def wrap(cls, evaluator: Evaluator, ingredients: Sequence[Source] = (), *, recalibrate_bn: TensorData | None = None,
             repair: TensorData | None = None, progress: bool = False) -> "FixedEvaluator":
        """Share ``evaluator``'s model and data; measure each ingredient's statistics when REPAIR is asked for.

        Raises:
            ConfigError: REPAIR is asked for without ingredients, or the model has nothing REPAIR can correct."""
        repairer = Repairer(evaluator, repair) if repair is not None else None
        if repairer is not None and not ingredients:
            raise ConfigError("repair: a soup's REPAIR target needs its ingredients")
        recal = recalibrate_bn.to(evaluator.device) if recalibrate_bn is not None else None
        new = cls(evaluator.model, evaluator.datasets, recal_data=recal, repairer=repairer, ingredients=ingredients,
                  **evaluator.options)
        if repairer is not None:
            items = new.ingredients
            if progress:
                from ..progress import progress as _progress_bar
                items = _progress_bar(items, desc="repair statistics")
            for ck in items:
                repairer.add(ck)
        return new

    def _variant(self, datasets: Mapping[str, TensorData], options: dict[str, Any]) -> "FixedEvaluator":
        return FixedEvaluator(self.model, datasets, recal_data=self.recal_data, repairer=self.repairer,
                              ingredients=self.ingredients, **options)

    @property
    def fixes(self) -> dict:
        """What is done to every candidate (for provenance and results)."""
        return {"recalibrate_bn": getattr(self.recal_data, "name", None),
                "repair": self.repairer.name if self.repairer is not None else None}

    def set_members(self, members: Sequence[int] | None, weights: Sequence[float] | None = None) -> None:
        """The ingredients (indices) the next evaluated weights mix, with their coefficients (default equal)."""
        self._members = None if members is None else (list(members), None if weights is None else list(weights))

    def fix(self, members: Sequence[int] | None = None, weights: Sequence[float] | None = None) -> None:
        """Recalibrate BatchNorm and/or REPAIR the weights now in the model."""
        if self.recal_data is not None:
            self.recalibrate_bn(self.recal_data)
        if self.repairer is not None:
            idx = list(range(len(self.repairer.stats))) if members is None else list(members)
            coefs = [1.0 / len(idx)] * len(idx) if weights is None else [float(w) for w in weights]
            total = sum(coefs)
            self.repairer.repair([c / total for c in coefs], idx)

    def member_of(self, weights: Any) -> int | None:
        """The index of the ingredient ``weights`` is (the same object, or a file of a unique source), else None."""
        for i, ck in enumerate(self.ingredients):
            if weights is ck:
                return i
        src = getattr(weights, "source", None)
        sources = [ck.source for ck in self.ingredients]
        if isinstance(src, str) and not src.startswith("<") and sources.count(src) == 1:
            return sources.index(src)
        return None

    def __call__(self, weights: Source | None = None) -> Any:
        """Evaluate ``weights`` (loaded first, when given) with the fixes applied: BatchNorm statistics re-estimated
        and/or REPAIR towards the mixture's members; returns the metrics.

        Raises:
            IncompatibleCheckpoints: ``weights`` do not fit the model.
            SourceError, CheckpointError: ``weights`` name a checkpoint that cannot be found or read.
        """
        members, coefs = self._members or (None, None)
        self._members = None  # told for one call only
        if weights is not None:
            if members is None:
                i = self.member_of(weights)
                members = None if i is None else [i]
            self.load(weights)
        self.fix(members, coefs)
        return super().__call__()

    def fixed_weights(self, weights: Source, members: Sequence[int] | None = None,
                      coefficients: Sequence[float] | None = None) -> StateDict:
        """The weights as evaluated: loaded, fixed, and copied out of the model (to save what was scored).

        Raises:
            IncompatibleCheckpoints: ``weights`` do not fit the model.
            SourceError, CheckpointError: ``weights`` name a checkpoint that cannot be found or read.
        """
        self.load(weights)
        self.fix(members, coefficients)
        out = StateDict({k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()})
        prov = dict(getattr(weights, "provenance", None) or {})
        prov.update({k: v for k, v in self.fixes.items() if v is not None})
        out.provenance = prov
        return out


def fix_evaluator(evaluator: Evaluator, ingredients: Sequence[Source] = (), *,
                  recalibrate_bn: TensorData | None = None, repair: TensorData | None = None,
                  progress: bool = False) -> Evaluator:
    """``evaluator`` itself when there is nothing to fix, else a FixedEvaluator sharing its model and data.

    Raises:
        ConfigError: REPAIR asked for without ingredients, empty ``repair`` data, or a model with nothing REPAIR
            can correct.
    """
    if recalibrate_bn is None and repair is None:
        return evaluator
    return FixedEvaluator.wrap(evaluator, ingredients, recalibrate_bn=recalibrate_bn, repair=repair, progress=progress)
