"""Image sources read through the ecosystem's own readers: what images there are, their labels, and their identity.

Each source lists its examples once in the main process (``len``, ``targets``, ``classes``), says what its bytes
depend on (:meth:`ImageSource.identity`, the data cache's key) and opens example ``i`` as a PIL image in any worker
process (:meth:`ImageSource.open`), so decoding can be split across processes by index.

- an image folder, ``ROOT/CLASS/*.jpg`` — timm's ``ReaderImageFolder`` (classes in timm's natural order);
- a tar archive of such a folder, ``images.tar`` — timm's ``ReaderImageTar``;
- webdataset shards, ``shards.tar`` or ``shard-{000..009}.tar`` with ``KEY.jpg`` + ``KEY.cls`` members (the layout of
  the ``*-wds`` sets on the Hub; a ``classnames.txt`` beside them names the classes) — samples grouped by
  webdataset's own key rule;
- Hugging Face ``datasets``: ``hfds/NAME[:split]`` — a folder written by ``save_to_disk`` or a dataset in the local
  HF cache (``datasets.load_dataset``), with an image column and a ``ClassLabel`` (or integer ``label``) column;
- torchvision's CIFAR-10/100 from a local root: ``cifar10[:test|train]?root=DIR``.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from .guards import (MAX_LABEL_BYTES, check_member, class_count, list_image_folder, open_capped_image, read_small_text,
                     require_regular)

__all__ = ["ImageSource", "FolderSource", "TarSource", "WebDatasetSource", "HFDatasetSource", "CifarSource",
           "open_source", "is_image_source", "require_extra"]


def _timm_samples(reader: Any) -> tuple[list, np.ndarray, list[str]]:
    """What a timm reader listed: each sample (a path or a tar member), the targets, the class names by index."""
    items = [s[0] for s in reader.samples]
    targets = np.asarray([s[1] for s in reader.samples], dtype=np.int64)
    return items, targets, [c for c, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])]


def require_extra(module: str, what: str) -> Any:
    """Import an optional dependency of the ``data`` extra, or raise one line naming the extra.

    Raises:
        ConfigError: the package is not installed.
    """
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the '{module}' package: pip install 'weightspace[data]'") from None


def _stat(path: str | os.PathLike) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _pil_rgb(fileobj) -> Any:
    return open_capped_image(fileobj)  # RGB, as torchvision's pil_loader; the header's size checked first


class ImageSource:
    """Examples 0..N-1 with integer ``targets``, class names ``classes`` and a ``spec`` for messages."""

    spec: str
    classes: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def identity(self) -> dict:
        """What the examples' bytes depend on (paths, sizes, mtimes; or a dataset fingerprint).

        Raises:
            NotImplementedError: a subclass does not define it.
        """
        raise NotImplementedError

    def name_of(self, i: int) -> str:
        """The file (or row) example ``i`` comes from, for error messages.

        Raises:
            NotImplementedError: a subclass does not define it.
        """
        raise NotImplementedError

    def open(self, i: int) -> Any:
        """Example ``i`` as an RGB PIL image (called in worker processes).

        Raises:
            NotImplementedError: a subclass does not define it.
        """
        raise NotImplementedError

    def raw_bytes(self, i: int) -> bytes | None:
        """The encoded bytes of example ``i`` when it is a file (GPU decoding), else None."""
        return None

    def content_files(self) -> list[str]:
        """The files whose bytes the examples come from (``WEIGHTSPACE_DATA_VERIFY=content`` digests them)."""
        ident = self.identity()
        return [str(f[0]) for f in ident.get("files", [])] or [str(ident["path"])]


class FolderSource(ImageSource):
    """``ROOT/CLASS/IMAGE``, in timm's ``ReaderImageFolder`` order; an image in a nested folder belongs to its
    top-level class folder. The walk follows links but never loops or lists a file twice (guards.list_image_folder).
    """

    def __init__(self, root: Path, spec: str) -> None:
        """The images under ``root`` (``spec``: the data spec, for messages).

        Raises:
            ConfigError: ``root`` holds no images, an image outside a class folder, a symlink cycle, a file or
                folder reached twice, or an image that is not a regular file.
        """
        self.spec, self.root = spec, root
        self.paths, self.targets, self.classes = list_image_folder(root)

    def content_files(self) -> list[str]:
        return list(self.paths)

    def identity(self) -> dict:
        rel = [os.path.relpath(p, self.root) for p in self.paths]
        return {"kind": "folder", "root": str(self.root.resolve()),
                "files": [[r, *_stat(p)] for r, p in zip(rel, self.paths)]}

    def name_of(self, i: int) -> str:
        return self.paths[i]

    def open(self, i: int) -> Any:
        with open(self.paths[i], "rb") as f:
            return _pil_rgb(f)

    def raw_bytes(self, i: int) -> bytes | None:
        with open(self.paths[i], "rb") as f:
            return f.read()


class _TarMembers(ImageSource):
    """Examples that are members of tar files (opened lazily, once per process: tar handles do not survive fork)."""

    def __init__(self):
        self._open: dict[str, tuple[int, tarfile.TarFile]] = {}

    def _member(self, i: int) -> tuple[str, tarfile.TarInfo]:
        raise NotImplementedError

    def raw_bytes(self, i: int) -> bytes | None:
        path, info = self._member(i)
        pid = os.getpid()
        held = self._open.get(path)
        if held is None or held[0] != pid:
            held = (pid, tarfile.open(path))
            self._open[path] = held
        f = held[1].extractfile(info)
        if f is None:
            raise OSError(f"{info.name}: not a regular file")
        return f.read(info.size)

    def open(self, i: int) -> Any:
        return _pil_rgb(io.BytesIO(self.raw_bytes(i)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}


class TarSource(_TarMembers):
    """A tar archive of an image folder (``CLASS/IMAGE`` members), listed by timm's ``ReaderImageTar``."""

    def __init__(self, path: Path, spec: str) -> None:
        """The images in the tar archive at ``path`` (``spec``: the data spec, for messages).

        Raises:
            ConfigError: ``path`` is not a readable tar archive or holds no images.
        """
        super().__init__()
        from timm.data.readers.reader_image_tar import ReaderImageTar
        self.spec, self.path = spec, path
        require_regular(path, "a tar archive")
        try:
            reader = ReaderImageTar(str(path))
        except (tarfile.TarError, OSError) as e:
            raise ConfigError(f"{path}: not a readable tar archive ({e})") from None
        if len(reader) == 0:
            raise ConfigError(f"{path}: no images found (expected CLASS/IMAGE members)")
        self.members, self.targets, self.classes = _timm_samples(reader)
        for info in self.members:  # declared sizes, checked before any member is read
            check_member(f"{path}:{info.name}", info.size)

    def _member(self, i: int) -> tuple[str, tarfile.TarInfo]:
        return str(self.path), self.members[i]

    def identity(self) -> dict:
        return {"kind": "tar", "path": str(self.path.resolve()), "stat": _stat(self.path)}

    def name_of(self, i: int) -> str:
        return f"{self.path}:{self.members[i].name}"


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def is_webdataset(path: Path) -> bool:
    """A tar whose first members are ``KEY.EXT`` samples with a ``cls`` member (not ``CLASS/IMAGE`` folders)."""
    try:
        with tarfile.open(path) as tf:
            for _, info in zip(range(16), tf):
                if info.isfile() and info.name.rsplit(".", 1)[-1] in ("cls", "cls.txt", "txt"):
                    return True
    except (tarfile.TarError, OSError):
        return False
    return False


def expand_shards(pattern: str) -> list[Path]:
    """``shard-{000..009}.tar`` → the shard paths (webdataset's brace expansion)."""
    if "{" not in pattern:
        return [Path(pattern)]
    braceexpand = require_extra("braceexpand", f"--data {pattern}")
    return [Path(p) for p in braceexpand.braceexpand(pattern)]


class WebDatasetSource(_TarMembers):
    """webdataset shards: one sample per key, an image member (jpg, png, ...) and an integer ``cls`` member."""

    def __init__(self, shards: list[Path], spec: str) -> None:
        """The samples of webdataset ``shards`` (``spec``: the data spec, for messages).

        Raises:
            ConfigError: the webdataset package is missing, a missing or unreadable shard, a cls member that is not
                an integer, no sample with an image and a cls member, or class names that do not cover the classes
                used.
        """
        super().__init__()
        wds_tar = require_extra("webdataset.tariterators", f"--data {spec}")
        self.spec, self.shards = spec, shards
        members: list[tuple[str, tarfile.TarInfo]] = []
        targets: list[int] = []
        for shard in shards:
            require_regular(shard, "a webdataset shard")
            samples: dict[str, dict[str, Any]] = {}
            order: list[str] = []
            try:
                with tarfile.open(shard) as tf:
                    for info in tf:
                        if not info.isfile():
                            continue
                        split = wds_tar.base_plus_ext(info.name)  # webdataset's own KEY.EXT rule
                        if split is None or split[0] is None:
                            continue
                        key, ext = split
                        if key not in samples:
                            samples[key] = {}
                            order.append(key)
                        if ext.lower() in ("cls", "cls.txt"):
                            check_member(f"{shard}:{info.name}", info.size, MAX_LABEL_BYTES)
                            samples[key]["cls"] = tf.extractfile(info).read(info.size)
                        elif ext.lower() in IMAGE_EXTS:
                            check_member(f"{shard}:{info.name}", info.size)
                            samples[key]["img"] = info
            except tarfile.TarError as e:
                raise ConfigError(f"{shard}: not a readable tar archive ({e})") from None
            for key in order:
                s = samples[key]
                if "img" not in s or "cls" not in s:
                    continue
                try:
                    label = int(s["cls"].decode().strip())
                except (ValueError, UnicodeDecodeError):
                    raise ConfigError(f"{shard}: sample {key} has a cls member that is not an integer") from None
                if not -(1 << 31) <= label < (1 << 31):  # beyond int64 it would overflow; no class count is that large
                    raise ConfigError(f"{shard}: sample {key} has a cls member out of range ({label})")
                targets.append(label)
                members.append((str(shard), s["img"]))
        if not members:
            raise ConfigError(f"data={spec}: no samples with an image and a cls member in {len(shards)} shard(s)", param="data")
        self.members = members
        self.targets = np.asarray(targets, dtype=np.int64)
        names = shards[0].parent / "classnames.txt"
        n = class_count(int(self.targets.max()), f"data={spec}")
        if names.exists():
            text = read_small_text(names, "a class list")
            self.classes = [line.strip() for line in text.splitlines() if line.strip()]
            if len(self.classes) < n:
                raise ConfigError(f"{names}: {len(self.classes)} class names, but the shards use class {n - 1}")
        else:
            self.classes = [str(i) for i in range(n)]

    def _member(self, i: int) -> tuple[str, tarfile.TarInfo]:
        return self.members[i]

    def content_files(self) -> list[str]:
        return [str(s) for s in self.shards]

    def identity(self) -> dict:
        return {"kind": "webdataset", "shards": [[str(s.resolve()), *_stat(s)] for s in self.shards],
                "classes": self.classes}

    def name_of(self, i: int) -> str:
        path, info = self.members[i]
        return f"{path}:{info.name}"


class HFDatasetSource(ImageSource):
    """A Hugging Face ``datasets`` split with an image column and a class-label column (decoded here, with PIL)."""

    def __init__(self, name: str, split: str | None, spec: str) -> None:
        """Split ``split`` of the Hugging Face dataset ``name``, from the local cache or disk (``spec``: the data spec,
        for messages).

        Raises:
            ConfigError: the datasets package is missing, the dataset is not in the local cache or cannot be
                loaded, no split was picked where there are several, or it has no image or no label column.
        """
        datasets = require_extra("datasets", f"--data {spec}")
        self.spec = spec
        local = Path(os.path.expanduser(name))
        try:
            if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()
                                   or (local / "state.json").exists()):
                ds = datasets.load_from_disk(str(local))
            else:
                ds = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
        except FileNotFoundError as e:
            raise ConfigError(f"data={spec}: no such dataset in the local cache or on disk ({e})", param="data") from None
        except ConnectionError:  # offline (HF_HUB_OFFLINE=1) or no network, and load_dataset found no cached copy
            raise ConfigError(f"data={spec}: not in the local HF datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                              f"and the Hub cannot be reached", param="data") from None
        except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ValueError)
            raise ConfigError(f"data={spec}: cannot load the dataset ({type(e).__name__}: {str(e).splitlines()[0]})", param="data") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            pick = split or ("validation" if "validation" in ds else "test" if "test" in ds else None)
            if pick not in ds:
                raise ConfigError(f"data={spec}: pick a split with hfds/NAME:SPLIT (it has {', '.join(splits)})", param="data")
            ds, split = ds[pick], pick
        feats = ds.features
        image_cols = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
        if not image_cols:
            raise ConfigError(f"data={spec}: no image column (columns: {', '.join(feats)})", param="data")
        labels = [k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)]
        labels += [k for k in ("label", "labels", "cls", "target") if k in feats and k not in labels]
        if not labels:
            raise ConfigError(f"data={spec}: no label column (a ClassLabel, or one named label/cls/target)", param="data")
        self.image_col, self.label_col = image_cols[0], labels[0]
        self.split = split
        self.ds = ds.cast_column(self.image_col, datasets.Image(decode=False))  # bytes here, pixels by PIL
        self.targets = np.asarray(ds[self.label_col], dtype=np.int64)
        feat = feats[self.label_col]
        if isinstance(feat, datasets.ClassLabel):
            self.classes = list(feat.names)
        else:
            self.classes = [str(i) for i in range(class_count(int(self.targets.max()), f"data={self.spec}")
                                                  if len(self.targets) else 0)]
        self.fingerprint = getattr(ds, "_fingerprint", None)
        self.files = [f["filename"] for f in ds.cache_files]

    def identity(self) -> dict:
        return {"kind": "hfds", "fingerprint": self.fingerprint, "split": self.split,
                "files": [[f, *_stat(f)] for f in self.files]}

    def name_of(self, i: int) -> str:
        return f"{self.spec} row {i}"

    def raw_bytes(self, i: int) -> bytes | None:
        cell = self.ds[i][self.image_col]
        if cell.get("bytes") is not None:
            return cell["bytes"]
        with open(cell["path"], "rb") as f:
            return f.read()

    def open(self, i: int) -> Any:
        return _pil_rgb(io.BytesIO(self.raw_bytes(i)))


class CifarSource(ImageSource):
    """torchvision's CIFAR-10/100 from a local root (no download): 32×32 RGB arrays."""

    def __init__(self, which: str, split: str, root: str | None, spec: str) -> None:
        """CIFAR-10/100 (``which``) split ``split`` from the folder ``root`` (``spec``: the data spec, for messages).

        Raises:
            ConfigError: no root given, an unknown split, or a root that does not hold the dataset.
        """
        from torchvision import datasets as tvd
        if not root:
            raise ConfigError(f"data={spec}: give the folder holding cifar-10-batches-py (or cifar-100-python) "
                              f"with ?root=DIR", param="data")
        if split not in ("train", "test"):
            raise ConfigError(f"data={spec}: unknown split '{split}' (train, test)", param="data")
        cls = tvd.CIFAR10 if which == "cifar10" else tvd.CIFAR100
        self.spec, self.root = spec, Path(os.path.expanduser(root))
        for name, _ in cls.train_list if split == "train" else cls.test_list:
            f = self.root / cls.base_folder / name
            if f.exists() or f.is_symlink():  # a missing file is torchvision's one-line error below
                require_regular(f, "a CIFAR batch file")
        try:
            ds = cls(str(self.root), train=split == "train", download=False)
        except RuntimeError as e:
            raise ConfigError(f"{self.root}: {e}") from None
        self.folder = self.root / ds.base_folder
        self.files = sorted(self.folder / name for name, _ in (ds.train_list if split == "train" else ds.test_list))
        self.data = ds.data
        self.targets = np.asarray(ds.targets, dtype=np.int64)
        self.classes = list(ds.classes)
        self.split = split

    def identity(self) -> dict:
        return {"kind": "cifar", "split": self.split, "files": [[str(f.resolve()), *_stat(f)] for f in self.files]}

    def name_of(self, i: int) -> str:
        return f"{self.folder} example {i}"

    def open(self, i: int) -> Any:
        from PIL import Image
        return Image.fromarray(self.data[i])


def is_image_source(base: str) -> bool:
    """Whether a spec (without options) names an image source rather than a tensors file or a built-in."""
    if base.startswith("hfds/") or base.split(":")[0] in ("cifar10", "cifar100"):
        return True
    if "{" in base:
        return True
    path = Path(os.path.expanduser(base))
    return path.is_dir() or (path.is_file() and path.suffix in (".tar", ".tgz") or base.endswith(".tar.gz"))


def open_source(base: str, opts: dict[str, str], spec: str) -> ImageSource:
    """The image source a spec names (see the module docstring), listed but not yet decoded.

    Raises:
        ConfigError: the spec names no readable image source (see each source's own conditions), or a package the source
            needs is missing.
    """
    if base.startswith("hfds/"):
        name, _, split = base[len("hfds/"):].partition(":")
        return HFDatasetSource(name, split or None, spec)
    which, _, split = base.partition(":")
    if which in ("cifar10", "cifar100") and not os.path.exists(base):
        return CifarSource(which, split or "test", opts.get("root"), spec)
    if "{" in base:
        return WebDatasetSource(expand_shards(os.path.expanduser(base)), spec)
    path = Path(os.path.expanduser(base))
    if path.is_dir():
        return FolderSource(path, spec)
    if is_webdataset(path):
        return WebDatasetSource([path], spec)
    return TarSource(path, spec)
