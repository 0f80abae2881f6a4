"""What a checkpoint holds, for ``weightspace inspect`` and ``diff``: names, dtypes, shapes, sizes and provenance.

A plain local safetensors file is described from its header alone (``header.header_only_view``), so these verbs
start without importing torch; any other source is loaded (``sources.load``) and described from the Checkpoint.
Both paths give the same answer (tests/test_startup.py compares them)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..options import EmaChoice
from .header import header_only_view
from .keys import provenance_of

__all__ = ["describe", "structure"]


def describe(source: str, *, ema: EmaChoice | bool | None = None, strip_prefix: str | None = None) -> tuple[dict[str, Any], str]:
    """JSON-ready facts about ``source`` (source, files, variant, counts, bytes, tied names, provenance, metadata,
    one entry per tensor) and how it was resolved (the Checkpoint's note; "" for a header read).

    Raises:
        SourceError, CheckpointError, UnsafeCheckpoint: as ``io.sources.load``.
    """
    view = header_only_view(source) if ema in (None, "off", False) and not strip_prefix else None
    if view is not None:
        tensors = [{"key": k, "dtype": d, "shape": list(shape)} for k, (d, shape, _) in view.tensors.items()]
        return {"source": source, "files": [str(Path(source))], "variant": None, "num_tensors": len(tensors),
                "num_params": sum(math.prod(shape) for _, shape, _ in view.tensors.values()),
                "bytes": sum(n for _, _, n in view.tensors.values()), "tied": {},
                "provenance": provenance_of(view.metadata),
                "metadata": {k: v for k, v in view.metadata.items() if k != "weightspace"}, "tensors": tensors}, ""
    from .sources import load
    ck = load(source, ema=ema, strip_prefix=strip_prefix)
    tensors = []
    for k in ck:
        dtype, shape = ck.info(k)
        tensors.append({"key": k, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                        **({"tied_to": ck.aliases[k]} if k in ck.aliases else {})})
    return {"source": ck.source, "files": [str(f) for f in ck.files], "variant": ck.variant or None,
            "num_tensors": len(ck), "num_params": ck.num_params, "bytes": ck.nbytes, "tied": ck.aliases,
            "provenance": ck.provenance, "metadata": {k: v for k, v in ck.metadata.items() if k != "weightspace"},
            "tensors": tensors}, ck.note


def structure(source: str, *, ema: EmaChoice | bool | None = None,
              strip_prefix: str | None = None) -> tuple[str, dict[str, tuple[str, list[int]]]]:
    """The source's name and tensor name → (dtype, shape), as ``describe`` finds them.

    Raises:
        SourceError, CheckpointError, UnsafeCheckpoint: as ``io.sources.load``.
    """
    info, _ = describe(source, ema=ema, strip_prefix=strip_prefix)
    return info["source"], {t["key"]: (t["dtype"], t["shape"]) for t in info["tensors"]}
