"""Checkpoint: a lazy, read-only mapping name → tensor over any source, with keys normalised once on load."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from .formats import SafetensorsReader, file_sha256
from .spill import release_freed, spill
from .keys import EMA_PREFIXES, STRIP_PREFIXES, normalise_key, provenance_of

__all__ = ["PROVENANCE_SUFFIX", "STRIP_PREFIXES", "REGULAR_CONTAINERS", "EMA_CONTAINERS", "EMA_PREFIXES", "Source",
           "Resolved", "normalise_key", "SAFE_GLOBALS", "load_pickle", "MAX_NESTING", "MAX_ENTRIES", "unwrap",
           "find_aliases", "Checkpoint", "from_tensors", "allow_expanded", "check_pickled_tensors", "open_resolved"]

PROVENANCE_SUFFIX = ".weightspace.json"  # beside a pickled output: x.pt → x.pt.weightspace.json
REGULAR_CONTAINERS = ("state_dict", "model_state_dict", "model", "module")
EMA_CONTAINERS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema")

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

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Inert,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
            kind = getattr(pid[1], "qualname", "").rsplit(".", 1)[-1].replace("Storage", "")
            self.declared += max(0, pid[4]) * _STORAGE_ITEMSIZE.get(kind, 1)
        return _Inert()


def _check_legacy_sizes(path: Path) -> None:
    """A legacy (non-zip) pickle allocates each storage at the size it declares before reading its bytes: refuse
    one that declares more bytes than the file holds (a patched size would ask for terabytes)."""
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


MAX_NESTING = 64  # containers inside containers; real checkpoints nest a handful deep
MAX_ENTRIES = 1_000_000  # entries visited while flattening: shared sub-dicts would otherwise multiply them


def _flatten(obj: Mapping, path: str) -> dict[str, torch.Tensor]:
    """Nested mappings → {dotted name: tensor}, iteratively: a pickle may nest thousands deep, hold a cycle, or
    share one dict many times over (2^22 paths from 22 levels); each is refused in bounded time."""
    out: dict[str, torch.Tensor] = {}
    visited = 0
    # each frame: (prefix, iterator over the mapping's items, ids of the mappings on the way down)
    stack = [("", iter(obj.items()), frozenset([id(obj)]))]
    while stack:
        prefix, items, above = stack[-1]
        for k, v in items:
            visited += 1
            if visited > MAX_ENTRIES:
                raise CheckpointError(f"{path}: holds more than {MAX_ENTRIES:,} nested entries (shared or "
                                      f"repeated containers); refused", path=path)
            name = f"{prefix}{k}"
            if torch.is_tensor(v):
                out[name] = v
            elif isinstance(v, Mapping):
                if id(v) in above:
                    raise CheckpointError(f"{path}: the container at {name!r} contains itself; refused", path=path)
                if len(stack) >= MAX_NESTING:
                    raise CheckpointError(f"{path}: containers nested deeper than {MAX_NESTING} levels at "
                                          f"{name[:80]!r}...; refused", path=path)
                stack.append((name + ".", iter(v.items()), above | {id(v)}))
                break
        else:
            stack.pop()
    return out


def _all_tensors(obj: Mapping) -> bool:
    return len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _wants_ema(ema: str | bool) -> bool:
    return ema in ("prefer", "require") or ema is True


def unwrap(obj: Any, path: str, ema: str | bool = "off") -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict inside a loaded pickle; returns it and a description of the chosen variant.

    ``ema``: "off" (regular weights), "prefer" (EMA where present) or "require" (True is "require").
    Raises CheckpointError when it holds no tensors, or no EMA weights under "require"."""
    if torch.is_tensor(obj) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict", path=path)
    chain: list[str] = []
    took_ema = False
    seen = {id(obj)}
    while not _all_tensors(obj):
        if len(chain) >= MAX_NESTING:
            raise CheckpointError(f"{path}: state dict wrapped more than {MAX_NESTING} levels deep; refused", path=path)
        present = [n for n in EMA_CONTAINERS + REGULAR_CONTAINERS if isinstance(obj.get(n), Mapping) and len(obj[n]) > 0]
        ema_hit = next((n for n in present if n in EMA_CONTAINERS), None)
        reg_hit = next((n for n in present if n in REGULAR_CONTAINERS), None)
        if _wants_ema(ema) and ema_hit:
            chain.append(f"'{ema_hit}' (EMA)")
            obj, took_ema = obj[ema_hit], True
        elif reg_hit:
            chain.append(f"'{reg_hit}'" + (f" (EMA weights '{ema_hit}' ignored; ?ema=1 or --ema picks them)"
                                           if ema_hit else ""))
            obj = obj[reg_hit]
        elif ema_hit:  # only EMA weights are present: use them rather than keys prefixed with the container's name
            chain.append(f"'{ema_hit}' (EMA, the only weights present)")
            obj, took_ema = obj[ema_hit], True
        else:
            break
        if id(obj) in seen:
            raise CheckpointError(f"{path}: container {chain[-1]} contains itself; refused", path=path)
        seen.add(id(obj))
    flat = _flatten(obj, path)
    if not flat:
        raise CheckpointError(f"{path}: holds no tensors", path=path)
    note = ""
    if not took_ema:
        flat, note = _pick_prefixed(flat, path, ema)
    return flat, " / ".join(chain + ([note] if note else []))


def _pick_prefixed(flat: dict, path: str, ema: str | bool) -> tuple[dict, str]:
    """Handle EMA copies stored beside the weights under a key prefix (e.g. 'ema.')."""
    prefix = next((p for p in EMA_PREFIXES if any(k.startswith(p) for k in flat)), None)
    if prefix is None:
        if ema == "require" or ema is True:
            raise CheckpointError(f"{path}: EMA weights were asked for (ema=1) but the file holds no EMA weights",
                                  path=path)
        return flat, ""
    if _wants_ema(ema):
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, f"EMA weights ('{prefix}*')"
    rest = {k: v for k, v in flat.items() if not k.startswith(prefix)}
    if not rest:
        return {k[len(prefix):]: v for k, v in flat.items()}, f"EMA weights ('{prefix}*', the only ones present)"
    return rest, f"non-EMA weights ('{prefix}*' ignored; ?ema=1 or --ema picks them)"


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


def _from_safetensors(source: str, files: list[Path], weight_map: dict[str, str] | None, ema: str) -> Checkpoint:
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
    picked, variant = _pick_prefixed({k: k for k in raw}, str(files[0]), ema)
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


def open_resolved(res: Resolved, ema: str | bool = "off") -> Checkpoint:
    """Open a resolved source (local files, or a library's state dict) as a lazy Checkpoint.

    ``ema``: "off", "prefer" or "require" (see unwrap). Raises:
        CheckpointError: a file is unreadable, corrupt or holds no tensors (or no EMA weights under "require").
        UnsafeCheckpoint: a pickle needs more than tensors to load.
    """
    if res.state_dict is not None:
        flat, variant = unwrap(res.state_dict, res.source, ema if not res.variant else "off")
        ck = from_tensors(res.source, flat, res.variant or variant, [])
    elif all(f.name.endswith(".safetensors") for f in res.files):
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
            flat, variant = unwrap(obj, str(f), ema)
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
