"""GPU checks, run by bench/gpu_check.sh (`pytest -m gpu`) and deselected everywhere else (pyproject's addopts):
the Evaluator on CUDA with bf16 autocast agrees with float32 on the CPU, with the data resident on the GPU.

WEIGHTSPACE_TEST_DEVICE (default cuda) picks the device; `bench/gpu_check.sh --cpu-smoke` sets it to cpu to check
that these tests run at all on a machine without a GPU (CPU against CPU then, so only the plumbing is checked).
"""
from __future__ import annotations

import os

import numpy as np

import pytest
import torch

from evalhelpers import CNN, save_all, train_cnns

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = torch.device(os.environ.get("WEIGHTSPACE_TEST_DEVICE", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("GPU tests need CUDA: run them with bench/gpu_check.sh on a GPU machine (make test deselects them)")
    return dev


@pytest.fixture(scope="module")
def cnns(tmp_path_factory) -> list[str]:
    """Two small CNNs fine-tuned on digits:train from one init (BatchNorm, so the curve has a real shape)."""
    return save_all(train_cnns([1, 2], shared_init=True, epochs=2), tmp_path_factory.mktemp("gpu"), "cnn")


def evaluators(device: torch.device, specs: list[str]):
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    data = [load_data(s) for s in specs]
    cpu = Evaluator(build_model(CNN, num_classes=10), data, batch_size=128, device="cpu", keep_logits=True)
    gpu = Evaluator(build_model(CNN, num_classes=10), data, batch_size=128, device=device, keep_logits=True)
    return cpu, gpu


def test_amp_on_gpu_matches_fp32_on_cpu(device, cnns):
    cpu, gpu = evaluators(device, ["digits:val", "digits:test"])
    assert gpu.amp == (device.type == "cuda")
    assert all(d.x.device.type == device.type for d in gpu.datasets.values())  # resident, not streamed
    for ck in cnns:
        ref, got = cpu(ck), gpu(ck)
        for name in ref:
            assert ref[name]["accuracy"] > 0.8  # really trained, so agreement means something
            agree = float((ref.logits[name].argmax(1) == got.logits[name].argmax(1)).double().mean())
            assert agree >= 0.98, (name, agree)
            assert abs(got[name]["accuracy"] - ref[name]["accuracy"]) <= 0.01
            assert got[name]["loss"] == pytest.approx(ref[name]["loss"], rel=0.03, abs=2e-3)


def test_barrier_curve_on_gpu_matches_cpu(device, cnns):
    from weightspace.analysis.curve import interpolation_curve
    cpu, gpu = evaluators(device, ["digits:val"])
    ref = interpolation_curve(cnns[0], cnns[1], cpu, steps=5, progress=False)
    got = interpolation_curve(cnns[0], cnns[1], gpu, steps=5, progress=False)
    assert got.alphas == ref.alphas
    for r, g in zip(ref.metrics, got.metrics):
        assert abs(g["digits:val"]["accuracy"] - r["digits:val"]["accuracy"]) <= 0.01
        assert g["digits:val"]["loss"] == pytest.approx(r["digits:val"]["loss"], rel=0.03, abs=2e-3)
    for metric in ("error", "loss"):
        assert abs(got.barriers["digits:val"][metric]["chord"] - ref.barriers["digits:val"][metric]["chord"]) <= 0.02


def test_jpeg_folder_as_uint8_on_the_device_streamed_and_gpu_decoded(device, tmp_path, monkeypatch):
    """uint8 images resident on the device (channels-last, bf16) and streamed from the memory map in pinned chunks
    agree with float32 on the CPU; JPEGs decoded on the device are close to PIL's pixels."""
    import timm
    import datahelpers as dh
    from weightspace.eval.data import load_data
    from weightspace.eval.data.decode import gpu_decode_into
    from weightspace.eval.data.readers import FolderSource
    from weightspace.eval.evaluator import Evaluator
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(tmp_path / "cache"))
    root = dh.write_folder(tmp_path / "set", per_class=8)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3, pretrained_cfg_overlay={"input_size": (3, 64, 64)}).eval()
    d = load_data(str(root), model=model, progress=False)
    cpu = Evaluator(model, d, device="cpu", keep_logits=True)().logits[d.name]
    resident = Evaluator(model, d, device=device, batch_size=8, keep_logits=True)
    streamed = Evaluator(model, d, device=device, batch_size=8, keep_logits=True, stream=True, chunk_bytes=16 * 3 * 64 * 64)
    a, b = resident().logits[d.name], streamed().logits[d.name]
    assert torch.equal(a, b)
    assert (a - cpu).abs().max() < 0.05 * cpu.abs().max()
    pipe = __import__("weightspace.eval.data.decode", fromlist=["pixel_pipeline"]).pixel_pipeline(
        timm.data.create_transform(**timm.data.resolve_data_config({}, model=model)))
    out = np.zeros_like(d.x.numpy())
    rep = gpu_decode_into(FolderSource(root, str(root)), pipe, out, device=device, progress=False)
    assert rep.bad == [] and np.abs(out.astype(float) - d.x.numpy()).mean() < 1.0  # of 255: resampling differs


def test_ops_on_the_device_match_the_cpu(device, tmp_path):
    """--device for ops: a soup and a TIES merge combined on the device equal the CPU's up to a fused multiply-add
    (one rounding), and are the same across thread counts."""
    import safetensors.torch as st

    import weightspace as ws
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        st.save_file({"w": torch.randn(300, 1001, generator=g), "b": torch.randn(77, generator=g).bfloat16(),
                      "n": torch.tensor([i])}, paths[-1])
    for make in (lambda **kw: ws.uniform_soup_stream(paths, **kw),
                 lambda **kw: ws.merge("ties", paths[0], paths[1:], keep=0.3, **kw)):
        cpu = make(device="cpu", threads=2).materialise()
        runs = [make(device=str(device), threads=t, max_memory=1).materialise() for t in (1, 3)]
        for k in cpu:
            assert torch.equal(runs[0][k], runs[1][k]), k
            assert torch.allclose(runs[0][k].float(), cpu[k].float(), rtol=1e-5, atol=1e-6), k
