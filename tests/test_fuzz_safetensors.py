"""Fuzzed safetensors files (issue 11): byte flips, truncations, header-length values and structure-aware edits of
valid files, read in-process with a per-file alarm. Only WeightspaceError-family refusals, no file over 10 s, and
every accepted file reads exactly as the reference reads it. WEIGHTSPACE_FUZZ_FILES sets the number of files
(bench/fuzz_safetensors.py runs ≥ 5,000 and prints the counts)."""
from __future__ import annotations

import os
import random
import time

import weightspace as ws
from weightspace.errors import WeightspaceError

from safetensors_oracle import agree, alarm, mutate, seed_files

FILES = int(os.environ.get("WEIGHTSPACE_FUZZ_FILES", "5000"))


def fuzz(folder, n: int, seed: int = 0) -> dict[str, float]:
    """Mutate the seeds n times; check each file; return the counts and the slowest file's seconds."""
    rng = random.Random(seed)
    seeds = seed_files(folder)
    counts = {"files": 0, "accepted": 0, "refused": 0, "slowest_s": 0.0}
    path = folder / "fuzzed.safetensors"
    for i in range(n):
        blob = mutate(rng.choice(seeds), rng)
        path.write_bytes(blob)
        t0 = time.perf_counter()
        with alarm(10):
            accepted = agree(path)
            if i % 10 == 0:  # the whole loading path too (key normalisation, prefixes), not only the reader
                try:
                    ck = ws.load(path)
                    for k in ck:
                        ck[k]
                    ck.close()
                except WeightspaceError:
                    pass
        counts["slowest_s"] = max(counts["slowest_s"], time.perf_counter() - t0)
        counts["files"] += 1
        counts["accepted" if accepted else "refused"] += 1
    return counts


def test_fuzzed_files_are_refused_cleanly_or_read_as_the_reference_reads_them(tmp_path):
    counts = fuzz(tmp_path, FILES)
    assert counts["files"] == FILES
    assert counts["accepted"] > FILES // 50 and counts["refused"] > FILES // 2, counts  # both outcomes exercised
    assert counts["slowest_s"] < 10
