"""Evaluation data: built-in sets, tensor files and image sources, decoded once into (cached) uint8 tensors.

``load_data(spec, model=...)`` is the one entry point; see :mod:`.tensors` for the built-ins and options,
:mod:`.readers` for the image sources, :mod:`.decode` and :mod:`.images` for decoding and the cache
(:mod:`.cache`), and :mod:`.labels` for label spaces (subset classes, many-to-one maps).
"""
from __future__ import annotations

from .load import load_data, set_decoding
from .tensors import BUILTINS, SPLIT_SEED, TensorData, digits, mnist1d

__all__ = ["TensorData", "load_data", "set_decoding", "digits", "mnist1d", "BUILTINS", "SPLIT_SEED"]
