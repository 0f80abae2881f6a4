"""Fuzzing of the other formats weightspace reads (issue 19): mergekit YAML, recipe YAML, sharded ``.bin`` indexes,
image folders and tar shards. Each format has seeds (valid inputs built here from real tiny tensors and images), a
mutator (byte flips, truncations and structure-aware edits: anchors, aliases, deep nesting, hostile numbers and
keys; index entries pointing at absent, duplicate, foreign or outside shards; symlink cycles, duplicate links,
FIFOs, corrupt and bomb images; forged tar headers and labels) and a reader. The acceptance rule is the safetensors
fuzz's: every input is read or refused with a WeightspaceError, none takes over 10 s, and memory stays bounded.

Used by tests/test_fuzz_formats.py (a few seconds per format) and bench/fuzz_formats.py (thousands of inputs).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import struct
import tarfile
import time
import zlib
from pathlib import Path
from typing import Callable

import safetensors.torch as st
import torch

from safetensors_oracle import Timeout, alarm

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ["&a [1, 2]\n", "b: *a\n", "x: !!python/object/apply:os.system ['true']\n", "[" * 300 + "\n",
            "? [a, b]\n: c\n", "weight: .nan\n", "lambda: 1.0e+400\n", "normalize: yes\n", "\t", "\x00", "\ufeff",
            "density: -1\n", "<<: {a: 1}\n", "models: []\n", "models: {}\n", "parameters: [1]\n", "seeds: [1, 1, 1]\n",
            "small: {x: 1}\n", "- - - -\n", "%YAML 1.1\n---\n", "!!binary aGk=\n", "x: 99999999999999999999999\n",
            "epochs: -3\n", "lr: .inf\n", "batch_size: 0\n", "'\x1b[31m': 1\n"]
NUMBERS = [".nan", ".inf", "-.inf", "-1", "0", "1.0e+308", "99999999999999999999999", "true", "'1'", "null", "[]"]


def _mutate_text(text: str, rng: random.Random) -> bytes:
    lines = text.splitlines(keepends=True) or ["\n"]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(lines))
        if op == 0:
            lines.insert(i, rng.choice(SNIPPETS))
        elif op == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 2 and len(lines) > 1:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            words = lines[i].split(":")
            if len(words) > 1:
                lines[i] = words[0] + ": " + rng.choice(NUMBERS) + "\n"
        elif op == 4:
            k = lines[i].find(":")
            if k > 1:
                c = rng.randrange(k)
                lines[i] = lines[i][:c] + lines[i][c + 1:]  # a misspelt key
        elif op == 5:
            del lines[i]
        else:
            lines[i] = "  " * rng.randint(0, 6) + lines[i].lstrip()
    blob = bytearray("".join(lines).encode("utf-8"))
    if rng.random() < 0.3 and blob:
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
    if rng.random() < 0.15:
        blob = blob[:rng.randrange(len(blob) + 1)]
    return bytes(blob)


# ---------------------------------------------------------------------------------------------------- mergekit YAML
def _mergekit_seeds(folder: Path) -> list[str]:
    for i in range(3):
        st.save_file({"w": torch.full((3, 2), float(i)), "b": torch.ones(2) * i, "n": torch.tensor([i])},
                     folder / f"m{i}.safetensors")
    ties = ("merge_method: ties\nbase_model: m0.safetensors\nmodels:\n  - model: m1.safetensors\n"
            "    parameters: {weight: 0.6, density: 0.5}\n  - model: m2.safetensors\n"
            "    parameters:\n      weight: 0.4\n      density: 0.7\nparameters:\n  normalize: true\n  lambda: 1.0\n"
            "dtype: float32\nout_dtype: bfloat16\n")
    linear = ("merge_method: linear\nmodels:\n  - model: m1.safetensors\n    parameters: {weight: 1.0}\n"
              "  - model: m2.safetensors\n    parameters: {weight: 2.0}\n")
    ta = ("merge_method: task_arithmetic\nbase_model: m0.safetensors\nmodels:\n  - model: m1.safetensors\n"
          "  - model: m2.safetensors\n    parameters: {weight: -0.5}\nparameters: {lambda: 2.0}\n")
    return [ties, linear, ta]


def _read_mergekit(path: Path, i: int) -> None:
    from weightspace.ops.mergekit import merge_from_config, read_mergekit_config
    cfg = read_mergekit_config(path)
    if i % 5 == 0:  # the merge itself too, on the tiny models: its checks are part of reading a config
        merge_from_config(cfg).materialise()


# ---------------------------------------------------------------------------------------------------- recipe YAML
def _recipe_seeds(folder: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.yaml"))]


def _read_recipe(path: Path, i: int) -> None:
    import importlib

    from weightspace.experiments.runner import recipe_kind
    kind = recipe_kind(str(path))
    mod = importlib.import_module(kind.target.__module__)
    loader = next(getattr(mod, n) for n in sorted(dir(mod))
                  if n.startswith("load_") and n.endswith("_recipe") and n != "load_kind_recipe")
    loader(str(path), small=bool(i % 2))


# ---------------------------------------------------------------------------------------------------- .bin indexes
BIN_INDEX = "pytorch_model.bin.index.json"


def _bin_seed(folder: Path) -> Path:
    seed = folder / "bin-seed"
    seed.mkdir()
    shards = {"pytorch_model-00001-of-00002.bin": {"a.w": torch.ones(2, 2), "a.b": torch.zeros(2)},
              "pytorch_model-00002-of-00002.bin": {"c.w": torch.full((3,), 2.0), "c.n": torch.tensor([4])}}
    for name, sd in shards.items():
        torch.save(sd, seed / name)
    index = {"metadata": {"total_size": 44}, "weight_map": {k: n for n, sd in shards.items() for k in sd}}
    (seed / BIN_INDEX).write_text(json.dumps(index, indent=1))
    return seed


def _mutate_bin(seed: Path, work: Path, rng: random.Random) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(seed, work)
    index = json.loads((work / BIN_INDEX).read_text())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    op = rng.randrange(9)
    if op == 0:
        wm.pop(rng.choice(sorted(wm)))                        # a key present in a shard, not listed
    elif op == 1:
        wm["ghost.w"] = rng.choice(shards)                    # listed, absent
    elif op == 2:
        torch.save({**torch.load(work / shards[0], weights_only=True), "c.w": torch.ones(3)}, work / shards[0])
    elif op == 3:
        wm[rng.choice(sorted(wm))] = rng.choice(["../escape.bin", "/etc/passwd", ".", "", "missing.bin", "a/../b"])
    elif op == 4:
        index["weight_map"] = rng.choice([[], "x", None, {"k": 3}, {}])
    elif op == 5:
        os.unlink(work / rng.choice(shards))
    elif op == 6:
        p = work / rng.choice(shards)
        blob = bytearray(p.read_bytes())
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        p.write_bytes(bytes(blob[:rng.randrange(len(blob) + 1)] if rng.random() < 0.3 else blob))
    elif op == 7:
        (work / "outside.bin").unlink(missing_ok=True)
        os.unlink(work / shards[0])
        os.symlink("/dev/zero" if rng.random() < 0.5 else work.parent, work / shards[0])
    text = json.dumps(index).encode()
    if op == 8:
        text = _mutate_text(json.dumps(index, indent=1), rng)
    (work / BIN_INDEX).write_bytes(text)
    return work


def _read_checkpoint(path: Path, i: int) -> None:
    import weightspace as ws
    ck = ws.load(str(path))
    try:
        for k in ck:
            ck[k]
    finally:
        ck.close()


# ---------------------------------------------------------------------------------------------------- images
def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image
    img = Image.new("RGB", (w, h), ((seed * 40) % 256, (seed * 90) % 256, 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header declaring w×h pixels, with (almost) no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _image_seed(folder: Path) -> Path:
    seed = folder / "img-seed"
    for c, cls in enumerate(("cat", "dog", "eel")):
        (seed / cls).mkdir(parents=True)
        for j in range(3):
            (seed / cls / f"{j}.png").write_bytes(_png(8, 8, c * 3 + j))
    return seed


def _mutate_images(seed: Path, work: Path, rng: random.Random) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(seed, work, symlinks=True)
    classes = sorted(p for p in work.iterdir())
    for _ in range(rng.randint(1, 3)):
        cls = rng.choice(classes)
        img = cls / f"{rng.randrange(3)}.png"
        op = rng.randrange(11)
        n = rng.randrange(1 << 30)
        if op == 0:
            (cls / f"loop{n}").symlink_to(work if rng.random() < 0.5 else cls)
        elif op == 1:
            (cls / f"twice{n}.png").symlink_to(rng.choice(classes) / "1.png")
        elif op == 2:
            with contextlib.suppress(OSError):
                os.mkfifo(cls / f"fifo{n}.png")
        elif op == 3 and img.exists():
            blob = img.read_bytes()
            img.write_bytes(blob[:rng.randrange(len(blob) + 1)])
        elif op == 4 and img.exists():
            blob = bytearray(img.read_bytes())
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            img.write_bytes(bytes(blob))
        elif op == 5:
            (cls / "notes.png").write_text("not an image")
        elif op == 6:
            (cls / "sub").mkdir(exist_ok=True)
            (cls / "sub" / "x.png").write_bytes(_png(8, 8, 1))
        elif op == 7:
            (work / "stray.png").write_bytes(_png(8, 8, 2))
        elif op == 8:
            (cls / "bomb.png").write_bytes(_png_bomb(rng.choice([60000, 1 << 20, 2 ** 31 - 1]), 60000))
        elif op == 9:
            (work / f"empty{rng.randrange(9)}").mkdir(exist_ok=True)
        else:
            (cls / "zero.png").write_bytes(b"")
    return work


def _read_images(path: Path, i: int) -> None:
    from weightspace.eval.data import load_data
    load_data(f"{path}?size=8", workers=0, progress=False)


# ---------------------------------------------------------------------------------------------------- tar shards
def _tar_seed(folder: Path) -> Path:
    """A webdataset shard (KEY.png + KEY.cls); the mutator also builds folder-style tars from it."""
    seed = folder / "shard-seed.tar"
    with tarfile.open(seed, "w") as tf:
        for j in range(6):
            for name, data in ((f"s{j:03d}.png", _png(8, 8, j)), (f"s{j:03d}.cls", f"{j % 3}\n".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return seed


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    if size is None:
        tf.addfile(info, io.BytesIO(data))
    else:  # a header that declares more than follows
        tf.fileobj.write(info.tobuf(tf.format, tf.encoding, tf.errors))
        tf.fileobj.write(data)


def _mutate_tar(seed: Path, work: Path, rng: random.Random) -> Path:
    op = rng.randrange(6)
    path = work.with_suffix(".tar")
    if op in (0, 1):  # bytes of a valid shard flipped or cut
        blob = bytearray(seed.read_bytes())
        if op == 0:
            for _ in range(rng.randint(1, 12)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        else:
            blob = blob[:rng.randrange(len(blob) + 1)]
        path.write_bytes(bytes(blob))
        return path
    with tarfile.open(path, "w") as tf:
        folder_style = op == 5
        for j in range(4):
            stem = f"{['a', 'b'][j % 2]}/{j}" if folder_style else f"s{j:03d}"
            _tar_member(tf, f"{stem}.png", _png(8, 8, j))
            if not folder_style:
                label = rng.choice([f"{j % 2}", "-1", "abc", "99999999999999999999", "1e9", "", " 2 ", "0x10"])
                _tar_member(tf, f"{stem}.cls", label.encode())
        if op == 2:
            _tar_member(tf, "big.png", b"\x89PNG", size=rng.choice([1 << 40, 1 << 30, 300 << 20]))
        elif op == 3:
            _tar_member(tf, "s999.cls", b"1" * rng.choice([10, 5000, 1 << 16]))
            _tar_member(tf, "s999.png", _png_bomb(1 << 20, 1 << 20))
        elif op == 4:
            for name in ("../escape.png", "/abs.png", "s001.png"):
                _tar_member(tf, name, _png(8, 8, 3))
    return path


def _read_tar(path: Path, i: int) -> None:
    from weightspace.eval.data import load_data
    load_data(str(path), workers=0, progress=False)


# ---------------------------------------------------------------------------------------------------- the runner
def _text_format(seeds: Callable[[Path], list[str]], suffix: str):
    def setup(folder: Path):
        return seeds(folder)

    def make(state, folder: Path, rng: random.Random) -> Path:
        p = folder / f"fuzzed{suffix}"
        p.write_bytes(_mutate_text(rng.choice(state), rng))
        return p
    return setup, make


FORMATS: dict[str, tuple[Callable, Callable, Callable]] = {
    "mergekit": (*_text_format(_mergekit_seeds, ".yaml"), _read_mergekit),
    "recipe": (*_text_format(_recipe_seeds, ".yaml"), _read_recipe),
    "bin-index": (_bin_seed, lambda s, f, r: _mutate_bin(s, f / "bin", r), _read_checkpoint),
    "image-folder": (_image_seed, lambda s, f, r: _mutate_images(s, f / "imgs", r), _read_images),
    "tar-shard": (_tar_seed, lambda s, f, r: _mutate_tar(s, f / "shard", r), _read_tar),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz_format(name: str, folder: Path, n: int, seed: int = 0) -> dict:
    """Generate ``n`` inputs of format ``name`` in ``folder`` and read each under a 10 s alarm. Returns the counts
    (files, accepted, refused with a WeightspaceError, other exceptions, files over 10 s), the slowest file's
    seconds, the growth of the process's peak RSS in MB, and up to five failures described."""
    from weightspace.errors import WeightspaceError
    setup, make, read = FORMATS[name]
    rng = random.Random(seed)
    env = {"HF_HUB_OFFLINE": "1", "WEIGHTSPACE_DATA_CACHE": "off"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    counts: dict = {"files": 0, "accepted": 0, "refused": 0, "other_exceptions": 0, "timeouts": 0, "slowest_s": 0.0,
                    "failures": []}
    cwd = os.getcwd()
    try:
        os.chdir(folder)  # relative model paths in configs resolve here, never in the caller's folder
        state = setup(folder)
        with contextlib.suppress(WeightspaceError):  # imports and first-use caches are not the inputs' doing
            read(make(state, folder, random.Random(seed + 1)), 1)
        rss0 = _rss_mb()
        for i in range(n):
            path = make(state, folder, rng)
            t0 = time.perf_counter()
            failed = None
            try:
                with alarm(10):
                    read(path, i)
                counts["accepted"] += 1
            except WeightspaceError:
                counts["refused"] += 1
            except Timeout:
                failed = ("timeouts", "over 10 s")
            except Exception as e:  # noqa: BLE001 — anything but the error family is a bug
                failed = ("other_exceptions", f"{type(e).__name__}: {str(e)[:200]}")
            counts["slowest_s"] = max(counts["slowest_s"], time.perf_counter() - t0)
            counts["files"] += 1
            if failed:
                counts[failed[0]] += 1
                if len(counts["failures"]) < 5:
                    shown = path.read_bytes()[:160] if path.is_file() else sorted(os.listdir(path))[:8]
                    counts["failures"].append(f"{name} input {i} ({shown!r}): {failed[1]}")
        counts["rss_growth_mb"] = _rss_mb() - rss0
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return counts
