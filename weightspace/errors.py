"""One exception family: every user-facing failure names the file and, where there is one, the key.

Every class carries ``.path`` (the file, folder or source string the error is about) and ``.key`` (the tensor
name), each None where it does not apply, and subclasses the built-in a caller would reach for, so that
``except FileNotFoundError`` or ``except ValueError`` catches ours too::

    WeightspaceError
    ├── CheckpointError                     a checkpoint cannot be read
    │   ├── CheckpointNotFound              + SourceError, FileNotFoundError
    │   └── UnsafeCheckpoint                a pickle that needs more than tensors
    ├── OutputError                         + OSError: an output cannot be written
    ├── SourceError                         a source string cannot be resolved
    │   └── HubDownloadError                + HubError: a Hub download failed
    ├── HubError                            + OSError: the Hub refused or could not be reached (.repo_id)
    ├── IncompatibleCheckpoints             + ValueError: keys, shapes or dtype kinds disagree
    ├── NonFiniteError                      + ValueError: NaN or Inf in an input or a result
    ├── InvalidStatistics                   + ValueError: a result's running variance is negative
    ├── OutputExists                        + FileExistsError: the output exists and --force was not given
    ├── AlignmentError                      + ValueError: two models cannot be aligned
    └── ConfigError                         + ValueError: bad options, model spec, data spec or recipe
        └── DataError                       evaluation data cannot be used

``hub_download_error`` and ``hub_push_error`` are the one place where huggingface_hub's exceptions become ours.

Library messages name the Python parameter at fault (``keep=0: must be a fraction in (0, 1]``) and carry it as
``.param``; the CLI turns that leading parameter into its flag (``--keep 0: ...``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = [
    "WeightspaceError", "CheckpointError", "CheckpointNotFound", "UnsafeCheckpoint", "OutputError", "SourceError",
    "HubError", "HubDownloadError", "IncompatibleCheckpoints", "NonFiniteError", "InvalidStatistics", "OutputExists",
    "AlignmentError", "ConfigError", "DataError", "key_sample", "misfit", "hub_download_error", "hub_push_error",
    "library_message",
]


class WeightspaceError(Exception):
    """Base class of every error weightspace raises on bad input.

    ``str(e)`` is the one-line message; ``e.path`` and ``e.key`` name the file and the tensor where known, and
    ``e.param`` the library parameter at fault (``alpha``, ``scale``), which the CLI maps to its flag."""

    path: str | None
    key: str | None
    param: str | None

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None,
                 param: str | None = None):
        # One positional argument only: OSError subclasses then keep str(e) == message (no "[Errno ...]").
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None
        self.key = key
        self.param = param


class CheckpointError(WeightspaceError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or holds no tensors."""


class SourceError(WeightspaceError):
    """A source string cannot be resolved: unknown scheme, missing Hub file, offline cache miss."""


class CheckpointNotFound(CheckpointError, SourceError, FileNotFoundError):
    """The checkpoint file (or a shard of it, or the folder named) does not exist."""


class UnsafeCheckpoint(CheckpointError):
    """A pickle needs more than tensors to load and was refused."""


class OutputError(WeightspaceError, OSError):
    """An output cannot be written: its folder is missing, the disk is full, the name is too long."""


class HubError(WeightspaceError, OSError):
    """Talking to the Hub failed: no token, token refused, bad repo name, Hub unreachable.

    ``repo_id`` names the repository (or the source string) where known."""

    repo_id: str | None

    def __init__(self, message: str, *, repo_id: str | None = None, path: str | os.PathLike | None = None,
                 key: str | None = None, param: str | None = None):
        super().__init__(message, path=path, key=key, param=param)
        self.repo_id = repo_id


class HubDownloadError(SourceError, HubError):
    """A Hub source could not be downloaded: repository, revision or file not found, gated, cache miss."""


class IncompatibleCheckpoints(WeightspaceError, ValueError):
    """Checkpoints disagree on keys, shapes or dtype kinds."""


class NonFiniteError(WeightspaceError, ValueError):
    """An input tensor holds NaN or Inf."""


class InvalidStatistics(WeightspaceError, ValueError):
    """A result holds running statistics no normalisation layer can use (a negative running variance)."""


class OutputExists(WeightspaceError, FileExistsError):
    """The output path exists and --force was not given."""


class AlignmentError(WeightspaceError, ValueError):
    """Two models cannot be aligned: the graph cannot be traced, no data, or the aligned model changed."""


class ConfigError(WeightspaceError, ValueError):
    """Bad options or configuration (a model spec, a data spec, a recipe)."""


class DataError(ConfigError):
    """Evaluation data cannot be used: an unreadable image, a class map that does not fit the model.

    ``path`` names the file (an image, a map file, a cache entry) where there is one."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, *, key: str | None = None,
                 param: str | None = None):
        super().__init__(message, path=path, key=key, param=param)


def key_sample(keys: Sequence[str], n: int = 3) -> str:
    """'2 keys (e.g. 'a', 'b')': how an error names a set of keys without flooding the line."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} (e.g. {shown}{', ...' if len(keys) > n else ''})"


_STATE_DICT_KEYS = {"missing": r"Missing key\(s\) in state_dict: (.*)",
                    "unexpected": r"Unexpected key\(s\) in state_dict: (.*)"}
_SIZE_MISMATCH = (r"size mismatch for (\S+?): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                  r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def library_message(e: BaseException, limit: int = 400) -> str:
    """The useful part of a model library's exception (timm, torchvision, open_clip, torch) in one line.

    torch's ``load_state_dict`` error, whose first line only says "Error(s) in loading state_dict for ResNet:",
    becomes "the weights do not fit ResNet: missing 2 keys (e.g. 'fc.weight', 'fc.bias'); unexpected 1 key
    (e.g. 'head.weight'); 1 shape mismatch (e.g. 'conv1.weight': checkpoint [64, 1, 7, 7], model [64, 3, 7, 7])".
    Any other message gives its first non-empty line (and the next one when the first ends in ':'), cut at
    ``limit`` characters. Returns the line; raises nothing."""
    import re
    text = str(e).strip()
    parts = []
    for what, pattern in _STATE_DICT_KEYS.items():
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{what} {key_sample(keys, 4)}")
    sizes = re.findall(_SIZE_MISMATCH, text)
    if sizes:
        k, a, b = sizes[0]
        parts.append(f"{len(sizes)} shape mismatch{'es' if len(sizes) > 1 else ''} (e.g. '{k}': checkpoint {a}, "
                     f"model {b})")
    if parts:
        m = re.search(r"loading state_dict for (\S+?):", text)
        return f"the weights do not fit {m.group(1) if m else 'the model'}: " + "; ".join(parts)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    out = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return out if len(out) <= limit else out[:limit] + "..."


def _first_line(text: object) -> str:
    s = str(text).strip()
    return s.splitlines()[0] if s else ""


def misfit(name: str, missing: Sequence[str], unexpected: Sequence[str] = ()) -> IncompatibleCheckpoints:
    """The error for a checkpoint ``name`` whose keys do not fit a model: 'NAME: does not fit the model: missing
    2 keys (e.g. 'a', 'b'); unexpected 1 key (e.g. 'c')'. Returns it; raises nothing."""
    parts = [f"missing {key_sample(missing, 4)}"] if missing else []
    parts += [f"unexpected {key_sample(list(unexpected), 4)}"] if unexpected else []
    return IncompatibleCheckpoints(f"{name}: does not fit the model: " + "; ".join(parts), path=name)


def _hub_classes() -> tuple:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    return (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
            RevisionNotFoundError)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def hub_download_error(source: str, e: BaseException, *, cache_hint: str = "") -> HubDownloadError:
    """Turn an exception of huggingface_hub (or its HTTP transport) raised by a download into one line naming the
    source string: a ``HubDownloadError`` (a ``SourceError`` too). ``cache_hint`` ends the message of a cache miss
    (why the file could not be fetched). Returns the error; raises nothing."""
    (EntryNotFoundError, GatedRepoError, _, LocalEntryNotFoundError, RepositoryNotFoundError,
     RevisionNotFoundError) = _hub_classes()
    if isinstance(e, LocalEntryNotFoundError):
        msg = f"file not found locally{cache_hint}"
    elif isinstance(e, GatedRepoError):
        msg = "gated repository; accept its terms on the Hub and log in (hf auth login)"
    elif isinstance(e, RepositoryNotFoundError):
        msg = "repository not found on the Hub (or private: log in with hf auth login)"
    elif isinstance(e, RevisionNotFoundError):
        msg = "revision not found on the Hub"
    elif isinstance(e, EntryNotFoundError):
        msg = "file not found in the repository"
    else:
        msg = f"Hub download failed ({type(e).__name__}: {_first_line(e)})"
    return HubDownloadError(f"{source}: {msg}", path=source, repo_id=_repo_of(source))


def hub_push_error(repo_id: str, e: BaseException, *, token: str | None = None) -> HubError:
    """Turn an exception of huggingface_hub (or its HTTP transport) raised by a push into one line naming the
    repository: a ``HubError`` whose message says what to do about the token. ``token`` never appears in the
    message. Returns the error; raises nothing."""
    HfHubHTTPError = _hub_classes()[2]
    status = getattr(getattr(e, "response", None), "status_code", None) if isinstance(e, HfHubHTTPError) else None
    server = _scrub(_first_line(getattr(e, "server_message", None) or ""), token)
    if status == 401:
        msg = ("the Hub refused the token (401 Unauthorized): set a valid write token in HF_TOKEN or log in with "
               "`hf auth login`")
    elif status == 403:
        msg = f"the token may not write there (403 Forbidden{': ' + server if server else ''})"
    elif status == 400:
        msg = f"the Hub rejected the request (400{': ' + server if server else ''}); is the repository name valid?"
    elif status is not None:
        msg = f"the Hub answered {status}{': ' + server if server else ''}"
    elif isinstance(e, ValueError):  # the client's own checks, before any request
        msg = _scrub(_first_line(e), token)
    else:
        msg = f"cannot reach the Hub ({type(e).__name__}: {_scrub(_first_line(e), token)})"
    return HubError(f"{repo_id}: {msg}", repo_id=repo_id)


def _repo_of(source: str) -> str | None:
    """'org/name' of a Hub source string (hf://org/name@rev/file, hf-hub:org/name), else None."""
    for scheme in ("hf://", "hf-hub:"):
        if source.startswith(scheme):
            parts = source[len(scheme):].split("/")
            if len(parts) >= 2:
                return f"{parts[0]}/{parts[1].split('@')[0].split('?')[0]}"
    return None
