"""A run folder's manifest: the files a run wrote, so that ``--force`` replaces exactly those and never others.

Without it a full run followed by ``--small --force`` into the same folder would leave the full run's extra files
beside the small run's (ft3–ft7 next to ft0–ft2), and deleting "everything in the folder" could remove a user's own
files. The manifest is written when a run has finished; only then are the previous run's files that this run did
not rewrite removed, so a run that fails leaves the previous one as it was. The rule itself (what a manifest may
name, when a listed file still is ours) lives in ``files``, beside every other writer's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..files import MANIFEST_NAME, prune_manifest, read_manifest, write_manifest

__all__ = ["MANIFEST_NAME", "read_manifest", "record_run", "write_manifest"]


def record_run(folder: str | os.PathLike, paths: Iterable[str | os.PathLike], *, force: bool) -> list[Path]:
    """Write the manifest of a finished run that wrote ``paths``. With ``force`` (the run replaced the previous
    one) the previous manifest's files that this run did not rewrite are removed when they still are what
    weightspace wrote, and nothing else; without it they stay listed. Returns what was removed."""
    folder = Path(folder)
    previous = read_manifest(folder)
    write_manifest(folder, paths, keep=None if force else previous)
    if not force:
        return []
    return prune_manifest(folder, previous, read_manifest(folder))
