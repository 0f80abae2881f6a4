"""Read a mergekit YAML file (linear, task_arithmetic, ties, slerp, nuslerp, karcher, model_stock, breadcrumbs, sce,
dare_linear, dare_ties, della, della_linear) into a weightspace merge.

A file means what it means in mergekit: ``dtype`` is the compute dtype and ``out_dtype`` the output's (``dtype``
when absent); ``weight`` scales each model's contribution; ``density`` is a per-tensor fraction (TIES trimmed
tensor by tensor); ``normalize`` defaults to true for linear and ties, false for task_arithmetic; ``lambda``
scales the merged task vector; the other methods take mergekit's parameter names and defaults (``t``, ``weight``,
``density``, ``gamma``, ``epsilon``, ``select_topk``, ``filter_wise``, ``max_iter``, ``tol``, ``nuslerp_flatten``,
``nuslerp_row_wise``, ``rescale``). Differences that remain are listed in docs/merge.md.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.outputs import TensorStream
from ..io.yaml_file import as_bool, as_number, check_keys, read_yaml
from .stream import linear_combination

__all__ = ["MergekitConfig", "read_mergekit_config", "merge_from_config"]

METHODS = ("linear", "task_arithmetic", "ties", "slerp", "nuslerp", "karcher", "model_stock", "breadcrumbs", "sce",
           "dare_linear", "dare_ties", "della", "della_linear")
# generalized task arithmetic in mergekit: (normalize, rescale) defaults by method
_GTA = {"breadcrumbs": (False, False), "dare_linear": (False, True), "dare_ties": (False, True),
        "della": (True, True), "della_linear": (False, True)}
_PER_MODEL = {"breadcrumbs": ("gamma", 0.01), "della": ("epsilon", 0.15), "della_linear": ("epsilon", 0.15)}
# each method's own global parameters with mergekit's defaults (None: required)
_GLOBAL: dict[str, dict[str, Any]] = {
    "slerp": {"t": None}, "karcher": {"max_iter": 10, "tol": 1e-5}, "model_stock": {"filter_wise": False},
    "sce": {"select_topk": 1.0}, "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False}}
_NO_BASE = ("linear", "karcher", "nuslerp")  # methods for which base_model is optional
# mergekit's dtype names → ours. Compute happens in float32 at least (float64 when asked): a bfloat16 compute
# dtype is honoured for the output only (see docs/merge.md).
_COMPUTE = {"float32": "fp32", "fp32": "fp32", "float64": "fp64", "fp64": "fp64",
            "bfloat16": "fp32", "bf16": "fp32", "float16": "fp32", "fp16": "fp32", "half": "fp32"}
_OUTPUT = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16",
           "fp16": "fp16", "half": "fp16", "float64": None, "fp64": None}
_TOP = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype")
_PARAMS = ("weight", "density", "normalize", "lambda")
_MODEL_PARAMS = ("weight", "density")
# mergekit's options that weightspace does not run: named as unsupported, never silently ignored
_NON_WEIGHT = "the output folder takes the first model's non-weight files; remove it"
_UNSUPPORTED = {"slices": "layer ranges; list whole models under 'models'", "tokenizer_source": _NON_WEIGHT,
                "tokenizer": _NON_WEIGHT, "chat_template": _NON_WEIGHT, "modules": "per-module merges",
                "name": "multi-stage merges", "int8_mask": "arithmetic runs in float32 or float64",
                "rescale": "DARE rescaling", "epsilon": "DELLA/breadcrumbs options", "gamma": "breadcrumbs options",
                "k": "model_stock/sce options", "select_topk": "SCE options", "t": "slerp",
                "normalize": "a per-model normalize (set it under the top-level parameters)",
                "lambda": "a per-model lambda (set it under the top-level parameters)"}


@dataclass
class MergekitConfig:
    """A mergekit merge, as weightspace runs it."""

    path: str
    method: str
    models: list[str]
    weights: list[float]
    densities: list[float | None]
    base: str | None
    normalize: bool
    scale: float
    precision: str
    out_dtype: str | None
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options, in weightspace's names


def _source(ref: Any, where: str, folder: Path) -> str:
    """A mergekit model reference (local path or Hub id org/name[@rev]) as a weightspace source string."""
    if isinstance(ref, dict):
        check_keys(ref, ("model", "parameters"), where, _UNSUPPORTED)
        ref = ref.get("model")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: a model must be a path or a Hub id")
    if "+" in ref:
        raise ConfigError(f"{where}: {ref}: LoRA adapters (model+lora) are not supported")
    local = Path(os.path.expanduser(ref))
    if not local.is_absolute() and not local.exists() and (folder / local).exists():
        local = folder / local
    if local.exists() or ref.startswith((".", "/", "~")) or "://" in ref or ref.startswith(("timm:", "open_clip:")):
        return str(local) if local.exists() else ref
    return f"hf://{ref}"


def _identity(src: str) -> str:
    """One name per model: two spellings of one local path (./a, a, /abs/a, a link to it) are the same model."""
    return os.path.realpath(src) if os.path.exists(src) else src


def _number(value: Any, where: str, name: str, lo: float | None = None, lo_open: bool = False) -> float:
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: {name} must be one number (per-layer gradients and filters are not supported)")
    return float(as_number(value, f"{where}: {name}", lo, 1.0 if name == "density" else None, lo_open=lo_open))


def _params(raw: Any, where: str, known: tuple[str, ...]) -> dict:
    params = raw if raw is not None else {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping")
    check_keys(params, known, f"{where}: parameters", _UNSUPPORTED)
    return params


def _method_params(method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (global, per-model) parameter names a method takes in a mergekit file."""
    extra = tuple(_GLOBAL.get(method, {}))
    per_model = (_PER_MODEL[method][0],) if method in _PER_MODEL else ()
    if method in _GTA:
        extra += ("rescale",)
    return _PARAMS + extra + per_model, _MODEL_PARAMS + per_model


def _models(raw: dict, p: Path, method: str, base: str | None, glob: dict) -> tuple[list, list, list]:
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{p}: 'models' must list at least one model")
    models: list[str] = []
    weights: list[float] = []
    densities: list[float | None] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"{p}: models[{i}]"
        src = _source(entry, where, p.parent)
        params = _params(entry.get("parameters") if isinstance(entry, dict) else None, where,
                         _method_params(method)[1])
        if base is not None and _identity(src) == _identity(base) and method not in ("linear", "karcher"):
            continue  # mergekit lists the base among the models too; its task vector is zero
        if _identity(src) in seen:
            raise ConfigError(f"{where}: {src} is the model of models[{seen[_identity(src)]}] again; list each "
                              f"model once (give it a larger weight instead)")
        seen[_identity(src)] = i
        w = params.get("weight", glob.get("weight", 1.0 if method not in ("linear", "nuslerp") else None))
        if w is None:
            raise ConfigError(f"{where}: {method} needs a weight for every model")
        weights.append(_number(w, where, "weight"))
        d = params.get("density", glob.get("density"))
        densities.append(None if d is None else _number(d, where, "density", 0.0, lo_open=True))
        models.append(src)
    return models, weights, densities


def read_mergekit_config(path: str | os.PathLike) -> MergekitConfig:
    """Parse a mergekit YAML file strictly (``io.yaml_file``): unknown keys at any level are errors naming the
    nearest known key, mergekit options weightspace does not run are named as unsupported, numbers must be finite
    and in range, booleans booleans, and a model listed twice (under any spelling of its path) is refused.

    Raises:
        ConfigError: naming the file, on anything it cannot run as written."""
    p = Path(path)
    raw = read_yaml(p, "mergekit config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a mergekit config is a mapping (merge_method, models, ...)")
    check_keys(raw, _TOP, str(p), _UNSUPPORTED)
    method = str(raw.get("merge_method", "")).replace("-", "_")
    if method not in METHODS:
        raise ConfigError(f"{p}: merge_method {raw.get('merge_method')!r}: weightspace runs {', '.join(METHODS)}")
    glob = _params(raw.get("parameters"), str(p), _method_params(method)[0])
    base = _source(raw["base_model"], f"{p}: base_model", p.parent) if raw.get("base_model") else None
    if method not in _NO_BASE and base is None:
        raise ConfigError(f"{p}: {method} needs a base_model")
    models, weights, densities = _models(raw, p, method, base, glob)
    if not models:
        raise ConfigError(f"{p}: no model besides the base_model")
    if method == "ties" and any(d is None for d in densities):
        densities = [1.0 if d is None else d for d in densities]  # mergekit keeps everything without a density
    normalize = as_bool(glob.get("normalize", _GTA.get(method, (method != "task_arithmetic",))[0]),
                        f"{p}: parameters: normalize")
    scale = _number(glob.get("lambda", 1.0), f"{p}: parameters", "lambda")
    dtype = str(raw.get("dtype") or "float32").lower()
    out = str(raw.get("out_dtype") or dtype).lower()
    if dtype not in _COMPUTE or out not in _OUTPUT:
        raise ConfigError(f"{p}: dtype {dtype!r}/out_dtype {out!r}: expected float32, bfloat16, float16 or float64")
    notes = []
    if dtype in ("bfloat16", "bf16", "float16", "fp16", "half"):
        notes.append(f"dtype {dtype}: computed in float32 (more precise than mergekit's {dtype} arithmetic)")
    entries = raw["models"]
    weighted = "weight" in glob or any(isinstance(e, dict) and "weight" in (e.get("parameters") or {}) for e in entries)
    if method in ("slerp", "karcher", "model_stock", "sce") and weighted:
        notes.append(f"weight: ignored by {method} (as in mergekit)")
    if method == "ties" and not normalize:
        raise ConfigError(f"{p}: ties with normalize: false is not supported (weightspace's disjoint mean divides)")
    if method == "task_arithmetic" and normalize:
        notes.append("normalize: weights divided by their sum")
    cfg = MergekitConfig(str(p), method, models, weights, densities, base, normalize, scale, _COMPUTE[dtype],
                         _OUTPUT[out], notes)
    cfg.options = _method_options(cfg, glob, entries)
    return cfg


def _method_options(cfg: MergekitConfig, glob: dict, entries: list) -> dict[str, Any]:
    """The options of the methods beyond linear, task_arithmetic and ties, in weightspace's names, with mergekit's
    defaults; the inputs rearranged where mergekit's roles differ from base + models (karcher, nuslerp).

    Raises:
        ConfigError: a required parameter missing, a per-layer gradient, a wrong model count.
    """
    m, where, folder = cfg.method, f"{cfg.path}: parameters", Path(cfg.path).parent
    opts: dict[str, Any] = {}
    for name, default in _GLOBAL.get(m, {}).items():
        v = glob.get(name, default)
        if v is None:
            raise ConfigError(f"{cfg.path}: {m} needs parameters.{name}")
        opts[name] = as_bool(v, f"{where}: {name}") if isinstance(default, bool) else _number(v, where, name)
    if "max_iter" in opts:
        opts["max_iter"] = int(opts["max_iter"])
    if m in _GTA:
        opts["density"] = [1.0 if d is None else d for d in cfg.densities]
        opts["normalize"] = cfg.normalize
        if m != "breadcrumbs":
            opts["rescale"] = "l1" if as_bool(glob.get("rescale", _GTA[m][1]), f"{where}: rescale") else "none"
        if m in _PER_MODEL:
            name, default = _PER_MODEL[m]
            base_id = _identity(cfg.base) if cfg.base else None
            opts[name] = [_number(((e.get("parameters") or {}) if isinstance(e, dict) else {}).get(
                name, glob.get(name, default)), f"{cfg.path}: models", name) for e in entries
                if _identity(_source(e, cfg.path, folder)) != base_id]
        opts["weights"] = list(cfg.weights)
    if m == "karcher":
        if cfg.base is not None and _identity(cfg.base) not in {_identity(x) for x in cfg.models}:
            cfg.models = [cfg.base, *cfg.models]
        cfg.base, cfg.models = cfg.models[0], cfg.models[1:]
    if m == "nuslerp":
        if len(cfg.models) != 2:
            raise ConfigError(f"{cfg.path}: nuslerp needs exactly two models (plus an optional base_model)")
        total = sum(cfg.weights)
        opts["t"] = 0.5 if abs(total) < 1e-6 else cfg.weights[1] / total
        if cfg.base is None:
            cfg.base, cfg.models = cfg.models[0], cfg.models[1:]
    if m == "slerp" and len(cfg.models) != 1:
        raise ConfigError(f"{cfg.path}: slerp needs exactly two models, one of them the base_model")
    return opts


def merge_from_config(config: MergekitConfig | str | os.PathLike, *, progress: bool = False,
                      allow_nonfinite: bool = False, buffers: str = "mean") -> TensorStream:
    """The streamed merge a mergekit config describes (save it with ``weightspace.save(..., dtype=cfg.out_dtype)``);
    running statistics follow ``buffers`` (ops.engine: the models' convex mean, or the first input's).

    Raises ConfigError for a bad config and the loaders' errors for bad checkpoints."""
    from .merge import merge
    cfg = config if isinstance(config, MergekitConfig) else read_mergekit_config(config)
    weights = list(cfg.weights)
    if cfg.normalize:
        total = math.fsum(weights)
        if abs(total) < 1e-12:
            raise ConfigError(f"{cfg.path}: weights sum to zero and normalize is on")
        if not math.isfinite(total):
            raise ConfigError(f"{cfg.path}: weights sum to {total} (overflow) and normalize is on")
        weights = [w / total for w in weights]
    extra = {"config": {"format": "mergekit", "path": cfg.path, "merge_method": cfg.method}}
    if cfg.method == "linear":
        stream = linear_combination(cfg.models, weights, op="linear", precision=cfg.precision,
                                    allow_nonfinite=allow_nonfinite, progress=progress, extra=extra, buffers=buffers)
        return stream
    options: dict = {"weights": weights}
    if cfg.method == "ties":
        options["density"] = cfg.densities
    elif cfg.method != "task_arithmetic":
        options = dict(cfg.options)
    assert cfg.base is not None  # every method but linear has one by now (karcher and nuslerp: the first model)
    stream = merge(cfg.method, cfg.base, cfg.models, scale=cfg.scale, precision=cfg.precision,
                   allow_nonfinite=allow_nonfinite, progress=progress, buffers=buffers, **options)
    stream.provenance.update(extra)
    return stream
