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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.outputs import TensorStream
from .stream import linear_combination

__all__ = ["MergekitConfig", "read_mergekit_config", "merge_from_config"]

METHODS = ("linear", "task_arithmetic", "ties", "slerp", "nuslerp", "karcher", "model_stock", "breadcrumbs", "sce",
           "dare_linear", "dare_ties", "della", "della_linear")
# generalized task arithmetic in mergekit: per-model weight and density, normalize and rescale defaults by method
_GTA = {"breadcrumbs": (False, False), "dare_linear": (False, True), "dare_ties": (False, True),
        "della": (True, True), "della_linear": (False, True)}
_PER_MODEL = {"breadcrumbs": ("gamma", 0.01), "della": ("epsilon", 0.15), "della_linear": ("epsilon", 0.15)}
_GLOBAL = {"slerp": {"t": None}, "karcher": {"max_iter": 10, "tol": 1e-5}, "model_stock": {"filter_wise": False},
           "sce": {"select_topk": 1.0}, "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False}}
_NO_BASE = ("linear", "karcher", "nuslerp")  # methods for which base_model is optional
# mergekit's dtype names → ours. Compute happens in float32 at least (float64 when asked): a bfloat16 compute
# dtype is honoured for the output only (see docs/merge.md).
_COMPUTE = {"float32": "fp32", "fp32": "fp32", "float64": "fp64", "fp64": "fp64",
            "bfloat16": "fp32", "bf16": "fp32", "float16": "fp32", "fp16": "fp32", "half": "fp32"}
_OUTPUT = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16",
           "fp16": "fp16", "half": "fp16", "float64": None, "fp64": None}
_IGNORED_KEYS = {"tokenizer_source", "tokenizer", "chat_template", "name"}  # nothing to merge: reported only


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


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {name} must be one number (per-layer gradients and filters are not supported)")
    return float(value)


def read_mergekit_config(path: str | os.PathLike) -> MergekitConfig:
    """Parse a mergekit YAML file. Raises ConfigError, naming the file, on anything it cannot run as written."""
    import yaml
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: not a readable YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a mergekit config is a mapping (merge_method, models, ...)")
    method = str(raw.get("merge_method", "")).replace("-", "_")
    if method not in METHODS:
        raise ConfigError(f"{p}: merge_method {raw.get('merge_method')!r}: weightspace runs {', '.join(METHODS)}")
    if "slices" in raw:
        raise ConfigError(f"{p}: 'slices' (layer ranges) are not supported; list whole models under 'models'")
    unknown = set(raw) - {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype"} - _IGNORED_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown key {sorted(unknown)[0]!r}")
    glob = raw.get("parameters") or {}
    if not isinstance(glob, dict):
        raise ConfigError(f"{p}: 'parameters' must be a mapping")
    base = _source(raw["base_model"], f"{p}: base_model", p.parent) if raw.get("base_model") else None
    if method not in _NO_BASE and base is None:
        raise ConfigError(f"{p}: {method} needs a base_model")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{p}: 'models' must list at least one model")
    models, weights, densities = [], [], []
    for i, entry in enumerate(entries):
        where = f"{p}: models[{i}]"
        src = _source(entry, where, p.parent)
        params = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: 'parameters' must be a mapping")
        if src == base and method not in ("linear", "karcher"):
            continue  # mergekit lists the base among the models too; its task vector is zero
        w = params.get("weight", glob.get("weight", 1.0 if method not in ("linear", "nuslerp") else None))
        if w is None:
            raise ConfigError(f"{where}: {method} needs a weight for every model")
        weights.append(_number(w, where, "weight"))
        d = params.get("density", glob.get("density"))
        densities.append(None if d is None else _number(d, where, "density"))
        models.append(src)
    if not models:
        raise ConfigError(f"{p}: no model besides the base_model")
    if method == "ties" and any(d is None for d in densities):
        densities = [1.0 if d is None else d for d in densities]  # mergekit keeps everything without a density
    normalize = bool(glob.get("normalize", _GTA.get(method, (method != "task_arithmetic",))[0]))
    scale = _number(glob.get("lambda", 1.0), f"{p}: parameters", "lambda")
    dtype = str(raw.get("dtype") or "float32").lower()
    out = str(raw.get("out_dtype") or dtype).lower()
    if dtype not in _COMPUTE or out not in _OUTPUT:
        raise ConfigError(f"{p}: dtype {dtype!r}/out_dtype {out!r}: expected float32, bfloat16, float16 or float64")
    notes = []
    if dtype in ("bfloat16", "bf16", "float16", "fp16", "half"):
        notes.append(f"dtype {dtype}: computed in float32 (more precise than mergekit's {dtype} arithmetic)")
    for k in sorted(set(raw) & _IGNORED_KEYS):
        notes.append(f"{k}: ignored (non-weight files come from the first model's folder)")
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
    m, where = cfg.method, f"{cfg.path}: parameters"
    opts: dict[str, Any] = {}
    for name, default in _GLOBAL.get(m, {}).items():
        v = glob.get(name, default)
        if v is None:
            raise ConfigError(f"{cfg.path}: {m} needs parameters.{name}")
        opts[name] = v if isinstance(default, bool) else _number(v, where, name)
    if "max_iter" in opts:
        opts["max_iter"] = int(opts["max_iter"])
    if m in _GTA:
        opts["density"] = [1.0 if d is None else d for d in cfg.densities]
        opts["normalize"] = cfg.normalize
        opts["rescale"] = "l1" if bool(glob.get("rescale", _GTA[m][1])) else "none"
        if m == "breadcrumbs":
            opts.pop("rescale")
        if m in _PER_MODEL:
            name, default = _PER_MODEL[m]
            opts[name] = [_number(((e.get("parameters") or {}) if isinstance(e, dict) else {}).get(
                name, glob.get(name, default)), f"{cfg.path}: models", name) for e in entries
                if _source(e, cfg.path, Path(cfg.path).parent) != cfg.base]
        opts["weights"] = list(cfg.weights)
    if m == "karcher":
        if cfg.base is not None and cfg.base not in cfg.models:
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
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ConfigError(f"{cfg.path}: weights sum to zero and normalize is on")
        weights = [w / total for w in weights]
    extra = {"config": {"format": "mergekit", "path": cfg.path, "merge_method": cfg.method}}
    if cfg.method == "linear":
        stream = linear_combination(cfg.models, weights, op="linear", precision=cfg.precision,
                                    allow_nonfinite=allow_nonfinite, progress=progress, extra=extra, buffers=buffers)
        return stream
    options: dict = {"weights": weights}
    if cfg.method == "ties":
        options["density"] = cfg.densities
    elif cfg.method not in ("task_arithmetic",):
        options = dict(cfg.options)
    stream = merge(cfg.method, cfg.base, cfg.models, scale=cfg.scale, precision=cfg.precision,
                   allow_nonfinite=allow_nonfinite, progress=progress, buffers=buffers, **options)
    stream.provenance.update(extra)
    return stream
