"""open_clip as an evaluation model: a CLIP checkpoint without a head gets its zero-shot head from its text tower."""
from __future__ import annotations

import json

import pytest
import torch

import weightspace as ws
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
    sd = dict(ws.load(str(path)).to_dict())
    sd["head.weight"] = torch.zeros(10, 32)
    sd["head.bias"] = torch.arange(10, dtype=torch.float32)
    ev = ws.Evaluator(model, data, device="cpu", keep_logits=True)
    logits = ev(sd).logits[data.name]
    assert torch.equal(logits.argmax(1), torch.full((40,), 9))  # the bias alone decides: class 9
    sd.pop("visual.conv1.weight")
    with pytest.raises(ws.IncompatibleCheckpoints, match="visual.conv1.weight"):
        ev(sd)
