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

from safetensors_oracle import Timeout, agree, alarm, mutate, seed_files

FILES = int(os.environ.get("WEIGHTSPACE_FUZZ_FILES", "5000"))


def fuzz(folder, n: int, seed: int = 0) -> dict:
    """Mutate the seeds n times and check each file. Returns the counts (files, accepted, refused, and the failures:
    mismatches with the reference, other exceptions, files over 10 s), the slowest file's seconds, and up to five
    failures described."""
    rng = random.Random(seed)
    seeds = seed_files(folder)
    counts: dict = {"files": 0, "accepted": 0, "refused": 0, "mismatches": 0, "other_exceptions": 0, "timeouts": 0,
                    "slowest_s": 0.0, "failures": []}
    path = folder / "fuzzed.safetensors"
    for i in range(n):
        blob = mutate(rng.choice(seeds), rng)
        path.write_bytes(blob)
        t0 = time.perf_counter()
        failed = None
        try:
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
        except AssertionError as e:  # agree() found our reader and the reference disagreeing
            failed = ("mismatches", str(e)[:300])
        except Timeout:
            failed = ("timeouts", "over 10 s")
        except Exception as e:  # noqa: BLE001 — anything but a WeightspaceError is a bug
            failed = ("other_exceptions", f"{type(e).__name__}: {str(e)[:200]}")
        counts["slowest_s"] = max(counts["slowest_s"], time.perf_counter() - t0)
        counts["files"] += 1
        if failed:
            counts[failed[0]] += 1
            if len(counts["failures"]) < 5:
                counts["failures"].append(f"file {i} ({blob[:120]!r}): {failed[1]}")
        else:
            counts["accepted" if accepted else "refused"] += 1
    return counts


def test_fuzzed_files_are_refused_cleanly_or_read_as_the_reference_reads_them(tmp_path):
    counts = fuzz(tmp_path, FILES)
    assert counts["files"] == FILES
    assert counts["mismatches"] == counts["other_exceptions"] == counts["timeouts"] == 0, counts["failures"]
    assert counts["accepted"] > FILES // 50 and counts["refused"] > FILES // 2, counts  # both outcomes exercised
    assert counts["slowest_s"] < 10
