"""Every merge method, timed as a whole process (`weightspace merge ...`) on the same folder of checkpoints, against
a uniform soup of the same files; with --mergekit, also mergekit's own code on the same tensors (installed from
PyPI into its own virtual environment under a temporary folder, reusing this interpreter's torch): the largest
|difference| of each deterministic method from mergekit's result over the weights (running statistics follow
weightspace's own rule, docs/merge.md), and mergekit's time to merge every tensor.

    python bench/merge_methods.py                 # timm resnet18-sized checkpoints, a base and three fine-tunes
    python bench/merge_methods.py --mergekit      # and the comparison with mergekit (needs pip and a package index)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# (name, models used, options): each deterministic method with mergekit's defaults or the value given
METHODS = [
    ("task-arithmetic", 3, {}),
    ("ties", 3, {"density": 0.5}),
    ("slerp", 1, {"t": 0.3}),
    ("nuslerp", 2, {"t": 0.4}),
    ("karcher", 3, {}),
    ("model-stock", 3, {}),
    ("breadcrumbs", 3, {"density": 0.9, "gamma": 0.01}),
    ("sce", 3, {"select_topk": 0.5}),
    ("dare-linear", 3, {"density": 0.5, "seed": 1}),
    ("dare-ties", 3, {"density": 0.5, "seed": 1}),
    ("della", 3, {"density": 0.5, "epsilon": 0.15, "seed": 1}),
    ("dare-ties", 3, {"density": 1.0}),  # no drop: the sign election and sums, comparable with mergekit
    ("della", 3, {"density": 1.0}),
]

# mergekit's side: for each comparable method, its name and parameters (mergekit's names)
MERGEKIT = {
    "task-arithmetic": ("task_arithmetic", {"weight": 1.0}),
    "ties": ("ties", {"weight": 1.0, "density": 0.5}),
    "slerp": ("slerp", {"t": 0.3}),
    "nuslerp": ("nuslerp", {"weight": {"m0": 0.6, "m1": 0.4}}),  # t = 0.4 / (0.6 + 0.4)
    "karcher": ("karcher", {}),
    "model-stock": ("model_stock", {}),
    "breadcrumbs": ("breadcrumbs", {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "sce": ("sce", {"select_topk": 0.5}),
    "dare-ties (density 1)": ("dare_ties", {"weight": 1.0, "density": 1.0}),
    "della (density 1)": ("della", {"weight": 1.0, "density": 1.0}),
}

HELPER = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
folder, jobs = sys.argv[1], json.loads(sys.argv[2])
inputs = [load_file(f"{folder}/{n}.safetensors") for n in ("base", "m0", "m1", "m2")]
out = {}
for label, (name, n, params, ours) in jobs.items():
    method, theirs = registry.get(name), load_file(ours)
    ids = ["base", "m0", "m1", "m2"][: n + 1]
    base_index = None if name == "karcher" else 0
    params = {k: ({i: v for i in ids[1:]} if k == "weight" and not isinstance(v, dict) else v)
              for k, v in params.items()}
    diff, t0 = 0.0, time.perf_counter()
    try:
        for key, b in inputs[0].items():
            if not b.is_floating_point() or key.rsplit(".", 1)[-1] in ("running_mean", "running_var"):
                continue  # running statistics follow weightspace's own rule in every merge (docs/merge.md)
            group = TensorGroup.from_tensors([x[key] for x in inputs[: n + 1]], ids=ids, base_index=base_index,
                                             name=key)
            got = method([group], parameters=params)[0]
            diff = max(diff, float((got.double() - theirs[key].double()).abs().max()))
        out[label] = {"max_abs_diff": diff, "seconds": time.perf_counter() - t0}
    except Exception as e:
        out[label] = {"error": f"{type(e).__name__}: {e}"[:200]}
print(json.dumps(out))
'''


def make_inputs(folder: Path, seed: int = 0) -> None:
    """A base (timm resnet18, random init) and three fine-tunes: the base plus 1% of each tensor's spread."""
    import timm
    torch.manual_seed(seed)
    base = {k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=10).state_dict().items()}
    save_file(base, folder / "base.safetensors")
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(3):
        ft = {k: (v + 0.01 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
                  if v.is_floating_point() else v) for k, v in base.items()}
        save_file(ft, folder / f"m{i}.safetensors")


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def label(name: str, opts: dict) -> str:
    return f"{name} (density 1)" if opts.get("density") == 1.0 else name


def bench(folder: Path) -> dict[str, tuple[float, str]]:
    """Whole-process seconds of each method (and of a uniform soup), and where each output went."""
    ws = str(Path(sys.executable).parent / "weightspace")
    files = [str(folder / f"m{i}.safetensors") for i in range(3)]
    soup = run([ws, "soup", *files, str(folder / "base.safetensors"), "-o", str(folder / "soup.safetensors"),
                "--force", "-q"])
    out = {"uniform soup (4 files)": (soup, "")}
    for name, n, opts in METHODS:
        path = folder / f"{label(name, opts).replace(' ', '_')}.safetensors"
        params = [a for k, v in opts.items() for a in ("--param", f"{k}={v}")]
        secs = run([ws, "merge", "--method", name, "--base", str(folder / "base.safetensors"), *files[:n], *params,
                    "-o", str(path), "--force", "-q"])
        out[label(name, opts)] = (secs, str(path))
    return out


def mergekit_compare(folder: Path, outputs: dict[str, tuple[float, str]]) -> dict:
    """Install mergekit into a virtual environment under a temporary folder and compare (see the module doc)."""
    env = Path(tempfile.mkdtemp(prefix="mergekit-venv-"))
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    target = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                            capture_output=True, text=True).stdout.strip()
    # reuse this interpreter's torch, numpy and pydantic: the folder torch is installed in
    Path(target, "host.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "mergekit"], check=True)
    version = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip()
    counts = {name: n for name, n, _ in METHODS}
    jobs = {lab: (mk, counts[lab.split(" ")[0]], params, outputs[lab][1]) for lab, (mk, params) in MERGEKIT.items()}
    res = subprocess.run([str(py), "-c", HELPER, str(folder), json.dumps(jobs)], check=True, capture_output=True,
                         text=True)
    return {"version": version, "methods": json.loads(res.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", action="store_true", help="also compare with mergekit (installs it in a temp venv)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="merge-methods-"))
    make_inputs(folder)
    size = os.path.getsize(folder / "base.safetensors") / 1e6
    print(f"inputs: a base and 3 fine-tunes of timm resnet18 ({size:.0f} MB each), {torch.get_num_threads()} threads")
    outputs = bench(folder)
    mk = mergekit_compare(folder, outputs) if args.mergekit else None
    soup = outputs["uniform soup (4 files)"][0]
    head = "| method | weightspace s (whole process) | × uniform soup |"
    if mk:
        head += f" mergekit {mk['version']} s (tensors only) | max abs diff vs mergekit |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for lab, (secs, _) in outputs.items():
        row = f"| {lab} | {secs:.2f} | {secs / soup:.2f} |"
        if mk:
            m = mk["methods"].get(lab)
            row += (" — | — |" if not m else f" — | {m['error']} |" if "error" in m else
                    f" {m['seconds']:.2f} | {m['max_abs_diff']:.2e} |")
        print(row)


if __name__ == "__main__":
    main()
