"""eval: model + data → metrics — the Evaluator (one model, weights copied in, data resident on the device), the
evaluator contract, evaluation data, model specs, transforms, training, BN recalibration and REPAIR (repair)."""
from __future__ import annotations

from .data import TensorData, load_data
from .evaluator import Evaluator, Metrics
from .repair import FixedEvaluator, Repairer, fix_evaluator, repair_model
from .models import build_model
from .transforms import BlockShuffle, parse_transform

__all__ = ["Evaluator", "Metrics", "TensorData", "load_data", "build_model", "FixedEvaluator", "Repairer",
           "fix_evaluator", "repair_model", "BlockShuffle", "parse_transform"]
