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
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["MAX_HEADER", "DTYPES", "DTYPE_NAMES", "TensorInfo", "parse_header", "torch_shape"]

MAX_HEADER = 100_000_000  # the reference's MAX_HEADER_SIZE
_MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays/objects fail
_U64 = 1 << 64

# Reference dtype name -> (torch dtype, bits per element). Names the reference knows but torch cannot hold
# (F6_E2M3, F6_E3M2) are refused by the reference at get_tensor, so they are refused here too.
_ALL_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8), "U8": (torch.uint8, 8), "I8": (torch.int8, 8),
    "F8_E5M2": (torch.float8_e5m2, 8), "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 8), "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 8),
    "I16": (torch.int16, 16), "U16": (torch.uint16, 16), "F16": (torch.float16, 16), "BF16": (torch.bfloat16, 16),
    "I32": (torch.int32, 32), "U32": (torch.uint32, 32), "F32": (torch.float32, 32), "C64": (torch.complex64, 64),
    "F64": (torch.float64, 64), "I64": (torch.int64, 64), "U64": (torch.uint64, 64),
    "F4": (getattr(torch, "float4_e2m1fn_x2", None), 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
}
DTYPES: dict[str, torch.dtype] = {k: v[0] for k, v in _ALL_DTYPES.items() if v[0] is not None}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file and what torch makes of it."""

    dtype: torch.dtype
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


def parse_header(raw: bytes, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate header bytes of a file whose data section holds ``data_size`` bytes.

    Returns each tensor's info (offsets made absolute, i.e. counted from the start of the file) and the metadata.

    Raises:
        CheckpointError: naming ``where``, when the reference library would refuse the file.
    """
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
    return _validate(entries, data_size, where), metadata


def _validate(entries: dict[str, tuple[str, list[int], tuple[int, int]]], data_size: int,
              where: str) -> dict[str, TensorInfo]:
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
        dtype, bits = _ALL_DTYPES[name]
        nbits = numel * bits
        if nbits >= _U64 or nbits % 8:
            raise CheckpointError(f"{where}: corrupt safetensors header: key {key!r} has a shape that does not "
                                  f"fill whole bytes or is too large ({dims[:8]})", path=where, key=key)
        if e - b != nbits // 8:
            raise CheckpointError(f"{where}: corrupt safetensors header: key {key!r} has {e - b} bytes for "
                                  f"shape {dims[:8]} of {name}", path=where, key=key)
        if dtype is None:
            raise CheckpointError(f"{where}: key {key!r} has dtype {name}, which torch cannot hold",
                                  path=where, key=key)
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
