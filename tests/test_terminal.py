"""Nothing raw reaches a terminal (issue 19, guarantee 8): key names, provenance and messages taken from files are
printed with control characters escaped — no ANSI/OSC sequence, no carriage return, no forged line — by the one
function every printer uses (weightspace.report.terminal.printable)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings, strategies as hs

from weightspace.report import markdown_table
from weightspace.report.terminal import printable

HOSTILE = ["\x1b[31m", "\x1b]0;owned\x07", "\r", "\n", "\x00", "\x9b", "\u202e", "\u2028", "\t", "\x7f", "\x08"]
hostile_text = hs.lists(hs.one_of(hs.sampled_from(HOSTILE), hs.text(min_size=1, max_size=3)), min_size=1,
                        max_size=6).map("".join)


def clean(out: str) -> bool:
    """No character a terminal would act on, other than the newlines of weightspace's own layout."""
    return all(c.isprintable() or c == "\n" for c in out)


@given(hs.text())
def test_printable_leaves_nothing_raw(text):
    assert printable(text).isprintable()
    assert clean(printable(text, newlines=True))
    if text.isprintable():
        assert printable(text) == text  # negative control: ordinary text is untouched


@given(hostile_text)
def test_a_table_cell_cannot_break_the_table(text):
    table = markdown_table(["key"], [[text]])
    assert clean(table) and len(table.splitlines()) == 3


@pytest.fixture
def hostile_file(tmp_path):
    def make(key: str, source: str) -> Path:
        p = tmp_path / "h.safetensors"
        prov = {"op": "soup\x1b[2J", "ingredients": [{"source": source, "sha256": "0" * 64, "coefficient": 1.0}]}
        st.save_file({key: torch.ones(2), "ok": torch.zeros(1)}, p, metadata={"weightspace": json.dumps(prov)})
        return p
    return make


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=hostile_text, source=hostile_text)
def test_inspect_and_diff_print_nothing_raw(key, source, hostile_file, cli, tmp_path):
    p = hostile_file(key, source)
    other = tmp_path / "o.safetensors"
    st.save_file({"ok": torch.zeros(1)}, other)
    for args in (("inspect", p), ("diff", p, other), ("inspect", p, "--json")):
        r = cli(*args)
        assert r.exit_code in ((0, 1) if args[0] == "diff" else (0,)), r.stderr  # diff: 1 = they differ
        assert clean(r.stdout) and clean(r.stderr), (args, r.stdout)


@settings(max_examples=10, deadline=None)
@given(name=hostile_text.filter(lambda s: "/" not in s and "\x00" not in s))
def test_an_error_line_is_one_clean_line(name, tmp_path_factory):
    from click.testing import CliRunner

    from weightspace_cli.main import main
    missing = tmp_path_factory.mktemp("e") / f"{name}.safetensors"
    r = CliRunner().invoke(main, ["inspect", str(missing)], catch_exceptions=False)
    assert r.exit_code == 2
    assert clean(r.stderr) and len(r.stderr.strip("\n").splitlines()) == 1, repr(r.stderr)


def test_every_printer_goes_through_printable():
    """The CLI prints only through cli.common.echo (which escapes); no verb calls click.echo or print itself."""
    root = Path(__file__).resolve().parents[1] / "cli"
    raw = [f"{p.name}:{i}" for p in sorted(root.glob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\bclick\.echo\(|(?<![\w.])print\(", line) and "def echo" not in line
           and not (p.name == "common.py" and "click.echo(printable(" in line)]
    assert raw == [], raw
