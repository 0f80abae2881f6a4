"""The one writer rule (issue 19, guarantee 2), as a property over every writer: a folder holding a user's file and
a link to a file outside is left byte-identical by a refused run, and by a --force run except for the files
weightspace itself writes there; --force never follows a link, never replaces an input, never removes what an index
or a forged manifest names."""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings, strategies as hs

from weightspace.errors import OutputError, OutputExists
from weightspace.files import MANIFEST_NAME, check_targets, read_manifest, write_manifest

REFUSED = "already exists (use --force to replace it)"
# Every name one of the writers below may write: user files get other names.
OURS = {"out.safetensors", "model.safetensors", "results.json", "modules.csv", "modules.png", "README.md",
        "config.json", "open_clip_config.json", "open_clip_model.safetensors", "curve.png", MANIFEST_NAME}


def _writers(a: Path, b: Path) -> dict:
    return {
        "-o FILE": lambda d: ["soup", a, b, "-o", d / "out.safetensors", "--quiet"],
        "-o DIR/": lambda d: ["soup", a, b, "-o", f"{d}/", "--quiet"],
        "--out DIR": lambda d: ["modules", "--model", "weightspace.eval.zoo:mlp", "--out", d, "--quiet"],
        "push --dry-run DIR": lambda d: ["push", a, "me/soup", "--dry-run", d, "--quiet"],
    }


WRITERS = list(_writers(Path("a"), Path("b")))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    a, b = d / "a.safetensors", d / "b.safetensors"
    st.save_file({"w": torch.ones(4)}, a)
    st.save_file({"w": torch.full((4,), 3.0)}, b)
    return a, b


@pytest.fixture(scope="module")
def first_runs(inputs, tmp_path_factory):
    """Each writer's output folder after a first run (copied for every example, so each example runs twice)."""
    from click.testing import CliRunner

    from weightspace_cli.main import main
    out = {}
    for name, args in _writers(*inputs).items():
        d = tmp_path_factory.mktemp("first")
        r = CliRunner().invoke(main, [str(x) for x in args(d)], catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
        out[name] = d
    return out


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a link as its target, a file as its bytes."""
    snap: dict[str, bytes | str] = {}
    for root, dirs, names in os.walk(folder):
        for n in names + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            p = Path(root) / n
            rel = str(p.relative_to(folder))
            snap[rel] = "-> " + os.readlink(p) if p.is_symlink() else p.read_bytes()
    return snap


names = hs.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(
    lambda n: n not in OURS and n not in (".", ".."))


@pytest.mark.parametrize("writer", WRITERS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=names, link=names, content=hs.binary(max_size=64), forge=hs.booleans())
def test_a_writer_touches_only_its_own_files(writer, user, link, content, forge, inputs, first_runs, cli):
    if user == link:
        return
    base = Path(tempfile.mkdtemp())
    try:
        d = base / "out"
        shutil.copytree(first_runs[writer], d, symlinks=True)
        (d / user).write_bytes(content)
        outside = base / "outside.txt"
        outside.write_bytes(b"a secret " + content)
        (d / link).symlink_to(outside)
        if forge:  # a manifest that weightspace did not write, naming the user's files and one outside
            (d / MANIFEST_NAME).write_text(json.dumps({"files": {r: {"size": 1, "mtime_ns": 1}
                                                                 for r in (user, link, "../outside.txt")}}))
        ours = set(os.listdir(first_runs[writer])) | {MANIFEST_NAME}
        before = snapshot(d)
        args = _writers(*inputs)[writer](d)

        r = cli(*args)
        assert r.exit_code == 2 and REFUSED in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert snapshot(d) == before and outside.read_bytes() == b"a secret " + content

        r = cli(*args, "--force")
        assert r.exit_code == 0, r.stderr
        after = snapshot(d)
        assert {k: v for k, v in after.items() if k not in ours} == {k: v for k, v in before.items() if k not in ours}
        assert outside.read_bytes() == b"a secret " + content
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("writer", WRITERS)
def test_force_replaces_a_link_not_what_it_points_to(writer, inputs, first_runs, cli, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(first_runs[writer], d, symlinks=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("mine")
    victim = sorted(n for n in os.listdir(d) if n != MANIFEST_NAME)[0]
    (d / victim).unlink()
    (d / victim).symlink_to(secret)
    assert cli(*_writers(*inputs)[writer](d), "--force").exit_code == 0
    assert secret.read_text() == "mine" and not (d / victim).is_symlink() and (d / victim).is_file()


def test_an_input_is_never_the_output(inputs, cli, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(inputs[0], a)
    shutil.copy(inputs[1], b)
    before = a.read_bytes()
    for out in (a, tmp_path / "link.safetensors"):
        if out != a:
            out.symlink_to(a)
        r = cli("soup", a, b, "-o", out, "--force")
        assert r.exit_code == 2 and "is also an input of this run" in r.stderr, r.stderr
        assert a.read_bytes() == before


def test_a_foreign_index_is_never_followed(cli, tmp_path):
    """A folder whose shard index (not written by weightspace) names the user's file: --force refuses, removes
    nothing; a normal save then owns what it wrote and a second --force replaces exactly that."""
    inputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, p in enumerate(inputs):
        st.save_file({"w": torch.full((4,), float(i)), "v": torch.ones(4)}, p)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "notes.txt"}}))
    r = cli("soup", *inputs, "-o", f"{d}/", "--force")
    assert r.exit_code == 2 and "weightspace did not write" in r.stderr
    assert sorted(os.listdir(d)) == ["model.safetensors.index.json", "notes.txt"]
    (d / "model.safetensors.index.json").unlink()
    assert cli("soup", *inputs, "-o", f"{d}/").exit_code == 0
    assert set(read_manifest(d)) == {"model.safetensors"}
    assert cli("soup", *inputs, "-o", f"{d}/", "--max-shard-size", "8", "--force").exit_code == 0
    assert "model.safetensors" not in os.listdir(d) and (d / "notes.txt").read_text() == "mine"
    assert (d / "model.safetensors.index.json").is_file()


def test_never_through_a_linked_folder_nor_outside(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "ckpts").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_targets([out / "ckpts" / "ft0.safetensors"], True, root=out)
    with pytest.raises(OutputError, match="outside the output folder"):
        check_targets([out / ".." / "x"], True, root=out)
    check_targets([out / "new" / "x"], False, root=out)  # negative control: a folder still to make is fine
    with pytest.raises(OutputExists, match="not a regular file"):
        os.mkfifo(out / "fifo")
        check_targets([out / "fifo"], True)


def test_a_manifest_entry_counts_only_while_the_file_is_as_written(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"ours")
    write_manifest(tmp_path, [f, tmp_path.parent / "elsewhere"])
    assert set(read_manifest(tmp_path)) == {"w.bin"}
    f.write_bytes(b"edited by the user")  # a listed file the user changed is theirs now: not kept as ours
    write_manifest(tmp_path, [], keep=read_manifest(tmp_path))
    assert read_manifest(tmp_path) == {}


def test_data_rm_removes_only_cache_entries(cli, tmp_path, monkeypatch):
    import numpy as np
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("WEIGHTSPACE_DATA_CACHE", str(cache))
    np.save(cache / "digits-0123456789ab.npy", np.zeros((2, 3), np.uint8))
    size = (cache / "digits-0123456789ab.npy").stat().st_size
    (cache / "digits-0123456789ab.json").write_text(json.dumps({"format": 1, "file_bytes": size, "spec": "d"}))
    secret = tmp_path / "secret.npy"
    np.save(secret, np.ones(3, np.uint8))
    (cache / "notes.txt").write_text("mine")
    (cache / "linked-0123456789ab.npy").symlink_to(secret)  # an "entry" made of links is not an entry
    (cache / "linked-0123456789ab.json").write_text(json.dumps({"format": 1, "file_bytes": secret.stat().st_size}))
    before = snapshot(cache)
    assert cli("data", "rm", "linked").exit_code == 2 and snapshot(cache) == before
    r = cli("data", "rm", "digits")
    assert r.exit_code == 0, r.stderr
    assert snapshot(cache) == {k: v for k, v in before.items() if not k.startswith("digits-")}
    assert secret.is_file()


def test_one_place_builds_the_refusal():
    """The refusal of an existing output is built by files.exists_error alone (no writer words its own)."""
    root = Path(__file__).resolve().parents[1]
    hits = [str(p.relative_to(root)) for d in ("weightspace", "cli") for p in sorted((root / d).rglob("*.py"))
            if "already exists (use" in p.read_text(encoding="utf-8")]
    assert hits == ["weightspace/files.py"], hits


@pytest.mark.slow  # two demo runs (--small)
def test_the_demo_touches_only_its_own_files(cli, tmp_path):
    """The same property for the demo, whose run folder has sub-folders (ckpts/, soups/) and a manifest."""
    out, outside = tmp_path / "demo", tmp_path / "outside.txt"
    assert cli("demo", "--small", "--out", out, "--quiet").exit_code == 0
    ours = set(snapshot(out)) | {MANIFEST_NAME}
    outside.write_text("a secret")
    (out / "notes.txt").write_text("mine")
    (out / "ckpts" / "link.safetensors").symlink_to(outside)
    before = snapshot(out)
    r = cli("demo", "--small", "--out", out, "--quiet")
    assert r.exit_code == 2 and REFUSED in r.stderr and snapshot(out) == before
    assert cli("demo", "--small", "--out", out, "--quiet", "--force").exit_code == 0
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k not in ours} == {k: v for k, v in before.items() if k not in ours}
    assert outside.read_text() == "a secret"


def test_recipe_summary_never_writes_over_a_run_it_reads(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"findings": []}')
    r = cli("recipe", "summary", run, "-o", run / "results.json", "--force")
    assert r.exit_code == 2 and "is also an input of this run" in r.stderr, r.stderr
    assert (run / "results.json").read_text() == '{"findings": []}'


def test_weights_computed_in_memory_never_replace_their_ingredients(tmp_path):
    """A search's or align's result is a state dict whose provenance names its ingredients: saving it over one of
    them is refused even with force, as for a streamed op."""
    import weightspace as ws
    from weightspace.io.outputs import StateDict
    a = tmp_path / "a.safetensors"
    st.save_file({"w": torch.ones(2)}, a)
    before = a.read_bytes()
    sd = StateDict({"w": torch.zeros(2)}, provenance={"op": "align", "ingredients": [{"source": str(a)}]})
    with pytest.raises(OutputExists, match="is also an input"):
        ws.save(sd, a, force=True)
    assert a.read_bytes() == before
    assert ws.save(sd, tmp_path / "b.safetensors") == tmp_path / "b.safetensors"  # negative control
