"""Streamed ops against their limits: each contender in a fresh process, same files, page cache warm.

Prints, for N random checkpoints of ~100 MB (timm's ResNet-50 layout) in fp32 and in bf16:
  (a) soup wall time ÷ `cat` of the same files, with the ingredients' sha256 in the hash cache (target ≤ 1.2), and
      with the cache cold (every ingredient hashed while the soup streams);
  (b) soup ÷ a naive peer that safetensors.torch.load_file()s each file, adds it into an fp32 accumulator and
      save_file()s the mean (target ≤ 0.8);
  (c) extra memory of `weightspace soup` (the CLI, run in a fresh process) ÷ one checkpoint, N = 2, 8, 32 (target
      ≤ 0.25): peak RSS during the soup minus the RSS after imports and a tiny warm-up soup;
  (d) with --mergekit: TIES at density 0.2 over 4 task vectors on Llama-layout HF folders ÷ mergekit's `ties` on the
      same folders (mergekit is pip-installed into a venv in the work folder, sharing this torch), both as
      processes from the command line, and the outputs compared (target ≤ 0.3);
  (e) with --device cuda: that TIES on the GPU ÷ on the CPU (bench/gpu_check.sh runs it on 4 × 1 GB bf16).

Times are median (min) over --reps fresh processes; inside each, wall and CPU seconds are measured from opening the
sources to the renamed, fsynced output (imports excluded), `cat` as a process. CPU time is printed because on a
busy machine wall time mostly measures the other processes.

    .venv/bin/python bench/soup_io.py                        # (a)-(c), ~4 GB in a temp folder
    .venv/bin/python bench/soup_io.py --sizes 2,8 --reps 3 --dtypes fp32
    .venv/bin/python bench/soup_io.py --only d --mergekit    # (d): installs mergekit into the work folder
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def resnet50_layout() -> dict:
    """Key → (shape, dtype) of timm's resnet50 (25.6 M parameters, 320 tensors, ~102 MB in fp32)."""
    import timm
    import torch
    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def make_checkpoints(folder: Path, n: int, dtype: str = "fp32") -> list[Path]:
    """n random checkpoints written by the reference safetensors library (seeded: same bytes every run)."""
    import torch
    from safetensors.torch import save_file
    layout = resnet50_layout()
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        path = folder / f"ckpt{i:02d}-{dtype}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        sd = {k: ((torch.randn(shape, generator=gen) * 0.02).to(getattr(torch, DTYPES[dtype]))
                  if dt.is_floating_point else torch.zeros(shape, dtype=dt)) for k, (shape, dt) in layout.items()}
        save_file(sd, path)
    return paths


LLAMA = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 8, "vocab_size": 8192}


def make_llama_folders(folder: Path, n: int, dtype: str, scale: float = 1.0) -> list[Path]:
    """A base and n-1 fine-tunes (base + small noise) as HF folders (config.json + model.safetensors) of a small
    Llama layout (~28 M parameters; ``scale`` multiplies the width for the GPU run), readable by mergekit."""
    import torch
    from safetensors.torch import save_file
    cfg = dict(LLAMA, hidden_size=int(LLAMA["hidden_size"] * scale),
               intermediate_size=int(LLAMA["intermediate_size"] * scale))
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    td = getattr(torch, DTYPES[dtype])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": DTYPES[dtype],
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "tie_word_embeddings": False, **cfg}
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    out = []
    for i in range(n):
        d = folder / f"llama{i}-{dtype}-{scale:g}"
        out.append(d)
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        sd = {k: (t if i == 0 else t + torch.randn(t.shape, generator=gen) * 0.002).to(td).contiguous()
              for k, t in base.items()}
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))
    return out


def warm(paths: list[Path]) -> None:
    """Read every file once so that all later runs read from the page cache."""
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.glob("*.safetensors"))):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(8 << 20):
                    pass


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


# ---- children: one contender per fresh process; each prints one JSON line ----

def child(kind: str, out: str, paths: list[str], extra: list[str]) -> None:
    import torch
    import weightspace as ws
    if kind == "rss":  # the CLI's own code path, in process, after a warm-up that loads every module it uses
        from weightspace_cli.main import main as cli
        tiny = [Path(out).with_suffix(f".tiny{i}.safetensors") for i in range(2)]
        for i, p in enumerate(tiny):
            ws.save({"w": torch.full((4,), float(i))}, p, force=True)
        cli(["soup", "-q", *map(str, tiny), "-o", out, "--force", *extra], standalone_mode=False)
        baseline = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux ≥ 4.0)
        cli(["soup", "-q", *paths, "-o", out, "--force", *extra], standalone_mode=False)
        print(json.dumps({"baseline": baseline, "peak": _status("VmHWM")}))
        return
    t, c = time.perf_counter(), time.process_time()
    if kind == "soup":
        ws.save(ws.uniform_soup_stream(paths), out, force=True)
    elif kind == "naive":
        from safetensors.torch import load_file, save_file
        acc: dict = {}
        dtypes: dict = {}
        for i, p in enumerate(paths):
            for k, v in load_file(p).items():
                if i == 0:
                    dtypes[k] = v.dtype
                    acc[k] = v.to(torch.float32) if v.is_floating_point() else v
                elif v.is_floating_point():
                    acc[k] += v
        save_file({k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in acc.items()}, out)
        fd = os.open(out, os.O_RDONLY)  # what our soup guarantees (a file on disk): fair to both
        os.fsync(fd)
        os.close(fd)
    elif kind == "ties":
        device = extra[0] if extra else "cpu"
        opts = {"density": 0.2} if ties_takes_density() else {"keep": 0.2}
        ws.save(ws.merge("ties", paths[0], paths[1:], device=device, **opts), out, force=True)
    else:
        raise SystemExit(f"unknown child {kind}")
    print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))


def ties_takes_density() -> bool:
    """Whether this checkout's TIES has mergekit's per-tensor density (the ecosystem issue's variant)."""
    import inspect

    from weightspace.ops.merge import Ties
    return "density" in inspect.signature(Ties.__init__).parameters


def run_child(kind: str, out: Path, paths: list[Path], extra: list[str] = (), env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(out), *map(str, paths), "--", *extra],
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_process(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - t


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f})"


def ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f} ({min(a) / min(b):.2f})"


def bench_soup(folder: Path, dtype: str, n: int, reps: int, hash_cache: Path) -> None:
    paths = make_checkpoints(folder, n, dtype)
    warm(paths)
    size = paths[0].stat().st_size
    out = folder / f"soup-{dtype}.safetensors"
    warm_env = {"WEIGHTSPACE_HASH_CACHE": str(hash_cache)}
    run_child("soup", out, paths, env=warm_env)  # fills the hash cache
    times: dict[str, list[float]] = {k: [] for k in ("cat", "soup", "soup_cpu", "cold", "cold_cpu", "naive",
                                                     "naive_cpu")}
    for _ in range(reps):  # interleaved, so that load from other processes hits every contender alike
        times["cat"].append(time_process(["cat", *map(str, paths)]))
        r = run_child("soup", out, paths, env=warm_env)
        times["soup"].append(r["wall"])
        times["soup_cpu"].append(r["cpu"])
        r = run_child("soup", out, paths, env={"WEIGHTSPACE_HASH_CACHE": "off"})
        times["cold"].append(r["wall"])
        times["cold_cpu"].append(r["cpu"])
        r = run_child("naive", folder / f"naive-{dtype}.safetensors", paths)
        times["naive"].append(r["wall"])
        times["naive_cpu"].append(r["cpu"])
    print(f"\n{dtype}: N={n} × {size / 1e6:.1f} MB, median (min) of {reps} fresh processes, seconds")
    print(f"    cat {summary(times['cat'])} wall; soup {summary(times['soup'])} wall, {summary(times['soup_cpu'])} CPU "
          f"(hash cache warm); {summary(times['cold'])} wall, {summary(times['cold_cpu'])} CPU (cold: every file "
          f"hashed); naive load_file peer {summary(times['naive'])} wall, {summary(times['naive_cpu'])} CPU")
    print(f"(a) soup ÷ cat = {ratio(times['soup'], times['cat'])} hash cache warm   [target ≤ 1.2]; "
          f"cold {ratio(times['cold'], times['cat'])}")
    print(f"(b) soup ÷ naive load_file peer = {ratio(times['soup'], times['naive'])} wall, "
          f"{ratio(times['soup_cpu'], times['naive_cpu'])} CPU   [target ≤ 0.8]")


def bench_rss(folder: Path, sizes: list[int]) -> None:
    paths = make_checkpoints(folder, max(sizes), "fp32")
    size = paths[0].stat().st_size
    print(f"\n(c) extra memory of `weightspace soup` ÷ one checkpoint ({size / 1e6:.1f} MB, fp32); baseline = RSS of "
          f"a fresh process after imports and a tiny warm-up soup through the CLI, subtracted:")
    for n in sizes:
        warm(paths[:n])
        m = run_child("rss", folder / f"rss{n}.safetensors", paths[:n], env={"WEIGHTSPACE_HASH_CACHE": "off"})
        extra = m["peak"] - m["baseline"]
        print(f"    N={n:2d}: baseline {m['baseline'] / 1e6:.0f} MB, peak {m['peak'] / 1e6:.0f} MB, extra "
              f"{extra / 1e6:.1f} MB = {extra / size:.3f}× one checkpoint   [target ≤ 0.25]")


def mergekit_venv(folder: Path) -> Path:
    """A venv in the work folder with mergekit, reusing this interpreter's torch (a .pth to its site-packages)."""
    import torch
    venv = folder / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "zz_shared_torch.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    print(f"installing mergekit into {venv} ...", flush=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    return exe


def bench_ties(folder: Path, reps: int, dtype: str, use_mergekit: bool, device: str, scale: float = 1.0,
               run_e: bool = False) -> None:
    import torch
    from safetensors.torch import load_file
    dirs = make_llama_folders(folder, 5, dtype, scale)
    warm(dirs)
    size = (dirs[0] / "model.safetensors").stat().st_size
    density = ties_takes_density()
    what = "per-tensor density 0.2 (mergekit's variant)" if density else \
        "global keep 0.2 (this checkout's TIES has no per-tensor density: outputs will differ from mergekit's)"
    print(f"\n(d) TIES, {what}, base + 4 fine-tunes of {size / 1e6:.0f} MB {dtype} (Llama layout)")
    ours_out = folder / f"ties-{dtype}.safetensors"
    cli = [sys.executable, "-m", "weightspace_cli", "merge", "--method", "ties", "--base", str(dirs[0]),
           *map(str, dirs[1:]), "-o", str(ours_out), "--force", "-q"] + (["--density", "0.2"] if density else
                                                                        ["--keep", "0.2"])
    env = {"WEIGHTSPACE_HASH_CACHE": str(folder / "sha256-cache.json")}
    time_process(cli, env)  # fills the hash cache
    ours, ours_cli, theirs = [], [], []
    exe = mergekit_venv(folder) if use_mergekit else None
    mk_out = folder / f"mergekit-{dtype}"
    if exe is not None:
        cfg = folder / f"ties-{dtype}.yml"
        cfg.write_text(json.dumps({"merge_method": "ties", "base_model": str(dirs[0]), "dtype": DTYPES[dtype],
                                   "parameters": {"normalize": True},
                                   "models": [{"model": str(d), "parameters": {"density": 0.2, "weight": 1.0}}
                                              for d in dirs[1:]]}))
        mk_cmd = [str(exe), str(cfg), str(mk_out), "--allow-crimes"]
    for _ in range(reps):
        ours.append(run_child("ties", ours_out, dirs, env=env)["wall"])
        ours_cli.append(time_process(cli, env))
        if exe is not None:
            shutil.rmtree(mk_out, ignore_errors=True)
            theirs.append(time_process(mk_cmd))
    print(f"    weightspace in process {summary(ours)} s; `weightspace merge` as a process {summary(ours_cli)} s")
    if exe is None:
        print("    mergekit: not run (pass --mergekit to install it into the work folder and compare)")
    else:
        print(f"    `mergekit-yaml` as a process {summary(theirs)} s")
        print(f"    weightspace ÷ mergekit = {ratio(ours_cli, theirs)} (both as processes)   [target ≤ 0.3]")
        a = load_file(ours_out)
        b = {}
        for f in sorted(mk_out.glob("*.safetensors")):
            b.update(load_file(f))
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        print(f"    outputs: max |ours − mergekit| {worst:.3g}, {100 * same:.2f}% of elements identical")
    if run_e:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("(e) --device cuda: no CUDA on this machine")
            return
        gpu = [run_child("ties", ours_out, dirs, [device], env=env)["wall"] for _ in range(reps)]
        cpu = ours
        b = load_file(ours_out)
        run_child("ties", ours_out, dirs, env=env)
        a = load_file(ours_out)
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else device
        print(f"(e) TIES on {name} {summary(gpu)} s vs CPU {summary(cpu)} s: GPU ÷ CPU = "
              f"{ratio(gpu, cpu)}; max |GPU − CPU| {worst:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="checkpoints for (a) and (b)")
    ap.add_argument("--sizes", default="2,8,32", help="N values for (c)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="dtypes for (a), (b) and (d)")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--only", default="abcd", help="which parts to run, e.g. 'ab' or 'c'")
    ap.add_argument("--mergekit", action="store_true", help="(d): pip-install mergekit into the work folder and compare")
    ap.add_argument("--device", default="cpu", help="(e): cuda to time TIES on the GPU against the CPU")
    ap.add_argument("--scale", type=float, default=1.0, help="(d)/(e): width multiplier of the Llama layout "
                                                             "(4.5 gives ~0.9 GB per bf16 checkpoint)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        kind, out, *paths = args.child
        return child(kind, out, paths, [x for x in rest if x != "--"])

    import torch
    folder = Path(args.dir or tempfile.mkdtemp(prefix="ws-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    hash_cache = folder / "sha256-cache.json"
    sys.path.insert(0, str(HERE.parent))
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; work folder {folder}")
        time.sleep(2.1)  # files written just now must age past the hash cache's racy window
        dtypes = [d for d in args.dtypes.split(",") if d]
        if "a" in args.only or "b" in args.only:
            for dt in dtypes:
                make_checkpoints(folder, args.n, dt)
            time.sleep(2.1)
            for dt in dtypes:
                bench_soup(folder, dt, args.n, args.reps, hash_cache)
        if "c" in args.only:
            bench_rss(folder, [int(x) for x in args.sizes.split(",")])
        if "d" in args.only or "e" in args.only:
            for dt in dtypes:
                bench_ties(folder, args.reps, dt, args.mergekit, args.device, args.scale,
                           run_e="e" in args.only or args.device != "cpu")
        print(f"\nload average at the end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
