"""The options a source string may carry after '?' (``?ema=1``, ``?strip_prefix=model.``, ``?key=model_state``)
and the process defaults that the CLI's ``--ema`` and ``--strip-prefix`` set."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

from ..errors import SourceError
from ..options import EMA_CHOICES, EmaChoice, ema_choice

__all__ = ["SOURCE_OPTIONS", "SCHEME_PREFIXES", "SourceOptions", "set_default_options",
           "default_options_for", "default_options", "split_options", "split_query", "options_for"]

# The prefixes of the source strings that are not local paths (resolved in sources.SCHEMES).
SCHEME_PREFIXES = ("hf://", "hf-hub:", "timm:", "open_clip:")

# Options any source string may carry after '?', e.g. ckpt.pth.tar?ema=1, lightning.ckpt?strip_prefix=model. or
# train.pt?key=model_state ('prefix' is the older spelling of strip_prefix, still read).
SOURCE_OPTIONS = ("ema", "strip_prefix", "prefix", "key")


@dataclass(frozen=True)
class SourceOptions:
    """How to read the weights of one source: which EMA variant, which entry, and which key prefix to strip.

    ``ema``: "off" takes the regular weights (the default, noted when EMA weights are present), "prefer" takes EMA
    weights where a file holds them and the regular ones elsewhere, "require" fails when a file holds none.
    ``strip_prefix``: keep only keys starting with it, with it removed (a Lightning module's 'model.').
    ``key``: the entry of a pickled training checkpoint holding the weights ('model_state', 'model/state_dict')."""

    ema: EmaChoice = "off"
    strip_prefix: str | None = None
    key: str | None = None


_defaults = SourceOptions()


def set_default_options(options: SourceOptions) -> None:
    """Set the options of sources that do not carry their own (the CLI's --ema and --strip-prefix).

    Raises:
        ValueError: ``options.ema`` is not one of EMA_CHOICES (a programming error: the CLI validates it)."""
    global _defaults
    if options.ema not in EMA_CHOICES:
        raise ValueError(f"ema must be one of {EMA_CHOICES}")
    _defaults = options


@contextlib.contextmanager
def default_options_for(options: SourceOptions) -> Iterator[None]:
    """``set_default_options`` for the duration of a block (a command), restored afterwards."""
    before = _defaults
    set_default_options(options)
    try:
        yield
    finally:
        set_default_options(before)


def default_options() -> SourceOptions:
    """The options of sources that carry none of their own (SourceOptions() unless the CLI set them)."""
    return _defaults


def split_options(source: str, defaults: SourceOptions | None = None) -> tuple[str, SourceOptions]:
    """Take '?ema=0|1', '?strip_prefix=P' and '?key=K' off a source string; returns the rest and the options.

    Other query parameters stay in place for the scheme that reads them (timm's file= and num_classes=).
    An existing local file whose name holds '?' is taken as it is. Raises SourceError on a bad value."""
    base = defaults or _defaults
    if "?" not in source or Path(os.path.expanduser(source)).exists():
        return source, base
    head, query = source.split("?", 1)
    pairs = parse_qsl(query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in SOURCE_OPTIONS}
    rest = [(k, v) for k, v in pairs if k not in SOURCE_OPTIONS]
    is_local = not source.startswith(SCHEME_PREFIXES)
    if rest and (is_local or source.startswith(("hf://", "hf-hub:"))):
        raise SourceError(f"{source}: unknown source option '{rest[0][0]}' (known: ema=0|1, strip_prefix=P, key=K)",
                          path=source)
    ema = base.ema
    if "ema" in ours:
        value = ours["ema"].lower()
        if value not in ("0", "1", "true", "false", "yes", "no"):
            raise SourceError(f"{source}: ema={ours['ema']}: expected 0 or 1", path=source)
        ema = "require" if value in ("1", "true", "yes") else "off"
    prefix = ours.get("strip_prefix", ours.get("prefix", base.strip_prefix))
    rebuilt = head + ("?" + "&".join(f"{k}={v}" for k, v in rest) if rest else "")
    return rebuilt, SourceOptions(ema=ema, strip_prefix=prefix or None, key=ours.get("key", base.key) or None)



def split_query(spec: str) -> tuple[str, dict[str, str]]:
    """'name?a=1&b=2' → ('name', {'a': '1', 'b': '2'}): how source and model specs carry their options."""
    name, _, q = spec.partition("?")
    return name, dict(parse_qsl(q))


def options_for(ema: EmaChoice | bool | None, strip_prefix: str | None, key: str | None = None) -> SourceOptions:
    """The options of ``load(src, ema=, strip_prefix=, key=)``: each None keeps the process default."""
    base = default_options()
    return SourceOptions(ema=ema_choice(ema, base.ema),
                         strip_prefix=base.strip_prefix if strip_prefix is None else (strip_prefix or None),
                         key=base.key if key is None else (key or None))
