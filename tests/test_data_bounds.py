"""Bounded in time and memory on any input (data part): regular files only, image-folder walks that never loop or
count a file twice, archive members with size caps, a pixel cap on every decode, labels inside the class range,
options validated before anything is read; and the data/eval cases that used to give a traceback."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import datahelpers as dh
from weightspace import errors
from weightspace.eval.data import guards, load_data

pytestmark = pytest.mark.usefixtures("one_thread")
ZOO = "weightspace.eval.zoo:small_cnn"


def small_timm(num_classes: int = 3):
    import timm
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0}).eval()


def returns_within(fn, seconds: float = 20.0):
    """Run ``fn`` in a daemon thread: (finished, result or exception). A reader blocked on a FIFO never finishes."""
    box: dict = {}

    def run():
        try:
            box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            box["r"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("r")


# ------------------------------------------------------------------------------------------------ regular files
def test_a_fifo_as_tensors_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / "x.npz"
    os.mkfifo(fifo)
    done, r = returns_within(lambda: load_data(str(fifo)))
    assert done, "load_data blocked on a FIFO"
    assert isinstance(r, errors.ConfigError) and "FIFO" in str(r) and str(fifo) in str(r)


def test_a_device_and_a_fifo_tar_are_refused(tmp_path):
    with pytest.raises(errors.ConfigError, match="a device, not a regular file"):
        load_data("/dev/null")
    fifo = tmp_path / "shards.tar"
    os.mkfifo(fifo)
    done, r = returns_within(lambda: load_data(str(fifo)))
    assert done and isinstance(r, errors.ConfigError) and "FIFO" in str(r)


def test_a_fifo_among_the_images_and_as_class_map_is_refused(tmp_path):
    root = dh.write_folder(tmp_path / "set", per_class=2)
    os.mkfifo(root / "digit3" / "zz.jpg")
    done, r = returns_within(lambda: load_data(str(root), model=small_timm(), progress=False))
    assert done and isinstance(r, errors.ConfigError) and "zz.jpg" in str(r) and "FIFO" in str(r)
    os.unlink(root / "digit3" / "zz.jpg")
    fifo = tmp_path / "map.txt"
    os.mkfifo(fifo)
    done, r = returns_within(lambda: load_data(f"{root}?classes={fifo}", model=small_timm(), progress=False))
    assert done and isinstance(r, errors.DataError) and "FIFO" in str(r)


# ------------------------------------------------------------------------------------------------ folder walks
def test_a_symlink_cycle_is_detected_and_the_walk_ends(tmp_path):
    root = dh.write_folder(tmp_path / "set", per_class=2)
    os.symlink(root / "digit0", root / "digit0" / "loop")          # digit0/loop/loop/loop/... for ever
    done, r = returns_within(lambda: guards.list_image_folder(root), 10)
    assert done and isinstance(r, errors.ConfigError) and "symlink cycle" in str(r) and "loop" in str(r)
    os.unlink(root / "digit0" / "loop")
    os.symlink(root, root / "digit3" / "up")                        # back to the data root
    with pytest.raises(errors.ConfigError, match="symlink cycle"):
        guards.list_image_folder(root)


def test_no_file_is_counted_twice(tmp_path):
    root = dh.write_folder(tmp_path / "set", per_class=2)
    os.symlink(root / "digit0", root / "digit7" / "also0")           # one folder reached by two ways
    with pytest.raises(errors.ConfigError, match="same folder as"):
        guards.list_image_folder(root)
    os.unlink(root / "digit7" / "also0")
    first = sorted((root / "digit0").iterdir())[0]
    os.link(first, root / "digit3" / "hard.jpg")                     # one file in two classes
    with pytest.raises(errors.ConfigError, match="same file as"):
        guards.list_image_folder(root)


def test_a_link_to_a_folder_outside_the_tree_is_followed_once(tmp_path):
    """Negative control for the two tests above: links themselves are fine."""
    root = dh.write_folder(tmp_path / "set", per_class=2)
    elsewhere = dh.write_folder(tmp_path / "other", per_class=3)
    os.symlink(elsewhere / "digit7", root / "digit7" / "more")
    paths, targets, classes = guards.list_image_folder(root)
    assert classes == ["digit0", "digit3", "digit7"]
    assert len(paths) == len(set(paths)) == 2 + 2 + 2 + 3 and targets.tolist().count(2) == 5


def test_the_walk_matches_timms_order_on_a_flat_folder(tmp_path):
    root = dh.write_folder(tmp_path / "set", per_class=4)
    paths, targets, classes = guards.list_image_folder(root)
    ref = dh.folder_samples(root)
    assert [Path(p) for p in paths] == [p for p, _, _ in ref] and targets.tolist() == [t for _, t, _ in ref]


def test_a_nested_class_subfolder_belongs_to_its_class(tmp_path):
    flat = dh.write_folder(tmp_path / "flat", per_class=3)
    nested = dh.write_folder(tmp_path / "nested", per_class=3)
    sub = nested / "digit3" / "more"
    sub.mkdir()
    for p in sorted((nested / "digit3").glob("*.jpg"))[:2]:
        p.rename(sub / p.name)
    from weightspace.eval.build import classes_in_folder
    assert classes_in_folder(str(nested)) == 3                        # the nested folder is no fourth class
    a = load_data(str(flat), model=small_timm(), progress=False)
    b = load_data(str(nested), model=small_timm(), progress=False)
    assert b.meta["classes"] == a.meta["classes"] and sorted(b.y.tolist()) == sorted(a.y.tolist())
    (nested / "stray.jpg").write_bytes((flat / "digit0").glob("*.jpg").__next__().read_bytes())
    with pytest.raises(errors.ConfigError, match="outside a class folder"):
        load_data(str(nested), model=small_timm(), progress=False)


# ------------------------------------------------------------------------------------------------ archives, pixels
def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_and_webdataset_members_have_size_caps(tmp_path, monkeypatch):
    img = dh.jpeg(dh.digit_images(1)[0][2])
    tar = _tar(tmp_path / "images.tar", {"a/0.jpg": img, "b/1.jpg": img})
    assert len(load_data(str(tar), model=small_timm(2), progress=False)) == 2   # under the cap: read
    monkeypatch.setattr(guards, "MAX_MEMBER_BYTES", len(img) - 1)
    with pytest.raises(errors.ConfigError, match=r"a/0.jpg: a \d+-byte member, over the"):
        load_data(str(tar), model=small_timm(2), progress=False)
    monkeypatch.undo()
    wds = _tar(tmp_path / "shard.tar", {"k0.jpg": img, "k0.cls": b"0" + b" " * 4096})
    with pytest.raises(errors.ConfigError, match="k0.cls: a 4097-byte member"):
        load_data(str(wds), model=small_timm(2), progress=False)


def test_a_compressed_tar_bomb_stays_small(tmp_path):
    """A 0.5 MB .tar.gz declaring a 512 MB member: refused by its declared size, memory never near it."""
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tf:
        info = tarfile.TarInfo("a/big.jpg")
        info.size = 512 << 20

        class Zeros(io.RawIOBase):
            left = info.size

            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n
        tf.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    assert bomb.stat().st_size < 1 << 20
    code = ("import resource, sys; from weightspace.eval.data import load_data\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_data(sys.argv[1], progress=False)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    r = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=300)
    assert "ConfigError" in r.stdout and "over the" in r.stdout, r.stdout + r.stderr
    grew = int(r.stdout.split("grew_kb")[1])
    assert grew < 200_000, grew                                       # ≪ 512 MB (timm/PIL imports included)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height (its pixel data is a stub: only the header is ever read)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_decode_has_a_pixel_cap(tmp_path, monkeypatch):
    root = dh.write_folder(tmp_path / "set", per_class=2)
    (root / "digit3" / "huge.png").write_bytes(_png_header(10_000, 10_000))   # 100 M: PIL only warns
    with pytest.raises(errors.DataError, match=r"huge.png.*10000×10000 pixels, over the cap"):
        load_data(str(root), model=small_timm(), progress=False, workers=0)
    (root / "digit3" / "huge.png").unlink()
    assert len(load_data(str(root), model=small_timm(), progress=False, workers=0)) == 6   # control: real images pass
    monkeypatch.setattr(guards, "MAX_IMAGE_PIXELS", 48 * 40 - 1)                          # one pixel under theirs
    with pytest.raises(ValueError, match="48×40 pixels, over the cap"):
        guards.open_capped_image(io.BytesIO(dh.jpeg(dh.digit_images(1)[0][2])))


# ------------------------------------------------------------------------------------------------ labels, options
def _npz(path: Path, y, x=None) -> Path:
    y = np.asarray(y)
    np.savez(path, x=np.zeros((len(y), 1, 8, 8), np.float32) if x is None else x, y=y)
    return path


@pytest.mark.parametrize("y,match", [([0, 1, -1, 2], r"label -1 of example 2 lies outside the class range 0..2"),
                                     ([0.0, 1.5, 2.0], "label 1.5 of example 1 is not a class index"),
                                     ([[0, 1], [2, 0]], "multi-label targets must be 0 or 1")])
def test_labels_must_lie_in_the_class_range(tmp_path, y, match):
    with pytest.raises(errors.DataError, match=match):
        load_data(str(_npz(tmp_path / "d.npz", y)))
    ok = load_data(str(_npz(tmp_path / "ok.npz", [0, 1, 2, 1])))              # control
    assert ok.num_classes == 3 and ok.y.tolist() == [0, 1, 2, 1]


def test_a_negative_webdataset_label_is_refused(tmp_path):
    img = dh.jpeg(dh.digit_images(1)[0][2])
    shard = _tar(tmp_path / "s.tar", {"k0.jpg": img, "k0.cls": b"1", "k1.jpg": img, "k1.cls": b"-1"})
    with pytest.raises(errors.DataError, match="label -1 of example 1 lies outside"):
        load_data(str(shard), model=small_timm(2), progress=False)


@pytest.mark.parametrize("opt,match", [("limit=0", "limit=0 must be at least 1"), ("limit=-5", "limit=-5 must be"),
                                       ("size=0", "size=0 must be from 1 to 4096"), ("size=100000", "size=100000"),
                                       ("channels=0", "channels=0"), ("limit=ten", "limit=ten is not an integer"),
                                       ("colour=1", "unknown option")])
def test_options_are_validated_before_anything_is_read(tmp_path, opt, match, monkeypatch):
    with pytest.raises(errors.ConfigError, match=match):
        load_data(f"digits:val?{opt}")
    root = dh.write_folder(tmp_path / "set", per_class=1)
    cache = tmp_path / "cache"
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(cache))
    with pytest.raises(errors.ConfigError, match=match):
        load_data(f"{root}?{opt}", model=small_timm(), progress=False)
    assert not cache.exists()                                          # nothing decoded


def test_bad_data_through_the_cli_is_one_line(tmp_path, cli, trained_mlps):
    import safetensors.torch as st
    ck = tmp_path / "a.safetensors"
    st.save_file(trained_mlps[0], ck)
    bad = _npz(tmp_path / "neg.npz", [0, -3, 1])
    for data, what in ((str(bad), "label -3"), ("digits:test?limit=0", "limit=0"), ("digits:test?size=0", "size=0")):
        r = cli("leaderboard", ck, "--model", "weightspace.eval.zoo:mlp?hidden=32", "--data", data, "--quiet")
        assert r.exit_code == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------------------------------------ Python API misuse
def test_api_misuse_names_the_argument():
    import weightspace as ws
    from weightspace.errors import WeightspaceError
    from weightspace.eval.models import build_model
    net, d = build_model(ZOO, num_classes=10), load_data("digits:val?limit=20")
    cases = [(lambda: ws.Evaluator(None, d), "model"), (lambda: ws.Evaluator("timm:resnet18", d), "model"),
             (lambda: ws.Evaluator(net, None), "data"), (lambda: ws.Evaluator(net, "digits:val"), "data"),
             (lambda: ws.Evaluator(net, [d, 3]), "data"), (lambda: ws.Evaluator(net, [])(), "data"),
             (lambda: ws.Evaluator(net, d, batch_size=0), "batch_size"),
             (lambda: ws.Evaluator(net, d, batch_size=2.5), "batch_size"),
             (lambda: ws.Evaluator(net, d, device=None), "device"), (lambda: load_data(None), "spec"),
             (lambda: load_data(b"digits"), "spec")]
    for call, arg in cases:
        with pytest.raises((WeightspaceError, TypeError)) as e:
            call()
        assert arg in str(e.value), (arg, e.value)
    assert ws.Evaluator(net, d, batch_size=7, device="cpu")()["digits:val?limit=20"]["n"] == 20     # control
    assert len(load_data(Path(_npz(Path(__import__("tempfile").mkdtemp()) / "p.npz", [0, 1])))) == 2  # a path is fine
