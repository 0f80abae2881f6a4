"""eval: model + data → metrics — the Evaluator (one model, weights copied in, data resident on the device), the
evaluator contract, evaluation data, model specs, transforms, training, BN recalibration and REPAIR (repair)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports on first use, so that a light module
    # of this package (a header reader, the data cache) is imported without torch
    from .data import TensorData, load_data
    from .evaluator import Evaluator, Metrics
    from .repair import FixedEvaluator, Repairer, fix_evaluator, repair_model
    from .models import build_model
    from .transforms import BlockShuffle, parse_transform

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("TensorData", "load_data"), "data"),
    **dict.fromkeys(("Evaluator", "Metrics"), "evaluator"),
    **dict.fromkeys(("FixedEvaluator", "Repairer", "fix_evaluator", "repair_model"), "repair"),
    **dict.fromkeys(("build_model",), "models"),
    **dict.fromkeys(("BlockShuffle", "parse_transform"), "transforms"),
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = ["Evaluator", "Metrics", "TensorData", "load_data", "build_model", "FixedEvaluator", "Repairer",
           "fix_evaluator", "repair_model", "BlockShuffle", "parse_transform"]
