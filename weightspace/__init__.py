"""weightspace: what lies between checkpoints — soups, interpolation, distances and barrier curves.

A tiny surface in the spirit of safetensors::

    import weightspace as ws
    ck = ws.load("model.safetensors")                 # lazy Checkpoint: name -> tensor
    soup = ws.uniform_soup(["a.pt", "b.safetensors"])  # a state dict that remembers its provenance
    ws.save(soup, "soup.safetensors")
"""
from __future__ import annotations

from ._version import __version__

from .io.checkpoint import Checkpoint
from .io.sources import load  # noqa: E402
from .errors import (CheckpointError, ConfigError, IncompatibleCheckpoints, NonFiniteError,  # noqa: E402
                     OutputExists, SourceError, UnsafeCheckpoint, WeightspaceError)
from .io.outputs import StateDict, TensorStream  # noqa: E402
from .ops.stream import (distance, lerp, task_vector, uniform_soup,  # noqa: E402
                  weighted_average)
from .io.save import save  # noqa: E402
from .ops.merge import task_arithmetic, ties_merge  # noqa: E402
from .search.align import align  # noqa: E402
from .hub import HubError, PushResult, push_to_hub  # noqa: E402
from .eval.evaluator import Evaluator, Metrics  # noqa: E402
from .eval.data import TensorData, load_data  # noqa: E402
from .eval.models import build_model  # noqa: E402
from .analysis.curve import Curve, barrier_height, interpolation_curve  # noqa: E402
from .search.greedy import GreedyResult, Leaderboard, greedy_soup, soup_leaderboard  # noqa: E402
from .eval.fixes import FixedEvaluator, Repairer, repair_model  # noqa: E402
from .search.learned import LearnedSoupResult, learned_soup  # noqa: E402
from .analysis.criticality import CriticalityResult, RewindResult, module_criticality, rewind  # noqa: E402
from .analysis.similarity import SimilarityResult, linear_cka, model_similarity, rbf_cka  # noqa: E402
from .eval.transforms import BlockShuffle, parse_transform  # noqa: E402
from .experiments.runner import run_recipe  # noqa: E402
from .analysis.probe import ProbeResult, probe  # noqa: E402
from .analysis.head2toe import Head2ToeResult, head2toe  # noqa: E402
from .analysis.saturation import SaturationFit, fit_saturation  # noqa: E402
from .analysis.taps import FeatureTaps  # noqa: E402

__all__ = [
    "Checkpoint", "load", "save", "uniform_soup", "weighted_average", "lerp", "task_vector", "distance",
    "StateDict", "TensorStream",
    "task_arithmetic", "ties_merge", "align",
    "push_to_hub", "PushResult", "HubError",
    "Evaluator", "Metrics", "load_data", "TensorData", "build_model", "greedy_soup", "soup_leaderboard", "GreedyResult", "Leaderboard",
    "interpolation_curve", "barrier_height", "Curve",
    "Repairer", "repair_model", "FixedEvaluator", "learned_soup", "LearnedSoupResult",
    "probe", "ProbeResult", "head2toe", "Head2ToeResult", "fit_saturation", "SaturationFit", "FeatureTaps",
    "rewind", "RewindResult", "module_criticality", "CriticalityResult", "model_similarity", "SimilarityResult",
    "linear_cka", "rbf_cka", "BlockShuffle", "parse_transform", "run_recipe",
    "WeightspaceError", "CheckpointError", "SourceError", "UnsafeCheckpoint", "IncompatibleCheckpoints",
    "NonFiniteError", "OutputExists", "ConfigError",
]
