"""Block shuffling on real digits and mnist1d signals: identity, block multiset, one permutation for all."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightspace.eval.data import load_data
from weightspace.errors import ConfigError
from weightspace.eval.transforms import BlockShuffle, block_permutation, blocks_of, parse_transform


@pytest.fixture(scope="module")
def digits():
    return load_data("digits:test")


def _block_multiset(img: torch.Tensor, b: int) -> list[bytes]:
    return sorted(blk.contiguous().numpy().tobytes() for blk in blocks_of(img, b))


def test_block_size_equal_to_image_size_is_identity(digits):
    out = parse_transform("block-shuffle:8")(digits.x)
    assert torch.equal(out, digits.x)


@pytest.mark.parametrize("b", [1, 2, 4])
def test_each_image_keeps_its_blocks_but_not_their_places(digits, b):
    out = BlockShuffle(b, seed=3)(digits.x)
    assert out.shape == digits.x.shape
    for i in range(0, len(digits), 37):
        assert _block_multiset(out[i], b) == _block_multiset(digits.x[i], b)
    assert not torch.equal(out, digits.x)


def test_blocks_land_where_the_permutation_says(digits):
    b, seed = 2, 5
    out = BlockShuffle(b, seed)(digits.x)
    perm = block_permutation((8 // b) ** 2, seed)
    img = digits.x[11]
    src, dst = blocks_of(img, b), blocks_of(out[11], b)
    for pos, k in enumerate(perm):
        assert torch.equal(dst[pos], src[k])


def test_one_fixed_permutation_for_every_image_and_call(digits):
    t = parse_transform("block-shuffle:2:9")
    whole = t(digits.x)
    one_by_one = torch.cat([t(digits.x[i:i + 1]) for i in range(0, 40)])
    assert torch.equal(whole[:40], one_by_one)
    assert torch.equal(whole, parse_transform("block-shuffle:2:9")(digits.x))  # same seed, same permutation
    assert not torch.equal(whole, parse_transform("block-shuffle:2:10")(digits.x))


def test_load_data_applies_the_transform_after_normalisation(digits):
    shuffled = load_data("digits:test", transform=parse_transform("block-shuffle:4:1"))
    assert torch.equal(shuffled.x, BlockShuffle(4, 1)(digits.x))
    assert torch.equal(shuffled.y, digits.y)
    assert float(shuffled.x.min()) == float(digits.x.min()) == -1.0  # values are the normalised ones, moved


def test_signals_are_shuffled_in_blocks_too(digits):
    signals = digits.x.reshape(len(digits), 1, 64)  # real values, as a 1-D signal of 64 samples
    out = BlockShuffle(8, 2)(signals)
    for i in range(0, len(digits), 41):
        rows = lambda t: sorted(tuple(r) for r in t[i, 0].reshape(-1, 8).tolist())  # noqa: E731, B023
        assert rows(out) == rows(signals)
    assert not torch.equal(out, signals)
    assert torch.equal(BlockShuffle(64)(signals), signals)


def test_sizes_not_divisible_by_the_block_are_refused(digits):
    with pytest.raises(ConfigError, match="not divisible by the block size 3"):
        load_data("digits:test", transform=parse_transform("block-shuffle:3"))
    with pytest.raises(ConfigError, match="image"):
        BlockShuffle(5)(torch.zeros(2, 1, 8, 10))


@pytest.mark.parametrize("spec,msg", [("block-shuffle:x", "block size must be an integer"),
                                      ("block-shuffle", "expected block-shuffle:B"),
                                      ("block-shuffle:0", "positive"),
                                      ("rotate:90", "unknown transform 'rotate'"),
                                      ("invert:2", "unknown transform 'invert'")])
def test_bad_specs_are_one_clear_error(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_transform(spec)


def test_none_and_chains():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(parse_transform("none")(x), x)
    chained = parse_transform("block-shuffle:2:1+block-shuffle:1:2")
    assert torch.equal(chained(x), BlockShuffle(1, 2)(BlockShuffle(2, 1)(x)))
    assert chained.spec == "block-shuffle:2:1+block-shuffle:1:2"


def test_invert_swaps_ink_and_background_of_real_digits():
    from weightspace.eval.data import load_data
    d = load_data("digits:test")
    inv = parse_transform("invert")(d.x)
    assert torch.equal(inv, -d.x) and parse_transform("invert").spec == "invert"
    # digits lie in [-1, 1] with background at -1: after inversion the background is +1 and the range is kept
    assert float(inv.max()) == 1.0 and float(inv.min()) == -1.0
    assert float((d.x == -1).float().mean()) == float((inv == 1).float().mean()) > 0.3


@settings(max_examples=40, deadline=None)
@given(grid=st.integers(1, 5), b=st.integers(1, 4), c=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_block_multiset_is_invariant_for_any_shape(grid, b, c, seed):
    size = grid * b
    x = torch.randn(3, c, size, size, generator=torch.Generator().manual_seed(seed))
    out = BlockShuffle(b, seed)(x)
    for i in range(3):
        assert _block_multiset(out[i], b) == _block_multiset(x[i], b)
    if grid == 1:
        assert torch.equal(out, x)


def test_cli_transform_option_reaches_the_data(cli, tmp_path):
    import weightspace as ws
    from weightspace.eval.models import build_model
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    ws.save(build_model("weightspace.eval.zoo:small_cnn").state_dict(), path)
    bad = cli("rewind", path, "--to", "random", "--model", "weightspace.eval.zoo:small_cnn", "--data", "digits:test",
              "--transform", "block-shuffle:3", "--quiet")
    assert bad.exit_code == 2
    assert "not divisible by the block size 3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = cli("similarity", path, path, "--model", "weightspace.eval.zoo:small_cnn", "--data", "digits:test",
              "--transform", "shuffle:3")
    assert bad.exit_code == 2 and "--transform" in bad.stderr
