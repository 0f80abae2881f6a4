"""Tiny models for the demo, recipes and tests: real architectures, small enough to train in seconds on a CPU."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORMS", "SmallCNN", "MLP", "small_cnn", "mlp"]


NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # no running statistics: nothing to re-estimate after interpolating or rewinding
        return nn.GroupNorm(min(4, channels), channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """conv-norm-relu ×3 with a linear head; works on 8×8 digits and on 28×28/32×32 images alike.

    ``norm``: "batch" (BatchNorm, the default), "group" (GroupNorm, 4 groups) or "none" (convolutions with biases):
    the same network without the BatchNorm confound of interpolated or rewound running statistics.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16, norm: str = "batch") -> None:
        """The network for ``num_classes`` classes and ``in_chans`` input channels, ``width`` channels in the first
        convolution, normalised by ``norm``.

        Raises:
            ValueError: an unknown ``norm`` (build_model reports it as a ConfigError).
        """
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"small_cnn norm={norm!r}: expected one of {', '.join(NORMS)}")
        w, bias = width, norm == "none"
        self.conv1 = nn.Conv2d(in_chans, w, 3, padding=1, bias=bias)
        self.bn1 = _norm(norm, w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=bias)
        self.bn2 = _norm(norm, 2 * w)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2, bias=bias)
        self.bn3 = _norm(norm, 4 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch ``x``."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """Flatten → Linear/ReLU stack → Linear."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch ``x``."""
        return self.layers(x)


def small_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 16, norm: str = "batch") -> SmallCNN:
    """Factory for `--model weightspace.eval.zoo:small_cnn[?width=16&norm=batch|group|none]`; raises ValueError
    for an unknown norm.

    Raises:
        ValueError: an unknown ``norm`` (build_model reports it as a ConfigError).
    """
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, width=width, norm=norm)


def mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 128, depth: int = 2, in_chans: int | None = None) -> MLP:
    """Factory for `--model weightspace.eval.zoo:mlp` (in_features 64 fits 8×8 digits, 40 fits mnist1d)."""
    return MLP(num_classes=num_classes, in_features=in_features, hidden=hidden, depth=depth)
