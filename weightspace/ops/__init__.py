"""ops: weights → weights, streamed tensor by tensor, no data — soups, interpolation, task vectors and the merge
methods of a registry, each a per-tensor formula on one engine (ops.engine). ``merge`` itself is
``weightspace.merge`` (or ``weightspace.ops.merge.merge``): the name ``weightspace.ops.merge`` is its module.
Distances return numbers: ``weightspace.analysis.distance``."""
from __future__ import annotations

from .merge import method_names, task_arithmetic, ties_merge
from . import datamerge as _datamerge, sparsify as _sparsify, spherical as _spherical  # noqa: F401  (register merge methods)
from .stream import (lerp, lerp_stream, task_vector, task_vector_stream, uniform_soup, uniform_soup_stream,
                     weighted_average, weighted_average_stream)

__all__ = ["uniform_soup", "weighted_average", "lerp", "task_vector", "uniform_soup_stream",
           "weighted_average_stream", "lerp_stream", "task_vector_stream", "method_names",
           "task_arithmetic", "ties_merge"]
