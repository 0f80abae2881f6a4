"""Sparsifying merges: breadcrumbs, SCE, DARE (linear, TIES) and DELLA, formulas on the engine.

Each sparsifies every task vector tensor by tensor (whole tensors: a quantile, a rank or a random mask must not
depend on how the engine splits a tensor into pieces), then mixes them as mergekit's generalized task arithmetic
does: a plain sum, or a TIES sign election (``consensus``: the sign of Σ_t τ_t, + on a tie, keeping only entries
that agree), divided by the summed weights when ``normalize``. The random methods draw their masks from a
counter-based stream keyed by (seed, tensor name, model index), so the bytes are the same for the same seed and
inputs on any number of threads and with any memory budget.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from ..errors import ConfigError
from ..registry import Entry, Paper
from .merge import MergeMethod, MergePlan, register
from .spherical import plain_models

__all__ = ["BREADCRUMBS_PAPER", "SCE_PAPER", "DARE_PAPER", "DELLA_PAPER", "Sparsified", "Breadcrumbs", "Sce",
           "DareLinear", "DareTies", "Della", "DellaLinear", "uniform_stream"]

BREADCRUMBS_PAPER = Paper("Davari & Belilovsky", 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with "
                          "Sparse Masks", "ECCV 2024", "https://arxiv.org/abs/2312.06795")
SCE_PAPER = Paper("Wan et al.", 2024, "FuseChat: Knowledge Fusion of Chat Models", "arXiv 2408.07990",
                  "https://arxiv.org/abs/2408.07990")
DARE_PAPER = Paper("Yu et al.", 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models "
                   "as a Free Lunch", "ICML 2024", "https://arxiv.org/abs/2311.03099")
DELLA_PAPER = Paper("Deep et al.", 2024, "DELLA-Merging: Reducing Interference in Model Merging through "
                    "Magnitude-Based Sampling", "arXiv 2406.11617", "https://arxiv.org/abs/2406.11617")

RESCALES = ("inverse", "l1", "none")


def uniform_stream(seed: int, key: str, index: int, n: int) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1) (float64, on the CPU) drawn from a generator seeded by a hash of (seed, key,
    model index): the same numbers on any thread count, whatever else was drawn before."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(n, generator=g, dtype=torch.float64)


def _per_model(value: float | Sequence[float], n: int, name: str, param: str) -> list[float]:
    vals = [value] if isinstance(value, (int, float)) else list(value)
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise ConfigError(f"{name}: {len(vals)} values of {param} for {n} models", param=param)
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{name}: {param}={v!r} must be a finite number (per-layer gradients are not "
                              f"supported)", param=param)
        out.append(float(v))
    return out


def _rescale(tau: torch.Tensor, kept: torch.Tensor, rule: str, prob: torch.Tensor | float) -> torch.Tensor:
    """Rescale the kept entries: by 1/p (``inverse``, the papers' unbiased rule), to the tensor's L1 norm before
    dropping (``l1``, mergekit's ``rescale: true``; left alone when either norm is under 1e-7) or not at all."""
    masked = tau * kept
    if rule == "inverse":
        return masked / prob
    if rule == "l1":
        before, after = float(tau.abs().sum()), float(masked.abs().sum())
        if before < 1e-7 or after < 1e-7:
            return masked
        return masked * (before / after)
    return masked


class Sparsified(MergeMethod):
    """Generalized task arithmetic: sparsify each τ_t, mix (sum or TIES sign consensus), optionally normalise."""

    consensus: bool = False
    tuned = "density"

    def __init__(self, density: float | Sequence[float], normalize: bool, rescale: bool | str = "none",
                 seed: int = 0):
        self.density_option = density
        self.normalize = bool(normalize)
        rule = {True: "l1", False: "none"}.get(rescale, rescale) if isinstance(rescale, bool) else str(rescale)
        if rule not in RESCALES:
            raise ConfigError(f"{self.name}: rescale={rescale!r}: expected one of {', '.join(RESCALES)} (or a bool)",
                              param="rescale")
        self.rescale = rule
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{self.name}: seed={seed!r} must be an integer", param="seed")
        self.seed = seed
        self.densities: list[float] = []

    def whole_tensor(self, key: str) -> bool:
        return True

    def prepare(self, plan: MergePlan) -> dict:
        self.plan = plan
        n = len(plan.models)
        self.densities = _per_model(self.density_option, n, self.name, "density")
        for d in self.densities:
            if not 0.0 <= d <= 1.0:
                raise ConfigError(f"{self.name}: density {d}: must be a fraction in [0, 1]", param="density")
        self.mix_weights = [s * w for s, w in zip(plan.signs, plan.weights or [1.0] * n)]
        return {"density": self.densities, "normalize": self.normalize, "rescale": self.rescale,
                **({"seed": self.seed} if self.random else {})}

    random = False

    def sparsify(self, key: str, i: int, tau: torch.Tensor) -> torch.Tensor:
        """Task vector ``i`` of ``key`` (flat), sparsified."""
        raise NotImplementedError

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        taus = [self.sparsify(key, i, t) if self.densities[i] < 1.0 else t for i, t in enumerate(taus)]
        w = self.mix_weights
        if not self.consensus:
            mixed = taus[0].clone()
            for t in taus[1:]:
                mixed.add_(t)
            if self.normalize:
                wsum = sum(w)
                mixed.div_(wsum if abs(wsum) >= 1e-8 else 1.0)
            return mixed
        total = torch.stack(taus).sum(dim=0)
        majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for t, wi in zip(taus, w):
            agree = (torch.sign(t) == majority).to(t.dtype)
            mixed.add_(t * agree)
            divisor.add_(agree, alpha=wi)
        if self.normalize:
            mixed.div_(torch.where(divisor == 0, torch.ones_like(divisor), divisor))
        return mixed

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.plan.base.info(key)[1])


@register(Entry("merge", "breadcrumbs", "Model Breadcrumbs",
                "θ = θ_base + λ·Σ_t m_t⊙τ_t,  m_t drops the largest γ and the smallest 1−density−γ of |τ_t| per tensor",
                "each task vector's largest outliers and smallest entries dropped tensor by tensor, then summed",
                BREADCRUMBS_PAPER, {"scale": 1.0, "density": 0.9, "gamma": 0.01, "normalize": False}))
class Breadcrumbs(Sparsified):
    """Model Breadcrumbs as mergekit's ``breadcrumbs``: per tensor, drop the int(γ·n) largest magnitudes and then
    the smallest ones, keeping int(density·n) entries; no rescaling."""

    def __init__(self, density: float | Sequence[float] | None = None, gamma: float | Sequence[float] | None = None,
                 normalize: bool | None = None):
        d = self.entry.defaults
        super().__init__(d["density"] if density is None else density, d["normalize"] if normalize is None else normalize)
        self.gamma_option = d["gamma"] if gamma is None else gamma

    def prepare(self, plan: MergePlan) -> dict:
        out = super().prepare(plan)
        self.gammas = _per_model(self.gamma_option, len(plan.models), self.name, "gamma")
        if any(not 0.0 <= g <= 1.0 for g in self.gammas):
            raise ConfigError("breadcrumbs: gamma must be a fraction in [0, 1]", param="gamma")
        return {**out, "gamma": self.gammas}

    def sparsify(self, key: str, i: int, tau: torch.Tensor) -> torch.Tensor:
        n = tau.numel()
        keep = int(self.densities[i] * n)
        top = int(self.gammas[i] * n)
        bottom = n - keep - top
        if bottom < 0:
            top, bottom = top + bottom, 0
        order = torch.sort(tau.abs().float(), stable=True).indices
        mask = torch.zeros_like(tau)
        mask[order[bottom:n - top]] = 1
        return tau.mul_(mask)


@register(Entry("merge", "sce", "SCE (select, calculate, erase)",
                "θ = θ_base + λ·Σ_t w_t·m_t⊙τ_t / Σ_t w_t·m_t,  w_t ∝ mean(τ_t²), m_t: sign agrees with Σ_t τ_t",
                "the entries of highest variance across task vectors selected, each task vector weighted by its mean "
                "square, signs elected, a weighted mean of the agreeing entries", SCE_PAPER,
                {"scale": 1.0, "select_topk": 1.0}))
class Sce(MergeMethod):
    """SCE as mergekit's ``sce``: per tensor, keep the ``select_topk`` fraction of entries of largest variance
    across the task vectors (of those with non-zero variance), weight each task vector by its mean square
    (normalised to sum 1), elect signs, and take the weighted mean of the agreeing entries."""

    tuned = "select_topk"

    def __init__(self, select_topk: float | None = None):
        v = self.entry.defaults["select_topk"] if select_topk is None else select_topk
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"sce: select_topk={v!r} must be one finite number", param="select_topk")
        self.select_topk = float(v)

    def whole_tensor(self, key: str) -> bool:
        return True

    def prepare(self, plan: MergePlan) -> dict:
        plain_models(plan, "sce")
        return {"select_topk": self.select_topk}

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        tv = torch.stack(taus)
        if self.select_topk < 1:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * self.select_topk) if self.select_topk > 0 else 0
            mask = torch.zeros_like(var)
            if k > 0:
                mask[torch.topk(var.abs(), k=k, largest=True).indices] = 1
            tv = tv * mask
        majority = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0).to(tv.dtype)
        erase = (torch.sign(tv) == majority).to(tv.dtype)
        w = (tv ** 2).mean(dim=1)
        total = float(w.sum())
        w = torch.full_like(w, 1.0 / len(taus)) if abs(total) < 1e-6 else w / total
        ew = w.unsqueeze(1) * erase
        return (tv * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)


class _Dare(Sparsified):
    """DARE: keep each entry with probability ``density`` (a seeded Bernoulli mask), rescale the kept entries."""

    random = True

    def __init__(self, density: float | Sequence[float] | None = None, normalize: bool | None = None,
                 rescale: bool | str | None = None, seed: int = 0):
        d = self.entry.defaults
        super().__init__(d["density"] if density is None else density, d["normalize"] if normalize is None else normalize,
                         d["rescale"] if rescale is None else rescale, seed)

    def sparsify(self, key: str, i: int, tau: torch.Tensor) -> torch.Tensor:
        p = self.densities[i]
        kept = (uniform_stream(self.seed, key, i, tau.numel()) < p).to(device=tau.device, dtype=tau.dtype)
        return _rescale(tau, kept, self.rescale, p) if p > 0 else tau.zero_()


_DARE_DEFAULTS = {"scale": 1.0, "density": 0.5, "rescale": "inverse", "seed": 0}


@register(Entry("merge", "dare-linear", "DARE (linear)",
                "θ = θ_base + λ·Σ_t w_t·(m_t⊙τ_t)/density,  m_t ~ Bernoulli(density) per entry",
                "each task vector's entries dropped at random (kept with probability density) and the rest rescaled, "
                "then summed", DARE_PAPER, {**_DARE_DEFAULTS, "normalize": False}))
class DareLinear(_Dare):
    """DARE with a plain (optionally normalised) sum, mergekit's ``dare_linear``."""


@register(Entry("merge", "dare-ties", "DARE-TIES",
                "θ = θ_base + λ·Σ_t agree_t⊙w_t·(m_t⊙τ_t)/density,  agree_t: sign agrees with the elected sign",
                "each task vector's entries dropped at random and rescaled, then TIES sign election and sum",
                DARE_PAPER, {**_DARE_DEFAULTS, "normalize": False}))
class DareTies(_Dare):
    """DARE with TIES's sign consensus, mergekit's ``dare_ties``."""

    consensus = True


class _Della(Sparsified):
    """DELLA's MagPrune: keep probability rising linearly with the magnitude's rank in each row, from
    density − ε to density + ε; kept entries rescaled."""

    random = True

    def __init__(self, density: float | Sequence[float] | None = None, epsilon: float | None = None,
                 normalize: bool | None = None, rescale: bool | str | None = None, seed: int = 0):
        d = self.entry.defaults
        super().__init__(d["density"] if density is None else density, d["normalize"] if normalize is None else normalize,
                         d["rescale"] if rescale is None else rescale, seed)
        self.epsilon_option = d["epsilon"] if epsilon is None else epsilon

    def prepare(self, plan: MergePlan) -> dict:
        out = super().prepare(plan)
        self.epsilons = _per_model(self.epsilon_option, len(plan.models), self.name, "epsilon")
        for d, e in zip(self.densities, self.epsilons):
            if d < 1.0 and not (0 < d - e and d + e < 1):
                raise ConfigError(f"{self.name}: density {d:g} ± epsilon {e:g} must stay inside (0, 1)",
                                  param="epsilon")
        return {**out, "epsilon": self.epsilons}

    def sparsify(self, key: str, i: int, tau: torch.Tensor) -> torch.Tensor:
        shape = self._shape(key)
        t = tau.view(*shape) if len(shape) >= 2 else tau.view(1, -1)
        ranks = torch.argsort(torch.argsort(t.abs(), dim=1, stable=True), dim=1).to(t.dtype) + 1
        lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        norm = ((ranks - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.0)  # a one-entry row: its lowest rank
        probs = (self.densities[i] - self.epsilons[i]) + norm * 2 * self.epsilons[i]
        u = uniform_stream(self.seed, key, i, tau.numel()).to(device=tau.device, dtype=t.dtype).view_as(t)
        kept = (u < probs).to(t.dtype)
        return _rescale(t, kept, self.rescale, probs).reshape(-1)


_DELLA_DEFAULTS = {"scale": 1.0, "density": 0.5, "epsilon": 0.15, "rescale": "inverse", "seed": 0}


@register(Entry("merge", "della", "DELLA",
                "θ = θ_base + λ·Σ_t agree_t⊙w_t·(m_t⊙τ_t)/p_t / Σ_t agree_t·w_t,  m_t ~ Bernoulli(p_t), "
                "p_t = density − ε + 2ε·rank(|τ_t|)",
                "magnitude-ranked random drops (larger entries kept more often), rescaled, TIES sign election and a "
                "weighted mean", DELLA_PAPER, {**_DELLA_DEFAULTS, "normalize": True}))
class Della(_Della):
    """DELLA with sign consensus and normalisation, mergekit's ``della``."""

    consensus = True


@register(Entry("merge", "della-linear", "DELLA (linear)",
                "θ = θ_base + λ·Σ_t w_t·(m_t⊙τ_t)/p_t,  m_t ~ Bernoulli(p_t), p_t = density − ε + 2ε·rank(|τ_t|)",
                "magnitude-ranked random drops, rescaled, then summed", DELLA_PAPER,
                {**_DELLA_DEFAULTS, "normalize": False}))
class DellaLinear(_Della):
    """DELLA with a plain sum, mergekit's ``della_linear``."""
