"""Helpers for the probe / Head2Toe tests: a model whose tapped layer is the label, and tiny CNNs really trained on digits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from weightspace.ops.parallel import single_thread

TINY_CNN = "weightspace.eval.zoo:small_cnn?width=4"


class LabelCarrier(nn.Module):
    """x[:, 0] holds the class index: layer ``label`` outputs its one-hot, layer ``noise`` sees only x[:, 1:]."""

    def __init__(self, noise_in: int = 16, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.label = nn.Identity()  # tapped as a real module, not skipped: named explicitly
        self.noise = nn.Linear(noise_in, 32)
        self.head = nn.Linear(num_classes + 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        onehot = self.label(nn.functional.one_hot(x[:, 0].long(), self.num_classes).float())
        return self.head(torch.cat([onehot, torch.relu(self.noise(x[:, 1:]))], dim=1))


def label_data(n: int, seed: int, noise_in: int = 16):
    """Real digits labels (sklearn) in column 0, Gaussian noise beside them."""
    from weightspace.eval.data import TensorData, digits
    y = digits("all").y[:n] if seed == 0 else digits("all").y[-n:]
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([y.float().unsqueeze(1), torch.randn(len(y), noise_in, generator=g)], dim=1)
    return TensorData(f"label{seed}", x, y, num_classes=10)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> list[str]:
    """A width-4 small CNN really trained on digits:train: checkpoints after 1 and after 3 epochs."""
    import weightspace as ws
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    from weightspace.eval.train import train
    folder: Path = tmp_path_factory.mktemp("tiny")
    with single_thread():
        torch.manual_seed(0)
        model = build_model(TINY_CNN, num_classes=10)
        data = load_data("digits:train")
        paths = []
        for name, epochs in (("ep1", 1), ("ep3", 2)):
            train(model, data, epochs=epochs, lr=0.05, batch_size=32, seed=epochs)
            p = folder / f"{name}.safetensors"
            ws.save(model.state_dict(), p)
            paths.append(str(p))
    return paths
