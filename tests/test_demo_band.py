"""The demo's hyperparameter band: its recipes' names (the docs use the first three), label smoothing in the
training loop (one SGD step checked against a hand-written one) and the two-pixel shift augmentation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from weightspace.eval.data import load_data
from weightspace.eval.models import build_model
from weightspace.eval.train import AUGMENTATIONS, train
from weightspace.experiments.demo import BAND, SIZES, Recipe, checkpoint_names


def test_band_names_and_schedules():
    # the reduced run trains the first three; the docs name their checkpoints
    assert checkpoint_names(SIZES["small"])[2:5] == ["ft0-lr0.005-none.safetensors", "ft1-lr0.005-shift.safetensors",
                                                      "ft2-lr0.01-none.safetensors"]
    assert Recipe(0.4, "shift", 0.0, 3).name(11) == "ft11-lr0.4-shift-x3"
    assert Recipe(0.02, "none", 0.1, 2).name(4) == "ft4-lr0.02-none-ls0.1-x2"
    assert [Recipe(0.01, schedule=s).epochs(SIZES["full"]) for s in (0.5, 1, 3)] == [5, 10, 30]
    assert SIZES["full"].ingredients == len(BAND) and all(r.augment in AUGMENTATIONS for r in BAND)
    # wide on every axis the band sweeps
    assert max(r.lr for r in BAND) / min(r.lr for r in BAND) >= 50
    assert {r.label_smoothing for r in BAND} >= {0.0, 0.1, 0.2} and {r.schedule for r in BAND} >= {0.5, 1, 2, 3}


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_label_smoothing_is_the_loss_trained_on(smoothing):
    """One full-batch SGD step (no momentum, constant rate) equals a hand-written step on the smoothed loss, and
    differs from the step on the other loss (the negative control)."""
    data = load_data("digits:train")
    torch.manual_seed(0)
    model = build_model("weightspace.eval.zoo:small_cnn", num_classes=10)
    ref = copy.deepcopy(model)
    train(model, data, epochs=1, lr=0.1, momentum=0.0, batch_size=len(data), schedule="constant", seed=0,
          label_smoothing=smoothing)

    def stepped(ls: float) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(ref).train()
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        x, y = data.prepare(data.x[perm]), data.y[perm]
        F.cross_entropy(m(x), y, label_smoothing=ls).backward()
        return {n: p.detach() - 0.1 * p.grad for n, p in m.named_parameters()}

    got = dict(model.named_parameters())
    same = stepped(smoothing)
    assert all(torch.allclose(got[n], same[n], atol=1e-6) for n in same)
    other = stepped(0.2 - smoothing)
    assert not all(torch.allclose(got[n], other[n], atol=1e-6) for n in other)


def test_shift2_moves_images_up_to_two_pixels():
    x = torch.full((1, 1, 9, 9), -1.0)
    x[0, 0, 4, 4] = 1.0
    offsets = set()
    for s in range(40):
        out = AUGMENTATIONS["shift2"](x, torch.Generator().manual_seed(s))
        r, c = (int(v) for v in (out[0, 0] == 1.0).nonzero()[0])
        offsets.add((r - 4, c - 4))
    assert max(max(abs(a), abs(b)) for a, b in offsets) == 2 and len(offsets) > 9
    one = {tuple(int(v) - 4 for v in (AUGMENTATIONS["shift"](x, torch.Generator().manual_seed(s))[0, 0] == 1.0)
                 .nonzero()[0]) for s in range(40)}
    assert max(max(abs(a), abs(b)) for a, b in one) == 1
