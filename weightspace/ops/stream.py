"""Linear combinations of checkpoints — soups, interpolation, task vectors — as one formula on the engine.

Σ_j c_j·θ_j is computed piece by piece (ops.engine), so a streamed save holds a few MB whatever the model or the
number of inputs, not N input models. No model, no data here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from .._version import __version__
from ..io.checkpoint import Source
from ..io.outputs import StateDict, TensorStream
from ..io.sources import load
from ..errors import ConfigError
from ..options import EmaChoice
from ..registry import Entry, Paper, register
from .engine import PRECISIONS, Engine, Formula, Piece, convex_weights, finite_scalar, named_sources

__all__ = ["Linear", "linear_combination", "normalised_weights", "uniform_soup_stream", "weighted_average_stream",
           "lerp_stream", "task_vector_stream", "uniform_soup", "weighted_average", "lerp", "task_vector",
           "SOUPS_PAPER", "LMC_PAPER", "TASK_ARITHMETIC_PAPER"]


class Linear(Formula):
    """out = Σ_j c_j·θ_j, each element summed in input order in the accumulation dtype (one input read at a time,
    so a worker holds one input piece whatever the number of inputs)."""

    propagates_nonfinite = True  # NaN/Inf in any input reaches the sum whatever its coefficient

    def __init__(self, coefficients: Sequence[float]):
        self.coefficients = [float(c) for c in coefficients]

    def combine(self, piece: Piece, out: torch.Tensor) -> None:
        for j, c in enumerate(self.coefficients):
            t = piece.read(j)
            if t.dtype.itemsize == 1 and t.dtype != out.dtype:  # float8: torch does no arithmetic promotion for it
                t = t.to(out.dtype)
            if j == 0:
                if t.dtype == out.dtype and c != 1.0:
                    torch.mul(t, c, out=out)  # one pass instead of copy + scale
                else:
                    out.copy_(t)  # widen first: scaling a half tensor would round in half precision
                    if c != 1.0:
                        out.mul_(c)
            else:
                out.add_(t, alpha=c)  # in-place add computes in out's dtype: a half input is added in fp32


def linear_combination(sources: Sequence[Source] | Mapping[str, Source], coefficients: Sequence[float], *,
                       op: str, names: Sequence[str] | None = None, precision: str = "fp32", allow_nonfinite: bool = False, progress: bool = False,
                       ema: EmaChoice | bool | None = None, extra: dict | None = None, threads: int | None = None,
                       max_memory: int | str | None = None, device: str | torch.device | None = None,
                       buffers: str = "mean") -> TensorStream:
    """Σ_j c_j·θ_j over floating tensors, streamed; each tensor is written in the widest dtype of its inputs
    (fp16 and fp32 give fp32; provenance's ``dtypes_promoted`` counts such tensors); an integer buffer takes the
    largest value of the sources, a bool buffer the first source's. Running statistics (BatchNorm's) are never
    extrapolated: with ``buffers="mean"`` they are Σ_j c_j·θ_j when the c_j are convex (each ≥ 0, summing to 1),
    else the sources' uniform mean; ``"first"`` takes the first source's (see ops.engine).

    Pieces of each tensor are combined on ``threads`` worker threads (default: every core) under ``max_memory``
    bytes of pieces and scratch (default: an eighth of one checkpoint, 4 MiB to 1 GiB; see ops.parallel), on the
    CPU, or on a GPU with ``device="cuda"``. Every element is summed in input order, so the result is the same to
    the bit whatever the threads and budget. ``sources`` may be a mapping name → source, or be named by ``names``
    (in-memory ingredients take their names in provenance; see ``ops.engine.named_sources``).

    Raises:
        ConfigError: no sources, bad ``names``, an unknown ``buffers`` policy, a coefficient count that does not match or a coefficient that is not finite or
            beyond the accumulation dtype's range, an unknown precision, a bad ``threads``/``max_memory``/
            ``device`` (CUDA asked for on a machine without it).
        IncompatibleCheckpoints: the sources differ in keys, shapes or dtype kinds.
        NonFiniteError: (while streaming) an input holds NaN/Inf or the result overflows its dtype, unless
            ``allow_nonfinite``.
        InvalidStatistics: (while streaming) a running variance of the result is negative.
    """
    sources = named_sources(sources, names, ema)
    if len(sources) == 0:
        raise ConfigError(f"{op}: needs at least one checkpoint")
    if len(coefficients) != len(sources):
        raise ConfigError(f"{op}: {len(coefficients)} coefficients for {len(sources)} checkpoints")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision}: expected one of {', '.join(PRECISIONS)}", param="precision")
    coefficients = [finite_scalar(c, "coefficients", PRECISIONS[precision]) for c in coefficients]
    cks = [load(s, ema=ema) for s in sources]
    engine = Engine(cks, op=op, precision=precision, allow_nonfinite=allow_nonfinite, progress=progress,
                    threads=threads, max_memory=max_memory, device=device, buffers=buffers,
                    stat_weights=convex_weights(coefficients))
    formula = Linear(coefficients)
    prov = {
        "op": op,
        "coefficients": formula.coefficients,
        "precision": precision,
        "ingredients": [{"source": c.source, **({"variant": c.variant} if c.variant else {})} for c in cks],
        "weightspace_version": __version__,
    }
    if allow_nonfinite:  # the output may hold NaN/Inf on purpose: say so where the output is described
        prov["allow_nonfinite"] = True
    if engine.tied:
        prov["tied"] = dict(sorted(engine.tied.items()))
    if engine.promoted():
        prov["dtypes_promoted"] = engine.promoted()
    if engine.buffer_provenance():
        prov["running_statistics"] = engine.buffer_provenance()
    if extra:
        prov.update(extra)
    return engine.stream(formula, prov)


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1, computed without overflow or underflow (1e308,1e308 and 1e-300,1e-300 both give
    0.5,0.5). Raises ConfigError for non-finite weights, or weights whose sum is zero relative to their size."""
    w = [float(x) for x in weights]
    shown = ",".join(f"{x:g}" for x in w[:8]) + (",..." if len(w) > 8 else "")
    if any(not math.isfinite(x) for x in w):
        raise ConfigError(f"weights={shown}: must be finite numbers", param="weights")
    # Scale by the largest magnitude first: the scaled weights lie in [-1, 1], so their exact sum (fsum) neither
    # overflows nor underflows, and "sums to zero" means cancellation, not small weights.
    m = max((abs(x) for x in w), default=0.0)
    if m == 0.0:
        raise ConfigError(f"weights={shown}: they sum to zero, so they cannot be normalised", param="weights")
    scaled = [x / m for x in w]
    s = math.fsum(scaled)
    if abs(s) < 1e-12:
        raise ConfigError(f"weights={shown}: they sum to zero, so they cannot be normalised", param="weights")
    out = [x / s for x in scaled]
    if not all(math.isfinite(x) for x in out):
        raise ConfigError(f"weights={shown}: they nearly cancel, so normalising them overflows", param="weights")
    return out


def uniform_soup_stream(sources: Sequence[Source] | Mapping[str, Source], **kw: Any) -> TensorStream:
    """Streaming uniform soup: the plain mean of all ingredients.

    ``kw``: the options of ``linear_combination`` (names, precision, allow_nonfinite, progress, threads,
    max_memory, device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``."""
    n = len(sources)
    return linear_combination(sources, [1.0 / n] * n if n else [], op="uniform_soup", **kw)


def weighted_average_stream(sources: Sequence[Source] | Mapping[str, Source], weights: Sequence[float], **kw: Any) -> TensorStream:
    """Streaming weighted average; weights are normalised to sum to 1 (the raw ones are recorded).

    ``kw``: the options of ``linear_combination`` (names, precision, allow_nonfinite, progress, threads,
    max_memory, device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``; also one weight per
            source is needed, and weights that sum to zero or overflow are refused."""
    if len(weights) != len(sources):
        raise ConfigError(f"weighted average: {len(weights)} weights for {len(sources)} checkpoints")
    return linear_combination(sources, normalised_weights(weights), op="weighted_average",
                              extra={"weights_given": [float(x) for x in weights]}, **kw)


def lerp_stream(a: Source, b: Source, alpha: float, **kw: Any) -> TensorStream:
    """Streaming linear interpolation (1−α)·a + α·b.

    ``kw``: the options of ``linear_combination`` (names, precision, allow_nonfinite, progress, threads,
    max_memory, device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``; also an ``alpha`` that is
            not finite or beyond the accumulation dtype's range."""
    alpha = finite_scalar(alpha, "alpha", PRECISIONS.get(kw.get("precision", "fp32"), torch.float32))
    return linear_combination([a, b], [1.0 - alpha, alpha], op="lerp", extra={"alpha": alpha}, **kw)


def task_vector_stream(a: Source, base: Source, **kw: Any) -> TensorStream:
    """Streaming task vector a − base over floating tensors (integer buffers: the larger value of a and base).
    A task vector is not a model: its running statistics are differences too (``buffers`` does not apply).

    ``kw``: the options of ``linear_combination`` (names, precision, allow_nonfinite, progress, threads,
    max_memory, device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``."""
    return linear_combination([a, base], [1.0, -1.0], op="task_vector", **{**kw, "buffers": "formula"})


def uniform_soup(sources: Sequence[Source] | Mapping[str, Source], **kw: Any) -> StateDict:
    """Uniform soup (Wortsman et al. 2022): the mean of the ingredients' weights. In memory; raises what ``uniform_soup_stream`` raises."""
    return uniform_soup_stream(sources, **kw).materialise()


def weighted_average(sources: Sequence[Source] | Mapping[str, Source], weights: Sequence[float], **kw: Any) -> StateDict:
    """Weighted average of checkpoints; weights are normalised to sum to 1. In memory; raises what ``weighted_average_stream`` raises."""
    return weighted_average_stream(sources, weights, **kw).materialise()


def lerp(a: Source, b: Source, alpha: float, **kw: Any) -> StateDict:
    """Linear interpolation (1−α)·a + α·b. In memory; raises what ``lerp_stream`` raises."""
    return lerp_stream(a, b, alpha, **kw).materialise()


def task_vector(a: Source, base: Source, **kw: Any) -> StateDict:
    """Task vector τ = a − base (Ilharco et al. 2023). In memory; raises what ``task_vector_stream`` raises."""
    return task_vector_stream(a, base, **kw).materialise()


SOUPS_PAPER = Paper("Wortsman et al.", 2022, "Model soups: averaging weights of multiple fine-tuned models improves "
                    "accuracy without increasing inference time", "ICML 2022", "https://arxiv.org/abs/2203.05482")
LMC_PAPER = Paper("Frankle et al.", 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", "ICML 2020",
                  "https://arxiv.org/abs/1912.05671")
TASK_ARITHMETIC_PAPER = Paper("Ilharco et al.", 2023, "Editing Models with Task Arithmetic", "ICLR 2023",
                              "https://arxiv.org/abs/2212.04089")

register(Entry("op", "uniform-soup", "Uniform soup", "θ = (1/N)·Σ_i θ_i",
               "the plain mean of the ingredients' weights", SOUPS_PAPER, target=uniform_soup))
register(Entry("op", "weighted-average", "Weighted soup", "θ = Σ_i w_i·θ_i / Σ_i w_i",
               "a weighted mean of the ingredients' weights", SOUPS_PAPER, target=weighted_average))
register(Entry("op", "lerp", "Linear interpolation", "θ(α) = (1−α)·θ_A + α·θ_B",
               "(1−α)·θ_A + α·θ_B between two checkpoints", LMC_PAPER, target=lerp))
register(Entry("op", "task-vector", "Task vector", "τ = θ_fine-tuned − θ_base",
               "the difference of a fine-tuned checkpoint and its base", TASK_ARITHMETIC_PAPER, target=task_vector))
