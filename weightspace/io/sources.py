"""Parse and resolve source strings — local files and folders (``io.local``), the Hugging Face Hub
(``io.hub_sources``), library names timm: and open_clip: (``io.libraries``) — through one table of schemes, and
open them as lazy Checkpoints (``load``, ``open_checkpoint``)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from ..errors import SourceError
from ..options import EmaChoice
from .checkpoint import Checkpoint, Resolved, Source, from_tensors, open_resolved
from .containers import unwrap
from .hub_sources import resolve_hub
from .libraries import resolve_open_clip, resolve_timm
from .local import resolve_local
from .source_options import SourceOptions, options_for, split_options

__all__ = ["SCHEMES", "resolve", "short_name", "open_checkpoint", "load"]


SCHEMES: dict[str, Callable[[str, str, SourceOptions], Resolved]] = {
    "hf://": resolve_hub,
    "hf-hub:": resolve_hub,
    "timm:": resolve_timm,
    "open_clip:": resolve_open_clip,
}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+_.-]*):(//)?")


def resolve(source: str, options: SourceOptions | None = None) -> Resolved:
    """Turn a source string into local files (or an in-memory state dict for timm/open_clip names).

    ``options`` matter where a library loads a file for us (timm:NAME?file=P reads P with them).
    Raises SourceError when the string names nothing loadable."""
    for prefix, fn in SCHEMES.items():
        if source.startswith(prefix):
            return fn(source, source[len(prefix):], options or SourceOptions())
    m = _SCHEME_RE.match(source)
    if m and not Path(source).exists() and len(m.group(1)) > 1:
        known = ", ".join(SCHEMES)
        raise SourceError(f"{source}: unknown scheme '{m.group(1)}:' (known: {known}, or a local path)", path=source)
    return resolve_local(source)


def short_name(source: str) -> str:
    """A readable name for a checkpoint source: the file stem for paths, the string itself otherwise."""
    if source.startswith("<") or "://" in source or source.startswith(("timm:", "open_clip:", "hf-hub:")):
        return source
    p = Path(source)
    return p.stem if p.suffix else p.name or source


def open_checkpoint(source: str, options: SourceOptions) -> Checkpoint:
    """Open a source string (its own '?ema=', '?strip_prefix=' and '?key=' win over ``options``) as a lazy
    Checkpoint. Raises what ``load`` raises."""
    rest, opts = split_options(source, options)
    ck = open_resolved(resolve(rest, opts), opts.ema, opts.key)
    if opts.strip_prefix:
        ck = ck.strip_prefix(opts.strip_prefix)
    if rest != source:
        ck.source = source  # reports name the source as the user wrote it, options included
    return ck


def load(src: Source, *, ema: EmaChoice | bool | None = None, strip_prefix: str | None = None,
         key: str | None = None) -> Checkpoint:
    """Open any source (path, source string, Checkpoint, state dict, nn.Module) as a lazy Checkpoint.

    Args:
        src: a path or source string (``x.safetensors``, ``x.pt``, a folder, ``hf://org/repo``, ``timm:NAME``,
            ``open_clip:ARCH/TAG``; any of them may end in ``?ema=0|1``, ``?strip_prefix=P`` and ``?key=K``), or
            weights in memory.
        ema: "prefer" takes EMA weights where the file holds them (as timm's ``use_ema``; True says the same),
            "off" (or False) the regular ones, "require" fails on a file without EMA weights; None (default)
            follows the process default (regular weights; the CLI's ``--ema`` sets "prefer").
            ``?ema=1`` on a source requires EMA weights of it, ``?ema=0`` takes its regular ones.
        strip_prefix: keep only keys starting with it, with it removed (None: the process default, usually none).
        key: the entry of a training checkpoint that holds the weights ('model_state', 'model/state_dict'), for a
            layout with several candidates (``?key=`` on a source string says the same).

    Raises:
        SourceError: the source string cannot be resolved (unknown scheme, missing file, Hub failure).
        CheckpointError: a file is unreadable, corrupt, holds no tensors, or lacks what was asked (EMA weights,
            the prefix, the entry ``key``), or holds weights under several entries and no ``key`` picks one.
        UnsafeCheckpoint: a pickle needs more than tensors to load.
        TypeError: ``src`` is none of the above.
    """
    if isinstance(src, Checkpoint):
        return src
    opts = options_for(ema, strip_prefix, key)
    if isinstance(src, torch.nn.Module):
        return from_tensors(f"<{type(src).__name__}>", dict(src.state_dict()), "", [])
    if isinstance(src, Mapping):
        flat, variant = unwrap(src, "<state dict>", opts.ema, key)
        ck = from_tensors("<state dict>", flat, variant, [])
        # only an explicit prefix: weights in memory are usually an op's result, already in the model's names
        return ck.strip_prefix(strip_prefix) if strip_prefix else ck
    if isinstance(src, (str, os.PathLike)):
        return open_checkpoint(os.fspath(src), opts)
    raise TypeError(f"cannot load a {type(src).__name__} as a checkpoint")
