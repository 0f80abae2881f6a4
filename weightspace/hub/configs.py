"""Which library can load pushed weights: the timm or open_clip config, inferred from the ingredients' sources or
the run's ``--model`` and checked against the weights' keys, and the Hub repos the ingredients came from."""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import HubError, WeightspaceError
from ..io.checkpoint import Checkpoint
from ..io.source_options import split_query

__all__ = ["infer_model_config", "timm_config", "open_clip_config", "base_models"]


def _find_key(obj: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a JSON document."""
    out = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if k == key:
                out.append(v)
            out += _find_key(v, key)
    elif isinstance(obj, list):
        for v in obj:
            out += _find_key(v, key)
    return out


def _class_count(value: Any, where: str) -> int:
    """A positive integer class count read from a file, or one line naming where it was read."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise HubError(f"{where}: num_classes {value!r} is not a positive integer")
    return n


def infer_model_config(prov: Mapping, results: Mapping | None) -> tuple[dict | None, str]:
    """A timm/open_clip model config from the ingredients' sources or the run's ``--model``; and where it came from.

    Only timm and open_clip names are read: a ``pkg.module:factory`` a file names is never imported (a file's model
    strings resolve through a closed list).

    Raises:
        HubError: a class count that is not a positive integer.
    """
    sources = [str(i.get("source", "")) for i in prov.get("ingredients", []) if isinstance(i, Mapping)]
    for s in sources:
        if s.startswith("timm:"):
            name, q = split_query(s[5:])
            cfg: dict = {"architecture": name}
            if "num_classes" in q:
                cfg["num_classes"] = _class_count(q["num_classes"], f"the provenance's ingredient source {s}")
            return cfg, f"ingredient source {s.split('?')[0]}"
        if s.startswith("open_clip:"):
            arch = s[len("open_clip:"):].split("/", 1)[0]
            return {"open_clip_arch": arch}, f"ingredient source open_clip:{arch}"
    if results:
        for spec in _find_key(results, "model"):
            if not isinstance(spec, str):
                continue
            n = next((int(v) for v in _find_key(results, "num_classes") if isinstance(v, int)), None)
            if spec.startswith("timm:"):
                name, q = split_query(spec[5:])
                cfg = {"architecture": name}
                if n or "num_classes" in q:
                    cfg["num_classes"] = _class_count(q.get("num_classes", n), f"results.json --model {spec}")
                return cfg, f"results.json --model {spec}"
            if spec.startswith("open_clip:"):
                return {"open_clip_arch": spec[len("open_clip:"):].split("/", 1)[0]}, f"results.json --model {spec}"
    return None, ""


def _key_mismatch(expected: Mapping[str, tuple], ck: Checkpoint) -> str:
    missing = sorted(set(expected) - set(ck))
    extra = sorted(set(ck) - set(expected))
    shapes = [k for k in sorted(set(expected) & set(ck)) if tuple(ck.info(k)[1]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} unexpected keys (e.g. {', '.join(extra[:3])})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {list(ck.info(k)[1])}, "
                     f"model {list(expected[k])})")
    return "; ".join(parts)


def timm_config(cfg: dict, ck: Checkpoint, base_tag: str | None) -> dict:
    """config.json for ``timm.create_model("hf-hub:...")``, written by timm's own exporter from a meta-device model."""
    import torch
    import timm
    from timm.models import split_model_name_tag
    from timm.models._hub import save_config_for_hf
    from ..io.libraries import timm_classifier_classes
    arch, tag = split_model_name_tag(str(cfg["architecture"]))
    if arch not in timm.list_models():
        raise HubError(f"timm architecture '{arch}' is unknown to timm {timm.__version__}")
    n = cfg.get("num_classes") or timm_classifier_classes(ck.files[0], arch)
    kwargs = {"num_classes": int(n)} if n is not None else {}
    chans = cfg.get("in_chans") or ((cfg.get("pretrained_cfg") or {}).get("input_size") or [3])[0]
    if chans != 3:  # e.g. a grey-input model: its stem has one input channel
        kwargs["in_chans"] = int(chans)
    with torch.device("meta"):  # no memory, no init time: only names, shapes and the pretrained_cfg are needed
        model = timm.create_model(arch, pretrained=False, **kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = _key_mismatch(expected, ck)
    if bad:
        raise HubError(f"the checkpoint does not fit timm '{arch}' with num_classes={model.num_classes}: {bad}")
    pretrained = dict(cfg.get("pretrained_cfg") or {})
    pretrained.setdefault("tag", base_tag or tag or "weightspace")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        save_config_for_hf(model, path, model_config={"pretrained_cfg": pretrained})
        out = json.loads(path.read_text())
    if not (base_tag and base_tag == model.pretrained_cfg.get("tag")):
        # These describe timm's own pretrained weights, which this checkpoint is not.
        for k in ("license", "origin_url", "paper_ids", "paper_name", "description", "notes"):
            out["pretrained_cfg"].pop(k, None)
    for k in ("num_features", "global_pool"):
        if k in cfg:
            out[k] = cfg[k]
    return out


def open_clip_config(cfg: dict, ck: Checkpoint) -> dict:
    """open_clip_config.json ({"model_cfg", "preprocess_cfg"}) for ``open_clip.create_model("hf-hub:...")``."""
    import open_clip
    import torch
    arch = cfg.get("open_clip_arch")
    model_cfg = cfg.get("model_cfg") or (open_clip.get_model_config(arch) if arch else None)
    if not model_cfg:
        raise HubError(f"open_clip architecture '{arch}' is unknown to open_clip {open_clip.__version__}")
    with tempfile.TemporaryDirectory() as d:
        Path(d, "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # open_clip warns that no weights were loaded, which is the point here
        try:
            with torch.device("meta"):
                model = open_clip.create_model(f"local-dir:{d}", load_weights=False, device="meta")
        finally:
            root.setLevel(level)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = _key_mismatch(expected, ck)
    if bad:
        raise HubError(f"the checkpoint does not fit open_clip '{arch or 'model_cfg'}': {bad}")
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    preprocess = {"mean": list(getattr(model.visual, "image_mean", pp.get("mean"))),
                  "std": list(getattr(model.visual, "image_std", pp.get("std")))}
    for k in ("interpolation", "resize_mode"):
        if k in pp:
            preprocess[k] = pp[k]
    preprocess.update(cfg.get("preprocess_cfg") or {})
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def base_models(prov: Mapping) -> list[str]:
    """Hub repos the ingredients were loaded from (hf://, hf-hub:, timm and open_clip pretrained tags)."""
    out: list[str] = []
    for ing in prov.get("ingredients", []):
        s = str(ing.get("source", "")) if isinstance(ing, Mapping) else ""
        repo = None
        if s.startswith(("hf://", "hf-hub:")):
            from ..io.hub_sources import parse_hub
            with contextlib.suppress(WeightspaceError):
                repo = parse_hub(s.split(":", 1)[1].lstrip("/"))[0]
        elif s.startswith("timm:") and "file" not in split_query(s[5:])[1]:
            import timm
            cfg = timm.models.get_pretrained_cfg(split_query(s[5:])[0])
            repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        elif s.startswith("open_clip:") and "/" in s:
            import open_clip
            arch, tag = s[len("open_clip:"):].split("/", 1)
            repo = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or None
        if repo and repo.strip("/") not in out:
            out.append(repo.strip("/"))
    return out
