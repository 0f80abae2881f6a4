"""Hostile safetensors files at scale: the fuzz run (default 20,000 mutated files) and the differential property
test against the reference library (default 10,000 generated headers). Prints the counts.

    python bench/fuzz_safetensors.py [--files N] [--examples N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--examples", type=int, default=10_000)
    args = ap.parse_args()
    sys.path.insert(0, str(TESTS))
    from test_fuzz_safetensors import fuzz
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        counts = fuzz(Path(d), args.files, seed=1)
        took = time.perf_counter() - t0
    print(f"fuzz: {counts['files']} files, {counts['accepted']} accepted (read exactly as the reference reads them), "
          f"{counts['refused']} refused with a WeightspaceError, 0 other exceptions; slowest file "
          f"{counts['slowest_s'] * 1000:.1f} ms; {took:.1f} s in all")
    env = dict(os.environ, WEIGHTSPACE_DIFF_EXAMPLES=str(args.examples))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(TESTS / "test_safetensors_differential.py"), "-k", "agrees_with_reference"], env=env,
                       capture_output=True, text=True)
    took = time.perf_counter() - t0
    verdict = "all agree" if r.returncode == 0 else "DISAGREEMENT:\n" + r.stdout[-3000:]
    print(f"differential: {args.examples} generated headers against the reference safetensors library: {verdict} "
          f"({took:.1f} s)")
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
