"""Library names as sources: ``timm:NAME[?file=P&num_classes=N]`` and ``open_clip:ARCH/TAG``, loaded by the
libraries' own loaders (their checkpoint filters and head handling apply), returned as in-memory state dicts."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFound, SourceError, hub_download_error, library_message
from .checkpoint import Resolved, open_resolved
from .hub_sources import cached_commit, offline_hint, quiet_hub
from .local import resolve_local
from .source_options import SourceOptions, split_query

__all__ = ["timm_classifier_classes", "resolve_timm", "resolve_open_clip"]

def timm_classifier_classes(path: "str | os.PathLike | Mapping", name: str) -> int | None:
    """Number of classes of the classifier stored in a weights file (or an open Checkpoint or state dict), found
    via timm's pretrained config of model ``name``; None when no classifier key is found."""
    import timm
    classifier: Any = None
    try:
        cfg: Any = timm.models.get_pretrained_cfg(name) or {}
        classifier = cfg.classifier if hasattr(cfg, "classifier") else cfg.get("classifier")
    except Exception:
        pass
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])  # some nets have two heads
    ck: Any = path if isinstance(path, Mapping) else open_resolved(resolve_local(os.fspath(path)))
    try:
        for key in [f"{h}.weight" for h in heads] + ["fc.weight", "head.fc.weight", "head.weight", "classifier.weight"]:
            if key in ck:
                return int(ck.info(key)[1][0] if hasattr(ck, "info") else ck[key].shape[0])
    finally:
        if ck is not path:
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


def resolve_timm(source: str, spec: str, options: SourceOptions | None = None) -> Resolved:
    """``timm:NAME`` as the state dict timm builds (``?file=P`` loads P with ``options``, weights-only).
    Raises SourceError (unknown model or option, timm's loading error), HubError, CheckpointNotFound."""
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
        reading = options or SourceOptions()
        ck = open_resolved(resolve_local(str(path)), reading.ema, reading.key)
        if reading.strip_prefix:
            ck = ck.strip_prefix(reading.strip_prefix)
        variant = ck.variant
        overlay["state_dict"] = ck.materialise()
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
        raise SourceError(f"{source}: unknown option '{unknown[0]}' (timm: names take file=, num_classes=, ema=, strip_prefix=, key=)",
                          path=source)
    try:
        with quiet_hub():
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise SourceError(f"{source}: unknown timm model '{name}'", path=source) from None
        raise SourceError(f"{source}: timm could not load weights ({library_message(e)})", path=source) from None
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise hub_download_error(source, e, cache_hint=offline_hint()) from None
        raise SourceError(f"{source}: timm could not load weights ({type(e).__name__}: {library_message(e)})",
                          path=source) from None
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") if "file" not in opts else None
    return Resolved(source, state_dict=model.state_dict(), note=f"timm {name}", variant=variant,
                    commit=cached_commit(hub_id.rstrip("/")) if hub_id else None)


def resolve_open_clip(source: str, spec: str, options: SourceOptions | None = None) -> Resolved:
    """``open_clip:ARCH/TAG`` as the state dict open_clip builds. Raises SourceError or HubError."""
    import open_clip
    if "/" not in spec:
        raise SourceError(f"{source}: open_clip sources are open_clip:ARCH/TAG (a pretrained tag or a weights file path)",
                          path=source)
    arch, tag = spec.split("/", 1)
    try:
        with quiet_hub():
            model = open_clip.create_model(arch, pretrained=tag, device="cpu")
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):
            raise hub_download_error(source, e, cache_hint=offline_hint()) from None
        if "Failed to download" in str(e):  # open_clip wraps the Hub's error in a paragraph of its own
            raise SourceError(f"{source}: weights not found locally{offline_hint()}", path=source) from None
        raise SourceError(f"{source}: open_clip could not load it ({type(e).__name__}: {library_message(e)})",
                          path=source) from None
    try:
        hub_id = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or ""
    except Exception:  # a file path or an unknown tag: no Hub repo to name
        hub_id = ""
    if tag.startswith("hf-hub:"):
        hub_id = tag[len("hf-hub:"):]
    return Resolved(source, state_dict=model.state_dict(), note=f"open_clip {arch}/{tag}",
                    commit=cached_commit(hub_id.strip("/")) if hub_id else None)
