"""Save state dicts and streamed op results: safetensors by default, atomically, with provenance metadata."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import torch

from .._version import __version__
from .checkpoint import Checkpoint, _find_aliases
from ..errors import CheckpointError, ConfigError
from .outputs import TensorStream, finish_provenance
from ..files import atomic_output
from .formats import header_for, write_safetensors

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
PLACEHOLDER = "0" * 64

Savable = Union[TensorStream, Mapping, torch.nn.Module]


def _format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in ("safetensors", "pt"):
            raise ConfigError(f"--format {fmt}: expected safetensors or pt")
        return fmt
    return "pt" if path.suffix in PICKLE_SUFFIXES else "safetensors"


def _portable_source(source: str, out: Path) -> str:
    """A local ingredient path as seen from the output's folder, so that the same inputs give the same bytes
    wherever the run lives (the sha256 beside it still identifies the file); other sources unchanged."""
    if "://" in source or source.startswith(("<", "hf-hub:", "timm:", "open_clip:")) or not os.path.exists(source):
        return source
    return os.path.relpath(os.path.abspath(source), os.path.abspath(out.parent if str(out.parent) else "."))


def _dump(prov: dict, out: Path) -> str:
    ingredients = prov.get("ingredients")
    if isinstance(ingredients, list):
        prov = dict(prov, ingredients=[dict(i, source=_portable_source(i["source"], out))
                                       if isinstance(i, dict) and isinstance(i.get("source"), str) else i
                                       for i in ingredients])
    return json.dumps(prov, sort_keys=True, separators=(",", ":"), allow_nan=True)


def save(obj: Savable, path: str | os.PathLike, *, provenance: dict | None = None, force: bool = False,
         fmt: str | None = None) -> Path:
    """Write a state dict (or a streamed op result) to ``path`` atomically; safetensors unless it ends in .pt/.pth/.bin."""
    path = Path(path)
    kind = _format(path, fmt)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, TensorStream):
        return _save_stream(obj, path, kind, provenance, force)
    if not isinstance(obj, Mapping):
        raise TypeError(f"cannot save a {type(obj).__name__}")
    sd = {k: obj[k] for k in obj}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            raise ConfigError(f"{path}: value of key '{k}' is a {type(v).__name__}, not a tensor")
    prov = dict(getattr(obj, "provenance", None) or (obj.provenance or {} if isinstance(obj, Checkpoint) else {}))
    prov.update(provenance or {})
    prov.setdefault("weightspace_version", __version__)
    tied = _find_aliases(sd)
    if tied:
        prov["tied"] = dict(sorted(tied.items()))
    with atomic_output(path, force) as tmp:
        if kind == "pt":
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in sd.items()}, "weightspace": _dump(prov, path)}, tmp)
        else:
            keys = sorted(sd)
            entries = [(k, sd[k].dtype, tuple(sd[k].shape)) for k in keys]
            write_safetensors(tmp, entries, ((k, sd[k]) for k in keys), {"weightspace": _dump(prov, path)})
    return path


def _save_stream(stream: TensorStream, path: Path, kind: str, provenance: dict | None, force: bool) -> Path:
    extra = provenance or {}
    if kind == "pt":
        sd = stream.to_dict()
        sd.provenance.update(extra)
        return save(sd, path, force=force, fmt="pt")
    # The header holds the ingredients' sha256; hash them in a thread while tensors stream, then patch the
    # placeholders in place (same length, so no data moves).
    # One hashing thread per core (hashlib releases the GIL): cold, hashing is the slowest part of a soup.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(stream.ingredients), cores))
    with ThreadPoolExecutor(max_workers=workers) as pool, atomic_output(path, force) as tmp:
        futures = [pool.submit(c.sha256) for c in stream.ingredients]
        try:
            placeholder = finish_provenance(stream.provenance, stream.ingredients, [PLACEHOLDER] * len(futures))
            placeholder.update(extra)
            data = stream.pieces() if stream.pieces is not None else iter(stream)
            write_safetensors(tmp, stream.entries, data, {"weightspace": _dump(placeholder, path)})
            final = finish_provenance(stream.provenance, stream.ingredients, [f.result() for f in futures])
        except BaseException:
            for f in futures:  # bad input: report it now, not after hashing every remaining ingredient
                f.cancel()
            raise
        final.update(extra)
        head_old, _ = header_for(stream.entries, {"weightspace": _dump(placeholder, path)})
        head_new, _ = header_for(stream.entries, {"weightspace": _dump(final, path)})
        if len(head_old) != len(head_new):
            raise CheckpointError(f"{path}: internal error: provenance changed size while patching")
        with open(tmp, "r+b") as f:
            f.write(head_new)
    return path
