"""Parse and resolve source strings: local files and folders (shards too), the Hugging Face Hub, timm, open_clip.

One parser, one table of schemes. A resolved source is either a list of local weight files (read lazily) or,
for timm and open_clip names, an in-memory state dict produced by the library's own loader.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qsl

import torch

from ..errors import CheckpointError, CheckpointNotFound, SourceError, WeightspaceError, hub_error
from .checkpoint import Checkpoint, Resolved, Source, from_tensors, open_resolved, unwrap

__all__ = ["split_query", "WEIGHT_SUFFIXES", "PREFERRED_FILES", "SOURCE_OPTIONS", "EMA_CHOICES", "SourceOptions",
           "set_default_options", "default_options_for", "default_options", "split_options", "PROBE_TIMEOUT_S",
           "hub_reachable", "hub_call", "commit_of", "cached_commit", "parse_hub", "timm_classifier_classes", "SCHEMES", "resolve",
           "short_name", "open_source", "load"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Preference order inside a folder or a Hub repo: safetensors first (no pickle), single file before shards.
PREFERRED_FILES = (
    "model.safetensors", "model.safetensors.index.json",
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin",
    "model.pt", "model.pth",
)


# Options any source string may carry after '?', e.g. ckpt.pth.tar?ema=1 or lightning.ckpt?prefix=model.
SOURCE_OPTIONS = ("ema", "prefix")
EMA_CHOICES = ("off", "prefer", "require")


@dataclass(frozen=True)
class SourceOptions:
    """How to read the weights of one source: which EMA variant, and which key prefix to strip.

    ``ema``: "off" takes the regular weights (the default, noted when EMA weights are present), "prefer" takes EMA
    weights where a file holds them and the regular ones elsewhere, "require" fails when a file holds none.
    ``prefix``: keep only keys starting with it, with it removed (a Lightning module's 'model.')."""

    ema: str = "off"
    prefix: str | None = None


_defaults = SourceOptions()


def set_default_options(options: SourceOptions) -> None:
    """Set the options of sources that do not carry their own (the CLI's --ema and --strip-prefix).

    Raises:
        ValueError: ``options.ema`` is not one of EMA_CHOICES (a programming error: the CLI validates it)."""
    global _defaults
    if options.ema not in EMA_CHOICES:
        raise ValueError(f"ema must be one of {EMA_CHOICES}")
    _defaults = options


@contextlib.contextmanager
def default_options_for(options: SourceOptions) -> Iterator[None]:
    """``set_default_options`` for the duration of a block (a command), restored afterwards."""
    before = _defaults
    set_default_options(options)
    try:
        yield
    finally:
        set_default_options(before)


def default_options() -> SourceOptions:
    """The options of sources that carry none of their own (SourceOptions() unless the CLI set them)."""
    return _defaults


def split_options(source: str, defaults: SourceOptions | None = None) -> tuple[str, SourceOptions]:
    """Take '?ema=0|1' and '?prefix=P' off a source string; returns the rest and the options in force.

    Other query parameters stay in place for the scheme that reads them (timm's file= and num_classes=).
    An existing local file whose name holds '?' is taken as it is. Raises SourceError on a bad value."""
    base = defaults or _defaults
    if "?" not in source or Path(os.path.expanduser(source)).exists():
        return source, base
    head, query = source.split("?", 1)
    pairs = parse_qsl(query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in SOURCE_OPTIONS}
    rest = [(k, v) for k, v in pairs if k not in SOURCE_OPTIONS]
    is_local = not any(source.startswith(p) for p in SCHEMES)
    if rest and (is_local or source.startswith(("hf://", "hf-hub:"))):
        raise SourceError(f"{source}: unknown source option '{rest[0][0]}' (known: ema=0|1, prefix=P)", path=source)
    ema = base.ema
    if "ema" in ours:
        value = ours["ema"].lower()
        if value not in ("0", "1", "true", "false", "yes", "no"):
            raise SourceError(f"{source}: ema={ours['ema']}: expected 0 or 1", path=source)
        ema = "require" if value in ("1", "true", "yes") else "off"
    prefix = ours.get("prefix", base.prefix)
    if prefix == "":
        prefix = None
    rebuilt = head + ("?" + "&".join(f"{k}={v}" for k, v in rest) if rest else "")
    return rebuilt, SourceOptions(ema=ema, prefix=prefix)


def _local(source: str) -> Resolved:
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise CheckpointNotFound(f"{source}: no such file or directory", path=source)
    if path.is_dir():
        return _from_folder(source, path)
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a FIFO or /dev/zero would block or never end: refused before any read
        raise CheckpointError(f"{source}: is a FIFO, device or socket, not a regular file", path=source)
    if path.name.endswith(".index.json"):
        return _from_index(source, path)
    return Resolved(source, files=[path])


def _shard_inside(index: Path, name: str) -> Path:
    """The shard ``name`` of a local index, which must lie inside the index's folder: a relative path without
    '..', and no symlink leading out of the folder (as huggingface_hub enforces for Hub snapshots)."""
    parts = Path(name).parts
    if not name or os.path.isabs(name) or ".." in parts or "\0" in name:
        raise SourceError(f"{index}: shard name {name!r} points outside the index's folder; refused", path=index)
    folder = index.parent.resolve()
    shard = folder / name
    real = shard.resolve()
    if not any(real == root or root in real.parents for root in (folder, *_cache_blobs(index.parent))):
        raise SourceError(f"{index}: shard {name!r} is a link to {real}, outside the index's folder; refused",
                          path=index)
    return shard


def _cache_blobs(folder: Path) -> list[Path]:
    """The blobs folder of the Hugging Face cache repo whose snapshot holds ``folder``, if it is one: a snapshot's
    files are links to ``../../blobs/<sha256>``, which is where they belong, not an escape."""
    here = Path(os.path.abspath(folder))
    for up in (here, *here.parents):
        if up.parent.name == "snapshots" and (up.parent.parent / "blobs").is_dir():
            return [(up.parent.parent / "blobs").resolve()]
    return []


def _from_index(source: str, index: Path, fetch: Callable[[str], Path] | None = None) -> Resolved:
    try:
        data = json.loads(index.read_text())
        weight_map = dict(data["weight_map"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise SourceError(f"{index}: not a valid shard index (needs a 'weight_map' object)", path=index) from None
    if not weight_map:
        raise SourceError(f"{index}: shard index has an empty 'weight_map' (no tensors)", path=index)
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise SourceError(f"{index}: 'weight_map' entry {bad!r} is {weight_map[bad]!r}, not a shard file name",
                          path=index)
    names = sorted(set(weight_map.values()))
    files = []
    for name in names:
        shard = fetch(name) if fetch else _shard_inside(index, name)
        if not Path(shard).is_file():
            if Path(shard).exists():  # '.', a sub-folder, a FIFO: there, but not a file to read tensors from
                raise CheckpointError(f"{index}: shard {name!r} is not a file", path=index)
            raise CheckpointNotFound(f"{index}: shard {name!r} is missing", path=index)
        files.append(Path(shard))
    by_name = {name: str(f) for name, f in zip(names, files)}
    return Resolved(source, files=files, weight_map={k: by_name[v] for k, v in weight_map.items()},
                    note=f"{len(files)} shards")


def _from_folder(source: str, folder: Path) -> Resolved:
    for name in PREFERRED_FILES:
        p = folder / name
        if p.is_file():
            return _from_index(source, p) if name.endswith(".index.json") else Resolved(source, files=[p], note=name)
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return _from_index(source, indexes[0])
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(weights) == 1:
        if not weights[0].is_file():
            raise CheckpointError(f"{weights[0]}: is a FIFO, device or socket, not a regular file", path=weights[0])
        return Resolved(source, files=weights)
    if not weights:
        raise SourceError(f"{source}: folder holds no weights file (looked for {', '.join(PREFERRED_FILES[:3])}, *.index.json, *.safetensors, *.pt, *.bin)",
                          path=source)
    raise SourceError(f"{source}: folder holds several weight files ({', '.join(p.name for p in weights[:4])}); name one",
                      path=source)


def _offline_hint() -> str:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE and not _forced_offline:  # the user's own setting, read by huggingface_hub
        return " (HF_HUB_OFFLINE is set and it is not in the cache)"
    return " (not in the cache and the Hub is unreachable)"


_reachable: dict[str, bool] = {}
_forced_offline = False  # offline mode switched on by _quiet_hub (the Hub did not answer), not by the user
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
def _quiet_hub() -> Iterator[None]:
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
        with _quiet_hub():
            yield
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise hub_error(target, e, cache_hint=_offline_hint()) from None
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


def _hub(source: str, spec: str, options: SourceOptions | None = None) -> Resolved:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    repo_id, revision, filename = parse_hub(spec)

    cache_only = False

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=cache_only))

    with _quiet_hub():
        try:
            if filename:
                path = fetch(filename)
                if filename.endswith(".index.json"):
                    return _with_commit(_from_index(source, path, fetch=fetch), path)
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
                    return _with_commit(_from_index(source, path, fetch=fetch), path)
                return Resolved(source, files=[path], note=f"{repo_id}/{name}", commit=commit_of(path))
            where = "found locally" if local_misses == len(tried) else "in the repository"
            hint = _offline_hint() if local_misses == len(tried) else ""
            raise SourceError(f"{source}: no weights file {where} (tried {', '.join(tried[:4])}, ...){hint}",
                              path=source)
        except WeightspaceError:  # ours (some are OSError or ValueError too) already name the source
            raise
        except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError, ValueError) as e:
            raise hub_error(source, e, cache_hint=_offline_hint()) from None


def split_query(spec: str) -> tuple[str, dict[str, str]]:
    """'name?a=1&b=2' → ('name', {'a': '1', 'b': '2'}): how source and model specs carry their options."""
    name, _, q = spec.partition("?")
    return name, dict(parse_qsl(q))


def timm_classifier_classes(path: "Path | Mapping", name: str) -> int | None:
    """Number of classes of the classifier stored in a weights file (or an open Checkpoint), found via timm's
    pretrained config of model ``name``; None when no classifier key is found."""
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(name) or {}
        classifier = cfg.classifier if hasattr(cfg, "classifier") else cfg.get("classifier")
    except Exception:
        classifier = None
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])  # some nets have two heads
    opened = not isinstance(path, (str, os.PathLike))
    ck = path if opened else load(str(path))
    try:
        for key in [f"{h}.weight" for h in heads] + ["fc.weight", "head.fc.weight", "head.weight", "classifier.weight"]:
            if key in ck:
                return int(ck.info(key)[1][0] if hasattr(ck, "info") else ck[key].shape[0])
    finally:
        if not opened:
            ck.close()
    return None


def _timm_in_chans(sd: Mapping, name: str) -> int | None:
    """Input channels of the stem stored in a state dict, via timm's pretrained config (first_conv)."""
    import timm
    try:
        first = getattr(timm.models.get_pretrained_cfg(name), "first_conv", None)
    except Exception:
        first = None
    for conv in ([first] if isinstance(first, str) else list(first or [])):
        w = sd.get(f"{conv}.weight")
        if w is not None and w.dim() == 4:
            return int(w.shape[1])
    return None


def _timm(source: str, spec: str, options: SourceOptions | None = None) -> Resolved:
    import timm
    name, opts = split_query(spec)
    overlay: dict = {}
    kwargs: dict = {}
    variant = ""
    if "file" in opts:
        path = Path(os.path.expanduser(opts["file"])).absolute()
        if not path.exists():
            raise CheckpointNotFound(f"{source}: weights file {path} does not exist", path=source)
        # Read with our own loader (weights-only, our EMA choice and prefix), then hand timm the state dict so
        # that its checkpoint filter and classifier handling still apply.
        ck = open_source(str(path), options or SourceOptions())
        variant = ck.variant
        overlay["state_dict"] = ck.to_dict()
        ck.close()
        # Without num_classes in the overlay timm silently re-initialises a mismatched classifier.
        n = opts.get("num_classes") or timm_classifier_classes(overlay["state_dict"], name)
        if n is not None:
            overlay["num_classes"] = int(n)
            kwargs["num_classes"] = int(n)
        chans = _timm_in_chans(overlay["state_dict"], name)
        if chans is not None and chans != 3:  # e.g. grey inputs: timm would try to adapt a 3-channel stem
            cfg = timm.models.get_pretrained_cfg(name)
            size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224))
            overlay["input_size"] = (chans, *size[1:])
            kwargs["in_chans"] = chans
    elif "num_classes" in opts:
        kwargs["num_classes"] = int(opts["num_classes"])
    unknown = sorted(set(opts) - {"file", "num_classes"})
    if unknown:
        raise SourceError(f"{source}: unknown option '{unknown[0]}' (timm: names take file=, num_classes=, ema=, prefix=)",
                          path=source)
    try:
        with _quiet_hub():
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise SourceError(f"{source}: unknown timm model '{name}'", path=source) from None
        raise SourceError(f"{source}: timm could not load weights ({str(e).splitlines()[0]})", path=source) from None
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise hub_error(source, e, cache_hint=_offline_hint()) from None
        raise SourceError(f"{source}: timm could not load weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          path=source) from None
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") if "file" not in opts else None
    return Resolved(source, state_dict=model.state_dict(), note=f"timm {name}", variant=variant,
                    commit=cached_commit(hub_id.rstrip("/")) if hub_id else None)


def _open_clip(source: str, spec: str, options: SourceOptions | None = None) -> Resolved:
    import open_clip
    if "/" not in spec:
        raise SourceError(f"{source}: open_clip sources are open_clip:ARCH/TAG (a pretrained tag or a weights file path)",
                          path=source)
    arch, tag = spec.split("/", 1)
    try:
        with _quiet_hub():
            model = open_clip.create_model(arch, pretrained=tag, device="cpu")
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise hub_error(source, e, cache_hint=_offline_hint()) from None
        if "Failed to download" in str(e):  # open_clip wraps the Hub's error in a paragraph of its own
            raise SourceError(f"{source}: weights not found locally{_offline_hint()}", path=source) from None
        raise SourceError(f"{source}: open_clip could not load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          path=source) from None
    try:
        hub_id = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or ""
    except Exception:  # a file path or an unknown tag: no Hub repo to name
        hub_id = ""
    if tag.startswith("hf-hub:"):
        hub_id = tag[len("hf-hub:"):]
    return Resolved(source, state_dict=model.state_dict(), note=f"open_clip {arch}/{tag}",
                    commit=cached_commit(hub_id.strip("/")) if hub_id else None)


SCHEMES: dict[str, Callable[[str, str, SourceOptions], Resolved]] = {
    "hf://": _hub,
    "hf-hub:": _hub,
    "timm:": _timm,
    "open_clip:": _open_clip,
}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+_.-]*):(//)?")


def resolve(source: str, options: SourceOptions | None = None) -> Resolved:
    """Turn a source string into local files (or an in-memory state dict for timm/open_clip names).

    ``options`` matter where a library loads a file for us (timm:NAME?file=P reads P with them).
    Raises SourceError when the string names nothing loadable."""
    for prefix, fn in SCHEMES.items():
        if source.startswith(prefix):
            return fn(source, source[len(prefix):], options or SourceOptions())
    m = _SCHEME_RE.match(source)
    if m and not Path(source).exists() and len(m.group(1)) > 1:
        known = ", ".join(SCHEMES)
        raise SourceError(f"{source}: unknown scheme '{m.group(1)}:' (known: {known}, or a local path)", path=source)
    return _local(source)


def short_name(source: str) -> str:
    """A readable name for a checkpoint source: the file stem for paths, the string itself otherwise."""
    if source.startswith("<") or "://" in source or source.startswith(("timm:", "open_clip:", "hf-hub:")):
        return source
    p = Path(source)
    return p.stem if p.suffix else p.name or source


def _options(ema: bool | None, strip_prefix: str | None) -> SourceOptions:
    base = default_options()
    return SourceOptions(ema=base.ema if ema is None else ("prefer" if ema else "off"),
                         prefix=base.prefix if strip_prefix is None else (strip_prefix or None))


def open_source(source: str, options: SourceOptions) -> Checkpoint:
    """Open a source string (its own '?ema=' and '?prefix=' win over ``options``) as a lazy Checkpoint."""
    rest, opts = split_options(source, options)
    ck = open_resolved(resolve(rest, opts), opts.ema)
    if opts.prefix:
        ck = ck.strip_prefix(opts.prefix)
    if rest != source:
        ck.source = source  # reports name the source as the user wrote it, options included
    return ck


def load(src: Source, *, ema: bool | None = None, strip_prefix: str | None = None) -> Checkpoint:
    """Open any source (path, source string, Checkpoint, state dict, nn.Module) as a lazy Checkpoint.

    Args:
        src: a path or source string (``x.safetensors``, ``x.pt``, a folder, ``hf://org/repo``, ``timm:NAME``,
            ``open_clip:ARCH/TAG``; any of them may end in ``?ema=0|1`` and ``?prefix=P``), or weights in memory.
        ema: True takes EMA weights where the file holds them (as timm's ``use_ema``), False the regular ones;
            None (default) follows the process default (regular weights; the CLI's ``--ema`` sets True).
            ``?ema=1`` on a source requires EMA weights of it, ``?ema=0`` takes its regular ones.
        strip_prefix: keep only keys starting with it, with it removed (None: the process default, usually none).

    Raises:
        SourceError: the source string cannot be resolved (unknown scheme, missing file, Hub failure).
        CheckpointError: a file is unreadable, corrupt, holds no tensors, or lacks what was asked (EMA weights,
            the prefix).
        UnsafeCheckpoint: a pickle needs more than tensors to load.
        TypeError: ``src`` is none of the above.
    """
    if isinstance(src, Checkpoint):
        return src
    opts = _options(ema, strip_prefix)
    if isinstance(src, torch.nn.Module):
        return from_tensors(f"<{type(src).__name__}>", dict(src.state_dict()), "", [])
    if isinstance(src, Mapping):
        flat, variant = unwrap(src, "<state dict>", opts.ema)
        ck = from_tensors("<state dict>", flat, variant, [])
        # only an explicit prefix: weights in memory are usually an op's result, already in the model's names
        return ck.strip_prefix(strip_prefix) if strip_prefix else ck
    if isinstance(src, (str, os.PathLike)):
        return open_source(os.fspath(src), opts)
    raise TypeError(f"cannot load a {type(src).__name__} as a checkpoint")
