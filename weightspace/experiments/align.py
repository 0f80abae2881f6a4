"""Recipe kind ``align-barrier``: does permutation alignment (Git Re-Basin) + BatchNorm repair remove the error
barrier between two networks trained from different random initialisations?

Two (or more) models of one architecture are trained on the same data from different random initialisations
and data orders. For every pair (A, B), B is aligned to A by weight matching and/or activation matching, and
barrier curves A–B and A–P(B) are measured on the test set with each BatchNorm treatment:

- ``none``            the interpolated running statistics, as they are;
- ``recalibrate_bn``  BatchNorm statistics re-estimated on the ``fix`` data at every α;
- ``repair``          REPAIR (Jordan et al. 2022) on the ``fix`` data at every α (weightspace.eval.repair).

Findings: (a) the unaligned pair shows a clear error barrier (≥ ``clear_barrier``) under the BN treatments;
(b) after alignment (+ a BN treatment) the barrier shrinks by at least ``shrink`` (½) of itself. The barrier is
the chord error barrier on the test set: max over α of the error above the straight line between the ends.

Run with ``weightspace recipe run recipes/align-barrier.yaml --out DIR [--small] [--set KEY=VALUE]``; the runner
is reached from ``weightspace.experiments.runner.run_recipe`` through the recipe's ``kind`` (the registry).
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from ..report.stats import fmt_interval, t_interval
from ..search.align import REBASIN_PAPER
from .config import load_kind_recipe
from .kit import Session, open_session, published, register_recipe, state_of, train_from, with_option
from .verdicts import check, combine, has_batchnorm

__all__ = ["KIND", "FIXES", "METHODS", "DEFAULTS", "load_align_recipe", "run_align_recipe", "n_models"]

KIND = "align-barrier"
FIXES = ("none", "recalibrate_bn", "repair")
METHODS = ("weights", "activations")
DEFAULTS: dict[str, Any] = {
    "kind": KIND,
    "name": "align-barrier",
    "description": "",
    "seed": 0,
    "threads": None,
    "model": "weightspace.eval.zoo:small_cnn",
    # source strings of published models of the recipe's architecture (hf-hub:timm/resnet50.tv_in1k, files, ...),
    # each trained from its own random initialisation: used as they are instead of training (train: is unused)
    "models": [],
    "data": {"train": "digits:train", "test": "digits:test", "fix": None},
    "train": {"epochs": 20, "lr": 0.05, "batch_size": 32, "weight_decay": 0.0, "momentum": 0.9, "augment": "none",
              "seeds": [1, 2]},
    "analysis": {"steps": 11, "methods": list(METHODS), "fixes": list(FIXES), "clear_barrier": 0.1, "shrink": 0.5,
                 "align_seed": 0},
    # (c) the width sweep: the same training, alignment (first method) and barriers (first BN fix other than
    # 'none') for the model at each width; the claim is that alignment removes more of the barrier when wider
    "width_sweep": {"widths": [], "param": "width"},
    "small": {},
}


def load_align_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                      overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read an align-barrier recipe, apply its ``small:`` overrides (when asked) and KEY=VALUE overrides.

    Raises:
        ConfigError: unreadable or malformed recipe: another kind, an unknown key, fewer than three seeds or
            published models, a width sweep of published models, or an unknown method or fix."""
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides, seeds_key=None)
    where = cfg["where"]
    seeds = cfg["train"]["seeds"]
    models = cfg["models"]
    if models:
        if not isinstance(models, list) or len(set(map(str, models))) < 3 or len(set(models)) != len(models):
            raise ConfigError(f"{where}: models needs at least three different sources (verdicts rest on 95% "
                              "t-intervals over pairs)")
        if cfg["width_sweep"]["widths"]:
            raise ConfigError(f"{where}: width_sweep trains models at each width; it cannot be run on published "
                              "models (set width_sweep.widths: [])")
        if not (cfg["data"]["fix"] or cfg["data"]["train"]):
            raise ConfigError(f"{where}: data.fix is needed (BN recalibration, REPAIR, activation matching)")
    elif not isinstance(seeds, list) or len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: train.seeds needs at least three different seeds (one random init per model; "
                          "verdicts rest on 95% t-intervals over pairs)")
    widths = cfg["width_sweep"]["widths"]
    if not isinstance(widths, list) or len(widths) == 1 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"{where}: width_sweep.widths needs two or more positive integers (or none)")
    an = cfg["analysis"]
    bad = [m for m in an["methods"] if m not in METHODS] + [f for f in an["fixes"] if f not in FIXES]
    if bad:
        raise ConfigError(f"{where}: analysis: unknown method/fix '{bad[0]}' (methods: {', '.join(METHODS)}; "
                          f"fixes: {', '.join(FIXES)})")
    if not an["methods"] or not an["fixes"]:
        raise ConfigError(f"{where}: analysis needs at least one method and one fix")
    return cfg


def _curve_entry(c: Any, test: str) -> dict:
    e, loss = c.barriers[test]["error"], c.barriers[test]["loss"]
    ends = c.series(test, "error")
    return {"error_barrier": e["chord"], "error_barrier_peak_over_ends": e["peak_over_ends"], "peak_alpha": e["chord_peak_alpha"],
            "loss_barrier": loss["chord"], "error_at_ends": [ends[0], ends[-1]], "errors": ends}


def run_align_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                     overrides: Sequence[str] = (), force: bool = False, progress: bool = True, device: str = "cpu",
                     batch_size: int = 256) -> dict:
    """Train the models, align, measure the barriers before/after; write checkpoints/, results.json, CSV, PNGs,
    REPORT.md. Returns {"findings", "timings", "out"} like every recipe kind.

    Raises:
        ConfigError: a malformed recipe or data spec.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from ..analysis.curve import CurveSet

    s = open_session(load_align_recipe, recipe, out, small=small, overrides=overrides, force=force,
                     progress=progress, device=device, batch_size=batch_size)
    cfg = s.cfg
    an = cfg["analysis"]
    with s.threads() as t0:
        m = _models(s)
        s.lap("train", t0)
        s.note(f"{'loaded' if cfg['models'] else 'trained'} {len(m.models)} models from random inits "
               f"({s.timings['train']:.1f} s): " + ", ".join(f"{n} test accuracy {a:.4f}" for n, a in m.accs.items()))
        fixes = [f for f in an["fixes"] if m.has_bn or f != "recalibrate_bn"]
        t1 = time.perf_counter()
        pairs, rows, curves_by_fix = _pair_barriers(s, m, fixes)
        s.lap("barriers", t1)
        sweep = None
        if cfg["width_sweep"]["widths"]:
            t2 = time.perf_counter()
            sweep = _width_sweep(s, m, fixes, pairs)
            s.lap("width_sweep", t2)
    figures = []
    for f, cs in curves_by_fix.items():
        CurveSet(cs).plot(s.figure(f"barriers_{f}.png"), force=s.force)
        figures.append(f"barriers_{f}.png")
    s.csv("barriers.csv", ["pair", "curve", "fix", "error_barrier", "error_barrier_peak_over_ends", "loss_barrier",
                           "peak_alpha", "error_alpha0", "error_alpha1"], rows)
    findings, summary = _findings(pairs, an, fixes, m.has_bn, figures, n_test=len(m.test))
    if sweep is not None:
        s.csv("width_sweep.csv", ["width", "pair", "fix", "method", "before", "after"], sweep["rows"])
        findings.append(_width_finding(sweep, cfg, n_test=len(m.test)))
    results = {"models": {n: {"test_accuracy": a} for n, a in m.accs.items()}, "pairs": pairs, "summary": summary,
               "fixes": fixes, **({"width_sweep": {k: v for k, v in sweep.items() if k != "rows"}} if sweep else {})}
    return s.finish(findings, results, _render(cfg, m.test, m.fix, m.accs, pairs, findings, fixes, m.has_bn))


@dataclass
class _Models:
    """The recipe's models and what the barriers need: their data, a builder of the architecture, an evaluator."""

    models: dict[str, dict]
    accs: dict[str, float]
    train: Any
    test: Any
    fix: Any
    build: Callable[[], torch.nn.Module]
    has_bn: bool
    ev: Any


def _models(s: Session) -> _Models:
    """Train the recipe's models (one random init and data order per seed) or read the published ones; score them
    on the test set."""
    from ..eval.data import load_data
    from ..eval.modules import build_model_for
    from ..eval.train import accuracy
    cfg, tr = s.cfg, s.cfg["train"]
    models: dict[str, dict] = {}
    accs: dict[str, float] = {}
    if cfg["models"]:  # published models: sized by the first one, data decoded with its eval transform
        train_d, test_d, fix_d, build = _published(cfg, models)
        in_chans = None
        s.claim_output()
    else:
        train_d, test_d = load_data(cfg["data"]["train"]), load_data(cfg["data"]["test"])
        fix_d = load_data(cfg["data"]["fix"]) if cfg["data"]["fix"] else train_d
        s.claim_output()
        k, in_chans = train_d.num_classes, (int(train_d.x.shape[1]) if train_d.x.dim() == 4 else None)

        def build() -> torch.nn.Module:
            return build_model_for(cfg["model"], num_classes=k, in_chans=in_chans)

    has_bn = has_batchnorm(build())
    for seed in ([] if cfg["models"] else tr["seeds"]):
        # the global RNG restarts from the model's seed, which also draws its random initialisation
        torch.manual_seed(int(seed))
        net, _ = train_from(cfg["model"], None, train_d, tr, int(seed), in_chans=in_chans)
        name = f"model-{seed}"
        models[name] = state_of(net)
        accs[name] = accuracy(net, test_d)
        s.save(name, models[name])
    ev = s.evaluator_of(build(), test_d)
    for name in models:
        if name not in accs:
            accs[name] = ev(models[name])[test_d.name]["accuracy"]
    return _Models(models, accs, train_d, test_d, fix_d, build, has_bn, ev)


def _fix_kw(fix: str, fix_d: Any) -> dict:
    """The interpolation_curve options of a BatchNorm treatment."""
    return {"none": {}, "recalibrate_bn": {"recalibrate_bn": fix_d}, "repair": {"repair": fix_d}}[fix]


def _pair_barriers(s: Session, m: _Models, fixes: list[str]) -> tuple[list[dict], list[list], dict[str, list]]:
    """For every pair (A, B): B aligned to A by each method (saved), and the barrier curves A–B and A–P(B) under
    each BatchNorm treatment. Returns (the pairs' entries, CSV rows, the curves by treatment)."""
    from ..analysis.curve import interpolation_curve
    from ..search.align import align
    an, fix_d = s.cfg["analysis"], m.fix
    pairs, rows, curves_by_fix = [], [], {f: [] for f in fixes}
    for a, b in itertools.combinations(m.models, 2):
        targets = {"B": (b, m.models[b])}
        entry: dict[str, Any] = {"a": a, "b": b, "alignment": {}, "curves": {}}
        for meth in an["methods"]:
            pb, info = align(m.models[a], m.models[b], m.build(), method=meth,
                             data=fix_d if meth == "activations" else None, seed=int(an["align_seed"]),
                             example_input=fix_d.prepare(fix_d.x[:64]))
            aligned = f"{b}-aligned-{meth}-to-{a.split('-', 1)[-1]}"
            s.save(aligned, pb)
            targets[f"P_{meth}(B)"] = (aligned, pb)
            entry["alignment"][meth] = {k: info[k] for k in ("l2_before", "l2_after", "max_abs_output_change")
                                        if k in info}
        for f in fixes:
            entry["curves"][f] = {}
            for tag, (bname, weights) in targets.items():
                label = f"{a}–{bname}" if tag == "B" else f"{a}–P({b}) {tag[2:-3]}"
                c = interpolation_curve(m.models[a], weights, m.ev, steps=int(an["steps"]), label=label,
                                        progress=False, **_fix_kw(f, fix_d))
                entry["curves"][f][tag] = r = _curve_entry(c, m.test.name)
                curves_by_fix[f].append(c)
                rows.append([f"{a}–{b}", tag, f, r["error_barrier"], r["error_barrier_peak_over_ends"],
                             r["loss_barrier"], r["peak_alpha"], *r["error_at_ends"]])
        pairs.append(entry)
        s.note(f"{a}–{b}: " + "; ".join(
            f"{f}: " + ", ".join(f"{t} {v['error_barrier']:.3f}" for t, v in entry["curves"][f].items())
            for f in fixes))
    return pairs, rows, curves_by_fix


def _published(cfg: dict, models: dict) -> tuple[Any, Any, Any, Any]:
    """Load ``cfg['models']`` into ``models`` (name → state dict) and the data for them: (train, test, fix, build).

    The model is sized by the first checkpoint (e.g. 1,000 ImageNet classes); image sources are decoded with its
    eval transform, and a test set with a subset of its classes (wnid folders) is scored on those classes."""
    from ..eval.data import load_data
    from ..eval.modules import build_model_for
    names = {}
    for src in cfg["models"]:
        name = str(src).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or str(src)
        names[name if name not in names else f"{name}-{len(names)}"] = src
    for name, src in names.items():
        models[name] = published(src)
    first = cfg["models"][0]

    def build() -> torch.nn.Module:
        return build_model_for(cfg["model"], first)

    shaper = build()
    test_d = load_data(cfg["data"]["test"], model=shaper)
    fix_d = load_data(cfg["data"]["fix"] or cfg["data"]["train"], model=shaper, map_labels=False)  # labels unused
    return None, test_d, fix_d, build


def _findings(pairs: list[dict], an: dict, fixes: list[str], has_bn: bool, figures: list[str],
              n_test: int | None = None) -> tuple[list, dict]:
    """(a) a clear barrier before alignment; (b) the barrier at least halved after it, per method and BN fix —
    each judged on a jackknife interval over the models the pairs share (widened by the test set's noise); a
    refuted method or fix refutes the finding. Pure: per-pair numbers in."""
    units = [[p["a"], p["b"]] for p in pairs]
    judged = [f for f in fixes if f != "none"] or ["none"]  # interpolating BN nets without a fix is not the claim
    clear, shrink = float(an["clear_barrier"]), float(an["shrink"])
    before = {f: [p["curves"][f]["B"]["error_barrier"] for p in pairs] for f in fixes}
    after = {f: {m: [p["curves"][f][f"P_{m}(B)"]["error_barrier"] for p in pairs] for m in an["methods"]} for f in fixes}
    checks_a = {f: check(f"a_{f}", before[f], None, clear, "above", units=units, n_test=n_test,
                         what=f"barrier before alignment ({f})")
                for f in judged}
    # (b) per pair: shrink·before − after > 0 means the barrier fell to at most `shrink` of itself
    checks_b = {f"{f}+{m}": check(f"b_{f}_{m}", [shrink * y for y in before[f]], after[f][m], 0.0, "above",
                                  units=units, n_test=n_test, what=f"{shrink}·before − after ({f} + {m} matching)")
                for f in judged for m in an["methods"]}
    summary = {"judged_fixes": judged, "clear_barrier": clear, "shrink": shrink, "before": before, "after": after,
               "ratio": {f: {m: [(x / y if y > 0 else None) for x, y in zip(after[f][m], before[f])]
                             for m in an["methods"]} for f in fixes},
               "checks": {"a": checks_a, "b": checks_b}}
    n = len(pairs)
    caveat = (f" Over {n} pairs of {n_models(n)} models: pairs share models, so each interval is a delete-one-model "
              "jackknife (the model is the unit of replication), widened by the test set's sampling noise.")
    fmt = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
    text_a = ("Error barrier on the test set between two unaligned models (chord height, "
              f"{an['steps']} points), per pair: " + "; ".join(f"{f}: {fmt(before[f])}" for f in fixes)
              + f". The finding needs the 95% t-interval of the barrier above {clear}: "
              + "; ".join(c["text"] for c in checks_a.values()) + "." + caveat)
    if not has_bn:
        text_a += " The model has no BatchNorm, so BN recalibration is not applicable."
    lines = []
    for f in fixes:
        for m in an["methods"]:
            lines.append(f"{f} + {m} matching: {fmt(before[f])} → {fmt(after[f][m])}")
    text_b = ("Error barrier before → after aligning B to A, with the same BN treatment on both curves: "
              + "; ".join(lines) + f". Judged with {', '.join(judged)}: the 95% t-interval of {shrink}·before − after "
              "must lie above 0: " + "; ".join(c["text"] for c in checks_b.values()) + "."
              + (" Without a BN fix the interpolated running statistics are wrong (variance collapse) and the "
                 "'none' rows show it." if "none" in fixes and has_bn else "") + caveat)
    findings = [
        {"id": "a", "claim": "Two models trained from different random initialisations show a clear error barrier.",
         "verdict": combine([c["verdict"] for c in checks_a.values()]), "numbers": text_a, "figures": figures,
         "table": "barriers.csv", "sub_verdicts": {k: c["verdict"] for k, c in checks_a.items()}},
        {"id": "b", "claim": f"After permutation alignment (+ BatchNorm repair) the barrier shrinks by at least "
                             f"{round((1 - shrink) * 100)}%.",
         "verdict": combine([c["verdict"] for c in checks_b.values()]), "numbers": text_b, "figures": figures,
         "table": "barriers.csv", "sub_verdicts": {k: c["verdict"] for k, c in checks_b.items()}},
    ]
    return findings, summary


def n_models(pairs: int) -> int:
    """How many models give ``pairs`` unordered pairs."""
    n = 1
    while n * (n - 1) // 2 < pairs:
        n += 1
    return n


def _width_sweep(s: Session, m: _Models, fixes: list[str], pairs: list[dict]) -> dict:
    """Train the seeds' models at every width, align B to A (first method) and measure before/after barriers
    with the first BN fix other than 'none' (or 'none' when it is the only one). The recipe's own model is not
    trained twice: at its width the main run's barriers are reused (same seeds, same training)."""
    from urllib.parse import parse_qsl

    from ..analysis.curve import interpolation_curve
    from ..eval.modules import build_model_for
    from ..eval.train import accuracy
    from ..search.align import align
    cfg = s.cfg
    an, tr, ws = cfg["analysis"], cfg["train"], cfg["width_sweep"]
    fix = next((f for f in fixes if f != "none"), fixes[0])
    method = an["methods"][0]
    kw = _fix_kw(fix, m.fix)
    k = m.train.num_classes
    in_chans = int(m.train.x.shape[1]) if m.train.x.dim() == 4 else None
    out: dict[str, Any] = {"fix": fix, "method": method, "param": ws["param"], "widths": {}, "rows": []}
    for w in ws["widths"]:
        spec = with_option(cfg["model"], ws["param"], int(w))
        if dict(parse_qsl(cfg["model"].partition("?")[2])).get(ws["param"]) == str(w):
            before = [p["curves"][fix]["B"]["error_barrier"] for p in pairs]
            after = [p["curves"][fix][f"P_{method}(B)"]["error_barrier"] for p in pairs]
            out["rows"] += [[w, f"{p['a']}–{p['b']}", fix, method, x, y] for p, x, y in zip(pairs, before, after)]
            out["widths"][str(w)] = {"model": cfg["model"], "before": before, "after": after, "reused": True,
                                     "removed": [x - y for x, y in zip(before, after)]}
            continue
        models, accs = {}, {}
        for seed in tr["seeds"]:
            torch.manual_seed(int(seed))  # as in the main run: the seed draws the init
            net, _ = train_from(spec, None, m.train, tr, int(seed), in_chans=in_chans)
            models[seed] = state_of(net)
            accs[seed] = accuracy(net, m.test)
        ev = s.evaluator(spec, k, in_chans, m.test)
        before, after = [], []
        for a, b in itertools.combinations(models, 2):
            pb, _ = align(models[a], models[b], build_model_for(spec, num_classes=k, in_chans=in_chans),
                          method=method, data=m.fix if method == "activations" else None,
                          seed=int(an["align_seed"]), example_input=m.fix.x[:64])
            cb = interpolation_curve(models[a], models[b], ev, steps=int(an["steps"]), progress=False, **kw)
            ca = interpolation_curve(models[a], pb, ev, steps=int(an["steps"]), progress=False, **kw)
            before.append(cb.barriers[m.test.name]["error"]["chord"])
            after.append(ca.barriers[m.test.name]["error"]["chord"])
            out["rows"].append([w, f"model-{a}–model-{b}", fix, method, before[-1], after[-1]])
        out["widths"][str(w)] = {"model": spec, "test_accuracy": accs, "before": before, "after": after,
                                 "removed": [x - y for x, y in zip(before, after)]}
        s.note(f"width {w}: barrier {', '.join(f'{x:.3f}' for x in before)} → {', '.join(f'{y:.3f}' for y in after)}")
    return out


def _width_finding(sweep: dict, cfg: dict, n_test: int | None = None) -> dict:
    """(c) alignment leaves less of the barrier at the largest width than at the smallest (paired by seed pair,
    jackknifed over the seeds the pairs share)."""
    ws = [str(w) for w in cfg["width_sweep"]["widths"]]
    narrow, wide = sweep["widths"][ws[0]], sweep["widths"][ws[-1]]
    # both widths list their pairs in itertools.combinations order over the same seeds
    units = list(itertools.combinations(range(n_models(len(narrow["after"]))), 2))
    # the barrier left after alignment, narrowest − widest: above 0 when width helps alignment
    c = check("width", narrow["after"], wide["after"], 0.0, "above", units=units, n_test=n_test,
              what=f"barrier after alignment at {sweep['param']} {ws[0]} − at {ws[-1]}")
    sweep["check"] = c
    text = (f"With {sweep['fix']} and {sweep['method']} matching, error barrier before → after alignment per width "
            "(mean over pairs): " + "; ".join(
                f"{w}: {fmt_interval(t_interval(sweep['widths'][w]['before']))} → "
                f"{fmt_interval(t_interval(sweep['widths'][w]['after']))}" for w in ws)
            + f". The finding needs the 95% interval of the paired difference (jackknife over the seeds the pairs "
            f"share, widened by the test set's noise) above 0: {c['text']}.")
    return {"id": "c", "claim": "Alignment removes more of the barrier for wider models (Ainsworth et al.: the "
            "barrier vanishes only at sufficient width).", "verdict": c["verdict"], "numbers": text,
            "figures": [], "table": "width_sweep.csv"}


def _render(cfg: dict, test_d: Any, fix_d: Any, accs: dict, pairs: list[dict], findings: list[dict],
            fixes: list[str], has_bn: bool) -> str:
    from ..report import markdown_table
    tr, an = cfg["train"], cfg["analysis"]
    trained_on = "" if cfg["models"] else f"trained on `{cfg['data']['train']}`, "
    lines = [f"# {cfg['name']}", ""]
    if cfg["description"]:
        lines += [cfg["description"].strip(), ""]
    lines += ["## Setup", "",
              f"- Model: `{cfg['model']}`{' (with BatchNorm)' if has_bn else ' (no BatchNorm)'}; recipe "
              f"`{cfg['where']}`{' (reduced size: --small)' if cfg.get('small_run') else ''}.",
              f"- Data: {trained_on}barriers on `{test_d.name}` ({len(test_d)} examples); BN recalibration, REPAIR "
              f"and activation matching use `{fix_d.name}` ({len(fix_d)} examples).",
              (f"- Models: the published weights {', '.join(f'`{m}`' for m in cfg['models'])}, each trained from its "
               "own random initialisation (not trained here)." if cfg["models"] else
               f"- Training: {tr['epochs']} epochs, SGD lr {tr['lr']} (cosine), momentum {tr['momentum']}, batch "
               f"{tr['batch_size']}, weight decay {tr['weight_decay']}, augment {tr['augment']}; one model per seed "
               f"({', '.join(str(s) for s in tr['seeds'])}), the seed setting both the random init and the data order."),
              f"- Alignment: {', '.join(an['methods'])} matching (Git Re-Basin), B permuted to match A; curves of "
              f"{an['steps']} points; barrier = chord error barrier (max over α of the test error above the line "
              "between the ends; the peak over the ends' mean, Frankle et al.'s convention, is in barriers.csv).", "",
              markdown_table(["model", "test accuracy"], [[n, a] for n, a in accs.items()]), "",
              "## Barriers", ""]
    headers = ["pair", "curve", *fixes]
    rows = []
    for p in pairs:
        for tag in p["curves"][fixes[0]]:
            rows.append([f"{p['a']}–{p['b']}", tag, *[p["curves"][f][tag]["error_barrier"] for f in fixes]])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    means = [[m, f, mean([p["curves"][f]["B"]["error_barrier"] for p in pairs]),
              mean([p["curves"][f][f"P_{m}(B)"]["error_barrier"] for p in pairs])] for m in an["methods"] for f in fixes]
    lines += ["Error barrier (test set, chord) by BatchNorm treatment:", "", markdown_table(headers, rows), "",
              f"Mean over the {len(pairs)} pair{'s' if len(pairs) > 1 else ''}, before (A–B) → after (A–P(B)):", "",
              markdown_table(["alignment", "BN treatment", "before", "after", "after / before"],
                             [[m, f, b, a, a / b if b > 0 else None] for m, f, b, a in means]), "",
              "## Findings", "", markdown_table(["finding", "verdict"], [[f["id"], f["verdict"]] for f in findings]), ""]
    for f in findings:
        lines += [f"### ({f['id']}) {f['claim']}", "", f"**{f['verdict'].upper()}.** {f['numbers']}", ""]
    lines.insert(lines.index("## Findings") + 2, "A check is *reproduced* only when the 95% interval of its "
                 "quantity (a jackknife over the models the pairs share, widened by the test set's noise) lies "
                 "entirely beyond the threshold its text names; *not reproduced* when it lies entirely on the other "
                 "side; *inconclusive* when it straddles it. A finding is *not reproduced* when any BatchNorm "
                 "treatment or method refutes it, *partly* when some reproduce it and none refutes it.\n")
    lines += [f"![{fig}]({fig})" for fig in findings[0]["figures"]]
    lines += ["", "Checkpoints of both models and of every aligned B are in `checkpoints/` (any `weightspace "
              "interpolate` / `soup` command accepts them); every number is in `results.json` and `barriers.csv`.", ""]
    return "\n".join(lines)


register_recipe(KIND, "Alignment and the barrier",
                "barrier(A, B) vs barrier(A, P(B)) with stored, re-estimated or REPAIRed BatchNorm statistics",
                "two models trained from different random initialisations, B aligned to A (Git Re-Basin), barrier "
                "curves before and after alignment under each BatchNorm treatment",
                REBASIN_PAPER, DEFAULTS, run_align_recipe)
