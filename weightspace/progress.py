"""One progress-bar policy for every long loop: tqdm on stderr, only when stderr is a terminal, off on request."""
from __future__ import annotations

from typing import Iterable, TypeVar

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
    # disable=None: tqdm shows the bar only on a terminal, so CI logs and pipes stay clean.
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=None, **kw)
