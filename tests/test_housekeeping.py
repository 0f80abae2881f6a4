"""What a user sees around the work: progress bars on odd terminals, and `make test` cleaning up after itself."""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stderr_on_a_pty(code: str, columns: int) -> str:
    """Run ``code`` with stderr on a pseudo-terminal that reports ``columns`` columns; returns what it drew."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL, env=env)
    os.close(slave)
    out = b""
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait() == 0
    return out.decode("utf-8", "replace")


def test_progress_bar_is_drawn_on_a_terminal_reporting_zero_columns():
    code = ("import time\nfrom weightspace.progress import progress\n"
            "for _ in progress(range(3), desc='work', mininterval=0):\n    time.sleep(0.02)\n")
    drawn = _stderr_on_a_pty(code, columns=0)
    bars = re.findall(r"\|(█*[ ]*)\| 3/3", drawn)
    assert bars and len(bars[-1]) >= 20, drawn  # a real bar, not one squeezed to nothing
    assert "3/3 [" in drawn and "it/s]" in drawn


def test_make_test_keeps_pytest_temp_folders_in_a_removed_temp_dir():
    """`make test` runs pytest with --basetemp inside a fresh temp dir and removes it, whatever the outcome."""
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""})
    recipe = dry.stdout
    assert "mktemp -d" in recipe and '--basetemp="$tmp/pytest"' in recipe
    assert re.search(r'rc=\$\?; rm -rf "\$tmp"; exit \$rc', recipe), recipe


@pytest.mark.slow  # runs the demo
def test_force_replaces_exactly_the_previous_runs_files(cli, tmp_path):
    """A full demo run, then a small one with --force into the same folder: the full run's extra checkpoints go, a
    user's own files stay. The full run is stood in for by its manifest and files (training it takes minutes)."""
    import json

    from weightspace.report.manifest import MANIFEST_NAME, read_manifest, write_manifest
    out = tmp_path / "demo"
    (out / "ckpts").mkdir(parents=True)
    leftovers = [f"ckpts/ft{i}-lr0.03-wd0.001-shift.safetensors" for i in range(3, 8)]
    for rel in leftovers:
        (out / rel).write_bytes(b"weights of a full run")
    (out / "ckpts" / "my-notes.txt").write_text("mine")          # never listed: never touched
    (tmp_path / "outside.txt").write_text("a manifest may not point outside its folder")
    write_manifest(out, [out / rel for rel in leftovers])
    listed = read_manifest(out)
    st = (tmp_path / "outside.txt").stat()
    listed["../outside.txt"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    (out / MANIFEST_NAME).write_text(json.dumps({"files": listed}))
    r = cli("demo", "--small", "--out", out, "--force", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert not any((out / rel).exists() for rel in leftovers)
    assert (out / "ckpts" / "my-notes.txt").read_text() == "mine" and (tmp_path / "outside.txt").exists()
    listed = read_manifest(out)
    assert "leaderboard.csv" in listed and any(rel.startswith("ckpts/") for rel in listed)
    assert all((out / rel).is_file() for rel in listed)
