"""Checkpoints as other tools write them: timm's CheckpointSaver (argparse.Namespace, EMA), Lightning ('model.'
prefix); EMA and prefixes chosen per source or for every source of a command."""
from __future__ import annotations

import argparse
import json

import pytest
import safetensors.torch as st
import torch

import weightspace as ws
from weightspace.ops.parallel import single_thread

MODEL = "timm:test_resnet"


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """A timm test_resnet trained on grey 8×8 digits with an EMA copy, saved by timm's own CheckpointSaver; and the
    same weights as a Lightning checkpoint (LightningModule attribute 'model', so every key starts 'model.')."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    folder = tmp_path_factory.mktemp("timm-run")
    data = load_data("digits:train")
    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=10, in_chans=1)
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with single_thread():
        for _ in range(1):  # a few real steps: enough to separate the EMA from the weights
            for idx in torch.randperm(len(data.x))[:640].split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(data.x[idx].float()), data.y[idx]).backward()
                opt.step()
                ema.update(model)
    args = argparse.Namespace(model="test_resnet", lr=0.05, epochs=2)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), decreasing=False, max_history=1)
    saver.save_checkpoint(1, metric=0.5)
    regular = {k: v.detach().clone() for k, v in model.state_dict().items()}
    averaged = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
    lightning = folder / "epoch=1-step=56.ckpt"
    torch.save({"epoch": 1, "global_step": 56, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in regular.items()},
                "loops": {}, "callbacks": {}, "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.05}}, lightning)
    return {"best": folder / "model_best.pth.tar", "regular": regular, "ema": averaged, "lightning": lightning,
            "folder": folder}


def _same(ck, sd) -> None:
    assert sorted(ck) == sorted(sd)
    for k in sd:
        assert torch.equal(ck[k], sd[k]), k


def test_timm_checkpoint_saver_files_load_with_their_args(timm_run):
    best = str(timm_run["best"])
    _same(ws.load(best), timm_run["regular"])
    assert "state_dict_ema" in ws.load(best).variant  # the EMA weights it skipped are named
    _same(ws.load(f"{best}?ema=1"), timm_run["ema"])
    # through timm's own builder too: same weights, same EMA choice
    _same(ws.load(f"timm:test_resnet?file={best}"), timm_run["regular"])
    _same(ws.load(f"timm:test_resnet?file={best}&ema=1"), timm_run["ema"])


def test_ema_per_source_and_for_every_source(timm_run, tmp_path, cli, trained_mlps):
    best = str(timm_run["best"])
    plain = tmp_path / "plain.safetensors"
    ws.save(timm_run["regular"], plain)
    # the global --ema prefers EMA where a file has it and takes plain files as they are: a mixed list works
    out = tmp_path / "soup.safetensors"
    r = cli("soup", "--ema", best, plain, "-o", out)
    assert r.exit_code == 0, r.stderr
    soup = st.load_file(out)
    k = "conv1.0.weight"
    assert torch.allclose(soup[k], (timm_run["ema"][k] + timm_run["regular"][k]) / 2)
    # per source: ?ema=1 on one input only
    out2 = tmp_path / "soup2.safetensors"
    r = cli("soup", f"{best}?ema=1", best, "-o", out2)
    assert r.exit_code == 0, r.stderr
    assert torch.allclose(st.load_file(out2)[k], (timm_run["ema"][k] + timm_run["regular"][k]) / 2)
    # ?ema=0 wins over --ema
    r = cli("distance", "--ema", "--json", f"{best}?ema=0", plain)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["total"]["l2"] == 0.0
    r = cli("distance", "--ema", "--json", best, plain)
    assert r.exit_code == 0 and json.loads(r.stdout)["total"]["l2"] > 0
    # verbs that lacked --ema have it now
    for verb in ["push", "align", "rewind", "similarity", "criticality", "probe", "head2toe"]:
        assert "--ema" in cli(verb, "--help").stdout, verb


def test_lightning_prefix_stripped_to_fit_the_model_and_said(timm_run, cli):
    ckpt = str(timm_run["lightning"])
    r = cli("leaderboard", ckpt, "--model", MODEL, "--in-chans", "1", "--data", "digits:val", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "prefix 'model.'" in r.stderr and ckpt in r.stderr
    explicit = cli("leaderboard", f"{ckpt}?prefix=model.", "--model", MODEL, "--in-chans", "1", "--data",
                   "digits:val", "--json", "--quiet")
    assert explicit.exit_code == 0 and "prefix" not in explicit.stderr
    acc = [line for line in r.stdout.splitlines() if '"accuracy"' in line]
    assert acc and acc == [line for line in explicit.stdout.splitlines() if '"accuracy"' in line]
    # the explicit form on any verb, for every source at once
    _same(ws.load(f"{ckpt}?prefix=model."), timm_run["regular"])
    r = cli("inspect", "--strip-prefix", "model.", "--json", ckpt)
    assert r.exit_code == 0 and '"model.conv1' not in r.stdout and '"conv1.0.weight"' in r.stdout
    r = cli("inspect", "--strip-prefix", "net.", ckpt)
    assert r.exit_code == 2 and "no key starts with the prefix 'net.'" in r.stderr


def test_a_misfit_that_no_prefix_explains_is_still_an_error(timm_run, tmp_path, cli):
    sd = {f"model.{k}": v for k, v in timm_run["regular"].items()}
    sd["criterion.weight"] = torch.ones(10)  # a second module: no single prefix fits, so nothing is guessed
    p = tmp_path / "two-modules.safetensors"
    st.save_file(sd, p)
    r = cli("leaderboard", p, "--model", MODEL, "--in-chans", "1", "--data", "digits:val", "--quiet")
    assert r.exit_code == 2 and "does not fit the model" in r.stderr
    assert cli("leaderboard", f"{p}?prefix=model.", "--model", MODEL, "--in-chans", "1", "--data", "digits:val",
               "--quiet").exit_code == 0
