"""Overhead of rewinding, module criticality and similarity against the bare forward passes they need.

(a) rewind over M modules × T targets ÷ ((M·T + 1) bare passes over the data)            target ≤ 1.15
(b) module criticality, grid A × S × samples per module ÷ (that many bare passes)          target ≤ 1.20
(c) similarity of two models (all CKA variants, L2, agreement) ÷ 2 bare passes             reported
(d) peak memory of minibatch CKA vs full-batch CKA features, at --n examples               reported

Timings are the minimum of --repeats runs of this process's CPU time and wall time (one torch thread, so the CPU
ratio does not move when other processes share the machine).

    .venv/bin/python bench/analysis_overhead.py [--model 'weightspace.eval.zoo:small_cnn?width=16'] [--data digits:all]
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    """Minimum (wall, CPU) seconds of ``repeats`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weightspace.eval.zoo:small_cnn?width=16")
    ap.add_argument("--data", default="digits:all")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from weightspace.analysis.criticality import module_criticality, rewind
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model
    from weightspace.analysis.similarity import model_similarity

    data = load_data(args.data)
    torch.manual_seed(0)
    init = build_model(args.model, num_classes=data.num_classes).state_dict()
    torch.manual_seed(1)
    final = build_model(args.model, num_classes=data.num_classes).state_dict()
    ev = Evaluator(build_model(args.model, num_classes=data.num_classes), data, batch_size=args.batch_size,
                   device="cpu")
    ev.load(final)

    def bare():
        with torch.inference_mode():
            for xb, _ in data.batches(args.batch_size):
                ev.model(xb)

    bw, bc = timed(bare, args.repeats)
    print(f"one bare pass over {len(data)} examples: {bw * 1e3:.1f} ms wall, {bc * 1e3:.1f} ms CPU")

    r = rewind(final, init, ev, to=["init", "random"], model=lambda: build_model(args.model, num_classes=data.num_classes))
    passes = len(r.modules) * len(r.targets) + 1
    w, c = timed(lambda: rewind(final, init, ev, to=["init", "random"],
                                model=lambda: build_model(args.model, num_classes=data.num_classes)), args.repeats)
    print(f"(a) rewind {len(r.modules)} modules × 2 targets: {w:.3f} s wall, {c:.3f} s CPU; "
          f"ratio to {passes} bare passes: wall {w / (passes * bw):.3f}, CPU {c / (passes * bc):.3f}  (target ≤ 1.15)")

    grid = dict(alphas=3, sigmas=2, samples=2)
    crit = module_criticality(final, init, ev, epsilon=1.0, **grid)
    passes = len(crit.modules) * 3 * 2 * 2 + 1
    w, c = timed(lambda: module_criticality(final, init, ev, epsilon=1.0, **grid), args.repeats)
    print(f"(b) criticality {len(crit.modules)} modules, 3×2 grid × 2 samples: {w:.3f} s wall, {c:.3f} s CPU; "
          f"ratio to {passes} bare passes: wall {w / (passes * bw):.3f}, CPU {c / (passes * bc):.3f}  (target ≤ 1.20)")

    model = build_model(args.model, num_classes=data.num_classes)
    w, c = timed(lambda: model_similarity(final, init, model, data, batch_size=args.batch_size), args.repeats)
    print(f"(c) similarity (linear, RBF, debiased, minibatch CKA, L2, agreement): {w:.3f} s wall, {c:.3f} s CPU; "
          f"ratio to 2 bare passes: wall {w / (2 * bw):.2f}, CPU {c / (2 * bc):.2f}")

    n, d = 4096, 2048
    code = ("import torch, resource; from weightspace.analysis.similarity import linear_cka, minibatch_cka; torch.set_num_threads(1);"
            f"x, y = torch.randn({n}, {d}, dtype=torch.float64), torch.randn({n}, {d}, dtype=torch.float64); {{}};"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    base = peak_rss(code.format("pass"))
    for name, call in (("full-batch debiased", "linear_cka(x, y, debiased=True)"),
                       ("minibatch (batches of 256)", "minibatch_cka(x, y, 256)")):
        t = time.perf_counter()
        rss = peak_rss(code.format(call))
        print(f"(d) {name} CKA of {n}×{d} float64 features: {time.perf_counter() - t:.1f} s (incl. start-up), "
              f"peak RSS {(rss - base) / 2**20:.0f} MiB above the features themselves")


def peak_rss(code: str) -> int:
    """Peak resident memory (bytes) of a fresh Python process running ``code`` (it prints its own ru_maxrss)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024  # KiB on Linux


if __name__ == "__main__":
    main()
