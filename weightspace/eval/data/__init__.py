"""Evaluation data: built-in sets, tensor files and image sources, decoded once into (cached) uint8 tensors.

``load_data(spec, model=...)`` is the one entry point; see :mod:`.tensors` for the built-ins and options,
:mod:`.readers` for the image sources, :mod:`.decode` and :mod:`.images` for decoding and the cache
(:mod:`.cache`), and :mod:`.labels` for label spaces (subset classes, many-to-one maps).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import lazy_getattr

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports on first use, so that a light module
    # of this package (a header reader, the data cache) is imported without torch
    from .load import load_data, set_decoding
    from .tensors import BUILTINS, SPLIT_SEED, TensorData, digits, mnist1d

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("load_data", "set_decoding"), "load"),
    **dict.fromkeys(("BUILTINS", "SPLIT_SEED", "TensorData", "digits", "mnist1d"), "tensors"),
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = ["TensorData", "load_data", "set_decoding", "digits", "mnist1d", "BUILTINS", "SPLIT_SEED"]
