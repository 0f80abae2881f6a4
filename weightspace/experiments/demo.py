"""The embedded default run behind ``weightspace demo`` / ``make demo``: real models on real data, offline.

1. Pre-train a small CNN on a source task: scikit-learn's real handwritten digits 0–4 (5 classes).
2. Transfer to the target task, all 10 digits from only 300 labelled examples: a new head is fitted by a
   linear probe (shared by every fine-tune, as soups need one starting point), then ≥ 6 ingredients are
   fine-tuned over a grid of learning rate × weight decay × augmentation, each with its own seed.
3. Train 2 models of the same architecture from random initialisation on the same target data.
4. Soup leaderboard on validation, test and a shifted test set (every image moved one pixel): each model,
   best individual, uniform soup, greedy soup, output ensemble, greedy ensemble.
5. Barrier curves: a fine-tuned pair against the random-init pair on one plot.

Everything is seeded and runs on one CPU thread, so the same seed gives the same bytes on any machine.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .._version import __version__
from ..eval.data import TensorData, load_data
from ..errors import OutputExists
from ..eval.evaluator import Evaluator
from ..analysis.curve import interpolation_curve
from ..eval.models import build_model
from ..ops.stream import single_thread
from ..analysis.curve import CURVE_FILES, write_curves
from ..report import check_outputs
from ..search.greedy import LEADERBOARD_FILES, write_leaderboard
from ..io.save import save
from ..search.greedy import soup_leaderboard
from ..eval.train import train

MODEL = "weightspace.eval.zoo:small_cnn"
SOURCE_CLASSES = 5
# learning rate × weight decay × augmentation: the fine-tuning grid (ingredient i also gets its own seed)
GRID = [(lr, wd, aug) for lr in (0.01, 0.03) for wd in (0.0, 1e-3) for aug in ("none", "shift")]


@dataclass(frozen=True)
class DemoSize:
    """How much work the demo does."""

    pretrain_epochs: int
    probe_epochs: int
    finetune_epochs: int
    scratch_epochs: int
    ingredients: int
    target_examples: int
    steps: int


SIZES = {
    "full": DemoSize(pretrain_epochs=10, probe_epochs=3, finetune_epochs=10, scratch_epochs=20, ingredients=8,
                     target_examples=300, steps=11),
    # the test suite's run: the same pipeline end to end, with fewer epochs, ingredients and curve points
    "small": DemoSize(pretrain_epochs=4, probe_epochs=2, finetune_epochs=3, scratch_epochs=4, ingredients=3,
                      target_examples=300, steps=5),
}


def shifted(d: TensorData, name: str) -> TensorData:
    """A distribution shift of real images: every image moved one pixel right and down (background fills in)."""
    x = torch.roll(d.x, shifts=(1, 1), dims=(-2, -1))
    x[..., 0, :] = d.x.min()
    x[..., :, 0] = d.x.min()
    return replace(d, name=name, x=x.contiguous())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_names(size: DemoSize) -> list[str]:
    """File names (under ckpts/) of every model the demo trains."""
    names = [f"pretrained-digits0-{SOURCE_CLASSES - 1}.safetensors", "linear-probe.safetensors"]
    names += [f"ft{i}-lr{lr:g}-wd{wd:g}-{aug}.safetensors" for i, (lr, wd, aug) in enumerate(GRID[:size.ingredients])]
    return names + ["scratch0.safetensors", "scratch1.safetensors"]


def run_demo(out: str | Path, *, small: bool = False, seed: int = 0, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = lambda msg: None) -> dict:
    """Train, soup and interpolate; write everything under ``out`` and return the results (with the objects)."""
    size = SIZES["small" if small else "full"]
    out = Path(out)
    ckdir, soupdir = out / "ckpts", out / "soups"
    names = checkpoint_names(size)
    check_outputs(out, LEADERBOARD_FILES + CURVE_FILES, force)
    for p in [ckdir / n for n in names] + [soupdir / "greedy.safetensors", soupdir / "uniform.safetensors"]:
        if p.exists() and not force:
            raise OutputExists(f"{p}: already exists (use --force to overwrite)")
    ckdir.mkdir(parents=True, exist_ok=True)
    soupdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with single_thread():  # results independent of the core count; tiny ops do not stall on a busy machine
        t0 = time.perf_counter()
        train_all, val, test = (load_data(f"digits:{s}") for s in ("train", "val", "test"))
        shift = shifted(test, "digits:test+shift")
        source = replace(train_all.subset(train_all.y < SOURCE_CLASSES, f"digits:train[0-{SOURCE_CLASSES - 1}]"),
                         num_classes=SOURCE_CLASSES)
        target = train_all.subset(slice(0, size.target_examples), f"digits:train[:{size.target_examples}]")

        def keep(model: torch.nn.Module, name: str, config: dict) -> str:
            path = ckdir / name
            save(_state(model), path, force=force, provenance={"op": "train", "config": config, "seed": seed})
            return str(path)

        log(f"pre-training on {source.name} ({len(source)} real digits, {SOURCE_CLASSES} classes)")
        torch.manual_seed(seed)
        pre = build_model(MODEL, num_classes=SOURCE_CLASSES)
        cfg = {"data": source.name, "epochs": size.pretrain_epochs, "lr": 0.05, "batch_size": 32, "seed": seed}
        train(pre, source, epochs=size.pretrain_epochs, lr=0.05, batch_size=32, seed=seed)
        keep(pre, names[0], cfg)

        log(f"linear probe of a new 10-class head on {target.name}")
        torch.manual_seed(seed + 1)
        probe = build_model(MODEL, num_classes=10)
        probe.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("fc.")}, strict=False)
        for n, p in probe.named_parameters():
            p.requires_grad_(n.startswith("fc."))
        train(probe, target, epochs=size.probe_epochs, lr=0.05, batch_size=32, seed=seed + 1)
        for p in probe.parameters():
            p.requires_grad_(True)
        keep(probe, names[1], {"data": target.name, "epochs": size.probe_epochs, "lr": 0.05, "frozen": "all but fc"})
        start = _state(probe)
        timings["pre-train + probe"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        grid = GRID[:size.ingredients]
        ingredients = []
        runs = range(len(grid) + 2)
        if progress:
            from ..progress import progress as _progress_bar
            runs = _progress_bar(runs, desc="train", unit="model")
        for i in runs:
            if i < len(grid):  # fine-tune from the probed start
                lr, wd, aug = grid[i]
                model = build_model(MODEL, num_classes=10)
                model.load_state_dict(start)
                cfg = {"data": target.name, "init": names[1], "epochs": size.finetune_epochs, "lr": lr,
                       "weight_decay": wd, "augment": aug, "seed": seed + 10 + i}
                train(model, target, epochs=size.finetune_epochs, lr=lr, weight_decay=wd, augment=aug,
                      batch_size=32, seed=seed + 10 + i)
                ingredients.append(keep(model, names[2 + i], cfg))
            else:  # from random initialisation
                s = i - len(grid)
                torch.manual_seed(seed + 100 + s)
                model = build_model(MODEL, num_classes=10)
                cfg = {"data": target.name, "init": "random", "epochs": size.scratch_epochs, "lr": 0.05,
                       "seed": seed + 100 + s}
                train(model, target, epochs=size.scratch_epochs, lr=0.05, batch_size=32, seed=seed + 100 + s)
                keep(model, names[-2 + s], cfg)
        scratch = [str(ckdir / names[-2]), str(ckdir / names[-1])]
        timings["fine-tune + scratch"] = time.perf_counter() - t1
        log(f"trained {len(ingredients)} fine-tunes and 2 random-init models in {timings['fine-tune + scratch']:.1f} s")

        t2 = time.perf_counter()
        ev = Evaluator(build_model(MODEL, num_classes=10), [val, test, shift], device="cpu", keep_logits=True)
        lb, soups, greedy = soup_leaderboard(ingredients, ev, progress=progress,
                                             title="soup leaderboard (accuracy, real digits)")
        soup_paths = {k: str(save(sd, soupdir / f"{k}.safetensors", force=force, provenance={"val": val.name}))
                      for k, sd in soups.items()}
        timings["leaderboard"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        curve_ev = Evaluator(ev.model, [test], device="cpu")  # the same model instance, one dataset
        curves = [interpolation_curve(ingredients[0], ingredients[-1], curve_ev, steps=size.steps,
                                      label="fine-tuned pair", progress=progress),
                  interpolation_curve(scratch[0], scratch[1], curve_ev, steps=size.steps,
                                      label="random-init pair", progress=progress)]
        timings["curves"] = time.perf_counter() - t3

    results = {"command": "demo", "weightspace_version": __version__, "seed": seed,
               "size": "small" if small else "full", "config": asdict(size), "model": MODEL,
               "grid": [{"lr": lr, "weight_decay": wd, "augment": aug} for lr, wd, aug in GRID[:size.ingredients]],
               "data": {"source": source.name, "target": target.name, "val": val.name, "test": [test.name, shift.name]},
               "checkpoints": {"fine_tuned": ingredients, "random_init": scratch, "pretrained": str(ckdir / names[0])},
               "soups": soup_paths, "greedy": greedy.to_dict(),
               "barriers": {c.label: c.barriers for c in curves}}
    files = write_leaderboard(lb, out, results, force=force)
    files.update({f"curve_{k}": v for k, v in write_curves(curves, out, {"command": "demo", "seed": seed},
                                                           force=force).items()})
    return {**results, "leaderboard": lb, "curves": curves, "files": files, "timings": timings}
