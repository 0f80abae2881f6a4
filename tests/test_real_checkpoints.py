"""Checkpoints that other projects ship, read as they are: a legacy LSTM pickle whose tensors are views of one
storage (Resemblyzer), and the synthetic controls that keep the storage guards honest."""
from __future__ import annotations

import struct

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
    ck = load(path, strip_prefix="model_state.")
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
