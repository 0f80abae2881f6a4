"""Fuzzing of mergekit YAML, recipe YAML, sharded .bin indexes, image folders and tar shards at scale, in-process
(tests/fuzz_formats.py: seeds, mutators, readers; a 10 s alarm per input).

Prints, per format: inputs generated, accepted, refused with a WeightspaceError, other exceptions, inputs over 10 s,
the slowest input and the growth of the peak RSS. Exits 1 on any failure.

    python bench/fuzz_formats.py [--files N] [--seed S] [--format NAME ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> None:
    sys.path.insert(0, str(TESTS))
    from fuzz_formats import FORMATS, fuzz_format
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000, help="inputs per format (image folders and tars: a tenth)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", action="append", choices=sorted(FORMATS))
    args = ap.parse_args()
    ok = True
    for name in args.format or list(FORMATS):
        n = args.files // 10 if name in ("image-folder", "tar-shard") else args.files
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            c = fuzz_format(name, Path(d), n, seed=args.seed)
            took = time.perf_counter() - t0
        print(f"{name}: {c['files']} inputs: {c['accepted']} accepted, {c['refused']} refused with a WeightspaceError; "
              f"{c['other_exceptions']} other exceptions, {c['timeouts']} over 10 s; slowest "
              f"{c['slowest_s'] * 1000:.0f} ms; peak RSS +{c['rss_growth_mb']:.0f} MB; {took:.1f} s in all")
        for f in c["failures"]:
            print("  FAILURE:", f)
        ok = ok and not c["failures"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
