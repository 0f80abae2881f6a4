"""Sizes in bytes from text, with one unit rule for every option that takes one (``--max-memory``,
``--max-shard-size``): a bare letter or ``iB`` is binary (``512M``, ``1.5GiB``), a ``B`` after the letter is decimal
as transformers reads ``--max-shard-size`` (``5GB`` = 5·10⁹), case ignored, a plain number is bytes."""
from __future__ import annotations

import re

from ..errors import ConfigError

__all__ = ["parse_size"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_size(value: str | int | None, what: str = "--max-memory") -> int | None:
    """Bytes from ``512M``, ``2G``, ``1.5GiB``, ``300MB`` or a plain integer (None stays None).

    ``what`` names the option in the error message.

    Raises:
        ConfigError: the text is not a positive size.
    """
    if value is None or isinstance(value, int):
        if isinstance(value, bool) or (isinstance(value, int) and value <= 0):
            raise ConfigError(f"{what} {value}: must be a positive number of bytes")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what} {value}: expected a size such as 512M, 5GB or 1.5GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{what} {value}: must be a positive number of bytes")
    return n
