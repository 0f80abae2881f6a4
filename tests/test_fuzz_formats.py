"""Fuzzed mergekit YAML, recipe YAML, sharded .bin indexes, image folders and tar shards (issue 19): each input is
read or refused with a WeightspaceError, none takes over 10 s, and the process's peak memory grows by less than
256 MB over the run. WEIGHTSPACE_FUZZ_FORMAT_FILES scales the counts (bench/fuzz_formats.py runs thousands)."""
from __future__ import annotations

import os

import pytest

from fuzz_formats import fuzz_format

SCALE = float(os.environ.get("WEIGHTSPACE_FUZZ_FORMAT_FILES", "1"))
COUNTS = {"mergekit": 200, "recipe": 100, "bin-index": 200, "image-folder": 40, "tar-shard": 60}  # ~2 s each


@pytest.mark.parametrize("fmt", list(COUNTS))
def test_fuzzed_inputs_are_read_or_refused_cleanly(fmt, tmp_path):
    n = max(1, int(COUNTS[fmt] * SCALE))
    c = fuzz_format(fmt, tmp_path, n)
    assert c["files"] == n
    assert c["other_exceptions"] == c["timeouts"] == 0, c["failures"]
    assert c["refused"] > 0 and c["accepted"] > 0, c  # both outcomes exercised: the mutations are neither all fatal
    assert c["slowest_s"] < 10 and c["rss_growth_mb"] < 256, c
