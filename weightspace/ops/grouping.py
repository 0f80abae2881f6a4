"""Group state-dict keys into modules by name alone: by prefix depth or by a regular expression.

Grouping by the nn.Module tree needs a model: ``weightspace.eval.modules``.
"""
from __future__ import annotations

import re
from typing import Iterable

from ..errors import ConfigError

__all__ = ["module_of", "parse_grouping", "group_names", "natural_key"]


def natural_key(name: str) -> tuple:
    """A sort key putting ``features.2`` before ``features.10``: digit runs compare as numbers, the rest as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def module_of(name: str, depth: int | None = None, regex: str | re.Pattern | None = None) -> str:
    """The module a parameter belongs to: its first ``depth`` name parts, or what ``regex`` captures."""
    if regex is not None:
        m = re.search(regex, name)
        if not m:
            return "(other)"
        return m.group(1) if m.groups() and m.group(1) is not None else m.group(0)
    parts = name.split(".")
    owner = parts[:-1] or parts  # drop the parameter's own name ("weight", "bias", ...)
    return ".".join(owner[:depth]) if depth else ".".join(owner)


def parse_grouping(spec: str | None) -> dict:
    """Parse 'depth:N' or 'regex:PATTERN' into keyword arguments for :func:`module_of`."""
    if not spec:
        return {}
    kind, _, arg = spec.partition(":")
    if kind == "depth":
        try:
            n = int(arg)
        except ValueError:
            raise ConfigError(f"modules={spec}: depth needs a positive integer", param="modules") from None
        if n < 1:
            raise ConfigError(f"modules={spec}: depth needs a positive integer", param="modules")
        return {"depth": n}
    if kind == "regex":
        try:
            return {"regex": re.compile(arg)}
        except re.error as e:
            raise ConfigError(f"modules={spec}: bad regular expression ({e})", param="modules") from None
    raise ConfigError(f"modules={spec}: expected depth:N or regex:PATTERN", param="modules")


def group_names(names: Iterable[str], depth: int | None = None, regex: str | re.Pattern | None = None) -> dict[str, list[str]]:
    """Map module name → its parameter names, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(module_of(n, depth, regex), []).append(n)
    return groups
