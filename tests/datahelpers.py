"""One small real image set (sklearn digits as JPEGs) written as an image folder, a tar of it, webdataset shards,
a Hugging Face ``datasets`` folder (save_to_disk), a local HF datasets cache entry and a CIFAR-style batch folder."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = (0, 3, 7)


def digit_images(per_class: int = 6, size: tuple[int, int] = (48, 40)) -> list[tuple[str, int, np.ndarray]]:
    """(class folder name, digit, RGB uint8 image) of real 8×8 digits upscaled, `per_class` of each class."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    out = []
    for label in CLASSES:
        for i in np.flatnonzero(d.target == label)[:per_class]:
            img = Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8)).convert("RGB").resize(size, Image.BILINEAR)
            out.append((f"digit{label}", int(i), np.asarray(img)))
    return out


def jpeg(arr: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_folder(root: Path, per_class: int = 6) -> Path:
    """ROOT/digitK/NNNN.jpg."""
    for cls, i, arr in digit_images(per_class):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{i:04d}.jpg").write_bytes(jpeg(arr))
    return root


def folder_samples(root: Path) -> list[tuple[Path, int, str]]:
    """(file, class index, class name) in timm's order (natural sort of classes and paths)."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    r = ReaderImageFolder(str(root))
    names = {v: k for k, v in r.class_to_idx.items()}
    return [(Path(p), t, names[t]) for p, t in r.samples]


def write_tar(root: Path, out: Path) -> Path:
    """A tar archive of the folder (members digitK/NNNN.jpg)."""
    with tarfile.open(out, "w") as tf:
        for p, _, _ in folder_samples(root):
            tf.add(p, arcname=str(p.relative_to(root)))
    return out


def write_wds(root: Path, folder: Path, shards: int = 2) -> str:
    """webdataset shards shard-000000.tar.. with KEY.jpg + KEY.cls, samples in the folder's order; classnames.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = folder_samples(root)
    per = -(-len(samples) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tf:
            for k, (p, t, _) in enumerate(samples[s * per:(s + 1) * per], start=s * per):
                for ext, data in (("jpg", p.read_bytes()), ("cls", str(t).encode())):
                    info = tarfile.TarInfo(f"sample{k:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    names = sorted({(t, n) for _, t, n in samples})
    (folder / "classnames.txt").write_text("\n".join(n for _, n in names) + "\n")
    return str(folder / f"shard-{{000000..{shards - 1:06d}}}.tar")


def write_hfds(root: Path, out: Path) -> Path:
    """A `datasets` Dataset (image bytes + ClassLabel) saved with save_to_disk."""
    hfds_dataset(root).save_to_disk(str(out))
    return out


def hfds_dataset(root: Path):
    """The folder's images as a `datasets` Dataset: image bytes + a ClassLabel named after the class folders."""
    import datasets
    samples = folder_samples(root)
    names = [n for _, n in sorted({(t, n) for _, t, n in samples})]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p, _, _ in samples],
                                       "label": [t for _, t, _ in samples]}, features=feats)


def write_hf_datasets_cache(root: Path, cache: Path, repo_id: str, split: str = "test") -> Path:
    """Lay the folder's images out in ``cache`` (an HF_DATASETS_CACHE) as ``load_dataset(repo_id)`` leaves a Hub
    dataset there after its first download: ``ORG___NAME/default/0.0.0/HASH/`` with dataset_info.json and the
    prepared Arrow file of ``split``. Built by `datasets`' own Parquet builder from a parquet file (the Hub's format),
    so the files are what the library writes; offline, load_dataset finds them by the repo id alone."""
    import shutil

    from datasets.packaged_modules.parquet.parquet import Parquet
    org, name = repo_id.split("/")
    src = cache.parent / f"{name}-parquet"
    src.mkdir(parents=True, exist_ok=True)
    parquet = src / f"{split}-00000-of-00001.parquet"
    ds = hfds_dataset(root)
    ds.to_parquet(str(parquet))
    # the builder's own layout is NAME/default/...; a Hub download puts the namespace in front (ORG___NAME)
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name="default", config_id="default",
                      data_files={split: [str(parquet)]}, features=ds.features, hash="0123456789abcdef")
    builder.download_and_prepare()
    shutil.move(str(cache / name), str(cache / f"{org}___{name}"))
    return cache / f"{org}___{name}"


def write_cifar(root: Path, png_folder: Path, n: int = 12) -> Path:
    """A cifar-10-batches-py folder (test_batch + batches.meta) of real digits at 32×32, and the same images as PNGs
    in an image folder (lossless, so both decode to the same pixels)."""
    from PIL import Image
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    imgs = [(cls, arr) for cls, _, arr in digit_images(4, (32, 32))][:n]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    labels = [CLASSES.index(int(cls[-1])) for cls, _ in imgs]
    data = np.stack([a.transpose(2, 0, 1).reshape(-1) for _, a in imgs])
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    for k, ((_, arr), lab) in enumerate(zip(imgs, labels)):
        (png_folder / names[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(png_folder / names[lab] / f"{k:03d}.png")
    return root
