"""The one streaming engine: every op that combines tensors states its per-tensor formula, the engine does the rest.

The engine reads each floating tensor of its inputs in flat pieces (into pinned memory with a GPU), runs the
formula on worker threads (ops.parallel) on the CPU or on a CUDA device, casts the result to the stored dtype,
checks it and hands it to ``save`` as a ``TensorStream``; tied names are computed once, integer and bool buffers
are passed through, progress is counted in tensors. Soups, lerp and task vectors (ops.stream) and every merge
method (ops.merge) are formulas on it, so each inherits every guarantee: bounded memory, bit-identical bytes
whatever the threads and memory budget, one-line errors naming the file and key.

An op, in four steps (``ops.stream.linear_combination`` and ``ops.merge.merge`` are the two in the package):

1. Open the inputs and build ``Engine(inputs, scratch=..., whole=...)``. ``inputs[0]`` is the reference (its
   keys, dtypes, tied names and integer buffers are the output's). ``scratch`` is how many temporaries in the
   accumulation dtype the formula holds per element of a piece (it sizes the pieces under the memory budget);
   ``whole(key)`` says which keys the formula needs as one piece.
2. Optionally run first passes with ``engine.map_pieces(fn, desc)``: ``fn(piece)`` runs on the workers for every
   piece of every floating key and its results come back in order. A *global* pass reduces over the whole model
   (TIES's top-k threshold: integer histograms, the same whatever the order); a *per-key* pass collects
   per-key scalars into a dict keyed by ``piece.key`` (TIES's per-tensor thresholds). A per-key quantity that
   must not depend on the piece split (a norm or an angle for slerp, a random mask for DARE) is computed on a
   whole tensor: list the key in ``whole``, and its pass and its output both see one piece covering the tensor.
   A pass that has read every input once sets ``engine.checked`` so that later reads skip the NaN/Inf scan.
3. Write the formula: a ``Formula`` whose ``combine(piece, out)`` fills ``out`` (flat, in the accumulation
   dtype, on the engine's device) from ``piece.read(j)`` (input j's raw elements) or ``piece.wide(j)`` (a fresh
   copy in the accumulation dtype). It must be elementwise given what the first passes computed, deterministic
   and thread-safe (several pieces run at once).
4. Return ``engine.stream(formula, provenance, desc)``.

Checks: each input is checked for NaN/Inf as it is read (a formula that propagates NaN/Inf from any input to the
result, as a linear combination does, sets ``propagates_nonfinite`` and only its result is checked; the inputs
are then read again only to name the file). A non-finite result of finite inputs overflowed: refused in one line
unless ``allow_nonfinite``. Every op validates its scalars (``finite_scalar``) before reading anything.

Running statistics (BatchNorm's ``running_mean``/``running_var``, recognised by name) are not weights: an
extrapolating formula (task arithmetic, TIES, λ > 1, a negative coefficient) would make variances negative. The
engine combines them, whatever the op's formula, as a convex mean of the inputs' statistics (``stat_weights``:
the op's coefficients when they are convex, else uniform; ``buffers="first"``: the first input's), and refuses
an output holding a negative running variance. Ops whose output is not a model (a task vector) pass
``buffers="formula"``: their statistics follow the formula and are not checked.
"""
from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Mapping
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from ..errors import ConfigError, IncompatibleCheckpoints, InvalidStatistics, NonFiniteError, key_sample
from ..options import EmaChoice
from ..io.checkpoint import Checkpoint, Source
from ..io.sources import load
from ..io.outputs import TensorStream
from .parallel import (Execution, ordered_map, piece_streams, plan_execution, thread_cuda_stream, thread_events,
                       thread_scratch)

__all__ = ["PRECISIONS", "check_compatible", "all_finite", "check_finite", "named_sources", "dtype_note", "tensor_progress", "finite_scalar", "combinable",
           "Engine", "Piece", "Formula", "Convex", "BUFFER_POLICIES", "RUNNING_STATS", "running_statistic",
           "convex_weights"]

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}

T = TypeVar("T")

#: how running statistics are combined: a convex mean of the inputs' (the op's weights when convex, else
#: uniform), or the first input's; "formula" (outputs that are not models: task vectors) lets the op's formula run
BUFFER_POLICIES = ("mean", "first")
RUNNING_STATS = ("running_mean", "running_var")


def running_statistic(key: str) -> bool:
    """Whether ``key`` names a normalisation layer's running statistic (BatchNorm's ``running_mean``/``running_var``)."""
    return key.rsplit(".", 1)[-1] in RUNNING_STATS


def convex_weights(coefficients: Sequence[float], members: Sequence[bool] | None = None) -> list[float]:
    """The weights of the running statistics' mean: ``coefficients`` when they are convex (each ≥ 0, summing to 1),
    else the uniform mean over ``members`` (default: every input; inputs outside get 0; none at all: the first)."""
    c = [float(x) for x in coefficients]
    if c and all(x >= 0 for x in c) and abs(math.fsum(c) - 1.0) <= 1e-6:
        return c
    members = list(members) if members is not None else [True] * len(c)
    n = sum(members)
    if n == 0:
        return [1.0] + [0.0] * (len(c) - 1)
    return [1.0 / n if m else 0.0 for m in members]


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


def _widest(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype every one of ``dtypes`` converts to without loss: fp16 and fp32 give fp32, fp16 and bf16 fp32
    (neither holds the other), int32 and int64 int64; a float8 gives way to any wider float."""
    out = dtypes[0]
    for d in dtypes[1:]:
        if d == out:
            continue
        try:
            out = torch.promote_types(out, d)
        except RuntimeError:  # float8 types do not promote in torch: the wider one holds the narrower
            out = max(out, d, key=lambda x: x.itemsize) if out.itemsize != d.itemsize else torch.float32
    return out


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
        raise NonFiniteError(f"{ck.source}: key '{key}' holds {bad} values (use allow_nonfinite=True to combine anyway)",
                             path=ck.source, key=key)


def named_sources(sources: Sequence[Source] | Mapping[str, Source], names: Sequence[str] | None = None,
                  ema: EmaChoice | bool | None = None) -> list[Source]:
    """The ingredients of an op, in-memory ones named: ``sources`` is a sequence (named by ``names``, if given) or
    a mapping name → source. An in-memory ingredient (state dict, module, Checkpoint without files) is opened and
    takes its name as its ``source``, which provenance, leaderboards and kept results show; a path or source
    string is named by itself.

    Raises:
        ConfigError: ``names`` and a mapping together, a count that does not match, a repeated name, or a name
            given to a path or source string that differs from it.
    """
    if isinstance(sources, Mapping):
        if names is not None:
            raise ConfigError("names: give a mapping name → source or names=, not both", param="names")
        if any(isinstance(v, torch.Tensor) for v in sources.values()):
            raise ConfigError("sources: a single state dict; give a list of ingredients or a mapping name → "
                              "state dict", param="sources")
        names, sources = [str(k) for k in sources], list(sources.values())
    if names is None:
        return list(sources)
    names = [str(n) for n in names]
    if len(names) != len(sources):
        raise ConfigError(f"names: {len(names)} names for {len(sources)} ingredients", param="names")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"names: {dup!r} names two ingredients", param="names")
    out: list[Source] = []
    for name, src in zip(names, sources):
        if isinstance(src, (str, os.PathLike)):
            if name != os.fspath(src):
                raise ConfigError(f"names: {name!r} given to {os.fspath(src)}: a file is named by its path; names "
                                  f"are for ingredients in memory", param="names")
            out.append(src)
            continue
        ck = load(src, ema=ema)
        if ck.files and name != ck.source:
            raise ConfigError(f"names: {name!r} given to {ck.source}: a file is named by its path; names are for "
                              f"ingredients in memory", param="names")
        if not ck.files:
            if ck is src:  # the caller's own Checkpoint: name a copy, not theirs
                ck = copy.copy(ck)
            ck.source = name
        out.append(ck)
    return out


def dtype_note(provenance: dict) -> str | None:
    """One line saying which tensors took a wider dtype than some input's (None when none did)."""
    rules = provenance.get("dtypes_promoted")
    if not rules:
        return None
    said = "; ".join(f"{n} tensor{'s' if n > 1 else ''} {rule}" for rule, n in rules.items())
    return f"inputs mix dtypes: {said} (the widest; --dtype sets the output dtype)"


def tensor_progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T]:
    """``iterable`` with a progress bar counted in tensors on stderr (``iterable`` itself when not ``enabled``)."""
    from ..progress import progress
    return progress(iterable, total=total, desc=desc, unit="tensor", enabled=enabled)


def finite_scalar(value: float, param: str, acc: torch.dtype = torch.float32) -> float:
    """``value`` as a float, refused unless it is finite and representable in the accumulation dtype ``acc`` (a
    coefficient beyond float32's range cannot scale a float32 tensor at all).

    Raises:
        ConfigError: not a number, NaN/Inf, or out of ``acc``'s range; ``param`` names the parameter.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{param}={value!r} must be a number", param=param) from None
    if not math.isfinite(v):
        raise ConfigError(f"{param}={v} must be a finite number", param=param)
    limit = torch.finfo(acc).max
    if abs(v) > limit:
        hint = "" if acc == torch.float64 else "; --precision fp64 accumulates in float64"
        raise ConfigError(f"{param}={v:g} is out of range: |{param}| ≤ {limit:.4g} in {acc} arithmetic{hint}",
                          param=param)
    return v


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


class Piece:
    """Elements [start, stop) of one floating key, flattened, as a formula sees them on a worker thread."""

    def __init__(self, engine: "Engine", key: str, start: int, stop: int):
        self.engine, self.key, self.start, self.stop = engine, key, start, stop

    def read(self, j: int, slot: str = "read") -> torch.Tensor:
        """Input ``j``'s elements in their stored dtype, on the engine's device, checked for NaN/Inf (see the
        module docstring). On the CPU the tensor is this worker's scratch, valid until its next read."""
        return self.engine.read(j, self.key, self.start, self.stop, slot)

    def wide(self, j: int) -> torch.Tensor:
        """Input ``j``'s elements as a fresh tensor in the accumulation dtype (the formula may modify it)."""
        return self.read(j).to(self.engine.wide(self.key), copy=True)


class Formula:
    """The per-tensor formula of an op (see the module docstring); subclasses override ``combine``."""

    #: NaN/Inf in any input always reaches the result: the engine checks the result, not each input read
    propagates_nonfinite: bool = False

    def combine(self, piece: Piece, out: torch.Tensor) -> None:
        """Fill ``out`` (flat, accumulation dtype, on the engine's device) with the result over ``piece``."""
        raise NotImplementedError


def _negative(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds a value below zero (NaN is not)."""
    return t.numel() > 0 and float((t.float() if t.dtype.itemsize == 1 else t).min()) < 0


class Convex(Formula):
    """out = Σ_j w_j·θ_j over the inputs with w_j ≠ 0: the running statistics' convex mean."""

    propagates_nonfinite = True

    def __init__(self, weights: Sequence[float]):
        self.weights = [float(w) for w in weights]
        self.terms = [(j, w) for j, w in enumerate(self.weights) if w != 0.0]

    def combine(self, piece: Piece, out: torch.Tensor) -> None:
        for i, (j, w) in enumerate(self.terms):
            t = piece.read(j)
            if t.dtype.itemsize == 1 and t.dtype != out.dtype:  # float8: torch does no arithmetic promotion for it
                t = t.to(out.dtype)
            if i == 0:
                out.copy_(t)
                if w != 1.0:
                    out.mul_(w)
            else:
                out.add_(t, alpha=w)


class Engine:
    """Reads, places, combines, checks and streams the tensors of ``inputs`` (see the module docstring).

    Raises:
        ConfigError: a bad ``threads``/``max_memory``/``device``/``buffers``.
        IncompatibleCheckpoints: the inputs differ in keys, shapes or dtype kinds, or hold a dtype no formula can
            combine (complex, packed 4-bit).
    """

    def __init__(self, inputs: Sequence[Checkpoint], *, op: str, precision: str = "fp32",
                 allow_nonfinite: bool = False, progress: bool = False, scratch: int = 0,
                 whole: Callable[[str], bool] | None = None, threads: int | None = None,
                 max_memory: int | str | None = None, device: str | torch.device | None = None,
                 buffers: str = "mean", stat_weights: Sequence[float] | None = None):
        self.inputs = list(inputs)
        check_compatible(self.inputs)
        self.ref = self.inputs[0]
        self.op, self.allow_nonfinite, self.progress = op, allow_nonfinite, progress
        self.acc_dtype = PRECISIONS[precision]
        self.keys = sorted(self.ref)
        self.tied = dict(self.ref.aliases)
        self.dtypes = {k: _widest([ck.info(k)[0] for ck in self.inputs]) for k in self.keys}
        self.checked = False  # set once a full pass has checked every input for NaN/Inf
        self._whole = whole or (lambda key: False)
        for ck in self.inputs:
            for k in self.keys:
                dtype = ck.info(k)[0]
                if not combinable(dtype):
                    raise IncompatibleCheckpoints(f"{ck.source}: key {k!r} is {dtype}, which {op} cannot combine "
                                                  f"(only real floating tensors are combined; integer and bool "
                                                  f"buffers are copied)", path=ck.source, key=k)
        self.ex: Execution = self._plan(scratch, threads, max_memory, device)
        if buffers not in (*BUFFER_POLICIES, "formula"):
            raise ConfigError(f"buffers={buffers}: expected one of {', '.join(BUFFER_POLICIES)}", param="buffers")
        n = len(self.inputs)
        weights = [1.0] + [0.0] * (n - 1) if buffers == "first" else list(stat_weights or [1.0 / n] * n)
        if len(weights) != n:
            raise ConfigError(f"stat_weights: {len(weights)} weights for {n} inputs", param="stat_weights")
        self.buffers = buffers
        self.stats = Convex(weights) if buffers != "formula" else None

    def statistic(self, key: str) -> bool:
        """Whether ``key`` is a running statistic that the buffer policy combines (not the op's formula)."""
        return self.stats is not None and running_statistic(key) and self.dtypes[key].is_floating_point

    def buffer_provenance(self) -> dict | None:
        """How running statistics were combined, for provenance (None when the inputs hold none)."""
        keys = [k for k in self.keys if self.statistic(k)]
        if not keys or self.stats is None:
            return None
        return {"policy": self.buffers, "weights": self.stats.weights, "tensors": len(keys)}

    def statistics(self, key: str) -> torch.Tensor:
        """The whole output tensor of running statistic ``key`` under the buffer policy, checked."""
        assert self.stats is not None
        return self._compute(self.stats, key)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The output dtype and shape of ``key``: the widest dtype of the inputs (fp16 and fp32 give fp32)."""
        return self.dtypes[key], self.ref.info(key)[1]

    def promoted(self) -> dict[str, int]:
        """How many tensors had inputs of mixed dtypes, by rule: ``{"float16+float32→float32": 12}`` (empty when
        every input stores every tensor alike). Provenance records it as ``dtypes_promoted``."""
        out: dict[str, int] = {}
        for k in self.keys:
            have = sorted({str(ck.info(k)[0]).replace("torch.", "") for ck in self.inputs})
            if len(have) > 1:
                rule = "+".join(have) + "→" + str(self.dtypes[k]).replace("torch.", "")
                out[rule] = out.get(rule, 0) + 1
        return out

    def _plan(self, scratch: int, threads: int | None, max_memory: int | str | None,
              device: str | torch.device | None) -> Execution:
        """Threads and pieces: a worker holds one read, ``scratch`` wide temporaries and, where the stored dtype is
        narrower than the accumulation dtype, one accumulator per element; each piece in flight its result."""
        floats = [k for k in self.keys if self.dtypes[k].is_floating_point]
        in_size = max((ck.info(k)[0].itemsize for ck in self.inputs for k in floats), default=1)
        out_size = max((self.dtypes[k].itemsize for k in floats), default=1)
        wide = max((self.wide(k).itemsize for k in floats), default=4)
        cast = max((self.wide(k).itemsize for k in floats if self.wide(k) != self.dtypes[k]), default=0)
        return plan_execution(model_bytes=self.ref.nbytes, worker_bytes_per_elem=in_size + cast + scratch * wide,
                              held_bytes_per_elem=out_size, threads=threads, max_memory=max_memory, device=device)

    @property
    def on_gpu(self) -> bool:
        """Whether pieces are combined on a CUDA device."""
        return self.ex.device.type == "cuda"

    def wide(self, key: str) -> torch.dtype:
        """The accumulation dtype of one key (float64 stays float64)."""
        dtype = self.dtypes[key]
        return torch.float64 if torch.float64 in (dtype, self.acc_dtype) else self.acc_dtype

    def float_keys(self) -> list[str]:
        """Floating keys, each tied group once (its canonical name)."""
        return [k for k in self.keys if k not in self.tied and self.dtypes[k].is_floating_point]

    def num_float_elements(self) -> int:
        """Entries of one floating input over the whole model that the formula combines (each tied group once;
        running statistics, which the buffer policy combines, left out: they must not move a global threshold)."""
        return sum(math.prod(self.ref.info(k)[1]) for k in self.float_keys() if not self.statistic(k))

    def ranges(self, key: str) -> Iterator[tuple[int, int]]:
        """The flat pieces [start, stop) of one key: one covering it for a key the formula needs whole."""
        n = math.prod(self.ref.info(key)[1])
        if self._whole(key):
            return iter([(0, n)] if n else [])
        return self.ex.ranges(n)

    def read(self, j: int, key: str, start: int, stop: int, slot: str = "read") -> torch.Tensor:
        """Elements [start, stop) of input ``j``'s tensor ``key``, flat, on the device: on the CPU into this
        worker's scratch ``slot``; with a GPU into one of two pinned slots, copied on the worker's own stream."""
        ck = self.inputs[j]
        need = (stop - start) * ck.info(key)[0].itemsize
        if not self.on_gpu:
            t = ck.read_range(key, start, stop, thread_scratch(slot, need))
        else:
            events = thread_events(self.ex.device)
            events[j % 2].synchronize()  # the copy that last read this pinned slot is done
            host = ck.read_range(key, start, stop, thread_scratch(f"pin{j % 2}", need, pin=True))
            t = host.to(self.ex.device, non_blocking=True)
            events[j % 2].record(thread_cuda_stream(self.ex.device))
        if not (self.allow_nonfinite or self.checked or self._propagates):
            check_finite(t, ck, key)
        return t

    _propagates = False  # while streaming a formula that propagates NaN/Inf: reads are not checked one by one

    def map_pieces(self, fn: Callable[[Piece], T], desc: str) -> Iterator[T]:
        """``fn(piece)`` for every piece of every floating key (tied groups once), on the worker threads (on
        their CUDA streams with a GPU); results in piece order."""
        def tasks() -> Iterator[tuple[str, int, int]]:
            keys = self.float_keys()
            for key in tensor_progress(keys, len(keys), desc, self.progress):
                for start, stop in self.ranges(key):
                    yield key, start, stop

        return ordered_map(lambda task: self.on_worker(fn, Piece(self, *task)), tasks(), self.ex.threads,
                           self.ex.depth)

    def on_worker(self, fn: Callable[[Piece], T], piece: Piece) -> T:
        """``fn(piece)`` on the calling thread (and its CUDA stream, synchronised before returning)."""
        if not self.on_gpu:
            return fn(piece)
        stream = thread_cuda_stream(self.ex.device)
        with torch.cuda.stream(stream):
            out = fn(piece)
        stream.synchronize()
        return out

    def _run_piece(self, formula: Formula, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """out (flat, stored dtype) ← the formula over elements [start, stop) of ``key``, checked (a running
        statistic: the buffer policy's mean instead of the op's formula)."""
        if self.statistic(key):
            assert self.stats is not None
            formula = self.stats
        wide = self.wide(key)
        piece = Piece(self, key, start, stop)
        if self.on_gpu:
            def on_device(p: Piece) -> None:
                acc = torch.empty(stop - start, dtype=wide, device=self.ex.device)
                formula.combine(p, acc)
                out.copy_(acc, non_blocking=True)
            self.on_worker(on_device, piece)
        elif wide == out.dtype:
            formula.combine(piece, out)
        else:
            acc = thread_scratch("acc", (stop - start) * wide.itemsize).view(wide)
            formula.combine(piece, acc)
            out.copy_(acc)
        self._verify(formula, piece, out)

    def _verify(self, formula: Formula, piece: Piece, result: torch.Tensor) -> None:
        """Refuse a non-finite piece of the result (in its stored dtype) unless allowed: first name an input
        holding NaN/Inf (inputs not yet checked as they were read), else the result overflowed. A running variance
        below zero is refused whatever the options: no normalisation layer can use it."""
        if self.stats is not None and piece.key.endswith("running_var") and _negative(result):
            for j, ck in enumerate(self.inputs):  # name an input that holds one, if any does
                if _negative(self.read(j, piece.key, piece.start, piece.stop, slot="check")):
                    raise InvalidStatistics(f"{ck.source}: key {piece.key!r} holds a negative running variance; no "
                                            f"{self.op} of it is a valid BatchNorm", path=ck.source, key=piece.key)
            raise InvalidStatistics(f"{self.ref.source}: key {piece.key!r}: the {self.op} output holds a negative "
                                    f"running variance; running statistics must be a convex mean of valid ones "
                                    f"(buffers='mean')", path=self.ref.source, key=piece.key)
        if self.allow_nonfinite or all_finite(result):
            return
        if formula.propagates_nonfinite:
            for j, ck in enumerate(self.inputs):
                check_finite(self.read(j, piece.key, piece.start, piece.stop, slot="check"), ck, piece.key)
        flat = result.float() if result.dtype.itemsize == 1 else result
        bad = "NaN" if bool(torch.isnan(flat).any()) else "Inf"
        raise NonFiniteError(f"{self.ref.source}: key {piece.key!r}: {self.op} of finite inputs overflows "
                             f"{result.dtype} (the result holds {bad}); use allow_nonfinite=True to write it anyway",
                             path=self.ref.source, key=piece.key)

    def _compute(self, formula: Formula, key: str) -> torch.Tensor:
        """The whole output tensor of ``key``, its pieces computed on the calling thread."""
        dtype, shape = self.info(key)
        if not dtype.is_floating_point:
            return self.buffer(key)
        result = torch.empty(shape, dtype=dtype)
        flat = result.view(-1)
        for start, stop in self.ranges(key):
            self._run_piece(formula, key, start, stop, flat[start:stop])
        return result

    def buffer(self, key: str) -> torch.Tensor:
        """An integer buffer takes the largest value of the inputs (``num_batches_tracked``: the longest-trained
        model's count, whichever input comes first); a bool buffer is the first input's."""
        t = self.ref[key]
        if t.dtype == torch.bool:
            return t
        for ck in self.inputs[1:]:
            t = torch.maximum(t, ck[key])
        return t.to(self.dtypes[key])

    def stream(self, formula: Formula, provenance: dict, desc: str | None = None) -> TensorStream:
        """The op's result, streamed: ``formula`` over every floating key, integer and bool buffers from
        ``inputs[0]``, each tied group computed once; ``desc`` labels the progress bar (default: the op).

        Raises (while streaming):
            NonFiniteError: an input holds NaN/Inf or the result overflows, unless ``allow_nonfinite``.
            InvalidStatistics: a running variance of the result is negative.
        """
        self._propagates = formula.propagates_nonfinite
        lock = threading.Lock()
        tied_done: dict[str, torch.Tensor] = {}

        def whole(key: str) -> torch.Tensor:
            """Integer buffers, empty tensors, keys needed whole, and tied groups (computed once)."""
            canon = self.tied.get(key, key)
            if canon not in self.tied.values():
                return self._compute(formula, key)
            with lock:
                if canon not in tied_done:
                    tied_done[canon] = self._compute(formula, canon)
                return tied_done[canon]

        canonical = set(self.tied.values())
        split = {k for k in self.float_keys() if k not in canonical and not self._whole(k)}
        entries = [(k, *self.info(k)) for k in self.keys]
        pieces, produce = piece_streams(
            self.keys, self.info, split, lambda k, a, b, out: self._run_piece(formula, k, a, b, out), whole,
            self.ex, lambda ks: tensor_progress(ks, len(ks), desc or self.op, self.progress))
        return TensorStream(entries, produce, provenance, self.inputs, self.tied, pieces)
