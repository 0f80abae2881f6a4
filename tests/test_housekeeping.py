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


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 100


def too_large(folders: list[Path]) -> list[str]:
    """Every module over MAX_MODULE_LINES lines and every function (method, nested function) over
    MAX_FUNCTION_LINES lines under ``folders``: one concept per file, one step per function."""
    import ast
    found = []
    for folder in folders:
        for f in sorted(folder.rglob("*.py")):
            text = f.read_text(encoding="utf-8")
            name = f.relative_to(folder.parent)
            if len(text.splitlines()) > MAX_MODULE_LINES:
                found.append(f"{name}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text, str(f))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_module_over_600_lines_and_no_function_over_100_in_the_package_and_the_cli():
    assert too_large([ROOT / "weightspace", ROOT / "cli"]) == []


def test_the_size_check_finds_a_long_module_and_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "long.py").write_text("def f():\n" + "    x = 1\n" * 100 + "\n" * 500)
    (pkg / "fine.py").write_text("def g():\n" + "    x = 1\n" * 99)
    assert too_large([pkg]) == ["pkg/long.py: 601 lines", "pkg/long.py:1 f: 101 lines"]


def test_every_package_folder_is_shipped():
    """A subpackage missing from pyproject's package list installs as nothing: its imports fail only after install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("weightspace", *f.parent.relative_to(ROOT / "weightspace").parts))
             for f in (ROOT / "weightspace").rglob("__init__.py")} | {"weightspace_cli"}
    assert listed == found
