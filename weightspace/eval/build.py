"""What an evaluation needs, built from the option families (weightspace.options): one model instance and every
dataset decoded once, transformed and placed on the device.

Two ways to size the model: from the data (``build_evaluator``: soups, curves, leaderboards, merges, where the
checkpoints are many and the data names the classes) or from one checkpoint's shapes (``model_factory``: the
analyses, where a checkpoint is given and its classifier decides).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from ..errors import ConfigError
from ..io.checkpoint import Source
from ..options import DataOptions, ModelOptions
from .data import TensorData, load_data
from .distributed import set_parallel
from .evaluator import Evaluator, resolve_device
from .models import build_model
from .modules import build_model_for, infer_shape_options
from .transforms import parse_transform

__all__ = ["data_transform", "classes_in_folder", "build_evaluator", "load_datasets", "model_factory",
           "require_model"]


def data_transform(data: DataOptions | None) -> Callable | None:
    """The --transform of ``data`` as a callable applied to every dataset, or None.

    Raises:
        ConfigError: the spec is not a known transform.
    """
    return parse_transform(data.transform) if data is not None and data.transform else None


def classes_in_folder(spec: str) -> int | None:
    """The number of classes of an image-folder spec (one sub-folder each), or None when ``spec`` is not a folder.

    Decoding an image folder waits for the model's input transform, so its class count is read from the tree, by
    the rule the reader lists it with.

    Raises:
        ConfigError: the folder holds no images, loops, or lists a file twice.
    """
    folder = Path(spec.split("?", 1)[0]).expanduser()
    if not folder.is_dir() or spec.startswith("hfds/"):
        return None
    from .data.guards import list_image_folder
    return len(list_image_folder(folder)[2])  # the reader's own rule: sub-folders holding images


def require_model(model: ModelOptions) -> str:
    """The --model spec.

    Raises:
        ConfigError: none given.
    """
    if not model.model:
        raise ConfigError("model is required (timm:NAME, open_clip:ARCH or pkg.module:factory)", param="model")
    return model.model


def build_evaluator(model: ModelOptions, specs: Sequence[str], *, transform: Callable | None = None,
                    keep_logits: bool = False, checkpoint: Source | None = None) -> Evaluator:
    """One model instance and every dataset of ``specs``. The head is sized by --num-classes, else by
    ``checkpoint``'s classifier (the checkpoints evaluated), else by the first dataset; a dataset whose classes are
    not the head's outputs is mapped (``?classes=FILE``, --class-map FILE, or class names the model knows) or
    refused in one line, never scored against the head's first columns.

    Also sets the process-wide --parallel mode that the Evaluator and the sweeps read under torchrun.

    Raises:
        ConfigError: no --model, a spec given twice, or a bad model/data spec.
        DataError: a dataset's classes do not match the head and no map says how they do.
        SourceError, CheckpointError: ``checkpoint`` cannot be read.
    """
    spec = require_model(model)
    dup = sorted({s for s in specs if list(specs).count(s) > 1})
    if dup:
        raise ConfigError(f"data={dup[0]}: given more than once", param="data")
    set_parallel(model.parallel)
    dev = resolve_device(model.device)
    num_classes, first = model.num_classes, None
    if num_classes is None:
        num_classes = classes_in_folder(specs[0])
        if num_classes is None:
            first = load_data(specs[0], transform=transform)
            num_classes = first.num_classes
    net = build_model(spec, num_classes=num_classes, in_chans=model.in_chans)
    if checkpoint is not None and model.num_classes is None:
        # the head of the checkpoints evaluated decides (the data only sized a first guess)
        from ..io.sources import load
        inferred = infer_shape_options(net, load(checkpoint))
        if model.in_chans is not None:
            inferred.pop("in_chans", None)
        if inferred:
            net = build_model(spec, num_classes=inferred.get("num_classes", num_classes),
                              in_chans=inferred.get("in_chans", model.in_chans))
            first = None
    data = {s: first if (i == 0 and first is not None)
            else load_data(s, model=net, transform=transform) for i, s in enumerate(specs)}
    return Evaluator(net, data, batch_size=model.batch_size, device=dev, keep_logits=keep_logits)


def load_datasets(specs: Sequence[str], *, device: str, transform: Callable | None = None) -> list[TensorData]:
    """Each spec decoded once, transformed (after normalisation) and placed on ``device``.

    Raises:
        ConfigError: a spec names nothing readable or has a wrong option, or an unknown device.
        DataError: an image cannot be decoded, or a class map does not fit.
    """
    dev = resolve_device(device)
    return [load_data(s, transform=transform, device=dev) for s in specs]


def model_factory(model: ModelOptions, checkpoint: Source | None, data: Sequence[TensorData] = ()
                  ) -> Callable[[], nn.Module]:
    """A function building the model that fits ``checkpoint`` (num_classes/in_chans from it, else the data).

    Raises:
        ConfigError: no --model.
    """
    spec = require_model(model)
    set_parallel(model.parallel)
    num_classes = model.num_classes
    if num_classes is None and checkpoint is None and data:
        num_classes = data[0].num_classes  # with a checkpoint, its classifier's shape decides
    return lambda: build_model_for(spec, checkpoint, num_classes=num_classes, in_chans=model.in_chans)
