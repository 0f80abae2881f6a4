"""Pickles read safely: ``torch.load(weights_only=True)`` (no pickled code ever runs), legacy files checked for
storage sizes they cannot hold before anything is allocated, and loaded tensors checked to be plain dense data."""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFound, UnsafeCheckpoint

__all__ = ["SAFE_GLOBALS", "load_pickle", "allow_expanded", "check_pickled_tensors", "is_zip"]


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


def is_zip(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive (torch's format since 1.6). zipfile.is_zipfile itself raises BadZipFile on
    some corrupt end records (a 'multi-disk' archive); such a file is no zip that torch could map."""
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


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
                if "zip" in str(e).lower() and is_zip(path):
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
