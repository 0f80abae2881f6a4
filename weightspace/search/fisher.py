"""Fisher merging (Matena & Raffel 2022): each parameter averaged with weights from each model's diagonal Fisher
information, estimated on data.

θ*_i = Σ_t w_t·F_{t,i}·θ_{t,i} / Σ_t w_t·F_{t,i},  F_{t,i} = E_x Σ_y p_t(y|x)·(∂ log p_t(y|x)/∂θ_i)²

The Fisher is the exact expectation over the model's own predictive distribution (every class, weighted by its
probability; ``empirical=True`` uses the data's labels instead, one gradient per example), computed with per-example
gradients (torch.func) in batches. Models are visited one at a time: memory holds the module, one model's Fisher and
two model-sized accumulators (Σ w·F·θ and Σ w·F), whatever the number of models. Floating buffers (BatchNorm
statistics) have no Fisher and are averaged with the weights; integer buffers take the largest value, as every op.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from ..eval.data import TensorData
from ..io.checkpoint import Source
from ..io.outputs import StateDict, finish_provenance
from ..io.sources import load
from ..ops.engine import finite_scalar
from ..ops.datamerge import FISHER_PAPER

__all__ = ["FISHER_PAPER", "diagonal_fisher", "fisher_merge"]



def diagonal_fisher(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], data: TensorData, *,
                    empirical: bool = False, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``module`` with ``state_dict`` loaded, on ``data`` (mean over its examples), per
    parameter name (float64). The module is put in eval mode (the Fisher of the deployed model).

    Raises:
        ConfigError: empty data, or a ``batch_size`` < 1.
    """
    from torch.func import functional_call, grad, vmap
    if len(data) == 0 or batch_size < 1:
        raise ConfigError(f"{data.name}: the Fisher needs at least one example and batch_size ≥ 1")
    module.load_state_dict(dict(state_dict))
    module.eval()
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def logp(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(out, dim=-1)[0].gather(0, y.view(1))[0]

    per_example = vmap(grad(logp), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    with torch.no_grad():
        probe = module(data.prepare(data.x[:1]))
    classes = probe.shape[-1]
    for start in range(0, len(data), batch_size):
        xb = data.prepare(data.x[start:start + batch_size])
        if empirical:
            g = per_example(params, xb, data.y[start:start + batch_size])
            for k in total:
                total[k] += g[k].double().pow(2).sum(0)
            continue
        with torch.no_grad():
            probs = torch.softmax(module(xb), dim=-1).double()
        for c in range(classes):
            g = per_example(params, xb, torch.full((len(xb),), c, dtype=torch.long))
            for k in total:
                w = probs[:, c].view(-1, *[1] * params[k].dim())
                total[k] += (w * g[k].double().pow(2)).sum(0)
    return {k: v / len(data) for k, v in total.items()}


def fisher_merge(models: Sequence[Source], module: torch.nn.Module, data: TensorData | Sequence[TensorData], *,
                 weights: Sequence[float] | None = None, fisher_floor: float = 1e-6, empirical: bool = False,
                 batch_size: int = 256) -> StateDict:
    """Fisher-weighted average of ``models`` (same architecture as ``module``): each model's Fisher from ``data``
    (one dataset for all, or one per model, as the paper takes each model's own task data). ``fisher_floor`` is
    added to every Fisher entry (the paper's 1e-6), so a parameter no model is sensitive to is plainly averaged.

    Raises:
        ConfigError: no models, weights or datasets that do not match the models, a weight ≤ 0, a negative floor.
        CheckpointError, IncompatibleCheckpoints: unreadable or mismatched models.
    """
    if not models:
        raise ConfigError("fisher: needs at least one model")
    cks = [load(m) for m in models]
    datasets = [data] * len(cks) if isinstance(data, TensorData) else list(data)
    w = [1.0] * len(cks) if weights is None else [float(x) for x in weights]
    if len(datasets) != len(cks) or len(w) != len(cks):
        raise ConfigError(f"fisher: {len(datasets)} datasets and {len(w)} weights for {len(cks)} models")
    fisher_floor = finite_scalar(fisher_floor, "fisher_floor")
    if any(not (x > 0 and math.isfinite(x)) for x in w) or fisher_floor < 0:
        raise ConfigError("fisher: weights must be positive and fisher_floor ≥ 0")
    num: dict[str, torch.Tensor] = {}
    den: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for ck, ds, wt in zip(cks, datasets, w):
        sd = ck.materialise()
        fisher = diagonal_fisher(module, sd, ds, empirical=empirical, batch_size=batch_size)
        for k, v in sd.items():
            if not v.is_floating_point():
                first[k] = v if k not in first else torch.maximum(first[k], v)
                continue
            f = fisher[k] + fisher_floor if k in fisher else torch.ones_like(v, dtype=torch.float64)
            num[k] = num.get(k, 0) + wt * f * v.double()
            den[k] = den.get(k, 0) + wt * f
    ref = {k: cks[0][k] for k in cks[0]}
    out = StateDict({k: (num[k] / den[k]).to(ref[k].dtype) if k in num else first[k] for k in ref})
    prov = {"op": "fisher", "method": "fisher", "weights": w, "fisher_floor": fisher_floor,
            "fisher": "empirical" if empirical else "exact expectation over the model's predictions",
            "data": [d.name for d in datasets],
            "ingredients": [{"source": c.source, "weight": x} for c, x in zip(cks, w)]}
    out.provenance = finish_provenance(prov, cks)
    return out
