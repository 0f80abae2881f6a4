"""Uniform-soup I/O against its limits: N random ResNet-50-sized fp32 safetensors checkpoints, page cache warm.

Prints
  (a) soup wall time ÷ time to `cat` the same N files (target ≤ 1.2), with the sha256 cache warm and cold;
  (b) peak RSS added by the soup ÷ one checkpoint's size for N = 2, 8, 32 (target ≤ 1.5, stretch ≤ 0.25), each in a
      fresh subprocess; the interpreter + torch + weightspace baseline is subtracted (its RSS is printed too);
  (c) soup wall time ÷ a naive peer that torch.load()s each .pt copy, accumulates and torch.save()s (target ≤ 0.5).

Times are medians (and minima) over interleaved repetitions (ours, baseline, ours, ...), so that load from other
processes hits both sides alike; `cat` is timed as a process and as the same read loop in this process. The soup is timed in-process from opening the sources to the renamed, fsynced output:
the CLI adds ~1.5 s of `import torch` on top (printed separately).

    .venv/bin/python bench/soup_io.py                 # N=8 for (a)/(c), N=2,8,32 for (b); ~3.5 GB in a temp folder
    .venv/bin/python bench/soup_io.py --sizes 2,8 --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def resnet50_layout() -> dict:
    """Key → (shape, dtype) of timm's resnet50 (25.6 M parameters, 320 tensors, ~102 MB in fp32)."""
    import timm
    import torch
    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def make_checkpoints(folder: Path, n: int) -> list[Path]:
    """n random checkpoints written by the reference safetensors library (seeded: same bytes every run)."""
    import torch
    from safetensors.torch import save_file
    layout = resnet50_layout()
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        path = folder / f"ckpt{i:02d}.safetensors"
        sd = {k: (torch.randn(shape, generator=gen) * 0.02 if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
              for k, (shape, dtype) in layout.items()}
        save_file(sd, path)
        paths.append(path)
    return paths


def warm(paths: list[Path]) -> None:
    """Read every file once so that all later runs read from the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


def time_cat(paths: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def time_read(paths: list[Path]) -> float:
    """What cat does, in this process: read every byte into one reused 1 MiB buffer (no process start)."""
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def time_soup(paths: list[Path], out: Path) -> float:
    """Open, average, write, fsync and rename: everything `weightspace soup` does after its imports."""
    import weightspace as ws
    from weightspace.ops import stream as ops
    t = time.perf_counter()
    ws.save(ops.uniform_soup_stream([str(p) for p in paths]), out)
    elapsed = time.perf_counter() - t
    out.unlink()
    return elapsed


def naive_soup(pt_paths: list[Path], out: Path) -> float:
    """The peer: torch.load every file whole, accumulate, divide, torch.save."""
    import torch
    t = time.perf_counter()
    acc: dict = {}
    for i, p in enumerate(pt_paths):
        sd = torch.load(p, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            if i == 0:
                acc[k] = v.clone()
            elif v.is_floating_point():
                acc[k] += v
        del sd
    for k, v in acc.items():
        if v.is_floating_point():
            v /= len(pt_paths)
    torch.save(acc, out)
    elapsed = time.perf_counter() - t
    out.unlink()
    return elapsed


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child_rss(paths: list[str], out: str) -> None:
    """Run in a fresh process: baseline RSS after imports and a warm-up, then the peak RSS during one soup."""
    import torch

    import weightspace as ws
    from weightspace.ops import stream as ops
    warmup = Path(out).with_suffix(".warmup.safetensors")
    ws.save(ops.uniform_soup_stream([{"w": torch.ones(4)}, {"w": torch.zeros(4)}]), warmup)  # load every module
    warmup.unlink()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux ≥ 4.0)
    ws.save(ops.uniform_soup_stream(paths), out)
    peak = _status("VmHWM")
    Path(out).unlink()
    print(json.dumps({"baseline": baseline, "peak": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="checkpoints for (a) and (c)")
    ap.add_argument("--sizes", default="2,8,32", help="N values for (b)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--child-rss", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        return child_rss(args.child_rss[:-1], args.child_rss[-1])

    import torch
    sizes = [int(x) for x in args.sizes.split(",")]
    folder = Path(args.dir or tempfile.mkdtemp(prefix="ws-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    hash_cache = folder / "sha256-cache.json"
    os.environ["WEIGHTSPACE_HASH_CACHE"] = str(hash_cache)  # a private cache, so "cold" really is cold
    try:
        t = time.perf_counter()
        paths = make_checkpoints(folder, max([args.n] + sizes))
        size = paths[0].stat().st_size
        print(f"{len(paths)} random ResNet-50-sized checkpoints ({size / 1e6:.1f} MB each, fp32 safetensors) "
              f"written in {time.perf_counter() - t:.1f} s to {folder}")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch threads "
              f"{torch.get_num_threads()}")
        time.sleep(2.1)  # let the files age past the hash cache's racy window
        n_paths = paths[: args.n]
        warm(paths)

        # (a) against cat, hash cache cold (every ingredient hashed) and warm (hashes remembered)
        out = folder / "soup.safetensors"

        def cold() -> float:
            os.environ["WEIGHTSPACE_HASH_CACHE"] = "off"
            try:
                return time_soup(n_paths, out)
            finally:
                os.environ["WEIGHTSPACE_HASH_CACHE"] = str(hash_cache)

        time_soup(n_paths, out)  # fills the hash cache
        ta = interleaved({"cat": lambda: time_cat(n_paths), "read": lambda: time_read(n_paths),
                          "soup_warm": lambda: time_soup(n_paths, out), "soup_cold": cold}, args.reps)
        med = {k: statistics.median(v) for k, v in ta.items()}
        low = {k: min(v) for k, v in ta.items()}
        print(f"\n(a) N={args.n}, median (min) of {args.reps}: cat {med['cat']:.3f} ({low['cat']:.3f}) s; "
              f"in-process read {med['read']:.3f} ({low['read']:.3f}) s; soup {med['soup_warm']:.3f} "
              f"({low['soup_warm']:.3f}) s with the hash cache warm, {med['soup_cold']:.3f} ({low['soup_cold']:.3f}) s "
              f"cold (every file hashed)")
        for base, label in (("cat", "cat"), ("read", "in-process read")):
            print(f"    soup ÷ {label} = {med['soup_warm'] / med[base]:.2f} ({low['soup_warm'] / low[base]:.2f}) "
                  f"hash cache warm, {med['soup_cold'] / med[base]:.2f} ({low['soup_cold'] / low[base]:.2f}) cold"
                  f"   [target ≤ 1.2]")
        cli = subprocess.run([sys.executable, "-m", "weightspace_cli", "soup", "-q", *map(str, n_paths), "-o", str(out)],
                             capture_output=True, text=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "weightspace_cli", "soup", "-q", *map(str, n_paths), "-o", str(out),
                        "--force"], check=True, capture_output=True)
        cli_wall = time.perf_counter() - t
        out.unlink()
        print(f"    the CLI end to end (interpreter start and imports included): {cli_wall:.2f} s"
              + ("" if cli.returncode == 0 else f" (first run failed: {cli.stderr.strip()})"))

        # (c) against the naive torch.load peer (its best of 1 and default threads)
        pts = []
        for p in n_paths:
            from safetensors.torch import load_file
            pt = p.with_suffix(".pt")
            torch.save(load_file(p), pt)
            pts.append(pt)
        warm(pts)
        default_threads = torch.get_num_threads()

        def naive_1() -> float:
            torch.set_num_threads(1)
            try:
                return naive_soup(pts, folder / "naive.pt")
            finally:
                torch.set_num_threads(default_threads)

        tc = interleaved({"soup": lambda: time_soup(n_paths, out), "naive": lambda: naive_soup(pts, folder / "naive.pt"),
                          "naive_1": naive_1}, args.reps)
        med = {k: statistics.median(v) for k, v in tc.items()}
        low = {k: min(v) for k, v in tc.items()}
        print(f"\n(c) N={args.n}, median (min) of {args.reps}: naive torch.load peer {med['naive']:.3f} "
              f"({low['naive']:.3f}) s with {default_threads} threads, {med['naive_1']:.3f} ({low['naive_1']:.3f}) s "
              f"with 1; soup {med['soup']:.3f} ({low['soup']:.3f}) s (hash cache warm)")
        print(f"    soup ÷ the peer's better setting = {med['soup'] / min(med['naive'], med['naive_1']):.2f} "
              f"({low['soup'] / min(low['naive'], low['naive_1']):.2f})   [target ≤ 0.5]")
        for pt in pts:
            pt.unlink()

        # (b) peak RSS in fresh processes
        print(f"\n(b) peak RSS added by the soup ÷ one checkpoint ({size / 1e6:.1f} MB); baseline = RSS of a fresh "
              f"interpreter after importing torch + weightspace and a tiny warm-up soup, subtracted:")
        for n in sizes:
            r = subprocess.run([sys.executable, __file__, "--child-rss", *map(str, paths[:n]),
                                str(folder / f"rss{n}.safetensors")], capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            extra = m["peak"] - m["baseline"]
            print(f"    N={n:2d}: baseline {m['baseline'] / 1e6:.0f} MB, peak {m['peak'] / 1e6:.0f} MB, "
                  f"extra {extra / 1e6:.1f} MB = {extra / size:.2f}× one checkpoint   [target ≤ 1.5, stretch ≤ 0.25]")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
