"""Hugging Face Hub sources (``hf://org/repo[@rev][/file]``, ``hf-hub:``): downloads that answer in seconds when
the Hub is unreachable, the commit a cached file came from, and huggingface_hub's errors as one line."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import SourceError, WeightspaceError, hub_download_error
from .checkpoint import Resolved
from .local import PREFERRED_FILES, from_index
from .source_options import SourceOptions

__all__ = ["PROBE_TIMEOUT_S", "offline_hint", "hub_reachable", "quiet_hub", "hub_call", "commit_of", "cached_commit",
           "parse_hub", "resolve_hub"]

def offline_hint() -> str:
    """Why a file was not found: the user's HF_HUB_OFFLINE, or a Hub that did not answer."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE and not _forced_offline:  # the user's own setting, read by huggingface_hub
        return " (HF_HUB_OFFLINE is set and it is not in the cache)"
    return " (not in the cache and the Hub is unreachable)"


_reachable: dict[str, bool] = {}
_forced_offline = False  # offline mode switched on by quiet_hub (the Hub did not answer), not by the user
PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """Whether the Hub's endpoint (HF_ENDPOINT) accepts a TCP connection within a few seconds; asked once per
    process. huggingface_hub itself retries an unreachable Hub with back-off for tens of seconds per file."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants
    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        url = urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
            _reachable[endpoint] = True
        except OSError:
            _reachable[endpoint] = False
    return _reachable[endpoint]


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Hub downloads (ours, timm's, open_clip's) that answer in seconds when the Hub is unreachable: offline
    mode is switched on for the call (files then come from the cache or fail at once), and the libraries'
    retry and download-progress chatter is silenced; the outcome is reported as one error line instead."""
    import logging

    from huggingface_hub import constants
    global _forced_offline
    logs = [logging.getLogger(n) for n in ("huggingface_hub", "timm", "open_clip")] + [logging.getLogger()]
    levels = [lg.level for lg in logs]
    offline = constants.HF_HUB_OFFLINE
    # open_clip reports a failed download with logging.error on the root logger, which would also install a
    # handler there for good; a NullHandler for the call keeps both from happening.
    null = logging.NullHandler()
    logging.getLogger().addHandler(null)
    try:
        for lg in logs:
            lg.setLevel(logging.CRITICAL)
        if not offline and not hub_reachable():
            constants.HF_HUB_OFFLINE = _forced_offline = True
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        _forced_offline = False
        logging.getLogger().removeHandler(null)
        for lg, level in zip(logs, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def hub_call(target: str) -> Iterator[None]:
    """A call into a library that may download from the Hub (e.g. timm building an ``hf-hub:ORG/NAME`` model from
    its config.json): quick and quiet when the Hub is unreachable, and huggingface_hub's errors as one line naming
    ``target``.

    Raises:
        HubDownloadError: the download failed (not in the cache while offline, gated, no such repo or file, ...).
    """
    try:
        with quiet_hub():
            yield
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise hub_download_error(target, e, cache_hint=offline_hint()) from None
        raise


_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def commit_of(path: str | os.PathLike | None) -> str | None:
    """The commit of a file in the Hub cache (…/snapshots/<commit>/file), else None."""
    if path is None:
        return None
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] == "snapshots" and _COMMIT_RE.match(parts[i]):
            return parts[i]
    return None


def cached_commit(repo_id: str, filename: str = "model.safetensors") -> str | None:
    """The commit of the cached snapshot a library (timm, open_clip) loaded ``repo_id`` from, if it is cached."""
    from huggingface_hub import try_to_load_from_cache
    for name in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return commit_of(hit)
    return None


def parse_hub(spec: str) -> tuple[str, str | None, str | None]:
    """Split 'org/repo[@rev][/file]' into (repo_id, revision, filename).

    Raises:
        SourceError: ``spec`` does not name org/repo."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SourceError(f"{spec}: a Hub source needs org/repo", path=spec)
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{repo}", revision or None, filename


def _with_commit(res: Resolved, path: Path) -> Resolved:
    res.commit = commit_of(path)
    return res


def resolve_hub(source: str, spec: str, options: SourceOptions | None = None) -> Resolved:
    """``spec`` (org/repo[@rev][/file]) as files in the Hub cache, downloaded when needed.
    Raises SourceError (no weights file), HubError (download failures), CheckpointError (a bad index)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    repo_id, revision, filename = parse_hub(spec)

    cache_only = False

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=cache_only))

    with quiet_hub():
        try:
            if filename:
                path = fetch(filename)
                if filename.endswith(".index.json"):
                    return _with_commit(from_index(source, path, fetch=fetch), path)
                return Resolved(source, files=[path], note=f"{repo_id}/{filename}", commit=commit_of(path))
            tried = []
            local_misses = 0
            for name in PREFERRED_FILES:
                try:
                    path = fetch(name)
                except (EntryNotFoundError, LocalEntryNotFoundError) as e:
                    tried.append(name)
                    # LocalEntryNotFoundError subclasses EntryNotFoundError: a cache miss, not proof the repo lacks the file
                    local_misses += isinstance(e, LocalEntryNotFoundError)
                    if isinstance(e, LocalEntryNotFoundError):
                        cache_only = True  # the Hub is unreachable: look for the other candidates in the cache only
                    continue
                if name.endswith(".index.json"):
                    return _with_commit(from_index(source, path, fetch=fetch), path)
                return Resolved(source, files=[path], note=f"{repo_id}/{name}", commit=commit_of(path))
            where = "found locally" if local_misses == len(tried) else "in the repository"
            hint = offline_hint() if local_misses == len(tried) else ""
            raise SourceError(f"{source}: no weights file {where} (tried {', '.join(tried[:4])}, ...){hint}",
                              path=source)
        except WeightspaceError:  # ours (some are OSError or ValueError too) already name the source
            raise
        except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError, ValueError) as e:
            raise hub_download_error(source, e, cache_hint=offline_hint()) from None
