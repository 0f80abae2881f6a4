"""Local sources: a weights file, a shard index, or a folder (a Hugging Face folder, a Hub cache snapshot), with
shards that must stay inside the index's folder."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, CheckpointNotFound, SourceError
from .checkpoint import Resolved

__all__ = ["WEIGHT_SUFFIXES", "PREFERRED_FILES", "resolve_local", "shard_inside", "cache_blobs", "from_index",
           "from_folder"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Preference order inside a folder or a Hub repo: safetensors first (no pickle), single file before shards.
PREFERRED_FILES = (
    "model.safetensors", "model.safetensors.index.json",
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin",
    "model.pt", "model.pth",
)


def resolve_local(source: str) -> Resolved:
    """A local path as files to read. Raises CheckpointNotFound (no such path), SourceError (a folder without one
    weights file, a bad index) or CheckpointError (a shard that is not a file)."""
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise CheckpointNotFound(f"{source}: no such file or directory", path=source)
    if path.is_dir():
        return from_folder(source, path)
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or /dev/zero would block or never end: refused before a read
        raise CheckpointError(f"{source}: is a FIFO, device or socket, not a regular file", path=source)
    if path.name.endswith(".index.json"):
        return from_index(source, path)
    return Resolved(source, files=[path])


def shard_inside(index: Path, name: str) -> Path:
    """The shard ``name`` of a local index, which must lie inside the index's folder: a relative path without
    '..', and no symlink leading out of the folder (as huggingface_hub enforces for Hub snapshots)."""
    parts = Path(name).parts
    if not name or os.path.isabs(name) or ".." in parts or "\0" in name:
        raise SourceError(f"{index}: shard name {name!r} points outside the index's folder; refused", path=index)
    folder = index.parent.resolve()
    shard = folder / name
    real = shard.resolve()
    if not any(real == root or root in real.parents for root in (folder, *cache_blobs(index.parent))):
        raise SourceError(f"{index}: shard {name!r} is a link to {real}, outside the index's folder; refused",
                          path=index)
    return shard


def cache_blobs(folder: Path) -> list[Path]:
    """The blobs folder of the Hugging Face cache repo whose snapshot holds ``folder``, if it is one: a snapshot's
    files are links to ``../../blobs/<sha256>``, which is where they belong, not an escape."""
    here = Path(os.path.abspath(folder))
    for up in (here, *here.parents):
        if up.parent.name == "snapshots" and (up.parent.parent / "blobs").is_dir():
            return [(up.parent.parent / "blobs").resolve()]
    return []


def from_index(source: str, index: Path, fetch: Callable[[str], Path] | None = None) -> Resolved:
    """The shards a ``*.index.json`` names (fetched with ``fetch`` for a Hub repo, else inside its folder).
    Raises SourceError for a malformed index, CheckpointNotFound for a missing shard."""
    try:
        data = json.loads(index.read_text())
        weight_map = dict(data["weight_map"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise SourceError(f"{index}: not a valid shard index (needs a 'weight_map' object)", path=index) from None
    if not weight_map:
        raise SourceError(f"{index}: shard index has an empty 'weight_map' (no tensors)", path=index)
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise SourceError(f"{index}: 'weight_map' entry {bad!r} is {weight_map[bad]!r}, not a shard file name",
                          path=index)
    names = sorted(set(weight_map.values()))
    files = []
    for name in names:
        shard = fetch(name) if fetch else shard_inside(index, name)
        if not Path(shard).is_file():
            if Path(shard).exists():  # '.', a sub-folder, a FIFO: there, but not a file to read tensors from
                raise CheckpointError(f"{index}: shard {name!r} is not a file", path=index)
            raise CheckpointNotFound(f"{index}: shard {name!r} is missing", path=index)
        files.append(Path(shard))
    by_name = {name: str(f) for name, f in zip(names, files)}
    return Resolved(source, files=files, weight_map={k: by_name[v] for k, v in weight_map.items()},
                    note=f"{len(files)} shards")


def from_folder(source: str, folder: Path) -> Resolved:
    """The weights of a folder, in PREFERRED_FILES order. Raises SourceError when it holds none or several."""
    for name in PREFERRED_FILES:
        p = folder / name
        if p.is_file():
            return from_index(source, p) if name.endswith(".index.json") else Resolved(source, files=[p], note=name)
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return from_index(source, indexes[0])
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(weights) == 1:
        if not weights[0].is_file():
            raise CheckpointError(f"{weights[0]}: is a FIFO, device or socket, not a regular file", path=weights[0])
        return Resolved(source, files=weights)
    if not weights:
        raise SourceError(f"{source}: folder holds no weights file (looked for {', '.join(PREFERRED_FILES[:3])}, *.index.json, *.safetensors, *.pt, *.bin)",
                          path=source)
    raise SourceError(f"{source}: folder holds several weight files ({', '.join(p.name for p in weights[:4])}); name one",
                      path=source)
