"""Anonymous memory of `weightspace soup` over N pickled (.pt) ingredients: does it grow with N?

Resident memory (VmRSS) counts the pages of memory-mapped files, which the kernel can drop at any time; what a
soup really costs is its anonymous memory (RssAnon in /proc/PID/status: heap, tensors it allocated). This script
runs the CLI in a fresh process per point, samples RssAnon and RssFile of that process every few milliseconds, and
prints the peaks for N = 2, 8, 16 ingredients of ~20 MB, in torch's zip format (memory-mapped on load) and in its
legacy format (no memory map possible), beside a baseline soup of two tiny files (imports and start-up).

Target: the extra anonymous memory grows by well under one ingredient per added ingredient (slope ≪ 1).

    .venv/bin/python bench/pt_memory.py                       # N = 2, 8, 16; ~20 MB each; both formats
    .venv/bin/python bench/pt_memory.py --sizes 2,4 --mb 10 --formats zip
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def make(folder: Path, n: int, mb: float, fmt: str) -> list[Path]:
    """n seeded .pt state dicts of ~mb MB each (a few fp32 matrices, a BN-like buffer set, an int64 counter)."""
    import torch
    per = int(mb * (1 << 20) / 4)
    paths = []
    for i in range(n):
        path = folder / f"{fmt}-{mb:g}mb-{i:02d}.pt"
        paths.append(path)
        if path.exists():
            continue
        g = torch.Generator().manual_seed(i)
        rows = per // 1024 // 4
        sd = {f"layer{j}.weight": torch.randn(rows, 1024, generator=g) for j in range(4)}
        sd.update({"bn.running_mean": torch.zeros(1024), "bn.num_batches_tracked": torch.tensor(7)})
        torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return paths


def _fields(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmRSS"):
                out[k] = int(v.split()[0]) * 1024
    return out


def peak_of(cmd: list[str], every_s: float = 0.002) -> dict[str, float]:
    """Run cmd; the peaks of RssAnon, RssFile and VmRSS of its process (bytes) and its wall time."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while p.poll() is None:
        try:
            for k, v in _fields(p.pid).items():
                peak[k] = max(peak[k], v)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(every_s)
    err = p.stderr.read().decode()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({p.returncode}): {err.strip()[-500:]}")
    return {**peak, "wall_s": time.perf_counter() - t0}


def soup(paths: list[Path], out: Path) -> dict[str, float]:
    return peak_of([str(BIN / "weightspace"), "soup", *map(str, paths), "-o", str(out), "--quiet", "--force"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2,8,16")
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--formats", default="zip,legacy")
    ap.add_argument("--folder", type=Path, default=None, help="where the ingredients go (default: a temp folder)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        out = Path(tmp) / "soup.safetensors"
        base = soup(make(folder, 2, 0.01, "zip"), out)
        print(f"baseline (2 tiny ingredients): RssAnon {base['RssAnon'] / mib:.0f} MiB, VmRSS {base['VmRSS'] / mib:.0f} MiB")
        for fmt in args.formats.split(","):
            paths = make(folder, max(sizes), args.mb, fmt)
            size = paths[0].stat().st_size
            rows = []
            for n in sizes:
                r = soup(paths[:n], out)
                extra = r["RssAnon"] - base["RssAnon"]
                rows.append((n, extra))
                print(f"{fmt:6s} N={n:3d} × {size / mib:.1f} MiB: extra RssAnon {extra / mib:7.1f} MiB "
                      f"({extra / size:5.2f} ingredients), peak RssFile {r['RssFile'] / mib:7.1f} MiB, "
                      f"VmRSS {r['VmRSS'] / mib:7.1f} MiB, {r['wall_s']:.1f} s")
            (n0, e0), (n1, e1) = rows[0], rows[-1]
            if n1 > n0:
                slope = (e1 - e0) / (n1 - n0) / size
                print(f"{fmt:6s} slope: {slope:+.3f} ingredients of anonymous memory per added ingredient "
                      f"({'flat' if slope < 0.1 else 'GROWS with N'})")


if __name__ == "__main__":
    os.environ.setdefault("WEIGHTSPACE_HASH_CACHE", "off")
    main()
