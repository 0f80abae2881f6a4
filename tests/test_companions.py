"""An output folder takes along the source folder's whole non-weight tree (config, tokenizer, sub-folders such as
sentence-transformers' 1_Pooling/), copied only from inside that folder, as new regular files."""
from __future__ import annotations

import os
import stat

import pytest
import safetensors.torch as st
import torch

W = {"w": torch.ones(3)}


def _folder(path, weights=W):
    path.mkdir()
    st.save_file(weights, path / "model.safetensors")
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (path / "modules.json").write_text("[]")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref")
    (path / "README.md").write_text("the ingredient's card")
    (path / "2_Dense").mkdir()
    st.save_file({"linear.weight": torch.ones(1)}, path / "2_Dense" / "model.safetensors")
    return path


def _one_line(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _tree(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_output_folder_takes_the_whole_non_weight_tree(cli, tmp_path):
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b", {"w": torch.full((3,), 3.0)})
    out = tmp_path / "out"
    r = cli("soup", a, b, "-o", f"{out}/", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert _tree(out) == {"model.safetensors", "config.json", "modules.json", "1_Pooling/config.json",
                          "weightspace-manifest.json"}  # what this save wrote (files.write_manifest)
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert torch.equal(st.load_file(out / "model.safetensors")["w"], torch.full((3,), 2.0))


def test_links_inside_the_folder_are_copied_as_regular_files(cli, tmp_path):
    a = _folder(tmp_path / "a")
    (a / "tokenizer.json").write_text("{}")
    (a / "tok-link.json").symlink_to("tokenizer.json")
    os.chmod(a / "tokenizer.json", 0o600)
    out = tmp_path / "out"
    assert cli("soup", a, a, "-o", f"{out}/", "--quiet").exit_code == 0
    copied = out / "tok-link.json"
    assert not copied.is_symlink() and copied.read_text() == "{}"
    assert stat.S_IMODE(copied.stat().st_mode) == stat.S_IMODE((out / "config.json").stat().st_mode)


@pytest.mark.parametrize("where", ["top", "subfolder", "folder-link"])
def test_links_leaving_the_folder_are_refused_before_anything_is_written(cli, tmp_path, where):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE")
    a = _folder(tmp_path / "a")
    {"top": lambda: (a / "tokenizer.json").symlink_to(secret / "id_rsa"),
     "subfolder": lambda: (a / "1_Pooling" / "extra.json").symlink_to(secret / "id_rsa"),
     "folder-link": lambda: (a / "3_Outside").symlink_to(secret)}[where]()
    out = tmp_path / "out"
    msg = _one_line(cli("soup", a, a, "-o", f"{out}/"))
    assert str(a) in msg and "outside the folder" in msg
    assert not out.exists()


def test_fifo_in_the_folder_is_never_opened(cli, tmp_path):
    a = _folder(tmp_path / "a")
    os.mkfifo(a / "pipe.json")  # opening it for reading would block forever
    out = tmp_path / "out"
    r = cli("soup", a, a, "-o", f"{out}/", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert not (out / "pipe.json").exists() and (out / "config.json").is_file()


def test_hub_cache_snapshot_links_into_its_blobs_are_copied(cli, tmp_path):
    """Control: a snapshot's files are links to ../../blobs/<hash>; that is inside the cache repo, not an escape."""
    repo = tmp_path / "models--org--m"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    st.save_file(W, blobs / "1111")
    (blobs / "2222").write_text('{"model_type": "bert"}')
    (snap / "model.safetensors").symlink_to("../../blobs/1111")
    (snap / "config.json").symlink_to("../../blobs/2222")
    out = tmp_path / "out"
    r = cli("soup", snap, snap, "-o", f"{out}/", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert (out / "config.json").read_text() == '{"model_type": "bert"}' and not (out / "config.json").is_symlink()
