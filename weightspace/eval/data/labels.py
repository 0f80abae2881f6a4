"""Label spaces: evaluate a dataset whose classes are a subset of the model's, or map onto several of them.

ImageNet-R and -A use 200 of ImageNet's 1,000 classes (folder names are wnids); ObjectNet-style sets map one class
to several model classes. A dataset gets a ``label_map``: for each of its classes, the model outputs that score it;
the Evaluator then restricts the logits to those columns (one per class) or pools them (``pool=max``, the
model-soups convention, or ``mean``). The map comes from matching the dataset's class names (folder names) against
the model's class list (ImageNet wnids and names for 1,000-class timm models, or the names an open_clip head was
built with), or from a file: ``?classes=FILE``, one line per dataset class, ``DATASET_CLASS MODEL_CLASS[,MODEL_CLASS...]``
(model classes by index, wnid or name), or a JSON object of the same.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ...errors import ConfigError, DataError
from .tensors import TensorData

__all__ = ["model_classes", "model_outputs", "read_class_map", "readable_names", "attach_label_map", "apply_label_map"]

POOLS = ("max", "mean")


def model_outputs(model: torch.nn.Module | None) -> int | None:
    """Number of classifier outputs of a timm / open_clip / torchvision / plain model, when it can be told: its
    ``head``, ``num_classes``, ``fc`` or ``classifier`` (a Linear, or a Sequential ending in one), else the last
    module when it is a Linear (an MLP's output layer)."""
    if model is None:
        return None
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return int(n)
    for name in ("fc", "classifier"):
        m = getattr(model, name, None)
        if isinstance(m, torch.nn.Sequential) and len(m):
            m = m[-1]
        if isinstance(m, torch.nn.Linear):
            return m.out_features
    last = list(model.modules())[-1]
    return last.out_features if isinstance(last, torch.nn.Linear) else None


def model_classes(model: torch.nn.Module | None) -> list[list[str]] | None:
    """The model's class list as aliases per output (e.g. [wnid, name]), or None when unknown."""
    if model is None:
        return None
    names = getattr(model, "class_names", None)
    if names:
        return [[str(n)] for n in names]
    n = model_outputs(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("label_names") and len(cfg["label_names"]) == n:
        return [[str(a)] for a in cfg["label_names"]]
    if n in (1000, 11221, 11821, 21841, 21843):
        try:
            from timm.data import ImageNetInfo, infer_imagenet_subset
            subset = infer_imagenet_subset(model) or {1000: "imagenet-1k"}.get(n)
            if subset:
                info = ImageNetInfo(subset)
                wnids = info.label_names()
                if len(wnids) == n:
                    descr = info.label_descriptions()
                    return [[w, d, d.split(",")[0].strip()] for w, d in zip(wnids, descr)]
        except Exception:  # older timm without ImageNetInfo: the class list is simply unknown
            return None
    return None


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def readable_names(names: list[str]) -> list[str]:
    """Class names as a text tower should read them: when every name is an ImageNet wnid (the folder names of
    ImageNet and its shifts, ``n01440764``), its first WordNet name (``tench``); otherwise each name normalised
    (lower case, ``_`` → space)."""
    import re
    if names and all(re.fullmatch(r"n\d{8}", n.strip()) for n in names):
        try:
            from timm.data import ImageNetInfo
            descr = ImageNetInfo("imagenet-1k").label_descriptions(as_dict=True)
        except Exception:  # older timm without ImageNetInfo: keep the wnids
            descr = {}
        if all(n.strip() in descr for n in names):
            return [descr[n.strip()].split(",")[0].strip() for n in names]
    return [_norm(n) for n in names]


def _resolve(cls: str, index: dict[str, int], n: int | None, where: str) -> int:
    if cls.strip().isdigit():
        i = int(cls)
        if n is not None and i >= n:
            raise DataError(f"{where}: model class {i} is out of range (the model has {n} outputs)", path=where)
        return i
    if _norm(cls) not in index:
        raise DataError(f"{where}: '{cls}' is not one of the model's classes", path=where)
    return index[_norm(cls)]


def read_class_map(path: str) -> dict[str, list[str]]:
    """A class-map file: JSON ``{dataset_class: model_class | [model_class, ...]}`` or lines
    ``DATASET_CLASS MODEL_CLASS[,MODEL_CLASS...]`` (``#`` starts a comment).

    Raises:
        DataError: the file is missing or a line has no model class.
    """
    from .guards import read_small_text
    p = Path(path).expanduser()
    try:
        text = read_small_text(p, "a class map")
    except ConfigError as e:
        raise DataError(str(e), path=str(p)) from None
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise DataError(f"{p}: not valid JSON ({e})", path=str(p)) from None
        return {str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in raw.items()}
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise DataError(f"{p}:{lineno}: expected 'DATASET_CLASS MODEL_CLASS[,MODEL_CLASS...]'", path=str(p))
        out[parts[0]] = [c.strip() for c in parts[1].split(",") if c.strip()]
    return out


def _sample(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def attach_label_map(d: TensorData, model: torch.nn.Module | None, classes_file: str | None, pool: str,
                     spec: str, fallback: str | None = None) -> TensorData:
    """``d`` with its ``label_map`` set when its classes are not the model's outputs one to one.

    A dataset whose classes do not match the model's outputs is never scored against the head's first columns: it
    is mapped (``classes_file``, or its class names found among the model's) or refused. The one exception is a
    tensors file (``.pt``/``.npz``) with fewer classes than outputs: its labels are output indices by its own
    statement (a test split may lack the last classes). ``fallback`` (--class-map) maps a dataset that names no
    map of its own and does not match the outputs one to one.

    Raises:
        DataError: a dataset class has no model class (naming the classes), the class counts differ with no map,
            or the map file does not fit.
    """
    if pool not in POOLS:
        raise DataError(f"data={spec}: pool={pool}: expected {' or '.join(POOLS)}", param="data")
    names = list(d.meta.get("classes") or [str(i) for i in range(d.num_classes or 0)])
    n_out = model_outputs(model)
    known = model_classes(model)
    if model is not None and hasattr(model, "zero_shot_head") and getattr(model, "class_names", None) is None \
            and n_out == len(names) and not classes_file:
        model.class_names = readable_names(names)  # an open_clip zero-shot head speaks the dataset's classes
        return d
    index = {_norm(a): i for i, aliases in enumerate(known or []) for a in aliases}
    if not classes_file and fallback and n_out is not None and n_out != len(names) and not d.multilabel:
        classes_file = fallback
    if classes_file:
        mapping = read_class_map(classes_file)
        missing = [c for c in names if c not in mapping]
        if missing:
            raise DataError(f"{classes_file}: no model class for the dataset's class(es) {_sample(missing)}",
                            path=classes_file)
        groups = [[_resolve(c, index, n_out, classes_file) for c in mapping[name]] for name in names]
    elif n_out is None or n_out == len(names) or d.multilabel:
        return d
    elif d.meta.get("labels") == "indices" and len(names) < n_out:
        return d
    elif not known:
        raise DataError(f"data={spec}: {len(names)} classes for a model with {n_out} outputs, and the model "
                        f"names none of them; map each dataset class to a model output with ?classes=FILE or "
                        f"--class-map FILE (lines 'DATASET_CLASS MODEL_CLASS'), or size the head with "
                        f"--num-classes {len(names)}", path=spec, param="data")
    else:
        missing = [c for c in names if _norm(c) not in index]
        if missing:
            raise DataError(f"data={spec}: {len(names)} classes for a model with {n_out} outputs, and "
                            f"{len(missing)} are not among the model's classes: {_sample(missing)} "
                            f"(map them with ?classes=FILE)", path=spec, param="data")
        groups = [[index[_norm(c)]] for c in names]
    return replace(d, label_map=groups, meta={**d.meta, "pool": pool, "label_map": groups})


def apply_label_map(logits: torch.Tensor, groups: list[list[int]] | None, pool: str = "max") -> torch.Tensor:
    """Logits over the dataset's classes: the mapped column of each class, or its columns pooled."""
    if not groups:
        return logits
    if all(len(g) == 1 for g in groups):
        return logits[:, torch.tensor([g[0] for g in groups], device=logits.device)]
    cols = []
    for g in groups:
        part = logits[:, torch.tensor(g, device=logits.device)]
        cols.append(part.amax(1) if pool == "max" else part.mean(1))
    return torch.stack(cols, 1)
