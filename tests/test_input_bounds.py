"""Inputs must be regular files (issue 19, guarantee 7): a checkpoint or config that is a FIFO, a device or a socket
is refused at once, in one line, before anything opens it for reading (a FIFO would block, /dev/zero never end)."""
from __future__ import annotations

import os
import signal
import socket

import pytest
import safetensors.torch as st
import torch


@pytest.fixture
def alarm():
    """Fail instead of hanging when a regression blocks on a FIFO."""
    def hung(*_):
        raise AssertionError("blocked on a non-regular input")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def one_line(r, needle: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "fifo in a folder", "index fifo"])
def test_a_checkpoint_must_be_a_regular_file(kind, tmp_path, cli, alarm):
    good = tmp_path / "good.safetensors"
    st.save_file({"w": torch.ones(2)}, good)
    if kind == "device":
        bad = "/dev/zero"
    elif kind == "socket":
        bad = tmp_path / "s.safetensors"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(bad))
    elif kind == "fifo in a folder":
        (tmp_path / "hf").mkdir()
        os.mkfifo(tmp_path / "hf" / "weights.safetensors")
        bad = tmp_path / "hf"
    else:
        bad = tmp_path / ("model.safetensors.index.json" if kind == "index fifo" else "f.safetensors")
        os.mkfifo(bad)
    for args in (("inspect", bad), ("soup", good, bad, "-o", tmp_path / "out.safetensors")):
        one_line(cli(*args), "not a regular file")
    assert not (tmp_path / "out.safetensors").exists()
    st.save_file({"w": torch.ones(2)}, tmp_path / "control.safetensors")  # negative control: a regular file loads
    assert cli("inspect", tmp_path / "control.safetensors").exit_code == 0


@pytest.mark.parametrize("verb", ["merge", "recipe"])
def test_a_config_must_be_a_regular_file(verb, tmp_path, cli, alarm):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    args = ("merge", "--config", fifo, "-o", tmp_path / "o.safetensors") if verb == "merge" else \
        ("recipe", "run", fifo, "--out", tmp_path / "run")
    one_line(cli(*args), "not a regular")
    assert not (tmp_path / "run").exists()


def test_one_huge_label_does_not_make_a_billion_classes(tmp_path, cli):
    """A label names its class by index: one label of 10**9 in a small file is refused, not a 10**9-way head."""
    from weightspace.errors import ConfigError
    from weightspace.eval import load_data
    p = tmp_path / "t.pt"
    torch.save({"x": torch.zeros(3, 4), "y": torch.tensor([0, 1, 10 ** 9])}, p)
    with pytest.raises(ConfigError, match="implies 1,000,000,001 classes"):
        load_data(str(p), progress=False)
    torch.save({"x": torch.zeros(3, 4), "y": torch.tensor([0, 1, 2])}, p)  # negative control
    assert load_data(str(p), progress=False).num_classes == 3
