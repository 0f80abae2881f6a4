"""Group parameter names into modules: by prefix depth, by a regular expression, or by the nn.Module tree."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from torch import nn

from ..errors import ConfigError
from ..io.checkpoint import Source
from ..ops.grouping import group_names, parse_grouping

__all__ = ["TREE_LEVELS", "ModuleUnit", "tree_units", "model_units", "grouping", "infer_shape_options",
           "build_model_for", "MODULES_FILES", "ModuleListing", "list_modules"]


# ------------------------------------------------------------------------------------------ the nn.Module tree
# Grouping by the model's own module tree (needs a model, not only names). Three levels:
#   tree:layer  each weight layer (conv, linear, embedding, ...) with the norm layer that directly follows it in
#               the same parent (conv1+bn1); a norm layer with no such predecessor (pre-norm) is its own unit;
#               tensors held directly by the root (cls_token, pos_embed) are one unit each.
#   tree:block  residual blocks: the innermost element of a Sequential/ModuleList (a module whose name ends in
#               an index) that holds two or more weight layers (resnet layer1.0, ViT blocks.3, convnext
#               stages.1.blocks.0); tensors outside every block keep their tree:layer unit (stem, head).
#   tree:stage  stages: the outermost indexed container above a block (convnext stages.1), else the block's
#               parent (resnet layer1, ViT blocks); tensors outside every stage keep their tree:layer unit.
TREE_LEVELS = ("layer", "block", "stage")


@dataclass
class ModuleUnit:
    """A group of state-dict tensors analysed as one module, and where its output can be observed."""

    name: str
    keys: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    output: str | None = None  # module path whose forward output stands for the unit (None: no module, e.g. cls_token)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"name": self.name, "keys": list(self.keys), "modules": list(self.modules), "output": self.output}


def _is_norm(m: nn.Module) -> bool:
    # isinstance covers torch's norms and subclasses (timm's BatchNormAct2d, LayerNorm2d); the name covers
    # norms written from scratch (RmsNorm, ...).
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


def _own_keys(path: str, m: nn.Module) -> list[str]:
    """State-dict names of the tensors a module holds itself (not its children's)."""
    names = [n for n, p in m._parameters.items() if p is not None]
    names += [n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
    return [f"{path}.{n}" if path else n for n in names]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _indexed(path: str) -> bool:
    return path.rpartition(".")[2].isdigit()


def _layer_units(model: nn.Module) -> list[ModuleUnit]:
    units: list[ModuleUnit] = []
    last: ModuleUnit | None = None  # the unit of the previous weight layer, a norm may join it
    for path, m in model.named_modules():
        keys = _own_keys(path, m)
        if not keys:
            continue
        if not path:  # tensors of the root itself: one unit each
            units += [ModuleUnit(k, [k], [], None) for k in keys]
            last = None
            continue
        if _is_norm(m) and last is not None and _parent(last.modules[0]) == _parent(path) and len(last.modules) == 1:
            last.keys += keys
            last.modules.append(path)
            last.output = path
            continue
        unit = ModuleUnit(path, list(keys), [path], path)
        units.append(unit)
        last = None if _is_norm(m) else unit
    return units


def _holders(model: nn.Module) -> dict[str, int]:
    """For every module path: how many tensor-holding modules its subtree has."""
    counts: dict[str, int] = {}
    for path, m in model.named_modules():
        if not _own_keys(path, m):
            continue
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            p = ".".join(parts[:i])
            counts[p] = counts.get(p, 0) + 1
    return counts


def _containers(model: nn.Module, level: str) -> list[str]:
    """Module paths of the blocks (or stages) of a model, in registration order."""
    counts = _holders(model)
    paths = [p for p, _ in model.named_modules() if p]
    candidates = [p for p in paths if _indexed(p) and counts.get(p, 0) >= 2]
    blocks = [p for p in candidates if not any(q.startswith(p + ".") for q in candidates)]  # innermost
    if level == "block":
        return blocks
    stages: list[str] = []
    for b in blocks:
        parts = b.split(".")
        outer = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if _indexed(".".join(parts[:i]))), b)
        stage = outer if outer != b else (_parent(b) or b)
        if stage not in stages:
            stages.append(stage)
    return stages


def tree_units(model: nn.Module, level: str = "layer") -> list[ModuleUnit]:
    """Units of a model by its nn.Module tree: 'layer' (weight layer + its norm), 'block' or 'stage'.

    Raises:
        ConfigError: an unknown level.
    """
    if level not in TREE_LEVELS:
        raise ConfigError(f"modules=tree:{level}: expected one of {', '.join('tree:' + t for t in TREE_LEVELS)}", param="modules")
    layers = _layer_units(model)
    if level == "layer":
        return layers
    containers = _containers(model, level)
    units: list[ModuleUnit] = []
    by_name: dict[str, ModuleUnit] = {}
    for lu in layers:
        owner = next((c for c in containers if lu.modules and (lu.modules[0] + ".").startswith(c + ".")), None)
        if owner is None:
            units.append(lu)
            continue
        if owner not in by_name:
            by_name[owner] = ModuleUnit(owner, [], [], owner)
            units.append(by_name[owner])
        by_name[owner].keys += lu.keys
        by_name[owner].modules += lu.modules
    return units


def model_units(model: nn.Module, spec: str | None = None) -> list[ModuleUnit]:
    """Units of a model under any grouping spec: tree:layer (default), tree:block, tree:stage, depth:N, regex:P.

    Raises:
        ConfigError: a bad grouping spec.
    """
    spec = spec or "tree:layer"
    kind, _, arg = spec.partition(":")
    if kind == "tree":
        return tree_units(model, arg or "layer")
    names = list(model.state_dict().keys())
    module_paths = {p for p, _ in model.named_modules()}
    groups = group_names(names, **parse_grouping(spec))
    return [ModuleUnit(g, keys, [g] if g in module_paths else [], g if g in module_paths and g else None)
            for g, keys in groups.items()]


def grouping(names: Iterable[str], spec: str | None = None, model: nn.Module | None = None) -> dict[str, list[str]]:
    """Map module → tensor names under a spec; tree:* needs the model, names not in any unit become '(other)'.

    Raises:
        ConfigError: a bad spec, or a tree:* spec without the model.
    """
    names = list(names)
    if spec and spec.startswith("tree"):
        if model is None:
            raise ConfigError(f"modules={spec}: grouping by the module tree needs --model", param="modules")
    elif model is None:
        return group_names(names, **parse_grouping(spec))
    of = {k: u.name for u in model_units(model, spec) for k in u.keys}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(of.get(n, "(other)"), []).append(n)
    return groups


def infer_shape_options(model: nn.Module, checkpoint: Mapping[str, Any]) -> dict:
    """num_classes / in_chans that make a model spec fit a checkpoint (from its last and first weight)."""
    sd = model.state_dict()
    weights = [k for k, v in sd.items() if k in checkpoint and v.ndim >= 2 and v.is_floating_point()]
    out: dict = {}
    if not weights:
        return out
    last, first = weights[-1], weights[0]
    ck_last = tuple(checkpoint.info(last)[1]) if hasattr(checkpoint, "info") else tuple(checkpoint[last].shape)
    ck_first = tuple(checkpoint.info(first)[1]) if hasattr(checkpoint, "info") else tuple(checkpoint[first].shape)
    if ck_last[0] != sd[last].shape[0]:
        out["num_classes"] = int(ck_last[0])
    if sd[first].ndim >= 3 and ck_first[1] != sd[first].shape[1]:
        out["in_chans"] = int(ck_first[1])
    return out


def build_model_for(spec: str, checkpoint: Source | None = None, *, num_classes: int | None = None,
                    in_chans: int | None = None) -> nn.Module:
    """build_model(spec), with num_classes / in_chans read from a checkpoint's shapes where not given.

    Raises:
        ConfigError: an unknown or malformed model spec.
        SourceError, CheckpointError: the checkpoint cannot be found or read.
    """
    from ..io.sources import load
    from .models import build_model
    model = build_model(spec, num_classes=num_classes, in_chans=in_chans)
    if checkpoint is None or (num_classes is not None and in_chans is not None):
        return model
    inferred = infer_shape_options(model, load(checkpoint))
    if num_classes is not None:
        inferred.pop("num_classes", None)
    if in_chans is not None:
        inferred.pop("in_chans", None)
    if not inferred:
        return model
    return build_model(spec, num_classes=inferred.get("num_classes", num_classes),
                       in_chans=inferred.get("in_chans", in_chans))


# ------------------------------------------------------------------------------------------ a model's modules
MODULES_FILES = ("results.json", "modules.csv", "modules.png")


@dataclass
class ModuleListing:
    """The modules an analysis works on under one grouping: tensors and parameters per module, and how a
    checkpoint's keys fit the model (``weightspace modules``)."""

    model: str
    grouping: str
    modules: list[dict]
    checkpoint: str | None = None
    keys_not_in_model: list[str] = field(default_factory=list)
    keys_not_in_checkpoint: list[str] = field(default_factory=list)
    unassigned: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What a reader should know: keys that do not fit, tensors in no module."""
        out = []
        if self.keys_not_in_model or self.keys_not_in_checkpoint:
            out.append(f"{self.checkpoint}: {len(self.keys_not_in_model)} keys the model lacks, "
                       f"{len(self.keys_not_in_checkpoint)} model keys missing")
        if self.unassigned:
            out.append(f"{len(self.unassigned)} tensors belong to no module under {self.grouping} "
                       f"(e.g. {self.unassigned[0]})")
        return out

    def table(self) -> tuple[list[str], list[list]]:
        """One row per module: name, tensors, parameters, hooked output, the first keys."""
        return (["module", "tensors", "parameters", "output (hooked)", "keys"],
                [[m["name"], m["tensors"], m["parameters"], m["output"] or "",
                  ", ".join(m["keys"][:4]) + (" …" if len(m["keys"]) > 4 else "")] for m in self.modules])

    def to_dict(self) -> dict:
        """JSON-ready (results.json)."""
        out = {"model": self.model, "grouping": self.grouping, "checkpoint": self.checkpoint, "modules": self.modules,
               "total_parameters": sum(m["parameters"] for m in self.modules)}
        if self.checkpoint is not None:
            out["keys_not_in_model"], out["keys_not_in_checkpoint"] = self.keys_not_in_model, self.keys_not_in_checkpoint
        if self.unassigned:
            out["unassigned"] = self.unassigned
        return out

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """modules.png: a bar chart of parameters per module.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        fig = report.bar_chart([m["name"] for m in self.modules],
                               {"parameters": [float(m["parameters"]) for m in self.modules]},
                               xlabel="parameters", title=f"{self.model} by {self.grouping}")
        return report.save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json, modules.csv (every key) and modules.png in ``folder``; role → path.

        Raises:
            OutputExists: a file exists and ``force`` is False (checked before anything is written).
        """
        import weightspace.report as report
        keys = (["module", "tensors", "parameters", "output", "keys"],
                [[m["name"], m["tensors"], m["parameters"], m["output"], " ".join(m["keys"])] for m in self.modules])
        return report.write_files(folder, {"results": (MODULES_FILES[0], {**(extra or {}), **self.to_dict()}),
                                           "csv": (MODULES_FILES[1], keys), "png": (MODULES_FILES[2], self.plot)},
                                  force=force)


def list_modules(model: nn.Module, grouping: str = "tree:layer", checkpoint: Source | None = None, *,
                 model_name: str = "") -> ModuleListing:
    """The units of ``model`` under ``grouping`` with their tensor and parameter counts; with ``checkpoint`` the
    shapes come from it and its keys are compared with the model's.

    Raises:
        ConfigError: a bad grouping spec.
        CheckpointError: the checkpoint cannot be read.
    """
    import math

    from ..io.sources import load
    units = model_units(model, grouping)
    sd = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    ck = load(checkpoint) if checkpoint is not None else None

    def numel(key: str) -> int:
        return math.prod(int(s) for s in (ck.info(key)[1] if ck is not None and key in ck else sd[key].shape))

    listing = [{**u.to_dict(), "tensors": len(u.keys), "parameters": sum(numel(k) for k in u.keys if k in params)}
               for u in units]
    assigned = {k for u in units for k in u.keys}
    return ModuleListing(model_name, grouping, listing, ck.source if ck else None,
                         sorted(set(ck) - set(sd)) if ck else [], sorted(set(sd) - set(ck)) if ck else [],
                         sorted(set(sd) - assigned))
