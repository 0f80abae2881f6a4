"""The model card `push` writes: one people would publish (rounded tables, no local paths, a license, honest about
weights weightspace did not make), and a pushed Hugging Face folder keeps its own config.json."""
from __future__ import annotations

import json
import re

import pytest
import safetensors.torch as st
import torch
import yaml

from weightspace.ops.parallel import single_thread


def _section(card: str, title: str) -> str:
    part = card.split(f"## {title}\n", 1)[1]
    return part.split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def nets():
    """timm test_resnet on grey 8×8 digits: one trained a few steps, one at its random init."""
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    data = load_data("digits:train")
    torch.manual_seed(0)
    init = build_model("timm:test_resnet", num_classes=10, in_chans=1)
    untrained = {k: v.clone() for k, v in init.state_dict().items()}
    opt = torch.optim.SGD(init.parameters(), lr=0.05, momentum=0.9)
    with single_thread():
        for idx in torch.randperm(len(data.x))[:960].split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(init(data.x[idx].float()), data.y[idx]).backward()
            opt.step()
    return {"trained": {k: v.detach().clone() for k, v in init.state_dict().items()}, "untrained": untrained}


def test_greedy_card_rounds_hides_paths_and_says_it_is_the_best_model(cli, tmp_path, nets):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    st.save_file(nets["trained"], good)
    st.save_file(nets["untrained"], bad)
    run = tmp_path / "run"
    r = cli("soup", "--greedy", good, bad, "--model", "timm:test_resnet", "--in-chans", "1", "--val", "digits:val",
            "--test", "digits:test", "--out", run, "-o", run / "greedy.safetensors", "--quiet")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "card"
    r = cli("push", run / "greedy.safetensors", "alice/greedy", "--card-from", run, "--dry-run", out,
            "--license", "mit")
    assert r.exit_code == 0, r.stderr
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "mit" and "model-soup" in front["tags"]
    assert "equals the best single model" in card and "`good.safetensors`" in card
    board = _section(card, "Leaderboard")
    assert not re.search(r"\d\.\d{5,}", board), board            # 4 decimals, not 17 digits
    assert not re.search(r"\|\s*\d+\.0\s*\|", board), board       # counts as integers
    assert str(tmp_path) not in card and "../" not in card       # no local paths anywhere


def test_weights_not_made_by_weightspace_get_an_honest_card_and_keep_their_config(cli, tmp_path, nets):
    """A Hugging Face folder as timm's own push_to_hf_hub writes it (config.json by timm's exporter)."""
    import timm
    from timm.models._hub import save_config_for_hf
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    model.load_state_dict(nets["trained"])
    st.save_file(model.state_dict(), folder / "model.safetensors")
    save_config_for_hf(model, folder / "config.json")
    out = tmp_path / "card"
    r = cli("push", folder, "alice/plain", "--dry-run", out, "--license", "apache-2.0", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["library"] == "timm"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 10
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0"
    assert "model-soup" not in front["tags"] and "weightspace" not in front["tags"]
    assert "made with weightspace" not in card and "## Method" not in card
    # and timm loads what would be pushed
    got = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(got.state_dict()["fc.weight"], nets["trained"]["fc.weight"])
