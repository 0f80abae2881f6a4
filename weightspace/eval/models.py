"""Build the one nn.Module that evaluation copies every candidate's weights into.

Specs: ``timm:NAME`` (with num_classes / in_chans), ``open_clip:ARCH`` (image tower + linear head),
``pkg.module:factory`` (the user's own nn.Module; keyword arguments it accepts are passed through), or a callable.

Nothing from data is code: a spec read from a file (a recipe, a provenance) resolves only through a closed list
(the built-in zoo, ``timm:``, ``open_clip:``, ``torchvision.models:``); an arbitrary ``pkg.module:factory`` is
imported only when the user typed it (``origin=None``) or opted in (``trust=True``, ``--trust-model-code``).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Union

import torch
from torch import nn

from ..errors import ConfigError, library_message
from ..io.hub_sources import hub_call
from ..io.source_options import split_query

__all__ = ["ZERO_SHOT_TEMPLATE", "ClipImageClassifier", "build_model", "check_model_spec", "CLOSED_MODEL_SPECS",
           "ModelSpec"]

ModelSpec = Union[str, Callable[..., nn.Module]]
ZOO_MODULE = "weightspace.eval.zoo"
# What a spec from a file may name without the user's word: libraries' registries of architectures, never a module.
CLOSED_MODEL_SPECS = (f"{ZOO_MODULE}:FACTORY", "timm:NAME", "open_clip:ARCH", "torchvision.models:NAME")


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


def _closed_factory(base: str) -> bool:
    """Whether ``pkg.module:attr`` names a factory of the closed list, decided without importing ``pkg.module``
    unless it is the zoo or torchvision (libraries already in the closed list)."""
    mod_name, _, attr = base.partition(":")
    if mod_name == ZOO_MODULE:
        import weightspace.eval.zoo as zoo
        return attr in zoo.__all__ and callable(getattr(zoo, attr))
    if mod_name == "torchvision.models":
        # torchvision's own registry of architectures: names such as 'os' or '_api' that the module happens to
        # hold are not on it
        import torchvision.models
        return attr in torchvision.models.list_models(module=torchvision.models)
    return False


def check_model_spec(spec: ModelSpec, *, origin: str | None = None, trust: bool = False) -> None:
    """Refuse, before anything is imported or called, a model spec that came from a file and names arbitrary code.

    ``origin`` says where the spec was read (a recipe file and key, a provenance); None means the user typed it
    (command line, Python code), which may name any ``pkg.module:factory``. ``trust`` is the user's opt-in for a
    file's arbitrary factories (``--trust-model-code``).

    Raises:
        ConfigError: ``spec`` is neither a string nor a callable, or it came from ``origin`` without ``trust`` and is
            not on the closed list (the message names the origin, the spec and the opt-in).
        TypeError: ``origin`` is not a string or None.
    """
    if origin is not None and not isinstance(origin, str):
        raise TypeError(f"check_model_spec: origin must be a string or None, not {type(origin).__name__}")
    if callable(spec) and not isinstance(spec, str):
        return
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{origin or '--model'}: a model spec is a non-empty string (timm:NAME, open_clip:ARCH or "
                          f"pkg.module:factory), not {type(spec).__name__} {spec!r}")
    if origin is None or trust:
        return
    base = spec.split("?", 1)[0]
    if base.startswith(("timm:", "open_clip:")) or (":" in base and _closed_factory(base)):
        return
    raise ConfigError(f"{origin}: model '{spec}' would import and run code named by a file; a file may name only "
                      f"{', '.join(CLOSED_MODEL_SPECS)} (if you trust this file, pass --trust-model-code, or "
                      "trust=True in Python)")


def build_model(spec: ModelSpec, *, num_classes: int | None = None, in_chans: int | None = None,
                origin: str | None = None, trust: bool = False) -> nn.Module:
    """Build a randomly initialised nn.Module from a model spec or a factory callable (weights are loaded separately).

    ``origin``/``trust``: where a spec read from a file came from, and whether the user trusts that file's code
    (see :func:`check_model_spec`); the check runs before anything is imported.

    Raises:
        ConfigError: an unknown or malformed spec, a spec from a file naming code off the closed list, a factory that
            cannot be imported or fails, a factory that returns no nn.Module, or an open_clip classifier without its
            number of classes.
    """
    check_model_spec(spec, origin=origin, trust=trust)
    if not isinstance(spec, str):
        return _checked(_call_factory(spec, {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans))
                                             if v is not None}, getattr(spec, "__name__", repr(spec))), repr(spec))
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
            raise ConfigError(f"model={spec}: {library_message(e)}", param="model") from None
        except TypeError as e:
            raise ConfigError(f"model={spec}: {e}", param="model") from None
    elif base.startswith("open_clip:"):
        import open_clip
        arch = base[len("open_clip:"):]
        classes = kwargs.pop("classes", None)
        names = [c.strip() for c in str(classes).split(",")] if classes else None
        try:
            with hub_call(f"--model {spec}"):  # an hf-hub:ORG/NAME architecture reads open_clip_config.json
                clip = open_clip.create_model(arch, pretrained=None, device="cpu")
        except RuntimeError as e:
            raise ConfigError(f"model={spec}: {library_message(e)}", param="model") from None
        n = kwargs.get("num_classes") or (len(names) if names else None)
        if n is None:
            raise ConfigError(f"model={spec}: open_clip image classifiers need --num-classes (or ?classes=a,b,...)", param="model")
        model = ClipImageClassifier(clip, int(n), names, open_clip.get_tokenizer(arch))
    elif ":" in base:
        mod_name, _, attr = base.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except ImportError as e:
            raise ConfigError(f"model={spec}: cannot import {mod_name} ({e})", param="model") from None
        except AttributeError:
            raise ConfigError(f"model={spec}: {mod_name} has no '{attr}'", param="model") from None
        model = _call_factory(factory, kwargs, spec)
    else:
        raise ConfigError(f"model={spec}: expected timm:NAME, open_clip:ARCH or pkg.module:factory", param="model")
    return _checked(model, spec)


def _call_factory(factory: Callable, kwargs: dict, spec: str) -> nn.Module:
    """``factory`` called with the keyword arguments it accepts; whatever it raises becomes one line naming it."""
    try:
        params = inspect.signature(factory).parameters
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: pass everything
        params, accepts_any = {}, True
    try:
        return factory(**{k: v for k, v in kwargs.items() if accepts_any or k in params})
    except Exception as e:  # the user's code: its error is their one line, not our traceback
        raise ConfigError(f"model={spec}: the factory raised {type(e).__name__}: {library_message(e)}",
                          param="model") from None


def _checked(model: object, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={spec}: the factory returned a {type(model).__name__}, not an nn.Module", param="model")
    return model.eval()
