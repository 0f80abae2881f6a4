"""Recipe kind ``head2toe-targets``: does Head2Toe gain most over a last-layer probe on targets far from the source?

Evci et al. (2022) report that selecting features from every layer (Head2Toe) helps most on target tasks of low
*domain affinity*, which they define as the accuracy of a linear probe on the source model's last layer minus the
accuracy of the same architecture trained from scratch on the target. This recipe builds several targets at
different distances from one source task (the same digits, inverted pixels, block-shuffled images, another data
set, ...) and, for every seed (one source model pre-trained per seed), measures per target:

- ``probe``    the last-layer linear probe's test accuracy (Head2Toe's own baseline, on the same features);
- ``head2toe`` Head2Toe's test accuracy (fraction kept chosen by cross-validation on the target's training set);
- ``scratch``  the model trained from a random initialisation on the target's training set (seeded by the seed);
- ``affinity`` = probe − scratch, and ``gain`` = head2toe − probe.

Targets are ordered by their mean affinity over seeds; the lower half are "far", the upper half "near" (with an odd
count the middle target is in neither). Findings, each on a 95% t-interval over seeds: (a) per seed, mean gain on
the far targets − mean gain on the near targets lies above ``margin``; (b) per seed, Spearman's rank correlation
between affinity and gain over all targets lies below 0.

With ``pretrained`` (a published checkpoint, e.g. ``hf-hub:timm/resnet50.a1_in1k``) nothing is pre-trained: that
one backbone is the source model for every seed (``model`` names its architecture, ``timm:hf-hub:...``; image
sources are decoded with its eval transform; ``source.test`` scores it on the source task), and the seeds vary
Head2Toe's cross-validation folds and the scratch models.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from ..registry import Paper
from ..report.stats import fmt_interval, t_interval
from .config import load_kind_recipe
from .kit import (DIGITS_SOURCE, DIGITS_TARGET, kind_defaults, mean, named_tasks, open_session,
                  published, published_source, rank_correlation, register_recipe, render_report, source_data,
                  train_from, train_options)
from .verdicts import check

__all__ = ["KIND", "load_head2toe_targets_recipe", "run_head2toe_targets_recipe"]

KIND = "head2toe-targets"
HEAD2TOE_PAPER = Paper("Evci et al.", 2022, "Head2Toe: Utilizing Intermediate Representations for Better "
                       "Transfer Learning", "ICML", "https://arxiv.org/abs/2201.03529")
DEFAULTS: dict[str, Any] = kind_defaults(KIND, {
    "source": DIGITS_SOURCE,
    "target": DIGITS_TARGET,
    "targets": [],
    "pretrained": None,
    "pretrain": train_options(epochs=10, lr=0.05, batch_size=32),
    "scratch": train_options(epochs=30, lr=0.05, batch_size=16),
    "head2toe": {"layers": "all", "target": 1024, "keep": [0.01, 0.1, 0.2], "folds": 3, "lasso_iters": 100,
                 "max_iter": 50},
    "seeds": [1, 2, 3],
    "analysis": {"margin": 0.0},
})


def load_head2toe_targets_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                                 overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a head2toe-targets recipe (``small:`` and KEY=VALUE overrides applied).

    Raises ConfigError: fewer than four targets, a target without a name or with a repeated one, fewer than three
    seeds, or an unknown key.
    """
    from ..errors import ConfigError
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides)
    targets = cfg["targets"]
    if not isinstance(targets, list) or len(targets) < 4 or not all(isinstance(t, dict) for t in targets):
        raise ConfigError(f"{cfg['where']}: targets needs at least four entries (name, transform, optional spec) at "
                          "different distances from the source")
    names = [t.get("name") for t in targets]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{cfg['where']}: every target needs its own name")
    return cfg


def run_head2toe_targets_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                                overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                                device: str = "cpu", batch_size: int = 256) -> dict:
    """Pre-train one source model per seed; per target, probe, Head2Toe and scratch accuracies; the verdicts.
    Writes checkpoints/, results.json, head2toe_targets.csv, head2toe_targets.png and REPORT.md; returns
    {"findings", "timings", "out"}.

    Raises:
        ConfigError: a malformed recipe or data spec.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from ..analysis.head2toe import head2toe_features
    from ..analysis.taps import FeatureTaps
    from ..eval.train import accuracy

    s = open_session(load_head2toe_targets_recipe, recipe, out, small=small, overrides=overrides, force=force,
                     progress=progress, device=device, batch_size=batch_size)
    cfg = s.cfg
    h = cfg["head2toe"]
    with s.threads() as t0:
        backbone = None
        if cfg["pretrained"]:  # one published source model for every seed: nothing pre-trained here
            backbone, src_test = published_source(cfg["model"], cfg["pretrained"], cfg["source"]["test"])
            src = None
        else:
            src, src_test, _ = source_data(cfg["source"])
        tasks = named_tasks(cfg, cfg["targets"], (lambda: backbone) if backbone else None)
        in_chans = int((src if src is not None else next(iter(tasks.values()))[0]).x.shape[1])
        if backbone is not None:
            weights = published(cfg["pretrained"])
            source_acc = float(s.evaluator_of(backbone, src_test)(weights))
            backbone.load_state_dict({**backbone.state_dict(), **weights})
        s.claim_output()
        s.note("targets: " + "; ".join(f"{n} {len(tr)} train / {len(te)} test" for n, (tr, te) in tasks.items()))
        per: dict[str, dict[int, dict]] = {n: {} for n in tasks}
        sources = {}
        for seed in cfg["seeds"]:
            t1 = time.perf_counter()
            if backbone is not None:
                net, sources[seed] = backbone, source_acc
            else:
                net, _ = train_from(cfg["model"], None, src, cfg["pretrain"], seed, in_chans=in_chans)
                s.save(f"source-{seed}", net.state_dict())
                sources[seed] = accuracy(net, src_test)
            taps = FeatureTaps(net, h["layers"], target=int(h["target"]), device=device, batch_size=batch_size)
            for name, (tr, te) in tasks.items():
                res = head2toe_features(taps(tr), taps(te), keep=h["keep"], folds=int(h["folds"]), seed=int(seed),
                                        lasso_iters=int(h["lasso_iters"]), max_iter=int(h["max_iter"]),
                                        device=taps.device)
                scratch_net, _ = train_from(cfg["model"], None, tr, cfg["scratch"], seed, in_chans=in_chans,
                                            device=device)
                row = {"probe": res.baseline["test_accuracy"], "head2toe": res.accuracy,
                       "scratch": accuracy(scratch_net, te, device=device), "chosen_keep": res.chosen}
                row["affinity"] = row["probe"] - row["scratch"]
                row["gain"] = row["head2toe"] - row["probe"]
                per[name][seed] = row
            s.note(f"seed {seed} ({time.perf_counter() - t1:.1f} s): " + "; ".join(
                f"{n} gain {per[n][seed]['gain']:+.3f} affinity {per[n][seed]['affinity']:+.3f}" for n in tasks))
        s.lap("run", t0)

    seeds = [int(x) for x in cfg["seeds"]]
    targets = {}
    for name, (tr, te) in tasks.items():
        rows = per[name]
        spec = next(t for t in cfg["targets"] if t["name"] == name)
        targets[name] = {"transform": spec.get("transform") or "none",
                         "spec": spec.get("spec", cfg["target"]["spec"]), "train": len(tr), "test": len(te),
                         "per_seed": {str(k): v for k, v in rows.items()},
                         **{m: t_interval([rows[k][m] for k in seeds]).to_dict()
                            for m in ("probe", "head2toe", "scratch", "affinity", "gain")}}
    findings, summary = _findings(targets, seeds, float(cfg["analysis"]["margin"]))
    csv_rows = [[n, k, r["probe"], r["head2toe"], r["scratch"], r["affinity"], r["gain"], r["chosen_keep"]]
                for n, t in targets.items() for k, r in t["per_seed"].items()]
    s.csv("head2toe_targets.csv", ["target", "seed", "probe", "head2toe", "scratch", "affinity", "gain",
                                   "chosen_keep"], csv_rows)
    _plot(targets, seeds, s.figure("head2toe_targets.png"), force)
    findings[0]["figures"] = list(s.figures)
    results = {"source_accuracy": {str(k): v for k, v in sources.items()}, "targets": targets, **summary}
    return s.finish(findings, results, _render(cfg, targets, summary, findings, sources))


def _findings(targets: dict, seeds: list[int], margin: float) -> tuple[list[dict], dict]:
    """(a) far − near mean gain per seed above ``margin``; (b) rank correlation of affinity and gain below 0."""
    order = sorted(targets, key=lambda n: targets[n]["affinity"]["mean"])
    k = len(order) // 2
    far, near = order[:k], order[-k:]
    g = {n: [targets[n]["per_seed"][str(s)]["gain"] for s in seeds] for n in targets}
    a = {n: [targets[n]["per_seed"][str(s)]["affinity"] for s in seeds] for n in targets}
    far_gain = [mean([g[n][i] for n in far]) for i in range(len(seeds))]
    near_gain = [mean([g[n][i] for n in near]) for i in range(len(seeds))]
    # every seed scores the same test sets, whose sampling noise the seeds cannot show: the smallest one's is the floor
    n_test = min((int(targets[n]["test"]) for n in far + near if "test" in targets[n]), default=None)
    c_a = check("far_minus_near_gain", far_gain, near_gain, margin, "above", n_test=n_test,
                what="mean gain on far targets − on near targets (paired by seed)")
    rho = [rank_correlation([a[n][i] for n in order], [g[n][i] for n in order]) for i in range(len(seeds))]
    c_b = check("rank_correlation", rho, None, 0.0, "below", what="Spearman ρ(affinity, gain) per seed")
    fmt_t = lambda n: (f"{n}: affinity {fmt_interval(t_interval(a[n]))}, gain {fmt_interval(t_interval(g[n]))}")  # noqa: E731
    text_a = (f"Targets by mean domain affinity (probe − scratch), far first: {', '.join(order)}; far = {', '.join(far)}, "
              f"near = {', '.join(near)}. Per target: " + "; ".join(fmt_t(n) for n in order)
              + f". Per seed, far − near mean gain: {', '.join(f'{x:+.4f}' for x in [f - n for f, n in zip(far_gain, near_gain)])}. "
              + f"The finding needs the 95% t-interval (widened by the test sets' sampling noise) above {margin:g}: "
              + f"{c_a['text']}.")
    text_b = (f"Spearman rank correlation between affinity and Head2Toe's gain over the {len(order)} targets, per "
              f"seed: {', '.join(f'{r:+.3f}' for r in rho)}. Needs the 95% t-interval below 0: {c_b['text']}.")
    findings = [
        {"id": "a", "claim": "Head2Toe gains more over the last-layer probe on far (low domain affinity) targets "
                             "than on near ones.", "verdict": c_a["verdict"], "numbers": text_a, "figures": [],
         "table": "head2toe_targets.csv"},
        {"id": "b", "claim": "The lower a target's domain affinity, the larger Head2Toe's gain (rank correlation "
                             "below 0).", "verdict": c_b["verdict"], "numbers": text_b, "figures": [],
         "table": "head2toe_targets.csv"},
    ]
    summary = {"order": order, "far": far, "near": near, "far_gain": far_gain, "near_gain": near_gain,
               "rank_correlation": rho, "checks": {"a": c_a, "b": c_b}, "margin": margin}
    return findings, summary


def _plot(targets: dict, seeds: list[int], path: Any, force: bool) -> None:
    from ..report import COLORS, new_figure, save_figure
    fig, (ax,) = new_figure(size=(5.5, 4.2))
    for i, (n, t) in enumerate(targets.items()):
        xs = [t["per_seed"][str(s)]["affinity"] for s in seeds]
        ys = [t["per_seed"][str(s)]["gain"] for s in seeds]
        ax.scatter(xs, ys, s=16, color=COLORS[i % len(COLORS)], label=n)
        ax.errorbar([t["affinity"]["mean"]], [t["gain"]["mean"]], color=COLORS[i % len(COLORS)], marker="D",
                    xerr=[[t["affinity"]["mean"] - t["affinity"]["low"]], [t["affinity"]["high"] - t["affinity"]["mean"]]]
                    if t["affinity"]["n"] > 1 else None,
                    yerr=[[t["gain"]["mean"] - t["gain"]["low"]], [t["gain"]["high"] - t["gain"]["mean"]]]
                    if t["gain"]["n"] > 1 else None, capsize=3)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("domain affinity (last-layer probe − scratch accuracy)")
    ax.set_ylabel("Head2Toe gain over the last-layer probe")
    ax.set_title("per seed (dots) and mean ± 95% t-interval (diamonds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, force=force)


def _render(cfg: dict, targets: dict, summary: dict, findings: list[dict], sources: dict) -> str:
    from ..report import markdown_table
    h, pre, sc = cfg["head2toe"], cfg["pretrain"], cfg["scratch"]
    setup = [(f"Source: the published weights `{cfg['pretrained']}` (not pre-trained here), one backbone for every "
              f"seed; accuracy on `{cfg['source']['test']}` {next(iter(sources.values())):.4f}."
              if cfg["pretrained"] else
              f"Source: `{cfg['source']['train']}` (tested on `{cfg['source']['test']}`); one source model per seed ({', '.join(map(str, cfg['seeds']))}), "
              f"{pre['epochs']} epochs, SGD lr {pre['lr']} (cosine), batch {pre['batch_size']}; source test accuracy "
              + ", ".join(f"{v:.4f}" for v in sources.values()) + "."),
             f"Targets from `{cfg['target']['spec']}` (unless a target names its own spec), "
             f"{cfg['target']['train_per_class']} training images per class, the rest for testing.",
             f"Head2Toe: layers `{h['layers']}`, ≤ {h['target']} pooled features per layer, keep {h['keep']} chosen "
             f"by {h['folds']}-fold cross-validation, {h['lasso_iters']} group-lasso iterations, linear heads by "
             f"{h['max_iter']} L-BFGS iterations; the probe is the last layer's features with the same linear head.",
             f"Scratch: the same architecture from a random init per seed, {sc['epochs']} epochs, lr {sc['lr']}, batch "
             f"{sc['batch_size']}.",
             "Domain affinity = probe − scratch accuracy; gain = Head2Toe − probe accuracy (test sets)."]
    rows = [[n, t["transform"], t["train"], t["test"], f"{t['probe']['mean']:.4f}", f"{t['head2toe']['mean']:.4f}", f"{t['scratch']['mean']:.4f}",
             _iv(t["affinity"]), _iv(t["gain"])] for n, t in targets.items()]
    body = ["## Targets", "", "Means over seeds; affinity and gain with their 95% t-interval.", "",
            markdown_table(["target", "transform", "train", "test", "probe", "head2toe", "scratch", "affinity",
                            "gain"], rows)]
    return render_report(cfg, setup, body, findings)


def _iv(d: dict) -> str:
    from ..report.stats import Interval
    return fmt_interval(Interval(d["mean"], d["low"], d["high"], d["n"], d["level"]))


register_recipe(KIND, "Head2Toe on near and far targets",
                "gain = acc(Head2Toe) − acc(last-layer probe) vs affinity = acc(probe) − acc(scratch), per target",
                "one source model per seed; targets at different distances from the source (inverted, "
                "block-shuffled, other data); Head2Toe's gain over the last-layer probe against domain affinity",
                HEAD2TOE_PAPER, DEFAULTS, run_head2toe_targets_recipe)
