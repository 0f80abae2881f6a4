"""Hub, timm and open_clip sources, resolved through the libraries' own loaders from an offline Hub cache laid out here."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

import weightspace as ws
from weightspace import errors

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline HF cache; returns put(repo_id, {filename: bytes}) that lays a repo out like huggingface_hub does."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these two from the environment once, at import time.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
        root = cache / ("models--" + repo_id.replace("/", "--"))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        snap = root / "snapshots" / commit
        for name, data in files.items():
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return snap
    put.cache = cache
    return put


def st_bytes(sd: dict[str, torch.Tensor], tmp_path: Path, name: str = "w.safetensors") -> bytes:
    p = tmp_path / name
    st.save_file({k: v.contiguous() for k, v in sd.items()}, p)
    return p.read_bytes()


def assert_same(ck: ws.Checkpoint, sd: dict[str, torch.Tensor]) -> None:
    assert sorted(ck) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(ck[k], v), k


def test_hub_repo_revision_file_and_hf_hub_alias(hub_cache, trained_mlps, tmp_path):
    sd = trained_mlps[0]
    snap = hub_cache("org/mlp", {"model.safetensors": st_bytes(sd, tmp_path), "config.json": b"{}"})
    for src in ["hf://org/mlp", f"hf://org/mlp@{COMMIT}/model.safetensors", "hf://org/mlp@main", "hf-hub:org/mlp"]:
        ck = ws.load(src)
        assert ck.source == src
        assert ck.files[0].resolve() == (snap / "model.safetensors").resolve()
        assert_same(ck, sd)
    # the sha256 recorded in provenance is the blob's (the Hub's own content address)
    blob = (snap / "model.safetensors").resolve()
    assert ws.load("hf://org/mlp").sha256() == blob.name
    # ... and so is the commit "main" resolved to, so the ingredient can be fetched again exactly
    soup = ws.uniform_soup(["hf://org/mlp", "hf://org/mlp"])
    assert [i["commit"] for i in soup.provenance["ingredients"]] == [COMMIT, COMMIT]


def test_hub_sharded_repo(hub_cache, trained_mlps, tmp_path):
    sd = trained_mlps[1]
    keys = sorted(sd)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    files = {name: st_bytes({k: sd[k] for k in ks}, tmp_path, name) for name, ks in parts.items()}
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}).encode()
    hub_cache("org/sharded", files)
    ck = ws.load("hf://org/sharded")
    assert len(ck.files) == 2
    assert_same(ck, sd)


def test_hub_missing_file_and_repo_are_one_line_errors(hub_cache, trained_mlps, tmp_path):
    hub_cache("org/mlp", {"model.safetensors": st_bytes(trained_mlps[0], tmp_path)})
    with pytest.raises(errors.SourceError) as e:
        ws.load("hf://org/mlp/nothere.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hf://org/mlp/nothere.safetensors:") and "HF_HUB_OFFLINE" in msg
    with pytest.raises(errors.SourceError) as e:
        ws.load("hf://org/never-downloaded")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hf://org/never-downloaded:")
    assert "not in the cache" in msg or "not found locally" in msg  # an offline cache miss, not "the repo has no weights"


def test_hub_through_cli_subprocess_with_env(hub_cache, trained_mlps, tmp_path):
    """The real user path: environment variables only, a fresh interpreter, the CLI (errors are tested in-process)."""
    hub_cache("org/a", {"model.safetensors": st_bytes(trained_mlps[0], tmp_path, "a.safetensors")})
    hub_cache("org/b", {"model.safetensors": st_bytes(trained_mlps[1], tmp_path, "b.safetensors")})
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache.cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "soup.safetensors"
    run = [sys.executable, "-m", "weightspace_cli", "soup", "-q", "hf://org/a", "hf-hub:org/b", "-o", str(out)]
    r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    soup = st.load_file(out)
    assert torch.allclose(soup["head.weight"], (trained_mlps[0]["head.weight"] + trained_mlps[1]["head.weight"]) / 2, rtol=1e-6)


def _timm_resnet18(num_classes: int, seed: int) -> torch.nn.Module:
    import timm
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


def test_timm_from_local_file_infers_num_classes(tmp_path):
    model = _timm_resnet18(10, seed=1)
    with torch.no_grad():  # move the BN statistics away from their defaults so a re-init would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.num_batches_tracked.fill_(7)
    sd = model.state_dict()
    path = tmp_path / "resnet18-digits.safetensors"
    st.save_file(sd, path)
    ck = ws.load(f"timm:resnet18?file={path}")
    assert ck.info("fc.weight")[1] == (10, 512)
    assert_same(ck, sd)
    # a .pth file too (timm picks torch.load by extension)
    pth = tmp_path / "resnet18-digits.pth"
    torch.save(sd, pth)
    assert_same(ws.load(f"timm:resnet18?file={pth}"), sd)


def test_timm_pretrained_name_from_offline_hub_cache(hub_cache, tmp_path):
    """timm:resnet18.a1_in1k resolves its weights through timm → huggingface_hub → the offline cache."""
    sd = _timm_resnet18(1000, seed=2).state_dict()
    hub_cache("timm/resnet18.a1_in1k", {"model.safetensors": st_bytes(sd, tmp_path)})
    ck = ws.load("timm:resnet18.a1_in1k")
    assert ck.note.startswith("timm")
    assert ck.resolved_commit == COMMIT
    assert_same(ck, sd)
    with pytest.raises(errors.SourceError) as e:
        ws.load("timm:resnet34.a1_in1k")  # a real timm name whose weights are not in the cache
    assert "\n" not in str(e.value) and str(e.value).startswith("timm:resnet34.a1_in1k:")
    with pytest.raises(errors.SourceError, match="unknown timm model"):
        ws.load("timm:no_such_net_42")


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2},
}


def test_open_clip_tiny_custom_config_and_local_weights(tmp_path):
    import open_clip
    cfg = tmp_path / "ws-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(3)
    model = open_clip.create_model("ws-tiny-clip", pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # not the seed-0 init, so a load that silently re-initialised would differ
    sd = model.state_dict()
    path = tmp_path / "tiny.safetensors"
    st.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    ck = ws.load(f"open_clip:ws-tiny-clip/{path}")
    assert_same(ck, sd)
    with pytest.raises(errors.SourceError) as e:
        ws.load("open_clip:ws-tiny-clip")
    assert "ARCH/TAG" in str(e.value)


def test_unreachable_hub_fails_fast_in_one_line_without_offline_mode(hub_cache, monkeypatch, cli):
    """No HF_HUB_OFFLINE and a Hub that refuses connections: timm:/open_clip:/hf:// names give one line at once
    (huggingface_hub alone retries with back-off for tens of seconds and logs every retry)."""
    import socket
    import time

    import huggingface_hub.constants as constants
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ["timm:resnet34.a1_in1k", "hf://org/absent", "open_clip:RN50/openai"]:
        t0 = time.perf_counter()
        r = cli("inspect", name)
        took = time.perf_counter() - t0
        assert r.exit_code == 2, (name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "unreachable" in lines[0], (name, r.stderr)
        assert "Retrying" not in r.stderr
        assert took < 30, (name, took)  # a generous bound: the libraries' own back-off takes 20-50 s
    assert constants.HF_HUB_OFFLINE is False  # offline mode was switched on for the calls only
