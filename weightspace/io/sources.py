"""Parse and resolve source strings: local files and folders (shards too), the Hugging Face Hub, timm, open_clip.

One parser, one table of schemes. A resolved source is either a list of local weight files (read lazily) or,
for timm and open_clip names, an in-memory state dict produced by the library's own loader.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Callable

import torch
from urllib.parse import parse_qsl

from ..errors import SourceError
from .checkpoint import Checkpoint, Resolved, Source, from_tensors, open_resolved, unwrap

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Preference order inside a folder or a Hub repo: safetensors first (no pickle), single file before shards.
PREFERRED_FILES = (
    "model.safetensors", "model.safetensors.index.json",
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin",
    "model.pt", "model.pth",
)


def _local(source: str) -> Resolved:
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory")
    if path.is_dir():
        return _from_folder(source, path)
    if path.name.endswith(".index.json"):
        return _from_index(source, path)
    return Resolved(source, files=[path])


def _shard_inside(index: Path, name: str) -> Path:
    """The shard ``name`` of a local index, which must lie inside the index's folder: a relative path without
    '..', and no symlink leading out of the folder (as huggingface_hub enforces for Hub snapshots)."""
    parts = Path(name).parts
    if not name or os.path.isabs(name) or ".." in parts or "\0" in name:
        raise SourceError(f"{index}: shard name {name!r} points outside the index's folder; refused")
    folder = index.parent.resolve()
    shard = folder / name
    real = shard.resolve()
    if real != folder and folder not in real.parents:
        raise SourceError(f"{index}: shard {name!r} is a link to {real}, outside the index's folder; refused")
    return shard


def _from_index(source: str, index: Path, fetch: Callable[[str], Path] | None = None) -> Resolved:
    try:
        data = json.loads(index.read_text())
        weight_map = dict(data["weight_map"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise SourceError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from None
    if not weight_map:
        raise SourceError(f"{index}: shard index has an empty 'weight_map' (no tensors)")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise SourceError(f"{index}: 'weight_map' entry {bad!r} is {weight_map[bad]!r}, not a shard file name")
    names = sorted(set(weight_map.values()))
    files = []
    for name in names:
        shard = fetch(name) if fetch else _shard_inside(index, name)
        if not Path(shard).is_file():
            raise SourceError(f"{index}: shard {name!r} is missing")
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
        return Resolved(source, files=weights)
    if not weights:
        raise SourceError(f"{source}: folder holds no weights file (looked for {', '.join(PREFERRED_FILES[:3])}, *.index.json, *.safetensors, *.pt, *.bin)")
    raise SourceError(f"{source}: folder holds several weight files ({', '.join(p.name for p in weights[:4])}); name one")


def _offline_hint() -> str:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:  # what huggingface_hub itself obeys (read from the environment at import)
        return " (HF_HUB_OFFLINE is set and it is not in the cache)"
    return " (not in the cache and the Hub is unreachable)"


def _hub_error(source: str, e: Exception) -> SourceError:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(e, LocalEntryNotFoundError):
        return SourceError(f"{source}: file not found locally{_offline_hint()}")
    if isinstance(e, GatedRepoError):
        return SourceError(f"{source}: gated repository; accept its terms on the Hub and log in (hf auth login)")
    if isinstance(e, RepositoryNotFoundError):
        return SourceError(f"{source}: repository not found on the Hub (or private: log in with hf auth login)")
    if isinstance(e, RevisionNotFoundError):
        return SourceError(f"{source}: revision not found on the Hub")
    if isinstance(e, EntryNotFoundError):
        return SourceError(f"{source}: file not found in the repository")
    return SourceError(f"{source}: Hub download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def parse_hub(spec: str) -> tuple[str, str | None, str | None]:
    """Split 'org/repo[@rev][/file]' into (repo_id, revision, filename)."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SourceError(f"{spec}: a Hub source needs org/repo")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{repo}", revision or None, filename


def _hub(source: str, spec: str) -> Resolved:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    repo_id, revision, filename = parse_hub(spec)

    cache_only = False

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=cache_only))

    import logging
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    # Retries against an unreachable Hub are logged line by line; the outcome is reported in one error instead.
    hub_log.setLevel(logging.ERROR)
    try:
        if filename:
            path = fetch(filename)
            if filename.endswith(".index.json"):
                return _from_index(source, path, fetch=fetch)
            return Resolved(source, files=[path], note=f"{repo_id}/{filename}")
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
                return _from_index(source, path, fetch=fetch)
            return Resolved(source, files=[path], note=f"{repo_id}/{name}")
        where = "found locally" if local_misses == len(tried) else "in the repository"
        hint = _offline_hint() if local_misses == len(tried) else ""
        raise SourceError(f"{source}: no weights file {where} (tried {', '.join(tried[:4])}, ...){hint}")
    except SourceError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError, ValueError) as e:
        raise _hub_error(source, e) from None
    finally:
        hub_log.setLevel(level)


def _query(spec: str) -> tuple[str, dict[str, str]]:
    if "?" in spec:
        name, q = spec.split("?", 1)
        return name, dict(parse_qsl(q))
    return spec, {}


def timm_classifier_classes(path: Path, name: str) -> int | None:
    """Number of classes of the classifier stored in a weights file, found via timm's pretrained config."""
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(name) or {}
        classifier = cfg.classifier if hasattr(cfg, "classifier") else cfg.get("classifier")
    except Exception:
        classifier = None
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])  # some nets have two heads
    ck = load(str(path))
    try:
        for key in [f"{h}.weight" for h in heads] + ["fc.weight", "head.fc.weight", "head.weight", "classifier.weight"]:
            if key in ck:
                return int(ck.info(key)[1][0])
    finally:
        ck.close()
    return None


def _timm(source: str, spec: str) -> Resolved:
    import timm
    name, opts = _query(spec)
    overlay: dict = {}
    kwargs: dict = {}
    if "file" in opts:
        path = Path(os.path.expanduser(opts["file"])).absolute()
        if not path.exists():
            raise SourceError(f"{source}: weights file {path} does not exist")
        overlay["file"] = str(path)
        # Without num_classes in the overlay timm silently re-initialises a mismatched classifier.
        n = opts.get("num_classes") or timm_classifier_classes(path, name)
        if n is not None:
            overlay["num_classes"] = int(n)
            kwargs["num_classes"] = int(n)
    elif "num_classes" in opts:
        kwargs["num_classes"] = int(opts["num_classes"])
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise SourceError(f"{source}: unknown timm model '{name}'") from None
        raise SourceError(f"{source}: timm could not load weights ({str(e).splitlines()[0]})") from None
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise _hub_error(source, e) from None
        raise SourceError(f"{source}: timm could not load weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return Resolved(source, state_dict=model.state_dict(), note=f"timm {name}")


def _open_clip(source: str, spec: str) -> Resolved:
    import open_clip
    if "/" not in spec:
        raise SourceError(f"{source}: open_clip sources are open_clip:ARCH/TAG (a pretrained tag or a weights file path)")
    arch, tag = spec.split("/", 1)
    try:
        model = open_clip.create_model(arch, pretrained=tag, device="cpu")
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise _hub_error(source, e) from None
        raise SourceError(f"{source}: open_clip could not load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return Resolved(source, state_dict=model.state_dict(), note=f"open_clip {arch}/{tag}")


SCHEMES: dict[str, Callable[[str, str], Resolved]] = {
    "hf://": _hub,
    "hf-hub:": _hub,
    "timm:": _timm,
    "open_clip:": _open_clip,
}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+_.-]*):(//)?")


def resolve(source: str) -> Resolved:
    """Turn a source string into local files (or an in-memory state dict for timm/open_clip names)."""
    for prefix, fn in SCHEMES.items():
        if source.startswith(prefix):
            return fn(source, source[len(prefix):])
    m = _SCHEME_RE.match(source)
    if m and not Path(source).exists() and len(m.group(1)) > 1:
        known = ", ".join(SCHEMES)
        raise SourceError(f"{source}: unknown scheme '{m.group(1)}:' (known: {known}, or a local path)")
    return _local(source)


def short_name(source: str) -> str:
    """A readable name for a checkpoint source: the file stem for paths, the string itself otherwise."""
    if source.startswith("<") or "://" in source or source.startswith(("timm:", "open_clip:", "hf-hub:")):
        return source
    p = Path(source)
    return p.stem if p.suffix else p.name or source


def load(src: Source, *, ema: bool = False) -> Checkpoint:
    """Open any source (path, source string, Checkpoint, state dict, nn.Module) as a lazy Checkpoint.

    Raises:
        SourceError: the source string cannot be resolved (unknown scheme, missing file, Hub failure).
        CheckpointError: a file is unreadable, corrupt or holds no tensors.
        UnsafeCheckpoint: a pickle needs more than tensors to load.
        TypeError: ``src`` is none of the above.
    """
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, torch.nn.Module):
        return from_tensors(f"<{type(src).__name__}>", dict(src.state_dict()), "", [])
    if isinstance(src, Mapping):
        flat, variant = unwrap(src, "<state dict>", ema)
        return from_tensors("<state dict>", flat, variant, [])
    if isinstance(src, (str, os.PathLike)):
        return open_resolved(resolve(os.fspath(src)), ema)
    raise TypeError(f"cannot load a {type(src).__name__} as a checkpoint")
