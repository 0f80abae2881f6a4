"""Evaluator, models, data and BN recalibration on really trained tiny models and real digits."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import weightspace as ws
from weightspace import errors
from weightspace.eval.data import load_data
from weightspace.eval.evaluator import Evaluator, macro_auc, recalibrate_bn
from weightspace.eval.models import build_model
from weightspace.eval.train import train


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_model("weightspace.eval.zoo:small_cnn", num_classes=10)
    train(model, load_data("digits:train"), epochs=3, lr=0.05, seed=0)
    return model


def test_evaluator_matches_hand_written_loop(trained):
    data = load_data("digits:test")
    fresh = build_model("weightspace.eval.zoo:small_cnn", num_classes=10)
    ev = Evaluator(fresh, data, batch_size=37, device="cpu")
    m = ev(trained.state_dict())
    correct, loss_sum = 0, 0.0
    trained.eval()
    with torch.no_grad():
        for i in range(len(data)):
            logit = trained(data.x[i:i + 1])
            correct += int(logit.argmax(1).item() == data.y[i].item())
            loss_sum += F.cross_entropy(logit, data.y[i:i + 1]).item()
    assert m["digits:test"]["accuracy"] == pytest.approx(correct / len(data), abs=1e-12)
    assert m["digits:test"]["loss"] == pytest.approx(loss_sum / len(data), rel=1e-4)
    assert m["digits:test"]["accuracy"] > 0.8  # really trained
    assert float(m) == m["digits:test"]["accuracy"]


def test_weights_are_copied_in_place_into_one_instance(trained, tmp_path):
    fresh = build_model("weightspace.eval.zoo:small_cnn", num_classes=10)
    ev = Evaluator(fresh, load_data("digits:val"), device="cpu")
    ptr = fresh.conv1.weight.data_ptr()
    path = tmp_path / "m.safetensors"
    ws.save(trained.state_dict(), path)
    from_file = ev(str(path))
    from_dict = ev(trained.state_dict())
    assert fresh.conv1.weight.data_ptr() == ptr
    assert from_file["digits:val"] == from_dict["digits:val"]


def test_missing_and_unexpected_keys_are_one_line(trained):
    ev = Evaluator(build_model("weightspace.eval.zoo:small_cnn", num_classes=10), load_data("digits:val"), device="cpu")
    sd = dict(trained.state_dict())
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(errors.IncompatibleCheckpoints) as e:
        ev(sd)
    assert "fc.bias" in str(e.value) and "extra.weight" in str(e.value) and "\n" not in str(e.value)


def test_evaluator_contract_is_checked_with_protocols_not_duck_tests(trained):
    from weightspace.eval.contract import FitsKeys, LoadsWeights, MultiDataset, TellsMembers
    from weightspace.eval.repair import FixedEvaluator
    ev = Evaluator(build_model("weightspace.eval.zoo:small_cnn", num_classes=10),
                   [load_data("digits:val"), load_data("digits:test")], device="cpu")
    assert isinstance(ev, LoadsWeights) and isinstance(ev, FitsKeys) and isinstance(ev, MultiDataset)
    assert not isinstance(ev, TellsMembers)

    def score(weights):
        return 0.5
    assert not any(isinstance(score, p) for p in (LoadsWeights, FitsKeys, MultiDataset, TellsMembers))
    fixed = FixedEvaluator.wrap(ev, recalibrate_bn=load_data("digits:train"))
    assert isinstance(fixed, TellsMembers) and isinstance(fixed, LoadsWeights)


def test_derive_shares_model_and_placed_data(trained):
    """derive builds a variant from the evaluator's own options: same model, same tensors, a subset of datasets."""
    from weightspace.eval.repair import FixedEvaluator
    model = build_model("weightspace.eval.zoo:small_cnn", num_classes=10)
    ev = Evaluator(model, [load_data("digits:val"), load_data("digits:test")], batch_size=64, device="cpu",
                   keep_logits=True)
    view = ev.derive(datasets=["digits:val"], keep_logits=False)
    assert type(view) is Evaluator and view.model is model and list(view.datasets) == ["digits:val"]
    assert view.datasets["digits:val"].x.data_ptr() == ev.datasets["digits:val"].x.data_ptr()
    assert view.batch_size == 64 and not view.keep_logits and ev.keep_logits
    full = ev(trained.state_dict())
    assert view()["digits:val"] == full["digits:val"]  # the weights loaded through ev are the view's too
    with pytest.raises(errors.ConfigError, match="digits:nope"):
        ev.derive(datasets=["digits:nope"])
    # A FixedEvaluator's variant keeps its fixes (the same recalibration data, no new measurement).
    fixed = FixedEvaluator.wrap(ev, recalibrate_bn=load_data("digits:train"))
    assert fixed.model is model and fixed.datasets["digits:test"].x.data_ptr() == ev.datasets["digits:test"].x.data_ptr()
    fview = fixed.derive(datasets=["digits:val"])
    assert type(fview) is FixedEvaluator and fview.recal_data is fixed.recal_data and fview.model is model
    assert fview(trained.state_dict())["digits:val"] == fixed(trained.state_dict())["digits:val"]


def test_recalibrate_bn_matches_update_bn(trained):
    data = load_data("digits:train")
    a, b = copy.deepcopy(trained), copy.deepcopy(trained)
    recalibrate_bn(a, data, batch_size=64)
    loader = [xb for xb, _ in data.batches(64)]
    torch.optim.swa_utils.update_bn(loader, b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), ka


def test_macro_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(3)
    y = (rng.random((200, 4)) > 0.6).astype(np.float32)
    s = rng.normal(size=(200, 4)) + y * 1.5
    s[:20, 0] = 0.5  # ties
    ours = macro_auc(torch.tensor(s), torch.tensor(y))
    assert ours == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-9)


def test_data_specs(tmp_path):
    tr, va, te = (load_data(f"digits:{s}") for s in ("train", "val", "test"))
    assert len(tr) + len(va) + len(te) == 1797
    assert set(tr.y.unique().tolist()) == set(range(10))
    big = load_data("digits:test?size=32&channels=3")
    assert big.x.shape[1:] == (3, 32, 32)
    np.savez(tmp_path / "d.npz", x=te.x.numpy(), y=te.y.numpy())
    back = load_data(str(tmp_path / "d.npz"))
    assert torch.equal(back.x, te.x) and torch.equal(back.y, te.y)
    torch.save({"x": te.x, "y": te.y}, tmp_path / "d.pt")
    assert torch.equal(load_data(str(tmp_path / "d.pt")).y, te.y)
    with pytest.raises(errors.ConfigError):
        load_data("digits:nope")
    with pytest.raises(errors.ConfigError):
        load_data(str(tmp_path / "missing.pt"))


def test_timm_model_spec_and_custom_factory():
    m = build_model("timm:resnet18", num_classes=10, in_chans=1)
    assert m.fc.out_features == 10
    ev = Evaluator(m, load_data("digits:test?limit=64"), device="cpu")
    r = ev()
    assert 0.0 <= r["digits:test?limit=64"]["accuracy"] <= 1.0 and r["digits:test?limit=64"]["n"] == 64
    with pytest.raises(errors.ConfigError):
        build_model("nosuchpkg.mod:factory")
    with pytest.raises(errors.ConfigError):
        build_model("weightspace.eval.zoo:nope")


def test_image_folder_is_decoded_once_with_the_models_timm_transform(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    for label in (3, 7):
        (tmp_path / f"digit{label}").mkdir()
        idx = np.flatnonzero(d.target == label)[:6]
        for i in idx:
            img = (d.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img).convert("RGB").resize((40, 40)).save(tmp_path / f"digit{label}" / f"{i}.png")
    model = build_model("timm:resnet18", num_classes=2)
    data = load_data(str(tmp_path), model=model)
    assert data.x.shape == (12, 3, 224, 224)  # timm's eval transform for resnet18 (resize + centre crop)
    assert data.y.tolist() == [0] * 6 + [1] * 6 and data.meta["classes"] == ["digit3", "digit7"]
    r = Evaluator(model, data, device="cpu", batch_size=6)()
    assert r[str(tmp_path)]["n"] == 12
