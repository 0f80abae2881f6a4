"""Merges and alignment against their limits.

Prints
  (a) task arithmetic and TIES over a ResNet-50-sized base + 3 fine-tunes (fp32 safetensors, page cache warm), each
      streamed to disk, ÷ a uniform soup of the same 4 files (one read of every input + one write: the floor of any
      streamed merge). Target: task arithmetic ≤ 1.5 (it subtracts the base from every input). TIES has no such
      floor: it reads every input three times (two histogram passes for the exact global threshold, then the merge)
      and does ~10 element-wise operations per entry and model; its ratio is printed for the record.
  (b) TIES's exact streamed threshold ÷ torch.kthvalue over the concatenated |τ| of one task vector (the
      in-memory shortcut, which needs a model-sized buffer per task vector).
  (c) weight matching, timm resnet18 and resnet50 (random inits, 10 classes): seconds per round, the work per
      round (Σ 2·numel·C over the tensors each group touches) and the achieved GFLOP/s ÷ a bare float32 matmul's.

Times are medians over interleaved repetitions, so load from other processes hits both sides alike.

    .venv/bin/python bench/merge_align.py              # ~1 GB in a temp folder, a few minutes on 2 cores
    .venv/bin/python bench/merge_align.py --reps 1 --skip-resnet50
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def make_checkpoints(folder: Path) -> list[Path]:
    """A random ResNet-50-sized base and three 'fine-tunes' (base + small noise), seeded."""
    import timm
    import torch
    from safetensors.torch import save_file
    with torch.device("meta"):
        layout = {k: (tuple(v.shape), v.dtype) for k, v in timm.create_model("resnet50").state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=gen) * 0.02 if d.is_floating_point else torch.zeros(s, dtype=d))
            for k, (s, d) in layout.items()}
    paths = [folder / "base.safetensors"]
    save_file(base, paths[0])
    for i in range(3):
        ft = {k: v + torch.randn(v.shape, generator=gen) * 1e-3 if v.is_floating_point() else v for k, v in base.items()}
        paths.append(folder / f"ft{i}.safetensors")
        save_file(ft, paths[-1])
    for p in paths:  # warm the page cache
        p.read_bytes()
    return paths


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_merges(folder: Path, reps: int) -> None:
    import torch

    import weightspace as ws
    from weightspace.ops import stream as ops
    from weightspace.ops.merge import kth_largest_magnitudes, merge, plan_merge
    paths = make_checkpoints(folder)
    base, fts = paths[0], paths[1:]
    out = folder / "out.safetensors"
    runs = {
        "uniform soup (floor)": lambda: ws.save(ops.uniform_soup_stream(paths), out, force=True),
        "task arithmetic": lambda: ws.save(merge("task-arithmetic", base, fts, scale=0.4), out, force=True),
        "ties": lambda: ws.save(merge("ties", base, fts, scale=1.0, keep=0.2), out, force=True),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    floor = statistics.median(times["uniform soup (floor)"])
    print("(a) streamed merges, ResNet-50 size (25.6 M params, 4 × 102 MB inputs)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"    {name:22s} {med:6.2f} s   ÷ floor {med / floor:5.2f}")

    _, plan, _ = plan_merge("task-arithmetic", base, fts[:1])
    k = round(0.2 * plan.num_float_elements())

    def in_memory() -> float:
        taus = torch.cat(list(plan.map_pieces(lambda key, a, b, base, t: t[0].abs().float().ravel(), "concat")))
        return float(torch.kthvalue(taus, taus.numel() - k + 1).values)

    ours, ref = [], []
    for _ in range(reps):
        ours.append(timed(lambda: kth_largest_magnitudes(plan, k)))
        ref.append(timed(in_memory))
    assert kth_largest_magnitudes(plan, k)[0] == in_memory()
    print(f"(b) exact k-th largest |τ| (k = {k:,}): streamed radix {statistics.median(ours):.2f} s, "
          f"concat + kthvalue {statistics.median(ref):.2f} s, ratio {statistics.median(ours) / statistics.median(ref):.2f} "
          f"(same value; the radix selection holds 2×65,536 counters instead of a {4 * plan.num_float_elements() / 2**20:.0f} MiB buffer)")


def bench_matching(names: list[str], reps: int) -> None:
    import timm
    import torch

    from weightspace.search.align import permutation_spec, weight_matching
    from weightspace.ops.parallel import single_thread
    a_ = torch.randn(512, 4608)
    b_ = torch.randn(512, 4608)
    with single_thread():  # weight matching runs on one thread
        mm = statistics.median(timed(lambda: a_ @ b_.T) for _ in range(5))
    peak = 2 * 512 * 512 * 4608 / mm / 1e9
    print(f"(c) weight matching, one thread (bare float32 matmul 512×4608·4608×512: {peak:.1f} GFLOP/s)")
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10)
        spec = permutation_spec(model)
        a = model.state_dict()
        b = timm.create_model(name, num_classes=10).state_dict()
        work = sum(2 * g.size * a[k].numel() for g in spec.groups for k, _, _ in g.axes) / 1e9
        per_round = []
        rounds = 0
        for _ in range(reps):
            t = time.perf_counter()
            _, info = weight_matching(a, b, spec, seed=0)
            rounds = info["rounds"]
            per_round.append((time.perf_counter() - t) / rounds)
        s = statistics.median(per_round)
        print(f"    {name}: {len(spec.groups)} groups, {rounds} rounds to converge, {s:.2f} s/round, "
              f"{work:.1f} GFLOP/round → {work / s:.1f} GFLOP/s = {work / s / peak:.2f} × bare matmul")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-resnet50", action="store_true", help="Weight matching on resnet18 only.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        bench_merges(Path(d), args.reps)
    bench_matching(["resnet18"] + ([] if args.skip_resnet50 else ["resnet50"]), 1)


if __name__ == "__main__":
    main()
