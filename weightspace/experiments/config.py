"""Reading a recipe file: YAML → a mapping, its ``small:`` and KEY=VALUE overrides set in it, the result laid over a
kind's defaults with every unknown key refused. Every recipe kind reads its file through :func:`load_kind_recipe`
(or, for kinds with their own checks of the seeds, :func:`overlay_recipe`)."""
from __future__ import annotations

import copy
import os
from typing import Any, Sequence

from ..errors import ConfigError
from ..io.yaml_file import as_bool, as_number, read_yaml, unknown_key

__all__ = ["merge_config", "set_path", "parse_override", "read_recipe", "overlay_recipe", "load_kind_recipe",
           "check_kind"]


def merge_config(base: dict, extra: dict, where: str, strict: bool = True) -> dict:
    """``base`` updated by ``extra``, nested dicts merged key by key (``base`` itself is not changed).

    Raises:
        ConfigError: with ``strict``, a key of ``extra`` that ``base`` lacks (named with ``where`` and the nearest
            known key), or a value whose type is not its default's (a boolean for a boolean, a finite number for a
            number)."""
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: must be a mapping, not {extra!r}")
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if strict and k not in base:
            raise unknown_key(where, k, [str(x) for x in base])
        if strict and isinstance(base.get(k), dict) and v is None:
            continue  # an empty section (`analyses:`) keeps the defaults
        if strict and isinstance(base.get(k), dict) and not isinstance(v, dict):
            raise ConfigError(f"{where}: {k} must be a mapping, not {v!r}")
        if strict and isinstance(base.get(k), list) and isinstance(v, (bool, int, float)):
            raise ConfigError(f"{where}: {k} must be a list, not {v!r}")
        if isinstance(v, dict) and isinstance(base.get(k), dict) and base[k]:
            out[k] = merge_config(base[k], v, f"{where}.{k}", strict)
        else:
            out[k] = _typed(copy.deepcopy(v), base.get(k), f"{where}: {k}") if strict else copy.deepcopy(v)
    return out


# keys that count things: an integer default there means an integer (elsewhere 0 may stand for 0.0, a weight decay)
_COUNTS = ("epochs", "batch_size", "steps", "seed", "threads", "per_class", "folds", "width", "workers", "repeats")


# ranges of the training and analysis keys every kind shares, checked when the file is read (before any training)
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "batch_size": (1, None), "epochs": (0, None), "threads": (0, None), "lr": (0, None), "weight_decay": (0, None),
    "momentum": (0, 1), "steps": (2, None), "train_per_class": (1, None), "folds": (2, None), "width": (1, None)}


def _typed(value: Any, default: Any, where: str) -> Any:
    """``value`` checked against the type of the kind's default: a boolean stays a boolean, a number a finite
    number (an integer where the default is a count, in range for the shared training keys, even where the default
    is None); other defaults (None, strings, lists) are checked by the kind."""
    key = where.rsplit(": ", 1)[-1]
    if value is None or (default is None and key not in _RANGES):
        return value
    if isinstance(default, bool):
        return as_bool(value, where)
    if default is None or isinstance(default, (int, float)):
        count = isinstance(default, int) and key.endswith(_COUNTS) or (default is None and key.endswith(_COUNTS))
        lo, hi = _RANGES.get(key, (None, None))
        as_number(value, where, lo, hi, integer=count)
    return value


def set_path(cfg: dict, dotted: str, value: Any, where: str) -> None:
    """Set ``a.b.c`` in a nested dict (creating dicts on the way).

    Raises:
        ConfigError: the path goes through a key whose value is not a mapping."""
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"{where}: '{dotted}' goes through '{k}', which is not a mapping")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.finetune.epochs=3' → ('train.finetune.epochs', 3) (the value is read as YAML).

    Raises:
        ConfigError: no '=' or no key."""
    import yaml
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"overrides={text}: expected KEY=VALUE, e.g. train.finetune.epochs=3", param="overrides")
    return key.strip(), yaml.safe_load(raw)


def read_recipe(source: str | os.PathLike | dict) -> tuple[dict, str]:
    """A recipe's raw mapping (a copy when given a dict) and where it came from.

    Raises:
        ConfigError: a missing or unreadable file, not a regular file, not UTF-8, invalid YAML (anchors, aliases
            and repeated keys included: ``io.yaml_file``), or a document that is not a mapping."""
    if isinstance(source, dict):
        return copy.deepcopy(source), "<recipe>"
    where = os.fspath(source)
    raw = read_yaml(where, "recipe")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe is a YAML mapping")
    return raw, where


def overlay_recipe(raw: dict, where: str, defaults: dict, *, small: bool = False,
                   overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """``defaults`` overlaid with the recipe ``raw`` once its ``small:`` overrides (when asked) and then the
    KEY=VALUE ``overrides`` are set in it.

    Raises:
        ConfigError: a malformed override, or a key that ``defaults`` does not know (named with ``where``)."""
    if not isinstance(raw.get("small") or {}, dict):
        raise ConfigError(f"{where}: small must be a mapping of KEY: VALUE overrides, not {raw.get('small')!r}")
    pending = list((raw.get("small") or {}).items()) if small else []
    pending += [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    for k, v in pending:
        set_path(raw, k, v, where)
    return merge_config(defaults, raw, where)


def check_kind(raw: dict, where: str, kind: str, default: str | None = None) -> None:
    """Refuse a recipe whose ``kind:`` (``default`` when it names none) is not ``kind``.

    Raises:
        ConfigError: the recipe is of another kind."""
    if raw.get("kind", default) != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{where}: not {article} {kind} recipe (kind: {raw.get('kind')}); run it with run_recipe")


def load_kind_recipe(source: str | os.PathLike | dict, kind: str, defaults: dict, *, small: bool = False,
                     overrides: Sequence[str | tuple[str, Any]] = (), seeds_key: str | None = "seeds") -> dict:
    """Read a recipe of ``kind``: its ``small:`` overrides (when asked), then KEY=VALUE overrides, over ``defaults``;
    ``where`` (the file) and ``small_run`` are added to the result.

    Raises:
        ConfigError: unreadable file, another kind, an unknown key, or (unless ``seeds_key`` is None) fewer than
            three different integer seeds under ``seeds_key`` (verdicts rest on 95% t-intervals over seeds).
    """
    raw, where = read_recipe(source)
    check_kind(raw, where, kind)
    cfg = overlay_recipe(raw, where, defaults, small=small, overrides=overrides)
    if seeds_key is not None:
        seeds = cfg[seeds_key]
        if not isinstance(seeds, list) or len(seeds) < 3 or len(set(seeds)) != len(seeds) \
                or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"{where}: {seeds_key} needs at least three different integer seeds (verdicts rest "
                              "on 95% t-intervals over seeds)")
    cfg["where"] = where
    cfg["small_run"] = small
    return cfg
