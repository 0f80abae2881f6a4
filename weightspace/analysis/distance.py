"""Distances between two checkpoints' weights: L2, relative L2 and cosine, in total and per module. Numbers, not
weights: keys are read in fixed blocks on the ops' worker threads and summed in float64 in key order."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..io.checkpoint import Checkpoint, Source
from ..io.sources import load
from ..ops.engine import check_compatible, check_finite, tensor_progress
from ..options import EmaChoice
from ..ops.grouping import module_of
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
             threads: int | None = None) -> dict:
    """L2 distance, relative distance and cosine over floating tensors, in total and (optionally) per module.

    Keys are summed on ``threads`` worker threads (default: every core) and merged in key order, each key in
    fixed blocks of float64 partial sums: the same numbers whatever the thread count.

    Raises:
        IncompatibleCheckpoints: the checkpoints differ in keys, shapes or dtype kinds.
        NonFiniteError: a tensor holds NaN/Inf (unless ``allow_nonfinite``).
    """
    ca, cb = load(a, ema=ema), load(b, ema=ema)
    check_compatible([ca, cb])
    ex = plan_execution(model_bytes=ca.nbytes, worker_bytes_per_elem=0, held_bytes_per_elem=0, threads=threads)
    total = Distance()
    groups: dict[str, Distance] = {}
    keys = [k for k in sorted(ca) if k not in ca.aliases and ca.info(k)[0].is_floating_point]
    parts = ordered_map(lambda k: _key_distance(ca, cb, k, allow_nonfinite),
                        tensor_progress(keys, len(keys), "distance", progress), ex.threads, ex.depth)
    for k, part in zip(keys, parts):
        total.merge(part)
        if per_module or depth or regex:
            groups.setdefault(module_of(k, depth, regex), Distance()).merge(part)
    out: dict = {"a": ca.source, "b": cb.source, "total": total.to_dict()}
    if per_module or depth or regex:
        out["modules"] = [{"module": m, **d.to_dict()} for m, d in groups.items()]
    return out
