"""The safetensors header, validated exactly as the reference ``safetensors`` library validates it.

The reference parses the header with serde_json into typed Rust structs, which is stricter than Python's ``json``:
no NaN/Infinity literals, no numbers beyond f64 range, no lone surrogates, nesting at most 127 deep, dimensions
and offsets that are non-negative 64-bit integers (never ``true``, ``2.0`` or ``"3"``), metadata values that are
strings, no repeated field inside a tensor entry. A file counts as valid when the reference opens it and reads
every tensor into torch (so a dimension of 2^63 or more is refused even on an empty tensor: torch cannot hold
it). ``tests/test_safetensors_differential.py`` checks this module against the reference on generated headers.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

    DTYPES: dict[str, torch.dtype]  # built on first use, by __getattr__ below
    DTYPE_NAMES: dict[torch.dtype, str]

__all__ = ["MAX_HEADER", "DTYPES", "DTYPE_NAMES", "TensorInfo", "HeaderView", "read_raw_header", "parse_header",
           "read_header_view", "header_only_view", "torch_shape"]

MAX_HEADER = 100_000_000  # the reference's MAX_HEADER_SIZE
_MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays/objects fail
_U64 = 1 << 64

# Reference dtype name -> (the torch dtype's attribute name, bits per element). Names the reference knows but torch
# cannot hold (F6_E2M3, F6_E3M2) are refused by the reference at get_tensor, so they are refused here too. The table
# names torch's dtypes rather than holding them, so that reading a header needs no torch (``read_header_view``).
_ALL_DTYPES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8),
    "F8_E5M2": ("float8_e5m2", 8), "F8_E4M3": ("float8_e4m3fn", 8), "F8_E8M0": ("float8_e8m0fnu", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "I16": ("int16", 16), "U16": ("uint16", 16), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "I32": ("int32", 32), "U32": ("uint32", 32), "F32": ("float32", 32), "C64": ("complex64", 64),
    "F64": ("float64", 64), "I64": ("int64", 64), "U64": ("uint64", 64),
    "F4": ("float4_e2m1fn_x2", 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
}
# Whether torch can hold these depends on the installed torch: without torch, a header holding one is not judged.
_VERSIONED = {"F8_E8M0", "F4"}


def _torch_dtype(name: str) -> "torch.dtype | None":
    import torch
    attr = _ALL_DTYPES[name][0]
    return getattr(torch, attr, None) if attr else None


def __getattr__(name: str) -> Any:
    # DTYPES (reference name -> torch dtype) and DTYPE_NAMES (its inverse) need torch: built on first use
    if name in ("DTYPES", "DTYPE_NAMES"):
        dtypes = {k: d for k in _ALL_DTYPES if (d := _torch_dtype(k)) is not None}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file and what torch makes of it."""

    dtype: "torch.dtype"
    shape: tuple[int, ...]  # torch's shape (F4 packs two values per element: the last dimension is halved)
    begin: int  # absolute byte offset in the file
    end: int


class _Obj(list):
    """A JSON object as its list of (key, value) pairs: repeated keys stay visible, as serde sees them."""


class _Reject(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Reject(f"{name} is not JSON")


def _int(text: str) -> int | float:
    return -0.0 if text == "-0" else int(text)  # serde_json reads -0 as a float, never as an integer


def _float(text: str) -> float:
    x = float(text)
    if x in (float("inf"), float("-inf")):
        raise _Reject(f"number out of range: {text[:20]}")
    return x


_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def _too_deep(text: str) -> bool:
    depth = 0
    for m in _STRUCTURE.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _strings_ok(value: Any) -> bool:
    """No lone surrogate anywhere (serde rejects them; Python's json lets them through)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, _Obj):
            for k, x in v:
                stack.append(k)
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _u64(v: Any) -> int:
    if type(v) is not int or not 0 <= v < _U64:
        raise _Reject("expected a non-negative 64-bit integer")
    return v


def _dtype(v: Any) -> str:
    if isinstance(v, _Obj) and len(v) == 1 and v[0][1] is None:  # serde's {"F32": null} form of a unit variant
        v = v[0][0]
    if not isinstance(v, str) or v not in _ALL_DTYPES:
        raise _Reject(f"unknown dtype {str(v)[:30]!r}")
    return v


def _entry(v: Any) -> tuple[str, list[int], tuple[int, int]]:
    """A tensor entry: an object with dtype, shape and data_offsets (other fields ignored, none repeated), or the
    3-element array form serde also accepts for a struct."""
    if isinstance(v, _Obj):
        fields: dict[str, Any] = {}
        for k, x in v:
            if k in ("dtype", "shape", "data_offsets"):
                if k in fields:
                    raise _Reject(f"duplicate field {k}")
                fields[k] = x
        if len(fields) != 3:
            raise _Reject("missing field")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif isinstance(v, list) and len(v) == 3:
        dtype, shape, offsets = v
    else:
        raise _Reject("a tensor entry must be an object")
    name = _dtype(dtype)
    if not isinstance(shape, list) or isinstance(shape, _Obj):
        raise _Reject("shape must be an array")
    dims = [_u64(s) for s in shape]
    if not isinstance(offsets, list) or isinstance(offsets, _Obj) or len(offsets) != 2:
        raise _Reject("data_offsets must be two integers")
    return name, dims, (_u64(offsets[0]), _u64(offsets[1]))


def torch_shape(name: str, dims: list[int]) -> tuple[int, ...]:
    """The shape torch gives a tensor of reference dtype ``name`` (F4 packs two values per byte)."""
    if name == "F4":
        if not dims or dims[-1] % 2:
            raise _Reject("F4 needs an even last dimension")
        return (*dims[:-1], dims[-1] // 2)
    return tuple(dims)


def read_raw_header(fd: int, where: str) -> tuple[bytes, bytes, int]:
    """The 8-byte length prefix and the header bytes of the safetensors file open as ``fd``, and the size of its
    data section.

    Raises:
        CheckpointError: naming ``where``, when the file is too short or announces an impossible header.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (only {size} bytes)", path=where)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or n + 8 > size:
        raise CheckpointError(f"{where}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)",
                              path=where)
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise CheckpointError(f"{where}: truncated while reading the safetensors header", path=where)
    return head, raw, size - 8 - n


@dataclass(frozen=True)
class HeaderView:
    """What a safetensors header says, read without torch: each tensor's torch dtype name ('float32'), torch shape
    and bytes, in the file's data order, and the metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...], int]]
    metadata: dict[str, str]


def read_header_view(path: str | os.PathLike) -> HeaderView | None:
    """The header of the safetensors file at ``path``, validated as ``parse_header`` validates it, without torch;
    None when that needs torch to decide (a dtype whose support depends on the torch version, an empty tensor,
    whose shape torch alone judges).

    Raises:
        CheckpointError, CheckpointNotFound: as ``formats.SafetensorsReader`` for the same file.
    """
    from ..errors import CheckpointNotFound
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{where}: no such file", path=where) from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot open ({e.strerror})", path=where) from None
    try:
        _, raw, data_size = read_raw_header(fd, where)
    finally:
        os.close(fd)
    entries, metadata = _parse_entries(raw, where)
    if any(name in _VERSIONED or 0 in dims for name, dims, _ in entries.values()):
        return None
    _validate(entries, data_size, where, with_torch=False)
    order = sorted(entries.items(), key=lambda kv: kv[1][2])
    return HeaderView({k: (str(_ALL_DTYPES[name][0]), torch_shape(name, dims), e - b)
                       for k, (name, dims, (b, e)) in order}, metadata)


def header_only_view(source: str) -> HeaderView | None:
    """The header of ``source`` when it alone says what ``io.sources.load(source)`` would give — a plain local
    safetensors file (no query, no scheme) whose names load unchanged (no wrapper prefix, no EMA copies) and that
    holds tensors; else None (then load it). Reads no tensor data and imports no torch.

    Raises:
        CheckpointError: the file is not valid safetensors (as loading it would).
    """
    from .keys import EMA_PREFIXES, normalise_key
    if not source.endswith(".safetensors") or any(c in source for c in "?:~") or not os.path.isfile(source):
        return None
    view = read_header_view(source)
    if view is None or not view.tensors:
        return None
    if any(normalise_key(k) != k or k.startswith(EMA_PREFIXES) for k in view.tensors):
        return None
    return view


def parse_header(raw: bytes, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate header bytes of a file whose data section holds ``data_size`` bytes.

    Returns each tensor's info (offsets made absolute, i.e. counted from the start of the file) and the metadata.

    Raises:
        CheckpointError: naming ``where``, when the reference library would refuse the file.
    """
    entries, metadata = _parse_entries(raw, where)
    return _validate(entries, data_size, where), metadata


def _parse_entries(raw: bytes, where: str) -> tuple[dict[str, tuple[str, list[int], tuple[int, int]]], dict[str, str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: corrupt safetensors header (not UTF-8)", path=where) from None
    if _too_deep(text):
        raise CheckpointError(f"{where}: corrupt safetensors header (JSON nested deeper than {_MAX_DEPTH})", path=where)
    try:
        header = json.loads(text, object_pairs_hook=_Obj, parse_float=_float, parse_int=_int, parse_constant=_no_constant)
    except _Reject as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({e})", path=where) from None
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer too long for int()
        raise CheckpointError(f"{where}: corrupt safetensors header (not valid JSON)", path=where) from None
    if not isinstance(header, _Obj):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)", path=where)
    if not _strings_ok(header):
        raise CheckpointError(f"{where}: corrupt safetensors header (a string holds a lone surrogate)", path=where)
    metadata: dict[str, str] = {}
    entries: dict[str, tuple[str, list[int], tuple[int, int]]] = {}
    seen_meta = False
    for key, value in header:
        try:
            if key == "__metadata__":
                if seen_meta:
                    raise _Reject("__metadata__ given twice")
                seen_meta = True
                if value is None:
                    continue
                if not isinstance(value, _Obj):
                    raise _Reject("__metadata__ must be an object of strings")
                metadata = {}
                for mk, mv in value:
                    if not isinstance(mv, str):
                        raise _Reject(f"metadata value of {mk!r} is not a string")
                    metadata[mk] = mv
            else:
                entries[key] = _entry(value)  # a repeated key: the last one counts, as in the reference
        except _Reject as e:
            raise CheckpointError(f"{where}: corrupt safetensors header at key {key!r} ({e})",
                                  path=where, key=key) from None
    return entries, metadata


def _validate(entries: dict[str, tuple[str, list[int], tuple[int, int]]], data_size: int,
              where: str, *, with_torch: bool = True) -> dict[str, TensorInfo]:
    """Each tensor's info; ``with_torch=False`` checks everything but what only torch can judge (the caller has
    set those files aside) and returns nothing."""
    base = 0  # offsets are relative to the data section; the caller adds the header's size
    pos = 0
    tensors: dict[str, TensorInfo] = {}
    for key, (name, dims, (b, e)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if b != pos or e < b:
            raise CheckpointError(f"{where}: corrupt safetensors file: data of key {key!r} does not follow the "
                                  f"previous tensor (offsets [{b}, {e}], expected to start at {pos})",
                                  path=where, key=key)
        pos = e
        numel = 1
        for d in dims:
            numel *= d
            if numel >= _U64:
                raise CheckpointError(f"{where}: corrupt safetensors header: key {key!r} has a shape too large "
                                      f"to count ({dims[:8]})", path=where, key=key)
        attr, bits = _ALL_DTYPES[name]
        nbits = numel * bits
        if nbits >= _U64 or nbits % 8:
            raise CheckpointError(f"{where}: corrupt safetensors header: key {key!r} has a shape that does not "
                                  f"fill whole bytes or is too large ({dims[:8]})", path=where, key=key)
        if e - b != nbits // 8:
            raise CheckpointError(f"{where}: corrupt safetensors header: key {key!r} has {e - b} bytes for "
                                  f"shape {dims[:8]} of {name}", path=where, key=key)
        dtype = _torch_dtype(name) if with_torch else None
        if (dtype if with_torch else attr) is None:
            raise CheckpointError(f"{where}: key {key!r} has dtype {name}, which torch cannot hold",
                                  path=where, key=key)
        if dtype is None:  # without torch: the caller has set aside what only torch can judge
            continue
        import torch
        try:
            shape = torch_shape(name, dims)
            if numel == 0:  # what the reference makes of an empty tensor; torch refuses some shapes (2^63)
                torch.empty(shape, dtype=dtype)
        except _Reject as why:
            raise CheckpointError(f"{where}: corrupt safetensors header at key {key!r} ({why})",
                                  path=where, key=key) from None
        except (RuntimeError, TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{where}: corrupt safetensors header: key {key!r} has a shape torch cannot "
                                  f"hold ({dims[:8]})", path=where, key=key) from None
        tensors[key] = TensorInfo(dtype, shape, base + b, base + e)
    if pos != data_size:
        if pos > data_size:
            raise CheckpointError(f"{where}: truncated safetensors file: the header needs {pos} bytes of data, "
                                  f"the file has {data_size}", path=where)
        raise CheckpointError(f"{where}: corrupt safetensors file: {data_size - pos} trailing bytes after the data",
                              path=where)
    return tensors
