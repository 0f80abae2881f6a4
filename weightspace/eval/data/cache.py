"""The decoded-data cache: one uint8 ``.npy`` (memory-mapped on reuse) + one ``.json`` per entry.

Folder: ``$WEIGHTSPACE_DATA_CACHE`` (``off`` disables it), else ``~/.cache/weightspace/data``. An entry's key hashes
the source's identity (each file's path, size and mtime, or a dataset fingerprint), the pixel pipeline, the class
list and the decoder (PIL and GPU pixels differ), so a touched file or another model's transform is a miss, never
a stale hit. The ``.npy`` is written first and the ``.json`` last, each renamed into place (``files.atomic_output``):
an entry exists once its ``.json`` does.

The source's identity is each file's path, size and modification time (as make and rsync decide what changed): a
file rewritten in place with the same size and mtime is not noticed. ``WEIGHTSPACE_DATA_VERIFY=content`` adds a
digest of every source file's bytes to the key, for when that matters. Each entry also records a digest of its
own array and labels (xxh3-64, fast enough that a cached reload stays a few per cent of a first load:
bench/data_throughput.py); a hit whose bytes no longer match is rebuilt, with a note.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ...files import remove_owned

__all__ = ["cache_dir", "entry_key", "Entry", "list_entries", "remove_entries", "FORMAT", "DIGEST", "digest_file",
           "digest_labels", "verify_content", "content_digest"]

FORMAT = 1  # bump when the entry layout or the decoding changes meaning


DIGEST = "xxh3_64"
_CHUNK = 16 << 20


def _hasher():
    import xxhash
    return xxhash.xxh3_64()


def digest_file(path: str | os.PathLike) -> str:
    """xxh3-64 of a file's bytes, read in 16 MiB chunks (memory stays at one chunk)."""
    h = _hasher()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def digest_labels(y: list[int]) -> str:
    """xxh3-64 of the labels as little-endian int64."""
    import numpy as np
    h = _hasher()
    h.update(np.asarray(y, dtype="<i8").tobytes())
    return h.hexdigest()


def verify_content() -> bool:
    """Whether the user asked for source identity by content (``WEIGHTSPACE_DATA_VERIFY=content``) rather than by
    path, size and mtime."""
    return os.environ.get("WEIGHTSPACE_DATA_VERIFY", "").strip().lower() == "content"


def content_digest(files: list[str]) -> str:
    """One xxh3-64 over every file's digest, in order: the source's content, for the cache key.

    Raises:
        OSError: a file cannot be read.
    """
    h = _hasher()
    for f in files:
        h.update(digest_file(f).encode())
    return h.hexdigest()


def cache_dir() -> Path | None:
    """The cache folder (created on first use), or None when ``WEIGHTSPACE_DATA_CACHE=off``."""
    env = os.environ.get("WEIGHTSPACE_DATA_CACHE", "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "weightspace" / "data"


def entry_key(identity: dict, pipeline: str, classes: list[str], decoder: str) -> str:
    """sha256 of everything the stored bytes depend on."""
    blob = json.dumps({"format": FORMAT, "source": identity, "pipeline": pipeline, "classes": classes,
                       "decoder": decoder}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _slug(spec: str) -> str:
    base = spec.split("?", 1)[0].rstrip("/")
    name = base.rsplit("/", 1)[-1] or base
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "data"


@dataclass
class Entry:
    """One cache entry: ``name`` (``SOURCE-KEY12``), its two files, and its recorded description."""

    name: str
    array: Path
    meta_path: Path
    meta: dict

    @classmethod
    def for_key(cls, folder: Path, spec: str, key: str) -> "Entry":
        """Where the entry for ``key`` lives (whether or not it exists yet)."""
        name = f"{_slug(spec)}-{key[:12]}"
        return cls(name, folder / f"{name}.npy", folder / f"{name}.json", {})

    def exists(self) -> bool:
        """Complete: the .json (written last) is there and the array has the recorded size."""
        if not all(p.is_file() and not p.is_symlink() for p in (self.meta_path, self.array)):
            return False  # an entry is two regular files written by weightspace; anything else is not one
        try:
            self.meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(self.meta, dict) and self.meta.get("format") == FORMAT
                and self.array.stat().st_size == self.meta.get("file_bytes"))

    def mismatch(self) -> str:
        """Why the stored array or labels are not what was written (the digests differ), or '' when they are.

        Reads the whole array once (at xxh3's speed; bench/data_throughput.py prints the cost against a first load).
        """
        want = self.meta.get("digest") or {}
        if want.get("algo") != DIGEST:
            return "it records no digest of its array"
        try:
            if digest_file(self.array) != want.get("array"):
                return "its array does not match the digest recorded when it was written"
        except OSError as e:
            return f"its array cannot be read ({e.strerror})"
        if digest_labels(self.meta.get("y", [])) != want.get("labels"):
            return "its labels do not match the digest recorded when it was written"
        return ""

    @property
    def bytes(self) -> int:
        """Size of the stored array file."""
        return self.array.stat().st_size if self.array.exists() else 0

    def summary(self) -> dict:
        """A row for ``weightspace data ls``."""
        m = self.meta
        return {"name": self.name, "source": m.get("spec"), "examples": (m.get("shape") or [0])[0],
                "shape": m.get("shape"), "bytes": self.bytes, "decoder": m.get("decoder"),
                "transform": m.get("transform") or m.get("pipeline"), "created": m.get("created"), "path": str(self.array)}


def list_entries(folder: Path | None = None) -> list[Entry]:
    """Every complete entry in the cache folder, oldest first."""
    folder = folder or cache_dir()
    if folder is None or not folder.is_dir():
        return []
    out = []
    for meta in sorted(folder.glob("*.json")):
        e = Entry(meta.stem, meta.with_suffix(".npy"), meta, {})
        if e.exists():
            out.append(e)
    return sorted(out, key=lambda e: (e.meta.get("created", ""), e.name))


def remove_entries(names: list[str], folder: Path | None = None) -> list[Entry]:
    """Delete the entries named (an entry's name, or a source name to delete all its entries); returns them.

    Raises:
        ConfigError: a name matches no entry (nothing is deleted then).
    """
    folder = folder or cache_dir()
    entries = list_entries(folder)
    chosen: list[Entry] = []
    for n in names:
        hits = [e for e in entries if e.name == n or e.name.rsplit("-", 1)[0] == n]
        if not hits:
            known = ", ".join(e.name for e in entries[:5]) or "the cache is empty"
            raise ConfigError(f"data rm {n}: no such cache entry in {folder} ({known})")
        chosen += [e for e in hits if e not in chosen]
    for e in chosen:  # the .json first: a half-removed entry is then simply absent
        remove_owned(e.meta_path)  # regular files only: a link in the cache folder points at someone else's file
        remove_owned(e.array)
    return chosen


def now() -> str:
    """The creation time recorded in an entry."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
