"""Recipe kind ``merges``: every merge method side by side, each tuned on validation data, over seeds.

Per seed: a model is pre-trained on some classes (the base), several models are fine-tuned from it (each its own
data order and learning rate), and the soup leaderboard is drawn on the validation and test sets: every fine-tune,
the best one on val, the uniform and greedy soups, the ensembles, and every merge method with its main
hyperparameter tuned on val (λ, density, select_topk; Fisher merging and RegMean take their statistics on val).
Across seeds each row's test accuracy gets a 95% t-interval and a paired difference with the best individual;
rows are ranked by mean test accuracy.

Finding (a): the best merge (by mean val accuracy, chosen without the test set) against the best individual on
test, paired over seeds: reproduced when the interval of the difference lies above 0, not reproduced when below,
inconclusive otherwise.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..ops.merge import TIES_PAPER
from .config import load_kind_recipe
from .kit import build_task, kind_defaults, open_session, register_recipe, train_from, train_options

__all__ = ["run_merges_recipe", "load_merges_recipe"]

KIND = "merges"
METHODS = ["task-arithmetic", "ties", "karcher", "model-stock", "breadcrumbs", "sce", "dare-linear", "dare-ties",
           "della", "della-linear", "fisher", "regmean"]
DEFAULTS: dict[str, Any] = kind_defaults(KIND, {
    "threads": 1,
    "data": {"pretrain": {"spec": "digits:train", "classes": [0, 1, 2, 3, 4]}, "finetune": {"spec": "digits:train"},
             "val": "digits:val", "test": "digits:test"},
    "pretrain": train_options(epochs=10),
    "finetune": train_options(epochs=2, lr=0.02),
    "lrs": [0.01, 0.02, 0.05],       # one fine-tune per learning rate, each with its own data order
    "methods": METHODS,
    "scales": [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5],
    "seeds": [1, 2, 3],
})


def load_merges_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                       overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a merges recipe (``small:`` and KEY=VALUE overrides applied).

    Raises:
        ConfigError: unreadable or malformed recipe, fewer than three seeds or two fine-tunes, an unknown method.
    """
    from ..errors import ConfigError
    from ..registry import REGISTRY
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides)
    if len(cfg["lrs"]) < 2:
        raise ConfigError(f"{cfg['where']}: lrs needs two or more learning rates (one fine-tune each)")
    for m in cfg["methods"]:
        REGISTRY.get("merge", m, what=f"{cfg['where']}: methods: {m}")
    return cfg


def _one_seed(s: Any, cfg: dict, seed: int, data: dict) -> dict[str, dict[str, float]]:
    """Train the base and the fine-tunes of one seed; every leaderboard row's {val, test} accuracy."""
    from ..eval.evaluator import Evaluator
    from ..eval.modules import build_model_for
    from ..search.soups import merge_rows, soup_leaderboard
    from .kit import state_of
    spec, k = cfg["model"], data["finetune"].num_classes
    base_net, _ = train_from(spec, None, data["pretrain"], cfg["pretrain"], seed, num_classes=k)
    base = state_of(base_net)
    fts = {}
    for i, lr in enumerate(cfg["lrs"]):
        net, _ = train_from(spec, base, data["finetune"], {**cfg["finetune"], "lr": lr}, 100 * seed + i)
        fts[f"ft{i}"] = state_of(net)
    ev = Evaluator(build_model_for(spec, num_classes=k), {"val": data["val"], "test": data["test"]},
                   device=s.device, batch_size=s.batch_size, keep_logits=True)
    lb, _, _ = soup_leaderboard(fts, ev, progress=False)
    rows, _ = merge_rows(base, list(fts.values()), ev, cfg["methods"], grid=cfg["scales"])
    out = {}
    for row in [*lb.rows, *rows]:
        name = row["method"].split(" (")[0] if row.get("kind") == "merge" else row["method"]
        out[name] = {d: row["metrics"][d]["accuracy"] for d in ("val", "test")}
    return out


def run_merges_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                      overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                      device: str = "cpu", batch_size: int = 256) -> dict:
    """Every merge method over seeds (see the module docstring); writes results.json, leaderboard.csv and
    REPORT.md into ``out``; returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: a malformed recipe or data spec.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from ..report.stats import difference, t_interval
    s = open_session(load_merges_recipe, recipe, out, small=small, overrides=overrides, force=force,
                     progress=progress, device=device, batch_size=batch_size)
    cfg = s.cfg
    with s.threads() as t0:
        data = {n: build_task(cfg["data"][n], n, cfg["where"]) for n in ("pretrain", "finetune")}
        for n in ("val", "test"):
            data[n] = build_task({"spec": cfg["data"][n]}, n, cfg["where"])
        s.claim_output()
        per_seed = {}
        for seed in s.seeds:
            s.note(f"seed {seed}: base, {len(cfg['lrs'])} fine-tunes, {len(cfg['methods'])} merges")
            per_seed[seed] = _one_seed(s, cfg, seed, data)
        s.lap("all seeds", t0)
    names = list(per_seed[s.seeds[0]])
    acc = {n: {d: [per_seed[sd][n][d] for sd in s.seeds] for d in ("val", "test")} for n in names}
    best = acc["best individual (val)"]["test"]
    table = []
    for n in sorted(names, key=lambda n: -t_interval(acc[n]["test"]).mean):
        iv, dv = t_interval(acc[n]["test"]), difference(acc[n]["test"], best, paired=True)
        table.append([n, t_interval(acc[n]["val"]).mean, iv.mean, iv.low, iv.high, dv.mean, dv.low, dv.high])
    header = ["method", "val mean", "test mean", "test low", "test high", "Δ vs best individual", "Δ low", "Δ high"]
    s.csv("leaderboard.csv", header, table)
    merges = [n for n in names if n.split(" ")[0] in cfg["methods"]]
    chosen = max(merges, key=lambda n: t_interval(acc[n]["val"]).mean)
    d = difference(acc[chosen]["test"], best, paired=True)
    verdict = "reproduced" if d.low > 0 else "not reproduced" if d.high < 0 else "inconclusive"
    findings = [{"id": "a", "claim": "The merge chosen on validation data beats the best individual fine-tune on the "
                                     "test set.", "verdict": verdict, "table": "leaderboard.csv",
                 "numbers": f"{chosen} (best mean val accuracy among the merges): test accuracy − best individual's "
                            f"= {d.mean:+.4f}, 95% paired t-interval over {len(s.seeds)} seeds [{d.low:+.4f}, "
                            f"{d.high:+.4f}]."}]
    from ..report import markdown_table
    from .kit import render_report
    body = ["## Leaderboard (test accuracy over seeds, ranked)", "",
            markdown_table(header, table)]
    pre, ft = cfg["data"]["pretrain"], cfg["data"]["finetune"]
    setup = [f"Seeds {', '.join(map(str, s.seeds))}; base pre-trained on {pre['spec']} (classes "
             f"{pre.get('classes') or 'all'}); fine-tunes ft0, ft1, ... on {ft['spec']} with learning rates "
             f"{', '.join(f'{x:g}' for x in cfg['lrs'])}.",
             f"Merges tuned on {cfg['data']['val']}: {', '.join(cfg['methods'])}."]
    results = {"per_seed": {str(k): v for k, v in per_seed.items()}, "leaderboard": [dict(zip(header, r))
                                                                                      for r in table]}
    return s.finish(findings, results, render_report(cfg, setup, body, findings))


register_recipe(KIND, "Every merge method, tuned on validation data",
                "test accuracy of each merge (hyperparameter picked on val) vs the best individual, over seeds",
                "fine-tunes of one pre-trained model merged by every method, each tuned on validation data, ranked "
                "with intervals over seeds", TIES_PAPER, DEFAULTS, run_merges_recipe)
