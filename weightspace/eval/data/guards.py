"""Bounds on what an input may make the data readers do: regular files only, image-folder walks that never loop
or count a file twice, size caps on archive members, a pixel cap on every decode, labels inside the class range,
and options validated before they are used.

The caps are module constants; a caller that needs more sets them before loading (decoding workers are forked, so
they inherit the value).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ...errors import ConfigError, DataError

__all__ = ["MAX_IMAGE_PIXELS", "MAX_MEMBER_BYTES", "MAX_LABEL_BYTES", "MAX_TEXT_BYTES", "MAX_SIZE", "MAX_CHANNELS",
           "require_regular", "read_small_text", "check_member", "open_capped_image", "check_pixels",
           "list_image_folder", "check_labels", "int_option", "MAX_CLASSES", "class_count"]

# PIL's own default decompression-bomb threshold (it only warns below twice that): ~89.5 M pixels, 268 MB as RGB.
MAX_IMAGE_PIXELS = 89_478_485
MAX_MEMBER_BYTES = 256 << 20    # an image member of a tar or webdataset shard
MAX_LABEL_BYTES = 1 << 10       # a webdataset .cls member: an integer and a newline
MAX_TEXT_BYTES = 64 << 20       # classnames.txt, a ?classes= map
MAX_SIZE = 4096                 # ?size=N resamples to N×N
MAX_CHANNELS = 16               # ?channels=N repeats grey channels
MAX_CLASSES = 100_000           # classes implied by the largest label (ImageNet-21k has 21,841)


def require_regular(path: str | os.PathLike, what: str) -> os.stat_result:
    """The stat of ``path`` (links followed) when it is a regular file; a FIFO, device or socket is refused at once,
    before anything opens it (opening a FIFO blocks until a writer appears).

    Raises:
        ConfigError: ``path`` is missing, a broken link, or not a regular file (named with ``what``).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        kind = "a broken link" if os.path.islink(path) else "no such file"
        raise ConfigError(f"{path}: {kind} ({what})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({what}: {e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise ConfigError(f"{path}: {kind}, not a regular file ({what} must be a regular file)")
    return st


def read_small_text(path: str | os.PathLike, what: str, limit: int | None = None) -> str:
    """A small text file (a class list, a class map) read whole after checking it is a regular file under ``limit``.

    Raises:
        ConfigError: not a regular file, or larger than ``limit`` (default MAX_TEXT_BYTES).
        DataError: it cannot be read or is not UTF-8.
    """
    limit = MAX_TEXT_BYTES if limit is None else limit
    st = require_regular(path, what)
    if st.st_size > limit:
        raise ConfigError(f"{path}: {st.st_size} bytes, over the {limit}-byte cap of {what}")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})", path=str(path)) from None


def check_member(where: str, size: int, limit: int | None = None) -> None:
    """Refuse an archive member whose declared size is over the cap (checked before any of it is read).

    Raises:
        ConfigError: ``size`` exceeds ``limit`` (default MAX_MEMBER_BYTES).
    """
    limit = MAX_MEMBER_BYTES if limit is None else limit
    if size > limit:
        raise ConfigError(f"{where}: a {size}-byte member, over the {limit}-byte cap per member")


def check_pixels(width: int, height: int, where: str) -> None:
    """Refuse an image whose header declares more than MAX_IMAGE_PIXELS pixels, before it is decoded.

    Raises:
        ValueError: over the cap (a decoding worker reports it as that image's failure, naming the file).
    """
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}×{height} pixels, over the cap of {MAX_IMAGE_PIXELS} pixels per image")


def open_capped_image(fileobj: BinaryIO | Any, where: str = "") -> Any:
    """An RGB PIL image from ``fileobj``, its size read from the header and checked before any pixel is decoded.

    Raises:
        ValueError: over the pixel cap. OSError and PIL's errors: an unreadable image.
    """
    import warnings

    from PIL import Image
    with warnings.catch_warnings():  # PIL's bomb warning: the cap below is the check that decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fileobj)  # lazy: reads the header only
    check_pixels(*img.size, where)
    return img.convert("RGB")  # torchvision's pil_loader: every image as RGB (grey and CMYK JPEGs included)


def _dir_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_class(top: str, root_id: tuple[int, int], seen_dirs: dict, seen_files: dict, exts: set[str]
                ) -> list[str]:
    """Every image under one class folder (links followed, each folder once: a cycle or a second way into a folder
    is refused, so the walk always ends and never counts a file twice)."""
    out: list[str] = []
    stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [(top, (root_id,))]
    while stack:
        folder, ancestors = stack.pop()
        fid = _dir_id(folder)
        if fid in ancestors:
            raise ConfigError(f"{folder}: a symlink cycle (it leads back to {seen_dirs.get(fid, 'the data root')})")
        if fid in seen_dirs:
            raise ConfigError(f"{folder}: the same folder as {seen_dirs[fid]} (a link): each image must be listed once")
        seen_dirs[fid] = folder
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ConfigError(f"{folder}: cannot list it ({e.strerror})") from None
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                stack.append((path, ancestors + (fid,)))
            elif os.path.splitext(name)[1].lower() in exts:
                st = require_regular(path, "an image")
                key = (st.st_dev, st.st_ino)
                if key in seen_files:
                    raise ConfigError(f"{path}: the same file as {seen_files[key]} (a link): each image must be "
                                      "listed once")
                seen_files[key] = path
                out.append(path)
    return out


def list_image_folder(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """An image folder ``ROOT/CLASS/...IMAGE``: the image paths, their class indices and the class names.

    Classes are the sub-folders of ``root`` that hold images, in timm's natural order; an image in a nested folder
    belongs to its top-level class folder (torchvision's ImageFolder rule); images are in timm's natural order of
    their paths, with timm's image extensions.

    Raises:
        ConfigError: an image directly in ``root``, a symlink cycle, a folder or file reached twice, an image that
            is not a regular file (FIFO, device, socket, broken link), or no images at all.
    """
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.utils.misc import natural_key
    exts = set(get_img_extensions(as_set=True))
    base = str(root)
    root_id = _dir_id(base)
    seen_dirs: dict = {root_id: base}
    seen_files: dict = {}
    per_class: dict[str, list[str]] = {}
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if os.path.isdir(path):
            found = _walk_class(path, root_id, seen_dirs, seen_files, exts)
            if found:
                per_class[name] = found
        elif os.path.splitext(name)[1].lower() in exts:
            raise ConfigError(f"{path}: an image outside a class folder (expected ROOT/CLASS/IMAGE)")
    if not per_class:
        raise ConfigError(f"{root}: no images found (expected ROOT/CLASS/IMAGE files)")
    classes = sorted(per_class, key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    samples = sorted(((p, index[c]) for c, ps in per_class.items() for p in ps), key=lambda s: natural_key(s[0]))
    return [p for p, _ in samples], np.asarray([t for _, t in samples], dtype=np.int64), classes


def check_labels(y: torch.Tensor, num_classes: int | None, multilabel: bool, spec: str) -> None:
    """Labels must be integers inside the class range (0/1 for multi-label targets).

    Raises:
        DataError: a label outside ``[0, num_classes)`` or not an integer, naming the first such example.
    """
    if len(y) == 0:
        return
    if multilabel:
        bad = ~((y == 0) | (y == 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DataError(f"data={spec}: multi-label targets must be 0 or 1 (example {i} holds "
                            f"{float(y[bad][0])})", path=spec, param="data")
        return
    if y.is_floating_point() and not bool((y == y.round()).all()):
        i = int((y != y.round()).nonzero()[0, 0])
        raise DataError(f"data={spec}: label {float(y[i])} of example {i} is not a class index", path=spec, param="data")
    hi = num_classes if num_classes is not None else int(y.max()) + 1
    bad = (y < 0) | (y >= hi)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        i = int(idx[0])
        raise DataError(f"data={spec}: label {int(y[i])} of example {i} lies outside the class range 0..{hi - 1} "
                        f"({len(idx)} example(s))", path=spec, param="data")


def class_count(max_label: int, where: str) -> int:
    """The number of classes that labels up to ``max_label`` imply (a label names its class by index), at most
    MAX_CLASSES: one label of 10**9 in a small file would otherwise make a billion classes.

    Raises:
        ConfigError: ``max_label`` is MAX_CLASSES or more."""
    if max_label >= MAX_CLASSES:
        raise ConfigError(f"{where}: label {max_label} implies {max_label + 1:,} classes, more than the {MAX_CLASSES:,} "
                          f"weightspace accepts (labels are class indices from 0)")
    return max_label + 1


def int_option(opts: dict[str, str], key: str, spec: str, *, lo: int = 1, hi: int | None = None) -> int | None:
    """The integer option ``key`` of a data spec, checked to lie in ``[lo, hi]``; None when absent.

    Raises:
        ConfigError: not an integer, or outside the range (``?limit=0``, ``?size=-3``).
    """
    if key not in opts:
        return None
    text = str(opts[key]).strip()
    try:
        v = int(text)
    except ValueError:
        raise ConfigError(f"data={spec}: {key}={opts[key]} is not an integer", param="data") from None
    if v < lo or (hi is not None and v > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"data={spec}: {key}={v} must be {rng}", param="data")
    return v
