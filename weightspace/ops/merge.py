"""Model merging from a shared base: task arithmetic and TIES, formulas on the one engine (ops.engine).

Each method is a small class behind a registry (as in mergekit). A method sees, for one flat piece of one key at a
time, the task vectors τ_t = w_t·s_t·(θ_t − θ_pre) (s_t = −1 for negated models, w_t the model's weight) and
returns the merged task vector δ; the merge formula writes θ = θ_pre + λ·δ. The engine sizes pieces under a memory
budget and computes them on worker threads, so a method must be elementwise given what ``prepare`` computed, and
thread-safe; a method that needs whole tensors (a norm, an angle, a random mask whose bytes must not depend on the
piece split) lists those keys in ``whole_tensor`` and sees each of them as one piece. Integer buffers take the
largest value of the base and the models (``num_batches_tracked``), bool buffers are the base's. Running
statistics are not task vectors: they are the fine-tuned models' convex mean (``merge_stat_weights``), never
θ_pre + λ·δ, so no λ or negation makes a variance negative.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Iterator, Sequence, TypeVar

import torch

from .._version import __version__
from ..io.checkpoint import Checkpoint, Source
from ..io.sources import load
from ..errors import ConfigError
from ..options import EmaChoice
from ..registry import REGISTRY, Entry, Paper, register as register_entry
from .engine import PRECISIONS, Engine, Formula, Piece, finite_scalar, named_sources
from .parallel import Execution
from ..io.outputs import StateDict, TensorStream
from .stream import TASK_ARITHMETIC_PAPER

__all__ = ["TIES_PAPER", "MergeMethod", "register", "method_names", "TaskArithmetic", "Ties", "MergePlan",
           "kth_largest_magnitudes", "per_tensor_thresholds", "plan_merge", "apply_delta", "merge",
           "task_arithmetic", "ties_merge", "merge_stat_weights"]

TIES_PAPER = Paper("Yadav et al.", 2023, "TIES-Merging: Resolving Interference When Merging Models", "NeurIPS 2023",
                   "https://arxiv.org/abs/2306.01708")


T = TypeVar("T")


class MergeMethod:
    """One merge method: turns the task vectors of one key into a merged task vector.

    ``entry`` describes it in the one registry (weightspace.registry: title, formula, paper, defaults); its
    ``defaults`` are the keyword arguments of ``__init__`` and of the ``scale`` λ.
    """

    name: ClassVar[str] = ""
    entry: ClassVar[Entry]
    #: the hyperparameter a search on validation data tunes (``scale`` is λ; others are ``__init__`` options)
    tuned: ClassVar[str] = "scale"

    def prepare(self, plan: "MergePlan") -> dict:
        """An optional first pass over all keys (e.g. a global threshold); returns provenance fields."""
        return {}

    def whole_tensor(self, key: str) -> bool:
        """Whether ``combine`` (and the passes of ``prepare``) must see ``key`` as one piece; default: no."""
        return False

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        """The merged task vector δ of a flat piece of ``key`` from the task vectors τ_t of that piece (signed and
        weighted, one dtype, fresh: the method may modify them in place)."""
        raise NotImplementedError

    def delta(self, key: str, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        """The merged task vector given θ_pre too (``base``: read-only). Methods on the weights themselves
        (slerp, karcher) override this; task-vector methods keep the default, ``combine(key, taus)``."""
        return self.combine(key, taus)


def register(entry: Entry) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Class decorator: register a merge method in the one registry (family ``merge``) under ``entry.name``."""
    def deco(cls: type[MergeMethod]) -> type[MergeMethod]:
        cls.name = entry.name
        cls.entry = register_entry(Entry("merge", entry.name, entry.title, entry.formula, entry.summary, entry.paper,
                                         entry.defaults, target=cls))
        return cls
    return deco


def method_names() -> list[str]:
    """The registered merge methods, e.g. ['task-arithmetic', 'ties']."""
    return REGISTRY.names("merge")


@register(Entry("merge", "task-arithmetic", "Task arithmetic", "θ = θ_base + λ·Σ_t τ_t,  τ_t = θ_t − θ_base",
                "θ_base + λ·Σ τ_t, the sum of the task vectors added to the base", TASK_ARITHMETIC_PAPER,
                {"scale": 1.0}))
class TaskArithmetic(MergeMethod):
    """Task arithmetic (Ilharco et al. 2023): δ = Σ_t τ_t."""

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        acc = taus[0]
        for t in taus[1:]:
            acc.add_(t)
        return acc


@register(Entry("merge", "ties", "TIES-merging",
                "θ = θ_base + λ·δ,  δ = disjoint mean of trim_k(τ_t) agreeing with sign(Σ_t trim_k(τ_t))",
                "each task vector trimmed to its largest magnitudes, signs elected per parameter, then a disjoint "
                "mean added to the base", TIES_PAPER, {"scale": 1.0, "keep": 0.2}))
class Ties(MergeMethod):
    """TIES-merging (Yadav et al. 2023): trim each τ_t to its top-k magnitudes, elect signs, disjoint mean.

    Two trims: ``keep`` (the default) keeps the top fraction of each task vector over the whole model, as the
    paper's code does; ``density`` (one fraction, or one per model) keeps the top fraction of every tensor
    separately, as mergekit's ``ties`` does. Provenance says which (``trim``: "global" or "per-tensor")."""

    def __init__(self, keep: float | None = None, density: float | Sequence[float] | None = None):
        if density is not None and keep is not None:
            raise ConfigError("ties: give keep (global top-k) or density (per tensor), not both")
        if density is not None:
            self.densities: list[float] | None = ([float(density)] if isinstance(density, (int, float))
                                                  else [float(d) for d in density])
            for d in self.densities:
                if not (0.0 < d <= 1.0) or not math.isfinite(d):
                    raise ConfigError(f"ties: density {d}: must be a fraction in (0, 1]")
            self.keep = None
        else:
            self.densities = None
            keep = float(self.entry.defaults["keep"] if keep is None else keep)
            if not (0.0 < keep <= 1.0) or not math.isfinite(keep):
                raise ConfigError(f"keep={keep}: must be a fraction in (0, 1]", param="keep")
            self.keep = keep
        self.thresholds: list[float] = []
        self.per_key: dict[str, list[float]] = {}
        self.weights: list[float] = []

    def prepare(self, plan: "MergePlan") -> dict:
        self.weights = list(plan.weights)
        if any(w <= 0 for w in self.weights):
            # the disjoint mean divides by the summed weights of the agreeing models: a weight ≤ 0 has no meaning
            raise ConfigError(f"weights={','.join(f'{w:g}' for w in self.weights)}: ties weights must be positive",
                              param="weights")
        if self.densities is not None:
            dens = self.densities * len(plan.models) if len(self.densities) == 1 else self.densities
            if len(dens) != len(plan.models):
                raise ConfigError(f"ties: {len(dens)} densities for {len(plan.models)} models")
            self.per_key = per_tensor_thresholds(plan, dens)
            return {"trim": "per-tensor", "density": dens}
        n_total = plan.num_float_elements()
        n_keep = min(n_total, max(1, round(self.keep * n_total)))
        self.thresholds = kth_largest_magnitudes(plan, n_keep) if n_total else [0.0] * len(plan.models)
        return {"trim": "global", "keep": self.keep, "kept_per_task": n_keep, "float_elements": n_total,
                "thresholds": self.thresholds}

    def combine(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        # Trim, in place: magnitudes are compared in float32, the precision the thresholds were selected in.
        for tau, thr in zip(taus, self.per_key.get(key, self.thresholds)):
            tau.mul_(tau.abs().float() >= thr)  # 3× faster than masked_fill_ on a CPU
        # Elect: the sign of the summed mass per entry (an exact tie, sum 0, elects nothing and gives 0).
        elected = taus[0].clone()
        for tau in taus[1:]:
            elected.add_(tau)
        elected.sign_()
        # Disjoint mean over the kept entries that agree with the elected sign: τ·sign > 0 exactly there, so
        # clamp(τ·sign, min=0) is the agreeing magnitude and (τ·sign > 0) counts it.
        # With model weights w_t (τ_t arrives scaled by w_t) the mean is weighted: Σ w_t·τ_t / Σ w_t over agreeing
        # entries, as mergekit normalises; with every w_t = 1 it is the plain disjoint mean.
        total = torch.zeros_like(elected)
        count = torch.zeros_like(elected)
        weights = self.weights or [1.0] * len(taus)
        for tau, w in zip(taus, weights):
            tau.mul_(elected)
            count.add_(tau > 0, alpha=w) if w != 1.0 else count.add_(tau > 0)
            total.add_(tau.clamp_(min=0))
        return total.div_(torch.where(count > 0, count, torch.ones_like(count))).mul_(elected)


class MergePlan(Formula):
    """A merge as the engine runs it: the base (input 0) and the fine-tuned models with their signs and weights,
    the task vectors of each piece, and the formula θ_pre + λ·δ with the method's δ."""

    def __init__(self, engine: Engine, method: "MergeMethod", signs: list[float], weights: list[float],
                 scale: float = 1.0):
        self.engine, self.method, self.signs, self.weights, self.scale = engine, method, signs, weights, scale

    @property
    def base(self) -> Checkpoint:
        """The base checkpoint θ_pre."""
        return self.engine.ref

    @property
    def models(self) -> list[Checkpoint]:
        """The fine-tuned checkpoints, in order."""
        return self.engine.inputs[1:]

    @property
    def keys(self) -> list[str]:
        """Every output key, sorted."""
        return self.engine.keys

    @property
    def ex(self) -> Execution:
        """How the work runs (threads, pieces, device)."""
        return self.engine.ex

    @property
    def checked(self) -> bool:
        """Whether a full pass has already checked every input for NaN/Inf."""
        return self.engine.checked

    @checked.setter
    def checked(self, value: bool) -> None:
        self.engine.checked = value

    @property
    def on_gpu(self) -> bool:
        """Whether pieces are combined on a CUDA device."""
        return self.engine.on_gpu

    def float_keys(self) -> list[str]:
        """Floating keys, each tied group once (its canonical name)."""
        return self.engine.float_keys()

    def num_float_elements(self) -> int:
        """Entries of one task vector over the whole model that the formula combines (not running statistics)."""
        return self.engine.num_float_elements()

    def wide(self, key: str) -> torch.dtype:
        """The accumulation dtype of one key (float64 stays float64)."""
        return self.engine.wide(key)

    def task_vectors(self, piece: Piece) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """θ_pre and the task vectors w_t·s_t·(θ_t − θ_pre) of one piece (flat, fresh tensors in the wide dtype,
        on the engine's device)."""
        base = piece.wide(0)
        taus = []
        weights = self.weights or [1.0] * len(self.models)
        for i, (s, w) in enumerate(zip(self.signs, weights)):
            tau = torch.sub(piece.read(i + 1), base)
            if s * w != 1.0:
                tau.mul_(s * w)
            taus.append(tau)
        return base, taus

    def map_pieces(self, fn: Callable[[str, int, int, torch.Tensor, list[torch.Tensor]], T],
                   desc: str) -> Iterator[T]:
        """``fn(key, start, stop, θ_pre, task vectors)`` for every piece of every floating key, on the worker
        threads (on the device's streams with a GPU); results in piece order."""
        return self.engine.map_pieces(lambda p: fn(p.key, p.start, p.stop, *self.task_vectors(p)), desc)

    def combine(self, piece: Piece, out: torch.Tensor) -> None:
        base, taus = self.task_vectors(piece)
        apply_delta(base, self.method.delta(piece.key, base, taus), self.scale, out)


# Radix selection over float32 bit patterns: for non-negative floats the int32 bit pattern is ordered like the
# value, so the k-th largest |τ| is found exactly with two histogram passes (high 16 bits, then low 16 bits within
# the chosen bucket). Memory stays O(65536) per task vector, whatever the model size; no concatenation of |τ|.
_HI_BINS = 1 << 15  # the sign bit is clear, so the high half has 15 significant bits
_LO_BINS = 1 << 16


def _bits(tau: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |τ| in float32 (τ is a fresh tensor: made absolute in place)."""
    return tau.abs_().to(torch.float32).contiguous().view(torch.int32).reshape(-1)


def _pick_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest value, and k's rank inside that bucket (1-based)."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[i - 1]) if i > 0 else 0
    return hist.numel() - 1 - i, k - above


def kth_largest_magnitudes(plan: MergePlan, k: int) -> list[float]:
    """For each task vector, the exact k-th largest |τ| (in float32) over the whole model, in two streamed passes
    (histograms of integer counts: the same whatever the order in which pieces are counted)."""
    n = len(plan.models)

    def high(key: str, start: int, stop: int, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        if plan.engine.statistic(key):  # combined by the buffer policy, not trimmed: counts for no threshold
            return torch.zeros(n, _HI_BINS, dtype=torch.int64)
        return torch.stack([torch.bincount(_bits(tau) >> 16, minlength=_HI_BINS) for tau in taus]).cpu()

    hi = torch.zeros(n, _HI_BINS, dtype=torch.int64)
    for h in plan.map_pieces(high, "ties: threshold 1/2"):
        hi += h
    plan.checked = True  # every input was read and checked once; later passes skip the NaN/Inf scan
    picks = [_pick_bucket(hi[i], k) for i in range(n)]

    def low(key: str, start: int, stop: int, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        if plan.engine.statistic(key):
            return torch.zeros(n, _LO_BINS, dtype=torch.int64)
        rows = []
        for i, tau in enumerate(taus):
            b = _bits(tau)
            rows.append(torch.bincount(b[(b >> 16) == picks[i][0]] & 0xFFFF, minlength=_LO_BINS))
        return torch.stack(rows).cpu()

    lo = torch.zeros(n, _LO_BINS, dtype=torch.int64)
    for h in plan.map_pieces(low, "ties: threshold 2/2"):
        lo += h
    out = []
    for i, (bucket, rank) in enumerate(picks):
        low_bits, _ = _pick_bucket(lo[i], rank)
        out.append(float(torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32).view(torch.float32)))
    return out


def per_tensor_thresholds(plan: MergePlan, densities: Sequence[float]) -> dict[str, list[float]]:
    """For each floating key and task vector, the magnitude of its k-th largest |τ| with k = int(density·numel)
    (mergekit's rule), over that tensor alone. One pass; holds one tensor per model at a time."""
    def mags(key: str, start: int, stop: int, base: torch.Tensor, taus: list[torch.Tensor]):
        return key, [tau.abs_().to(torch.float32).cpu() for tau in taus]

    out: dict[str, list[float]] = {}

    def finish(key: str, parts: list[list[torch.Tensor]]) -> None:
        numel = math.prod(plan.base.info(key)[1])
        thr = []
        for i, d in enumerate(densities):
            k = int(d * numel)
            if k <= 0:
                thr.append(math.inf)  # keeps nothing of this tensor
            elif k >= numel:
                thr.append(0.0)
            else:
                thr.append(float(torch.topk(torch.cat(parts[i]), k, sorted=False).values.min()))
        out[key] = thr

    current, parts = None, []
    for key, pieces in plan.map_pieces(mags, "ties: per-tensor thresholds"):
        if key != current:
            if current is not None:
                finish(current, parts)
            current, parts = key, [[] for _ in plan.models]
        for i, t in enumerate(pieces):
            parts[i].append(t)
    if current is not None:
        finish(current, parts)
    plan.checked = True
    return out


def _signs(n_models: int, negate: Sequence[bool] | None) -> list[float]:
    if negate is None:
        return [1.0] * n_models
    if len(negate) != n_models:
        raise ConfigError(f"negate: {len(negate)} flags for {n_models} models")
    return [-1.0 if x else 1.0 for x in negate]


def merge_stat_weights(signs: Sequence[float], weights: Sequence[float] | None) -> list[float]:
    """The running statistics' weights over [base, *models]: the mean of the models added (not negated), weighted
    by their weights when those are all positive; the base's own when every model is negated."""
    added = [s > 0 for s in signs]
    if not any(added):
        return [1.0] + [0.0] * len(signs)
    w = list(weights) if weights else [1.0] * len(signs)
    if not all(x > 0 for x, a in zip(w, added) if a):
        w = [1.0] * len(signs)
    total = math.fsum(x for x, a in zip(w, added) if a)
    return [0.0] + [x / total if a else 0.0 for x, a in zip(w, added)]


def _make_method(method: str | MergeMethod, options: dict) -> MergeMethod:
    if isinstance(method, MergeMethod):
        if options:
            raise ConfigError(f"merge: options {sorted(options)} given with a ready {type(method).__name__}")
        return method
    cls = REGISTRY.get("merge", method, what=f"method={method}", param="method").target
    try:
        return cls(**options)
    except TypeError:
        raise ConfigError(f"method={method}: does not take options {sorted(options)}", param="method") from None


def plan_merge(method: str | MergeMethod, base: Source, models: Sequence[Source] | Mapping[str, Source], *,
               names: Sequence[str] | None = None, negate: Sequence[bool] | None = None, precision: str = "fp32", allow_nonfinite: bool = False,
               progress: bool = False, ema: EmaChoice | bool | None = None, threads: int | None = None,
               max_memory: int | str | None = None, device: str | torch.device | None = None,
               weights: Sequence[float] | None = None, buffers: str = "mean",
               **options: Any) -> tuple[MergeMethod, MergePlan, dict]:
    """Open and check the checkpoints and run the method's first pass; returns (method, plan, provenance).

    Running statistics (BatchNorm's) are the added models' convex mean (``buffers="mean"``) or the base's
    (``"first"``), whatever λ and the signs.

    ``weights`` scale each model's task vector (default 1 each; TIES then takes a weighted disjoint mean).
    ``models`` may be a mapping name → source, or be named by ``names`` (see ``ops.engine.named_sources``).

    Raises:
        ConfigError: no models, bad ``names``, an unknown method/precision or option, a bad threads/max_memory/device,
            weights that are not finite or beyond the accumulation dtype's range (or not positive, for TIES).
        IncompatibleCheckpoints: the checkpoints differ in keys, shapes or dtype kinds.
        NonFiniteError: an input holds NaN/Inf (unless ``allow_nonfinite``).
    """
    models = named_sources(models, names, ema)
    if not models:
        raise ConfigError("merge: needs at least one fine-tuned model besides the base")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision}: expected one of {', '.join(PRECISIONS)}", param="precision")
    m = _make_method(method, options)
    base_ck = load(base, ema=ema)
    cks = [load(s, ema=ema) for s in models]
    if weights is not None and len(weights) != len(cks):
        raise ConfigError(f"merge: {len(weights)} weights for {len(cks)} models", param="weights")
    if weights is not None:
        weights = [finite_scalar(w, "weights", PRECISIONS[precision]) for w in weights]
    # a worker holds θ_pre, every τ_t and a method's few temporaries per element
    signs = _signs(len(cks), negate)
    engine = Engine([base_ck, *cks], op=m.name, precision=precision, allow_nonfinite=allow_nonfinite,
                    progress=progress, scratch=len(cks) + 6, whole=m.whole_tensor, threads=threads,
                    max_memory=max_memory, device=device, buffers=buffers,
                    stat_weights=merge_stat_weights(signs, weights))
    plan = MergePlan(engine, m, signs, [float(w) for w in weights] if weights is not None else [])
    prov = {
        "op": m.name.replace("-", "_"),
        "method": m.name,
        "precision": precision,
        "ingredients": [{"source": base_ck.source, "role": "base"}]
        + [{"source": c.source, "role": "task", "sign": int(s), **({"weight": w} if weights is not None else {})}
           for c, s, w in zip(cks, plan.signs, plan.weights or [1.0] * len(cks))],
        "weightspace_version": __version__,
    }
    if allow_nonfinite:  # the output may hold NaN/Inf on purpose: say so where the output is described
        prov["allow_nonfinite"] = True
    prov.update(m.prepare(plan))
    if base_ck.aliases:
        prov["tied"] = dict(sorted(base_ck.aliases.items()))
    if engine.promoted():
        prov["dtypes_promoted"] = engine.promoted()
    if engine.buffer_provenance():
        prov["running_statistics"] = engine.buffer_provenance()
    return m, plan, prov


def apply_delta(base: torch.Tensor, delta: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = θ_pre + λ·δ, cast to out's dtype (and copied off the device)."""
    if out.dtype == base.dtype and out.device == base.device:
        return torch.add(base, delta, alpha=scale, out=out)
    return out.copy_(torch.add(base, delta, alpha=scale), non_blocking=True)


def merge(method: str | MergeMethod, base: Source, models: Sequence[Source] | Mapping[str, Source], *, scale: float = 1.0,
          negate: Sequence[bool] | None = None, precision: str = "fp32", allow_nonfinite: bool = False,
          progress: bool = False, ema: EmaChoice | bool | None = None, threads: int | None = None,
          max_memory: int | str | None = None, device: str | torch.device | None = None, buffers: str = "mean",
          **options: Any) -> TensorStream:
    """Stream θ_pre + λ·δ for a registered method (see method_names()); save it with ``weightspace.save``.
    Running statistics: as ``plan_merge`` (``buffers``).

    Pieces are computed on ``threads`` workers (default: every core) under ``max_memory`` bytes (see
    ops.parallel), on the CPU or, with ``device="cuda"``, on a GPU; on the CPU the bytes are the same whatever
    the threads and budget.

    Raises:
        ConfigError, IncompatibleCheckpoints: as ``plan_merge``; a ``scale`` that is not finite or beyond the
            accumulation dtype's range.
        NonFiniteError: as ``plan_merge``; also (while streaming) a result that overflows its dtype, unless
            ``allow_nonfinite``.
        InvalidStatistics: (while streaming) a running variance of the result is negative (``buffers="first"``
            with a base that holds one).
    """
    scale = finite_scalar(scale, "scale", PRECISIONS.get(precision, torch.float32))
    m, plan, prov = plan_merge(method, base, models, negate=negate, precision=precision,
                               allow_nonfinite=allow_nonfinite, progress=progress, ema=ema, threads=threads,
                               max_memory=max_memory, device=device, buffers=buffers, **options)
    prov["scale"] = scale
    plan.scale = scale
    return plan.engine.stream(plan, prov, m.name)


def task_arithmetic(base: Source, models: Sequence[Source], *, scale: float = 1.0,
                    negate: Sequence[bool] | None = None, **kw: Any) -> StateDict:
    """Task arithmetic (Ilharco et al. 2023): θ_pre + λ·Σ_t s_t·(θ_t − θ_pre); s_t = −1 where negated. In memory;
    ``kw`` and what it raises as ``merge``."""
    return merge("task-arithmetic", base, models, scale=scale, negate=negate, **kw).materialise()


def ties_merge(base: Source, models: Sequence[Source], *, scale: float = 1.0, keep: float = 0.2,
               negate: Sequence[bool] | None = None, **kw: Any) -> StateDict:
    """TIES-merging (Yadav et al. 2023): trim to the top ``keep`` fraction, elect signs, disjoint mean, θ_pre + λ·τ.
    In memory; ``kw`` and what it raises as ``merge``."""
    return merge("ties", base, models, scale=scale, negate=negate, keep=keep, **kw).materialise()
