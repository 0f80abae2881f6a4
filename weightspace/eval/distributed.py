"""torch.distributed for weightspace: join torchrun's process group, let only rank 0 write and print, split sweeps.

Two ways to use N processes (``--parallel``):

* ``data`` (the default): every evaluation is spread over the ranks: the Evaluator shards each dataset by whole
  global batches and all-gathers the logits, so every rank gets exactly the single-process metrics.
* ``points``: independent evaluations of a sweep (barrier-curve α points, leaderboard entries, a soup's
  individual ingredients) are dealt out to the ranks; each evaluates its points on the full data alone, and the
  results are all-gathered so every rank holds all of them in the original order. Sequential steps (the greedy
  soup's accept/reject pass) run on every rank alike.

Both give bit-identical metrics to one process (same batches, same reduction order). The library writes on every
rank that asks it to; the CLI lets only rank 0 print and write (``silence_other_ranks`` and
``weightspace.files.discard_writes`` in ranks ≠ 0).
"""
from __future__ import annotations

import os
import pickle
import sys
from typing import Any, Callable, Iterable, Sequence, TypeVar

from ..errors import ConfigError

__all__ = ["PARALLEL_MODES", "env_world_size", "world", "is_main", "init_from_env", "barrier", "teardown",
           "set_parallel", "parallel_mode", "splits_points", "split", "all_gather_objects", "sweep",
           "silence_other_ranks", "restore_output"]

T = TypeVar("T")
R = TypeVar("R")

PARALLEL_MODES = ("data", "points")
_mode = "data"          # process-wide default, set by --parallel
_owned_group = False    # whether init_from_env created the group (teardown destroys only that one)
_saved_streams: tuple[Any, Any, Any] | None = None


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by a distributed launcher).

    Raises:
        ConfigError: WORLD_SIZE is not an integer.
    """
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: expected an integer") from None


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if "torch.distributed" not in sys.modules and "torch" not in sys.modules:
        return 0, 1  # nothing imported torch yet, so no group can exist: stay cheap
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one rank that writes files and prints."""
    return world()[0] == 0


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op alone or when a group exists.

    With CUDA: NCCL for CUDA tensors, gloo for CPU tensors (--device cpu) and for the pickled results of
    all_gather_objects (torch sends object collectives over the CPU backend when there is one); this rank's GPU
    is cuda:LOCAL_RANK. Without CUDA: gloo for everything. Returns (rank, world size).

    Raises:
        ConfigError: WORLD_SIZE > 1 but this torch build has no torch.distributed.
    """
    global _owned_group
    if env_world_size() <= 1:
        return world()
    import torch
    import torch.distributed as dist
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        backend = backend or "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend or "gloo")
    _owned_group = True
    return world()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def teardown() -> None:
    """Destroy the process group if init_from_env created it."""
    global _owned_group
    if _owned_group:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        _owned_group = False


def set_parallel(mode: str | None) -> None:
    """Set the process-wide sweep mode ('data' or 'points'); None leaves it as it is.

    Raises:
        ConfigError: ``mode`` is not one of PARALLEL_MODES.
    """
    global _mode
    if mode is not None:
        _mode = parallel_mode(mode)


def parallel_mode(mode: str | None = None) -> str:
    """``mode`` checked, or the process-wide one when None.

    Raises:
        ConfigError: ``mode`` is not one of PARALLEL_MODES.
    """
    mode = _mode if mode is None else mode
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"parallel={mode}: expected {' or '.join(PARALLEL_MODES)}", param="parallel")
    return mode


def splits_points(evaluate: Any = None) -> bool:
    """Whether a sweep over ``evaluate`` is dealt out to the ranks: distributed and in 'points' mode (an Evaluator
    carries its own mode, fixed when it placed its data; a plain function follows the process-wide mode)."""
    return world()[1] > 1 and parallel_mode(getattr(evaluate, "parallel", None)) == "points"


def split(items: Sequence[T]) -> list[T]:
    """This rank's share of a sweep: items rank, rank + W, rank + 2W, ... (all of them in a single process)."""
    rank, size = world()
    return list(items)[rank::size]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; [obj] in a single process."""
    _, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling (so other ranks re-raise the same error), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def sweep(fn: Callable[[T], R], items: Sequence[T], evaluate: Any = None, *,
          bar: Callable[[Sequence[T]], Iterable[T]] | None = None) -> list[R]:
    """``[fn(x) for x in items]``; with --parallel points under torchrun each rank computes its share and every
    rank gets all results in the original order. ``bar`` wraps the items this rank works on (a progress bar).

    An error in any rank's share is raised on every rank (the lowest failing index wins), so no rank is left
    waiting in a collective and every rank exits the same way.

    Raises:
        Exception: whatever ``fn`` raises on any rank (the lowest failing index), on every rank.
    """
    items = list(items)
    wrap = bar or (lambda xs: xs)
    if not splits_points(evaluate):
        return [fn(x) for x in wrap(items)]
    rank, size = world()
    mine = list(range(rank, len(items), size))
    done: list[tuple[int, bool, Any]] = []
    for i, x in zip(mine, wrap([items[i] for i in mine])):
        try:
            done.append((i, True, fn(x)))
        except Exception as e:  # report it through the gather below instead of leaving the others hanging
            done.append((i, False, _portable(e)))
            own_error = e
            break
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    for part in all_gather_objects(done):
        for i, ok, value in part:
            (results if ok else errors)[i] = value
    if errors:
        first = min(errors)
        if first in mine:
            raise own_error
        raise errors[first]
    return [results[i] for i in range(len(items))]


def silence_other_ranks() -> None:
    """On ranks ≠ 0, send stdout and stderr (notes, progress bars, warnings) to the null device; an uncaught
    exception still prints its traceback on the real stderr."""
    global _saved_streams
    if is_main() or _saved_streams is not None:
        return
    _saved_streams = (sys.stdout, sys.stderr, sys.excepthook)
    sink = open(os.devnull, "w")
    sys.stdout = sys.stderr = sink

    def hook(*exc: Any) -> None:
        restore_output()
        sys.__excepthook__(*exc)
    sys.excepthook = hook


def restore_output() -> str:
    """Undo silence_other_ranks; returns a tag naming this rank (" (rank N)") when it had been silenced, else ""."""
    global _saved_streams
    if _saved_streams is None:
        return ""
    sys.stdout, sys.stderr, sys.excepthook = _saved_streams
    _saved_streams = None
    return f" (rank {world()[0]})"
