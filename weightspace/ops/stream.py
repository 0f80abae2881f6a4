"""Pure streaming weight-space ops: tensors are read, combined and emitted one key at a time.

Linear combinations go further: each tensor is combined in 1 MiB pieces, so a streamed save holds a few MB
whatever the model or the number of inputs, not N input models. No model, no data here.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .._version import __version__
from ..io.checkpoint import Checkpoint, Source
from ..io.outputs import StateDict, TensorStream
from ..io.sources import load
from ..errors import ConfigError, IncompatibleCheckpoints, NonFiniteError, key_sample
from ..registry import Entry, Paper, register
from .grouping import module_of

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "int"


def check_compatible(cks: Sequence[Checkpoint]) -> None:
    """Raise IncompatibleCheckpoints unless all checkpoints share keys, shapes and dtype kinds."""
    ref = cks[0]
    ref_keys = set(ref)
    for ck in cks[1:]:
        keys = set(ck)
        if keys != ref_keys:
            only_a = sorted(ref_keys - keys)
            only_b = sorted(keys - ref_keys)
            parts = []
            if only_a:
                parts.append(f"{key_sample(only_a)} only in {ref.source}")
            if only_b:
                parts.append(f"{key_sample(only_b)} only in {ck.source}")
            raise IncompatibleCheckpoints(f"{ck.source}: key sets differ: " + "; ".join(parts))
        for k in sorted(ref_keys):
            (da, sa), (db, sb) = ref.info(k), ck.info(k)
            if sa != sb:
                raise IncompatibleCheckpoints(f"{ck.source}: key '{k}' has shape {list(sb)}, {ref.source} has {list(sa)}")
            if _kind(da) != _kind(db):
                raise IncompatibleCheckpoints(f"{ck.source}: key '{k}' is {db}, {ref.source} has {da} (different kinds)")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch's elementwise kernels on one thread. They are memory-bound, so a second thread gains little, while
    on a busy machine OpenMP threads waiting for each other made a soup 15× slower (5 s instead of 0.3 s)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def all_finite(t: torch.Tensor) -> bool:
    """True when a floating tensor holds no NaN/Inf. A finite sum proves it at the cost of one read (NaN and Inf
    propagate through a sum); only a non-finite sum, which may be plain overflow, needs torch.isfinite (~20× slower)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    if math.isfinite(float(t.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, ck: Checkpoint, key: str) -> None:
    if not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NonFiniteError(f"{ck.source}: key '{key}' holds {bad} values (use --allow-nonfinite to combine anyway)")


CHUNK_BYTES = 1 << 20  # accumulator bytes per piece: fits a core's L2 cache, bounds extra memory, and is
# large enough that Python's per-piece overhead stays small (measured: 1 MiB beat 256 KiB and 4 MiB)


def _chunk_elems(dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // torch.empty((), dtype=dtype).element_size())


def _ranges(numel: int, dtype: torch.dtype) -> Iterator[tuple[int, int]]:
    step = _chunk_elems(dtype)
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from ..progress import progress
    return progress(iterable, total=total, desc=desc, unit="tensor", enabled=enabled)


def linear_combination(sources: Sequence[Source], coefficients: Sequence[float], *, op: str,
                       precision: str = "fp32", allow_nonfinite: bool = False, progress: bool = False,
                       ema: bool = False, extra: dict | None = None) -> TensorStream:
    """Σ_j c_j·θ_j over floating tensors, streamed key by key; integer/bool buffers come from the first source."""
    if len(sources) == 0:
        raise ConfigError(f"{op}: needs at least one checkpoint")
    if len(coefficients) != len(sources):
        raise ConfigError(f"{op}: {len(coefficients)} coefficients for {len(sources)} checkpoints")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    cks = [load(s, ema=ema) for s in sources]
    check_compatible(cks)
    ref = cks[0]
    keys = sorted(ref)
    entries = [(k, *ref.info(k)) for k in keys]
    tied = dict(ref.aliases)
    acc_dtype = PRECISIONS[precision]
    coeffs = [float(c) for c in coefficients]

    scratch: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)]  # one read buffer, grown when needed

    def read(ck: Checkpoint, key: str, start: int, stop: int) -> torch.Tensor:
        need = (stop - start) * ck.info(key)[0].itemsize
        if scratch[0].numel() < need:
            scratch[0] = torch.empty(need, dtype=torch.uint8)
        return ck.read_range(key, start, stop, scratch[0])

    def combine(key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """out (flat, accumulation dtype) = Σ_j c_j·θ_j[start:stop] over the flattened tensor ``key``."""
        with single_thread():
            for j, (ck, c) in enumerate(zip(cks, coeffs)):
                t = read(ck, key, start, stop)
                if j == 0:
                    if t.dtype == out.dtype and c != 1.0:
                        torch.mul(t, c, out=out)  # one pass instead of copy + scale
                    else:
                        out.copy_(t)  # widen first: scaling a half tensor would round in half precision
                        if c != 1.0:
                            out.mul_(c)
                else:
                    out.add_(t, alpha=c)  # in-place add computes in out's dtype: a half input is added in fp32

    def verify(key: str, start: int, stop: int, result: torch.Tensor) -> None:
        """Refuse a non-finite piece of the result (in its stored dtype) unless allowed. NaN/Inf in any input
        reaches the result whatever its coefficient, so one check of the result suffices; only then is each input
        checked, to name the file. Finite inputs with a non-finite result overflowed: that is refused too."""
        if allow_nonfinite:
            return
        with single_thread():
            if all_finite(result):
                return
            for ck in cks:
                _check_finite(read(ck, key, start, stop), ck, key)
        raise NonFiniteError(f"{ref.source}: key {key!r}: {op} of finite inputs overflows {result.dtype} "
                             f"(the result holds Inf); use --allow-nonfinite to write it anyway")

    def wide_of(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if (dtype == torch.float64 or acc_dtype == torch.float64) else acc_dtype

    def compute(key: str) -> torch.Tensor:
        """The whole output tensor for ``key``."""
        dtype, shape = ref.info(key)
        if not dtype.is_floating_point:
            return ref[key]
        wide = wide_of(dtype)
        result = torch.empty(shape, dtype=dtype)
        flat = result.view(-1)
        scratch = None if wide == dtype else torch.empty(min(flat.numel(), _chunk_elems(wide)), dtype=wide)
        for start, stop in _ranges(flat.numel(), wide):
            if scratch is None:
                combine(key, start, stop, flat[start:stop])
            else:
                acc = scratch[: stop - start]
                combine(key, start, stop, acc)
                flat[start:stop].copy_(acc)
            verify(key, start, stop, flat[start:stop])
        return result

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        waiting = {}
        for canon in set(tied.values()):
            waiting[canon] = sum(1 for v in tied.values() if v == canon)
        cache: dict[str, torch.Tensor] = {}
        for key in _progress(keys, len(keys), op, progress):
            canon = tied.get(key, key)
            if canon in cache:
                t = cache[canon]
            else:
                t = compute(canon)
                if canon in waiting:
                    cache[canon] = t
            if key in tied:
                waiting[canon] -= 1
                if waiting[canon] == 0:
                    cache.pop(canon, None)
            yield key, t

    def pieces() -> Iterator[tuple[str, torch.Tensor]]:
        """Like produce, but large tensors come in flat pieces of ≤ CHUNK_BYTES of accumulator: what a writer
        needs to hold is one piece, not the largest tensor (an LLM's embedding can be gigabytes)."""
        whole = set(tied) | set(tied.values())  # tied tensors come from in-memory pickles: keep them whole
        tied_done: dict[str, torch.Tensor] = {}  # computed once, however many names share it
        buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        flip = 0
        for key in _progress(keys, len(keys), op, progress):
            dtype, shape = ref.info(key)
            if key in whole:
                canon = tied.get(key, key)
                if canon not in tied_done:
                    tied_done[canon] = compute(canon)
                yield key, tied_done[canon]
                continue
            if not dtype.is_floating_point:
                yield key, ref[key]
                continue
            wide = wide_of(dtype)
            numel = math.prod(shape)
            if numel == 0:
                yield key, torch.empty(0, dtype=dtype)
                continue
            n = min(numel, _chunk_elems(wide))
            for start, stop in _ranges(numel, wide):
                # Two accumulators used in turn, never a fresh allocation per piece: a piece stays valid until
                # the one after next is asked for, so a writer can write it while the next one is computed.
                flip ^= 1
                buf = buffers.get((wide, flip))
                if buf is None or buf.numel() < n:
                    buf = buffers[(wide, flip)] = torch.empty(n, dtype=wide)
                acc = buf[: stop - start]
                combine(key, start, stop, acc)
                piece = acc if wide == dtype else acc.to(dtype)
                verify(key, start, stop, piece)
                yield key, piece

    prov = {
        "op": op,
        "coefficients": coeffs,
        "precision": precision,
        "ingredients": [{"source": c.source, **({"variant": c.variant} if c.variant else {})} for c in cks],
        "weightspace_version": __version__,
    }
    if allow_nonfinite:  # the output may hold NaN/Inf on purpose: say so where the output is described
        prov["allow_nonfinite"] = True
    if tied:
        prov["tied"] = dict(sorted(tied.items()))
    if extra:
        prov.update(extra)
    return TensorStream(entries, produce, prov, cks, tied, pieces)


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1, computed without overflow or underflow (1e308,1e308 and 1e-300,1e-300 both give
    0.5,0.5). Raises ConfigError for non-finite weights, or weights whose sum is zero relative to their size."""
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) for x in w):
        raise ConfigError("weights must be finite numbers")
    # Scale by the largest magnitude first: the scaled weights lie in [-1, 1], so their exact sum (fsum) neither
    # overflows nor underflows, and "sums to zero" means cancellation, not small weights.
    m = max((abs(x) for x in w), default=0.0)
    if m == 0.0:
        raise ConfigError("weights sum to zero")
    scaled = [x / m for x in w]
    s = math.fsum(scaled)
    if abs(s) < 1e-12:
        raise ConfigError("weights sum to zero")
    out = [x / s for x in scaled]
    if not all(math.isfinite(x) for x in out):
        raise ConfigError("weights nearly cancel: normalising them overflows")
    return out


def uniform_soup_stream(sources: Sequence[Source], **kw) -> TensorStream:
    """Streaming uniform soup: the plain mean of all ingredients."""
    n = len(sources)
    return linear_combination(sources, [1.0 / n] * n if n else [], op="uniform_soup", **kw)


def weighted_average_stream(sources: Sequence[Source], weights: Sequence[float], **kw) -> TensorStream:
    """Streaming weighted average; weights are normalised to sum to 1 (the raw ones are recorded)."""
    if len(weights) != len(sources):
        raise ConfigError(f"weighted average: {len(weights)} weights for {len(sources)} checkpoints")
    return linear_combination(sources, normalised_weights(weights), op="weighted_average",
                              extra={"weights_given": [float(x) for x in weights]}, **kw)


def lerp_stream(a: Source, b: Source, alpha: float, **kw) -> TensorStream:
    """Streaming linear interpolation (1−α)·a + α·b."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ConfigError(f"--alpha {alpha}: must be a finite number")
    return linear_combination([a, b], [1.0 - alpha, alpha], op="lerp", extra={"alpha": alpha}, **kw)


def task_vector_stream(a: Source, base: Source, **kw) -> TensorStream:
    """Streaming task vector a − base over floating tensors (integer buffers are a's)."""
    return linear_combination([a, base], [1.0, -1.0], op="task_vector", **kw)


def uniform_soup(sources: Sequence[Source], **kw) -> StateDict:
    """Uniform soup (Wortsman et al. 2022): the mean of the ingredients' weights."""
    return uniform_soup_stream(sources, **kw).to_dict()


def weighted_average(sources: Sequence[Source], weights: Sequence[float], **kw) -> StateDict:
    """Weighted average of checkpoints; weights are normalised to sum to 1."""
    return weighted_average_stream(sources, weights, **kw).to_dict()


def lerp(a: Source, b: Source, alpha: float, **kw) -> StateDict:
    """Linear interpolation (1−α)·a + α·b."""
    return lerp_stream(a, b, alpha, **kw).to_dict()


def task_vector(a: Source, base: Source, **kw) -> StateDict:
    """Task vector τ = a − base (Ilharco et al. 2023)."""
    return task_vector_stream(a, base, **kw).to_dict()


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

    def as_dict(self) -> dict:
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


def distance(a: Source, b: Source, *, per_module: bool = False, depth: int | None = None, regex: str | None = None,
             allow_nonfinite: bool = False, progress: bool = False, ema: bool = False) -> dict:
    """L2 distance, relative distance and cosine over floating tensors, in total and (optionally) per module."""
    ca, cb = load(a, ema=ema), load(b, ema=ema)
    check_compatible([ca, cb])
    total = Distance()
    groups: dict[str, Distance] = {}
    keys = [k for k in sorted(ca) if k not in ca.aliases and ca.info(k)[0].is_floating_point]
    for k in _progress(keys, len(keys), "distance", progress):
        part = Distance()
        ta, tb = ca[k], cb[k]
        with single_thread():
            part.add(ta, tb)
            if not allow_nonfinite and not all(math.isfinite(x) for x in (part.a_sq, part.b_sq)):
                _check_finite(ta, ca, k)  # a sum of squares is finite only if every element is: check exactly now
                _check_finite(tb, cb, k)
        total.merge(part)
        if per_module or depth or regex:
            groups.setdefault(module_of(k, depth, regex), Distance()).merge(part)
    out: dict = {"a": ca.source, "b": cb.source, "total": total.as_dict()}
    if per_module or depth or regex:
        out["modules"] = [{"module": m, **d.as_dict()} for m, d in groups.items()]
    return out
