"""Tensors loaded into the process's own memory, moved to an unnamed file and memory-mapped back.

A legacy (non-zip) torch pickle cannot be memory-mapped: ``torch.load`` reads every storage into anonymous memory,
so a soup of N such files held N models at once (``bench/pt_memory.py``: +1.00 ingredient of anonymous memory per
added ingredient). Each file's tensors are written, as soon as it is loaded, to an unnamed temporary file
(``O_TMPFILE`` where the filesystem has it, else created and unlinked at once: nothing is ever left behind, even
after SIGKILL) and mapped back. Their pages then belong to the page cache, which the kernel can reclaim, and the
loaded copy is freed before the next file is read. Freed, but not given back: glibc keeps the freed heap pages of
one load for later and, after a few loads, stops reusing them (measured: +20 MB of RssAnon per 20 MB file from the
eighth file on); ``release_freed`` hands them back to the system after each file.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["spill", "release_freed"]

_ALIGN = 64  # every dtype's alignment, and a cache line


def _unnamed_file(near: Path):
    for folder in (near, None):  # beside the checkpoint (its disk), else the temp folder (a read-only cache)
        try:
            return tempfile.TemporaryFile(dir=folder)
        except OSError:
            continue
    return None


def spill(tensors: dict[str, torch.Tensor], near: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The same tensors (values, shapes, strides, storage sharing) backed by a memory-mapped unnamed file written
    in the folder ``near`` (else in the temp folder).

    Spilling only saves memory, so it never fails: when no file can be made or written (read-only folders, a full
    disk) the tensors are returned as they are. Tensors that are not on the CPU, or hold no bytes, stay as they are.
    """
    slots: dict[int, tuple[torch.UntypedStorage, int]] = {}  # storage address -> (storage, offset in the file)
    size = 0
    for t in tensors.values():
        if t.device.type != "cpu" or t.is_nested or t.layout != torch.strided or t.is_quantized:
            continue
        s = t.untyped_storage()
        if s.nbytes() == 0 or s.data_ptr() in slots:
            continue
        slots[s.data_ptr()] = (s, size)
        size += -(-s.nbytes() // _ALIGN) * _ALIGN
    if not slots:
        return tensors
    f = _unnamed_file(Path(near))
    if f is None:
        return tensors
    try:
        with f:
            f.truncate(size)
            for s, at in slots.values():
                view = memoryview(torch.empty(0, dtype=torch.uint8).set_(s).numpy())
                done = 0
                while done < len(view):
                    done += os.pwrite(f.fileno(), view[done:], at + done)
            mapped = mmap.mmap(f.fileno(), size)  # the mapping keeps the file alive once it is closed
    except OSError:
        return tensors
    moved: dict[int, torch.UntypedStorage] = {
        ptr: torch.frombuffer(mapped, dtype=torch.uint8, count=s.nbytes(), offset=at).untyped_storage()
        for ptr, (s, at) in slots.items()}
    out = {}
    for k, t in tensors.items():
        s = moved.get(t.untyped_storage().data_ptr()) if t.device.type == "cpu" and not t.is_nested else None
        out[k] = t if s is None else torch.empty(0, dtype=t.dtype).set_(s, t.storage_offset(), t.shape, t.stride())
    return out


def release_freed() -> None:
    """Give memory that the C allocator holds freed back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Call it once the last reference to a large loaded object is gone."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators return large blocks themselves
        pass
