"""Distances between two checkpoints' weights: L2, relative L2 and cosine, in total and per module. Numbers, not
weights: keys are read in fixed blocks on the ops' worker threads and summed in float64 in key order.

Distances measure parameters, as ``torch.optim.swa_utils`` and the transfer-learning papers do: running statistics
(BatchNorm's ``running_mean``/``running_var``, recognised by name) describe activations, and a domain shift moves
them far more than the weights; they are reported on their own (``buffers``) unless ``include_buffers``. Keys and
module rows are in natural order (``features.2`` before ``features.10``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..io.checkpoint import Checkpoint, Source
from ..io.sources import load
from ..ops.engine import check_compatible, check_finite, running_statistic, tensor_progress
from ..options import EmaChoice
from ..ops.grouping import module_of, natural_key
from ..ops.parallel import ordered_map, plan_execution, thread_scratch

__all__ = ["Distance", "DIST_BLOCK", "distance"]

@dataclass
class Distance:
    """Sums that give L2 distance, relative distance and cosine similarity for a set of tensors."""

    diff_sq: float = 0.0
    a_sq: float = 0.0
    b_sq: float = 0.0
    dot: float = 0.0
    numel: int = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate one tensor pair (in float64)."""
        a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
        d = a64 - b64
        self.diff_sq += float(d @ d)
        self.a_sq += float(a64 @ a64)
        self.b_sq += float(b64 @ b64)
        self.dot += float(a64 @ b64)
        self.numel += a64.numel()

    def merge(self, other: "Distance") -> None:
        """Add another set of sums to this one."""
        self.diff_sq += other.diff_sq
        self.a_sq += other.a_sq
        self.b_sq += other.b_sq
        self.dot += other.dot
        self.numel += other.numel

    def to_dict(self) -> dict:
        """l2 = ‖a−b‖, relative = ‖a−b‖/‖a‖, cosine = a·b/(‖a‖‖b‖)."""
        l2 = math.sqrt(self.diff_sq)
        na, nb = math.sqrt(self.a_sq), math.sqrt(self.b_sq)
        return {
            "l2": l2,
            "relative": l2 / na if na > 0 else (0.0 if l2 == 0 else math.inf),
            "cosine": self.dot / (na * nb) if na > 0 and nb > 0 else float("nan"),
            "norm_a": na,
            "norm_b": nb,
            "numel": self.numel,
        }


DIST_BLOCK = 1 << 20  # elements per float64 partial sum: fixed, so the sums do not depend on threads or memory


def _key_distance(ca: Checkpoint, cb: Checkpoint, key: str, allow_nonfinite: bool) -> Distance:
    """The sums of one key, over fixed blocks in order (on the calling thread)."""
    part = Distance()
    dtype_a, shape = ca.info(key)
    dtype_b, _ = cb.info(key)
    n = math.prod(shape)
    for start in range(0, n, DIST_BLOCK):
        stop = min(n, start + DIST_BLOCK)
        ta = ca.read_range(key, start, stop, thread_scratch("a", (stop - start) * dtype_a.itemsize))
        tb = cb.read_range(key, start, stop, thread_scratch("b", (stop - start) * dtype_b.itemsize))
        part.add(ta, tb)
    if not allow_nonfinite and not all(math.isfinite(x) for x in (part.a_sq, part.b_sq)):
        check_finite(ca[key], ca, key)  # a sum of squares is finite only if every element is: check exactly now
        check_finite(cb[key], cb, key)
    return part


def distance(a: Source, b: Source, *, per_module: bool = False, depth: int | None = None, regex: str | None = None,
             allow_nonfinite: bool = False, progress: bool = False, ema: EmaChoice | bool | None = None,
             threads: int | None = None, include_buffers: bool = False) -> dict:
    """L2 distance, relative distance and cosine over floating parameters, in total and (optionally) per module.

    Running statistics (BatchNorm's) are left out of ``total`` and the module rows and reported as ``buffers``
    (absent when the checkpoints hold none), unless ``include_buffers``. Module rows are in natural order.
    Keys are summed on ``threads`` worker threads (default: every core) and merged in key order, each key in
    fixed blocks of float64 partial sums: the same numbers whatever the thread count.

    Raises:
        IncompatibleCheckpoints: the checkpoints differ in keys, shapes or dtype kinds.
        NonFiniteError: a tensor holds NaN/Inf (unless ``allow_nonfinite``).
    """
    ca, cb = load(a, ema=ema), load(b, ema=ema)
    check_compatible([ca, cb])
    ex = plan_execution(model_bytes=ca.nbytes, worker_bytes_per_elem=0, held_bytes_per_elem=0, threads=threads)
    total, stats = Distance(), Distance()
    groups: dict[str, Distance] = {}
    keys = sorted((k for k in ca if k not in ca.aliases and ca.info(k)[0].is_floating_point), key=natural_key)
    parts = ordered_map(lambda k: _key_distance(ca, cb, k, allow_nonfinite),
                        tensor_progress(keys, len(keys), "distance", progress), ex.threads, ex.depth)
    grouped = per_module or depth or regex
    has_stats = False
    for k, part in zip(keys, parts):
        if running_statistic(k):
            has_stats = True
            stats.merge(part)
            if not include_buffers:
                continue
        total.merge(part)
        if grouped:
            groups.setdefault(module_of(k, depth, regex), Distance()).merge(part)
    out: dict = {"a": ca.source, "b": cb.source, "total": total.to_dict(), "include_buffers": include_buffers}
    if has_stats:
        out["buffers"] = stats.to_dict()
    if grouped:
        out["modules"] = [{"module": m, **groups[m].to_dict()} for m in sorted(groups, key=natural_key)]
    return out
