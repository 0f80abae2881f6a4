"""Recipe kind ``saturation-pairs``: real upstream/downstream accuracy pairs for the saturation law.

Abnar, Dehghani, Neyshabur & Sedghi (2022) fit e_DS = k·e_US^α + e_∞ to (upstream, downstream) accuracies of many
pre-trained models and find that downstream accuracy saturates: as upstream accuracy approaches 1, downstream
accuracy approaches 1 − e_∞ < 1. This recipe generates the pairs: for every width and pre-training length in its
grid and every seed it trains an upstream model (cosine schedule over exactly that many epochs), scores it on the
upstream test set, and scores its last-layer features on a downstream task with a few-shot linear probe
(weightspace.analysis.probe). Each seed's points are fitted with :func:`weightspace.analysis.saturation.fit_saturation`
(upper hull; all points when the hull has fewer than three), and so are all points together (the figure).

With ``published`` (groups of published upstream models, e.g. ``{a1: [hf-hub:timm/resnet18.a1_in1k, ...],
a2: [...], a3: [...]}``) nothing is trained: each model is built from its Hub config (architecture and eval
transform), scored on ``upstream.test`` (e.g. an ImageNet validation folder; a subset of its classes is scored on
those classes) and probed on the downstream images decoded with its own transform. Each group (one training
recipe over several architectures) plays the part of a seed: one fit per group, intervals over groups.

Findings, each on a 95% t-interval over the seeds' fits: (a) downstream saturates below 1: e_∞ lies above
``min_gap``; (b) little is left to gain: the predicted saturation accuracy 1 − e_∞ minus the best downstream
accuracy reached lies below ``headroom``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..errors import ConfigError
from ..registry import Paper
from ..report.stats import Interval, fmt_interval, t_interval
from .config import load_kind_recipe
from .kit import (DIGITS_SOURCE, Session, hub_model_spec, kind_defaults, open_session, published,
                  published_source, register_recipe, render_report, source_data, task, train_from, with_option)
from .verdicts import check, verdict_of

__all__ = ["KIND", "load_saturation_pairs_recipe", "run_saturation_pairs_recipe", "saturation_rule"]

KIND = "saturation-pairs"
SATURATION_PAPER = Paper("Abnar, Dehghani, Neyshabur & Sedghi", 2022, "Exploring the Limits of Large Scale "
                         "Pre-training", "ICLR", "https://arxiv.org/abs/2110.02095")
DEFAULTS: dict[str, Any] = kind_defaults(KIND, {
    "upstream": DIGITS_SOURCE,
    "downstream": {"spec": "mnist:val?size=8", "train_per_class": 10},
    "grid": {"param": "width", "widths": [2, 4, 8, 16], "epochs": [1, 2, 4, 8]},
    "pretrain": {"lr": 0.05, "batch_size": 32, "weight_decay": 0.0005, "momentum": 0.9, "augment": "none"},
    "probe": {"layer": "fc:in"},
    "seeds": [1, 2, 3],
    "published": {},
    "analysis": {"min_gap": 0.01, "headroom": 0.05},
})


def load_saturation_pairs_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                                 overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a saturation-pairs recipe (``small:`` and KEY=VALUE overrides applied).

    Raises ConfigError: a grid with fewer than three configurations or non-positive entries, fewer than three
    seeds, ``published`` with fewer than three groups of three or more Hub ids, or an unknown key.
    """
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides)
    pub = cfg["published"]
    if pub:
        if not isinstance(pub, dict) or len(pub) < 3 or not all(
                isinstance(v, list) and len(v) >= 3 and all(isinstance(m, str) and m.startswith("hf-hub:") for m in v)
                for v in pub.values()):
            raise ConfigError(f"{cfg['where']}: published needs three or more groups (one per training recipe), each "
                              "a list of three or more Hub ids hf-hub:ORG/NAME (the fit has three parameters)")
        cfg["model"] = "timm:HUB_ID (each published model's own Hub config)"
        return cfg
    g = cfg["grid"]
    ok = all(isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v)
             for v in (g["widths"], g["epochs"]))
    if not ok or len(g["widths"]) * len(g["epochs"]) < 3:
        raise ConfigError(f"{cfg['where']}: grid needs positive integer widths and epochs giving at least three "
                          "configurations (the fit has three parameters)")
    return cfg


def run_saturation_pairs_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                                overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                                device: str = "cpu", batch_size: int = 256) -> dict:
    """Train the upstream grid for every seed, score each model upstream and downstream, fit the saturation law
    per seed and pooled; write pairs.csv (every point), saturation.png, results.json and REPORT.md.
    Returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: a malformed recipe or data spec.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from ..analysis.probe import fit_linear
    from ..analysis.saturation import fit_saturation
    from ..analysis.taps import FeatureTaps
    from ..eval.train import accuracy

    s = open_session(load_saturation_pairs_recipe, recipe, out, small=small, overrides=overrides, force=force,
                     progress=progress, device=device, batch_size=batch_size)
    cfg = s.cfg
    g, seeds = cfg["grid"], s.seeds
    points: list[dict] = []
    with s.threads() as t0:
        if cfg["published"]:  # nothing trained: each group of published models is one fit
            seeds = list(cfg["published"])
            up_train, (up_test, ds_train, ds_test) = None, _published_points(cfg, s, points)
        else:
            up_train, up_test, in_chans = source_data(cfg["upstream"])
            ds_train, ds_test = task(cfg["downstream"], "downstream", cfg["where"])
            s.claim_output()
        for seed in ([] if cfg["published"] else seeds):
            for w in g["widths"]:
                spec = with_option(cfg["model"], g["param"], int(w))
                for e in g["epochs"]:
                    net, _ = train_from(spec, None, up_train, {**cfg["pretrain"], "epochs": e}, seed,
                                        in_chans=in_chans)
                    up_acc = accuracy(net, up_test)  # before the taps move the model to --device
                    taps = FeatureTaps(net, cfg["probe"]["layer"], device=device, batch_size=batch_size)
                    ftr, fte = taps(ds_train), taps(ds_test)
                    layer = ftr.layers[-1]
                    head = fit_linear(ftr.x[layer], ftr.y, ds_train.num_classes, device=taps.device)
                    points.append({"seed": seed, "width": int(w), "epochs": int(e), "label": f"w{w}-e{e}-s{seed}",
                                   "upstream": up_acc,
                                   "downstream": head.accuracy(fte.x[layer], fte.y)})
            s.note(f"seed {seed}: " + ", ".join(f"{p['label']} {p['upstream']:.3f}/{p['downstream']:.3f}"
                                                for p in points if p["seed"] == seed))
        s.lap("train", t0)

    fits: dict[str, dict | None] = {}
    for seed in seeds:
        pts = [p for p in points if p["seed"] == seed]
        fits[str(seed)] = _fit(fit_saturation, pts)
    pooled_fit = None
    for mode in ("hull", "all"):
        try:
            pooled_fit = fit_saturation([p["upstream"] for p in points], [p["downstream"] for p in points],
                                        points=mode, labels=[p["label"] for p in points])
            pooled_fit.config.update({"upstream": cfg["upstream"]["test"], "downstream": ds_test.name})
            break
        except ConfigError:
            continue
    if cfg["published"]:
        s.csv("pairs.csv", ["group", "model", "upstream_accuracy", "downstream_accuracy"],
              [[p["seed"], p["model"], p["upstream"], p["downstream"]] for p in points])
    else:
        s.csv("pairs.csv", ["seed", "width", "epochs", "upstream_accuracy", "downstream_accuracy"],
              [[p["seed"], p["width"], p["epochs"], p["upstream"], p["downstream"]] for p in points])
    if pooled_fit is not None:
        pooled_fit.plot(s.figure("saturation.png"), force=force)
    findings, summary = _findings(fits, points, seeds, cfg["analysis"])
    for f in findings:
        f["figures"] = list(s.figures)
    results = {"points": points, "fits": fits, "pooled_fit": pooled_fit.to_dict() if pooled_fit else None,
               "data": {"upstream_train": len(up_train) if up_train is not None else None, "upstream_test": len(up_test),
                        "downstream_train": len(ds_train), "downstream_test": len(ds_test)}, **summary}
    return s.finish(findings, results, _render(cfg, results, findings))


def _published_points(cfg: dict, s: Session, points: list[dict]) -> tuple[Any, Any, Any]:
    """Score every published model upstream (its Hub config's eval transform, its own classes) and by the
    few-shot probe downstream, appending to ``points``; returns the last model's (upstream test, downstream
    train, downstream test) data."""
    from ..analysis.probe import fit_linear
    from ..analysis.taps import FeatureTaps
    for group, ids in cfg["published"].items():
        for hub_id in ids:
            net, up_test = published_source(hub_model_spec(hub_id), hub_id, cfg["upstream"]["test"])
            ds_train, ds_test = task(cfg["downstream"], "downstream", cfg["where"], lambda: net)  # noqa: B023 (called within)
            if not points:  # after the first model's data
                s.claim_output()
            weights = published(hub_id)
            up_acc = float(s.evaluator_of(net, up_test)(weights))
            net.load_state_dict({**net.state_dict(), **weights})  # the taps read this module
            taps = FeatureTaps(net, cfg["probe"]["layer"], device=s.device, batch_size=s.batch_size)
            ftr, fte = taps(ds_train), taps(ds_test)
            layer = ftr.layers[-1]
            head = fit_linear(ftr.x[layer], ftr.y, ds_train.num_classes, device=taps.device)
            points.append({"seed": group, "model": hub_id, "label": hub_id.rsplit("/", 1)[-1],
                           "upstream": up_acc, "downstream": head.accuracy(fte.x[layer], fte.y)})
        s.note(f"{group}: " + ", ".join(f"{p['label']} {p['upstream']:.3f}/{p['downstream']:.3f}"
                                        for p in points if p["seed"] == group))
    return up_test, ds_train, ds_test


def _fit(fit_saturation: Any, pts: list[dict]) -> dict | None:
    """One seed's fit: on the upper hull when it holds more points than the curve has parameters, else on all
    points; None when neither converges. With it, the seed's test of diminishing returns against a straight line
    (:func:`weightspace.analysis.saturation.diminishing_returns`, on all points)."""
    from ..analysis.saturation import diminishing_returns
    us, ds = [p["upstream"] for p in pts], [p["downstream"] for p in pts]
    for mode in ("hull", "all"):
        try:
            f = fit_saturation(us, ds, points=mode, labels=[p["label"] for p in pts])
        except ConfigError:
            continue
        if mode == "hull" and len(f.used) <= 3:  # three parameters through three points: R² = 1 whatever the data
            continue
        return {"points_mode": mode, "k": f.k, "alpha": f.alpha, "e_inf": f.e_inf,
                "saturation_accuracy": f.predicted_downstream_at_saturation, "rmse": f.rmse, "r2": f.r2,
                "points_fitted": len(f.used), "best_downstream": max(p["downstream"] for p in pts),
                "diminishing_returns": diminishing_returns(us, ds)}
    return None


def saturation_rule(slope_drop: list[float | None], e_inf: list[float | None], left: list[float | None],
                    min_gap: float, headroom: float) -> tuple[dict, dict]:
    """The verdicts of (a) and (b) from per-seed numbers: the slope of downstream on upstream accuracy over the lower
    half of the points minus that over the upper half (``slope_drop``), the fitted e_∞, and (1 − e_∞) − the best
    downstream accuracy reached (``left``).

    Diminishing returns come first: the drop in slope must lie above 0, else neither e_∞ nor the headroom of a
    saturating curve means anything and both findings take that check's verdict (linear data: not reproduced). Then
    (a) also needs e_∞ above ``min_gap``, (b) the headroom below ``headroom``. Returns two
    {"verdict", "sub_verdicts", "failed", "checks"}."""
    dim = check("diminishing", slope_drop, None, 0.0, "above",
                what="slope of the lower half − slope of the upper half, per seed")
    out = []
    for name, c in (("e_inf", check("e_inf", e_inf, None, min_gap, "above", what="e_∞ per seed")),
                    ("headroom", check("headroom", left, None, headroom, "below",
                                       what="(1 − e_∞) − best downstream accuracy per seed"))):
        checks = {"diminishing": dim, name: c}
        r = verdict_of(checks)
        if dim["verdict"] != "reproduced":
            r["verdict"] = dim["verdict"]
            r["sub_verdicts"][name] = "not tested"
        out.append({**r, "checks": checks})
    return out[0], out[1]


def _findings(fits: dict, points: list[dict], seeds: list[int], an: dict) -> tuple[list, dict]:
    gap, room = float(an["min_gap"]), float(an["headroom"])
    e_inf = [f["e_inf"] if f else None for f in fits.values()]
    left = [f["saturation_accuracy"] - f["best_downstream"] if f else None for f in fits.values()]
    dims = [f["diminishing_returns"] if f else {} for f in fits.values()]
    drop = [d["slope_low"] - d["slope_high"] if d.get("slope_low") is not None else None for d in dims]
    ra, rb = saturation_rule(drop, e_inf, left, gap, room)
    c_dim, c_a, c_b = ra["checks"]["diminishing"], ra["checks"]["e_inf"], rb["checks"]["headroom"]
    failed = [s for s, f in fits.items() if f is None]
    per = "; ".join(f"seed {s}: " + (f"k {f['k']:.3g}, α {f['alpha']:.3g}, e_∞ {f['e_inf']:.4f} ({f['points_mode']}, "
                                     f"{f['points_fitted']} points, R² {f['r2']:.3f})" if f else "no fit")
                    for s, f in fits.items())
    loo = "; ".join(f"seed {s}: slopes {d['slope_low']:.3f} → {d['slope_high']:.3f}, held-out RMSE curve "
                    f"{d['loo_rmse_saturating']:.4f} vs line {d['loo_rmse_linear']:.4f} (saturates: "
                    f"{str(d['saturates']).lower()})" if d.get("loo_rmse_linear") is not None else f"seed {s}: n/a"
                    for s, d in zip(fits, dims))
    gate = ("" if c_dim["verdict"] == "reproduced" else " Without diminishing returns shown, the saturating curve's "
            "e_∞ and headroom are not judged: the finding takes the diminishing-returns verdict.")
    text_a = (f"Diminishing returns against a straight line, per seed ({len(points) // len(seeds)} models each): "
              f"{loo}. Needs the drop in slope above 0: {c_dim['text']}. Per-seed fits of e_DS = k·e_US^α + e_∞: "
              f"{per}. Needs the 95% t-interval of e_∞ above {gap:g}: {c_a['text']}.{gate}"
              + (f" Seeds without a fit ({', '.join(failed)}) are left out." if failed else ""))
    text_b = ("Predicted saturation accuracy 1 − e_∞ minus the best downstream accuracy reached, per seed: "
              + ", ".join(f"{x:+.4f}" if x is not None else "n/a" for x in left)
              + f". Needs the 95% t-interval below {room:g}: {c_b['text']}.{gate}")
    findings = [
        {"id": "a", "claim": "Downstream accuracy saturates below 1 as upstream accuracy grows (diminishing returns, "
                             "e_∞ > 0).", "verdict": ra["verdict"], "numbers": text_a, "table": "pairs.csv",
         "sub_verdicts": ra["sub_verdicts"]},
        {"id": "b", "claim": "Little downstream accuracy is left to gain from better upstream models (the "
                             "saturation level lies close to the best model reached).",
         "verdict": rb["verdict"], "numbers": text_b, "table": "pairs.csv", "sub_verdicts": rb["sub_verdicts"]},
    ]
    return findings, {"checks": {"a": c_a, "b": c_b, "diminishing": c_dim}, "min_gap": gap, "headroom": room}


def _render(cfg: dict, results: dict, findings: list[dict]) -> str:
    from ..report import markdown_table
    g, d, pre = cfg["grid"], results["data"], cfg["pretrain"]
    if cfg["published"]:
        return _render_published(cfg, results, findings)
    setup = [f"Upstream: `{cfg['upstream']['train']}` ({d['upstream_train']} images), scored on "
             f"`{cfg['upstream']['test']}` ({d['upstream_test']}); a model for every {g['param']} in {g['widths']} × "
             f"pre-training length in {g['epochs']} epochs × seed in {cfg['seeds']} (SGD lr {pre['lr']}, cosine over "
             f"the model's own epochs, batch {pre['batch_size']}).",
             f"Downstream: `{cfg['downstream']['spec']}`, {cfg['downstream']['train_per_class']} training images per "
             f"class ({d['downstream_train']}), {d['downstream_test']} test images; a linear probe on the features "
             f"at `{cfg['probe']['layer']}`.",
             "Fit: e = 1 − accuracy, e_DS = k·e_US^α + e_∞ by weightspace.analysis.saturation.fit_saturation on the "
             "upper hull of each seed's points (all points when the hull has fewer than three)."]
    rows = []
    for w in g["widths"]:
        for e in g["epochs"]:
            ps = [p for p in results["points"] if p["width"] == w and p["epochs"] == e]
            rows.append([w, e, fmt_interval(t_interval([p["upstream"] for p in ps])),
                         fmt_interval(t_interval([p["downstream"] for p in ps]))])
    body = ["## Upstream/downstream pairs", "", "Mean ± 95% t-interval over seeds (every point is in `pairs.csv`):", "",
            markdown_table([g["param"], "epochs", "upstream accuracy", "downstream accuracy"], rows)]
    pf = results["pooled_fit"]
    if pf:
        body += ["", f"All points together: k {pf['k']:.4g}, α {pf['alpha']:.4g}, e_∞ {pf['e_inf']:.4f} "
                     f"(saturation accuracy {pf['predicted_downstream_accuracy_at_upstream_1']:.4f}), "
                     f"{pf['points_fitted']} of {pf['points']} points fitted ({pf['points_mode']}), R² {pf['r2']:.3f}."]
    iv = lambda x: fmt_interval(Interval(x["mean"], x["low"], x["high"], x["n"], x["level"]))  # noqa: E731
    body += ["", f"e_∞ over seeds: {iv(results['checks']['a']['interval'])}."]
    return render_report(cfg, setup, body, findings)


def _render_published(cfg: dict, results: dict, findings: list[dict]) -> str:
    from ..report import markdown_table
    d = results["data"]
    setup = [f"Upstream: the published models of {len(cfg['published'])} training recipes ("
             + "; ".join(f"{g}: " + ", ".join(f"`{m}`" for m in ids) for g, ids in cfg["published"].items())
             + f"), not trained here; each scored on `{cfg['upstream']['test']}` ({d['upstream_test']} images) with "
             "its Hub config's eval transform.",
             f"Downstream: `{cfg['downstream']['spec']}`, {cfg['downstream']['train_per_class']} training images per "
             f"class ({d['downstream_train']}), {d['downstream_test']} test images; a linear probe on the features "
             f"at `{cfg['probe']['layer']}`.",
             "Fit: e = 1 − accuracy, e_DS = k·e_US^α + e_∞ by weightspace.analysis.saturation.fit_saturation on the "
             "upper hull of each group's points (all points when the hull has fewer than three); a group plays the "
             "part of a seed."]
    rows = [[p["seed"], f"`{p['model']}`", f"{p['upstream']:.4f}", f"{p['downstream']:.4f}"] for p in results["points"]]
    body = ["## Upstream/downstream pairs", "", markdown_table(["group", "model", "upstream accuracy",
                                                               "downstream accuracy"], rows)]
    return render_report(cfg, setup, body, findings)


register_recipe(KIND, "Upstream/downstream pairs for the saturation law",
                "e_DS = k·e_US^α + e_∞ fitted per seed to models of several widths and pre-training lengths",
                "upstream models over a grid of widths and pre-training lengths, each scored upstream and by a "
                "few-shot linear probe downstream; the saturation law fitted per seed",
                SATURATION_PAPER, DEFAULTS, run_saturation_pairs_recipe)
