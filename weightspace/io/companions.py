"""The non-weight files of a source folder that an output folder takes along (config.json, tokenizer files,
sentence-transformers' modules.json and ``1_Pooling/``), read only from inside that folder.

A companion is copied when it resolves inside the source folder, or inside the blobs of the Hugging Face cache
repo whose snapshot the folder is (where a snapshot's links point), and is a regular file; it is written as a new
regular file with ordinary permissions. A link that leaves the folder is refused before anything is written."""
from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from ..errors import SourceError
from ..files import MANIFEST_NAME, atomic_output, make_folder
from .checkpoint import PROVENANCE_SUFFIX
from .local import cache_blobs
from .source_options import split_options
from .sources import resolve

__all__ = ["NOT_COPIED", "MAX_COMPANIONS", "companion_files", "copy_companions"]

# Not taken along: weights (the output has its own), and what describes the ingredient rather than the result
# (its model card, its provenance, the manifest of the files weightspace wrote there).
NOT_COPIED = re.compile(r"(\.(safetensors|pt|pth|bin|ckpt|h5|msgpack|onnx|gguf)|\.index\.json|"
                        + re.escape(PROVENANCE_SUFFIX) + r"|^README\.md|^" + re.escape(MANIFEST_NAME) + ")$")
MAX_COMPANIONS = 10_000  # files walked in a source folder; a model folder holds tens


def _source_folder(source: str | None) -> Path | None:
    """The folder of a source that is a folder or a Hub repo; None for a single file or a library name."""
    if not source:
        return None
    rest, _ = split_options(source)
    hub = rest.startswith(("hf://", "hf-hub:"))
    if not hub and not Path(os.path.expanduser(rest)).is_dir():
        return None
    try:
        res = resolve(rest)
    except Exception:  # noqa: BLE001 — the weights were read already; a missing folder only means nothing to copy
        return None
    return res.files[0].parent if res.files else None


def companion_files(source: str | None, skip: Path | None = None) -> list[tuple[str, Path]]:
    """(path relative to the folder, file) for every non-weight file under the folder of ``source`` (a folder or a
    Hub repo; none for a single file or a library name), hidden ones and anything under ``skip`` (the output
    folder, when it lies inside the source) left out. Entries that are not regular files (FIFOs, sockets,
    devices) are never opened.

    Raises:
        SourceError: a companion (or a sub-folder) is a link that resolves outside the folder and its cache blobs,
            or the folder holds more than MAX_COMPANIONS files.
    """
    folder = _source_folder(source)
    if folder is None:
        return []
    root = folder.resolve()
    roots = (root, *cache_blobs(folder))
    skip_real = skip.resolve() if skip is not None and skip.exists() else None
    out: list[tuple[str, Path]] = []
    walked = 0
    for here, dirs, files in os.walk(folder):  # links to folders are listed, never followed
        base = Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _links_away(base / d, roots, folder))
        if skip_real is not None:
            dirs[:] = [d for d in dirs if (base / d).resolve() != skip_real]
        for name in sorted(files):
            walked += 1
            if walked > MAX_COMPANIONS:
                raise SourceError(f"{folder}: holds more than {MAX_COMPANIONS:,} files; refused to copy its "
                                  f"companion files (write a single file instead of a folder)", path=folder)
            p = base / name
            if name.startswith(".") or NOT_COPIED.search(name) or _links_away(p, roots, folder):
                continue
            try:
                if not stat.S_ISREG(os.stat(p).st_mode):
                    continue
            except OSError:  # a dangling link: nothing to copy
                continue
            out.append((p.relative_to(folder).as_posix(), p))
    return out


def _links_away(p: Path, roots: tuple[Path, ...], folder: Path) -> bool:
    """False for an entry that resolves inside one of ``roots``; raises SourceError for a link that leaves them."""
    if not p.is_symlink():
        return False
    real = p.resolve()
    if any(real == r or r in real.parents for r in roots):
        return False
    raise SourceError(f"{folder}: {p.relative_to(folder).as_posix()} is a link to {real}, outside the folder; "
                      f"refused to copy it into the output (copy the file into the folder, or remove the link)",
                      path=folder)


def copy_companions(companions: list[tuple[str, Path]], folder: Path, *, force: bool = False) -> list[Path]:
    """Copy each companion to ``folder / relative path`` as a new regular file (atomically, sub-folders made as
    needed); returns what was created, files then folders, for a caller that must undo it. An existing file is
    replaced only with ``force`` (the caller checked the writer rule, ``files.check_targets``, before any work).

    Raises:
        OutputExists: a file exists and ``force`` is false.
        OutputError: a file or folder cannot be written."""
    created: list[Path] = []
    made: list[Path] = []
    for rel, src in companions:
        dest = folder / rel
        for parent in reversed(dest.relative_to(folder).parents[:-1]):
            if not (folder / parent).exists():
                make_folder(folder / parent)
                made.append(folder / parent)
        with atomic_output(dest, force) as tmp:
            shutil.copyfile(src, tmp)
        created.append(dest)
    return created + made[::-1]
