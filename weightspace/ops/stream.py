"""Pure streaming weight-space ops: tensors are read, combined and emitted one key at a time.

Linear combinations go further: each tensor is combined in 1 MiB pieces, so a streamed save holds a few MB
whatever the model or the number of inputs, not N input models. No model, no data here.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import torch

from .._version import __version__
from ..io.checkpoint import Checkpoint, Source
from ..io.outputs import StateDict, TensorStream
from ..io.sources import load
from ..errors import ConfigError, IncompatibleCheckpoints, NonFiniteError, key_sample
from ..registry import Entry, Paper, register
from .grouping import module_of
from .parallel import ordered_map, piece_streams, plan_execution, thread_cuda_stream, thread_events, thread_scratch

__all__ = ["PRECISIONS", "check_compatible", "single_thread", "all_finite", "check_finite", "tensor_progress",
           "combinable", "linear_combination", "normalised_weights", "uniform_soup_stream", "weighted_average_stream",
           "lerp_stream", "task_vector_stream", "uniform_soup", "weighted_average", "lerp", "task_vector",
           "SOUPS_PAPER", "LMC_PAPER", "TASK_ARITHMETIC_PAPER", "Distance", "DIST_BLOCK", "distance"]

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
            raise IncompatibleCheckpoints(f"{ck.source}: key sets differ: " + "; ".join(parts), path=ck.source)
        for k in sorted(ref_keys):
            (da, sa), (db, sb) = ref.info(k), ck.info(k)
            if sa != sb:
                raise IncompatibleCheckpoints(f"{ck.source}: key '{k}' has shape {list(sb)}, {ref.source} has {list(sa)}",
                                              path=ck.source, key=k)
            if _kind(da) != _kind(db):
                raise IncompatibleCheckpoints(f"{ck.source}: key '{k}' is {db}, {ref.source} has {da} (different kinds)",
                                              path=ck.source, key=k)


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
    if t.dtype.itemsize == 1:  # float8: torch has no isfinite/isnan for most of them
        t = t.float()
    return bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, ck: Checkpoint, key: str) -> None:
    """Raise NonFiniteError (naming ``ck``'s source and ``key``) when ``t`` holds NaN or Inf."""
    if not all_finite(t):
        t = t.float() if t.dtype.itemsize == 1 else t
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NonFiniteError(f"{ck.source}: key '{key}' holds {bad} values (use --allow-nonfinite to combine anyway)",
                             path=ck.source, key=key)


T = TypeVar("T")


def tensor_progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T]:
    """``iterable`` with a progress bar counted in tensors on stderr (``iterable`` itself when not ``enabled``)."""
    from ..progress import progress
    return progress(iterable, total=total, desc=desc, unit="tensor", enabled=enabled)


def combinable(dtype: torch.dtype) -> bool:
    """Whether a linear combination can take tensors of ``dtype``: real floating types that convert to float32,
    and integer/bool buffers (passed through). Complex and packed 4-bit types cannot be."""
    if dtype.is_complex:
        return False
    if not dtype.is_floating_point:
        return True
    try:
        torch.zeros(1, dtype=dtype).to(torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def _refuse_uncombinable(ck: Checkpoint, keys: Sequence[str], op: str) -> None:
    for k in keys:
        dtype = ck.info(k)[0]
        if not combinable(dtype):
            raise IncompatibleCheckpoints(f"{ck.source}: key {k!r} is {dtype}, which {op} cannot combine (only real "
                                          f"floating tensors are combined; integer and bool buffers are copied)",
                                          path=ck.source, key=k)


def linear_combination(sources: Sequence[Source], coefficients: Sequence[float], *, op: str,
                       precision: str = "fp32", allow_nonfinite: bool = False, progress: bool = False,
                       ema: bool | None = None, extra: dict | None = None, threads: int | None = None,
                       max_memory: int | str | None = None, device: str | torch.device | None = None) -> TensorStream:
    """Σ_j c_j·θ_j over floating tensors, streamed; integer/bool buffers come from the first source.

    Pieces of each tensor are combined on ``threads`` worker threads (default: every core) under ``max_memory``
    bytes of pieces and scratch (default: an eighth of one checkpoint, 4 MiB to 1 GiB; see ops.parallel), on the
    CPU, or on a GPU with ``device="cuda"``. Every element is summed in input order, so the result is the same to
    the bit whatever the threads and budget.

    Raises:
        ConfigError: no sources, a coefficient count that does not match, an unknown precision, a bad
            ``threads``/``max_memory``/``device`` (CUDA asked for on a machine without it).
        IncompatibleCheckpoints: the sources differ in keys, shapes or dtype kinds.
        NonFiniteError: (while streaming) an input holds NaN/Inf, unless ``allow_nonfinite``.
    """
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
    _refuse_uncombinable(ref, keys, op)
    entries = [(k, *ref.info(k)) for k in keys]
    tied = dict(ref.aliases)
    acc_dtype = PRECISIONS[precision]
    coeffs = [float(c) for c in coefficients]

    def wide_of(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if (dtype == torch.float64 or acc_dtype == torch.float64) else acc_dtype

    floats = [k for k in keys if ref.info(k)[0].is_floating_point]
    in_size = max((ck.info(k)[0].itemsize for ck in cks for k in floats), default=1)
    out_size = max((ref.info(k)[0].itemsize for k in floats), default=1)
    cast = max((wide_of(ref.info(k)[0]).itemsize for k in floats if wide_of(ref.info(k)[0]) != ref.info(k)[0]),
               default=0)
    ex = plan_execution(model_bytes=ref.nbytes, worker_bytes_per_elem=in_size + cast,
                        held_bytes_per_elem=out_size, threads=threads, max_memory=max_memory, device=device)
    on_gpu = ex.device.type == "cuda"

    def read(ck: Checkpoint, key: str, start: int, stop: int, slot: str = "read") -> torch.Tensor:
        need = (stop - start) * ck.info(key)[0].itemsize
        return ck.read_range(key, start, stop, thread_scratch(slot, need, pin=on_gpu))

    def combine(key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """out (flat, accumulation dtype) = Σ_j c_j·θ_j[start:stop] over the flattened tensor ``key``."""
        for j, (ck, c) in enumerate(zip(cks, coeffs)):
            t = read(ck, key, start, stop)
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

    def verify(key: str, start: int, stop: int, result: torch.Tensor) -> None:
        """Refuse a non-finite piece of the result (in its stored dtype) unless allowed. NaN/Inf in any input
        reaches the result whatever its coefficient, so one check of the result suffices; only then is each input
        checked, to name the file. Finite inputs with a non-finite result overflowed: that is refused too."""
        if allow_nonfinite or all_finite(result):
            return
        for ck in cks:
            check_finite(read(ck, key, start, stop, slot="check"), ck, key)
        raise NonFiniteError(f"{ref.source}: key {key!r}: {op} of finite inputs overflows {result.dtype} "
                             f"(the result holds Inf); use --allow-nonfinite to write it anyway",
                             path=ref.source, key=key)

    def combine_on_device(key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """combine() on the GPU: each input piece is read into pinned memory and copied to the device on this
        worker's own stream while the next one is read; the result comes back into ``out``."""
        wide = wide_of(ref.info(key)[0])
        stream = thread_cuda_stream(ex.device)
        events = thread_events(ex.device)
        with torch.cuda.stream(stream):
            acc = torch.empty(stop - start, dtype=wide, device=ex.device)
            for j, (ck, c) in enumerate(zip(cks, coeffs)):
                events[j % 2].synchronize()  # the copy that last read this pinned slot is done
                t = read(ck, key, start, stop, slot=f"pin{j % 2}").to(ex.device, non_blocking=True)
                events[j % 2].record(stream)
                if t.dtype.itemsize == 1 and t.dtype != wide:  # float8, as in combine()
                    t = t.to(wide)
                if j == 0:
                    if t.dtype == wide and c != 1.0:
                        torch.mul(t, c, out=acc)
                    else:
                        acc.copy_(t)
                        if c != 1.0:
                            acc.mul_(c)
                else:
                    acc.add_(t, alpha=c)
            out.copy_(acc, non_blocking=True)
        stream.synchronize()

    tied_lock = threading.Lock()
    tied_done: dict[str, torch.Tensor] = {}

    def compute(key: str) -> torch.Tensor:
        """The whole output tensor for ``key``, computed piece by piece on the calling thread."""
        dtype, shape = ref.info(key)
        if not dtype.is_floating_point:
            return ref[key]
        result = torch.empty(shape, dtype=dtype)
        flat = result.view(-1)
        for start, stop in ex.ranges(flat.numel()):
            run_piece(key, start, stop, flat[start:stop])
        return result

    def whole(key: str) -> torch.Tensor:
        """A tensor that is not split: integer buffers, empty tensors and tied groups (computed once)."""
        canon = tied.get(key, key)
        if canon not in tied.values():
            return compute(key)
        with tied_lock:
            if canon not in tied_done:
                tied_done[canon] = compute(canon)
            return tied_done[canon]

    def run_piece(key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """out (flat, stored dtype) ← the combined elements [start, stop) of ``key``."""
        wide = wide_of(out.dtype)
        if on_gpu:
            combine_on_device(key, start, stop, out)
        elif wide == out.dtype:
            combine(key, start, stop, out)
        else:
            acc = thread_scratch("acc", (stop - start) * wide.itemsize).view(wide)
            combine(key, start, stop, acc)
            out.copy_(acc)
        verify(key, start, stop, out)

    split = {k for k in floats if k not in tied and k not in set(tied.values())}
    pieces, produce = piece_streams(keys, ref.info, split, run_piece, whole, ex,
                                    lambda ks: tensor_progress(ks, len(ks), op, progress))

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
    shown = ",".join(f"{x:g}" for x in w[:8]) + (",..." if len(w) > 8 else "")
    if any(not math.isfinite(x) for x in w):
        raise ConfigError(f"weights {shown}: must be finite numbers")
    # Scale by the largest magnitude first: the scaled weights lie in [-1, 1], so their exact sum (fsum) neither
    # overflows nor underflows, and "sums to zero" means cancellation, not small weights.
    m = max((abs(x) for x in w), default=0.0)
    if m == 0.0:
        raise ConfigError(f"weights {shown}: they sum to zero, so they cannot be normalised")
    scaled = [x / m for x in w]
    s = math.fsum(scaled)
    if abs(s) < 1e-12:
        raise ConfigError(f"weights {shown}: they sum to zero, so they cannot be normalised")
    out = [x / s for x in scaled]
    if not all(math.isfinite(x) for x in out):
        raise ConfigError(f"weights {shown}: they nearly cancel, so normalising them overflows")
    return out


def uniform_soup_stream(sources: Sequence[Source], **kw: Any) -> TensorStream:
    """Streaming uniform soup: the plain mean of all ingredients.

    ``kw``: the options of ``linear_combination`` (precision, allow_nonfinite, progress, threads, max_memory,
    device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``."""
    n = len(sources)
    return linear_combination(sources, [1.0 / n] * n if n else [], op="uniform_soup", **kw)


def weighted_average_stream(sources: Sequence[Source], weights: Sequence[float], **kw: Any) -> TensorStream:
    """Streaming weighted average; weights are normalised to sum to 1 (the raw ones are recorded).

    ``kw``: the options of ``linear_combination`` (precision, allow_nonfinite, progress, threads, max_memory,
    device, ...).

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

    ``kw``: the options of ``linear_combination`` (precision, allow_nonfinite, progress, threads, max_memory,
    device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``; also a non-finite ``alpha``."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ConfigError(f"--alpha {alpha}: must be a finite number")
    return linear_combination([a, b], [1.0 - alpha, alpha], op="lerp", extra={"alpha": alpha}, **kw)


def task_vector_stream(a: Source, base: Source, **kw: Any) -> TensorStream:
    """Streaming task vector a − base over floating tensors (integer buffers are a's).

    ``kw``: the options of ``linear_combination`` (precision, allow_nonfinite, progress, threads, max_memory,
    device, ...).

    Raises:
        CheckpointError, SourceError: a source cannot be read.
        ConfigError, IncompatibleCheckpoints, NonFiniteError: as ``linear_combination``."""
    return linear_combination([a, base], [1.0, -1.0], op="task_vector", **kw)


def uniform_soup(sources: Sequence[Source], **kw: Any) -> StateDict:
    """Uniform soup (Wortsman et al. 2022): the mean of the ingredients' weights. In memory; raises what ``uniform_soup_stream`` raises."""
    return uniform_soup_stream(sources, **kw).to_dict()


def weighted_average(sources: Sequence[Source], weights: Sequence[float], **kw: Any) -> StateDict:
    """Weighted average of checkpoints; weights are normalised to sum to 1. In memory; raises what ``weighted_average_stream`` raises."""
    return weighted_average_stream(sources, weights, **kw).to_dict()


def lerp(a: Source, b: Source, alpha: float, **kw: Any) -> StateDict:
    """Linear interpolation (1−α)·a + α·b. In memory; raises what ``lerp_stream`` raises."""
    return lerp_stream(a, b, alpha, **kw).to_dict()


def task_vector(a: Source, base: Source, **kw: Any) -> StateDict:
    """Task vector τ = a − base (Ilharco et al. 2023). In memory; raises what ``task_vector_stream`` raises."""
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
             allow_nonfinite: bool = False, progress: bool = False, ema: bool | None = None,
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
    out: dict = {"a": ca.source, "b": cb.source, "total": total.as_dict()}
    if per_module or depth or regex:
        out["modules"] = [{"module": m, **d.as_dict()} for m, d in groups.items()]
    return out
