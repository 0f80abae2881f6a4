"""The everyday verbs that read only headers start without torch (``bench/cli_startup.py`` times them), and say
what the full loading path says."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightspace as ws
from weightspace.io.header import header_only_view

# Runs the CLI in a fresh interpreter and reports, after the command, whether torch was imported.
RUN = """
import sys
from weightspace_cli.main import main
try:
    main(sys.argv[1:], prog_name="weightspace")
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def _run(args: list[str], cwd: Path) -> tuple[str, bool]:
    env = {**os.environ, "WEIGHTSPACE_DATA_CACHE": str(cwd / "cache")}
    done = subprocess.run([sys.executable, "-c", RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("torch imported:"), done.stderr
    return done.stdout, last.endswith("True")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    save_file({"b": torch.zeros(3, dtype=torch.bfloat16), "a.weight": torch.ones(2, 2),
               "n": torch.tensor(7)}, tmp_path / "x.safetensors", metadata={"note": "hand-made"})
    save_file({"a.weight": torch.ones(2, 3), "c": torch.ones(1, dtype=torch.float16)}, tmp_path / "y.safetensors")
    ws.save(ws.uniform_soup([tmp_path / "x.safetensors"] * 2), tmp_path / "soup.safetensors")
    return tmp_path


@pytest.mark.parametrize("args", [["inspect", "x.safetensors"], ["inspect", "soup.safetensors", "--json"],
                                  ["diff", "x.safetensors", "y.safetensors"], ["methods"], ["data", "ls"],
                                  ["--help"], ["soup", "--help"], ["merge", "--help"]])
def test_header_verbs_do_not_import_torch(files, args):
    out, torch_imported = _run(args, files)
    assert out and not torch_imported


def test_a_verb_that_reads_tensors_does_import_torch(files):
    """The negative control: the check above does see torch when a verb needs it."""
    out, torch_imported = _run(["distance", "x.safetensors", "soup.safetensors", "--json"], files)
    assert json.loads(out)["total"]["l2"] == 0.0 and torch_imported


def test_the_header_path_says_what_loading_says(files, cli, monkeypatch):
    monkeypatch.chdir(files)
    for name in ("x.safetensors", "soup.safetensors", str(files / "y.safetensors")):
        fast = json.loads(cli("inspect", name, "--json").stdout)
        full = json.loads(cli("inspect", name, "--json", "--ema").stdout)  # --ema takes the loading path
        assert fast == full, name
        assert cli("inspect", name).stdout == cli("inspect", name, "--ema").stdout
    fast = cli("diff", "x.safetensors", "y.safetensors", "--json")
    full = cli("diff", "x.safetensors", "y.safetensors", "--json", "--ema")
    assert fast.exit_code == full.exit_code == 1 and json.loads(fast.stdout) == json.loads(full.stdout)
    assert json.loads(fast.stdout)["mismatched"][0]["a"] == {"dtype": "float32", "shape": [2, 2]}


def test_names_that_loading_changes_take_the_loading_path(files):
    """Wrapper prefixes and EMA copies are resolved by loading; the header path steps aside for them."""
    assert header_only_view(str(files / "x.safetensors")) is not None
    save_file({"module.w": torch.ones(2)}, files / "ddp.safetensors")
    save_file({"w": torch.ones(2), "ema.w": torch.zeros(2)}, files / "ema.safetensors")
    save_file({"w": torch.ones(0, 2)}, files / "empty.safetensors")  # torch alone judges an empty tensor's shape
    for name in ("ddp", "ema", "empty"):
        assert header_only_view(str(files / f"{name}.safetensors")) is None, name
    assert header_only_view(f"{files / 'x.safetensors'}?prefix=a.") is None
