"""Atomic file output, shared by every writer (weights in ``io.save``, tables and plots in ``report``).

It sits at the bottom layer, beside ``errors``, because both ``io`` and ``report`` write files and neither may
import the other for it. Library writers always write: whether one of N identical processes (torchrun) should
be the only one to touch the disk is the application's decision — the CLI makes it with ``discard_writes``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CheckpointError, OutputExists

__all__ = ["atomic_output", "discard_writes", "writes_discarded", "make_folder"]

_discarding = False


def discard_writes(on: bool = True) -> bool:
    """Make every later ``atomic_output`` yield ``os.devnull`` (and ``make_folder`` do nothing) in this process,
    or stop doing so; returns the previous setting so a caller can restore it.

    For an application that runs N processes computing the same outputs and wants only one of them to write (the
    CLI under torchrun turns it on in ranks ≠ 0). The library never turns it on by itself, so ``ws.save`` inside a
    user's own DDP job writes on every rank that calls it."""
    global _discarding
    before, _discarding = _discarding, bool(on)
    return before


def writes_discarded() -> bool:
    """Whether ``discard_writes`` is on in this process."""
    return _discarding


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder`` (nothing while writes are discarded); returns the folder as a Path."""
    folder = Path(folder)
    if not _discarding:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it into place, on failure remove it.

    Raises:
        OutputExists: ``path`` exists and ``force`` is false, or ``path`` is a folder.
        CheckpointError: the folder of ``path`` does not exist.

    While writes are discarded (``discard_writes``) it yields ``os.devnull`` and checks nothing: another process
    writes the same file."""
    if _discarding:
        yield Path(os.devnull)
        return
    path = Path(path)
    if path.exists() and not force:
        raise OutputExists(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise OutputExists(f"{path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{path}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):
            dfd = os.open(parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
