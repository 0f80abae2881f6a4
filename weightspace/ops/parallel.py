"""Streamed ops on every core: pieces of tensors computed by worker threads and handed over in order.

An op splits each floating tensor into flat pieces and computes them on worker threads (torch's kernels and
``os.preadv`` release the GIL, so threads run truly in parallel), while the calling thread writes the pieces
already done: reading, combining and writing overlap. Results are handed over in task order, so a writer sees the
same sequence whatever the number of threads.

Determinism: every op combines each element with the same operations in the same order whatever the piece size or
thread count, and each worker runs torch on one thread (no kernel splits a piece further). Piece boundaries are
multiples of ``ALIGN`` elements, so a vectorised kernel's scalar tail falls on the same elements as when the
whole tensor is processed at once: results are bit-identical across thread counts and memory budgets.

Memory: the pieces in flight (``depth`` of them, plus the two a consumer may hold) and each worker's scratch are
sized under a budget (``max_memory``; by default an eighth of one checkpoint, between 4 MiB and 1 GiB).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from ..errors import ConfigError
from ..io.sizes import parse_size

__all__ = ["ALIGN", "Execution", "BufferPool", "cpu_count", "single_thread", "plan_execution", "ordered_map",
           "ops_device", "thread_scratch", "thread_cuda_stream", "thread_events", "piece_streams"]

ALIGN = 1 << 10  # elements: piece starts and lengths are multiples of this (see the module docstring)
MIN_BUDGET = 4 << 20
MAX_BUDGET = 1 << 30
MAX_PIECE_BYTES = 64 << 20  # beyond this a larger piece reads no faster from the page cache

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The cores this process may run on ($WEIGHTSPACE_THREADS overrides)."""
    env = os.environ.get("WEIGHTSPACE_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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


def ops_device(device: str | torch.device | None) -> torch.device:
    """The device an op combines on: ``None``, ``"auto"`` and ``"cpu"`` give the CPU (results bit-identical to
    every earlier release); ``"cuda[:N]"`` a GPU, asked for explicitly.

    Raises:
        ConfigError: CUDA was asked for and is not available, or the name is not a device.
    """
    if device is None or str(device) in ("auto", "cpu"):
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device}: expected auto, cpu or cuda[:N]", param="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda}); use device='cpu'", param="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)", param="device")
        return dev
    if dev.type != "cpu":
        raise ConfigError(f"device={device}: ops run on cpu or cuda[:N]", param="device")
    return dev


@dataclass(frozen=True)
class Execution:
    """How an op runs: worker threads, elements per piece, pieces in flight, and where it combines."""

    threads: int
    piece: int  # elements per piece, a multiple of ALIGN
    depth: int
    device: torch.device
    budget: int  # bytes the pieces and scratch were sized under

    def ranges(self, numel: int) -> Iterator[tuple[int, int]]:
        """The flat pieces [start, stop) of a tensor of ``numel`` elements."""
        for start in range(0, numel, self.piece):
            yield start, min(numel, start + self.piece)


def plan_execution(*, model_bytes: int, worker_bytes_per_elem: int, held_bytes_per_elem: int,
                   threads: int | None = None, max_memory: int | str | None = None,
                   device: str | torch.device | None = None) -> Execution:
    """Choose threads, piece size and depth so that the pieces in flight and the workers' scratch fit the budget.

    ``worker_bytes_per_elem`` is the scratch one worker holds per element of a piece (its reads and
    accumulators), ``held_bytes_per_elem`` what each piece in flight holds until it is written.

    Raises:
        ConfigError: a bad ``threads``, ``max_memory`` or ``device``.
    """
    dev = ops_device(device)
    if threads is None:
        threads = cpu_count()
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads {threads!r}: must be a positive integer")
    budget = parse_size(max_memory)
    if budget is None:
        budget = min(MAX_BUDGET, max(MIN_BUDGET, model_bytes // 8))
    depth = 2 * threads
    per_elem = threads * worker_bytes_per_elem + (depth + 2) * held_bytes_per_elem
    piece = budget // max(1, per_elem)
    piece = min(piece, MAX_PIECE_BYTES // max(1, held_bytes_per_elem, worker_bytes_per_elem))
    piece = max(ALIGN, piece // ALIGN * ALIGN)  # a budget below one aligned piece per slot still runs
    return Execution(threads, piece, depth, dev, budget)


def _worker_init() -> None:
    # One torch thread per worker: the workers are the parallelism, and a kernel that split a piece across
    # threads would both oversubscribe the cores and move the vector loops' scalar tails. Under OpenMP (torch's
    # CPU backend on Linux) the setting is per thread: the caller's own thread count is untouched.
    torch.set_num_threads(1)


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], threads: int, depth: int) -> Iterator[R]:
    """``fn(task)`` for every task on ``threads`` worker threads; results come back in task order, with at most
    ``depth`` tasks submitted and not yet handed over. Tasks are drawn lazily. An exception raised by ``fn`` is
    raised here when its result is due; abandoning the iterator cancels the tasks not yet started."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="weightspace", initializer=_worker_init)
    pending: deque[Future] = deque()
    it = iter(tasks)
    done = False
    try:
        while True:
            while not done and len(pending) < max(1, depth):
                try:
                    task = next(it)
                except StopIteration:
                    done = True
                    break
                pending.append(pool.submit(fn, task))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


class BufferPool:
    """Reusable byte buffers for pieces in flight: a piece's buffer goes back to the pool once it is written,
    so a streamed op allocates ``size`` buffers in all, not one per piece."""

    def __init__(self, nbytes: int, pin: bool = False):
        self.nbytes = nbytes
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor:
        """A buffer of ``nbytes`` (uint8), from the pool or new."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer for reuse."""
        with self._lock:
            self._free.append(buf)


_local = threading.local()


def thread_scratch(name: str, nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of at least ``nbytes`` owned by the calling thread, reused across pieces (grown when
    needed): reads land in memory that is already mapped and still in the core's cache."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get((name, pin))
    if buf is None or buf.numel() < nbytes:
        buf = bufs[(name, pin)] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
    return buf[:nbytes]


def thread_cuda_stream(device: torch.device) -> "torch.cuda.Stream":
    """The calling thread's own CUDA stream on ``device``: workers' copies and kernels overlap each other."""
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def thread_events(device: torch.device) -> list["torch.cuda.Event"]:
    """Two CUDA events of the calling thread, one per pinned read slot (a slot is refilled only after the copy
    that last read it has finished)."""
    events = getattr(_local, "events", None)
    if events is None:
        events = _local.events = {}
    if device not in events:
        events[device] = [torch.cuda.Event(), torch.cuda.Event()]
        for e in events[device]:
            e.record(thread_cuda_stream(device))
    return events[device]


def piece_streams(keys: list[str], info: Callable[[str], tuple[torch.dtype, tuple[int, ...]]], split: set[str],
                  run_piece: Callable[[str, int, int, torch.Tensor], None], whole: Callable[[str], torch.Tensor],
                  ex: Execution, iterate_keys: Callable[[list[str]], Iterable[str]] = iter,
                  ) -> tuple[Callable[[], Iterator[tuple[str, torch.Tensor]]], Callable[[], Iterator[tuple[str, torch.Tensor]]]]:
    """The two ways an op's result streams, both computed on ``ex.threads`` workers and handed over in key order:

    ``pieces()`` yields flat pieces of the keys in ``split`` (each into a buffer of a small pool: a piece stays
    valid until the piece after the next one is requested) and other keys whole; ``produce()`` yields whole
    tensors, their pieces computed in parallel straight into place. ``run_piece(key, start, stop, out)`` fills
    ``out`` (flat, stored dtype) on a worker; ``whole(key)`` returns a key that is not split (also on a worker).
    ``iterate_keys`` wraps the key loop (a progress bar).
    """
    out_size = max((info(k)[0].itemsize for k in split), default=1)

    def work(task: tuple) -> tuple:
        key, start, stop, out, buf, final = task
        if out is None:
            return key, whole(key), buf, True
        run_piece(key, start, stop, out)
        return key, out, buf, final

    def tasks(split_tasks: Callable[[str, torch.dtype, tuple[int, ...], int], Iterator[tuple]]) -> Iterator[tuple]:
        """One task per whole tensor, or ``split_tasks``' pieces of a split one; lazily, as ordered_map asks."""
        for key in iterate_keys(keys):
            dtype, shape = info(key)
            n = math.prod(shape)
            if key not in split or n == 0:
                yield key, 0, n, None, None, None
            else:
                yield from split_tasks(key, dtype, shape, n)

    def pieces() -> Iterator[tuple[str, torch.Tensor]]:
        pool = BufferPool(ex.piece * out_size, pin=ex.device.type == "cuda")

        def into_buffers(key: str, dtype: torch.dtype, shape: tuple[int, ...], n: int) -> Iterator[tuple]:
            for start, stop in ex.ranges(n):
                buf = pool.take()
                yield key, start, stop, buf[: (stop - start) * dtype.itemsize].view(dtype), buf, None

        held: list[torch.Tensor] = []
        for key, t, buf, _ in ordered_map(work, tasks(into_buffers), ex.threads, ex.depth):
            yield key, t
            for old in held:  # the consumer asked for the piece after this one: the one before is free
                pool.give(old)
            held = [buf] if buf is not None else []

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        def into_tensor(key: str, dtype: torch.dtype, shape: tuple[int, ...], n: int) -> Iterator[tuple]:
            result = torch.empty(shape, dtype=dtype)
            flat = result.view(-1)
            for start, stop in ex.ranges(n):
                yield key, start, stop, flat[start:stop], None, (result if stop == n else None)

        for key, t, _, final in ordered_map(work, tasks(into_tensor), ex.threads, ex.depth):
            if final is True:
                yield key, t
            elif final is not None:  # the last piece of a tensor is done (its earlier pieces were due before it)
                yield key, final

    return pieces, produce
