"""Feature taps: activations at a set of modules, pooled to a fixed size, computed once per dataset and cached.

A tap is a module's output (``"layer1"``) or its input (``"fc:in"``). Layer specs:

* ``"all"``: every leaf module that runs in the forward pass, in execution order, minus pass-through modules
  (Identity, Dropout, DropPath, Flatten) and minus a final ``nn.Linear`` classifier, whose *input* (the
  pre-logits features) is tapped instead as the deepest layer (``"fc:in"``);
* ``"tree:layer|block|stage"``, ``"depth:N"``, ``"regex:P"``: the module grouping of :mod:`weightspace.eval.modules`;
  each group is tapped at the module whose output stands for it (e.g. ``depth:1`` → ``layer1, layer2, ...``);
* a comma-separated list of module names, each optionally with ``:in``.

Every activation is pooled inside the hook (so in-place ops that run later cannot change it, and only the
pooled features are ever kept) with Head2Toe's rule (:func:`pool_features`), and stored on the CPU as float32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..eval.data import TensorData
from ..errors import ConfigError

__all__ = ["PASS_THROUGH", "pool_features", "Tap", "Features", "resolve_taps", "data_fingerprint", "FeatureTaps"]

PASS_THROUGH = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
                "DropPath", "DropBlock2d", "Flatten", "Unflatten")


def pool_features(a: torch.Tensor, target: int, layout: str = "NCL") -> torch.Tensor:
    """Head2Toe pooling of a batch of activations to about ``target`` features per example → (N, D).

    4-D (N, C, H, W): global average pooling when C ≥ target, else average pooling with window = stride =
    H // s by W // s, where s = floor(sqrt(target // C)). 3-D signals (N, C, L) or token sequences (N, L, C)
    (``layout``) likewise in 1-D with s = target // C. 2-D (N, D) is kept when D ≤ target, else pooled in 1-D as
    one channel. More than 4 dims: the trailing dims are flattened into one 1-D signal.
    """
    a = a.detach()
    if not a.is_floating_point():
        a = a.float()
    n = a.shape[0]
    if a.ndim == 1:
        return a.reshape(n, 1)
    if a.ndim == 2:
        if a.shape[1] <= target:
            return a
        a = a.unsqueeze(1)  # one channel, a 1-D signal of length D
    elif a.ndim == 3 and layout == "NLC":
        a = a.transpose(1, 2)
    elif a.ndim > 4:
        a = a.flatten(2)
    c = a.shape[1]
    if a.ndim == 4:
        if c >= target:
            return a.mean(dim=(2, 3))
        s = math.isqrt(target // c)
        kh, kw = max(1, a.shape[2] // s), max(1, a.shape[3] // s)
        if kh > 1 or kw > 1:
            a = F.avg_pool2d(a, (kh, kw), stride=(kh, kw))
        return a.flatten(1)
    if c >= target:
        return a.mean(dim=2)
    k = max(1, a.shape[2] // (target // c))
    if k > 1:
        a = F.avg_pool1d(a, k, stride=k)
    return a.flatten(1)


@dataclass(frozen=True)
class Tap:
    """One tapped point: a module's output (kind "out") or its input (kind "in")."""

    module: str
    kind: str = "out"

    @property
    def name(self) -> str:
        """'layer1' for an output, 'fc:in' for an input."""
        return self.module if self.kind == "out" else f"{self.module}:in"

    @staticmethod
    def parse(text: str) -> "Tap":
        """'fc:in' → Tap('fc', 'in'); 'layer1' or 'layer1:out' → Tap('layer1')."""
        mod, sep, kind = text.strip().rpartition(":")
        if sep and kind in ("in", "out"):
            return Tap(mod, kind)
        return Tap(text.strip())


@dataclass
class Features:
    """Pooled features of one dataset: layer name → (N, D) float32 tensor, in depth order, plus the labels."""

    dataset: str
    layers: list[str]
    x: dict[str, torch.Tensor]
    y: torch.Tensor
    shapes: dict[str, list[int]] = field(default_factory=dict)  # activation shape per example, before pooling

    def dims(self) -> dict[str, int]:
        """Layer → number of pooled features."""
        return {k: int(self.x[k].shape[1]) for k in self.layers}


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((t for t in (_first_tensor(o) for o in obj) if t is not None), None)
    if isinstance(obj, dict):
        return next((t for t in (_first_tensor(o) for o in obj.values()) if t is not None), None)
    return None


def _trace(model: nn.Module, example: torch.Tensor) -> dict[str, dict]:
    """Run one forward pass and record, per module, when it starts and ends (one shared counter) and its output."""
    info: dict[str, dict] = {}
    counter = [0]
    handles = []

    def pre(name):
        def hook(mod, inp):
            rec = info.setdefault(name, {"calls": 0})
            rec["calls"] += 1
            if rec["calls"] == 1:
                rec["start"] = counter[0]
                counter[0] += 1
        return hook

    def post(name):
        def hook(mod, inp, out):
            rec = info[name]
            if "end" not in rec:
                rec["end"] = counter[0]
                counter[0] += 1
                t = _first_tensor(out)
                rec["out_float"] = t is not None and t.is_floating_point()
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post(name)))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return info


def _grouped_outputs(model: nn.Module, spec: str) -> list[str]:
    """Module paths whose outputs stand for the units of a grouping spec (tree:*, depth:N, regex:P)."""
    from ..eval.modules import model_units
    return [u.output for u in model_units(model, spec) if u.output]


def resolve_taps(model: nn.Module, layers: str | Sequence[str], example: torch.Tensor) -> list[Tap]:
    """Turn a layer spec into taps sorted by depth (the order the forward pass produces them).

    Raises:
        ConfigError: no layers given, a module the model lacks or that does not run in the forward pass, or a spec that
            selects nothing.
    """
    modules = dict(model.named_modules())
    info = _trace(model, example)
    ran = {n for n, r in info.items() if "end" in r}

    def order(t: Tap) -> int:
        return info[t.module]["start"] if t.kind == "in" else info[t.module]["end"]

    spec = layers if isinstance(layers, str) else ",".join(layers)
    spec = spec.strip()
    if spec == "all":
        leaves = [n for n in ran if not any(True for _ in modules[n].children()) and info[n].get("out_float")
                  and type(modules[n]).__name__ not in PASS_THROUGH]
        leaves.sort(key=lambda n: info[n]["end"])
        if not leaves:
            raise ConfigError(f"layers=all: {type(model).__name__} runs no leaf module with a float output", param="layers")
        taps = [Tap(n) for n in leaves]
        if isinstance(modules[leaves[-1]], nn.Linear):  # the classifier: tap the features it sees instead
            taps[-1] = Tap(leaves[-1], "in")
        return taps
    if spec.startswith(("depth:", "regex:", "tree")):
        names = [n for n in _grouped_outputs(model, spec) if n in ran]
        if not names:
            raise ConfigError(f"layers={spec}: groups no module that runs in the forward pass", param="layers")
        return sorted(dict.fromkeys(Tap(n) for n in names), key=order)
    taps = []
    for part in spec.split(","):
        if not part.strip():
            continue
        t = Tap.parse(part)
        if t.module not in modules or not t.module:
            close = [n for n in modules if n and t.module in n][:5]
            raise ConfigError(f"layers: {type(model).__name__} has no module '{t.module}'"
                              + (f" (did you mean {', '.join(close)}?)" if close else ""), param="layers")
        if t.module not in ran:
            raise ConfigError(f"layers: module '{t.module}' does not run in the forward pass", param="layers")
        if t not in taps:
            taps.append(t)
    if not taps:
        raise ConfigError("layers: no layers given (all, depth:N, regex:P or module names)", param="layers")
    return sorted(taps, key=order)


def data_fingerprint(data: TensorData) -> str:
    """sha256 of a dataset's name, shapes and bytes (what a feature cache is keyed by)."""
    from ..io.formats import tensor_bytes
    h = hashlib.sha256()
    h.update(f"{data.name}|{tuple(data.x.shape)}|{data.x.dtype}|{tuple(data.y.shape)}|".encode())
    h.update(tensor_bytes(data.x))
    h.update(tensor_bytes(data.y))
    return h.hexdigest()


class FeatureTaps:
    """``taps(data) -> Features``: one forward pass per dataset and weights, cached in memory and optionally on disk."""

    def __init__(self, model: nn.Module, layers: str | Sequence[str] = "all", *, target: int = 8192,
                 device: str | torch.device = "auto", batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
                 layout: str | None = None, progress: bool = False) -> None:
        """Taps on ``model`` (moved to ``device``) at the ``layers`` spec, pooled to ≤ ``target`` features each.

        Raises:
            ConfigError: ``target`` below 1, or an unknown device.
        """
        from ..eval.evaluator import resolve_device
        if target < 1:
            raise ConfigError(f"target={target}: needs a positive number of features", param="target")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.layers = layers
        self.target = int(target)
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.layout = layout
        self.progress = progress
        self.taps: list[Tap] | None = None
        self.forward_passes = 0  # full passes of the backbone over a dataset (the cache avoids repeats)
        self._memory: dict[str, Features] = {}

    def resolve(self, data: TensorData) -> list[Tap]:
        """The taps for this model (resolved once, on the first example of ``data``).

        Raises:
            ConfigError: ``data`` has no examples, or the layer spec resolves to nothing.
        """
        if self.taps is None:
            if len(data) == 0:
                raise ConfigError(f"{data.name}: no examples")
            self.model.eval()
            self.taps = resolve_taps(self.model, self.layers, data.prepare(data.x[:1].to(self.device)))
        return self.taps

    def weights_id(self) -> str:
        """sha256 of the model's current weights (the in-memory cache must not survive an in-place weight swap)."""
        from ..io.sources import load
        return load(self.model).sha256()

    def _layout(self, data: TensorData) -> str:
        # 3-D activations are (N, C, L) in a network fed 1-D signals (N, C, L), else token sequences (N, L, C)
        return self.layout or ("NCL" if data.x.ndim == 3 else "NLC")

    def cache_key(self, data: TensorData, weights_id: str) -> str:
        """What the features depend on: weights, data, taps, pooling."""
        taps = self.resolve(data)
        desc = {"weights": weights_id, "data": data_fingerprint(data), "taps": [t.name for t in taps],
                "target": self.target, "layout": self._layout(data), "model": type(self.model).__qualname__}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def __call__(self, data: TensorData, weights_id: str | None = None) -> Features:
        """Features of ``data`` under the model's current weights (``weights_id``: e.g. the checkpoint's sha256).

        Raises:
            ConfigError: multi-label data, no examples, or a layer spec that resolves to nothing.
        """
        if data.multilabel:
            raise ConfigError(f"{data.name}: probes need single-label data (class indices), not multi-label targets")
        key = self.cache_key(data, weights_id or self.weights_id())
        if key in self._memory:
            return self._memory[key]
        feats = self._read_disk(key, data.name)
        if feats is None:
            feats = self._extract(data)
            self._write_disk(key, feats)
        self._memory[key] = feats
        return feats

    def _extract(self, data: TensorData) -> Features:
        taps = self.resolve(data)
        layout = self._layout(data)
        modules = dict(self.model.named_modules())
        chunks: dict[str, list[torch.Tensor]] = {t.name: [] for t in taps}
        shapes: dict[str, list[int]] = {}
        done: set[str] = set()

        def grab(tap: Tap, value: Any) -> None:
            if tap.name in done:  # a module called twice per forward: its first call is the tap
                return
            done.add(tap.name)
            t = _first_tensor(value)
            if t is None:
                what = "input" if tap.kind == "in" else "output"
                raise ConfigError(f"layers: module '{tap.module}' gives no tensor {what}", param="layers")
            shapes.setdefault(tap.name, list(t.shape[1:]))
            f = pool_features(t.float(), self.target, layout).float().cpu()
            if f.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                f = f.clone()  # kept unpooled on the CPU: a later in-place op (ReLU(inplace=True)) would change it
            chunks[tap.name].append(f)

        handles = []
        for tap in taps:
            mod = modules[tap.module]
            if tap.kind == "in":  # a pre-hook: an in-place module would overwrite its input before a post-hook
                handles.append(mod.register_forward_pre_hook(lambda m, inp, tap=tap: grab(tap, inp)))
            else:
                handles.append(mod.register_forward_hook(lambda m, inp, out, tap=tap: grab(tap, out)))
        amp = self.device.type == "cuda"
        batches = data.batches(self.batch_size)
        if self.progress:
            from ..progress import progress as _progress_bar
            batches = _progress_bar(batches, total=math.ceil(len(data) / self.batch_size), desc=f"features {data.name}",
                                    unit="batch")
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                for xb, _ in batches:
                    done.clear()
                    self.model(xb.to(self.device, non_blocking=True))
        finally:
            for h in handles:
                h.remove()
        self.forward_passes += 1
        x = {t.name: torch.cat(chunks[t.name]) for t in taps}
        return Features(data.name, [t.name for t in taps], x, data.y.detach().cpu().long(), shapes)

    def _path(self, key: str) -> Path | None:
        return self.cache_dir / f"features-{key[:32]}.safetensors" if self.cache_dir else None

    def _read_disk(self, key: str, name: str) -> Features | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["weightspace_features"])
                if meta["key"] != key:
                    return None
                x = {k: f.get_tensor(f"x/{k}") for k in meta["layers"]}
                y = f.get_tensor("y")
        except Exception:  # a damaged cache file is recomputed, never trusted
            return None
        return Features(name, meta["layers"], x, y, {k: list(v) for k, v in meta["shapes"].items()})

    def _write_disk(self, key: str, feats: Features) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save

        from ..files import atomic_output, make_folder
        make_folder(path.parent)
        tensors = {f"x/{k}": v.contiguous() for k, v in feats.x.items()}
        tensors["y"] = feats.y.contiguous()
        meta = {"key": key, "layers": feats.layers, "shapes": feats.shapes}
        with atomic_output(path, force=True) as tmp:
            # bytes, not save_file: safetensors' save_file writes a sibling temp file and renames it, which the
            # unnamed temp file of atomic_output has no folder for
            tmp.write_bytes(save(tensors, metadata={"weightspace_features": json.dumps(meta)}))
