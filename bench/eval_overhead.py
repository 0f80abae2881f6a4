"""Evaluation overhead against bare forward passes (same model, same device-resident data, same batch size).

(a) a K=11 barrier curve's wall time ÷ (11 × one bare ``model(x)`` pass over the data)      target ≤ 1.05
(b) a greedy soup over N=8 ingredients ÷ (the bare passes it needs: N individual + N−1 soups) target ≤ 1.10

Weights come from safetensors files (read lazily at each step, as users run it). Each timing is the minimum of
--repeats runs. On the CPU both wall time and this process's CPU time are reported: with one thread (the
default) the CPU-time ratio does not move when other processes share the machine, the wall-time ratio does.

    .venv/bin/python bench/eval_overhead.py [--model timm:resnet18] [--data 'digits:all?size=32&channels=3']
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """Minimum wall time and minimum process CPU time of ``repeats`` calls (after one warm-up call)."""
    fn()
    sync(device)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def ratio_line(what: str, t: tuple[float, float], passes: int, bare: tuple[float, float], target: float,
               cpu: bool) -> str:
    """'(x) what: T s for P passes = R × P bare passes' for wall time (and CPU time on the CPU)."""
    parts = [f"wall {t[0]:.3f} s = {t[0] / (passes * bare[0]):.3f}"]
    if cpu:
        parts.append(f"CPU time {t[1]:.3f} s = {t[1] / (passes * bare[1]):.3f}")
    return f"{what}: {passes} passes; " + "; ".join(parts) + f" × {passes} bare passes (target ≤ {target})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:resnet18")
    ap.add_argument("--data", default="digits:all?size=32&channels=3")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--ingredients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import weightspace as ws
    from weightspace.data import load_data
    from weightspace.evaluation import Evaluator
    from weightspace.models import build_model

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
        t_bare = timed(bare, args.repeats, dev)
        print(f"bare pass: wall {t_bare[0] * 1e3:.1f} ms" + (f", CPU time {t_bare[1] * 1e3:.1f} ms" if on_cpu else ""))

        # (a) barrier curve
        before = ev.forward_passes
        t_curve = timed(lambda: ws.interpolation_curve(paths[0], paths[1], ev, steps=args.steps, progress=False),
                        args.repeats, dev)
        passes = (ev.forward_passes - before) // (args.repeats + 1)
        print(ratio_line(f"(a) K={args.steps} barrier curve", t_curve, passes, t_bare, 1.05, on_cpu))

        # (b) greedy soup
        ings = paths[:args.ingredients]
        before = ev.forward_passes
        t_greedy = timed(lambda: ws.greedy_soup(ings, ev, progress=False), args.repeats, dev)
        passes = (ev.forward_passes - before) // (args.repeats + 1)
        print(ratio_line(f"(b) greedy soup of N={len(ings)}", t_greedy, passes, t_bare, 1.10, on_cpu))
        with contextlib.suppress(Exception):
            import resource
            print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
                  f"(one model = {sum(v.numel() * v.element_size() for v in base.values()) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
