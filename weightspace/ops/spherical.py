"""Merges on the sphere and from angles: slerp, nuslerp, the Karcher mean and Model Stock, formulas on the engine.

Each needs a whole tensor (a norm, an angle between tensors), so each lists every key in ``whole_tensor``; they
see the base θ_pre through ``MergeMethod.delta`` and return δ with θ = θ_pre + λ·δ (λ = 1 by default, so the
result is the method's θ up to one rounding). Numeric rules follow mergekit's code (thresholds, clamps, fallbacks),
so a config means the same in both tools; docs/merge.md lists what differs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError
from ..registry import Entry, Paper
from .merge import MergeMethod, MergePlan, register

__all__ = ["SLERP_PAPER", "KARCHER_PAPER", "MODEL_STOCK_PAPER", "Slerp", "NuSlerp", "Karcher", "ModelStock",
           "plain_models", "slerp_coefficients"]

SLERP_PAPER = Paper("Shoemake", 1985, "Animating rotation with quaternion curves", "SIGGRAPH 1985",
                    "https://doi.org/10.1145/325165.325242")
KARCHER_PAPER = Paper("Karcher", 1977, "Riemannian center of mass and mollifier smoothing",
                      "Communications on Pure and Applied Mathematics 30(5)", "https://doi.org/10.1002/cpa.3160300502")
MODEL_STOCK_PAPER = Paper("Jang et al.", 2024, "Model Stock: All we need is just a few fine-tuned models",
                          "ECCV 2024", "https://arxiv.org/abs/2403.19522")

#: mergekit's slerp: above this |cos θ| the two tensors count as parallel and are interpolated linearly
DOT_THRESHOLD = 0.9995


def plain_models(plan: MergePlan, name: str, count: int | None = None, at_least: int = 1) -> None:
    """Refuse weights and negated models (the method weighs models by its own rule) and a wrong model count.

    Raises:
        ConfigError: weights other than 1, a negated model, or not ``count`` (at least ``at_least``) models.
    """
    if any(w != 1.0 for w in plan.weights):
        raise ConfigError(f"{name}: takes no per-model weights (its formula weighs the models itself)",
                          param="weights")
    if any(s != 1.0 for s in plan.signs):
        raise ConfigError(f"{name}: cannot negate a model", param="negate")
    n = len(plan.models)
    if count is not None and n != count:
        raise ConfigError(f"{name}: needs exactly {count} model{'s' if count > 1 else ''} besides the base, got {n}")
    if n < at_least:
        raise ConfigError(f"{name}: needs at least {at_least} models besides the base, got {n}")


def _fraction(value: float, name: str, param: str) -> float:
    v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(v):
        raise ConfigError(f"{name}: {param}={value!r} must be one finite number (per-layer gradients of {param} "
                          f"are not supported)", param=param)
    return v


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> tuple[float, float]:
    """(s_a, s_b) with slerp(t, a, b) = s_a·a + s_b·b: sin((1−t)θ)/sin θ and sin(tθ)/sin θ for the angle θ between
    a and b (a zero vector, norm ≤ ``eps``, is left unnormalised as mergekit does); (1−t, t) when |cos θ| >
    DOT_THRESHOLD, where the sphere and the chord agree."""
    a64, b64 = a.double(), b.double()
    na, nb = float(a64.norm()), float(b64.norm())
    dot = float(a64 @ b64) / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


class _WholeTensors(MergeMethod):
    """A method that sees every tensor whole and knows its shape."""

    def whole_tensor(self, key: str) -> bool:
        return True

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.plan.base.info(key)[1])

    def prepare(self, plan: MergePlan) -> dict:
        self.plan = plan
        return {}


@register(Entry("merge", "slerp", "SLERP", "θ = sin((1−t)Ω)/sin Ω·θ_base + sin(tΩ)/sin Ω·θ_1,  cos Ω = ⟨θ_base, θ_1⟩/‖θ_base‖‖θ_1‖",
                "spherical interpolation from the base to one model, per tensor (linear where they are parallel)",
                SLERP_PAPER, {"scale": 1.0, "t": 0.5}))
class Slerp(_WholeTensors):
    """Spherical linear interpolation of two models, tensor by tensor: the base at t = 0, the model at t = 1.
    Where |cos Ω| > 0.9995 (mergekit's DOT_THRESHOLD) it falls back to linear interpolation."""

    tuned = "t"

    def __init__(self, t: float | None = None):
        self.t = _fraction(self.entry.defaults["t"] if t is None else t, "slerp", "t")

    def prepare(self, plan: MergePlan) -> dict:
        plain_models(plan, "slerp", count=1)
        super().prepare(plan)
        return {"t": self.t}

    def delta(self, key: str, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        other = taus[0].add(base)
        s0, s1 = slerp_coefficients(self.t, base, other)
        # θ − θ_base = (s0 − 1)·θ_base + s1·θ_1
        return other.mul_(s1).add_(base, alpha=s0 - 1.0)


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, shape: Sequence[int], row_wise: bool,
             flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's nuslerp over flat ``v0``, ``v1`` of a tensor of ``shape``: slerp of whole tensors
    (``flatten``) or of each row along the last dimension (the first with ``row_wise``)."""
    if flatten or len(shape) < 2:
        a, b = v0.view(1, -1), v1.view(1, -1)
    else:
        a, b = v0.view(*shape), v1.view(*shape)
        if row_wise:
            a, b = a.transpose(0, -1), b.transpose(0, -1)
    na = a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    nb = b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((a / na) * (b / nb)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    colinear = (sin.abs() < eps).expand_as(res)
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if row_wise and not flatten and len(shape) >= 2:
        res = res.transpose(0, -1)
    return res.reshape(-1)


@register(Entry("merge", "nuslerp", "NuSLERP",
                "θ = θ_base + slerp(t, τ_1, τ_2) (two models), or slerp(t, θ_base, θ_1) (one model)",
                "spherical interpolation of two task vectors (or of two models), per tensor or per row",
                SLERP_PAPER, {"scale": 1.0, "t": 0.5, "nuslerp_flatten": True, "nuslerp_row_wise": False}))
class NuSlerp(_WholeTensors):
    """mergekit's nuslerp: with two models, slerp of their task vectors added to the base; with one model, slerp
    from the base to it. ``nuslerp_flatten`` (default) takes each tensor as one vector, else each row along the
    last dimension (the first with ``nuslerp_row_wise``); rows with sin Ω < 1e-8 are interpolated linearly."""

    tuned = "t"

    def __init__(self, t: float | None = None, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False):
        self.t = _fraction(self.entry.defaults["t"] if t is None else t, "nuslerp", "t")
        self.flatten, self.row_wise = bool(nuslerp_flatten), bool(nuslerp_row_wise)

    def prepare(self, plan: MergePlan) -> dict:
        plain_models(plan, "nuslerp")
        if len(plan.models) > 2:
            raise ConfigError(f"nuslerp: needs one or two models besides the base, got {len(plan.models)}")
        super().prepare(plan)
        return {"t": self.t, "nuslerp_flatten": self.flatten, "nuslerp_row_wise": self.row_wise}

    def delta(self, key: str, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        shape = self._shape(key)
        if len(taus) == 2:
            return _nuslerp(self.t, taus[0], taus[1], shape, self.row_wise, self.flatten)
        return _nuslerp(self.t, base, taus[0] + base, shape, self.row_wise, self.flatten).sub_(base)


def karcher_mean(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's Karcher mean of flat tensors with equal weights: the Riemannian mean of their directions on
    the unit sphere (fixed-point iteration of the exponential map), scaled by the mean of their norms."""
    alphas = [1.0 / len(points)] * len(points)
    norms = [float(p.norm()) for p in points]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(points[0])
    units = [points[i] / norms[i] for i in valid]
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    u = torch.zeros_like(units[0])
    for ai, ui in zip(a, units):
        u.add_(ui, alpha=ai)
    nu = float(u.norm())
    u = units[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for ai, ui in zip(a, units):
            dot = min(1.0, max(-1.0, float(u @ ui)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            step.add_(ui - dot * u, alpha=ai * theta / math.sin(theta))
        ns = float(step.norm())
        if ns < tol:
            break
        u = math.cos(ns) * u + math.sin(ns) * (step / ns)
        nu = float(u.norm())
        if nu > tol:
            u = u / nu
    return u.mul_(sum(ai * n for ai, n in zip(alphas, norms)))


@register(Entry("merge", "karcher", "Karcher mean",
                "θ = (1/N·Σ_i ‖θ_i‖)·u*,  u* = argmin_u Σ_i d_S(u, θ_i/‖θ_i‖)² on the unit sphere",
                "the Riemannian (Karcher) mean of the directions of all N models (the base included), per tensor, "
                "scaled by their mean norm", KARCHER_PAPER, {"scale": 1.0, "max_iter": 10, "tol": 1e-5}))
class Karcher(_WholeTensors):
    """The Karcher mean of the base and every model, tensor by tensor, as mergekit computes it (``max_iter``
    fixed-point steps, stopping when the step's norm falls under ``tol``)."""

    def __init__(self, max_iter: int | None = None, tol: float | None = None):
        d = self.entry.defaults
        self.max_iter = int(d["max_iter"] if max_iter is None else max_iter)
        self.tol = float(d["tol"] if tol is None else tol)
        if self.max_iter < 0 or not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ConfigError("karcher: max_iter must be ≥ 0 and tol a finite number ≥ 0")

    def prepare(self, plan: MergePlan) -> dict:
        plain_models(plan, "karcher")
        super().prepare(plan)
        return {"max_iter": self.max_iter, "tol": self.tol}

    def delta(self, key: str, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        return karcher_mean([base, *[t.add_(base) for t in taus]], self.max_iter, self.tol).sub_(base)


@register(Entry("merge", "model-stock", "Model Stock",
                "θ = θ_base + λ·t·mean_i τ_i,  t = N·cos θ / (1 + (N−1)·cos θ),  cos θ = mean_{i<j} cos(τ_i, τ_j)",
                "the average of the fine-tunes pulled toward the base by a ratio set per tensor from the angle "
                "between their task vectors", MODEL_STOCK_PAPER, {"scale": 1.0, "filter_wise": False}))
class ModelStock(_WholeTensors):
    """Model Stock (Jang et al. 2024), as mergekit computes it: the mean pairwise cosine of the task vectors per
    tensor (per row along the last dimension with ``filter_wise``) sets t; the result is t·mean + (1−t)·base."""

    def __init__(self, filter_wise: bool | None = None):
        self.filter_wise = bool(self.entry.defaults["filter_wise"] if filter_wise is None else filter_wise)

    def prepare(self, plan: MergePlan) -> dict:
        plain_models(plan, "model-stock", at_least=2)
        super().prepare(plan)
        return {"filter_wise": self.filter_wise}

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        shape = self._shape(key)
        rows = [t.view(*shape) if self.filter_wise and len(shape) >= 2 else t.view(1, -1) for t in taus]
        cos = []
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                norm = rows[i].norm(dim=-1) * rows[j].norm(dim=-1)
                cos.append(((rows[i] * rows[j]).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
        c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        n = len(rows)
        denominator = 1 + (n - 1) * c
        # at cos θ = −1/(N−1) the ratio has no finite value: keep the base there (mergekit 0.1.5's rule)
        singular = denominator.abs() < 1e-6
        ratio = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(c),
                                                                                denominator))
        mean = torch.stack(rows).mean(dim=0)
        return (ratio * mean).reshape(-1)
