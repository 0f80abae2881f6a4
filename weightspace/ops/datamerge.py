"""The registry entries of the merges that need data: Fisher merging and RegMean.

They are not formulas on the weights alone, so the engine cannot run them: ``weightspace.search.fisher`` and
``weightspace.search.regmean`` compute them with a model and data (``weightspace merge --method fisher|regmean
--model M --train DATA``). Registered here, beside the other merge methods, so that ``weightspace methods``, the
CLI's choices and the docs list them.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import Entry, Paper
from .merge import MergeMethod, MergePlan, register

__all__ = ["FISHER_PAPER", "REGMEAN_PAPER", "Fisher", "RegMean", "DataMerge"]

FISHER_PAPER = Paper("Matena & Raffel", 2022, "Merging Models with Fisher-Weighted Averaging", "NeurIPS 2022",
                     "https://arxiv.org/abs/2111.09832")
REGMEAN_PAPER = Paper("Jin et al.", 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
                      "ICLR 2023", "https://arxiv.org/abs/2212.09849")


class DataMerge(MergeMethod):
    """A merge that needs a model and data; the engine refuses it with a pointer to the function that runs it."""

    needs_data = True
    runner = ""

    def __init__(self, **options: object):
        self.options = options

    def prepare(self, plan: MergePlan) -> dict:
        raise ConfigError(f"{self.name}: needs a model and data: `weightspace merge --method {self.name} --model M "
                          f"--train DATA MODELS...` or {self.runner}")

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        raise ConfigError(f"{self.name}: needs a model and data")


@register(Entry("merge", "fisher", "Fisher merging",
                "θ_i = Σ_t F_{t,i}·θ_{t,i} / Σ_t F_{t,i},  F_t = E_x Σ_y p_t(y|x)·(∂ log p_t(y|x)/∂θ)²",
                "each parameter averaged with weights from each model's diagonal Fisher information on data",
                FISHER_PAPER, {"fisher_floor": 1e-6, "empirical": False}))
class Fisher(DataMerge):
    """Fisher merging (Matena & Raffel 2022); runs in ``weightspace.search.fisher.fisher_merge``."""

    runner = "weightspace.search.fisher.fisher_merge"


@register(Entry("merge", "regmean", "RegMean",
                "Wᵀ = (Σ_t G̃_t)⁻¹·Σ_t G̃_t·W_tᵀ,  G̃_t = α·X_tᵀX_t/n + (1−α)·diag  (linear layers; the rest averaged)",
                "linear layers merged in closed form from the Gram matrices of their inputs on data, other tensors "
                "averaged", REGMEAN_PAPER, {"alpha": 0.9}))
class RegMean(DataMerge):
    """RegMean (Jin et al. 2023); runs in ``weightspace.search.regmean.regmean_merge``."""

    runner = "weightspace.search.regmean.regmean_merge"
