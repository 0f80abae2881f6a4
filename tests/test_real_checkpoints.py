"""Checkpoints that other projects ship, read as they are: a legacy LSTM pickle whose tensors are views of one
storage (Resemblyzer), CUDA-saved training checkpoints with optimizer and scheduler state (chgnet), synthetic
Lightning and timm-train layouts, and the controls that keep the storage guards and the container rules honest."""
from __future__ import annotations

import struct

import pytest
import safetensors.torch as st
import torch

from realweights import wheel_file
from weightspace.errors import CheckpointError
from weightspace.io import load


def _one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_resemblyzer_legacy_lstm_pickle_loads_as_torch_loads_it(cli):
    """pretrained.pt is a legacy (non-zip) pickle saved on CUDA whose twelve LSTM tensors are views of one
    5.4 MB storage: counted once per view it looked like 77 MB declared in a 17 MB file."""
    path = wheel_file("resemblyzer", "pretrained.pt")
    ref = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    assert len({t.untyped_storage().data_ptr() for k, t in ref.items() if k.startswith("lstm.")}) == 1
    ck = load(path)
    assert set(ref) == set(ck)
    for k, t in ref.items():
        assert torch.equal(ck[k], t), k
    r = cli("inspect", path)
    assert r.exit_code == 0, r.stderr
    assert "lstm.weight_hh_l2" in r.stdout


def _legacy_shared(path, n: int = 4) -> None:
    base = torch.arange(4 * n, dtype=torch.float32)
    torch.save({f"w{i}": base[4 * i:4 * i + 4] for i in range(n)}, path, _use_new_zipfile_serialization=False)


def test_views_of_one_legacy_storage_are_counted_once(tmp_path):
    path = tmp_path / "views.pt"
    _legacy_shared(path, n=64)  # 64 views of 1 KB: 64 KB if each were counted, more than the file holds
    assert path.stat().st_size < 64 * 256
    ck = load(path)
    assert [ck[f"w{i}"].tolist() for i in (0, 63)] == [[0, 1, 2, 3], [252, 253, 254, 255]]


def test_shared_legacy_storage_declaring_too_much_is_still_refused(cli, tmp_path):
    """Negative control: counting a storage once must not let a patched size through."""
    path = tmp_path / "views.pt"
    _legacy_shared(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"X\x03\x00\x00\x00cpuq") + 9
    at = data.index(b"K\x10", at)  # the shared storage's 16 elements
    data[at:at + 2] = b"J" + struct.pack("<i", 2**31 - 1)
    patched = tmp_path / "patched.pt"
    patched.write_bytes(bytes(data))
    msg = _one_line(cli("inspect", patched))
    assert str(patched) in msg and "declares 8,589,934,588 bytes" in msg


def test_expanded_view_of_a_shared_legacy_storage_is_still_refused(tmp_path):
    """Negative control: a view that grows once materialised stays refused in the legacy format too."""
    path = tmp_path / "expanded.pt"
    base = torch.zeros(4)
    torch.save({"a": base[:2], "b": base[:1].expand(10**9)}, path, _use_new_zipfile_serialization=False)
    try:
        load(path)
    except CheckpointError as e:
        assert "'b'" in str(e) and "--allow-expanded" in str(e)
    else:
        raise AssertionError("an expanded view was loaded")


# training checkpoints -----------------------------------------------------------------------------------------------

CHGNET = ("0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar", "r2scan/chgnet_r2scan_transfer_learning_e15f36s161m23.pth.tar")


def test_resemblyzer_optimizer_state_is_left_out_with_a_note(cli):
    path = wheel_file("resemblyzer", "pretrained.pt")
    ck = load(path)
    assert len(ck) == 16 and not any("exp_avg" in k or k.startswith("optimizer") for k in ck)
    assert "optimizer_state (optimizer)" in ck.variant and "step" in ck.variant
    r = cli("inspect", path)
    assert r.exit_code == 0 and "tensors:  16" in r.stdout and "left out: optimizer_state (optimizer)" in r.stdout


def test_chgnet_training_checkpoints_soup_their_model_weights_only(cli, tmp_path):
    """{model: {state_dict, model_args}, optimizer, scheduler, training_history, trainer_args}, saved on CUDA:
    the soup is the mean of the two model state dicts, and no Adam moment reaches it."""
    paths = [wheel_file("chgnet", "pretrained", *name.split("/")) for name in CHGNET]
    refs = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    assert all("optimizer" in r and "scheduler" in r for r in refs)
    out = tmp_path / "soup.safetensors"
    r = cli("soup", *paths, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "left out: optimizer (optimizer); scheduler (scheduler)" in r.stderr
    got = st.load_file(out)
    a, b = (ref["model"]["state_dict"] for ref in refs)
    assert set(got) == set(a) == set(b)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(got[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6), k


def _opt_state() -> dict:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


SD = {"fc.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.zeros(2)}
SCHED = {"last_epoch": 9, "base_lrs": [0.1], "_step_count": 10}
SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 3}


@pytest.mark.parametrize("layout, expect_keys, expect_note", [
    ({"epoch": 4, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": {f"model.{k}": v for k, v in
      SD.items()}, "optimizer_states": [_opt_state()], "lr_schedulers": [SCHED], "hyper_parameters": {"lr": 0.1}},
     {"model.fc.weight", "model.fc.bias"}, "optimizer_states (optimizer); lr_schedulers (scheduler)"),
    ({"epoch": 4, "arch": "resnet18", "state_dict": SD, "optimizer": _opt_state(), "version": 2, "metric": 0.7,
      "state_dict_ema": {k: v + 1 for k, v in SD.items()}}, set(SD), "optimizer (optimizer)"),
    ({"model": SD, "optimizer": _opt_state(), "lr_scheduler": SCHED, "scaler": SCALER, "epoch": 4},
     set(SD), "scaler (scaler)"),
    ({"weights": SD, "optim": _opt_state(), "step": 7}, set(SD), "optim (optimizer)"),
])
def test_synthetic_training_layouts(tmp_path, layout, expect_keys, expect_note):
    path = tmp_path / "train.ckpt"
    torch.save(layout, path)
    ck = load(path)
    assert set(ck) == expect_keys
    assert expect_note in ck.variant
    assert not any("exp_avg" in k or "param_groups" in k for k in ck)


def test_timm_train_checkpoint_ema_is_picked_on_request(tmp_path):
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 4, "state_dict": SD, "state_dict_ema": {k: v + 1 for k, v in SD.items()},
                "optimizer": _opt_state()}, path)
    assert torch.equal(load(path)["fc.bias"], torch.zeros(2))
    assert torch.equal(load(path, ema=True)["fc.bias"], torch.ones(2))


def test_ambiguous_layout_is_refused_with_the_candidates_and_key_picks_one(cli, tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"model": SD, "model_state": {k: v * 2 for k, v in SD.items()}, "optimizer": _opt_state()}, path)
    msg = _one_line(cli("inspect", path))
    assert "'model_state', 'model'" in msg and f"{path}?key=model_state" in msg
    picked = load(f"{path}?key=model_state")
    assert torch.equal(picked["fc.weight"], SD["fc.weight"] * 2)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"state_dict": SD, "model_args": {"n": 3}}, "model_state": SD}, nested)
    assert "?key=" in _one_line(cli("inspect", nested))
    assert set(load(f"{nested}?key=model/state_dict")) == set(SD)
    msg = _one_line(cli("inspect", f"{nested}?key=model/weights"))
    assert "no entry 'weights'" in msg


def test_same_container_under_two_names_is_not_ambiguous(tmp_path):
    """Control: 'model' and 'state_dict' naming one dict (as some scripts save it) is one candidate."""
    path = tmp_path / "aliased.pt"
    torch.save({"model": SD, "state_dict": SD, "epoch": 1}, path)
    assert set(load(path)) == set(SD)


def test_plain_nested_state_dict_is_still_flattened(tmp_path):
    """Control: a state dict nested by module with no training state around it keeps its dotted names."""
    path = tmp_path / "nested.pt"
    torch.save({"encoder": {"w": torch.ones(2)}, "decoder": {"w": torch.zeros(2)}}, path)
    assert set(load(path)) == {"encoder.w", "decoder.w"}


def test_python_api_picks_an_entry_with_key():
    """In memory as on disk: an ambiguous training dict is refused naming ``key=``, and ``key=`` picks."""
    both = {"model": SD, "model_state": {k: v * 2 for k, v in SD.items()}, "optimizer": _opt_state()}
    with pytest.raises(CheckpointError, match=r"key='model_state'"):
        load(both)
    assert torch.equal(load(both, key="model_state")["fc.weight"], SD["fc.weight"] * 2)
