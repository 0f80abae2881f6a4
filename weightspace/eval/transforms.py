"""Input transforms applied to whole tensors of examples, after the data's own normalisation.

Spec strings (``--transform SPEC``, ``load_data(spec, transform=parse_transform(SPEC))``):

- ``block-shuffle:B[:SEED]`` — split every image into B×B blocks and move the blocks by one fixed random
  permutation of block positions (the same for every image, train and test; SEED defaults to 0). Works on
  images (N, C, H, W) with H and W divisible by B, and on 1-D signals (N, C, L) with L divisible by B.
  B equal to the image size is the identity. Neyshabur et al. 2020, section 3.1.
- ``invert`` — x ↦ −x: inverted pixels for data scaled to [−1, 1] (the built-in ``digits`` and ``mnist``).
- ``none`` — the identity.
- Several transforms chain with ``+``: ``block-shuffle:4+block-shuffle:2:1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["Transform", "block_permutation", "BlockShuffle", "Invert", "Chain", "parse_transform",
           "blocks_of"]

Transform = Callable[[torch.Tensor], torch.Tensor]


def block_permutation(n_blocks: int, seed: int) -> np.ndarray:
    """The fixed permutation of block positions for a seed: position i receives block perm[i]."""
    return np.random.default_rng(seed).permutation(n_blocks)


@dataclass(frozen=True)
class BlockShuffle:
    """Permute B×B blocks of every image with one seeded permutation (identity when B is the image size)."""

    block: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ConfigError(f"block-shuffle:{self.block}: the block size must be a positive integer")

    @property
    def spec(self) -> str:
        """The spec string that rebuilds this transform."""
        return f"block-shuffle:{self.block}:{self.seed}"

    def _check(self, size: int, what: str) -> int:
        if size % self.block:
            raise ConfigError(f"transform={self.spec}: {what} {size} is not divisible by the block size "
                              f"{self.block} (pick a divisor of {size})", param="transform")
        return size // self.block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffle the blocks of a batch (N, C, H, W) or (N, C, L); returns a new contiguous tensor.

        Raises:
            ConfigError: ``x`` is neither a batch of images (N, C, H, W) nor of signals (N, C, L), or its size does not
                divide into the blocks.
        """
        b = self.block
        if x.ndim == 4:
            n, c, h, w = x.shape
            gh, gw = self._check(h, "image height"), self._check(w, "image width")
            perm = torch.from_numpy(block_permutation(gh * gw, self.seed)).to(x.device)
            # (N, C, gh, b, gw, b) → (N, C, gh·gw, b, b): one row per block, in raster order
            blocks = x.reshape(n, c, gh, b, gw, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * gw, b, b)
            blocks = blocks[:, :, perm]
            return blocks.reshape(n, c, gh, gw, b, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w).contiguous()
        if x.ndim == 3:
            n, c, length = x.shape
            g = self._check(length, "signal length")
            perm = torch.from_numpy(block_permutation(g, self.seed)).to(x.device)
            return x.reshape(n, c, g, b)[:, :, perm].reshape(n, c, length).contiguous()
        raise ConfigError(f"transform={self.spec}: needs images (N, C, H, W) or signals (N, C, L), "
                          f"got a tensor of shape {list(x.shape)}", param="transform")


@dataclass(frozen=True)
class Invert:
    """x ↦ −x: ink becomes background for data scaled to [−1, 1] (a far target domain with the same labels)."""

    @property
    def spec(self) -> str:
        """The spec string that rebuilds this transform."""
        return "invert"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The negated batch (a new tensor)."""
        return -x


@dataclass(frozen=True)
class Chain:
    """Several transforms applied in order."""

    parts: tuple

    @property
    def spec(self) -> str:
        """The spec string that rebuilds this chain."""
        return "+".join(p.spec for p in self.parts) or "none"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every part in order."""
        for p in self.parts:
            x = p(x)
        return x


def _int(text: str, spec: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"transform={spec}: {what} must be an integer, got {text!r}", param="transform") from None


def _parse_one(part: str, spec: str):
    name, *args = part.strip().split(":")
    if name == "block-shuffle":
        if not 1 <= len(args) <= 2:
            raise ConfigError(f"transform={spec}: expected block-shuffle:B or block-shuffle:B:SEED", param="transform")
        block = _int(args[0], spec, "the block size")
        seed = _int(args[1], spec, "the seed") if len(args) == 2 else 0
        return BlockShuffle(block, seed)
    if name == "invert" and not args:
        return Invert()
    raise ConfigError(f"transform={spec}: unknown transform '{name}' (known: block-shuffle:B[:SEED], invert, none)", param="transform")


def parse_transform(spec: str | None) -> Chain:
    """Parse a transform spec ('block-shuffle:4[:seed]', 'invert', 'none', parts joined by '+') into a callable.

    Raises:
        ConfigError: an unknown transform or a malformed block-shuffle.
    """
    if spec is None or spec.strip() in ("", "none", "identity"):
        return Chain(())
    return Chain(tuple(_parse_one(p, spec) for p in spec.split("+")))


def blocks_of(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """The B×B blocks of one image (C, H, W) in raster order (for checks and plots)."""
    c, h, w = x.shape
    return [x[:, i:i + block, j:j + block] for i in range(0, h, block) for j in range(0, w, block)]

