"""Recipe kind ``align-barrier``: does permutation alignment (Git Re-Basin) + BatchNorm repair remove the error
barrier between two networks trained from different random initialisations?

Two (or more) models of one architecture are trained on the same data from different random initialisations
and data orders. For every pair (A, B), B is aligned to A by weight matching and/or activation matching, and
barrier curves A–B and A–P(B) are measured on the test set with each BatchNorm treatment:

- ``none``            the interpolated running statistics, as they are;
- ``recalibrate_bn``  BatchNorm statistics re-estimated on the ``fix`` data at every α;
- ``repair``          REPAIR (Jordan et al. 2022) on the ``fix`` data at every α (weightspace.eval.fixes).

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
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..report.stats import fmt_interval, t_interval
from ..search.align import REBASIN_PAPER
from .kit import register_recipe
from .verdicts import check, combine

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
    """Read an align-barrier recipe, apply its ``small:`` overrides (when asked) and KEY=VALUE overrides."""
    from .recipes import overlay_recipe, read_recipe
    raw, where = read_recipe(source)
    if raw.get("kind") != KIND:
        raise ConfigError(f"{where}: not an {KIND} recipe (kind: {KIND})")
    cfg = overlay_recipe(raw, where, DEFAULTS, small=small, overrides=overrides)
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
    cfg["where"] = where
    return cfg


def _curve_entry(c: Any, test: str) -> dict:
    e, loss = c.barriers[test]["error"], c.barriers[test]["loss"]
    ends = c.series(test, "error")
    return {"error_barrier": e["chord"], "error_barrier_midpoint": e["midpoint"], "peak_alpha": e["chord_peak_alpha"],
            "loss_barrier": loss["chord"], "error_at_ends": [ends[0], ends[-1]], "errors": ends}


def run_align_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                     overrides: Sequence[str] = (), force: bool = False, progress: bool = True, device: str = "cpu",
                     batch_size: int = 256) -> dict:
    """Train the models, align, measure the barriers before/after; write checkpoints/, results.json, CSV, PNGs,
    REPORT.md. Returns {"findings", "timings", "out"} like ``recipes.run_transfer_recipe``."""
    from .. import report
    from ..search.align import align
    from ..eval.data import load_data
    from ..eval.evaluator import Evaluator
    from ..analysis.curve import CurveSet, interpolation_curve
    from ..eval.models import build_model
    from ..io.save import save
    from ..eval.train import accuracy, train

    cfg = load_align_recipe(recipe, small=small, overrides=overrides)
    cfg["small_run"] = small
    out = Path(out)
    report.check_outputs(out, ["results.json", "REPORT.md"], force)
    an, tr = cfg["analysis"], cfg["train"]

    def note(msg: str) -> None:
        if progress:
            import sys
            print(f"[recipe] {msg}", file=sys.stderr, flush=True)

    old_threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            models, paths, accs = {}, {}, {}
            if cfg["models"]:  # published models: sized by the first one, data decoded with its eval transform
                train_d, test_d, fix_d, build = _published(cfg, models)
            else:
                train_d, test_d = load_data(cfg["data"]["train"]), load_data(cfg["data"]["test"])
                fix_d = load_data(cfg["data"]["fix"]) if cfg["data"]["fix"] else train_d
                k = train_d.num_classes

                def build() -> torch.nn.Module:
                    return build_model(cfg["model"], num_classes=k,
                                       in_chans=int(train_d.x.shape[1]) if train_d.x.dim() == 4 else None)

            has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build().modules())
            fixes = [f for f in an["fixes"] if has_bn or f != "recalibrate_bn"]
            for s in ([] if cfg["models"] else tr["seeds"]):
                torch.manual_seed(int(s))  # a different random initialisation per model
                net = build()
                train(net, train_d, epochs=int(tr["epochs"]), lr=float(tr["lr"]), batch_size=int(tr["batch_size"]),
                      weight_decay=float(tr["weight_decay"]), momentum=float(tr["momentum"]), seed=int(s),
                      augment=tr["augment"])
                name = f"model-{s}"
                models[name] = {k_: v.detach().clone() for k_, v in net.state_dict().items()}
                accs[name] = accuracy(net, test_d)
                paths[name] = _save(save, out, name, models[name], cfg, force)
            timings["train"] = time.perf_counter() - t0
            ev = Evaluator(build(), test_d, device=device, batch_size=batch_size)
            for name in models:
                if name not in accs:
                    accs[name] = ev(models[name])[test_d.name]["accuracy"]
            note(f"{'loaded' if cfg['models'] else 'trained'} {len(models)} models from random inits "
                 f"({timings['train']:.1f} s): " + ", ".join(f"{n} test accuracy {a:.4f}" for n, a in accs.items()))

            t1 = time.perf_counter()
            fix_kw = {"none": {}, "recalibrate_bn": {"recalibrate_bn": fix_d}, "repair": {"repair": fix_d}}
            pairs, rows, curves_by_fix = [], [], {f: [] for f in fixes}
            for a, b in itertools.combinations(models, 2):
                targets = {"B": (b, models[b])}
                entry: dict[str, Any] = {"a": a, "b": b, "alignment": {}, "curves": {}}
                for m in an["methods"]:
                    pb, info = align(models[a], models[b], build(), method=m, data=fix_d if m == "activations" else None,
                                     seed=int(an["align_seed"]), example_input=fix_d.prepare(fix_d.x[:64]))
                    aligned = f"{b}-aligned-{m}-to-{a.split('-', 1)[-1]}"
                    paths[aligned] = _save(save, out, aligned, pb, cfg, force)
                    targets[f"P_{m}(B)"] = (aligned, pb)
                    entry["alignment"][m] = {k_: info[k_] for k_ in ("l2_before", "l2_after", "max_abs_output_change")
                                             if k_ in info}
                for f in fixes:
                    entry["curves"][f] = {}
                    for tag, (bname, weights) in targets.items():
                        label = f"{a}–{bname}" if tag == "B" else f"{a}–P({b}) {tag[2:-3]}"
                        c = interpolation_curve(models[a], weights, ev, steps=int(an["steps"]), label=label,
                                                progress=False, **fix_kw[f])
                        entry["curves"][f][tag] = _curve_entry(c, test_d.name)
                        curves_by_fix[f].append(c)
                        r = entry["curves"][f][tag]
                        rows.append([f"{a}–{b}", tag, f, r["error_barrier"], r["error_barrier_midpoint"],
                                     r["loss_barrier"], r["peak_alpha"], *r["error_at_ends"]])
                pairs.append(entry)
                note(f"{a}–{b}: " + "; ".join(
                    f"{f}: " + ", ".join(f"{t} {v['error_barrier']:.3f}" for t, v in entry["curves"][f].items())
                    for f in fixes))
            timings["barriers"] = time.perf_counter() - t1
            sweep = None
            if cfg["width_sweep"]["widths"]:
                t2 = time.perf_counter()
                sweep = _width_sweep(cfg, train_d, test_d, fix_d, fixes, device, batch_size, note, pairs)
                timings["width_sweep"] = time.perf_counter() - t2
    finally:
        torch.set_num_threads(old_threads)

    figures = []
    for f, cs in curves_by_fix.items():
        name = f"barriers_{f}.png"
        CurveSet(cs).plot(out / name, force=force)
        figures.append(name)
    report.write_csv(out / "barriers.csv", ["pair", "curve", "fix", "error_barrier", "error_barrier_midpoint",
                                            "loss_barrier", "peak_alpha", "error_alpha0", "error_alpha1"],
                     rows, force=force)
    findings, summary = _findings(pairs, an, fixes, has_bn, figures)
    if sweep is not None:
        report.write_csv(out / "width_sweep.csv", ["width", "pair", "fix", "method", "before", "after"],
                         sweep["rows"], force=force)
        findings.append(_width_finding(sweep, cfg))
    timings["total"] = time.perf_counter() - t0
    public = {k_: v for k_, v in cfg.items() if k_ != "where"}
    results = {"recipe": public, "findings": findings,
               "results": {"models": {n: {"test_accuracy": a} for n, a in accs.items()}, "pairs": pairs,
                           "summary": summary, "fixes": fixes,
                           **({"width_sweep": {k_: v for k_, v in sweep.items() if k_ != "rows"}} if sweep else {})},
               "checkpoints": {k_: os.path.relpath(v, out) for k_, v in paths.items()}, "figures": figures}
    report.write_json(out / "results.json", results, force=force)
    report.write_text(out / "REPORT.md", _render(cfg, test_d, fix_d, accs, pairs, findings, fixes, has_bn), force=force)
    report.write_json(out / "timing.json", {"seconds": timings, "threads": torch.get_num_threads()
                                            if not cfg.get("threads") else int(cfg["threads"])}, force=True)
    return {"findings": findings, "timings": timings, "out": str(out)}


def _published(cfg: dict, models: dict) -> tuple[Any, Any, Any, Any]:
    """Load ``cfg['models']`` into ``models`` (name → state dict) and the data for them: (train, test, fix, build).

    The model is sized by the first checkpoint (e.g. 1,000 ImageNet classes); image sources are decoded with its
    eval transform, and a test set with a subset of its classes (wnid folders) is scored on those classes."""
    from ..eval.data import load_data
    from ..eval.modules import build_model_for
    from ..io.sources import load
    names = {}
    for src in cfg["models"]:
        name = str(src).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or str(src)
        names[name if name not in names else f"{name}-{len(names)}"] = src
    for name, src in names.items():
        ck = load(src)
        try:
            models[name] = ck.to_dict()
        finally:
            ck.close()
    first = cfg["models"][0]

    def build() -> torch.nn.Module:
        return build_model_for(cfg["model"], first)

    shaper = build()
    test_d = load_data(cfg["data"]["test"], model=shaper)
    fix_d = load_data(cfg["data"]["fix"] or cfg["data"]["train"], model=shaper, map_labels=False)  # labels unused
    return None, test_d, fix_d, build


def _save(save: Any, out: Path, name: str, sd: dict, cfg: dict, force: bool) -> str:
    path = out / "checkpoints" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save(sd, path, force=force, provenance={"op": "recipe", "recipe": cfg["name"], "model": name})
    return str(path)


def _findings(pairs: list[dict], an: dict, fixes: list[str], has_bn: bool, figures: list[str]) -> tuple[list, dict]:
    """(a) a clear barrier before alignment; (b) the barrier at least halved after it, per method and BN fix —
    each judged on the 95% t-interval over pairs (pairs share models, so the interval is optimistic; see text)."""
    judged = [f for f in fixes if f != "none"] or ["none"]  # interpolating BN nets without a fix is not the claim
    clear, shrink = float(an["clear_barrier"]), float(an["shrink"])
    before = {f: [p["curves"][f]["B"]["error_barrier"] for p in pairs] for f in fixes}
    after = {f: {m: [p["curves"][f][f"P_{m}(B)"]["error_barrier"] for p in pairs] for m in an["methods"]} for f in fixes}
    checks_a = {f: check(f"a_{f}", before[f], None, clear, "above", what=f"barrier before alignment ({f})")
                for f in judged}
    # (b) per pair: shrink·before − after > 0 means the barrier fell to at most `shrink` of itself
    checks_b = {f"{f}+{m}": check(f"b_{f}_{m}", [shrink * y for y in before[f]], after[f][m], 0.0, "above",
                                  what=f"{shrink}·before − after ({f} + {m} matching)")
                for f in judged for m in an["methods"]}
    summary = {"judged_fixes": judged, "clear_barrier": clear, "shrink": shrink, "before": before, "after": after,
               "ratio": {f: {m: [(x / y if y > 0 else None) for x, y in zip(after[f][m], before[f])]
                             for m in an["methods"]} for f in fixes},
               "checks": {"a": checks_a, "b": checks_b}}
    n = len(pairs)
    caveat = (f" Over {n} pairs of {n_models(n)} models (pairs share models, so they are not independent and the "
              "interval is narrower than an interval over independent pairs would be).")
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
         "table": "barriers.csv"},
        {"id": "b", "claim": f"After permutation alignment (+ BatchNorm repair) the barrier shrinks by at least "
                             f"{round((1 - shrink) * 100)}%.",
         "verdict": combine([c["verdict"] for c in checks_b.values()]), "numbers": text_b, "figures": figures,
         "table": "barriers.csv"},
    ]
    return findings, summary


def n_models(pairs: int) -> int:
    """How many models give ``pairs`` unordered pairs."""
    n = 1
    while n * (n - 1) // 2 < pairs:
        n += 1
    return n


def _with_width(spec: str, param: str, width: int) -> str:
    """The model spec with ``param=width`` set (added, or replacing the spec's own value)."""
    from urllib.parse import parse_qsl, urlencode
    base, _, query = spec.partition("?")
    opts = dict(parse_qsl(query))
    opts[param] = str(width)
    return f"{base}?{urlencode(opts, safe=':,')}"


def _width_sweep(cfg: dict, train_d: Any, test_d: Any, fix_d: Any, fixes: list[str], device: str, batch_size: int,
                 note: Any, pairs: list[dict]) -> dict:
    """Train the seeds' models at every width, align B to A (first method) and measure before/after barriers
    with the first BN fix other than 'none' (or 'none' when it is the only one). The recipe's own model is not
    trained twice: at its width the main run's barriers are reused (same seeds, same training)."""
    from ..analysis.curve import interpolation_curve
    from ..eval.evaluator import Evaluator
    from ..eval.models import build_model
    from ..eval.train import accuracy, train
    from urllib.parse import parse_qsl

    from ..search.align import align
    an, tr, ws = cfg["analysis"], cfg["train"], cfg["width_sweep"]
    fix = next((f for f in fixes if f != "none"), fixes[0])
    method = an["methods"][0]
    kw = {"none": {}, "recalibrate_bn": {"recalibrate_bn": fix_d}, "repair": {"repair": fix_d}}[fix]
    k = train_d.num_classes
    in_chans = int(train_d.x.shape[1]) if train_d.x.dim() == 4 else None
    out: dict[str, Any] = {"fix": fix, "method": method, "param": ws["param"], "widths": {}, "rows": []}
    for w in ws["widths"]:
        spec = _with_width(cfg["model"], ws["param"], int(w))
        if dict(parse_qsl(cfg["model"].partition("?")[2])).get(ws["param"]) == str(w):
            before = [p["curves"][fix]["B"]["error_barrier"] for p in pairs]
            after = [p["curves"][fix][f"P_{method}(B)"]["error_barrier"] for p in pairs]
            out["rows"] += [[w, f"{p['a']}–{p['b']}", fix, method, x, y] for p, x, y in zip(pairs, before, after)]
            out["widths"][str(w)] = {"model": cfg["model"], "before": before, "after": after, "reused": True,
                                     "removed": [x - y for x, y in zip(before, after)]}
            continue
        models, accs = {}, {}
        for s in tr["seeds"]:
            torch.manual_seed(int(s))
            net = build_model(spec, num_classes=k, in_chans=in_chans)
            train(net, train_d, epochs=int(tr["epochs"]), lr=float(tr["lr"]), batch_size=int(tr["batch_size"]),
                  weight_decay=float(tr["weight_decay"]), momentum=float(tr["momentum"]), seed=int(s),
                  augment=tr["augment"])
            models[s] = {k_: v.detach().clone() for k_, v in net.state_dict().items()}
            accs[s] = accuracy(net, test_d)
        ev = Evaluator(build_model(spec, num_classes=k, in_chans=in_chans), test_d, device=device,
                       batch_size=batch_size)
        before, after = [], []
        for a, b in itertools.combinations(models, 2):
            pb, _ = align(models[a], models[b], build_model(spec, num_classes=k, in_chans=in_chans), method=method,
                          data=fix_d if method == "activations" else None, seed=int(an["align_seed"]),
                          example_input=fix_d.x[:64])
            cb = interpolation_curve(models[a], models[b], ev, steps=int(an["steps"]), progress=False, **kw)
            ca = interpolation_curve(models[a], pb, ev, steps=int(an["steps"]), progress=False, **kw)
            before.append(cb.barriers[test_d.name]["error"]["chord"])
            after.append(ca.barriers[test_d.name]["error"]["chord"])
            out["rows"].append([w, f"model-{a}–model-{b}", fix, method, before[-1], after[-1]])
        out["widths"][str(w)] = {"model": spec, "test_accuracy": accs, "before": before, "after": after,
                                 "removed": [x - y for x, y in zip(before, after)]}
        note(f"width {w}: barrier {', '.join(f'{x:.3f}' for x in before)} → {', '.join(f'{y:.3f}' for y in after)}")
    return out


def _width_finding(sweep: dict, cfg: dict) -> dict:
    """(c) alignment leaves less of the barrier at the largest width than at the smallest (paired by seed pair)."""
    ws = [str(w) for w in cfg["width_sweep"]["widths"]]
    narrow, wide = sweep["widths"][ws[0]], sweep["widths"][ws[-1]]
    # the barrier left after alignment, narrowest − widest: above 0 when width helps alignment
    c = check("width", narrow["after"], wide["after"], 0.0, "above",
              what=f"barrier after alignment at {sweep['param']} {ws[0]} − at {ws[-1]}")
    sweep["check"] = c
    text = (f"With {sweep['fix']} and {sweep['method']} matching, error barrier before → after alignment per width "
            "(mean over pairs): " + "; ".join(
                f"{w}: {fmt_interval(t_interval(sweep['widths'][w]['before']))} → "
                f"{fmt_interval(t_interval(sweep['widths'][w]['after']))}" for w in ws)
            + f". The finding needs the 95% t-interval of the paired difference above 0: {c['text']}.")
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
              "between the ends; the midpoint convention is in barriers.csv).", "",
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
    lines.insert(lines.index("## Findings") + 2, "A finding is *reproduced* only when the 95% Student-t interval of "
                 "its difference (over pairs of seeds) lies entirely beyond the threshold its text names; *not "
                 "reproduced* when it lies entirely on the other side; *inconclusive* when it straddles it; "
                 "*partly* when BatchNorm treatments or methods disagree.\n")
    lines += [f"![{fig}]({fig})" for fig in findings[0]["figures"]]
    lines += ["", "Checkpoints of both models and of every aligned B are in `checkpoints/` (any `weightspace "
              "interpolate` / `soup` command accepts them); every number is in `results.json` and `barriers.csv`.", ""]
    return "\n".join(lines)


register_recipe(KIND, "Alignment and the barrier",
                "barrier(A, B) vs barrier(A, P(B)) with stored, re-estimated or REPAIRed BatchNorm statistics",
                "two models trained from different random initialisations, B aligned to A (Git Re-Basin), barrier "
                "curves before and after alignment under each BatchNorm treatment",
                REBASIN_PAPER, DEFAULTS, run_align_recipe)
