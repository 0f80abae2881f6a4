"""Recipe kind ``soup``: the demo's soup experiment over checkpoints that already exist (fine-tunes published on
the Hub, or your own files) instead of models trained here.

Given ingredients of one architecture, a validation set (greedy decisions only) and test sets (the first is the
in-distribution test set, the rest distribution shifts), it writes what the demo writes:

- the soup leaderboard: every ingredient, best individual on val, uniform soup, greedy soup, output and greedy
  ensembles, with a 95% Wilson interval beside each accuracy and an "avg shifts" column (model soups' table);
- pairwise midpoint barriers between the ingredients on val, and the ingredients that break the basin when the
  uniform soup loses to the best individual (weightspace.analysis.basin);
- a barrier curve between two ingredients on the test sets;
- the uniform and greedy soups as safetensors under ``soups/``, and REPORT.md.

Findings: (a) the greedy soup is at least as accurate on the test set as the best individual (reported with the
difference, not judged against a threshold: one soup per run gives no interval); (b) the basin: which ingredients
a uniform soup should leave out.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..ops.stream import SOUPS_PAPER
from .config import load_kind_recipe
from .kit import register_recipe

__all__ = ["run_soup_recipe", "load_soup_recipe"]

KIND = "soup"
DEFAULTS: dict[str, Any] = {
    "kind": KIND,
    "name": "soup",
    "description": "",
    "model": None,          # the architecture, e.g. timm:hf-hub:timm/vit_base_patch16_clip_224.openai_ft_in1k
    "ingredients": [],      # source strings of the fine-tunes
    "data": {"val": None, "test": []},
    "analysis": {"basin_tolerance": 0.03, "curve": [0, -1], "steps": 11, "ensembles": True},
    "small": {},
}


def load_soup_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                     overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a soup recipe, apply its ``small:`` overrides (when asked) and KEY=VALUE overrides.

    Raises:
        ConfigError: unreadable or malformed recipe (no model, fewer than two ingredients, no val or test data).
    """
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides, seeds_key=None)
    where = cfg["where"]
    if not cfg["model"]:
        raise ConfigError(f"{where}: model is required (timm:NAME, timm:hf-hub:ORG/NAME, open_clip:ARCH, ...)")
    ingredients = cfg["ingredients"]
    if not isinstance(ingredients, list) or len(ingredients) < 2 or len(set(map(str, ingredients))) != len(ingredients):
        raise ConfigError(f"{where}: ingredients needs two or more different checkpoints")
    tests = cfg["data"]["test"]
    cfg["data"]["test"] = tests = [tests] if isinstance(tests, str) else list(tests or [])
    if not cfg["data"]["val"] or not tests:
        raise ConfigError(f"{where}: data needs 'val' (greedy decisions) and 'test' (one or more sets)")
    curve = cfg["analysis"]["curve"]
    if curve and (len(curve) != 2 or any(not isinstance(i, int) or not -len(ingredients) <= i < len(ingredients)
                                         for i in curve)):
        raise ConfigError(f"{where}: analysis.curve is two ingredient indexes (e.g. [0, -1]) or []")
    return cfg


def run_soup_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                    overrides: Sequence[str] = (), force: bool = False, progress: bool = True, device: str = "cpu",
                    batch_size: int = 256) -> dict:
    """Soup leaderboard, basin and a barrier curve over the recipe's ingredients; writes results.json,
    leaderboard.csv/png, basin.*, curve.*, soups/{uniform,greedy}.safetensors and REPORT.md into ``out``.
    Returns {"findings", "timings", "out"} like the other recipe kinds.

    Raises:
        ConfigError: a malformed recipe or data spec.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
        CheckpointError, IncompatibleCheckpoints: an ingredient cannot be read or does not fit the model.
    """
    import weightspace.report as report
    from ..analysis.basin import BasinResult, pairwise_barriers
    from ..analysis.curve import CurveSet, interpolation_curve
    from ..eval.data import load_data
    from ..eval.evaluator import Evaluator
    from ..eval.modules import build_model_for
    from ..io.save import save
    from ..search.soups import Leaderboard, soup_leaderboard
    from .demo import basin_verdict

    cfg = load_soup_recipe(recipe, small=small, overrides=overrides)
    cfg["small_run"] = small
    out = Path(out)
    soupdir = out / "soups"
    report.check_outputs(out, [*Leaderboard.FILES, *BasinResult.FILES, *CurveSet.FILES, "REPORT.md",
                               "soups/uniform.safetensors", "soups/greedy.safetensors"], force)
    an, ingredients = cfg["analysis"], [str(s) for s in cfg["ingredients"]]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # one model, sized by the first ingredient's classifier (e.g. 1,000 ImageNet classes); every set is decoded
    # with its eval transform, and a set with a subset of its classes (wnid folders) is scored on those classes
    # (the sets stay memory-mapped from the data cache: the Evaluator holds them on the device when they fit, else
    # streams them)
    model = build_model_for(cfg["model"], ingredients[0])
    val = load_data(cfg["data"]["val"], model=model)
    tests = [load_data(s, model=model) for s in cfg["data"]["test"]]
    ev = Evaluator(model, [val, *tests], device=device, batch_size=batch_size, keep_logits=bool(an["ensembles"]))
    timings["data"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    lb, soups, greedy = soup_leaderboard(ingredients, ev, progress=progress,
                                         title=f"soup leaderboard ({cfg['name']})")
    soupdir.mkdir(parents=True, exist_ok=True)
    soup_paths = {k: str(save(sd, soupdir / f"{k}.safetensors", force=force,
                              provenance={"op": f"{k} soup", "recipe": cfg["name"], "val": val.name}))
                  for k, sd in soups.items()}
    timings["leaderboard"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    individual = [r["metrics"] for r in lb.rows[:len(ingredients)]]
    names = [r["method"] for r in lb.rows[:len(ingredients)]]
    val_ev = Evaluator(ev.model, [val], device=device, batch_size=batch_size)  # the same model instance
    basin = pairwise_barriers(ingredients, val_ev, tolerance=float(an["basin_tolerance"]), names=names,
                              ends=[m[val.name]["error"] for m in individual])
    verdict = basin_verdict(lb, basin, val.name)
    lb.extra["basin"] = verdict
    timings["basin"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    curves = []
    if an["curve"]:
        i, j = an["curve"]
        curve_ev = Evaluator(ev.model, tests, device=device, batch_size=batch_size)
        curves.append(interpolation_curve(ingredients[i], ingredients[j], curve_ev, steps=int(an["steps"]),
                                          label=f"{names[i]} – {names[j]}", progress=progress))
    timings["curve"] = time.perf_counter() - t3

    findings = _findings(lb, basin, verdict, tests[0].name)
    timings["total"] = time.perf_counter() - t0
    public = {k: v for k, v in cfg.items() if k != "where"}
    results = {"recipe": public, "findings": findings, "soups": soup_paths, "greedy": greedy.to_dict(),
               "basin": basin.to_dict(), "barriers": {c.label: c.barriers for c in curves},
               "data": {"val": val.name, "test": [d.name for d in tests],
                        "examples": {d.name: len(d) for d in (val, *tests)}}}
    lb.write(out, force=force, extra=results)
    basin.write(out, force=force)
    if curves:
        CurveSet(curves).write(out, force=force, extra={"recipe": cfg["name"]})
    report.write_text(out / "REPORT.md", _render(cfg, lb, findings, curves), force=force)
    return {"findings": findings, "timings": timings, "out": str(out)}


def _findings(lb: Any, basin: Any, verdict: dict, test: str) -> list[dict]:
    """(a) greedy soup vs the best individual on ``test``; (b) the basin and its breakers."""
    best, gsoup = lb.row("best individual (val)"), lb.row("greedy soup")
    gain = gsoup["metrics"][test]["accuracy"] - best["metrics"][test]["accuracy"]
    findings = [
        {"id": "a", "claim": "The greedy soup is at least as accurate on the test set as the best individual "
                             "ingredient (chosen on val).",
         "verdict": "reproduced" if gain >= 0 else "not reproduced",
         "numbers": f"Greedy soup ({gsoup['detail']}) − best individual ({best['detail']}) on {test}: {gain:+.4f} "
                    f"test accuracy; one soup per run, so no interval over runs (each accuracy carries its 95% "
                    f"Wilson interval in the leaderboard).", "figures": ["leaderboard.png"],
         "table": "leaderboard.csv"},
        {"id": "b", "claim": "Ingredients fine-tuned from one pre-trained model share a basin; those that break it "
                             "are named from measured pairwise barriers.", "verdict": "measured",
         "numbers": ("Median midpoint val-error barrier per ingredient: "
                     + ", ".join(f"{n} {m:.4f}" for n, m in zip(basin.names, basin.medians))
                     + f" (rule: {verdict['rule']}). Breakers: {', '.join(basin.breakers) or 'none'}. Uniform soup "
                     f"val accuracy {verdict['uniform_val_accuracy']:.4f} vs best individual "
                     f"{verdict['best_individual_val_accuracy']:.4f}."), "figures": ["basin.png"],
         "table": "basin.csv"},
    ]
    return findings


def _render(cfg: dict, lb: Any, findings: list[dict], curves: list) -> str:
    from ..report import markdown_table
    lines = [f"# {cfg['name']}", ""]
    if cfg["description"]:
        lines += [cfg["description"].strip(), ""]
    lines += ["## Setup", "", f"- Model: `{cfg['model']}`; recipe `{cfg['where']}`"
              f"{' (reduced size: --small)' if cfg.get('small_run') else ''}.",
              "- Ingredients: " + ", ".join(f"`{s}`" for s in cfg["ingredients"]) + ".",
              f"- Greedy decisions on `{cfg['data']['val']}`; test sets " + ", ".join(f"`{s}`" for s in cfg["data"]["test"])
              + " (the first in distribution, the others shifts, averaged in 'avg shifts').", "",
              "## Leaderboard (accuracy)", "", markdown_table(*lb.table()), "",
              "## Findings", "", markdown_table(["finding", "verdict"], [[f["id"], f["verdict"]] for f in findings]), ""]
    for f in findings:
        lines += [f"### ({f['id']}) {f['claim']}", "", f"**{f['verdict'].upper()}.** {f['numbers']}", ""]
        lines += [f"![{fig}]({fig})" for fig in f["figures"]]
        lines.append("")
    if curves:
        lines += ["![curve.png](curve.png)", ""]
    lines += ["The soups are in `soups/` (safetensors with provenance); every number is in `results.json`.", ""]
    return "\n".join(lines)


register_recipe(KIND, "Model soups over existing checkpoints",
                "greedy / uniform soup vs best individual; pairwise midpoint barriers; a barrier curve",
                "the demo's soup experiment over given fine-tunes: leaderboard with shift columns, the basin and "
                "its breakers, a curve between two ingredients", SOUPS_PAPER, DEFAULTS, run_soup_recipe)
