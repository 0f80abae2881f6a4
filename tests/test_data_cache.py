"""The data cache is trusted only when it is right: each entry records a digest of its array and labels, checked
on load; a mismatch is rebuilt with a note. Source identity is path, size and mtime unless
WEIGHTSPACE_DATA_VERIFY=content asks for the files' bytes."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import datahelpers as dh
from weightspace.eval.data import load_data
from weightspace.eval.data import images

pytestmark = pytest.mark.usefixtures("one_thread")


def small_timm():
    import timm
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=3,
                             pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0}).eval()


@pytest.fixture
def cached(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(tmp_path / "cache"))
    root = dh.write_folder(tmp_path / "set", per_class=3)
    model = small_timm()
    first = load_data(str(root), model=model, workers=0, progress=False)
    first = replace(first, x=first.x.clone())  # not the entry's mapping, which the damage below would reach
    name = first.meta["cache"]["entry"]
    return root, model, first, tmp_path / "cache" / f"{name}.npy", tmp_path / "cache" / f"{name}.json"


def _count_decodes(monkeypatch) -> list:
    calls: list = []
    real = images.decode_into

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(images, "decode_into", counting)
    return calls


def test_an_intact_entry_is_a_silent_hit(cached, monkeypatch):
    """The negative control: nothing changed, so no note and no decoding."""
    root, model, first, array, meta = cached
    assert json.loads(meta.read_text())["digest"]["algo"] == "xxh3_64"
    calls = _count_decodes(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_data(str(root), model=model, workers=0, progress=False)
    assert again.meta["cache"]["hit"] and not calls and torch.equal(again.x, first.x)


@pytest.mark.parametrize("damage", ["array byte", "labels", "no digest"])
def test_a_damaged_entry_is_rebuilt_with_a_note(cached, monkeypatch, damage):
    root, model, first, array, meta = cached
    if damage == "array byte":
        with open(array, "r+b") as f:  # same size, one pixel flipped: exists() still says complete
            f.seek(array.stat().st_size - 5)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        m = json.loads(meta.read_text())
        if damage == "labels":
            m["y"][0] = (m["y"][0] + 1) % 3
        else:
            del m["digest"]
        meta.write_text(json.dumps(m))
    calls = _count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = load_data(str(root), model=model, workers=0, progress=False)
    assert calls and again.meta["cache"]["hit"] is False
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)     # the true data, not the damage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = load_data(str(root), model=model, workers=0, progress=False)   # the rebuilt entry is trusted
    assert third.meta["cache"]["hit"] and torch.equal(third.x, first.x)


def _rewrite_keeping_size_and_mtime(path, data: bytes) -> None:
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_source_identity_is_path_size_mtime_unless_content_is_asked_for(cached, monkeypatch):
    root, model, first, _, _ = cached
    a, b = sorted((root / "digit0").iterdir())[:2]
    if a.stat().st_size != b.stat().st_size:   # pad to equal sizes (JPEG decoders ignore trailing bytes)
        n = max(a.stat().st_size, b.stat().st_size)
        for p in (a, b):
            p.write_bytes(p.read_bytes().ljust(n, b"\0"))
        first = load_data(str(root), model=model, workers=0, progress=False)
        first = replace(first, x=first.x.clone())
    _rewrite_keeping_size_and_mtime(a, b.read_bytes())                          # same size, same mtime, new pixels
    stale = load_data(str(root), model=model, workers=0, progress=False)
    assert stale.meta["cache"]["hit"] and torch.equal(stale.x, first.x)         # as documented: not noticed
    monkeypatch.setenv("WEIGHTSPACE_DATA_VERIFY", "content")
    fresh = load_data(str(root), model=model, workers=0, progress=False)
    assert fresh.meta["cache"]["hit"] is False and not torch.equal(fresh.x, first.x)
    i = [str(p) for p in sorted(root.rglob("*.jpg"))].index(str(a))
    assert torch.equal(fresh.x[i], fresh.x[i + 1])                              # a now holds b's pixels
    again = load_data(str(root), model=model, workers=0, progress=False)
    assert again.meta["cache"]["hit"] and torch.equal(again.x, fresh.x)
    assert np.array_equal(again.y.numpy(), first.y.numpy())
