"""Hostile safetensors files at scale, in-process: the fuzz run (default 20,000 mutated files, a 10 s alarm per file)
and the differential property test against the reference library (default 10,000 generated headers, Hypothesis).

Prints the counts: files generated, accepted (each read exactly as the reference reads it), refused with a
WeightspaceError, mismatches with the reference, other exceptions, files over 10 s, the slowest file; Hypothesis
cases run and failures. Exits 1 on any failure.

    python bench/fuzz_safetensors.py [--files N] [--examples N] [--seed S]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def run_fuzz(files: int, seed: int) -> bool:
    from test_fuzz_safetensors import fuzz
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        c = fuzz(Path(d), files, seed=seed)
        took = time.perf_counter() - t0
    print(f"fuzz: {c['files']} files generated: {c['accepted']} accepted (read exactly as the reference reads them), "
          f"{c['refused']} refused with a WeightspaceError; {c['mismatches']} mismatches with the reference, "
          f"{c['other_exceptions']} other exceptions, {c['timeouts']} files over 10 s; slowest file "
          f"{c['slowest_s'] * 1000:.1f} ms; {took:.1f} s in all")
    for f in c["failures"]:
        print("  FAILURE:", f)
    return not c["failures"]


def run_differential(examples: int) -> bool:
    from hypothesis import HealthCheck, given, settings

    from safetensors_oracle import agree
    from test_safetensors_differential import safetensors_files
    seen = {"cases": 0, "accepted": 0}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "case.safetensors"

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(blob=safetensors_files())
        def prop(blob: bytes) -> None:
            seen["cases"] += 1
            path.write_bytes(blob)
            seen["accepted"] += agree(path)

        t0 = time.perf_counter()
        failure = None
        try:
            prop()
        except Exception as e:  # noqa: BLE001 — Hypothesis re-raises the shrunk failing case
            failure = f"{type(e).__name__}: {str(e)[:500]}"
        took = time.perf_counter() - t0
    print(f"differential: {seen['cases']} Hypothesis cases run against the reference safetensors library "
          f"({seen['accepted']} accepted by both, the rest refused by both), {1 if failure else 0} failures "
          f"({took:.1f} s)")
    if failure:
        print("  FAILURE:", failure)
    return failure is None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(TESTS))
    ok = run_fuzz(args.files, args.seed)
    ok = run_differential(args.examples) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
