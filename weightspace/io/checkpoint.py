"""Checkpoint: a lazy, read-only mapping name → tensor over any source, with keys normalised once on load.

Each tensor is read through a backend object: ``SafetensorsBackend`` (positioned reads of one file) or
``MemoryBackend`` (tensors already in memory: pickles, library state dicts, weights handed over in Python).
A new format only needs a backend with ``read``, ``read_range``, ``info`` and ``close``."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Union

import torch

from ..errors import CheckpointError, key_sample
from ..options import EmaChoice
from .containers import pick_prefixed, unwrap
from .formats import SafetensorsReader, file_sha256, tensor_bytes
from .pickles import check_pickled_tensors, is_zip, load_pickle
from .keys import STRIP_PREFIXES, normalise_key, provenance_of
from .spill import release_freed, spill

__all__ = ["PROVENANCE_SUFFIX", "STRIP_PREFIXES", "Source", "Resolved", "normalise_key", "find_aliases", "Backend",
           "SafetensorsBackend", "check_index", "MemoryBackend", "Checkpoint", "from_tensors", "open_resolved"]

PROVENANCE_SUFFIX = ".weightspace.json"  # beside a pickled output: x.pt → x.pt.weightspace.json

Source = Union[str, os.PathLike, "Checkpoint", Mapping, "torch.nn.Module"]


@dataclass
class Resolved:
    """A source string turned into something loadable (what ``sources.resolve`` returns, ``open_resolved`` opens)."""

    source: str
    files: list[Path] = field(default_factory=list)       # weight files, in shard order
    weight_map: dict[str, str] | None = None               # key -> file name, for sharded checkpoints
    state_dict: dict | None = None                         # for library loaders (timm, open_clip)
    note: str = ""                                         # how it was resolved, for reports
    variant: str = ""                                      # which weights of a file were taken (EMA or not)
    commit: str | None = None                              # the Hub commit the files came from


def find_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensors share memory with an earlier key (tied weights): alias -> canonical."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k in tensors:
        t = tensors[k]
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[k] = seen[ident]
        else:
            seen[ident] = k
    return aliases


class Backend(Protocol):
    """Where a Checkpoint's tensors come from; ``raw`` is the tensor's name in the backend (before normalising)."""

    def read(self, raw: str) -> torch.Tensor: ...

    def read_range(self, raw: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor: ...

    def info(self, raw: str) -> tuple[torch.dtype, tuple[int, ...]]: ...

    def close(self) -> None: ...


class SafetensorsBackend:
    """Tensors of one safetensors file, each read from disk when asked for."""

    def __init__(self, reader: SafetensorsReader):
        self.reader = reader

    def read(self, raw: str) -> torch.Tensor:
        return self.reader.read(raw)

    def read_range(self, raw: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        return self.reader.read_into(raw, buffer, start, stop)

    def info(self, raw: str) -> tuple[torch.dtype, tuple[int, ...]]:
        i = self.reader.tensors[raw]
        return i.dtype, i.shape

    def close(self) -> None:
        self.reader.close()


class MemoryBackend:
    """Tensors already in memory (or memory-mapped by torch.load)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self._flat: tuple[str | None, torch.Tensor | None] = (None, None)

    def read(self, raw: str) -> torch.Tensor:
        return self.tensors[raw]

    def read_range(self, raw: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        t = self.tensors[raw]
        if not t.is_contiguous():  # flatten once per key, not once per piece (pieces come in key order)
            flat = self._flat  # one read of the pair: worker threads may be on other keys of this checkpoint
            if flat[0] != raw or flat[1] is None:
                flat = self._flat = (raw, t.reshape(-1))
            return flat[1][start:stop]
        return t.view(-1)[start:stop]

    def info(self, raw: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.tensors[raw]
        return t.dtype, tuple(t.shape)

    def close(self) -> None:
        pass


class Checkpoint(Mapping):
    """A lazy mapping name → tensor; a tensor is read from its backend only when asked for."""

    def __init__(self, source: str, entries: dict[str, tuple[Backend, str]], *, variant: str = "",
                 files: list[Path] | None = None, aliases: dict[str, str] | None = None,
                 metadata: dict[str, str] | None = None, note: str = ""):
        self.source = source
        self._entries = entries
        self.variant = variant
        self.files = files or []
        self.aliases = aliases or {}
        self.metadata = metadata or {}
        self.note = note
        self._sha: str | None = None
        self.resolved_commit: str | None = None  # the Hub commit a hf:// or timm: source resolved to
        self.stripped_prefix: str | None = None

    # Mapping protocol
    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            backend, raw = self._entries[key]
        except KeyError:
            raise KeyError(key) from None
        return backend.read(raw)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self)} tensors)"

    def read_range(self, key: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of one tensor, flattened. File-backed data is read into ``buffer`` (uint8) when
        given: the view returned is valid until the buffer is reused. Streaming ops read this way."""
        backend, raw = self._entries[key]
        return backend.read_range(raw, start, stop, buffer)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of one tensor, without reading its data."""
        backend, raw = self._entries[key]
        return backend.info(raw)

    def _sizes(self) -> Iterator[tuple[int, int]]:
        """(elements, bytes) of every tensor, tied ones counted once; read from the headers, no data."""
        for k in self:
            if k not in self.aliases:
                dtype, shape = self.info(k)
                n = math.prod(shape)
                yield n, n * dtype.itemsize

    @property
    def num_params(self) -> int:
        """Total number of elements over all tensors (tied ones counted once)."""
        return sum(n for n, _ in self._sizes())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (tied ones counted once)."""
        return sum(b for _, b in self._sizes())

    @property
    def provenance(self) -> dict | None:
        """The weightspace provenance stored in the file's metadata, if any."""
        return provenance_of(self.metadata)

    def sha256(self) -> str:
        """sha256 of the file (or of the shards' hashes, or of the tensors for in-memory state dicts)."""
        if self._sha is None:
            if len(self.files) == 1:
                self._sha = file_sha256(self.files[0])
            elif self.files:
                h = hashlib.sha256()
                for f in self.files:
                    h.update(file_sha256(f).encode())
                self._sha = h.hexdigest()
            else:
                h = hashlib.sha256()
                for k in sorted(self):
                    t = self[k]
                    h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
                    h.update(tensor_bytes(t))
                self._sha = h.hexdigest()
        return self._sha

    def strip_prefix(self, prefix: str, *, why: str = "") -> "Checkpoint":
        """A view keeping only the keys that start with ``prefix``, with it removed (no tensor is read).

        Raises CheckpointError when no key starts with it."""
        kept = {k[len(prefix):]: v for k, v in self._entries.items() if k.startswith(prefix) and len(k) > len(prefix)}
        if not kept:
            raise CheckpointError(f"{self.source}: no key starts with the prefix '{prefix}' "
                                  f"(keys look like {key_sample(sorted(self._entries), 2)})", path=self.source)
        dropped = len(self._entries) - len(kept)
        note = f"keys under '{prefix}'" + (f" ({dropped} other keys dropped)" if dropped else "") + why
        ck = Checkpoint(self.source, kept, variant=" / ".join(v for v in (self.variant, note) if v), files=self.files,
                        aliases={a[len(prefix):]: c[len(prefix):] for a, c in self.aliases.items()
                                 if a.startswith(prefix) and c.startswith(prefix)},
                        metadata=self.metadata, note=self.note)
        ck._sha = self._sha
        ck.resolved_commit = self.resolved_commit
        ck.stripped_prefix = (self.stripped_prefix or "") + prefix
        return ck

    def materialise(self) -> dict[str, torch.Tensor]:
        """Every tensor, read now (one model in memory); ``to_dict`` in weightspace always means JSON-ready."""
        return {k: self[k] for k in self}

    def close(self) -> None:
        """Release open file handles."""
        for backend in {id(b): b for b, _ in self._entries.values()}.values():
            backend.close()


def _normalised(source: str, raw_keys: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in raw_keys:
        k = normalise_key(raw)
        if k in out:
            raise CheckpointError(f"{source}: keys '{out[k]}' and '{raw}' both normalise to '{k}'", path=source)
        out[k] = raw
    return out


def check_index(source: str, weight_map: Mapping[str, str], shard_keys: Mapping[str, list[str]]) -> None:
    """Hold a shard index to what its shards really contain, the same way for every format (safetensors and
    pickled ``.bin`` shards): each listed key is in the shard it names, no key is in two shards, and no shard holds
    a key the index does not list.

    ``weight_map``: key → shard path; ``shard_keys``: shard path → the keys it holds.
    Raises CheckpointError (one line naming the index's source, the key and the shards)."""
    where: dict[str, str] = {}
    for shard, keys in shard_keys.items():
        for k in keys:
            if k in where:
                raise CheckpointError(f"{source}: key {k!r} is in two shards ({Path(where[k]).name} and "
                                      f"{Path(shard).name}); refused", path=source, key=k)
            where[k] = shard
    for k, shard in weight_map.items():
        if where.get(k) != shard:
            found = f" (it is in {Path(where[k]).name})" if k in where else ""
            raise CheckpointError(f"{source}: the shard index lists {k!r} in {Path(shard).name}, which does not hold "
                                  f"it{found}", path=source, key=k)
    extra = next((k for k in where if k not in weight_map), None)
    if extra is not None:
        raise CheckpointError(f"{source}: shard {Path(where[extra]).name} holds {extra!r}, which the index does not "
                              f"list; refused", path=source, key=extra)


def _from_safetensors(source: str, files: list[Path], weight_map: dict[str, str] | None, ema: EmaChoice) -> Checkpoint:
    readers = {str(f): SafetensorsBackend(SafetensorsReader(f)) for f in files}
    if weight_map is not None:
        check_index(source, weight_map, {f: list(r.reader.tensors) for f, r in readers.items()})
    raw: dict[str, tuple[Backend, str]] = {k: (r, k) for r in readers.values() for k in r.reader.tensors}
    if not raw:
        raise CheckpointError(f"{files[0]}: holds no tensors", path=files[0])
    picked, variant = pick_prefixed({k: k for k in raw}, str(files[0]), ema)
    mapping = _normalised(source, list(picked))
    entries = {k: raw[picked[r]] for k, r in mapping.items()}
    meta = next(iter(readers.values())).reader.metadata
    return Checkpoint(source, entries, variant=variant, files=files, metadata=meta)


def from_tensors(source: str, tensors: dict[str, torch.Tensor], variant: str = "", files: list[Path] | None = None) -> Checkpoint:
    """A Checkpoint over in-memory tensors, keys normalised; raises CheckpointError when two keys normalise alike."""
    files = files or []
    mapping = _normalised(source, list(tensors))
    norm = {k: tensors[r] for k, r in mapping.items()}
    backend = MemoryBackend(norm)
    return Checkpoint(source, {k: (backend, k) for k in norm}, variant=variant, files=files,
                      aliases=find_aliases(norm))


def open_resolved(res: Resolved, ema: EmaChoice = "off", key: str | None = None) -> Checkpoint:
    """Open a resolved source (local files, or a library's state dict) as a lazy Checkpoint.

    ``ema``: "off", "prefer" or "require"; ``key``: the entry of a pickled training checkpoint that holds the
    weights (see containers.unwrap). Raises:
        CheckpointError: a file is unreadable, corrupt or holds no tensors (or no EMA weights under "require").
        UnsafeCheckpoint: a pickle needs more than tensors to load.
    """
    if res.state_dict is not None:
        flat, variant = unwrap(res.state_dict, res.source, ema if not res.variant else "off")
        ck = from_tensors(res.source, flat, res.variant or variant, [])
    elif all(f.name.endswith(".safetensors") for f in res.files):
        if key:
            raise CheckpointError(f"{res.source}: ?key= picks an entry of a pickled training checkpoint; a "
                                  f"safetensors file is flat (use ?strip_prefix= to keep the keys under a prefix)",
                                  path=res.source)
        ck = _from_safetensors(res.source, res.files, res.weight_map, ema)
    else:
        merged: dict[str, torch.Tensor] = {}
        shard_keys: dict[str, list[str]] = {}
        variant = ""
        metadata: dict[str, str] = {}
        for f in res.files:
            if f.name.endswith(".safetensors"):
                reader = SafetensorsReader(f)
                shard_keys[str(f)] = list(reader.tensors)
                merged.update(spill({k: reader.read(k) for k in reader.tensors}, f.parent))
                reader.close()
                release_freed()
                continue
            obj = load_pickle(f)
            if isinstance(obj, Mapping) and isinstance(obj.get("weightspace"), str):
                metadata["weightspace"] = obj["weightspace"]  # provenance an older weightspace wrote into a .pt
            side = f.with_name(f.name + PROVENANCE_SUFFIX)
            if side.is_file():  # provenance weightspace writes beside a plain pickled state dict
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    metadata["weightspace"] = side.read_text()
            flat, variant = unwrap(obj, str(f), ema, key)
            check_pickled_tensors(str(f), flat)
            if not is_zip(f):  # legacy format: loaded into our own memory, not mapped (bench/pt_memory.py)
                obj, flat = None, spill(flat, f.parent)
                release_freed()
            shard_keys[str(f)] = list(flat)
            merged.update(flat)
        if res.weight_map is not None:
            check_index(res.source, res.weight_map, shard_keys)
        ck = from_tensors(res.source, merged, variant, res.files)
        ck.metadata = metadata
    ck.note = res.note
    ck.resolved_commit = res.commit
    return ck
