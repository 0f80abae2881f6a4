"""Tensor names as a checkpoint is read: the wrapper prefixes stripped, the EMA copies kept under a prefix, and the
provenance a weightspace output carries in its metadata. Plain strings, no torch: header-only readers use them too."""
from __future__ import annotations

import json
from typing import Mapping

__all__ = ["STRIP_PREFIXES", "EMA_PREFIXES", "normalise_key", "provenance_of"]

STRIP_PREFIXES = ("module.", "_orig_mod.")
EMA_PREFIXES = ("model_ema.", "ema_model.", "ema.")


def normalise_key(key: str) -> str:
    """Strip the wrappers that DataParallel/DDP (module.) and torch.compile (_orig_mod.) add to names."""
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._orig_mod.", ".")
    return key


def provenance_of(metadata: Mapping[str, str]) -> dict | None:
    """The weightspace provenance in a file's metadata (the ``weightspace`` key's JSON), or None."""
    raw = metadata.get("weightspace")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
