"""Build the one nn.Module that evaluation copies every candidate's weights into.

Specs: ``timm:NAME`` (with num_classes / in_chans), ``open_clip:ARCH`` (image tower + linear head),
``pkg.module:factory`` (the user's own nn.Module; keyword arguments it accepts are passed through).
"""
from __future__ import annotations

import importlib
import inspect
from urllib.parse import parse_qsl

import torch
from torch import nn

from .errors import ConfigError


class ClipImageClassifier(nn.Module):
    """open_clip image tower followed by a linear head (zero-shot weights or a trained probe go in ``head``)."""

    # Keys of a full CLIP checkpoint that the image classifier does not use.
    ignored_prefixes = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                        "logit_scale", "logit_bias", "text.", "attn_mask")

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int, normalize: bool = True):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, num_classes)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.visual(x)
        if self.normalize:
            f = torch.nn.functional.normalize(f, dim=-1)
        return self.head(f)


def _query(spec: str) -> tuple[str, dict[str, str]]:
    if "?" in spec:
        base, q = spec.split("?", 1)
        return base, dict(parse_qsl(q))
    return spec, {}


def _coerce(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def build_model(spec: str, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """Build a randomly initialised nn.Module from a model spec (weights are loaded separately)."""
    base, opts = _query(spec)
    kwargs = {k: _coerce(v) for k, v in opts.items()}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if base.startswith("timm:"):
        import timm
        name = base[len("timm:"):]
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as e:
            raise ConfigError(f"--model {spec}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise ConfigError(f"--model {spec}: {e}") from None
    elif base.startswith("open_clip:"):
        import open_clip
        arch = base[len("open_clip:"):]
        try:
            clip = open_clip.create_model(arch, pretrained=None, device="cpu")
        except RuntimeError as e:
            raise ConfigError(f"--model {spec}: {str(e).splitlines()[0]}") from None
        n = kwargs.get("num_classes")
        if n is None:
            raise ConfigError(f"--model {spec}: open_clip image classifiers need --num-classes")
        embed_dim = clip.visual.output_dim
        model = ClipImageClassifier(clip.visual, embed_dim, int(n))
    elif ":" in base:
        mod_name, _, attr = base.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except ImportError as e:
            raise ConfigError(f"--model {spec}: cannot import {mod_name} ({e})") from None
        except AttributeError:
            raise ConfigError(f"--model {spec}: {mod_name} has no '{attr}'") from None
        try:
            params = inspect.signature(factory).parameters
            accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
            model = factory(**{k: v for k, v in kwargs.items() if accepts_any or k in params})
        except TypeError as e:
            raise ConfigError(f"--model {spec}: {e}") from None
    else:
        raise ConfigError(f"--model {spec}: expected timm:NAME, open_clip:ARCH or pkg.module:factory")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def model_spec_classes(spec: str) -> str:
    """The family of a model spec: 'timm', 'open_clip' or 'custom' (used for Hub configs and cards)."""
    if spec.startswith("timm:"):
        return "timm"
    if spec.startswith("open_clip:"):
        return "open_clip"
    return "custom"
