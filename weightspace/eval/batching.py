"""The evaluation batch size on the CPU, from a memory budget for activations rather than a fixed number.

A fixed 256 is harmless for 8×8 digits and ruinous for a ResNet-50 at 224×224 (gigabytes of activations per
batch). Inference frees each activation once the next layer has read it, so what a batch holds at its peak is
about the widest layer's input and output plus a residual branch kept for later: one probe forward pass of two
examples measures the largest module output, and one example is taken to need its input plus ``PEAK_FACTOR`` times
that output. The batch is the largest that keeps a batch under the budget, between 1 and ``MAX_BATCH``. On a GPU the batch stays ``MAX_BATCH``
(its memory is the device's, and a larger batch there is mostly speed).
"""
from __future__ import annotations

import torch
from torch import nn

from .data import TensorData

__all__ = ["MAX_BATCH", "ACTIVATION_BUDGET", "PEAK_FACTOR", "activation_bytes", "auto_batch_size"]

MAX_BATCH = 256  # the cap, and the GPU default (the fixed default before the budget)
# Bytes a CPU batch's activations may take. A constant, not a share of the memory free now: the batch size must be
# the same on every run and every torchrun rank (shards are cut in whole batches), so the metrics are too.
ACTIVATION_BUDGET = 512 << 20
PEAK_FACTOR = 4  # the widest layer's input and output, a residual branch, and the allocator's slack


def _nbytes(out: object) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_nbytes(o) for o in out.values())
    return 0


def activation_bytes(model: nn.Module, d: TensorData, device: torch.device) -> int:
    """Bytes one example's activations take at the peak of an inference pass: its input plus ``PEAK_FACTOR`` times
    the largest leaf module output, measured by one forward pass of two examples of ``d`` on ``device`` (0 when
    ``d`` is empty)."""
    if len(d) == 0:
        return 0
    xb = d.prepare(d.x[:2].to(device))
    widest = [0]

    def hook(module: nn.Module, args: object, out: object) -> None:
        widest[0] = max(widest[0], _nbytes(out))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            model(xb)
    finally:
        for h in handles:
            h.remove()
    return -(-(_nbytes(xb) + PEAK_FACTOR * widest[0]) // len(xb))


def auto_batch_size(model: nn.Module, d: TensorData | None, device: torch.device,
                    budget: int | None = None) -> tuple[int, str | None]:
    """The batch size to evaluate ``model`` on ``d`` with, and a note saying how it was chosen (None on a GPU or
    without data, where it is ``MAX_BATCH``)."""
    if device.type != "cpu" or d is None or len(d) == 0:
        return MAX_BATCH, None
    budget = ACTIVATION_BUDGET if budget is None else int(budget)
    try:
        per = activation_bytes(model, d, device)
    except Exception:  # noqa: BLE001 - a model that cannot run this data fails in the evaluation itself, with its error
        return MAX_BATCH, None
    batch = max(1, min(MAX_BATCH, budget // max(per, 1)))
    note = (f"evaluation batch size {batch}: activations ≈ {per / 2**20:.2f} MiB per example under a "
            f"{budget / 2**20:.0f} MiB budget (--batch-size sets it)")
    return batch, note
