"""weightspace: what lies between checkpoints — soups, interpolation, distances and barrier curves.

A tiny surface in the spirit of safetensors::

    import weightspace as ws
    ck = ws.load("model.safetensors")                 # lazy Checkpoint: name -> tensor
    ws.save(ws.uniform_soup_stream(["a.pt", "b.safetensors"]), "soup.safetensors")  # streamed: flat memory, all cores
    soup = ws.uniform_soup(["a.pt", "b.safetensors"])  # or in memory: a state dict that remembers its provenance
"""
from __future__ import annotations

import importlib

from ._version import __version__

# Names are imported on first use (PEP 562), so `import weightspace.errors` or the CLI's `--help` does not pay
# for torch; `weightspace.load` and `from weightspace import load` work as with eager imports.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Checkpoint",), "io.checkpoint"),
    **dict.fromkeys(("load",), "io.sources"),
    **dict.fromkeys(("CheckpointError", "ConfigError", "IncompatibleCheckpoints", "NonFiniteError", "OutputExists",
                     "SourceError", "UnsafeCheckpoint", "WeightspaceError"), "errors"),
    **dict.fromkeys(("StateDict", "TensorStream"), "io.outputs"),
    **dict.fromkeys(("distance", "lerp", "task_vector", "uniform_soup", "weighted_average", "uniform_soup_stream",
                     "weighted_average_stream", "lerp_stream", "task_vector_stream"), "ops.stream"),
    **dict.fromkeys(("save",), "io.save"),
    **dict.fromkeys(("task_arithmetic", "ties_merge", "merge"), "ops.merge"),
    **dict.fromkeys(("align",), "search.align"),
    **dict.fromkeys(("HubError", "PushResult", "push_to_hub"), "hub"),
    **dict.fromkeys(("Evaluator", "Metrics"), "eval.evaluator"),
    **dict.fromkeys(("TensorData", "load_data"), "eval.data"),
    **dict.fromkeys(("build_model",), "eval.models"),
    **dict.fromkeys(("Curve", "barrier_height", "interpolation_curve"), "analysis.curve"),
    **dict.fromkeys(("GreedyResult", "Leaderboard", "greedy_soup", "soup_leaderboard"), "search.greedy"),
    **dict.fromkeys(("FixedEvaluator", "Repairer", "repair_model"), "eval.fixes"),
    **dict.fromkeys(("LearnedSoupResult", "learned_soup"), "search.learned"),
    **dict.fromkeys(("CriticalityResult", "RewindResult", "module_criticality", "rewind"), "analysis.criticality"),
    **dict.fromkeys(("SimilarityResult", "linear_cka", "model_similarity", "rbf_cka"), "analysis.similarity"),
    **dict.fromkeys(("BlockShuffle", "parse_transform"), "eval.transforms"),
    **dict.fromkeys(("run_recipe",), "experiments.runner"),
    **dict.fromkeys(("ProbeResult", "probe"), "analysis.probe"),
    **dict.fromkeys(("Head2ToeResult", "head2toe"), "analysis.head2toe"),
    **dict.fromkeys(("SaturationFit", "fit_saturation"), "analysis.saturation"),
    **dict.fromkeys(("FeatureTaps",), "analysis.taps"),
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightspace' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "Checkpoint", "load", "save", "uniform_soup", "weighted_average", "lerp", "task_vector", "distance",
    "uniform_soup_stream", "weighted_average_stream", "lerp_stream", "task_vector_stream", "merge",
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
