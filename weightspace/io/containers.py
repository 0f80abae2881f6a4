"""Find the weights inside a loaded checkpoint: training checkpoints wrap them in a container (``state_dict``,
``model_state``, ``model/state_dict``, EMA copies) beside optimizer, scheduler and scaler state and scalar
metadata, which are recognised by their shape and left out with a note, never averaged into weights."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from ..options import EmaChoice
from .keys import EMA_PREFIXES

__all__ = ["WEIGHT_CONTAINERS", "EMA_CONTAINERS", "EMA_PREFIXES", "MAX_NESTING", "MAX_ENTRIES", "training_role",
           "unwrap", "pick_prefixed"]

# Names under which training code stores the weights (Lightning, timm's train script, torchvision's references,
# DeepSpeed, Hydra templates, and plain torch.save({'model': ...}) scripts), most specific first.
WEIGHT_CONTAINERS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "module")
EMA_CONTAINERS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema")
METADATA_NAMES = ("epoch", "step", "global_step", "iteration", "iter", "best_metric", "metric", "version")
MAX_NESTING = 64  # containers inside containers; real checkpoints nest a handful deep
MAX_ENTRIES = 1_000_000  # entries visited while flattening: shared sub-dicts would otherwise multiply them
_PROBE = 10_000  # entries looked at to decide whether a container holds tensors at all


def training_role(name: str, value: Any) -> str | None:
    """What a training checkpoint's entry is when it is not weights: "optimizer" (a state dict with ``state``
    and ``param_groups``, or a list of them), "scheduler", "scaler" (AMP's GradScaler), "metadata" (scalars,
    strings, configs without tensors); None for weights or anything unknown."""
    if isinstance(value, (list, tuple)):  # Lightning keeps one state per optimizer and scheduler in a list
        roles = {training_role(name, v) if isinstance(v, Mapping) else "other" for v in value[:16]}
        if len(roles) == 1 and roles <= {"optimizer", "scheduler", "scaler"}:
            return roles.pop()
        return None if _holds_tensor(value) else "metadata"
    if isinstance(value, Mapping):
        keys = set(value)
        if {"state", "param_groups"} <= keys:
            return "optimizer"
        if "last_epoch" in keys and ("base_lrs" in keys or "_step_count" in keys):
            return "scheduler"
        if {"scale", "growth_factor"} <= keys:
            return "scaler"
        return None if _holds_tensor(value) else "metadata"
    if torch.is_tensor(value):
        return "metadata" if value.dim() == 0 and name in METADATA_NAMES else None
    return "metadata"


def _holds_tensor(obj: Any) -> bool:
    """Whether a container holds a tensor within its first entries (bounded: shared or cyclic containers)."""
    stack, seen = [obj], 0
    while stack and seen < _PROBE:
        cur = stack.pop()
        seen += 1
        if torch.is_tensor(cur):
            return True
        if isinstance(cur, Mapping):
            stack.extend(list(cur.values())[:_PROBE])
        elif isinstance(cur, (list, tuple)):
            stack.extend(cur[:_PROBE])
    return False


def _flatten(obj: Mapping, path: str) -> dict[str, torch.Tensor]:
    """Nested mappings → {dotted name: tensor}, iteratively: a pickle may nest thousands deep, hold a cycle, or
    share one dict many times over (2^22 paths from 22 levels); each is refused in bounded time."""
    out: dict[str, torch.Tensor] = {}
    visited = 0
    # each frame: (prefix, iterator over the mapping's items, ids of the mappings on the way down)
    stack = [("", iter(obj.items()), frozenset([id(obj)]))]
    while stack:
        prefix, items, above = stack[-1]
        for k, v in items:
            visited += 1
            if visited > MAX_ENTRIES:
                raise CheckpointError(f"{path}: holds more than {MAX_ENTRIES:,} nested entries (shared or "
                                      f"repeated containers); refused", path=path)
            name = f"{prefix}{k}"
            if torch.is_tensor(v):
                out[name] = v
            elif isinstance(v, Mapping):
                if id(v) in above:
                    raise CheckpointError(f"{path}: the container at {name!r} contains itself; refused", path=path)
                if len(stack) >= MAX_NESTING:
                    raise CheckpointError(f"{path}: containers nested deeper than {MAX_NESTING} levels at "
                                          f"{name[:80]!r}...; refused", path=path)
                stack.append((name + ".", iter(v.items()), above | {id(v)}))
                break
        else:
            stack.pop()
    return out


def _all_tensors(obj: Mapping) -> bool:
    return len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _wants_ema(ema: EmaChoice) -> bool:
    return ema in ("prefer", "require")


def _select(obj: Any, key: str, path: str) -> Any:
    """The entry ``key`` ('model_state', or 'model/state_dict' for a nested one) of a loaded checkpoint."""
    for part in key.strip("/").split("/"):
        if not isinstance(obj, Mapping) or part not in obj:
            here = sorted(str(k) for k, v in obj.items() if isinstance(v, Mapping))[:8] if isinstance(obj, Mapping) else []
            raise CheckpointError(f"{path}: ?key={key}: no entry {part!r} (entries holding containers: "
                                  f"{', '.join(here) or 'none'})", path=path, key=key)
        obj = obj[part]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: ?key={key} holds a {type(obj).__name__}, not a state dict", path=path, key=key)
    return obj


def _dropped_note(dropped: dict[str, str]) -> str:
    state = [f"{n} ({r})" for n, r in dropped.items() if r != "metadata"]
    meta = [n for n, r in dropped.items() if r == "metadata"]
    parts = state + ([f"metadata {', '.join(meta[:4])}" + (", ..." if len(meta) > 4 else "")] if meta else [])
    return f"left out: {'; '.join(parts)}" if parts else ""


def _ambiguous(path: str, names: list[str], trail: str) -> CheckpointError:
    at = f"{trail}/" if trail else ""
    how = f"load(..., key='{at}{names[0]}')" if path.startswith("<") else f"'{path}?key={at}{names[0]}'"
    return CheckpointError(f"{path}: holds weights under several entries ({', '.join(repr(at + n) for n in names)}); "
                           f"pick one with {how}", path=path)


def _step(obj: Mapping, path: str, ema: EmaChoice, trail: str) -> tuple[Any, str, bool] | None:
    """One level down towards the weights: (container, how it was chosen, took EMA), or None to stop here."""
    roles = {str(k): training_role(str(k), v) for k, v in obj.items() if not torch.is_tensor(v) or v.dim() == 0}
    dropped = {n: r for n, r in roles.items() if r is not None}
    present = [n for n in EMA_CONTAINERS + WEIGHT_CONTAINERS
               if isinstance(obj.get(n), Mapping) and roles.get(n) is None and _holds_tensor(obj[n])]
    regs = [n for n in present if n in WEIGHT_CONTAINERS]
    distinct = [n for i, n in enumerate(regs) if all(obj[n] is not obj[m] for m in regs[:i])]
    if len(distinct) > 1:
        raise _ambiguous(path, distinct, trail)
    ema_hit = next((n for n in present if n in EMA_CONTAINERS), None)
    note = _dropped_note(dropped)
    if _wants_ema(ema) and ema_hit:
        return obj[ema_hit], f"'{ema_hit}' (EMA)", True
    if regs:
        skipped = f" (EMA weights '{ema_hit}' ignored; ?ema=1 or --ema picks them)" if ema_hit else ""
        return obj[regs[0]], f"'{regs[0]}'{skipped}" + (f" ({note})" if note else ""), False
    if ema_hit:  # only EMA weights are present: use them rather than keys prefixed with the container's name
        return obj[ema_hit], f"'{ema_hit}' (EMA, the only weights present)", True
    training = [n for n, r in dropped.items() if r != "metadata" or n in METADATA_NAMES]
    if not training or any(torch.is_tensor(v) and v.dim() > 0 for v in obj.values()):
        return None  # a plain (perhaps nested) state dict: flattened as it is
    rest = [str(k) for k, v in obj.items() if roles.get(str(k)) is None and isinstance(v, Mapping)]
    if len(rest) > 1:
        raise _ambiguous(path, rest, trail)
    if len(rest) == 1:  # a training checkpoint whose one weights entry has a name of its own
        return obj[rest[0]], f"'{rest[0]}' (its only weights entry; {note})", False
    return None


def unwrap(obj: Any, path: str, ema: EmaChoice = "off", key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict inside a loaded pickle; returns it and a description of the chosen variant (what was
    left out included).

    ``ema``: "off" (regular weights), "prefer" (EMA where present) or "require" (an error when there are none). ``key``: the
    entry to take ('model_state', 'model/state_dict'), as ``PATH?key=`` names it. Raises CheckpointError when it
    holds no tensors, no EMA weights under "require", no entry ``key``, or weights under several entries."""
    if torch.is_tensor(obj) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict", path=path)
    chain: list[str] = []
    trail: list[str] = []
    if key:
        obj = _select(obj, key, path)
        chain.append(f"'{key}' (?key=)")
        trail.append(key.strip("/"))
    took_ema = False
    seen = {id(obj)}
    while not _all_tensors(obj):
        if len(chain) >= MAX_NESTING:
            raise CheckpointError(f"{path}: state dict wrapped more than {MAX_NESTING} levels deep; refused", path=path)
        before = obj
        down = _step(obj, path, ema, "/".join(trail))
        if down is None:
            break
        obj, how, ema_now = down
        took_ema = took_ema or ema_now
        chain.append(how)
        trail.append(next(str(k) for k, v in before.items() if v is obj))
        if id(obj) in seen:
            raise CheckpointError(f"{path}: container {chain[-1]} contains itself; refused", path=path)
        seen.add(id(obj))
    flat = _flatten(obj, path)
    if not flat:
        raise CheckpointError(f"{path}: holds no tensors", path=path)
    note = ""
    if not took_ema:
        flat, note = pick_prefixed(flat, path, ema)
    return flat, " / ".join(chain + ([note] if note else []))


def pick_prefixed(flat: dict, path: str, ema: EmaChoice) -> tuple[dict, str]:
    """Handle EMA copies stored beside the weights under a key prefix (e.g. 'ema.'): the ones ``ema`` asks for,
    and a note saying which were taken. Raises CheckpointError when "require" finds none."""
    prefix = next((p for p in EMA_PREFIXES if any(k.startswith(p) for k in flat)), None)
    if prefix is None:
        if ema == "require":
            raise CheckpointError(f"{path}: EMA weights were asked for (ema=1) but the file holds no EMA weights",
                                  path=path)
        return flat, ""
    if _wants_ema(ema):
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, f"EMA weights ('{prefix}*')"
    rest = {k: v for k, v in flat.items() if not k.startswith(prefix)}
    if not rest:
        return {k[len(prefix):]: v for k, v in flat.items()}, f"EMA weights ('{prefix}*', the only ones present)"
    return rest, f"non-EMA weights ('{prefix}*' ignored; ?ema=1 or --ema picks them)"
