"""Evaluation memory on the CPU (issue 20.10): the default batch size comes from an activation budget, and says so."""
from __future__ import annotations

import torch

import weightspace as ws
from weightspace.eval.batching import ACTIVATION_BUDGET, PEAK_FACTOR, activation_bytes, auto_batch_size
from weightspace.eval.data import load_data
from weightspace.eval.models import build_model

CNN = "weightspace.eval.zoo:small_cnn?width=4"


def test_batch_size_follows_the_widest_activation():
    net = build_model(CNN, num_classes=10)
    d = load_data("digits:val")
    # small_cnn?width=4 on 1×8×8 digits: the widest output is conv2's (and bn2's), 8 channels × 8 × 8 float32
    per = 1 * 8 * 8 * 4 + PEAK_FACTOR * 8 * 8 * 8 * 4
    assert activation_bytes(net, d, torch.device("cpu")) == per
    batch, note = auto_batch_size(net, d, torch.device("cpu"), budget=100 * per + 5)
    assert batch == 100 and note.startswith("evaluation batch size 100: activations ≈")
    assert auto_batch_size(net, d, torch.device("cpu"), budget=per // 2)[0] == 1  # never below one example
    assert auto_batch_size(net, d, torch.device("cpu"))[0] == 256  # the cap: 8×8 digits are small
    big = build_model("timm:resnet18", num_classes=10)
    images = ws.eval.TensorData("big", torch.zeros(2, 3, 224, 224), torch.zeros(2, dtype=torch.long))
    b, _ = auto_batch_size(big, images, torch.device("cpu"))
    assert 1 <= b < 256 and b * activation_bytes(big, images, torch.device("cpu")) <= ACTIVATION_BUDGET


def test_evaluator_chooses_and_reports_its_cpu_batch(cli, tmp_path):
    net = build_model(CNN, num_classes=10)
    d = load_data("digits:val")
    ev = ws.Evaluator(net, d, device="cpu")
    assert ev.batch_size == 256 and "evaluation batch size 256" in ev.batch_note
    assert ws.Evaluator(net, d, device="cpu", batch_size=32).batch_note is None  # the user's own choice
    assert ev.derive().batch_size == 256
    ck = tmp_path / "a.safetensors"
    ws.save(net.state_dict(), ck)
    r = cli("leaderboard", str(ck), "--model", CNN, "--data", "digits:val", "--device", "cpu")
    assert r.exit_code == 0 and "evaluation batch size 256: activations ≈" in r.stderr, r.stderr
    r = cli("leaderboard", str(ck), "--model", CNN, "--data", "digits:val", "--device", "cpu", "--batch-size", "64")
    assert r.exit_code == 0 and "evaluation batch size" not in r.stderr
