"""Evaluation throughput of timm resnet50 on CUDA with bf16 AMP: weightspace's Evaluator (dataset resident on the
GPU, weights copied in place) against a plain DataLoader loop (CPU tensors, per-sample collate, pinned copies).

Data: scikit-learn's 1,797 real digits resized to 224×224 and repeated to 3 channels (the model's usual input).
Each figure is the best of --repeats timed passes after one warm-up pass. Run by bench/gpu_check.sh.

    python bench/gpu_throughput.py                       # on a GPU machine
    python bench/gpu_throughput.py --cpu-smoke           # tiny sizes on the CPU: checks the script itself runs
"""
from __future__ import annotations

import argparse
import time

import torch


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Minimum wall time of ``repeats`` calls after one warm-up call, with the device synchronised."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4, help="DataLoader worker processes for the plain loop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, 32×32, 32 images, 1 repeat: a quick self-check")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.size, args.batch_size, args.workers, args.repeats = 32, 16, 0, 1
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: CUDA is not available (use --cpu-smoke to check the script on a CPU)")

    from torch.utils.data import DataLoader, TensorDataset

    from weightspace.eval.data import load_data
    from weightspace.eval.evaluator import Evaluator
    from weightspace.eval.models import build_model

    spec = f"digits:all?size={args.size}&channels=3" + ("&limit=32" if args.cpu_smoke else "")
    data = load_data(spec)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10)
    n = len(data)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} on {name}, {n} images {args.size}×{args.size}, batch {args.batch_size}, "
          f"AMP bf16: {device.type == 'cuda'}")

    ev = Evaluator(model, data, batch_size=args.batch_size, device=device)
    resident = next(iter(ev.datasets.values())).x.device
    t_ws = best_time(ev, args.repeats, device)

    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers, pin_memory=device.type == "cuda")

    def plain() -> float:
        correct = 0
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for xb, yb in loader:
                out = model(xb.to(device, non_blocking=True)).float()
                correct += int((out.argmax(1) == yb.to(device)).sum())
        return correct / n
    t_plain = best_time(plain, args.repeats, device)

    print(f"weightspace Evaluator (data on {resident}): {n / t_ws:9.1f} images/s  ({t_ws * 1e3:.0f} ms per pass)")
    print(f"plain DataLoader loop ({args.workers} workers):  {n / t_plain:9.1f} images/s  ({t_plain * 1e3:.0f} ms per pass)")
    print(f"speed-up: {t_plain / t_ws:.2f}×")


if __name__ == "__main__":
    main()
