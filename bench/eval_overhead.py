"""Evaluation overhead against bare forward passes (same model, same device-resident data, same batch size).

(a) a K=11 barrier curve's wall time ÷ (11 × one bare ``model(x)`` pass over the data)      target ≤ 1.05
(b) a greedy soup over N=8 ingredients ÷ (the bare passes it needs: N individual + N−1 soups) target ≤ 1.10
(c) peak RSS of a leaderboard of the N ingredients ÷ that of a plain torch loop (load_state_dict from the same
    files, then the batches) at the same batch size, each in a fresh process on the CPU         target ≤ 1.20

Weights come from safetensors files, as users run it. Each of --repeats runs is timed between two bare passes
and compared with their mean; the median ratio is the figure. On the CPU both wall time and this process's CPU
time are reported (one thread by default): on a machine shared with other work the CPU-time ratio moves less.

    .venv/bin/python bench/eval_overhead.py [--model timm:resnet18] [--data 'digits:all?size=32&channels=3']
        [--rss-data 'digits:all?size=112&channels=3&limit=512']
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device) -> tuple[float, float]:
    """Wall time and this process's CPU time of one call."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


def ratios(work, bare, passes: int, repeats: int, device: torch.device) -> list[tuple[float, float]]:
    """(wall, CPU) ratios of ``work`` to ``passes`` bare passes, each run between two bare passes: the load that
    other processes put on a shared machine drifts, so each ratio compares with bare passes of its own moment."""
    work()  # warm-up
    out = []
    for _ in range(repeats):
        b1, w, b2 = clock(bare, device), clock(work, device), clock(bare, device)
        out.append(tuple(w[i] / (passes * (b1[i] + b2[i]) / 2) for i in range(2)))
    return out


def ratio_line(what: str, rs: list[tuple[float, float]], passes: int, target: float, cpu: bool) -> str:
    """'(x) what: P passes; wall R (median of n: ...)' and the same for CPU time on the CPU."""
    def part(name: str, vals: list[float]) -> str:
        return f"{name} {statistics.median(vals):.3f} (runs: {', '.join(f'{v:.3f}' for v in vals)})"
    parts = [part("wall", [r[0] for r in rs])] + ([part("CPU time", [r[1] for r in rs])] if cpu else [])
    return f"{what}: ÷ {passes} bare passes = " + "; ".join(parts) + f"; target ≤ {target}"


def rss_child(mode: str, model_spec: str, data_spec: str, num_classes: int, batch: int, paths: list[str]) -> None:
    """One workload in this (fresh) process, then its peak RSS in MiB as JSON on stdout: ``plain`` is the loop a
    user writes by hand, ``leaderboard`` weightspace's (one Evaluator, weights copied in place)."""
    torch.set_num_threads(1)
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    data = load_data(data_spec)
    model = build_model(model_spec, num_classes=num_classes)
    if mode == "plain":
        from safetensors.torch import load_file
        x, y = data.x, data.y
        for p in paths:
            model.load_state_dict(load_file(p))
            right = 0
            with torch.inference_mode():
                for i in range(0, len(x), batch):
                    right += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    else:
        from weightspace.eval.evaluator import Evaluator
        from weightspace.search.soups import leaderboard
        leaderboard(paths, Evaluator(model, data, batch_size=batch, device="cpu"), progress=False)
    print(json.dumps({"mode": mode, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss_ratio(args: argparse.Namespace, paths: list[str]) -> str:
    """(c): the two workloads, each in a fresh process; the line reporting their peak RSS and the ratio."""
    from weightspace.eval.batching import auto_batch_size
    from weightspace.eval.data import load_data
    from weightspace.eval.models import build_model
    torch.manual_seed(0)
    probe = load_data(args.rss_data).subset(slice(0, 2))
    batch = args.batch_size_rss or auto_batch_size(build_model(args.model, num_classes=args.num_classes), probe,
                                                   torch.device("cpu"))[0]
    peaks = {}
    for mode in ("plain", "leaderboard"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--model", args.model, "--rss-data",
                              args.rss_data, "--num-classes", str(args.num_classes), "--batch-size-rss", str(batch),
                              "--paths", *paths], capture_output=True, text=True, check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return (f"(c) peak RSS, leaderboard of N={len(paths)} on {args.rss_data}, batch {batch} (the CPU default): "
            f"{peaks['leaderboard']:.0f} MiB vs a plain torch loop {peaks['plain']:.0f} MiB = "
            f"{peaks['leaderboard'] / peaks['plain']:.3f}×; target ≤ 1.2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:resnet18")
    ap.add_argument("--data", default="digits:all?size=32&channels=3")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--ingredients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each workload (median reported)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--rss-data", default="digits:all?size=112&channels=3&limit=512",
                    help="(c): the data both workloads evaluate")
    ap.add_argument("--batch-size-rss", type=int, default=0, help="(c): batch size (0: the Evaluator's CPU default)")
    ap.add_argument("--only-rss", action="store_true", help="run (c) alone")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.model, args.rss_data, args.num_classes, args.batch_size_rss, args.paths)
    if args.threads:
        torch.set_num_threads(args.threads)

    import weightspace as ws
    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model

    data = load_data(args.data)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes)
    ev = Evaluator(model, data, batch_size=args.batch_size, device=args.device)
    dev = ev.device
    d = next(iter(ev.datasets.values()))
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({nparams / 1e6:.1f} M params), data {args.data} ({len(d)} examples on {dev}), "
          f"batch {args.batch_size}, {torch.get_num_threads()} CPU threads")

    def bare() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ev.amp):
            for xb, _ in d.batches(args.batch_size):
                model(xb)

    with tempfile.TemporaryDirectory() as tmp:
        # Ingredients: fine-tune-like perturbations of one init, saved as files.
        base = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        paths = []
        g = torch.Generator().manual_seed(1)
        for i in range(max(args.ingredients, 2)):
            sd = {k: (v + 0.01 * v.std().nan_to_num() * torch.randn(v.shape, generator=g)
                      if v.is_floating_point() and v.numel() > 1 else v.clone()) for k, v in base.items()}
            paths.append(str(Path(tmp) / f"ing{i}.safetensors"))
            ws.save(sd, paths[-1])

        on_cpu = dev.type == "cpu"
        if args.only_rss:
            print(rss_ratio(args, paths[:4]))
            return
        bare()
        b = clock(bare, dev)
        print(f"bare pass: wall {b[0] * 1e3:.1f} ms" + (f", CPU time {b[1] * 1e3:.1f} ms" if on_cpu else ""))

        # (a) barrier curve
        before = ev.forward_passes
        rs = ratios(lambda: ws.interpolation_curve(paths[0], paths[1], ev, steps=args.steps, progress=False),
                    bare, args.steps, args.repeats, dev)
        assert (ev.forward_passes - before) == args.steps * (args.repeats + 1)  # one pass per α, nothing more
        print(ratio_line(f"(a) K={args.steps} barrier curve", rs, args.steps, 1.05, on_cpu))

        # (b) greedy soup
        ings = paths[:args.ingredients]
        passes = 2 * len(ings) - 1  # each ingredient alone, then each candidate soup after the first
        before = ev.forward_passes
        rs = ratios(lambda: ws.greedy_soup(ings, ev, progress=False), bare, passes, args.repeats, dev)
        assert (ev.forward_passes - before) == passes * (args.repeats + 1)
        print(ratio_line(f"(b) greedy soup of N={len(ings)}", rs, passes, 1.10, on_cpu))
        if args.device in ("auto", "cpu") and on_cpu:
            print(rss_ratio(args, ings[:4]))
        with contextlib.suppress(Exception):
            print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
                  f"(one model = {sum(v.numel() * v.element_size() for v in base.values()) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
