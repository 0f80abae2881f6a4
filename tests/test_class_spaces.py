"""Class spaces (issue 20.8): a dataset whose classes are not the head's outputs is mapped or refused, never scored
against the head's first columns; the head is sized by the checkpoint evaluated."""
from __future__ import annotations

import json

import pytest
import torch

import datahelpers as dh
import weightspace as ws
from weightspace import errors
from weightspace.eval.data import load_data, set_decoding
from weightspace.eval.models import build_model

CNN = "weightspace.eval.zoo:small_cnn?width=4"


def small_timm(num_classes: int):
    import timm
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": 0.875}).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(dh.write_folder(tmp_path_factory.mktemp("classes") / "folder", per_class=2))


def test_folder_with_other_classes_is_refused_without_a_map(folder, tmp_path):
    model = small_timm(10)  # a head without class names: digit0/3/7 cannot be matched by name
    with pytest.raises(errors.DataError, match=r"3 classes for a model with 10 outputs.*\?classes=FILE"):
        load_data(folder, model=model, progress=False)
    assert load_data(folder, model=small_timm(3), progress=False).label_map is None  # one to one: as it is
    cmap = tmp_path / "map.txt"
    cmap.write_text("digit0 0\ndigit3 3\ndigit7 7\n")
    try:
        set_decoding(class_map=str(cmap))  # --class-map: every dataset that does not fit, unless it names its own
        assert load_data(folder, model=model, progress=False).label_map == [[0], [3], [7]]
    finally:
        set_decoding()


def test_tensor_file_labels_are_output_indices(tmp_path):
    torch.manual_seed(0)
    f = tmp_path / "five.pt"
    torch.save({"x": torch.randn(20, 1, 8, 8), "y": torch.arange(20) % 5}, f)
    net = build_model(CNN, num_classes=10)
    assert load_data(str(f), model=net).label_map is None  # labels 0–4 are outputs 0–4, by the file's own statement
    torch.save({"x": torch.randn(20, 1, 8, 8), "y": torch.arange(20) % 12}, f)
    with pytest.raises(errors.DataError, match="12 classes for a model with 10 outputs"):
        load_data(str(f), model=net)


def test_cli_head_from_checkpoint_and_class_map(tmp_path, cli):
    torch.manual_seed(0)
    ck = tmp_path / "twelve.safetensors"
    ws.save(build_model(CNN, num_classes=12).state_dict(), ck)  # a 12-output head; digits has 10 classes
    args = ("leaderboard", str(ck), "--model", CNN, "--data", "digits:test?limit=40", "--json", "--quiet")
    r = cli(*args)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "10 classes for a model with 12 outputs" in r.stderr and "--class-map" in r.stderr
    cmap = tmp_path / "digits.txt"
    cmap.write_text("".join(f"{i} {i}\n" for i in range(10)))
    r = cli(*args, "--class-map", str(cmap))
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)["leaderboard"]["rows"][0]
    assert row["metrics"]["digits:test?limit=40"]["n"] == 40  # the head was sized by the checkpoint, not the data
    r = cli(*args, "--num-classes", "10")  # an explicit head size still wins, and then the checkpoint does not fit
    assert r.exit_code == 2 and "twelve.safetensors" in r.stderr


def test_limit_draws_a_seeded_class_stratified_subset(tmp_path):
    """?limit=N of a class-sorted folder (issue 20.9): every class, in proportion, seeded and recorded."""
    root = dh.write_folder(tmp_path / "sorted", per_class=6)  # digit0 ×6, digit3 ×6, digit7 ×6, in that order
    model = small_timm(3)
    full = load_data(str(root), model=model, progress=False)
    assert full.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # the first 6 files would be one class
    d = load_data(f"{root}?limit=6", model=model, progress=False)
    assert torch.bincount(d.y, minlength=3).tolist() == [2, 2, 2]
    assert d.meta["subset"] == {"limit": 6, "seed": 0, "rule": "class-stratified"}
    again = load_data(f"{root}?limit=6", model=model, progress=False)
    assert torch.equal(again.x, d.x) and torch.equal(again.y, d.y)  # the same seed, the same subset
    other = load_data(f"{root}?limit=6&seed=1", model=model, progress=False)
    assert other.meta["subset"]["seed"] == 1 and torch.bincount(other.y, minlength=3).tolist() == [2, 2, 2]
    assert not torch.equal(other.x, d.x)
    rows = {tuple(r.flatten().tolist()) for r in full.x}
    assert all(tuple(r.flatten().tolist()) in rows for r in d.x)  # a subset of the set's own examples
    digits = load_data("digits:test?limit=25")
    assert (torch.bincount(digits.y, minlength=10) >= 2).all()  # 10 classes, every one present
    with pytest.raises(errors.ConfigError, match="seed= draws the"):
        load_data("digits:test?seed=2")
