"""Recipe kind ``trajectory``: which pre-training checkpoint is worth fine-tuning from?

Neyshabur, Sedghi & Zhang (2020, section 5) fine-tune from checkpoints taken along pre-training and find that
downstream accuracy stops improving well before pre-training ends: earlier checkpoints suffice once pre-training
has entered the basin of its final solution. This recipe pre-trains one source model, keeps its weights after the
listed epochs (0 = the random initialisation), and fine-tunes from each with several data-order seeds (all from one
shared random head). Per start point it reports the downstream test accuracy, the error barrier and the L2
distance between every pair of its fine-tuned models, and the source-task barrier between the checkpoint and the
final pre-trained model (is the checkpoint already in the final basin?).

With ``checkpoints`` a mapping of pre-training epochs to published checkpoints (e.g. timm's ResNet-50 recipes of
100, 300 and 600 epochs, ``hf-hub:timm/resnet50.a3_in1k`` ...), nothing is pre-trained: the start points are those
weights, ``model`` names their architecture (``timm:hf-hub:...``), image sources are decoded with its eval
transform, and ``source.test`` (e.g. an ImageNet validation folder) scores each start point on the source task.

Findings, each on 95% t-intervals over fine-tuning seeds:

- (a) some start point before the last suffices: the first one from which on every start point's shortfall,
  accuracy(last start point) − accuracy(this one) paired by seed, lies entirely below ``within``;
- (b) from that start point on, fine-tuned models share a basin: the barrier between its pairs of fine-tuned
  models lies below ``no_barrier_below`` (under stored and, with BatchNorm, re-estimated statistics).
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Sequence

from ..errors import ConfigError
from ..report.stats import Interval, fmt_interval, t_interval
from .config import load_kind_recipe
from .kit import (DIGITS_SOURCE, bn_protocols, error_barrier, fresh_state, kind_defaults,
                  open_session, pt_setup, published, published_source, register_recipe, render_report, source_data,
                  state_of, task, train_from, train_options)
from .transfer import TRANSFER_PAPER
from .verdicts import PROTOCOLS, by_protocol, check, has_batchnorm

__all__ = ["KIND", "load_trajectory_recipe", "run_trajectory_recipe"]

KIND = "trajectory"
DEFAULTS: dict[str, Any] = kind_defaults(KIND, {
    "source": DIGITS_SOURCE,
    "target": {"spec": ["digits:val", "digits:test"], "relabel": None, "classes": None, "train_per_class": 10,
               "transform": None},
    "pretrain": train_options(epochs=20, lr=0.05, batch_size=64, seed=0),
    "checkpoints": [0, 1, 2, 5, 10, 20],
    "finetune": train_options(epochs=30, lr=0.02, batch_size=8),
    "reset": ["fc"],
    "head_seed": 7,
    "seeds": [1, 2, 3],
    "analysis": {"steps": 11, "within": 0.02, "no_barrier_below": 0.02, "recalibrate_bn": True},
})


def load_trajectory_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                           overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a trajectory recipe (``small:`` and KEY=VALUE overrides applied).

    Raises ConfigError: checkpoints not an increasing list of at least two epochs within 0..pretrain.epochs whose
    last is pretrain.epochs (nor a mapping of two or more increasing epochs to checkpoint sources), fewer than
    three seeds, or an unknown key.
    """
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides)
    cps, last = cfg["checkpoints"], cfg["pretrain"]["epochs"]
    if isinstance(cps, dict):  # published checkpoints along pre-training: epochs → source
        ok = len(cps) >= 2 and all(isinstance(e, int) and e >= 0 and isinstance(v, str) and v for e, v in cps.items())
        if not ok or sorted(cps) != list(cps):
            raise ConfigError(f"{cfg['where']}: checkpoints needs two or more increasing pre-training epochs, each "
                              "mapped to a checkpoint (e.g. {100: hf-hub:timm/resnet50.a3_in1k, 600: ...})")
        return cfg
    if not isinstance(cps, list) or len(cps) < 2 or not all(isinstance(e, int) for e in cps) \
            or sorted(set(cps)) != cps or cps[0] < 0 or cps[-1] != last:
        raise ConfigError(f"{cfg['where']}: checkpoints needs two or more increasing epochs from 0 (the random init) "
                          f"to pretrain.epochs ({last}), e.g. [0, 1, 2, 5, {last}]")
    return cfg


def run_trajectory_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                          overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                          device: str = "cpu", batch_size: int = 256) -> dict:
    """Pre-train once keeping the listed checkpoints, fine-tune from each with every seed, measure accuracies,
    barriers and distances; write checkpoints/, results.json, trajectory.csv, trajectory.png and REPORT.md.
    Returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: a malformed recipe or data spec.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from ..analysis.curve import interpolation_curve

    s = open_session(load_trajectory_recipe, recipe, out, small=small, overrides=overrides, force=force,
                     progress=progress, device=device, batch_size=batch_size)
    cfg = s.cfg
    an, pre, spec = cfg["analysis"], cfg["pretrain"], cfg["model"]
    seeds = s.seeds
    with s.threads() as t0:
        states: dict[int, dict] = {}
        if isinstance(cfg["checkpoints"], dict):  # published start points: nothing pre-trained here
            first = next(iter(cfg["checkpoints"].values()))
            shaper, src_test = published_source(spec, first, cfg["source"]["test"])
            src = None
            tgt_train, tgt_test = task(cfg["target"], "target", cfg["where"], lambda: shaper)
            in_chans = int(tgt_train.x.shape[1])
            s.claim_output()
            states = {int(e): published(c) for e, c in cfg["checkpoints"].items()}
            src_ev = s.evaluator_of(shaper, src_test)
        else:
            src, src_test, in_chans = source_data(cfg["source"])
            tgt_train, tgt_test = task(cfg["target"], "target", cfg["where"])
            s.claim_output()
            init = fresh_state(spec, src.num_classes, in_chans, int(pre["seed"]))
            if 0 in cfg["checkpoints"]:
                states[0] = init

            def keep(epoch: int, model: Any) -> bool:
                if epoch + 1 in cfg["checkpoints"]:
                    states[epoch + 1] = state_of(model)
                return False

            train_from(spec, init, src, pre, int(pre["seed"]), in_chans=in_chans, on_epoch=keep)
            src_ev = s.evaluator(spec, src.num_classes, in_chans, src_test)
            for e, sd in states.items():
                s.save(f"pretrain-epoch-{e}", sd)
        final = states[list(cfg["checkpoints"])[-1]]
        pre_rows = {}
        for e, sd in states.items():
            c = interpolation_curve(sd, final, src_ev, steps=int(an["steps"]), progress=False)
            pre_rows[e] = {"source_accuracy": c.series(src_test.name, "accuracy")[0],
                           "barrier_to_final": c.barriers[src_test.name]["error"]["chord"]}
        s.lap("pretrain", t0)
        s.note(("published start points" if src is None else f"pre-trained {pre['epochs']} epochs")
               + "; source accuracy by epoch: "
               + ", ".join(f"{e}: {r['source_accuracy']:.3f}" for e, r in pre_rows.items()))

        t1 = time.perf_counter()
        k = tgt_train.num_classes
        template, pt_start = pt_setup(cfg, k, in_chans)
        has_bn = has_batchnorm(template)
        protocols = {p: tgt_train if p == "re-estimated" else None for p in bn_protocols(an, template)}
        ev = s.evaluator(spec, k, in_chans, tgt_test)
        starts = {e: _finetune_from(s, e, pt_start(sd), src is None, tgt_train, tgt_test, in_chans, protocols, ev)
                  | pre_rows[e] for e, sd in states.items()}
        s.lap("finetune", t1)

    findings, summary = _findings(starts, seeds, an, list(protocols), n_test=len(tgt_test))
    rows = [[e, seed, st["accuracy"][str(seed)], st["l2_from_start"][str(seed)], st["source_accuracy"],
             st["barrier_to_final"]] for e, st in starts.items() for seed in seeds]
    s.csv("trajectory.csv", ["start_epoch", "seed", "downstream_accuracy", "l2_from_start", "source_accuracy",
                             "source_barrier_to_final"], rows)
    s.csv("trajectory_pairs.csv", ["start_epoch", "pair", "l2", *[f"barrier_{p}" for p in protocols]],
          [[e, f"{p['pair'][0]}–{p['pair'][1]}", p["l2"], *[p[f"barrier_{q}"] for q in protocols]]
           for e, st in starts.items() for p in st["pairs"]])
    _plot(starts, summary, list(protocols), s.figure("trajectory.png"), force)
    for f in findings:
        f["figures"] = list(s.figures)
    results = {"data": {"source": len(src) if src is not None else None, "source_test": len(src_test),
                        "target_train": len(tgt_train), "target_test": len(tgt_test)},
               "has_batchnorm": has_bn, "protocols": list(protocols),
               "starts": {str(e): st for e, st in starts.items()}, **summary}
    return s.finish(findings, results, _render(cfg, results, findings))


def _finetune_from(s: Any, e: int, start: dict, published_start: bool, tgt_train: Any, tgt_test: Any,
                   in_chans: int, protocols: dict, ev: Any) -> dict:
    """Fine-tune from one start point with every seed; the models' accuracies, their distances from the start and
    the barriers and distances within pairs of them."""
    from ..analysis.distance import distance
    from ..eval.train import accuracy
    cfg, spec, seeds, device = s.cfg, s.cfg["model"], s.seeds, s.device
    if published_start:
        s.save(f"start-epoch-{e}", start)  # the published weights with the one random head
    tuned = {}
    accs = {}
    for seed in seeds:
        m, _ = train_from(spec, start, tgt_train, cfg["finetune"], seed, in_chans=in_chans, device=device)
        tuned[seed] = state_of(m)
        accs[seed] = accuracy(m, tgt_test, device=device)
        s.save(f"finetuned-from-{e}-seed-{seed}", tuned[seed])
    pairs = []
    for a, b in itertools.combinations(seeds, 2):
        entry: dict[str, Any] = {"pair": [a, b], "l2": distance(tuned[a], tuned[b])["total"]["l2"]}
        for p, fix in protocols.items():
            entry[f"barrier_{p}"] = error_barrier(tuned[a], tuned[b], ev, tgt_test, cfg["analysis"]["steps"], fix)
        pairs.append(entry)
    s.note(f"start epoch {e}: accuracy " + ", ".join(f"{a:.3f}" for a in accs.values()) + "; barrier "
           + ", ".join(f"{p['barrier_stored']:.3f}" for p in pairs))
    return {"accuracy": {str(x): accs[x] for x in seeds}, "pairs": pairs,
            "l2_from_start": {str(x): distance(start, tuned[x])["total"]["l2"] for x in seeds}}


def _findings(starts: dict[int, dict], seeds: list[int], an: dict, protocols: list[str],
              n_test: int | None = None) -> tuple[list, dict]:
    """(a) the first start point whose accuracy shortfall to the last lies below ``within`` (and every later one's
    too); (b) the barrier between fine-tuned pairs from that start point below ``no_barrier_below``, under each
    protocol, jackknifed over the fine-tuning seeds the pairs share. Pure: per-seed and per-pair numbers in."""
    within, tol = float(an["within"]), float(an["no_barrier_below"])
    epochs = list(starts)
    last = epochs[-1]
    acc = {e: [starts[e]["accuracy"][str(x)] for x in seeds] for e in epochs}
    shortfall = {e: check(f"shortfall_{e}", acc[last], acc[e], within, "below", n_test=n_test,
                          what=f"accuracy(start {last}) − accuracy(start {e})") for e in epochs[:-1]}
    first = None
    for e in reversed(epochs[:-1]):  # walk back from the end while every start point suffices
        if shortfall[e]["verdict"] != "reproduced":
            break
        first = e
    if first is not None:
        verdict_a = "reproduced"
    elif all(c["verdict"] == "not reproduced" for c in shortfall.values()):
        verdict_a = "not reproduced"
    else:
        verdict_a = "inconclusive"
    fmt = lambda e: fmt_interval(t_interval(acc[e]))  # noqa: E731
    text_a = ("Downstream test accuracy by start epoch: " + "; ".join(f"{e}: {fmt(e)}" for e in epochs)
              + f". Shortfall to the last start point ({last}), paired by fine-tuning seed, needs its 95% t-interval "
              f"below {within:g} to suffice, for that start point and every later one: "
              + "; ".join(c["text"] for c in shortfall.values()) + ". "
              + (f"The first such start point is epoch {first} of {last}." if first is not None
                 else "No start point before the last suffices."))
    barriers = {p: {e: [q[f"barrier_{p}"] for q in starts[e]["pairs"]] for e in epochs} for p in protocols}
    basin_at = first if first is not None else last
    units = [q["pair"] for q in starts[basin_at]["pairs"]]
    checks_b = {p: check(f"barrier_{p}_{basin_at}", barriers[p][basin_at], None, tol, "below", units=units,
                         n_test=n_test, what=f"barrier between fine-tuned pairs from epoch {basin_at} ({PROTOCOLS[p]})")
                for p in protocols}
    verdict_b = by_protocol({p: c["verdict"] for p, c in checks_b.items()}) if first is not None else "inconclusive"
    pre = ", ".join(f"{e}: {starts[e]['barrier_to_final']:.4f}" for e in epochs)
    text_b = ("Error barrier between pairs of models fine-tuned from the same start point (target test set, chord), "
              "by start epoch: " + "; ".join(
                  f"{p}: " + ", ".join(f"{e}: {fmt_interval(t_interval(barriers[p][e]))}" for e in epochs)
                  for p in protocols)
              + f". Judged at the first sufficient start point ({basin_at}); needs the interval (jackknife over the "
              f"{len(seeds)} fine-tuned models the pairs share, widened by the test set's noise) below {tol:g}: "
              + "; ".join(c["text"] for c in checks_b.values()) + "."
              + ("" if first is not None else " No start point before the last suffices, so the finding is not "
                 "tested.")
              + f" Source-task error barrier between each checkpoint and the final pre-trained model (one "
              f"pre-training run, no interval): {pre}.")
    findings = [
        {"id": "a", "claim": "Fine-tuning from a checkpoint before the end of pre-training reaches the same "
                             "downstream accuracy as fine-tuning from the final one.", "verdict": verdict_a,
         "numbers": text_a, "table": "trajectory.csv",
         "sub_verdicts": {f"start {e}": c["verdict"] for e, c in shortfall.items()}},
        {"id": "b", "claim": "From that checkpoint on, models fine-tuned from it share one basin (no barrier "
                             "between them).", "verdict": verdict_b, "numbers": text_b,
         "table": "trajectory_pairs.csv", "sub_verdicts": {p: c["verdict"] for p, c in checks_b.items()}},
    ]
    summary = {"first_sufficient": first, "checks": {"a": shortfall, "b": checks_b},
               "accuracy": {str(e): t_interval(acc[e]).to_dict() for e in epochs},
               "barrier": {p: {str(e): t_interval(barriers[p][e]).to_dict() for e in epochs} for p in protocols},
               "l2": {str(e): t_interval([q["l2"] for q in starts[e]["pairs"]]).to_dict() for e in epochs},
               "sub_verdicts": {"a": {str(e): c["verdict"] for e, c in shortfall.items()},
                                "b": {p: c["verdict"] for p, c in checks_b.items()}},
               "within": within, "no_barrier_below": tol}
    return findings, summary


def _plot(starts: dict, summary: dict, protocols: list[str], path: Any, force: bool) -> None:
    from ..report import COLORS, new_figure, save_figure
    fig, (ax1, ax2, ax3) = new_figure(ncols=3, size=(4.5, 3.8))
    epochs = list(starts)
    xs = list(range(len(epochs)))

    def band(ax: Any, ivs: list[dict], color: str, label: str) -> None:
        m = [d["mean"] for d in ivs]
        ax.plot(xs, m, marker="o", color=color, label=label)
        lo = [d["low"] if d["n"] > 1 else d["mean"] for d in ivs]
        hi = [d["high"] if d["n"] > 1 else d["mean"] for d in ivs]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2)

    band(ax1, [summary["accuracy"][str(e)] for e in epochs], COLORS[0], "fine-tuned")
    ax1.plot(xs, [starts[e]["source_accuracy"] for e in epochs], color=COLORS[7], linestyle="--",
             label="checkpoint on the source task")
    ax1.set_ylabel("test accuracy")
    for i, p in enumerate(protocols):
        band(ax2, [summary["barrier"][p][str(e)] for e in epochs], COLORS[1 + i], f"fine-tuned pairs ({p} BN)")
    ax2.plot(xs, [starts[e]["barrier_to_final"] for e in epochs], color=COLORS[7], linestyle="--",
             label="checkpoint → final (source task)")
    ax2.set_ylabel("error barrier")
    band(ax3, [summary["l2"][str(e)] for e in epochs], COLORS[3], "fine-tuned pairs")
    ax3.set_ylabel("L2 distance")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(xs)
        ax.set_xticklabels([str(e) for e in epochs])
        ax.set_xlabel("pre-training epoch of the start point")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fine-tuning from pre-training checkpoints (mean ± 95% t-interval over seeds)", fontsize=10)
    save_figure(fig, path, force=force)


def _render(cfg: dict, results: dict, findings: list[dict]) -> str:
    from ..report import markdown_table
    pre, ft, d = cfg["pretrain"], cfg["finetune"], results["data"]
    cps = cfg["checkpoints"]
    setup = [("Start points: the published weights " + ", ".join(f"`{c}` ({e} epochs)" for e, c in cps.items())
              + f" (not pre-trained here); source task scored on `{cfg['source']['test']}` ({d['source_test']} "
              "images)." if isinstance(cps, dict) else
              f"Source: `{cfg['source']['train']}` ({d['source']} images), pre-trained once (seed {pre['seed']}) for "
              f"{pre['epochs']} epochs, SGD lr {pre['lr']} (cosine over all epochs), batch {pre['batch_size']}; "
              f"checkpoints after epochs {cps} (0: the random initialisation)."),
             f"Target: `{cfg['target']['spec']}`" + (f", relabelled {cfg['target']['relabel']}"
                                                    if cfg['target'].get('relabel') else "")
             + f", {d['target_train']} training / {d['target_test']} test images.",
             f"Fine-tuning: from each checkpoint with the modules {cfg['reset']} replaced by one random head (seed "
             f"{cfg['head_seed']}), {ft['epochs']} epochs, lr {ft['lr']}, batch {ft['batch_size']}, augment "
             f"{ft['augment']}; data-order seeds {cfg['seeds']}.",
             "Barriers: chord error barrier on the target test set, "
             f"{cfg['analysis']['steps']} points, " + " and ".join(PROTOCOLS[p] for p in results["protocols"]) + "."]
    iv = lambda x: fmt_interval(Interval(x["mean"], x["low"], x["high"], x["n"], x["level"]))  # noqa: E731
    rows = [[e, st["source_accuracy"], st["barrier_to_final"], iv(results["accuracy"][e]),
             *[iv(results["barrier"][p][e]) for p in results["protocols"]], iv(results["l2"][e])]
            for e, st in results["starts"].items()]
    body = ["## Start points", "", markdown_table(
        ["start epoch", "source accuracy", "source barrier to final", "downstream accuracy",
         *[f"pair barrier ({p})" for p in results["protocols"]], "pair L2"], rows)]
    return render_report(cfg, setup, body, findings)


register_recipe(KIND, "Which pre-training checkpoint to fine-tune from",
                "acc(fine-tune from checkpoint e) vs acc(from the final checkpoint); barrier and L2 within pairs",
                "one pre-training run with checkpoints along it; several fine-tuning seeds from each; downstream "
                "accuracy, barriers and distances per start point",
                TRANSFER_PAPER, DEFAULTS, run_trajectory_recipe)
