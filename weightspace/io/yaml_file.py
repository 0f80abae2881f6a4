"""Config files read strictly: mergekit YAML and recipes go through :func:`read_yaml` and the key and value checks
here, so every config reader refuses the same things the same way.

A config is a small text file a user may have downloaded: it must be a regular file (a FIFO or device would block
or never end), at most 1 MiB, UTF-8, and plain YAML — no anchors or aliases (a few hundred bytes of nested aliases
expand to billions of nodes), no key given twice (which YAML silently resolves to the last), no nesting deeper
than 64 levels (PyYAML recurses per level). Every refusal is one line naming the file and, where it has one, the
line and the key.
"""
from __future__ import annotations

import difflib
import math
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError

__all__ = ["read_yaml", "unknown_key", "check_keys", "as_bool", "as_number", "open_regular", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 20
_MAX_DEPTH = 64


def open_regular(path: str | os.PathLike, what: str, limit: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (of at most ``limit`` bytes when given).

    Raises:
        ConfigError: missing, not a regular file (a FIFO, device, socket or folder: refused without reading or
            blocking), larger than ``limit``, or unreadable."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below refuses it at once
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such {what}", path=p) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the {what} ({e.strerror or e})", path=p) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
            raise ConfigError(f"{p}: is {kind}, not a regular {what} file", path=p)
        if limit is not None and st.st_size > limit:
            raise ConfigError(f"{p}: {st.st_size} bytes; a {what} is at most {limit} bytes", path=p)
        try:
            data = f.read(limit + 1 if limit is not None else -1)
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the {what} ({e.strerror or e})", path=p) from None
    if limit is not None and len(data) > limit:
        raise ConfigError(f"{p}: more than {limit} bytes; a {what} is at most {limit} bytes", path=p)
    return data


class _Refused(Exception):
    pass


def _strict_loader():
    import yaml

    class Strict(yaml.SafeLoader):
        """SafeLoader without anchors, aliases or repeated keys, and with a bounded depth."""

        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            line = event.start_mark.line + 1 if event.start_mark else 0
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _Refused(f"line {line}: YAML anchors and aliases (&name, *name) are not accepted")
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise _Refused(f"line {line}: nested more than {_MAX_DEPTH} levels deep")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _Refused(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
                    seen.add(key)
                except TypeError:  # an unhashable key: construct_mapping reports it
                    pass
            return super().construct_mapping(node, deep)

    return Strict


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The YAML document in ``path`` (a ``what``: "recipe", "mergekit config"), read strictly (see the module).

    Raises:
        ConfigError: not a regular file, too large, not UTF-8, not valid YAML, anchors or aliases, a repeated key,
            nesting too deep — one line naming the file."""
    import yaml
    data = open_regular(path, what, MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                          path=path) from None
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 — a SafeLoader subclass
    except _Refused as e:
        raise ConfigError(f"{path}: {e}", path=path) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep", path=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({where}{problem})", path=path) from None


def unknown_key(where: str, key: Any, known: Iterable[str], unsupported: Mapping[str, str] | None = None) -> ConfigError:
    """The error for ``key`` found at ``where``: named as unsupported (with why) when it is one of ``unsupported``,
    else as unknown with the nearest known key."""
    if unsupported and key in unsupported:
        return ConfigError(f"{where}: '{key}' is not supported by weightspace ({unsupported[key]})")
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown key '{key}' ({hint})")


def check_keys(mapping: Mapping, known: Iterable[str], where: str, unsupported: Mapping[str, str] | None = None) -> None:
    """Refuse the first key of ``mapping`` that is neither ``known`` nor accepted.

    Raises:
        ConfigError: from :func:`unknown_key`."""
    known = set(known)
    for k in mapping:
        if k not in known:
            raise unknown_key(where, k, known, unsupported)


def as_bool(value: Any, where: str) -> bool:
    """``value`` when it is a YAML boolean (true/false).

    Raises:
        ConfigError: anything else ("yes" in quotes, 1, null)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, not {value!r}")
    return value


def as_number(value: Any, where: str, lo: float | None = None, hi: float | None = None, *,
              lo_open: bool = False, integer: bool = False) -> float:
    """``value`` as a finite number in [lo, hi] (``(lo, hi]`` with ``lo_open``), an integer when asked.

    Raises:
        ConfigError: a boolean, a string, NaN/inf, a fraction where an integer is wanted, or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, not {value!r}")
    if integer and value != int(value):
        raise ConfigError(f"{where}: must be an integer, not {value!r}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        low, high = "-inf" if lo is None else f"{lo:g}", "inf" if hi is None else f"{hi:g}"
        span = f"{'(' if lo_open else '['}{low}, {high}]"
        raise ConfigError(f"{where}: {value!r} is out of range {span}")
    return value
