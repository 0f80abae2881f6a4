"""Build the one nn.Module that evaluation copies every candidate's weights into.

Specs: ``timm:NAME`` (with num_classes / in_chans), ``open_clip:ARCH`` (image tower + linear head),
``pkg.module:factory`` (the user's own nn.Module; keyword arguments it accepts are passed through).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..io.sources import hub_call, split_query

__all__ = ["ZERO_SHOT_TEMPLATE", "ClipImageClassifier", "build_model"]


ZERO_SHOT_TEMPLATE = "a photo of a {}."


class ClipImageClassifier(nn.Module):
    """An open_clip model used as an image classifier: image tower → L2-normalised features → linear ``head``.

    Its state-dict keys are open_clip's own (``visual.*``, ``transformer.*``, ...) plus ``head.weight/bias``, so a
    plain CLIP checkpoint loads as is. When a checkpoint has no ``head.*`` (a fine-tuned or souped CLIP), the head is
    the zero-shot classifier built from that checkpoint's text tower: logit_scale · normalised text embeddings of
    ``ZERO_SHOT_TEMPLATE`` filled with each class name.
    """

    optional_prefixes = ("head.",)

    def __init__(self, clip: nn.Module, num_classes: int, class_names: list[str] | None = None,
                 tokenizer: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in clip.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in clip._non_persistent_buffers_set)
        self.__dict__["_clip"] = clip  # the same tensors, for encode_text; not registered twice
        self.head = nn.Linear(clip.visual.output_dim, num_classes)
        self.class_names = class_names
        self.__dict__["_tokenizer"] = tokenizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ``x``: the head on the L2-normalised image embedding."""
        return self.head(torch.nn.functional.normalize(self.visual(x), dim=-1))

    @torch.no_grad()
    def zero_shot_head(self) -> None:
        """Set ``head`` from the current text tower: the zero-shot classifier for ``class_names``.

        Raises:
            ConfigError: the number of class names differs from the number of classes.
        """
        names = self.class_names or [str(i) for i in range(self.head.out_features)]
        if len(names) != self.head.out_features:
            raise ConfigError(f"open_clip zero-shot head: {len(names)} class names for {self.head.out_features} classes")
        tokens = self._tokenizer([ZERO_SHOT_TEMPLATE.format(n) for n in names]).to(self.head.weight.device)
        text = torch.nn.functional.normalize(self._clip.encode_text(tokens).float(), dim=-1)
        scale = self._clip.logit_scale.exp().float() if hasattr(self._clip, "logit_scale") else torch.tensor(100.0)
        self.head.weight.copy_(scale * text)
        self.head.bias.zero_()

    def after_load(self, loaded: set[str]) -> None:
        """Called by the Evaluator after copying weights: no head in the checkpoint → the zero-shot head."""
        if "head.weight" not in loaded:
            self.zero_shot_head()


def _coerce(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def build_model(spec: str, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """Build a randomly initialised nn.Module from a model spec (weights are loaded separately).

    Raises:
        ConfigError: an unknown or malformed spec, a factory that cannot be imported or fails, a factory that returns no
            nn.Module, or an open_clip classifier without its number of classes.
    """
    base, opts = split_query(spec)
    kwargs = {k: _coerce(v) for k, v in opts.items()}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if base.startswith("timm:"):
        import timm
        name = base[len("timm:"):]
        try:
            with hub_call(f"--model {spec}"):  # an hf-hub:ORG/NAME name reads the repo's config.json
                model = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as e:
            raise ConfigError(f"--model {spec}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise ConfigError(f"--model {spec}: {e}") from None
    elif base.startswith("open_clip:"):
        import open_clip
        arch = base[len("open_clip:"):]
        classes = kwargs.pop("classes", None)
        names = [c.strip() for c in str(classes).split(",")] if classes else None
        try:
            with hub_call(f"--model {spec}"):  # an hf-hub:ORG/NAME architecture reads open_clip_config.json
                clip = open_clip.create_model(arch, pretrained=None, device="cpu")
        except RuntimeError as e:
            raise ConfigError(f"--model {spec}: {str(e).splitlines()[0]}") from None
        n = kwargs.get("num_classes") or (len(names) if names else None)
        if n is None:
            raise ConfigError(f"--model {spec}: open_clip image classifiers need --num-classes (or ?classes=a,b,...)")
        model = ClipImageClassifier(clip, int(n), names, open_clip.get_tokenizer(arch))
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
