"""Whole-process time of the header-only verbs against `python -c "import torch"`: do they start without torch?

`inspect`, `diff` (structure), `methods`, `data ls` and `--help` read safetensors headers, the registry's catalogue
and the data cache's index, never tensors, so they should not pay for importing torch (~1.5 s on a 2-core machine).
Each command runs in a fresh process, `repeats` times (median reported), on two small real safetensors files of a
tiny model written once into a temporary folder; `distance` (which reads tensors) is timed as the contrast.

Target: every header-only verb ≤ 0.25× the time of `python -c "import torch"`.

    .venv/bin/python bench/cli_startup.py               # median of 5
    .venv/bin/python bench/cli_startup.py --repeats 9
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TARGET = 0.25


def make(folder: Path) -> None:
    """Two checkpoints of a small MLP (a soup of them and one ingredient) with weightspace's own writer."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(256, 256, generator=g) for i in range(4)}
    sd.update({f"layers.{i}.bias": torch.zeros(256) for i in range(4)})
    save_file(sd, folder / "a.safetensors")
    save_file({k: v + 0.1 for k, v in sd.items()}, folder / "b.safetensors")


def median_seconds(cmd: list[str], cwd: Path, repeats: int, env: dict[str, str]) -> float:
    """Median wall time of running ``cmd`` to completion in a fresh process; fails loudly if it fails."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode not in (0, 1):  # diff exits 1 when the structures differ
            raise SystemExit(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per command (the median is reported)")
    args = ap.parse_args()
    ws = [str(BIN / "weightspace")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make(folder)
        env = {**os.environ, "WEIGHTSPACE_DATA_CACHE": str(folder / "cache")}
        base = median_seconds([sys.executable, "-c", "import torch"], folder, args.repeats, env)
        commands = {
            "weightspace inspect a.safetensors": [*ws, "inspect", "a.safetensors"],
            "weightspace diff a.safetensors b.safetensors": [*ws, "diff", "a.safetensors", "b.safetensors"],
            "weightspace methods": [*ws, "methods"],
            "weightspace data ls": [*ws, "data", "ls"],
            "weightspace --help": [*ws, "--help"],
        }
        contrast = {"weightspace distance a.safetensors b.safetensors (reads tensors)":
                    [*ws, "distance", "a.safetensors", "b.safetensors"]}
        print(f"median of {args.repeats} runs, whole process, {os.cpu_count()} cores")
        print(f"| command | seconds | × import torch |\n|---|---|---|\n| python -c \"import torch\" | {base:.3f} | 1.00 |")
        worst = 0.0
        for name, cmd in {**commands, **contrast}.items():
            t = median_seconds(cmd, folder, args.repeats, env)
            if name in commands:
                worst = max(worst, t / base)
            print(f"| {name} | {t:.3f} | {t / base:.2f} |")
        verdict = "meets" if worst <= TARGET else "misses"
        print(f"\nheader-only verbs: at most {worst:.2f}× import torch — {verdict} the target of ≤ {TARGET}×")


if __name__ == "__main__":
    main()
