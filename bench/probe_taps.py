"""Feature taps and probes against their limits: a timm resnet18 (random init) on real digits at 32×32.

Prints
  (a) feature extraction at every leaf module ("all", Head2Toe pooling to T) ÷ one plain forward pass over the same
      data (target ≤ 1.5: hooks, pooling and the copy to the CPU should add little to the backbone pass);
  (b) a second request for the same features, from the in-memory cache and from the disk cache (target: no forward
      pass; times printed), and the bytes the pooled features take;
  (c) linear-probe fits: seconds per layer (mean and max) and in total, on the pooled features;
  (d) Head2Toe end to end on the cached features (k-fold CV over --keep): seconds, and the number of backbone passes
      the whole probe + Head2Toe session needed (target: one per dataset).

Times are medians over --reps interleaved repetitions of (plain pass, extraction), so load from other processes hits
both alike.

    .venv/bin/python bench/probe_taps.py                        # T = 1024, 5 folds
    .venv/bin/python bench/probe_taps.py --target 8192 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:resnet18")
    ap.add_argument("--train", default="digits:train?size=32")
    ap.add_argument("--test", default="digits:test?size=32")
    ap.add_argument("--target", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--keep", default="0.01,0.1,0.2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from weightspace.analysis.head2toe import head2toe_features
    from weightspace.analysis.probe import probe_features
    from weightspace.analysis.taps import FeatureTaps
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model

    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_chans=1)
    train, test = load_data(args.train), load_data(args.test)
    dev = torch.device(args.device)
    model = model.to(dev).eval()
    xs = train.x.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for i in range(0, len(xs), 256):
                model(xs[i:i + 256])
        sync()
        return time.perf_counter() - t0

    def extract() -> float:
        taps = FeatureTaps(model, "all", target=args.target, device=dev)
        taps.resolve(train)
        t0 = time.perf_counter()
        taps._extract(train)
        sync()
        return time.perf_counter() - t0

    plain(), extract()  # warm-up
    p, e = [], []
    for _ in range(args.reps):
        p.append(plain())
        e.append(extract())
    tp, te = statistics.median(p), statistics.median(e)
    print(f"device {dev}, threads {torch.get_num_threads()}, {args.model} on {args.train} ({len(train)} examples)")
    print(f"(a) plain forward pass {tp:.3f} s; extraction at every leaf {te:.3f} s; ratio {te / tp:.2f} (target ≤ 1.5)")

    with tempfile.TemporaryDirectory() as cache:
        taps = FeatureTaps(model, "all", target=args.target, device=dev, cache_dir=cache)
        tr = taps(train)
        t0 = time.perf_counter()
        taps(train)
        mem = time.perf_counter() - t0
        fresh = FeatureTaps(model, "all", target=args.target, device=dev, cache_dir=cache)
        t0 = time.perf_counter()
        fresh(train)
        disk = time.perf_counter() - t0
        nbytes = sum(v.numel() * v.element_size() for v in tr.x.values())
        print(f"(b) {len(tr.layers)} taps, {sum(tr.dims().values())} features per example, {nbytes / 2**20:.1f} MiB; "
              f"again from memory {mem:.3f} s, from disk {disk:.3f} s (fresh instance: {fresh.forward_passes} passes, "
              f"weights hashed each time)")
        te_feats = taps(test)
        t0 = time.perf_counter()
        rows = []
        per = []
        for name in tr.layers:
            t1 = time.perf_counter()
            rows += probe_features(tr, te_feats, layers=[name], device=dev)
            per.append(time.perf_counter() - t1)
        tot = time.perf_counter() - t0
        best = max(rows, key=lambda r: r["test_accuracy"])
        print(f"(c) probes: {tot:.2f} s for {len(per)} layers "
              f"(mean {statistics.mean(per):.3f} s, max {max(per):.3f} s); "
              f"best layer {best['layer']} {best['test_accuracy']:.4f}, last {rows[-1]['layer']} "
              f"{rows[-1]['test_accuracy']:.4f}")
        t0 = time.perf_counter()
        res = head2toe_features(tr, te_feats, keep=[float(f) for f in args.keep.split(",")], folds=args.folds,
                                device=dev)
        print(f"(d) Head2Toe: {time.perf_counter() - t0:.2f} s ({args.folds} folds, keep {args.keep}); "
              f"test {res.accuracy:.4f} at f={res.chosen:g} vs last-layer probe {res.baseline['test_accuracy']:.4f}; "
              f"backbone passes for probes + Head2Toe: {taps.forward_passes} (2 datasets)")


if __name__ == "__main__":
    main()
