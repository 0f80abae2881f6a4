"""One progress-bar policy for every long loop: tqdm on stderr, only when stderr is a terminal, off on request."""
from __future__ import annotations

from typing import Iterable, TypeVar

__all__ = ["progress", "FALLBACK_COLUMNS"]

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, **kw) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar (or a manual bar when ``iterable`` is None); no bar in logs or with --quiet."""
    if not enabled:
        if iterable is None:
            from tqdm.auto import tqdm
            return tqdm(total=total, disable=True)
        return iterable
    from tqdm.auto import tqdm
    if "ncols" not in kw and _reported_columns() == 0:
        kw["ncols"] = FALLBACK_COLUMNS
    # disable=None: tqdm shows the bar only on a terminal, so CI logs and pipes stay clean.
    from .report.terminal import printable  # a description may name a file: never raw on the terminal
    return tqdm(iterable, total=total, desc=printable(desc), unit=unit, leave=False, disable=None, **kw)


FALLBACK_COLUMNS = 80


def _reported_columns() -> int | None:
    """The width stderr's terminal reports (None when it is not a terminal). Some terminals (serial consoles,
    containers without a size, some CI runners with a pty) report 0, which tqdm takes literally: a bar of width 0
    squeezed out of the line."""
    import os
    import sys
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None
