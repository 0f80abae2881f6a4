"""``load_data``: one entry point from a spec string to TensorData (built-ins, tensor files, image sources)."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import torch

from ...errors import ConfigError
from .guards import check_labels, require_regular
from .tensors import BUILTINS, TensorData, apply_options, check_options, read_tensor_file

__all__ = ["load_data", "set_decoding"]

# process-wide defaults, set by the CLI's --workers/--skip-bad/--class-map
_decoding: dict = {"workers": None, "skip_bad": False, "class_map": None}


def set_decoding(*, workers: int | None = None, skip_bad: bool = False, class_map: str | None = None) -> None:
    """Defaults for ``load_data``'s ``workers`` and ``skip_bad`` in this process, and the class map of every
    dataset whose classes are not its model's outputs (reset by every CLI command)."""
    _decoding.update(workers=workers, skip_bad=bool(skip_bad), class_map=class_map)


def load_data(spec: str, *, model: torch.nn.Module | None = None, transform: Callable | None = None,
              device: str | torch.device = "cpu", workers: int | None = None, skip_bad: bool | None = None,
              decoder: str = "pil", progress: bool = True, map_labels: bool = True) -> TensorData:
    """Load a dataset spec into tensors on ``device``; images are decoded once (cached) into uint8.

    Specs: a built-in (``digits[:split]``, ``mnist1d[:split]``), a tensors file (``.pt``/``.npz`` with x, y), or an
    image source (a folder ``ROOT/CLASS/IMAGE``, a ``.tar`` of one, webdataset shards, ``hfds/NAME[:split]``,
    ``cifar10|cifar100[:split]?root=DIR``) decoded with ``model``'s eval transform by ``workers`` processes (default:
    every core; ``set_decoding`` changes the default) through the data cache (``WEIGHTSPACE_DATA_CACHE``); an
    unreadable image raises unless ``skip_bad``. Options after ``?``: ``size``, ``channels``,
    ``limit``, ``root`` (CIFAR), ``classes=FILE`` (label map), ``pool=max|mean``.
    ``transform`` (e.g. ``parse_transform('block-shuffle:4')``) is applied to x once, after decoding.
    ``map_labels=False`` keeps the dataset's own classes even when they are not ``model``'s outputs (a new task
    whose head is fitted to it): ``model`` then only chooses the decoding transform. Otherwise a dataset whose
    classes do not match ``model``'s outputs is mapped (``classes=FILE``, or class names the model knows) or
    refused (see ``labels.attach_label_map``).

    Raises:
        TypeError: ``spec`` is not a string (or a path).
        ConfigError: the spec names nothing readable, or an option is wrong.
        DataError: an image cannot be decoded (unless ``skip_bad``), or the class map does not fit.
    """
    from .readers import is_image_source
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"load_data: spec must be a data spec string (e.g. 'digits:val'), not {type(spec).__name__}")
    base, opts = (spec.split("?", 1)[0], dict(parse_qsl(spec.split("?", 1)[1]))) if "?" in spec else (spec, {})
    name, _, split = base.partition(":")
    check_options(opts, spec)  # before anything is read or decoded
    if name in BUILTINS and not os.path.exists(base):
        d = BUILTINS[name](split or ("all" if name == "digits" else "train"), spec)
    elif is_image_source(base):
        from .images import load_images
        d = load_images(spec, base, opts, model=model, decoder=decoder, device=device, progress=progress,
                        workers=_decoding["workers"] if workers is None else workers,
                        skip_bad=_decoding["skip_bad"] if skip_bad is None else skip_bad)
    else:
        path = Path(os.path.expanduser(base))
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"data={spec}: no such file or folder (built-ins: {', '.join(f'{b}[:split]' for b in BUILTINS)})", param="data")
        require_regular(path, "a tensors file")  # a FIFO would block the reader forever
        d = read_tensor_file(path, spec)
    if not d.multilabel:
        check_labels(d.y, d.num_classes, False, spec)
    d = apply_options(d, opts, spec)
    d.name = spec
    if map_labels and ("classes" in opts or model is not None):
        from .labels import attach_label_map
        d = attach_label_map(d, model, opts.get("classes"), opts.get("pool", "max"), spec,
                             fallback=_decoding["class_map"])
    if transform is not None:
        d = replace(d, x=transform(d.x).contiguous())
    return d.to(device)
