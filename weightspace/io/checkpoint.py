"""Checkpoint: a lazy, read-only mapping name → tensor over any source, with keys normalised once on load."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from ..errors import CheckpointError, CheckpointNotFound, UnsafeCheckpoint, key_sample
from .containers import pick_prefixed, unwrap
from .formats import SafetensorsReader, file_sha256
from .spill import release_freed, spill

__all__ = ["PROVENANCE_SUFFIX", "STRIP_PREFIXES", "Source",
           "Resolved", "normalise_key", "SAFE_GLOBALS", "load_pickle",
           "find_aliases", "Checkpoint", "from_tensors", "allow_expanded", "check_pickled_tensors", "open_resolved"]

PROVENANCE_SUFFIX = ".weightspace.json"  # beside a pickled output: x.pt → x.pt.weightspace.json
STRIP_PREFIXES = ("module.", "_orig_mod.")

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


def _convert_hint(path: Path) -> str:
    # EMA weights are kept under 'ema.' keys, which load() reads back as the EMA variant.
    return (f"if you trust this file, convert it once: python -c \"import torch, safetensors.torch as s; "
            f"c = torch.load('{path}', weights_only=False); w = c.get('state_dict', c); e = c.get('state_dict_ema') "
            f"or {{}}; s.save_file({{**{{k: v.clone() for k, v in w.items() if torch.is_tensor(v)}}, "
            f"**{{'ema.' + k: v.clone() for k, v in e.items() if torch.is_tensor(v)}}}}, "
            f"'{path.with_suffix('.safetensors')}')\"")


# The one class allowed beyond what weights_only=True loads: timm's CheckpointSaver stores its training arguments
# as an argparse.Namespace (timm's own loader allowlists exactly this). Rebuilding a Namespace sets attributes on
# a plain object and calls nothing else, so no pickled code runs.
SAFE_GLOBALS = (argparse.Namespace,)


_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                     "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


class _Inert:
    """What the storage scan makes of every pickled object: nothing runs, everything is accepted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """Reads a legacy pickle's storage declarations without creating anything (every global becomes _Inert)."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.declared = 0
        self._seen: set[Any] = set()

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Inert,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        # Tensors that are views of one storage (an LSTM's gates, old RNN checkpoints) each name it by its key:
        # the storage is allocated, and its bytes stored, once.
        if (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int)
                and _hashable(pid[2]) not in self._seen):
            self._seen.add(_hashable(pid[2]))
            kind = getattr(pid[1], "qualname", "").rsplit(".", 1)[-1].replace("Storage", "")
            self.declared += max(0, pid[4]) * _STORAGE_ITEMSIZE.get(kind, 1)
        return _Inert()


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        return id(key)  # a key that is not a string is not one torch writes: count it on its own
    return key


def _check_legacy_sizes(path: Path) -> None:
    """A legacy (non-zip) pickle allocates each storage at the size it declares before reading its bytes: refuse
    one whose distinct storages declare more bytes than the file holds (a patched size would ask for terabytes)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, system info
                _StorageScan(f).load()
            scan = _StorageScan(f)
            scan.load()
    except Exception:  # noqa: BLE001 — not a legacy pickle we can scan: torch.load gives its own error
        return
    if scan.declared > size:
        raise CheckpointError(f"{path}: declares {scan.declared:,} bytes of tensor storage but the file holds "
                              f"{size:,} bytes; refused (corrupt or hostile)", path=path)


def load_pickle(path: Path) -> Any:
    """torch.load with weights_only=True (never executes pickled code); memory-mapped where the format allows.

    Only tensors, plain containers and ``SAFE_GLOBALS`` (argparse.Namespace, as timm's checkpoints hold) are
    rebuilt. Raises UnsafeCheckpoint for a pickle that needs anything else, CheckpointError for unreadable files."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e).lower():
                    raise
                if "zip" in str(e).lower() and zipfile.is_zipfile(path):
                    raise
                _check_legacy_sizes(path)
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # torch's text suggests allow-listing the global; we name it and say how to convert instead
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        operand = re.search(r"Unsupported operand \d+", str(e))
        if operand and not found:  # not a pickle at all: converting would not help
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (not a pickle: {operand.group(0)})",
                                  path=path) from None
        detail = f"it needs {found.group(1)}" if found else "it needs objects beyond tensors"
        raise UnsafeCheckpoint(f"{path}: refused to unpickle: {detail}, and weights_only=True loads only tensors and "
                               f"plain containers; {_convert_hint(path)}", path=path) from None
    except FileNotFoundError:
        raise CheckpointNotFound(f"{path}: no such file", path=path) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 — the weights-only unpickler fails on junk with any error type (IndexError, ...)
        text = " ".join(str(e).split())
        msg = re.split(r"(?<=\.) ", text)[0].rstrip(".") if text else ""  # first sentence only
        if not isinstance(e, (RuntimeError, OSError)):
            msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg})", path=path) from None


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


class Checkpoint(Mapping):
    """A lazy mapping name → tensor; a tensor is read from disk only when asked for."""

    def __init__(self, source: str, entries: dict[str, tuple[Any, str]], *, variant: str = "",
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
        self._flat: tuple[str | None, torch.Tensor | None] = (None, None)

    # Mapping protocol
    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            backend, raw = self._entries[key]
        except KeyError:
            raise KeyError(key) from None
        if isinstance(backend, SafetensorsReader):
            return backend.read(raw)
        return backend[raw]

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
        if isinstance(backend, SafetensorsReader):
            return backend.read_into(raw, buffer, start, stop)
        t = backend[raw]
        if not t.is_contiguous():  # flatten once per key, not once per piece (pieces come in key order)
            flat = self._flat  # one read of the pair: worker threads may be on other keys of this checkpoint
            if flat[0] != key:
                flat = self._flat = (key, t.reshape(-1))
            return flat[1][start:stop]
        return t.view(-1)[start:stop]

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of one tensor, without reading its data."""
        backend, raw = self._entries[key]
        if isinstance(backend, SafetensorsReader):
            i = backend.tensors[raw]
            return i.dtype, i.shape
        t = backend[raw]
        return t.dtype, tuple(t.shape)

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
        raw = self.metadata.get("weightspace")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

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
                    from .formats import tensor_bytes
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

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Materialise every tensor (one model in memory)."""
        return {k: self[k] for k in self}

    def close(self) -> None:
        """Release open file handles."""
        for backend, _ in self._entries.values():
            if isinstance(backend, SafetensorsReader):
                backend.close()


def _normalised(source: str, raw_keys: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in raw_keys:
        k = normalise_key(raw)
        if k in out:
            raise CheckpointError(f"{source}: keys '{out[k]}' and '{raw}' both normalise to '{k}'", path=source)
        out[k] = raw
    return out


def _from_safetensors(source: str, files: list[Path], weight_map: dict[str, str] | None, ema: str | bool) -> Checkpoint:
    readers = {str(f): SafetensorsReader(f) for f in files}
    raw: dict[str, tuple[Any, str]] = {}
    for f, r in readers.items():
        for k in r.tensors:
            if weight_map is not None and weight_map.get(k) not in (None, f):
                continue
            raw[k] = (r, k)
    if weight_map is not None:
        missing = [k for k in weight_map if k not in raw]
        if missing:
            raise CheckpointError(f"{source}: shard index names keys missing from the shards (e.g. '{missing[0]}')",
                                  path=source)
    if not raw:
        raise CheckpointError(f"{files[0]}: holds no tensors", path=files[0])
    picked, variant = pick_prefixed({k: k for k in raw}, str(files[0]), ema)
    mapping = _normalised(source, list(picked))
    entries = {k: raw[picked[r]] for k, r in mapping.items()}
    meta = next(iter(readers.values())).metadata
    return Checkpoint(source, entries, variant=variant, files=files, metadata=meta)


def from_tensors(source: str, tensors: dict[str, torch.Tensor], variant: str = "", files: list[Path] | None = None) -> Checkpoint:
    """A Checkpoint over in-memory tensors, keys normalised; raises CheckpointError when two keys normalise alike."""
    files = files or []
    mapping = _normalised(source, list(tensors))
    norm = {k: tensors[r] for k, r in mapping.items()}
    return Checkpoint(source, {k: (norm, k) for k in norm}, variant=variant, files=files, aliases=find_aliases(norm))


_allow_expanded = False


def allow_expanded(on: bool = True) -> bool:
    """Let pickled tensors that are larger as written than as stored (stride-0 or overlapping views, e.g.
    ``torch.zeros(1).expand(10**12)``) load in this process, or stop; returns the previous setting. The CLI's
    ``--allow-expanded`` turns it on."""
    global _allow_expanded
    before, _allow_expanded = _allow_expanded, bool(on)
    return before


def check_pickled_tensors(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors from a pickle that weightspace cannot treat as plain dense data.

    Raises:
        CheckpointError: naming the file and key, for a nested, sparse, quantised or meta tensor, or (unless
            ``allow_expanded`` is on) a view whose materialised size exceeds the storage it really holds. A view
            that does not grow (a ``position_ids`` buffer expanded along a size-1 dimension) passes.
    """
    for key, t in tensors.items():
        if t.is_nested:  # its layout reads as strided, yet it has no single shape
            raise CheckpointError(f"{path}: key {key!r} is a nested tensor; only dense tensors are read (convert it "
                                  f"with .to_padded_tensor(0) or unbind it into separate keys)", path=path, key=key)
        if t.layout != torch.strided:
            raise CheckpointError(f"{path}: key {key!r} is a {str(t.layout).replace('torch.', '')} tensor; only dense "
                                  f"tensors are read (convert it with .to_dense())", path=path, key=key)
        if t.device.type == "meta":
            raise CheckpointError(f"{path}: key {key!r} is a meta tensor: it has a shape but no data",
                                  path=path, key=key)
        if t.is_quantized:
            raise CheckpointError(f"{path}: key {key!r} is quantised ({t.dtype}); dequantise it first (.dequantize())",
                                  path=path, key=key)
        if not _allow_expanded:
            need = t.numel() * t.element_size()
            held = t.untyped_storage().nbytes()
            if need > held:
                raise CheckpointError(f"{path}: key {key!r} is a view of {held:,} stored bytes that would be "
                                      f"{need:,} bytes once materialised (stride 0 or overlapping); refused (use "
                                      f"--allow-expanded to materialise it)", path=path, key=key)


def open_resolved(res: Resolved, ema: str | bool = "off", key: str | None = None) -> Checkpoint:
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
        variant = ""
        metadata: dict[str, str] = {}
        for f in res.files:
            if f.name.endswith(".safetensors"):
                reader = SafetensorsReader(f)
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
            if not zipfile.is_zipfile(f):  # legacy format: loaded into our own memory, not mapped (bench/pt_memory.py)
                obj, flat = None, spill(flat, f.parent)
                release_freed()
            merged.update(flat)
        ck = from_tensors(res.source, merged, variant, res.files)
        ck.metadata = metadata
    ck.note = res.note
    ck.resolved_commit = res.commit
    return ck
