"""Image data on a GPU machine: decode images/s (PIL workers vs nvjpeg on the GPU) and timm resnet50 evaluation
images/s (uint8 resident on the GPU, normalised per batch, channels-last, bf16) against a timm ``validate.py``-style
loop (``create_loader`` with workers, channels-last, bf16 autocast) over the same JPEG folder.

    python bench/gpu_data.py [--images 2000]     # on a CUDA machine
    python bench/gpu_data.py --cpu-smoke          # the same steps, toy sizes, on the CPU (checks the script)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    import torch
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config
    from data_throughput import make_images
    import weightspace as ws
    smoke = args.cpu_smoke
    dev = torch.device("cpu" if smoke else "cuda")
    n = 64 if smoke else args.images
    tmp = Path(tempfile.mkdtemp(prefix="ws-gpu-data-"))
    os.environ["WEIGHTSPACE_DATA_CACHE"] = "off"
    make_images(tmp / "images", n)
    workers = len(os.sched_getaffinity(0))
    model = timm.create_model("resnet18" if smoke else "resnet50", pretrained=False, num_classes=10).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    t = time.perf_counter()
    d = ws.load_data(str(tmp / "images"), model=model, workers=workers, progress=False)
    pil = time.perf_counter() - t
    print(f"decode PIL, {workers} worker processes: {len(d) / pil:.0f} images/s ({len(d)} images, {pil:.2f} s)")
    if dev.type == "cuda":
        t = time.perf_counter()
        g = ws.load_data(str(tmp / "images"), model=model, decoder="gpu", device=dev, progress=False)
        sync()
        gpu = time.perf_counter() - t
        diff = (g.x.float() - d.x.float()).abs().mean().item()
        print(f"decode GPU (nvjpeg, batched): {len(g) / gpu:.0f} images/s ({gpu:.2f} s); mean |pixel - PIL's| "
              f"{diff:.2f} of 255")

    ev = ws.Evaluator(model, d, batch_size=256 if not smoke else 32, device=dev)
    ev()  # warm-up: cudnn autotuning, allocator
    sync()
    t = time.perf_counter()
    ev()
    sync()
    ours = time.perf_counter() - t
    print(f"resnet50 evaluation, weightspace Evaluator (uint8 resident, channels-last, bf16): "
          f"{len(d) / ours:.0f} images/s")

    cfg = resolve_data_config({}, model=model)
    loader = create_loader(create_dataset("", root=str(tmp / "images")), input_size=cfg["input_size"],
                           batch_size=256 if not smoke else 32, is_training=False, use_prefetcher=dev.type == "cuda",
                           interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                           crop_pct=cfg["crop_pct"], num_workers=workers, device=dev)
    m = model.to(dev)
    if dev.type == "cuda":
        m = m.to(memory_format=torch.channels_last)

    def validate() -> int:
        seen = 0
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for x, _y in loader:
                x = x.to(dev, non_blocking=True)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                m(x)
                seen += len(x)
        sync()
        return seen
    validate()
    t = time.perf_counter()
    seen = validate()
    base = time.perf_counter() - t
    print(f"resnet50 evaluation, timm validate.py-style loop ({workers} workers, decoding every pass): "
          f"{seen / base:.0f} images/s -> speed-up {base / ours:.2f}x")


if __name__ == "__main__":
    main()
