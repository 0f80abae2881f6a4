"""Raw safetensors reading and writing, one tensor at a time (atomic replacement of the output: ``weightspace.files``).

We read safetensors with positioned reads (``os.pread``) rather than keeping every input memory-mapped:
mapped pages of N open files all count towards resident memory, while a pread lands in one buffer that is
freed as soon as the tensor has been used. That is what keeps a soup of 32 checkpoints at one model's RSS.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import threading
import time
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError, CheckpointNotFound

from .header import DTYPE_NAMES, DTYPES, MAX_HEADER, TensorInfo, parse_header, read_raw_header  # noqa: F401 (re-exported)

__all__ = ["element_size", "SafetensorsReader", "HASH_CACHE_ENV", "RACY_WINDOW_S", "hash_cache_path", "file_sha256",
           "tensor_bytes", "header_for", "write_safetensors", "SYNC_EVERY"]


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype."""
    return dtype.itemsize


class SafetensorsReader:
    """A validated safetensors header plus positioned reads of single tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointNotFound(f"{self.path}: no such file", path=self.path) from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})", path=self.path) from None
        try:
            self.tensors, self.metadata, self.header_bytes = self._parse()
        except Exception:
            # -1 at once: else __del__ would close this number again later, when it may be another file's fd
            fd, self._fd = self._fd, -1
            os.close(fd)
            raise

    def _parse(self) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
        head, raw, data_size = read_raw_header(self._fd, str(self.path))
        n = len(raw)
        tensors, meta = parse_header(raw, data_size, str(self.path))
        base = 8 + n
        tensors = {k: TensorInfo(i.dtype, i.shape, base + i.begin, base + i.end) for k, i in tensors.items()}
        return tensors, meta, head + raw

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        return self.read_into(key, None)

    def read_into(self, key: str, buffer: torch.Tensor | None, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        """Read one tensor, or elements [start, stop) of it flattened, into ``buffer`` (uint8, long enough) and
        return a view of it; with no buffer, into fresh memory.

        Streaming ops read 1 MiB pieces into one reused buffer: it stays in the CPU cache for the arithmetic that
        follows, and no allocation (with its page faults) is made per tensor and input."""
        info = self.tensors[key]
        size = element_size(info.dtype)
        ranged = start is not None or stop is not None
        numel = (info.end - info.begin) // size
        lo, hi = (start or 0, numel if stop is None else stop) if ranged else (0, numel)
        begin, n = info.begin + lo * size, max(0, hi - lo) * size
        if n == 0:
            return torch.empty(0 if ranged else info.shape, dtype=info.dtype)
        # torch.empty, not bytearray: no zero-fill pass over memory that the read overwrites anyway
        raw = torch.empty(n, dtype=torch.uint8) if buffer is None else buffer[:n]
        view = memoryview(raw.numpy())
        got = 0
        while got < n:
            k = os.preadv(self._fd, [view[got:]], begin + got)
            if k <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading key '{key}'", path=self.path, key=key)
            got += k
        t = raw.view(info.dtype)
        return t if ranged else t.reshape(info.shape)

    def close(self) -> None:
        """Close the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


HASH_CACHE_ENV = "WEIGHTSPACE_HASH_CACHE"
RACY_WINDOW_S = 2.0  # files changed this recently are hashed but not cached (timestamps are coarse; cf. "racy git")
_hash_lock = threading.Lock()


def hash_cache_path() -> Path | None:
    """Where file hashes are cached: $WEIGHTSPACE_HASH_CACHE, else ~/.cache/weightspace/sha256.json; None when off."""
    value = os.environ.get(HASH_CACHE_ENV, "")
    if value.lower() in ("0", "off", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "weightspace" / "sha256.json"


def _stat_key(st: os.stat_result) -> str:
    # inode + size + both timestamps: any rewrite changes ctime, which no user tool can set back
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)  # one reused 1 MiB buffer: hashing adds no memory worth counting
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL here, so hashing overlaps the op's own work
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (inode, size, mtime, ctime) so that unchanged files are hashed once."""
    real = os.path.realpath(path)
    before = os.stat(real)
    cache_file = hash_cache_path()
    if cache_file is not None:
        hit = _read_cache(cache_file).get(real)
        if (isinstance(hit, list) and len(hit) == 2 and hit[0] == _stat_key(before) and isinstance(hit[1], str)
                and len(hit[1]) == 64 and all(c in "0123456789abcdef" for c in hit[1])):
            return hit[1]
    digest = _hash_file(Path(real))
    after = os.stat(real)
    fresh = time.time() - after.st_ctime < RACY_WINDOW_S
    if cache_file is not None and _stat_key(before) == _stat_key(after) and not fresh:
        with _hash_lock, contextlib.suppress(OSError):
            cache = _read_cache(cache_file)
            cache[real] = [_stat_key(after), digest]
            if len(cache) > 20000:  # forget the oldest entries (dicts keep insertion order)
                cache = dict(list(cache.items())[-10000:])
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
    return digest


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def header_for(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, int]]]:
    """Build a safetensors header for tensors written in the given order; returns header bytes and sizes.

    Raises:
        CheckpointError: a dtype safetensors cannot store (naming the key)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    sizes = []
    for key, dtype, shape in entries:
        n = math.prod(shape) * element_size(dtype)
        name = DTYPE_NAMES.get(dtype)
        if name is None:
            raise CheckpointError(f"key {key!r}: safetensors cannot store {dtype}", key=key)
        dims = list(shape)
        if name == "F4" and dims:  # torch packs two 4-bit values per element; safetensors counts values
            dims[-1] *= 2
        header[key] = {"dtype": name, "shape": dims, "data_offsets": [pos, pos + n]}
        sizes.append((key, n))
        pos += n
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference implementation aligns data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, sizes


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None) -> None:
    """Write tensors in header order as they arrive, so only one tensor need be in memory at a time.

    Raises:
        CheckpointError: a dtype safetensors cannot store.
        OSError: the file cannot be written (``atomic_output`` around it turns that into OutputError).
        RuntimeError: tensors that do not arrive as the header announced them (a bug of the caller)."""
    head, sizes = header_for(entries, metadata)
    i, written = 0, 0
    # Written synchronously: a writer thread was measured slower (each hand-over waits for the GIL, and on a
    # busy machine that cost more than the write itself). What does overlap is the disk: every SYNC_EVERY bytes a
    # background thread flushes what is written so far, so the final fsync (atomic output) waits for the tail only.
    with open(path, "wb", buffering=0) as f, _Flusher(f.fileno()) as flusher:
        f.write(head)
        # a tensor may arrive whole or in consecutive flat pieces
        for key, t in tensors:
            if i >= len(sizes) or key != sizes[i][0]:
                want = sizes[i][0] if i < len(sizes) else "(end)"
                raise RuntimeError(f"internal: tensors arrived out of header order ({key} vs {want})")
            data = tensor_bytes(t)
            written += data.nbytes
            if written > sizes[i][1]:
                raise RuntimeError(f"internal: tensor {key} has more bytes than the header's {sizes[i][1]}")
            flusher.wrote(data.nbytes)
            while data.nbytes:  # an unbuffered write may be short
                data = data[f.write(data):]
            if written == sizes[i][1]:
                i, written = i + 1, 0
        if i != len(sizes):
            raise RuntimeError("internal: fewer tensors than the header announced")


SYNC_EVERY = 64 << 20


class _Flusher:
    """fdatasync on a background thread every SYNC_EVERY bytes written (never more than one at a time): the disk
    writes back while the op computes, instead of all at the end. Errors are left to the final fsync."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pending = 0
        self.wake = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="weightspace-flush", daemon=True)

    def __enter__(self) -> "_Flusher":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.wake.set()
        self.thread.join()

    def wrote(self, n: int) -> None:
        """Count bytes written; wake the flusher once SYNC_EVERY have accumulated."""
        self.pending += n
        if self.pending >= SYNC_EVERY:
            self.pending = 0
            self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stop:
                return
            with contextlib.suppress(OSError):
                os.fdatasync(self.fd)
