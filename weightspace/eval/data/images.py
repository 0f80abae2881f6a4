"""Image sources → uint8 TensorData: look the decoded array up in the cache, else decode it once (in parallel, or
split across the ranks of a node under torchrun) into the cache entry, then memory-map it."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import ConfigError, DataError
from .cache import DIGEST, Entry, cache_dir, content_digest, digest_file, digest_labels, entry_key, now, verify_content
from .decode import DecodeReport, PixelPipeline, check_bad, decode_into, gpu_decode_into, pixel_pipeline
from .readers import ImageSource, open_source
from .tensors import TensorData

__all__ = ["model_transform", "load_images"]

DECODERS = ("pil", "gpu")


def model_transform(model: torch.nn.Module | None) -> Callable:
    """The model's eval transform: open_clip's for an open_clip image tower, else timm's (resolved from the model's
    pretrained config), else Resize(256) + CenterCrop(224) + ToTensor."""
    visual = getattr(model, "visual", None)
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg:
        from open_clip.transform import PreprocessCfg, image_transform_v2  # not re-exported by the package root
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    if model is not None:
        import timm.data
        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])


def _decoder_id(decoder: str) -> str:
    if decoder == "pil":
        import PIL
        return f"pil-{PIL.__version__}"  # resampling code changes between Pillow releases
    import torchvision
    return f"gpu-torchvision-{torchvision.__version__}"


def _node_split(n: int, alone: bool = False) -> tuple[int, int, bool]:
    """(lo, hi, is_leader): this process's share of the rows when the ranks of a node decode one entry together."""
    from ..distributed import world
    rank, size = world()
    if alone or size <= 1:
        return 0, n, True
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return local * n // local_size, (local + 1) * n // local_size, local == 0


def _all_gather(obj: Any) -> list:
    from ..distributed import world
    if world()[1] <= 1:
        return [obj]
    import torch.distributed as dist
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    from ..distributed import world
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def _compact(path: str, bad: list[int], n: int) -> None:
    """Drop the rows ``bad`` from the uint8 ``.npy`` at ``path`` in place: good rows move down chunk by chunk, the
    header's shape is rewritten at its old length and the file is truncated (the path may be an unnamed file's
    /proc/self/fd link, which cannot be replaced by a sibling)."""
    arr = np.load(path, mmap_mode="r+")
    keep = np.setdiff1d(np.arange(n), np.asarray(bad, dtype=np.int64))
    for a in range(0, len(keep), 256):  # destination rows never overtake source rows: safe in place
        idx = keep[a:a + 256]
        arr[a:a + len(idx)] = arr[idx]
    arr.flush()
    offset, row = arr.offset, int(np.prod(arr.shape[1:]))
    del arr
    header = repr({"descr": "|u1", "fortran_order": False, "shape": (len(keep), *_shape(path)[1:])}).encode()
    pad = offset - 10 - len(header) - 1  # magic (6) + version (2) + header length (2), then the dict, spaces, \n
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(header + b" " * pad + b"\n")
        f.truncate(offset + len(keep) * row)


def _shape(path: str) -> tuple[int, ...]:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        return np.lib.format.read_array_header_1_0(f)[0]


def _build(source: ImageSource, pipe: PixelPipeline, decoder: str, target: Path, *, workers: int | None,
           progress: bool, device: torch.device | None, alone: bool = False) -> DecodeReport | None:
    """Decode ``source`` into ``target`` atomically. Under torchrun (unless ``alone``) the ranks of a node each decode
    a contiguous slice into the node leader's temporary file, then the leader compacts out unreadable rows and
    renames it into place; the leader returns the report, the others None."""
    n = len(source)
    shape = (n, 3, *pipe.size)
    lo, hi, leader = _node_split(n, alone)
    with (_cache_writer(target) if leader else contextlib.nullcontext(None)) as tmp:
        if leader:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
        if alone:
            shared = str(tmp)
        else:  # every rank learns its node leader's temporary file (an unnamed file: through the leader's fd)
            mine = str(tmp).replace("/proc/self/", f"/proc/{os.getpid()}/") if leader else None
            host = socket.gethostname()
            shared = [t for h, t in _all_gather((host, mine)) if h == host and t][0]
            _barrier()  # the header is on disk before any rank maps the file
        if decoder == "gpu":
            arr = np.load(shared, mmap_mode="r+")
            rep = gpu_decode_into(_SliceSource(source, lo, hi), pipe, arr[lo:hi], device=device,
                                  progress=progress and leader)
            rep = DecodeReport([(i + lo, name, why) for i, name, why in rep.bad])
            arr.flush()
            del arr
        else:
            rep = decode_into(source, pipe, shared, (lo, hi), workers=workers, progress=progress and leader)
        bad = rep.bad if alone else sorted(b for part in _all_gather(rep.bad) for b in part)
        if not alone:
            _barrier()  # every slice is written before the leader renames the file into place
        if leader and bad:
            _compact(shared, [b[0] for b in bad], n)
    return DecodeReport(bad) if leader else None


class _SliceSource(ImageSource):
    def __init__(self, src: ImageSource, lo: int, hi: int):
        self.src, self.lo, self.hi, self.spec = src, lo, hi, src.spec
        self.targets = src.targets[lo:hi]

    def raw_bytes(self, i: int) -> bytes | None:
        return self.src.raw_bytes(i + self.lo)

    def name_of(self, i: int) -> str:
        return self.src.name_of(i + self.lo)


@contextlib.contextmanager
def _cache_writer(path: Path):
    """files.atomic_output, also where the CLI discards writes (ranks ≠ 0): a cache entry belongs to a node, and on
    several nodes with unshared cache folders each node's leader (not only rank 0) must write its own."""
    from ...files import atomic_output, discard_writes
    before = discard_writes(False)
    try:
        with atomic_output(path, force=True) as tmp:
            discard_writes(before)
            yield tmp
            discard_writes(False)
    finally:
        discard_writes(before)


def load_images(spec: str, base: str, opts: dict[str, str], *, model: torch.nn.Module | None = None,
                transform: Callable | None = None, workers: int | None = None, skip_bad: bool = False,
                decoder: str = "pil", device: str | torch.device | None = None, progress: bool = True) -> TensorData:
    """Decode an image source (folder, tar, webdataset, ``hfds/``, CIFAR) into uint8 TensorData, through the cache.

    Raises:
        ConfigError: the source cannot be read or the transform cannot be split at ToTensor.
        DataError: an image cannot be decoded (naming its file) and ``skip_bad`` is false.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"data={spec}: unknown decoder '{decoder}' ({', '.join(DECODERS)})", param="data")
    source = open_source(base, opts, spec)
    pipe = pixel_pipeline(transform or model_transform(model))
    dev = torch.device(device) if device is not None else None
    if decoder == "gpu" and (dev is None or dev.type != "cuda"):
        dev = torch.device("cuda") if torch.cuda.is_available() else None
        if dev is None:
            raise ConfigError(f"data={spec}: decoder=gpu needs CUDA", param="data")
    identity = source.identity()
    if verify_content():  # the user asked for content, not path/size/mtime, to decide what changed
        try:
            identity["content"] = content_digest(source.content_files())
        except OSError as e:
            raise ConfigError(f"data={spec}: cannot read a source file to verify its content ({e})", param="data") from None
    key = entry_key(identity, pipe.description, source.classes, _decoder_id(decoder))
    folder = cache_dir()
    if folder is not None:
        entry = Entry.for_key(folder, spec, key)
        hit = entry.exists()
        why = entry.mismatch() if hit else ""
        if why:
            import warnings
            warnings.warn(f"data cache entry {entry.name}: {why}; rebuilding it", stacklevel=2)
            hit = False
        if not hit:
            folder.mkdir(parents=True, exist_ok=True)
            rep = _build(source, pipe, decoder, entry.array, workers=workers, progress=progress, device=dev)
            if rep is not None:  # the node leader records the entry: its .json last, so the entry is complete
                meta = _meta(spec, source, pipe, decoder, key, rep, entry.array)
                with _cache_writer(entry.meta_path) as tmp:
                    tmp.write_text(json.dumps(meta))
            _barrier()
            if not entry.exists():
                raise DataError(f"{entry.meta_path}: the cache entry was not written (is {folder} shared by nodes "
                                f"with different data?)", path=str(entry.meta_path))
        meta = entry.meta
        x = torch.from_numpy(np.load(entry.array, mmap_mode="c"))  # copy-on-write map: file-backed, writable
        cached = {"entry": entry.name, "hit": hit}
    else:  # no cache: every process decodes alone into a temporary file it maps and unlinks at once
        tmpdir = Path(tempfile.mkdtemp(prefix="weightspace-data-"))
        path = tmpdir / "x.npy"
        try:
            rep = _build(source, pipe, decoder, path, workers=workers, progress=progress, device=dev, alone=True)
            meta = _meta(spec, source, pipe, decoder, key, rep, path, digest=False)  # no entry to check later
            x = torch.from_numpy(np.load(path, mmap_mode="c"))
        finally:
            with contextlib.suppress(OSError):  # the mapping outlives the name
                path.unlink()
                tmpdir.rmdir()
        cached = {"entry": None, "hit": False}
    bad = [tuple(b) for b in meta.get("bad", [])]
    check_bad(DecodeReport(bad), spec, skip_bad)
    if bad:
        import warnings
        warnings.warn(f"{spec}: skipped {len(bad)} unreadable image(s), e.g. {bad[0][1]} ({bad[0][2]})", stacklevel=2)
    y = torch.tensor(meta["y"], dtype=torch.long)
    info = {"classes": list(meta["classes"]), "cache": cached, "skipped": [b[1] for b in bad],
            "pipeline": pipe.description}
    return TensorData(spec, x, y, num_classes=len(meta["classes"]), meta=info,
                      mean=tuple(meta["mean"]) if meta.get("mean") else None,
                      std=tuple(meta["std"]) if meta.get("std") else None)


def _meta(spec: str, source: ImageSource, pipe: PixelPipeline, decoder: str, key: str, rep: DecodeReport,
          array: Path, *, digest: bool = True) -> dict:
    bad = set(b[0] for b in rep.bad)
    y = [int(t) for i, t in enumerate(source.targets) if i not in bad]
    return {"format": 1, "key": key, "spec": spec, "source": source.identity().get("kind"),
            "shape": [len(y), 3, *pipe.size], "pipeline": pipe.description, "transform": pipe.summary, "decoder": _decoder_id(decoder),
            "mean": pipe.mean, "std": pipe.std, "classes": source.classes, "y": y,
            "bad": [list(b) for b in rep.bad], "created": now(), "file_bytes": array.stat().st_size,
            **({"digest": {"algo": DIGEST, "array": digest_file(array), "labels": digest_labels(y)}} if digest else {})}
