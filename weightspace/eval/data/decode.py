"""Decode an image source once, in parallel worker processes, straight into one preallocated uint8 (N, C, H, W) array.

The model's eval transform is split where it turns the PIL image into a tensor: the PIL part (resize, crop) runs in
the workers and its pixels are stored as uint8; the rest (``ToTensor``'s /255 and ``Normalize``) runs per batch where
the batch is used (:meth:`TensorData.prepare`), with the same operations, so the model sees the same floats.

Workers write their rows into a memory-mapped ``.npy`` file (the data cache's entry being built, or a temporary
file): nothing is gathered in the parent, so host memory stays at the array plus a few images per worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import ConfigError, DataError
from .readers import ImageSource

__all__ = ["PixelPipeline", "pixel_pipeline", "decode_into", "default_workers", "DecodeReport"]


@dataclass(frozen=True)
class PixelPipeline:
    """The PIL part of an eval transform and the normalisation that follows it."""

    pil: Callable[[Any], Any]
    size: tuple[int, int]            # (H, W) of the output
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    description: str                 # what the cache key records
    summary: str = ""                # the same, short, for `weightspace data ls`

    def __call__(self, img: Any) -> np.ndarray:
        """A PIL image → uint8 (C, H, W)."""
        out = np.asarray(self.pil(img), dtype=np.uint8)
        if out.ndim == 2:
            out = out[:, :, None]
        return out.transpose(2, 0, 1)


def _output_size(pil: Callable, probe_size: tuple[int, int] = (257, 311)) -> tuple[int, int]:
    from PIL import Image
    out = pil(Image.new("RGB", probe_size[::-1]))
    w, h = out.size
    return h, w


def pixel_pipeline(transform: Callable) -> PixelPipeline:
    """Split a torchvision ``Compose`` (timm's or open_clip's eval transform) into PIL part + mean/std.

    Raises:
        ConfigError: the transform does not end in ToTensor [+ Normalize], or does not give a fixed size.
    """
    from torchvision import transforms as T
    steps = list(getattr(transform, "transforms", [transform]))
    cut = next((i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor", "PILToTensor")),
               None)
    if cut is None:
        raise ConfigError(f"transform {transform!r}: no ToTensor step to split at (uint8 decoding needs one)")
    rest = steps[cut + 1:]
    mean = std = None
    if rest:
        norm = rest[0]
        if len(rest) > 1 or type(norm).__name__ not in ("Normalize", "MaybeNormalize") or not hasattr(norm, "mean"):
            raise ConfigError(f"transform {transform!r}: only Normalize may follow ToTensor for uint8 decoding")
        mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten())
        std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten())
    pil = T.Compose(steps[:cut])
    size = _output_size(pil)
    if size != _output_size(pil, (190, 133)):
        raise ConfigError(f"transform {transform!r}: its output size depends on the input (add a crop)")
    desc = repr(pil).replace("\n", " ") + f" mean={mean} std={std}"
    return PixelPipeline(pil, size, mean, std, desc, _summary(steps[:cut], mean, std))


def _summary(steps: list, mean: tuple | None, std: tuple | None) -> str:
    parts = []
    for t in steps:
        name = type(t).__name__
        size = getattr(t, "size", None)
        interp = getattr(getattr(t, "interpolation", None), "value", None)
        parts.append(f"{name}({', '.join(str(a) for a in (size, interp) if a is not None)})" if size else name)
    if mean is not None:
        parts.append(f"mean={tuple(round(m, 3) for m in mean)} std={tuple(round(s, 3) for s in std)}")
    return " ".join(parts)


def default_workers() -> int:
    """Worker processes when not told: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class DecodeReport:
    """What a decode did: bad example indices and the file each came from, with the reason."""

    bad: list[tuple[int, str, str]]


class _Rows(torch.utils.data.Dataset):
    """Item k = decode rows [lo, hi) of the source into the output file; returns the failures."""

    def __init__(self, source: ImageSource, pipe: PixelPipeline, out: str, chunks: list[tuple[int, int]],
                 shape: tuple[int, ...]):
        self.source, self.pipe, self.out, self.chunks, self.shape = source, pipe, out, chunks, shape
        self._mm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    def _array(self) -> np.ndarray:
        if self._mm is None or self._mm[0] != os.getpid():  # one mapping per process (never inherited across fork)
            self._mm = (os.getpid(), np.load(self.out, mmap_mode="r+"))
        return self._mm[1]

    def __getitem__(self, k: int) -> tuple[int, int, list]:
        lo, hi = self.chunks[k]
        arr = self._array()
        bad = []
        for i in range(lo, hi):
            try:
                pixels = self.pipe(self.source.open(i))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                bad.append((i, self.source.name_of(i), f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                arr[i] = 0
                continue
            if pixels.shape != arr.shape[1:]:
                bad.append((i, self.source.name_of(i), f"decoded to shape {list(pixels.shape)}, expected "
                                                       f"{list(arr.shape[1:])}"))
                continue
            arr[i] = pixels
        return lo, hi, bad


def _identity_collate(batch: Any) -> Any:
    return batch


def decode_into(source: ImageSource, pipe: PixelPipeline, out: str | os.PathLike, rows: tuple[int, int], *,
                workers: int | None = None, chunk: int = 64, progress: bool = True) -> DecodeReport:
    """Decode examples ``rows = (lo, hi)`` of ``source`` into the existing uint8 ``.npy`` file ``out``.

    ``workers`` processes (default: every core; 0 decodes in this process) each take chunks of ``chunk`` rows.
    Returns the examples that could not be decoded (their rows are left zero); never raises for a bad image.
    """
    from ...progress import progress as bar
    lo, hi = rows
    n_workers = default_workers() if workers is None else int(workers)
    chunks = [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
    arr = np.load(str(out), mmap_mode="r")
    shape = tuple(arr.shape)
    del arr
    ds = _Rows(source, pipe, str(out), chunks, shape)
    n_workers = min(n_workers, len(chunks))
    # DataLoader: the ecosystem's worker pool (fork on Linux, as timm's loaders use), errors re-raised here.
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=n_workers,
                                         collate_fn=_identity_collate, prefetch_factor=4 if n_workers else None)
    bad: list[tuple[int, str, str]] = []
    pbar = bar(total=hi - lo, desc=f"decode {Path(source.spec).name or source.spec}", unit="img", enabled=progress)
    try:
        for a, b, failed in loader:
            bad += failed
            pbar.update(b - a)
    finally:
        pbar.close()
    bad.sort()
    return DecodeReport(bad)


def check_bad(report: DecodeReport, spec: str, skip_bad: bool) -> None:
    """Raise for the first unreadable image unless ``skip_bad``.

    Raises:
        DataError: naming the file, the reason and how many others failed.
    """
    if report.bad and not skip_bad:
        i, name, why = report.bad[0]
        more = f" ({len(report.bad) - 1} more)" if len(report.bad) > 1 else ""
        raise DataError(f"{name}: cannot decode this image ({why}){more}; skip unreadable images with skip_bad=True",
                        path=name)


def _resize_of(pipe: PixelPipeline) -> tuple[int, str]:
    """The shorter-side size and the interpolation of the pipeline's Resize (the crop alone when it has none)."""
    from torchvision import transforms as T
    resize = next((t for t in getattr(pipe.pil, "transforms", []) if isinstance(t, T.Resize)), None)
    if resize is None:
        return min(pipe.size), "bilinear"
    size = resize.size if isinstance(resize.size, int) else min(resize.size)
    mode = getattr(resize.interpolation, "value", str(resize.interpolation))
    return int(size), mode if mode in ("bilinear", "bicubic") else "bilinear"


def _over_cap(data: torch.Tensor) -> str:
    """Why an encoded image may not be decoded (its header declares too many pixels), or ''."""
    import io

    from PIL import Image
    from .guards import check_pixels
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            check_pixels(*img.size, "")
    except ValueError as e:
        return f"ValueError: {e}"
    except Exception:  # an unreadable header: nvjpeg reports it, naming the file
        return ""
    return ""


def gpu_decode_into(source: ImageSource, pipe: PixelPipeline, out: np.ndarray, *, device: torch.device,
                    batch: int = 256, progress: bool = True) -> DecodeReport:
    """Decode JPEGs on the GPU in batches (nvjpeg via ``torchvision.io.decode_jpeg``), resize the shorter side with
    the pipeline's interpolation (antialiased) and centre-crop there, and write uint8 rows into ``out``.
    Pixels differ from PIL's, so the cache key names the decoder."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg
    from ...progress import progress as bar
    h, w = pipe.size
    short, mode = _resize_of(pipe)
    bad: list[tuple[int, str, str]] = []
    pbar = bar(total=len(source), desc=f"decode (gpu) {source.spec}", unit="img", enabled=progress)
    for lo in range(0, len(source), batch):
        idx = list(range(lo, min(lo + batch, len(source))))
        datas = [torch.frombuffer(bytearray(source.raw_bytes(i) or b""), dtype=torch.uint8) for i in idx]
        n_batch = len(idx)
        for k, (i, d) in enumerate(zip(idx, datas)):  # the pixel cap, from each header, before nvjpeg decodes
            why = _over_cap(d)
            if why:
                bad.append((i, source.name_of(i), why))
                datas[k] = None
        keep = [k for k, d in enumerate(datas) if d is not None]
        idx, datas = [idx[k] for k in keep], [datas[k] for k in keep]
        if not idx:
            pbar.update(n_batch)
            continue
        try:
            imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode one by one to name it
            imgs = []
            for i, d in zip(idx, datas):
                try:
                    imgs.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    bad.append((i, source.name_of(i), f"RuntimeError: {str(e).splitlines()[0]}"))
                    imgs.append(None)
        for i, img in zip(idx, imgs):
            if img is None:
                continue
            ih, iw = img.shape[-2:]
            # torchvision's Resize(int) and CenterCrop arithmetic, so only the resampling itself differs
            nh, nw = (short, int(short * iw / ih)) if ih <= iw else (int(short * ih / iw), short)
            r = F.interpolate(img[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)
            top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
            crop = r[0, :, top:top + h, left:left + w].round_().clamp_(0, 255).to(torch.uint8)
            out[i] = crop.cpu().numpy()
        pbar.update(n_batch)
    pbar.close()
    return DecodeReport(bad)
