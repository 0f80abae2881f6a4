"""open_clip as an evaluation model: a CLIP checkpoint without a head gets its zero-shot head from its text tower."""
from __future__ import annotations

import json

import pytest
import torch

import weightspace as ws
from weightspace import errors
from weightspace.eval.data import load_data
from weightspace.eval.models import ZERO_SHOT_TEMPLATE, build_model

CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    d = tmp_path_factory.mktemp("clip")
    (d / "ws-eval-clip.json").write_text(json.dumps(CFG))
    open_clip.add_model_config(d / "ws-eval-clip.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("ws-eval-clip").eval()
    path = ws.save(clip, d / "clip.safetensors")
    return clip, path, open_clip.get_tokenizer("ws-eval-clip")


def test_zero_shot_head_matches_open_clip(tiny_clip):
    clip, path, tok = tiny_clip
    data = load_data("digits:test?size=32&channels=3&limit=40")
    model = build_model("open_clip:ws-eval-clip?classes=" + ",".join(NAMES))
    assert model.head.out_features == 10
    ev = ws.Evaluator(model, data, device="cpu", keep_logits=True)
    got = ev(str(path)).logits[data.name]
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(data.x), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(tok([ZERO_SHOT_TEMPLATE.format(n) for n in NAMES])), dim=-1)
        want = clip.logit_scale.exp() * img @ txt.T
    assert torch.allclose(got, want, atol=1e-4)


def test_a_stored_head_is_used_and_a_broken_tower_is_refused(tiny_clip):
    clip, path, _ = tiny_clip
    data = load_data("digits:test?size=32&channels=3&limit=40")
    model = build_model("open_clip:ws-eval-clip", num_classes=10)
    sd = dict(ws.load(str(path)).materialise())
    sd["head.weight"] = torch.zeros(10, 32)
    sd["head.bias"] = torch.arange(10, dtype=torch.float32)
    ev = ws.Evaluator(model, data, device="cpu", keep_logits=True)
    logits = ev(sd).logits[data.name]
    assert torch.equal(logits.argmax(1), torch.full((40,), 9))  # the bias alone decides: class 9
    sd.pop("visual.conv1.weight")
    with pytest.raises(errors.IncompatibleCheckpoints, match="visual.conv1.weight"):
        ev(sd)


def _named_folder(root, names: dict[str, str]):
    """Real digit images (three classes) in folders named by ``names`` (digit folder → class name)."""
    import datahelpers as dh
    for cls, i, arr in dh.digit_images(4, (40, 40)):
        (root / names[cls]).mkdir(parents=True, exist_ok=True)
        (root / names[cls] / f"{i:04d}.jpg").write_bytes(dh.jpeg(arr))
    return root


def test_zero_shot_head_is_built_from_the_datasets_class_names(tiny_clip, tmp_path, cli):
    clip, path, tok = tiny_clip
    words = _named_folder(tmp_path / "words", {"digit0": "zero", "digit3": "three", "digit7": "seven"})
    other = _named_folder(tmp_path / "other", {"digit0": "a_circle", "digit3": "a_hook", "digit7": "a_line"})
    heads, metrics = {}, {}
    for folder, names in ((words, ["seven", "three", "zero"]), (other, ["a circle", "a hook", "a line"])):
        model = build_model("open_clip:ws-eval-clip", num_classes=3)
        data = load_data(str(folder), model=model, progress=False)
        assert model.class_names == names  # the folder names (timm's class order), as the text tower reads them
        assert data.x.shape[1:] == (3, 32, 32)  # open_clip's own eval transform (the tower's 32-pixel input)
        r = ws.Evaluator(model, data, device="cpu", keep_logits=True)(str(path))
        assert model.head.weight.shape == (3, 32)
        with torch.no_grad():
            txt = torch.nn.functional.normalize(clip.encode_text(tok([ZERO_SHOT_TEMPLATE.format(n) for n in names])), dim=-1)
            img = torch.nn.functional.normalize(clip.encode_image(data.prepare(data.x)), dim=-1)
        assert torch.allclose(model.head.weight, clip.logit_scale.exp() * txt, atol=1e-5)
        assert torch.allclose(r.logits[data.name], clip.logit_scale.exp() * img @ txt.T, atol=1e-4)
        assert r[data.name]["n"] == 12 and 0.0 <= r[data.name]["accuracy"] <= 1.0
        heads[folder.name] = model.head.weight.clone()
        metrics[folder.name] = r[data.name]
    assert not torch.allclose(heads["words"], heads["other"], atol=1e-3)  # other names, another head
    # the CLI sizes the head from the folder and names it the same way
    res = cli("leaderboard", str(path), "--model", "open_clip:ws-eval-clip", "--data", str(words), "--device", "cpu",
              "--quiet", "--json")
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)["leaderboard"]["rows"][0]["metrics"][str(words)]
    assert got["n"] == 12 and got["accuracy"] == metrics["words"]["accuracy"]
    assert abs(got["loss"] - metrics["words"]["loss"]) < 1e-6


def test_imagenet_wnid_folders_give_the_zero_shot_head_readable_class_names(tiny_clip, tmp_path):
    _, path, _ = tiny_clip
    folder = _named_folder(tmp_path / "inet", {"digit0": "n01440764", "digit3": "n02099601", "digit7": "n09472597"})
    model = build_model("open_clip:ws-eval-clip", num_classes=3)
    data = load_data(str(folder), model=model, progress=False)
    assert model.class_names == ["tench", "golden retriever", "volcano"]  # not "a photo of a n01440764."
    r = ws.Evaluator(model, data, device="cpu")(str(path))
    assert r[data.name]["n"] == 12
