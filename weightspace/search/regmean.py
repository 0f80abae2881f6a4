"""RegMean (Jin et al. 2023): merge linear layers in closed form from the Gram matrices of their inputs.

For a linear layer y = x·Wᵀ, the weights minimising Σ_t ‖X_t·Wᵀ − X_t·W_tᵀ‖² (each model's own inputs X_t to that
layer, on its data) are

Wᵀ = (Σ_t G̃_t)⁻¹ · Σ_t G̃_t·W_tᵀ,  G_t = X_tᵀX_t / n_t,  G̃_t = α·G_t + (1−α)·diag(G_t)

with α (``alpha``, the paper's off-diagonal scale; 1 is the plain regression) shrinking the off-diagonal terms.
Every other floating tensor (biases, norms, convolutions) is averaged; integer buffers take the largest value.
Models are visited one at a time: memory holds the module and, per linear layer, Σ G̃ and Σ G̃·Wᵀ (in×in and
in×out, float64), whatever the number of models.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..eval.data import TensorData
from ..io.checkpoint import Source
from ..io.outputs import StateDict, finish_provenance
from ..io.sources import load
from ..ops.engine import finite_scalar
from ..ops.datamerge import REGMEAN_PAPER

__all__ = ["REGMEAN_PAPER", "input_grams", "regmean_merge"]



def input_grams(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], data: TensorData, *,
                batch_size: int = 256) -> dict[str, torch.Tensor]:
    """For every ``nn.Linear`` of ``module`` (with ``state_dict`` loaded, in eval mode), XᵀX / n of its inputs on
    ``data`` (float64), keyed by the layer's weight name. Inputs with extra dimensions (tokens) count each row.

    Raises:
        ConfigError: empty data.
    """
    if len(data) == 0:
        raise ConfigError(f"{data.name}: RegMean needs at least one example")
    module.load_state_dict(state_dict)
    module.eval()
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            key = f"{name}.weight" if name else "weight"

            def hook(mod: torch.nn.Module, inputs: tuple, output: torch.Tensor, key: str = key) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                module(data.prepare(data.x[start:start + batch_size]))
    finally:
        for h in hooks:
            h.remove()
    return {k: g / counts[k] for k, g in grams.items()}


def _solve(key: str, gram: torch.Tensor, gw: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W = ((Σ G̃)⁻¹·Σ G̃·Wᵀ)ᵀ over the input dimensions that ever vary from zero; an input that is always zero
    (a blank pixel) leaves its column unconstrained, and it takes the models' mean there."""
    active = torch.diagonal(gram) > 0
    out = mean.clone()
    if bool(active.any()):
        try:
            sol = torch.linalg.solve(gram[active][:, active], gw[active])
        except RuntimeError:
            raise ConfigError(f"regmean: the Gram matrix of {key!r} is singular (its inputs are linearly "
                              f"dependent); use alpha < 1", param="alpha") from None
        out[:, active] = sol.T
    return out


def regmean_merge(models: Sequence[Source], module: torch.nn.Module, data: TensorData | Sequence[TensorData], *,
                  alpha: float = 0.9, batch_size: int = 256) -> StateDict:
    """RegMean of ``models`` (same architecture as ``module``), each model's Gram matrices from ``data`` (one
    dataset for all, or one per model, as the paper takes each model's own training data).

    Raises:
        ConfigError: no models, datasets that do not match the models, ``alpha`` outside [0, 1], or a Gram sum
            that cannot be inverted (a layer whose inputs are all zero with ``alpha`` = 1).
        CheckpointError, IncompatibleCheckpoints: unreadable or mismatched models.
    """
    if not models:
        raise ConfigError("regmean: needs at least one model")
    alpha = finite_scalar(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean: alpha={alpha}: must be in [0, 1]", param="alpha")
    cks = [load(m) for m in models]
    datasets = [data] * len(cks) if isinstance(data, TensorData) else list(data)
    if len(datasets) != len(cks):
        raise ConfigError(f"regmean: {len(datasets)} datasets for {len(cks)} models")
    gram_sum: dict[str, torch.Tensor] = {}
    gw_sum: dict[str, torch.Tensor] = {}
    mean: dict[str, torch.Tensor] = {}
    ints: dict[str, torch.Tensor] = {}
    for ck, ds in zip(cks, datasets):
        sd = ck.materialise()
        for key, g in input_grams(module, sd, ds, batch_size=batch_size).items():
            g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
            gram_sum[key] = gram_sum.get(key, 0) + g
            gw_sum[key] = gw_sum.get(key, 0) + g @ sd[key].double().T
        for k, v in sd.items():
            if v.is_floating_point():
                mean[k] = mean.get(k, 0) + v.double() / len(cks)
            else:
                ints[k] = v if k not in ints else torch.maximum(ints[k], v)
    ref = cks[0]
    out = StateDict()
    for k in ref:
        if k in gram_sum:
            out[k] = _solve(k, gram_sum[k], gw_sum[k], mean[k]).to(ref.info(k)[0])
        elif k in mean:
            out[k] = mean[k].to(ref.info(k)[0])
        else:
            out[k] = ints[k]
    prov = {"op": "regmean", "method": "regmean", "alpha": alpha, "linear_layers": sorted(gram_sum),
            "data": [d.name for d in datasets], "ingredients": [{"source": c.source} for c in cks]}
    out.provenance = finish_provenance(prov, cks)
    return out
