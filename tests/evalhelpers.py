"""Helpers for the evaluation tests (soup, interpolate, demo): really trained tiny CNNs on real digits."""
from __future__ import annotations

from pathlib import Path

import torch

CNN = "weightspace.eval.zoo:small_cnn"


def train_cnns(seeds: list[int], *, shared_init: bool, epochs: int = 3, spec: str = CNN) -> list[dict]:
    """Small CNNs (BatchNorm) trained on digits:train: fine-tunes of one init, or each from its own random init."""
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    from weightspace.eval.train import train
    data = load_data("digits:train")
    torch.manual_seed(1000)
    init = build_model(spec, num_classes=10).state_dict()
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        m = build_model(spec, num_classes=10)
        if shared_init:
            m.load_state_dict(init)
        train(m, data, epochs=epochs, lr=0.05, batch_size=32, seed=seed)
        out.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return out


def save_all(states: list[dict], folder: Path, stem: str) -> list[str]:
    """Save state dicts as safetensors files named {stem}{i}.safetensors."""
    import weightspace as ws
    paths = []
    for i, sd in enumerate(states):
        p = folder / f"{stem}{i}.safetensors"
        ws.save(sd, p)
        paths.append(str(p))
    return paths
