"""weightspace: what lies between checkpoints — soups, interpolation, distances and barrier curves.

A tiny surface in the spirit of safetensors::

    import weightspace as ws
    ck = ws.load("model.safetensors")                 # lazy Checkpoint: name -> tensor
    ws.save(ws.uniform_soup_stream(["a.pt", "b.safetensors"]), "soup.safetensors")  # streamed: flat memory, all cores
    soup = ws.uniform_soup(["a.pt", "b.safetensors"])  # or in memory: a state dict that remembers its provenance

The top level holds the verbs and the types they take and return; everything else lives in the layer it belongs
to, each subpackage listing its offer in ``__all__``: ``weightspace.io`` (load, save, Checkpoint),
``weightspace.ops`` (soups, interpolation, merges), ``weightspace.eval`` (Evaluator, Metrics, data,
models, transforms, BN recalibration and REPAIR), ``weightspace.search`` (greedy and learned soups, alignment),
``weightspace.analysis`` (distances, curves, similarity and CKA, criticality, probes, Head2Toe, saturation, feature taps),
``weightspace.hub`` (push), ``weightspace.experiments`` (recipes) and ``weightspace.errors`` (every exception).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr
from ._version import __version__ as __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports on first use
    # (tests/test_housekeeping.py keeps this block and _EXPORTS naming the same modules and names)
    from .analysis.curve import interpolation_curve
    from .analysis.distance import distance
    from .errors import WeightspaceError
    from .eval.data import load_data
    from .eval.evaluator import Evaluator
    from .hub import push_to_hub
    from .io.checkpoint import Checkpoint
    from .io.outputs import StateDict, TensorStream
    from .io.save import save
    from .io.sources import load
    from .ops.merge import merge, task_arithmetic, ties_merge
    from .ops.stream import (lerp, lerp_stream, task_vector, task_vector_stream, uniform_soup, uniform_soup_stream,
                             weighted_average, weighted_average_stream)
    from .search.align import align
    from .search.greedy import greedy_soup
    from .search.soups import soup_leaderboard

# Names are imported on first use (PEP 562), so `import weightspace.errors` or the CLI's `--help` does not pay
# for torch; `weightspace.load` and `from weightspace import load` work as with eager imports.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("load",), "io.sources"),
    **dict.fromkeys(("save",), "io.save"),
    **dict.fromkeys(("Checkpoint",), "io.checkpoint"),
    **dict.fromkeys(("StateDict", "TensorStream"), "io.outputs"),
    **dict.fromkeys(("uniform_soup", "weighted_average", "lerp", "task_vector", "uniform_soup_stream",
                     "weighted_average_stream", "lerp_stream", "task_vector_stream"), "ops.stream"),
    **dict.fromkeys(("merge", "task_arithmetic", "ties_merge"), "ops.merge"),
    **dict.fromkeys(("distance",), "analysis.distance"),
    **dict.fromkeys(("align",), "search.align"),
    **dict.fromkeys(("Evaluator",), "eval.evaluator"),
    **dict.fromkeys(("load_data",), "eval.data"),
    **dict.fromkeys(("greedy_soup",), "search.greedy"),
    **dict.fromkeys(("soup_leaderboard",), "search.soups"),
    **dict.fromkeys(("interpolation_curve",), "analysis.curve"),
    **dict.fromkeys(("push_to_hub",), "hub"),
    **dict.fromkeys(("WeightspaceError",), "errors"),
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "load", "save", "Checkpoint", "StateDict", "TensorStream",
    "uniform_soup", "weighted_average", "lerp", "task_vector", "distance",
    "uniform_soup_stream", "weighted_average_stream", "lerp_stream", "task_vector_stream",
    "merge", "task_arithmetic", "ties_merge", "align",
    "Evaluator", "load_data", "greedy_soup", "soup_leaderboard", "interpolation_curve",
    "push_to_hub", "WeightspaceError",
]
