"""Lazy package exports: a package names which submodule holds each public name, and the name is imported on
first use, so that importing the package (or a light module of it: a header reader, the data cache) does not
import torch."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a public name to the submodule (relative to the
    package) that defines it; the first access imports it and caches it on the package.

    Raises (from the returned function):
        AttributeError: the name is not one of ``exports``."""
    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value
    return __getattr__
