"""The exception family: built-in bases a caller can catch, .path/.key set by the calls that fail, one Hub mapper.

Every error here comes from a real failing call on real files (tiny MLPs trained on sklearn's digits) or from a
real HTTP answer of the loopback Hub (tests/hubserver.py).
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

import weightspace as ws
from weightspace import errors
from weightspace.ops import stream as ops

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer  # noqa: E402

TOKEN = "hf_wsErrorsTestToken0123456789abcdef"


@pytest.fixture
def two(trained_mlps, tmp_path) -> list[Path]:
    paths = []
    for i, sd in enumerate(trained_mlps[:2]):
        p = tmp_path / f"m{i}.safetensors"
        ws.save(sd, p)
        paths.append(p)
    return paths


def test_every_error_class_lives_in_errors_and_subclasses_the_family():
    import inspect
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == "weightspace.errors"]
    assert len(classes) >= 14
    assert all(issubclass(c, errors.WeightspaceError) for c in classes)
    assert set(c.__name__ for c in classes) <= set(errors.__all__)
    # The names exported elsewhere are these very classes, not copies.
    from weightspace.hub import HubError
    from weightspace.search.align import AlignmentError
    assert HubError is errors.HubError and AlignmentError is errors.AlignmentError


def test_missing_checkpoint_is_a_file_not_found_error_with_its_path(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        ws.load(missing)
    assert isinstance(e.value, errors.CheckpointNotFound)
    assert isinstance(e.value, errors.CheckpointError) and isinstance(e.value, errors.SourceError)
    assert e.value.path == str(missing) and e.value.key is None
    assert str(e.value) == f"{missing}: no such file or directory"  # the message, no "[Errno ...]"
    # The reader below the source resolver says the same of a file that vanished.
    from weightspace.io.formats import SafetensorsReader
    with pytest.raises(FileNotFoundError) as e:
        SafetensorsReader(missing)
    assert e.value.path == str(missing)


def test_missing_shard_names_the_index(two, tmp_path):
    import json
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"head.bias": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="is missing") as e:
        ws.load(folder)
    assert e.value.path == str(index)


def test_corrupt_file_names_path_and_key(two, tmp_path):
    bad = tmp_path / "bad.safetensors"
    raw = bytearray(two[0].read_bytes())
    n = int.from_bytes(raw[:8], "little")
    bad.write_bytes(bytes(raw[: 8 + n + 10]))  # the header promises far more data than follows
    with pytest.raises(errors.CheckpointError) as e:
        ws.load(bad)
    assert e.value.path == str(bad) and "truncated" in str(e.value)


def test_mismatched_shapes_are_a_value_error_naming_file_and_key(trained_mlps, two, tmp_path):
    other = dict(trained_mlps[2])
    other["head.weight"] = torch.zeros(5, 32)
    odd = tmp_path / "odd.safetensors"
    ws.save(other, odd)
    with pytest.raises(ValueError) as e:
        ops.uniform_soup([two[0], odd])
    assert isinstance(e.value, errors.IncompatibleCheckpoints)
    assert e.value.key == "head.weight" and e.value.path == str(odd)
    assert "has shape [5, 32]" in str(e.value)


def test_nonfinite_input_names_file_and_key(trained_mlps, two, tmp_path):
    nan = dict(trained_mlps[2])
    nan["features.0.bias"] = nan["features.0.bias"].clone()
    nan["features.0.bias"][3] = float("nan")
    p = tmp_path / "nan.safetensors"
    ws.save(nan, p)
    with pytest.raises(ValueError) as e:
        ops.uniform_soup([two[0], p])
    assert isinstance(e.value, errors.NonFiniteError)
    assert e.value.key == "features.0.bias" and e.value.path == str(p)


def test_existing_output_is_a_file_exists_error(two):
    with pytest.raises(FileExistsError) as e:
        ws.save(ops.uniform_soup(two), two[0])
    assert isinstance(e.value, errors.OutputExists) and e.value.path == str(two[0])
    assert str(e.value) == f"{two[0]}: already exists (use force=True to replace it)"  # the CLI says --force


def test_unwritable_output_is_an_os_error_with_its_path(two, tmp_path):
    target = two[0] / "soup.safetensors"  # a file stands where the folder would be
    with pytest.raises(OSError) as e:
        ws.save(ops.uniform_soup(two), target)
    # an output that cannot be written is not a checkpoint that cannot be read
    assert isinstance(e.value, errors.OutputError) and not isinstance(e.value, errors.CheckpointError)
    assert e.value.path == str(two[0]) and str(e.value) == f"{two[0]}: cannot make the folder (File exists)"
    assert two[0].is_file()


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError) as e:
        ws.load_data("digits:nonsense")
    assert isinstance(e.value, errors.ConfigError)


def test_attributes_survive_pickling(tmp_path):
    """Errors cross process pools (the parallel ops): path and key must come back."""
    with pytest.raises(errors.CheckpointNotFound) as e:
        ws.load(tmp_path / "gone.pt")
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is errors.CheckpointNotFound and back.path == e.value.path and str(back) == str(e.value)


def test_cli_prints_the_same_one_line(cli, tmp_path):
    missing = tmp_path / "absent.safetensors"
    r = cli("inspect", str(missing))
    assert r.exit_code == 2
    assert r.stderr.strip() == f"weightspace: error: {missing}: no such file or directory"


# --- one Hub mapper, for downloads (io) and pushes (hub.py), fed by real HTTP answers ----------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub, with huggingface_hub pointed at it in this process (its URL template is read at import)."""
    import huggingface_hub.constants as constants
    with HubServer(tmp_path / "hub", {TOKEN: "alice"}, {"alice": {"my-org"}}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


@pytest.mark.slow  # the loopback Hub server
def test_push_refused_token_maps_to_one_hub_error(hub, two):
    soup = ops.uniform_soup(two)
    with pytest.raises(OSError) as e:
        ws.push_to_hub(soup, "alice/soup", token="hf_wrongToken")
    err = e.value
    assert type(err) is errors.HubError and err.repo_id == "alice/soup"
    assert str(err) == ("alice/soup: the Hub refused the token (401 Unauthorized): set a valid write token in "
                        "HF_TOKEN or log in with `hf auth login`")
    assert "hf_wrongToken" not in str(err)
    with pytest.raises(errors.HubError, match=r"^bob/soup: the token may not write there \(403 Forbidden"):
        ws.push_to_hub(soup, "bob/soup", token=TOKEN)
    assert [s for m, p, s in hub.state.requests if p == "/api/repos/create"] == [401, 403]


@pytest.mark.slow  # the loopback Hub server
def test_download_errors_map_through_the_same_mapper(hub, two):
    ws.push_to_hub(ops.uniform_soup(two), "alice/soup", token=TOKEN)  # a repo to miss a file in
    source = "hf://alice/soup/absent.safetensors"
    with pytest.raises(OSError) as e:
        ws.load(source)
    err = e.value
    assert isinstance(err, errors.HubDownloadError) and isinstance(err, errors.SourceError)
    assert isinstance(err, errors.HubError)
    assert str(err) == f"{source}: file not found in the repository"
    assert err.path == source and err.repo_id == "alice/soup"
    with pytest.raises(errors.HubDownloadError, match="repository not found on the Hub") as e:
        ws.load("hf://alice/nothing-here")
    assert e.value.repo_id == "alice/nothing-here"
    statuses = {(p, s) for m, p, s in hub.state.requests if m in ("GET", "HEAD") and s >= 400}
    assert ("/alice/soup/resolve/main/absent.safetensors", 404) in statuses
    # The downloaded weights themselves load: the mapper is only in the failing path.
    got = ws.load("hf://alice/soup")
    assert set(got) == set(ws.load(two[0]))


def test_library_errors_name_parameters_and_the_cli_names_its_flags(cli, two, tmp_path):
    with pytest.raises(errors.ConfigError) as e:
        ws.ties_merge(two[0], [two[1]], keep=1.5)
    assert str(e.value) == "keep=1.5: must be a fraction in (0, 1]" and e.value.param == "keep"
    out = tmp_path / "x.safetensors"
    r = cli("merge", "--method", "ties", "--base", two[0], two[1], "--keep", "1.5", "-o", out)
    assert r.exit_code == 2 and r.stderr.strip() == "weightspace: error: --keep 1.5: must be a fraction in (0, 1]"
    r = cli("soup", two[0], two[1], "--weights", "1,-1", "-o", out)
    assert r.stderr.strip() == "weightspace: error: --weights 1,-1: they sum to zero, so they cannot be normalised"
    assert not out.exists()
    from click import Context

    from weightspace_cli.main import in_flags, main
    merge = main.get_command(Context(main), "merge")
    assert in_flags("grid: needs at least one value", "grid", merge) == "--scales: needs at least one value"  # metadata
    assert in_flags("to=init needs init", "to", main.get_command(Context(main), "rewind")) == "--to init needs init"
    # a parameter the verb has no flag for, or a message not led by it, stays as the library wrote it
    assert in_flags("names: 'a' names two ingredients", "names", merge) == "names: 'a' names two ingredients"
    assert in_flags("keeping: x", "keep", merge) == "keeping: x"


def test_advice_names_the_argument_in_python_and_the_flag_on_the_command_line(cli, two, tmp_path):
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(errors.OutputExists) as e:  # the library's words: an argument of ws.save
        ws.save(ops.uniform_soup(two), out)
    assert str(e.value).endswith("(use force=True to replace it)")
    r = cli("soup", *two, "-o", out)  # the command's words for the same refusal
    assert r.exit_code == 2 and r.stderr.strip().endswith(f"{out}: already exists (use --force to replace it)")
    assert out.read_bytes() == b"mine"
    from click import Context

    from weightspace_cli.main import in_flags, main
    soup = main.get_command(Context(main), "soup")
    assert in_flags("x: overflows (use allow_nonfinite=True to write it anyway)", None, soup) == \
        "x: overflows (use --allow-nonfinite to write it anyway)"
    assert in_flags("no CUDA; use device='cpu'", "device", soup) == "no CUDA; use --device cpu"
    # an argument the verb has no flag for stays in Python's words (the control)
    assert in_flags("use dry_run='DIR'", None, soup) == "use dry_run='DIR'"


def test_hub_errors_are_mapped_by_two_functions():
    from huggingface_hub.errors import EntryNotFoundError
    down = errors.hub_download_error("hf://org/name/x.safetensors", EntryNotFoundError("gone"))
    assert type(down) is errors.HubDownloadError and down.repo_id == "org/name"
    assert str(down) == "hf://org/name/x.safetensors: file not found in the repository"
    push = errors.hub_push_error("org/name", ValueError("Invalid repo id hf_secret123"), token="hf_secret123")
    assert type(push) is errors.HubError and str(push) == "org/name: Invalid repo id ***"
