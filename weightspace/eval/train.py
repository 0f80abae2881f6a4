"""A small, deterministic training loop for the demo, the recipes and the tests (real training, seconds on a CPU)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import TensorData
from ..errors import ConfigError

__all__ = ["AUGMENTATIONS", "train", "accuracy"]


def _shift(x: torch.Tensor, g: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Random translation by up to ``pixels`` pixels (zero padded), the same shift for a whole batch."""
    if x.ndim < 3:
        return x
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=g))
    out = torch.roll(x, shifts=(dy, dx) if x.ndim == 4 else (dx,), dims=(-2, -1) if x.ndim == 4 else (-1,))
    if x.ndim == 4:
        if dy > 0:
            out[..., :dy, :] = x.min()
        elif dy < 0:
            out[..., dy:, :] = x.min()
    if dx > 0:
        out[..., :dx] = x.min()
    elif dx < 0:
        out[..., dx:] = x.min()
    return out


def _noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise (σ = 0.1)."""
    return x + 0.1 * torch.randn(x.shape, generator=g).to(x.device)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "none": lambda x, g: x, "shift": _shift, "shift2": lambda x, g: _shift(x, g, 2), "noise": _noise,
}


def train(model: nn.Module, data: TensorData, *, epochs: int = 5, lr: float = 0.05, weight_decay: float = 0.0,
          momentum: float = 0.9, batch_size: int = 64, seed: int = 0, augment: str = "none",
          schedule: str = "cosine", eval_data: TensorData | None = None, eval_every: int = 0,
          on_epoch: Callable[[int, nn.Module], bool] | None = None,
          device: str | torch.device | None = None, label_smoothing: float = 0.0) -> list[dict]:
    """Train with SGD + cross-entropy (``label_smoothing`` as in ``F.cross_entropy``); returns a history of {"step", "epoch", "loss"(, "eval_accuracy")}.

    ``on_epoch(epoch, model)`` is called after every epoch (model in eval mode); returning True stops training
    early (the learning-rate schedule still spans ``epochs``). With ``device`` the model is moved there and each
    batch crosses as stored (uint8 images are normalised on the device); the model stays on ``device``.

    Raises:
        ConfigError: an unknown augmentation.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment '{augment}': expected one of {', '.join(AUGMENTATIONS)}")
    aug = AUGMENTATIONS[augment]
    g = torch.Generator().manual_seed(seed)
    if device is not None:
        model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(data)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    history: list[dict] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = data.x[idx], data.y[idx]
            if device is not None:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            xb = aug(data.prepare(xb), g)
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            loss.backward()
            opt.step()
            step += 1
            if eval_every and eval_data is not None and step % eval_every == 0:
                history.append({"step": step, "epoch": epoch, "loss": float(loss.detach()),
                                "eval_accuracy": accuracy(model, eval_data, device=device)})
        history.append({"step": step, "epoch": epoch, "loss": float(loss.detach())})
        if on_epoch is not None:
            model.eval()
            if on_epoch(epoch, model):
                break
    model.eval()
    return history


def accuracy(model: nn.Module, data: TensorData, batch_size: int = 512,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of a model on a dataset (eval mode restored afterwards as it was); batches go to ``device``
    (the model must already be there)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for xb, yb in data.batches(batch_size, device):
            correct += int((model(xb).argmax(1) == yb.to(xb.device)).sum())
    model.train(was)
    return correct / max(len(data), 1)
