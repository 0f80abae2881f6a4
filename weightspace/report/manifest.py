"""A run folder's manifest: the files a run wrote, so that ``--force`` replaces exactly those and never others.

Without it a full run followed by ``--small --force`` into the same folder would leave the full run's extra files
beside the small run's (ft3–ft7 next to ft0–ft2), and deleting "everything in the folder" could remove a user's own
files. The manifest is written when a run has finished; only then are the previous run's files that this run did
not rewrite removed, so a run that fails leaves the previous one as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..files import atomic_output

__all__ = ["MANIFEST_NAME", "read_manifest", "record_run", "write_manifest"]

MANIFEST_NAME = "weightspace-manifest.json"


def read_manifest(folder: str | os.PathLike) -> list[str]:
    """The relative paths the previous run in ``folder`` recorded (none when there is no readable manifest)."""
    p = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def _inside(folder: Path, rel: str) -> Path | None:
    """``folder/rel`` when rel stays inside folder (a manifest is data: it may not point elsewhere)."""
    if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    return folder / rel


def record_run(folder: str | os.PathLike, paths: Iterable[str | os.PathLike], *, force: bool) -> list[Path]:
    """Write the manifest of a finished run that wrote ``paths``. With ``force`` (the run replaced the previous
    one) the previous manifest's files that this run did not rewrite are removed, with the sub-folders that leaves
    empty, and nothing else; without it they stay listed. Returns what was removed."""
    folder = Path(folder)
    previous = read_manifest(folder)
    write_manifest(folder, paths, keep=() if force else previous)
    if not force:
        return []
    now = set(read_manifest(folder))
    removed = []
    for rel in previous:
        p = _inside(folder, rel)
        if rel not in now and p is not None and p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    for p in sorted({q.parent for q in removed}, key=lambda q: len(q.parts), reverse=True):
        while p != folder and p.is_dir() and not any(p.iterdir()):
            p.rmdir()
            p = p.parent
    return removed


def write_manifest(folder: str | os.PathLike, paths: Iterable[str | os.PathLike], keep: Iterable[str] = ()) -> Path:
    """Record ``paths`` (files this run wrote, inside ``folder``), and the relative paths ``keep``, in the
    folder's manifest."""
    folder = Path(folder)
    rels = {os.path.relpath(os.path.abspath(p), os.path.abspath(folder)) for p in paths} | set(keep)
    inside = sorted(r for r in rels if not r.startswith(".."))
    with atomic_output(folder / MANIFEST_NAME, force=True) as tmp:
        Path(tmp).write_text(json.dumps({"files": inside}, indent=1) + "\n")
    return folder / MANIFEST_NAME
