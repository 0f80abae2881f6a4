"""Atomic file output, shared by every writer (weights in ``io.save``, tables and plots in ``report``).

It sits at the bottom layer, beside ``errors``, because both ``io`` and ``report`` write files and neither may
import the other for it. Library writers always write: whether one of N identical processes (torchrun) should
be the only one to touch the disk is the application's decision — the CLI makes it with ``discard_writes``.

How a file appears: the data goes to an unnamed file in the target folder (``O_TMPFILE``), which is given its
name only when complete, by ``link()``, which never replaces an existing name: two runs racing for one new path
cannot both win, and a run killed at any moment (even by SIGKILL) leaves nothing behind. With ``force`` the
complete file is linked under a temporary name and renamed over the old file, which must be a regular file (a
FIFO, device or folder is never replaced). Where the filesystem has no ``O_TMPFILE``, a named temp file is used,
removed on failure and on SIGTERM/SIGHUP, and named ``.NAME.wstmp-HOST-PID-RANDOM`` so that a later run in the
same folder recognises and removes one left by a process that no longer exists.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import OutputError, OutputExists, WeightspaceError

__all__ = ["atomic_output", "discard_writes", "writes_discarded", "make_folder", "TEMP_MARK", "exists_error",
           "check_targets", "MANIFEST_NAME", "read_manifest", "write_manifest", "prune_manifest", "remove_owned"]

_discarding = False
TEMP_MARK = ".wstmp-"  # in every named temp file: how a later run recognises one left behind
_NAME_MAX = 255  # bytes in one path component on every common filesystem
_use_tmpfile = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")  # tests turn it off for the fallback


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
    """``mkdir -p folder`` (nothing while writes are discarded); returns the folder as a Path.

    Raises:
        OutputError: the folder cannot be made (read-only filesystem, a file in the way, no permission)."""
    folder = Path(folder)
    if not _discarding:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{folder}: cannot make the folder ({e.strerror or e})", path=folder) from None
    return folder


def exists_error(path: str | os.PathLike) -> OutputExists:
    """The one refusal of an output that exists: ``PATH: already exists (use force=True to replace it)`` (the CLI says ``--force``)."""
    return OutputExists(f"{path}: already exists (use force=True to replace it)", path=Path(path))


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _no_links_below(root: Path, path: Path) -> None:
    """Every folder between ``root`` and ``path`` is a real folder inside ``root`` (or does not exist yet)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise OutputError(f"{path}: outside the output folder {root}; not written", path=path)
    cur = Path(root)
    for part in Path(rel).parts[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return  # made by this run
        except OSError as e:
            raise OutputError(f"{path}: cannot write here ({e.strerror or e})", path=path) from None
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{path}: {cur} is a symbolic link; weightspace never writes through one", path=path)
        if not stat.S_ISDIR(st.st_mode):
            raise OutputExists(f"{path}: {cur} exists and is not a folder", path=path)


def check_targets(paths: Iterable[str | os.PathLike], force: bool, *, inputs: Iterable[str | os.PathLike] = (),
                  root: str | os.PathLike | None = None) -> None:
    """The writer rule, checked before any work starts, for every file a run will write.

    Without ``force`` an existing path (a dangling link too) is refused; with it, only a regular file or a link
    (the link itself is replaced, never what it points to) may be replaced. A path that is one of the ``inputs``
    being read is refused even with ``force``. Under ``root`` (an output folder), every folder on the way to a
    path must be a real folder: a link there would carry the write outside.

    Raises:
        OutputExists: a path exists and ``force`` is false; it is a folder, FIFO, device or socket; it is an input.
        OutputError: a path lies outside ``root`` or a folder on its way is a symbolic link.
    """
    if _discarding:
        return
    ins = {i for i in (_identity(p) for p in inputs) if i is not None}
    for p in paths:
        p = Path(p)
        if root is not None:
            _no_links_below(Path(root), p)
        _check_target(p, force)
        if ins and _identity(p) in ins:
            raise OutputExists(f"{p}: is also an input of this run; not replaced, even with force=True (write the "
                               f"output elsewhere)", path=p)


# ---------------------------------------------------------------------------------------------------- manifest
# A folder's manifest lists the files weightspace wrote there, each with the size and modification time it had
# when written. --force removes a listed file that a run no longer writes only while it still is that file: a
# manifest that lists someone else's file (copied, forged or stale) names nothing that matches, so nothing goes.
MANIFEST_NAME = "weightspace-manifest.json"
_MANIFEST_MAX = 1 << 20  # bytes: a manifest is a short list; a larger one is not ours


def _stamp(path: str | os.PathLike) -> dict | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns} if stat.S_ISREG(st.st_mode) else None


def _owned(folder: Path, rel: str, stamp: Mapping) -> Path | None:
    """``folder/rel`` when it still is the file the manifest entry describes: inside ``folder`` with no link on the
    way, a regular file, with the recorded size and modification time."""
    parts = Path(rel).parts
    if not rel or os.path.isabs(rel) or ".." in parts or rel == MANIFEST_NAME:
        return None
    cur = folder
    for part in parts[:-1]:
        cur = cur / part
        if cur.is_symlink() or not cur.is_dir():
            return None
    p = folder / rel
    return p if _stamp(p) == {"size": stamp.get("size"), "mtime_ns": stamp.get("mtime_ns")} else None


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """The files the manifest in ``folder`` lists (relative path → size and mtime when written); empty when there
    is none, or it is not a regular file, not ours or unreadable."""
    p = Path(folder) / MANIFEST_NAME
    st = _stamp(p)
    if st is None or st["size"] > _MANIFEST_MAX:
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    listed = data.get("files") if isinstance(data, dict) else None
    if not isinstance(listed, dict):
        return {}
    return {rel: {"size": v["size"], "mtime_ns": v["mtime_ns"]} for rel, v in listed.items()
            if isinstance(v, dict) and type(v.get("size")) is int and type(v.get("mtime_ns")) is int}


def write_manifest(folder: str | os.PathLike, paths: Iterable[str | os.PathLike],
                   keep: Mapping[str, dict] | None = None) -> Path:
    """Record ``paths`` (files this run wrote inside ``folder``), and the entries of ``keep`` that still describe
    their files, in the folder's manifest; returns its path. Paths outside ``folder`` are not recorded."""
    folder = Path(folder)
    entries = {rel: dict(s) for rel, s in (keep or {}).items() if _owned(folder, rel, s) is not None}
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(folder))
        stamp = _stamp(p)
        if stamp is not None and _owned(folder, rel, stamp) is not None:
            entries[rel] = stamp
    with atomic_output(folder / MANIFEST_NAME, force=True) as tmp:
        Path(tmp).write_text(json.dumps({"files": dict(sorted(entries.items()))}, indent=1) + "\n")
    return folder / MANIFEST_NAME


def prune_manifest(folder: str | os.PathLike, previous: Mapping[str, dict], keep: Iterable[str]) -> list[Path]:
    """Remove the files ``previous`` (a manifest read before this run) lists that this run did not write (not in
    ``keep``) and that still are what weightspace wrote; returns them. Nothing else is removed, no folder either."""
    folder, kept = Path(folder), set(keep)
    removed = []
    for rel, stamp in previous.items():
        p = None if rel in kept else _owned(folder, rel, stamp)
        if p is not None and remove_owned(p):
            removed.append(p)
    return removed


def remove_owned(path: str | os.PathLike) -> bool:
    """Remove ``path`` when it is a regular file (never a link, whose target is someone else's, nor a folder);
    returns whether it was removed."""
    if _discarding or _stamp(path) is None:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return True
    return False


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _temp_name(name: str) -> str:
    """A temp name beside ``name``, recognisable, and within the 255-byte limit however long ``name`` is."""
    tail = f"{TEMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    room = _NAME_MAX - len(tail.encode()) - 1
    head = name.encode()[:room].decode("utf-8", "ignore")
    return f".{head}{tail}"


def _remove_stale(parent: Path) -> None:
    """Remove temp files that a process of this host which no longer exists left in ``parent``."""
    prefix = f"{TEMP_MARK}{_host()}-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            i = entry.name.rfind(prefix)
            if not entry.name.startswith(".") or i < 0:
                continue
            try:
                pid = int(entry.name[i + len(prefix):].split("-")[0])
                os.kill(pid, 0)
            except ProcessLookupError:  # that process is gone: the file can only be a leftover
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
            except (ValueError, PermissionError, OSError):
                continue


def _check_target(path: Path, force: bool) -> None:
    if len(path.name.encode()) > _NAME_MAX:
        raise OutputError(f"{path}: cannot write (file name too long: {len(path.name.encode())} bytes, at most "
                          f"{_NAME_MAX})", path=path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a missing folder: making it reports what is in the way
        return
    except OSError as e:
        raise OutputError(f"{path}: cannot write here ({e.strerror or e})", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputExists(f"{path}: is a directory", path=path)
    if not force:
        raise exists_error(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OutputExists(f"{path}: exists and is not a regular file; not replaced, even with force=True", path=path)


class _Interrupted(BaseException):
    """SIGTERM/SIGHUP while writing: unwinds so the temp file is removed, then the process exits."""


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while writing (main thread, default handlers only), so that
    cleanup runs; the signal is re-delivered afterwards with its default action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def handler(signum, _frame):
        caught.append(signum)
        raise _Interrupted()

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Interrupted:
        pass
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if caught:
        os.kill(os.getpid(), caught[0])  # default action now: the process ends as it would have
        raise SystemExit(128 + caught[0])


def _fsync_folder(parent: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def _link(src: str, dst: Path, follow: bool) -> None:
    """link(src, dst); with ``follow``, through the symlink ``src`` (/proc/self/fd/N of an unnamed file).
    os.link cannot do that: on Linux it calls plain link(), which links the /proc symlink itself (EXDEV)."""
    if not follow:
        os.link(src, dst)
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _AT_SYMLINK_FOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(dst))


def _link_into_place(src: str, path: Path, force: bool, parent: Path, follow: bool) -> None:
    """Give the complete file ``src`` the name ``path``: link() (never replaces), or with ``force`` link under a
    temp name and rename over a regular file."""
    if not force:
        try:
            _link(src, path, follow)
        except FileExistsError:
            raise exists_error(path) from None
        return
    side = parent / _temp_name(path.name)
    _link(src, side, follow)
    try:
        _check_target(path, force=True)  # again, just before replacing: it may have changed while we wrote
        os.replace(side, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(side)


# Failures of writing that bad input or the environment cause (not bugs): reported as one line naming the output.
_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only filesystem",
                 errno.ENAMETOOLONG: "file name too long", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large for the filesystem", errno.EIO: "input/output error"}


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a path to write the whole output to; when the block ends without error the file appears at ``path``
    complete (fsynced), else nothing appears. Write the yielded path in place: its folder may not be a real
    folder (it can be ``/proc/self/fd/N``), so writers that write a sibling and rename it cannot use it.

    Raises:
        OutputExists: ``path`` exists and ``force`` is false (also when another run created it meanwhile), or
            ``path`` is a folder, FIFO, device or socket (never replaced, even with ``force``).
        OutputError: the folder of ``path`` does not exist, or writing fails (full disk, read-only
            filesystem, name too long, no permission).

    While writes are discarded (``discard_writes``) it yields ``os.devnull`` and checks nothing: another process
    writes the same file."""
    if _discarding:
        yield Path(os.devnull)
        return
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    _check_target(path, force)
    if not parent.is_dir():
        raise OutputError(f"{path}: folder {parent} does not exist", path=path)
    _remove_stale(parent)
    fd, tmp = -1, None
    writing = False  # inside the caller's block: an OSError there may be the caller's own, not the output's
    with _signals_unwind():
        try:
            if _use_tmpfile:
                try:
                    fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, 0o644)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                        raise
            if fd >= 0:
                tmp = Path(f"/proc/self/fd/{fd}")
            else:
                tmp = parent / _temp_name(path.name)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.fchmod(fd, 0o644)  # what a plain open would give under the usual umask, whatever the umask
            writing = True
            yield tmp
            writing = False
            os.fsync(fd)
            if tmp.parent == parent:
                _link_into_place(str(tmp), path, force, parent, follow=False)
            else:
                _link_into_place(str(tmp), path, force, parent, follow=True)
            _fsync_folder(parent)
        except WeightspaceError:  # ours are OSErrors too (OutputExists is a FileExistsError): already one line
            raise
        except OSError as e:
            if e.errno in _WRITE_ERRORS:
                raise OutputError(f"{path}: cannot write ({_WRITE_ERRORS[e.errno]})", path=path) from None
            if writing:
                raise
            # making, syncing or linking the output failed: the place given cannot hold a file (e.g. under /proc)
            why = (e.strerror or type(e).__name__).lower()
            raise OutputError(f"{path}: cannot write ({why})", path=path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None and tmp.parent == parent:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
