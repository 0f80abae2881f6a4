"""Pushing to the Hub, proven against a loopback Hub (tests/hubserver.py) that speaks huggingface_hub's protocol.

Two timm resnet18 models (10 classes) are really trained for a few SGD steps on sklearn's digits (upscaled to
32×32×3) from one shared init; weightspace soups them; `weightspace push` sends the soup to the loopback Hub; a
fresh process downloads it with hf_hub_download and loads it with timm.create_model("hf-hub:...").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import weightspace as ws
from weightspace.ops import stream as ops

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer  # noqa: E402

TOKEN = "hf_wsTestToken0123456789abcdefXYZ"   # the loopback Hub's only valid token (user alice, org my-org)


def _digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(y, dtype=torch.long)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Two trained resnet18 ingredients, their soups (timm-sourced and local-path-sourced) and a run folder."""
    threads = torch.get_num_threads()
    # One thread: small convolutions gain nothing from two, and two threads collapse when the CPUs are shared.
    torch.set_num_threads(1)
    try:
        return _train_and_soup(tmp_path_factory.mktemp("hubpush"))
    finally:
        torch.set_num_threads(threads)


def _train_and_soup(d: Path) -> dict:
    import timm
    torch.manual_seed(0)
    x, y = _digits_32()
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    train, val = perm[:1400], perm[1400:]
    init = timm.create_model("resnet18", num_classes=10).state_dict()
    paths = []
    for seed in range(2):
        torch.manual_seed(100 + seed)
        model = timm.create_model("resnet18", num_classes=10)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for idx in train[torch.randperm(len(train))][: 10 * 64].split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        # Ten steps leave BatchNorm's running averages far behind the weights: re-estimate them (as update_bn does).
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            model(x[train[:512]])
        paths.append(d / f"ft{seed}.safetensors")
        ws.save(model, paths[-1])
    soup_timm = ws.save(ops.uniform_soup_stream([f"timm:resnet18?file={p}" for p in paths]), d / "soup_timm.safetensors")
    soup_local = ws.save(ops.uniform_soup_stream([str(p) for p in paths]), d / "soup_local.safetensors")

    # A run folder as `--out DIR` writes it: results.json, leaderboard.csv, curve.png, from real evaluations.
    run = d / "run"
    run.mkdir()
    probe = timm.create_model("resnet18", num_classes=10)
    val_x, val_y = x[val], y[val]
    accs = {}
    for name, p in [("ft0", paths[0]), ("ft1", paths[1]), ("uniform soup", soup_local)]:
        probe.load_state_dict(ws.load(p).materialise())
        accs[name] = _accuracy(probe, val_x, val_y)
    rows = [{"method": n, "source": str(p), "metrics": {"val": {"accuracy": accs[n]}}}
            for n, p in [("ft0", paths[0]), ("ft1", paths[1])]]
    (run / "results.json").write_text(json.dumps({"model": "timm:resnet18", "num_classes": 10, "data": "digits:val",
                                                   "seed": 0, "leaderboard": rows}))
    (run / "leaderboard.csv").write_text("method,val accuracy\n" + "".join(f"{n},{a:.4f}\n" for n, a in accs.items()))
    alphas = [0.0, 0.5, 1.0]
    curve = []
    for a in alphas:
        probe.load_state_dict(ws.lerp(paths[0], paths[1], a))
        curve.append(_accuracy(probe, val_x, val_y))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(alphas, curve)
    fig.savefig(run / "curve.png")
    plt.close(fig)
    return {"dir": d, "paths": paths, "soup_timm": Path(soup_timm), "soup_local": Path(soup_local), "run": run,
            "accs": accs}


# One fresh process does every Hub interaction, because huggingface_hub reads HF_ENDPOINT when it is imported.
CLIENT = textwrap.dedent(r'''
    import json, os, sys
    import torch
    from click.testing import CliRunner
    from weightspace_cli.main import main
    import weightspace as ws
    soup_timm, soup_local, run_dir, token = sys.argv[1:5]
    out = {}

    def cli(args, **env):
        r = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
        return {"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}

    out["push"] = cli(["push", soup_timm, "my-org/resnet18-soup", "--json", "--quiet"])
    out["repush"] = cli(["push", soup_timm, "my-org/resnet18-soup", "--json", "--quiet"])
    out["push_dev"] = cli(["push", soup_local, "alice/resnet18-local", "--private", "--revision", "dev",
                           "--card-from", run_dir, "--json", "--quiet"])
    out["bare"] = cli(["push", soup_timm, "bare-soup", "--json", "--quiet"])
    out["no_token"] = cli(["push", soup_timm, "my-org/never"], HF_TOKEN=None)
    out["wrong_token"] = cli(["push", soup_timm, "my-org/never"], HF_TOKEN="hf_wrong")
    out["bad_name"] = cli(["push", soup_timm, "my-org/bad--name"])
    try:
        ws.push_to_hub(soup_timm, "my-org/never", token="hf_wrong")
    except ws.WeightspaceError as e:
        out["api_wrong_token"] = f"{type(e).__name__}: {e}"

    import timm
    from huggingface_hub import hf_hub_download
    soup = ws.load(soup_timm)
    weights = hf_hub_download("my-org/resnet18-soup", "model.safetensors")
    got = ws.load(weights)
    out["download_equal"] = sorted(got) == sorted(soup) and all(torch.equal(got[k], soup[k]) for k in soup)
    out["config"] = json.loads(open(hf_hub_download("my-org/resnet18-soup", "config.json")).read())
    model = timm.create_model("hf-hub:my-org/resnet18-soup", pretrained=True)
    sd = model.state_dict()
    out["timm_equal"] = sorted(sd) == sorted(soup) and all(torch.equal(sd[k], soup[k]) for k in soup)
    out["timm_num_classes"] = model.num_classes

    local = ws.load(soup_local)
    model2 = timm.create_model("hf-hub:alice/resnet18-local@dev", pretrained=True)
    sd2 = model2.state_dict()
    out["timm_dev_equal"] = all(torch.equal(sd2[k], local[k]) for k in local)
    out["dev_readme"] = open(hf_hub_download("alice/resnet18-local", "README.md", revision="dev")).read()
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def hub_session(trained, tmp_path_factory) -> dict:
    """Run CLIENT against a loopback Hub; return its report, the server state and the client's raw output."""
    d = tmp_path_factory.mktemp("hubsession")
    with HubServer(d / "hub", {TOKEN: "alice"}, {"alice": {"my-org"}}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(d / "hf_home"), HF_HUB_CACHE=str(d / "cache"),
                   HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", CLIENT, str(trained["soup_timm"]), str(trained["soup_local"]),
                               str(trained["run"]), TOKEN], env=env, capture_output=True, text=True, timeout=300)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        assert proc.returncode == 0 and line, proc.stderr[-4000:]
        return {"report": json.loads(line[7:]), "state": hub.state, "raw": proc.stdout + proc.stderr,
                "root": d / "hub"}


@pytest.mark.slow  # the loopback Hub server
def test_pushed_soup_loads_in_timm_with_equal_tensors(hub_session, trained):
    r = hub_session["report"]
    assert r["push"]["code"] == 0, r["push"]["stderr"]
    pushed = json.loads(r["push"]["stdout"])
    assert pushed["repo_id"] == "my-org/resnet18-soup" and pushed["library"] == "timm" and not pushed["dry_run"]
    assert pushed["files"] == ["README.md", "config.json", "model.safetensors"]
    assert r["download_equal"] and r["timm_equal"] and r["timm_num_classes"] == 10
    assert r["config"]["architecture"] == "resnet18" and r["config"]["num_classes"] == 10
    assert r["config"]["num_features"] == 512 and r["config"]["pretrained_cfg"]["classifier"] == "fc"
    # The server stored exactly what was pushed, in the commit the client was told about.
    state = hub_session["state"]
    meta = state.meta("my-org/resnet18-soup")
    assert meta["branches"]["main"] == pushed["commit"]
    stored = state.files("my-org/resnet18-soup", pushed["commit"])
    assert stored["model.safetensors"].read_bytes() == trained["soup_timm"].read_bytes()
    assert state.unhandled == []
    # Pushing the same files again to the existing repo changes nothing: same commit, no new snapshot.
    assert r["repush"]["code"] == 0, r["repush"]["stderr"]
    assert json.loads(r["repush"]["stdout"])["commit"] == pushed["commit"]
    assert len(meta["commits"]) == 2   # the repo's initial commit and the push


@pytest.mark.slow  # the loopback Hub server
def test_push_to_private_branch_with_run_folder_card(hub_session, trained):
    r = hub_session["report"]
    assert r["push_dev"]["code"] == 0, r["push_dev"]["stderr"]
    res = json.loads(r["push_dev"]["stdout"])
    state = hub_session["state"]
    meta = state.meta("alice/resnet18-local")
    assert meta["private"] and meta["branches"]["dev"] == res["commit"] != meta["branches"]["main"]
    assert set(state.files("alice/resnet18-local", res["commit"])) >= {"README.md", "config.json", "model.safetensors",
                                                                       "curve.png"}
    assert r["timm_dev_equal"]
    card = r["dev_readme"]
    assert "## Leaderboard" in card and f"{trained['accs']['uniform soup']:.4f}" in card
    assert "![barrier curve" in card and "(curve.png)" in card
    assert f"{trained['accs']['ft0']:.4f}" in card   # the ingredient's validation score, matched from results.json


@pytest.mark.slow  # the loopback Hub server
def test_bare_name_goes_to_the_token_owner(hub_session):
    res = hub_session["report"]["bare"]
    assert res["code"] == 0, res["stderr"]
    assert json.loads(res["stdout"])["repo_id"] == "alice/bare-soup"


@pytest.mark.slow  # the loopback Hub server
def test_push_errors_are_one_line_and_store_nothing(hub_session):
    r = hub_session["report"]
    for case, words in [("no_token", "no Hugging Face token found"), ("wrong_token", "refused the token (401"),
                        ("bad_name", "invalid repository name")]:
        res = r[case]
        assert res["code"] == 2, (case, res)
        lines = res["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("weightspace: error: my-org/") and words in lines[0], (case, lines)
    assert r["api_wrong_token"].startswith("HubError: my-org/never: the Hub refused the token (401")
    state = hub_session["state"]
    assert state.repos() == ["alice/bare-soup", "alice/resnet18-local", "my-org/resnet18-soup"]
    creates = [s for m, p, s in state.requests if p == "/api/repos/create"]
    assert creates.count(401) == 2   # the wrong-token pushes (CLI and API) reached the Hub and were refused


@pytest.mark.slow  # the loopback Hub server
def test_token_never_printed_or_stored(hub_session):
    assert TOKEN not in hub_session["raw"]
    for p in hub_session["root"].rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def test_dry_run_writes_the_folder_and_card(trained, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "dry"
    res = cli("push", trained["soup_local"], "my-org/soup", "--card-from", trained["run"], "--dry-run", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert TOKEN not in res.stdout + res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "curve.png", "model.safetensors",
                                                     "weightspace-manifest.json"]
    for p in out.iterdir():
        assert TOKEN.encode() not in p.read_bytes()
    # A plain safetensors soup is uploaded byte for byte, so its sha256 on the Hub is the local file's.
    assert (out / "model.safetensors").read_bytes() == trained["soup_local"].read_bytes()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and {"weightspace", "model-soup"} <= set(front["tags"])
    assert "Wortsman et al. 2022" in card and "2203.05482" in card
    prov = ws.load(trained["soup_local"]).provenance
    for ing in prov["ingredients"]:
        assert ing["sha256"] in card and Path(ing["source"]).name in card
    assert "results.json --model timm:resnet18" in card
    assert json.loads((out / "config.json").read_text())["num_classes"] == 10
    again = cli("push", trained["soup_local"], "my-org/soup", "--dry-run", out)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_dry_run_pt_input_and_missing_run_files(trained, tmp_path, cli):
    pt = tmp_path / "soup.pt"
    soup = ops.uniform_soup([str(p) for p in trained["paths"]])
    ws.save(soup, pt)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    out = tmp_path / "dry"
    res = cli("push", pt, "alice/pt-soup", "--card-from", empty_run, "--timm-arch", "resnet18", "--num-classes", "10",
              "--dry-run", out)
    assert res.exit_code == 0, res.stderr
    assert "holds none of results.json" in res.stderr
    got = ws.load(out / "model.safetensors")
    assert all(torch.equal(got[k], soup[k]) for k in soup)
    assert got.provenance["op"] == "uniform_soup"          # provenance carried over from the .pt file
    assert "## Leaderboard" not in (out / "README.md").read_text()


def test_wrong_architecture_is_one_line(trained, tmp_path, cli):
    res = cli("push", trained["soup_local"], "alice/x", "--timm-arch", "resnet34", "--dry-run", tmp_path / "d")
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and "alice/x" in line and "does not fit timm 'resnet34'" in line
    assert not (tmp_path / "d").exists()


def test_open_clip_soup_folder_loads_in_open_clip(tmp_path):
    """A soup of two tiny CLIPs from open_clip sources gets open_clip_config.json and loads via local-dir:."""
    import open_clip
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    cfg_path = tmp_path / "ws-tiny-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = open_clip.create_model("ws-tiny-clip")
        paths.append(ws.save(model, tmp_path / f"clip{seed}.safetensors"))
    soup_path = ws.save(ops.uniform_soup_stream([f"open_clip:ws-tiny-clip/{p}" for p in paths]), tmp_path / "soup.safetensors")
    out = tmp_path / "dry"
    res = ws.push_to_hub(soup_path, "alice/tiny-clip-soup", dry_run_dir=out)
    assert res.library == "open_clip" and res.files == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"] == cfg
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "open_clip"
    loaded = open_clip.create_model(f"local-dir:{out}")
    soup = ws.load(soup_path)
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], soup[k]) for k in soup)
