"""Hostile and careless output (issue 11, classes 3 and 6 and the write errors of 7): a new name is never taken
twice, --force never replaces what is not a regular file, and a killed or failed run leaves no file behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch as st
import torch

import weightspace.files as files
from weightspace.errors import OutputError, OutputExists


def one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightspace: error: "), r.stderr
    return lines[0]


@pytest.fixture(params=["tmpfile", "named"])
def temp_kind(request, monkeypatch):
    """Both ways of writing: an unnamed O_TMPFILE file, and the named temp file used where it is missing."""
    if request.param == "tmpfile" and not files._use_tmpfile:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(files, "_use_tmpfile", request.param == "tmpfile")
    return request.param


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file({"w": torch.ones(4)}, a)
    st.save_file({"w": torch.full((4,), 3.0)}, b)
    return a, b


def test_a_new_name_is_taken_once(tmp_path, temp_kind):
    """Another run creates the output while this one writes: this one fails, the other's file stays whole."""
    out = tmp_path / "out.bin"
    with pytest.raises(OutputExists, match="already exists"):
        with files.atomic_output(out) as tmp:
            tmp.write_bytes(b"mine")
            out.write_bytes(b"theirs")  # the other run finished first
    assert out.read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_force_replaces_regular_files_only(cli, tmp_path, pair, temp_kind):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    assert cli("soup", *pair, "-o", out, "--force", "--quiet").exit_code == 0
    assert torch.equal(st.load_file(out)["w"], torch.full((4,), 2.0))
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    msg = one_line(cli("soup", *pair, "-o", fifo, "--force"))
    assert str(fifo) in msg and "not a regular file" in msg
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert "is a directory" in one_line(cli("soup", *pair, "-o", folder, "--force"))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "dir.safetensors", "fifo.safetensors",
                                            "out.safetensors"]


def test_long_output_name_works(cli, tmp_path, pair, temp_kind):
    out = tmp_path / ("x" * 239 + ".safetensors")  # 251 characters: the name, not its temp file, is the limit
    assert len(out.name) == 251
    r = cli("soup", *pair, "-o", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    r = cli("soup", *pair, "-o", out, "--quiet", "--force")
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["a.safetensors", "b.safetensors", out.name])
    too_long = tmp_path / ("x" * 250 + ".safetensors")
    msg = one_line(cli("soup", *pair, "-o", too_long))
    assert "file name too long" in msg


def test_write_errors_are_one_line(cli, tmp_path, pair, monkeypatch):
    import errno
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a folder it may not write: refuse at the syscall, as the kernel would
        real_open = os.open

        def denied(path, flags, *a, **k):
            if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)) and str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)
        monkeypatch.setattr(os, "open", denied)
    try:
        msg = one_line(cli("soup", *pair, "-o", ro / "out.safetensors"))
        assert str(ro / "out.safetensors") in msg and "permission denied" in msg
    finally:
        monkeypatch.undo()
        ro.chmod(0o755)
    assert os.listdir(ro) == []


def test_a_place_that_cannot_hold_a_file_is_one_line(cli, tmp_path, pair, temp_kind):
    """/proc takes no new files (ENOENT, not one of the usual write errors): still one line, nothing written."""
    msg = one_line(cli("soup", *pair, "-o", "/proc/out.safetensors"))
    assert "/proc/out.safetensors: cannot write (no such file or directory)" in msg
    assert not os.path.exists("/proc/out.safetensors")


def test_read_only_filesystem_is_one_line(cli, tmp_path, pair, monkeypatch, temp_kind):
    import errno
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    msg = one_line(cli("soup", *pair, "-o", tmp_path / "out.safetensors"))
    assert str(tmp_path / "out.safetensors") in msg and "read-only filesystem" in msg
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


def test_full_disk_is_one_line(tmp_path, monkeypatch, temp_kind):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    out = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="no space left"):
        with files.atomic_output(out) as tmp:
            tmp.write_bytes(b"partial")
            monkeypatch.setattr(os, "fsync", full)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


WRITER = """
import sys, time, types
pkg = types.ModuleType("weightspace")  # weightspace.files alone, without the package's torch-importing root
pkg.__path__ = [sys.argv[3]]
sys.modules["weightspace"] = pkg
import weightspace.files as files
files._use_tmpfile = sys.argv[2] == "tmpfile"
with files.atomic_output(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * (4 << 20))
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_killed_run_leaves_nothing(tmp_path, temp_kind, sig):
    out = tmp_path / "out.bin"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out), temp_kind, os.path.dirname(files.__file__)],
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"writing\n"
    p.send_signal(sig)
    assert p.wait(30) == -sig  # the signal's own default outcome, after the cleanup
    left = os.listdir(tmp_path)
    if sig == signal.SIGKILL and temp_kind == "named":
        # nothing can run on SIGKILL: the temp file stays, recognisably named, and the next run removes it
        assert len(left) == 1 and files.TEMP_MARK in left[0]
        with files.atomic_output(out) as tmp:
            tmp.write_bytes(b"ok")
        assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    else:
        assert left == []


def test_a_report_folder_is_written_whole_or_not_at_all(tmp_path):
    """The disk fills up at the plot: the results.json and CSV written before it go too, and the new folder."""
    import errno

    from weightspace import report
    from weightspace.errors import OutputError

    def plot(path, force=False):
        with files.atomic_output(path, force) as tmp:
            tmp.write_bytes(b"partial png")
            raise OSError(errno.ENOSPC, "No space left on device")
    folder = tmp_path / "report"
    with pytest.raises(OutputError, match="no space left"):
        report.write_files(folder, {"results": ("results.json", {"a": 1}), "csv": ("t.csv", (["x"], [[1]])),
                                    "png": ("t.png", plot)})
    assert os.listdir(tmp_path) == []
    # a folder that was there before stays, emptied of this call's files only
    folder.mkdir()
    (folder / "mine.txt").write_text("kept")
    with pytest.raises(OutputError):
        report.write_files(folder, {"results": ("results.json", {"a": 1}), "png": ("t.png", plot)})
    assert os.listdir(folder) == ["mine.txt"]
