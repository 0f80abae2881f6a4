"""analysis: → numbers — interpolation and barrier curves, similarity (CKA), rewinding and module criticality, linear
probes, Head2Toe, saturation fits, and the feature taps they read activations with. The functions ``probe`` and
``head2toe`` are imported from their modules (``weightspace.analysis.probe.probe``), whose names they share."""
from __future__ import annotations

from .criticality import CriticalityResult, RewindResult, module_criticality, rewind
from .curve import Curve, barrier_height, interpolation_curve
from .head2toe import Head2ToeResult
from .probe import ProbeResult
from .saturation import SaturationFit, fit_saturation
from .similarity import SimilarityResult, linear_cka, model_similarity, rbf_cka
from .taps import FeatureTaps

__all__ = ["interpolation_curve", "barrier_height", "Curve", "model_similarity", "linear_cka", "rbf_cka",
           "SimilarityResult", "rewind", "RewindResult", "module_criticality", "CriticalityResult", "ProbeResult",
           "Head2ToeResult", "fit_saturation", "SaturationFit", "FeatureTaps"]
