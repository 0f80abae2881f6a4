"""Learned soups (Wortsman et al. 2022, "Model soups", the learned-soup variant): mixing coefficients optimised on
validation data by gradient descent through the mixed weights.

θ = Σ_i softmax(a)_i · θ_i with one logit a_i per ingredient, or with ``by_layer=True`` one vector of logits per
floating tensor (θ_k = Σ_i softmax(a_k)_i · θ_{i,k}). The loss (cross-entropy, or binary cross-entropy for
multi-label data) of the model with the mixed weights is differentiated with respect to the logits through
``torch.func.functional_call``; the model itself is never modified. The logits start at zero (the uniform soup)
and are optimised with Adam.

Memory: unlike the streamed soups, every ingredient's floating tensors are held in memory (on the evaluation
device, float32), because the gradient with respect to a coefficient needs the ingredient's weights: N
ingredients cost N models of memory, plus one mixed model and its activations for the backward pass.
Floating buffers (BatchNorm running statistics) are mixed with the same coefficients. The model runs in eval
mode, as the saved soup will; since torch's ``batch_norm`` kernel has no gradient with respect to the running
statistics, BatchNorm layers are computed by the same formula in plain tensor ops during the optimisation, so the
gradient includes the statistics' dependence on the coefficients (without it the descent direction is wrong and
the loss can rise). Integer and bool buffers (e.g. ``num_batches_tracked``) are taken from the first ingredient.
"""
from __future__ import annotations

import contextlib
import math
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..io.checkpoint import Source
from ..io.sources import load
from ..eval.data import TensorData
from ..errors import ConfigError, misfit
from ..io.outputs import StateDict, finish_provenance
from ..ops.engine import check_compatible
from ..ops.stream import SOUPS_PAPER
from ..registry import Entry, register
from .result import SearchResult

__all__ = ["LearnedSoupResult", "differentiable_batchnorm", "learned_soup"]


@dataclass
class LearnedSoupResult:
    """The learned coefficients and how the optimisation went."""

    sources: list[str]
    coefficients: list[float]                     # per ingredient (by_layer: the mean over tensors)
    by_tensor: dict[str, list[float]] | None      # by_layer: tensor name → coefficient per ingredient
    history: list[dict] = field(default_factory=list)  # {"step", "loss"} of every step's batch
    val_uniform: dict = field(default_factory=dict)    # {"loss", "accuracy"} of the uniform soup on all of val
    val_learned: dict = field(default_factory=dict)    # the same for the learned soup

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"sources": self.sources, "coefficients": self.coefficients, "by_tensor": self.by_tensor,
                "val_uniform": self.val_uniform, "val_learned": self.val_learned,
                "loss_first": self.history[0]["loss"] if self.history else None,
                "loss_last": self.history[-1]["loss"] if self.history else None, "steps": len(self.history)}

    def table(self) -> tuple[list[str], list[list]]:
        """One row per ingredient: its source and learned coefficient."""
        return ["source", "coefficient"], [[s, c] for s, c in zip(self.sources, self.coefficients)]

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """learned.png: the training loss of every step's batch."""
        import weightspace.report as report
        fig = report.line_panels([{"xlabel": "step", "ylabel": "loss", "title": "learned soup",
                                   "series": [{"x": [h["step"] for h in self.history],
                                               "y": [h["loss"] for h in self.history], "marker": ""}]}])
        return report.save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """learned.json (``extra`` and the result), learned.csv (coefficients) and learned.png (loss) in ``folder``."""
        import weightspace.report as report
        return report.write_files(folder, {"json": ("learned.json", {**(extra or {}), **self.to_dict()}),
                                           "csv": ("learned.csv", self.table()), "png": ("learned.png", self.plot)},
                                  force=force)


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel else F.cross_entropy(logits, y)


def _correct(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    if multilabel:
        return float(((logits > 0) == (y > 0.5)).double().mean(1).sum())
    return float((logits.argmax(1) == y).sum())


def _bn_eval(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in eval mode in plain tensor ops: differentiable in the running statistics too."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


@contextlib.contextmanager
def differentiable_batchnorm(model: nn.Module) -> Iterator[None]:
    """Run the model's BatchNorm layers (with running statistics) through ``_bn_eval`` inside the block."""
    patched = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.running_mean is not None and "forward" not in m.__dict__]
    for m in patched:
        m.forward = types.MethodType(_bn_eval, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _step_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int | None,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each optimisation step's batch: all of (x, y) when ``batch_size`` is None (or covers it), else the next
    slice of a seeded shuffle, reshuffled when too few examples remain for a whole batch."""
    n = len(y)
    bs = n if batch_size is None else max(1, min(int(batch_size), n))
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=g), 0
    while True:
        if bs == n:
            yield x, y
            continue
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + bs].to(x.device)
        pos += bs
        yield x[idx], y[idx]


def learned_soup(ingredients: Sequence[Source], model: nn.Module, val: TensorData, *, by_layer: bool = False,
                 steps: int = 100, lr: float = 0.05, batch_size: int | None = None, seed: int = 0,
                 eval_batch_size: int = 256, progress: bool = False) -> SearchResult[LearnedSoupResult]:
    """Learn softmax-normalised mixing coefficients on ``val``; returns the soup (``.weights``, a state dict with
    provenance) and the optimisation's record (``.record``); it unpacks as ``soup, record``.

    ``model`` is the architecture (its own weights are not used or changed); the ingredients' tensors are moved
    to its device. ``batch_size`` None (default) optimises on the whole validation set at every step; else each
    step takes the next batch of a seeded shuffle. ``steps`` Adam steps at learning rate ``lr``.

    Raises:
        ConfigError: no ingredients, empty ``val``, or negative ``steps`` or a learning rate that is not positive.
        IncompatibleCheckpoints: the ingredients differ from each other or lack keys of ``model``.
        CheckpointError, SourceError: an ingredient cannot be read.
    """
    if not ingredients:
        raise ConfigError("learned soup: needs at least one ingredient")
    if steps < 0 or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"learned soup: steps {steps}, lr {lr}: need steps ≥ 0 and a positive learning rate")
    if len(val) == 0:
        raise ConfigError(f"learned soup: validation data {val.name} is empty")
    cks = [load(s) for s in ingredients]
    check_compatible(cks)
    dev = next(model.parameters(), torch.empty(0)).device  # a model without parameters: the CPU
    want = model.state_dict()
    missing = sorted(set(want) - set(cks[0]))
    if missing:
        raise misfit(cks[0].source, missing)
    keys = [k for k in want]
    dtypes = {k: cks[0].info(k)[0] for k in keys}
    floats = [k for k in keys if dtypes[k].is_floating_point]
    # Every ingredient's floating tensors, stacked along a new first axis: the gradient needs all of them.
    stacks = {k: torch.stack([ck[k].to(dev, torch.float32) for ck in cks]) for k in floats}
    fixed = {k: cks[0][k].to(dev) for k in keys if k not in stacks}
    n = len(cks)
    logits = torch.zeros((len(floats), n) if by_layer else (n,), device=dev, requires_grad=True)

    def mixed(weights: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(fixed)
        for j, k in enumerate(floats):
            w = weights[j] if by_layer else weights
            s = stacks[k]
            out[k] = (s * w.view(-1, *([1] * (s.dim() - 1)))).sum(0)
        return out

    def coefficients() -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    x_all, y_all = val.prepare(val.x.to(dev)), val.y.to(dev)
    was_training = model.training
    model.eval()  # BatchNorm uses the mixed running statistics, as the saved soup will

    def evaluate(weights: torch.Tensor) -> dict:
        total, correct = 0.0, 0.0
        with torch.no_grad():
            w = mixed(weights)
            for i in range(0, len(val), eval_batch_size):
                xb, yb = x_all[i:i + eval_batch_size], y_all[i:i + eval_batch_size]
                out = torch.func.functional_call(model, w, (xb,))
                total += float(_loss(out, yb, val.multilabel)) * len(yb)
                correct += _correct(out, yb, val.multilabel)
        return {"loss": total / len(val), "accuracy": correct / len(val)}

    history: list[dict] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(differentiable_batchnorm(model))
        stack.callback(model.train, was_training)
        uniform = evaluate(coefficients().detach())
        opt = torch.optim.Adam([logits], lr=lr)
        batches = _step_batches(x_all, y_all, batch_size, seed)
        from ..progress import progress as progress_bar
        for step in progress_bar(range(steps), desc="learned soup", unit="step", enabled=progress):
            xb, yb = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = _loss(torch.func.functional_call(model, mixed(coefficients()), (xb,)), yb, val.multilabel)
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "loss": float(loss.detach())})
        final = coefficients().detach()
        learned = evaluate(final)

    coef = final.cpu().double()
    per_ingredient = (coef.mean(0) if by_layer else coef).tolist()
    by_tensor = {k: coef[j].tolist() for j, k in enumerate(floats)} if by_layer else None
    soup = StateDict()
    with torch.no_grad():
        w = mixed(final)
        for k in keys:
            soup[k] = w[k].to("cpu", dtypes[k]) if k in stacks else cks[0][k].clone()
    result = LearnedSoupResult([c.source for c in cks], per_ingredient, by_tensor, history, uniform, learned)
    prov = {"op": "learned_soup", "coefficients": per_ingredient, "by_layer": by_layer, "steps": steps, "lr": lr,
            "batch_size": batch_size, "seed": seed, "val": val.name, "val_uniform": uniform, "val_learned": learned,
            "ingredients": [{"source": c.source, "coefficient": w_} for c, w_ in zip(cks, per_ingredient)],
            "weightspace_version": __version__}
    if by_layer:
        prov["coefficients_by_tensor"] = by_tensor
    soup.provenance = finish_provenance(prov, cks)
    return SearchResult(soup, result)


register(Entry("op", "learned-soup", "Learned soup", "θ = Σ_i softmax(β)_i·θ_i,  β minimising the validation loss",
               "softmax-normalised mixing coefficients (one per ingredient, or per ingredient and tensor) optimised "
               "on held-out validation data by gradient descent", SOUPS_PAPER,
               {"steps": 100, "lr": 0.05, "by_layer": False, "seed": 0}, target=learned_soup))
