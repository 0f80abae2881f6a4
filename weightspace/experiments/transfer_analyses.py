"""The analyses of the ``transfer`` recipe kind (findings (a)–(d) of Neyshabur, Sedghi & Zhang 2020, and module
criticality), over the models a :class:`TransferRun` holds:

- ``barriers``      (a) error barriers between pairs of P-T models vs pairs of RI-T models;
- ``similarity``    (b) L2 distance and CKA between P-T pairs vs RI-T pairs;
- ``rewind``        (c) rewinding one module at a time to its initial value: lower vs upper modules;
- ``block_shuffle`` (d) the benefit of pre-training and the learning speed as the target images' blocks shrink;
- ``criticality``   (optional) module criticality of the P-T and RI-T models.

Each appends its finding to ``run.findings`` and its numbers to ``run.results``.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable

import torch

from ..eval.data import TensorData
from ..report.stats import Interval, fmt_interval, t_interval
from .kit import Session, mean, state_of, train_from
from .rules import barrier_rule, block_shuffle_rule, rewind_rule, similarity_rule
from .verdicts import PROTOCOLS, UNDER_TRAINED, by_protocol, check

__all__ = ["KINDS", "TransferRun", "model_label", "init_seeds", "analyse_barriers", "analyse_similarity",
           "analyse_rewind", "analyse_block_shuffle", "analyse_criticality", "RUNNERS"]

KINDS = ("P-T", "RI-T")


class TransferRun(Session):
    """A transfer recipe's session and everything it produced, kept in memory for the analyses."""

    def __init__(self, cfg: dict, out: str | os.PathLike, **kw: Any):
        super().__init__(cfg, out, **kw)
        self.data: dict[str, TensorData] = {}
        self.in_chans: int | None = None
        self.inits: dict[str, dict[int, dict]] = {}  # kind → init seed → state dict
        self.models: dict[str, dict[str, dict]] = {}  # kind → model label → state dict
        self.init_of: dict[str, int] = {}  # model label → its init seed
        self.histories: dict[str, dict[str, list]] = {}
        self.results: dict[str, Any] = {}
        self.findings: list[dict] = []
        self.has_bn = True

    def build(self, num_classes: int) -> torch.nn.Module:
        """A fresh model of the recipe's architecture (random weights from the global RNG)."""
        from ..eval.modules import build_model_for
        return build_model_for(self.cfg["model"], num_classes=num_classes, in_chans=self.in_chans)

    def train(self, init: dict, data: TensorData, opts: dict, seed: int, eval_data: TensorData | None,
              num_classes: int, transform: Callable | None = None) -> tuple[dict, list]:
        """Train the recipe's model from ``init`` (see :func:`kit.train_from`); returns (its state, its history).

        Raises:
            ConfigError: an unknown augmentation."""
        net, hist = train_from(self.cfg["model"], init, data, opts, seed, in_chans=self.in_chans,
                               device=self.device, eval_data=eval_data, transform=transform,
                               num_classes=num_classes)
        return state_of(net), hist

    def evaluator_on(self, data: TensorData) -> Any:
        """An Evaluator of a fresh model of the recipe on ``data``."""
        return self.evaluator(self.cfg["model"], data.num_classes, self.in_chans, data)


def model_label(kind: str, init_seed: int, seed: int) -> str:
    """'pt-7-1' / 'ri-7-2' (kind, init seed, data-order seed): the file stem of a fine-tuned model."""
    return f"{'pt' if kind == 'P-T' else 'ri'}-{init_seed}-{seed}"


def init_seeds(cfg: dict) -> list[int]:
    """The recipe's random initialisations (train.init_seeds)."""
    return [int(i) for i in cfg["train"]["init_seeds"]]


def _iv(d: dict) -> Interval:
    return Interval(d["mean"], d["low"], d["high"], d["n"], d["level"])


def _pairs(run: TransferRun, kind: str) -> list[tuple[str, str]]:
    """Every pair of models of one kind that share their initialisation (they differ only in data order)."""
    return [(a, b) for a, b in itertools.combinations(run.models[kind], 2) if run.init_of[a] == run.init_of[b]]


def analyse_barriers(run: TransferRun, opts: dict) -> None:
    """(a) Error barriers along the line between two models, for every pair of each kind."""
    from ..analysis.curve import CurveSet, interpolation_curve
    test = run.data["target_test"]
    ev = run.evaluator_on(test)
    curves, rows, out = [], [], {}
    for kind in KINDS:
        out[kind] = []
        for a, b in _pairs(run, kind):
            c = interpolation_curve(run.models[kind][a], run.models[kind][b], ev, steps=int(opts["steps"]),
                                    label=f"{kind} {a}–{b}", progress=False)
            entry = {"pair": [a, b], "error_barrier": c.barriers["target_test"]["error"]["chord"],
                     "loss_barrier": c.barriers["target_test"]["loss"]["chord"],
                     "errors": c.series("target_test", "error")}
            if opts["recalibrate_bn"] and run.has_bn:
                cr = interpolation_curve(run.models[kind][a], run.models[kind][b], ev, steps=int(opts["steps"]),
                                         recalibrate_bn=run.data["target_train"], label=f"{kind} {a}–{b} (BN re-estimated)",
                                         progress=False)
                entry["error_barrier_bn_recalibrated"] = cr.barriers["target_test"]["error"]["chord"]
                entry["loss_barrier_bn_recalibrated"] = cr.barriers["target_test"]["loss"]["chord"]
            out[kind].append(entry)
            curves.append(c)
            rows.append([kind, f"{a}–{b}", entry["error_barrier"], entry["loss_barrier"],
                         entry.get("error_barrier_bn_recalibrated"), entry.get("loss_barrier_bn_recalibrated")])
    run.csv("barriers.csv", ["kind", "pair", "error_barrier", "loss_barrier",
                                                "error_barrier_bn_recalibrated", "loss_barrier_bn_recalibrated"],
                     rows)
    CurveSet(curves).plot(run.figure("barriers.png"), force=run.force)
    tol = float(opts["no_barrier_below"])
    protocols = {"stored": "error_barrier"}
    if opts["recalibrate_bn"] and run.has_bn:
        protocols["re-estimated"] = "error_barrier_bn_recalibrated"
    # P-T pair i and RI-T pair i share their seeds; pairs share models, so the model is the unit of replication
    units = [[_seed_of(run, x) for x in e["pair"]] for e in out["P-T"]]
    rules, ivs = {}, {}
    for proto, key in protocols.items():
        pt_b, ri_b = [e[key] for e in out["P-T"]], [e[key] for e in out["RI-T"]]
        rules[proto] = barrier_rule(pt_b, ri_b, tol, units=units, n_test=len(test), label=PROTOCOLS[proto])
        ivs[proto] = check("difference", ri_b, pt_b, 0.0, "above", units=units, n_test=len(test),
                           what=f"RI-T − P-T error barrier ({PROTOCOLS[proto]}, for reference)")
    summary = {"tolerance": tol, "protocols": list(protocols),
               "checks": {p: r["checks"] for p, r in rules.items()},
               "sub_verdicts": {p: r["sub_verdicts"] for p, r in rules.items()},
               "failed": {p: r["failed"] for p, r in rules.items()},
               "difference": {p: c["interval"] for p, c in ivs.items()},
               "pt_mean": rules["stored"]["checks"]["pt_no_barrier"]["interval"]["mean"],
               "ri_mean": rules["stored"]["checks"]["ri_barrier"]["interval"]["mean"]}
    if "re-estimated" in rules:
        summary["pt_mean_bn_recalibrated"] = rules["re-estimated"]["checks"]["pt_no_barrier"]["interval"]["mean"]
        summary["ri_mean_bn_recalibrated"] = rules["re-estimated"]["checks"]["ri_barrier"]["interval"]["mean"]
    summary["verdict_by_protocol"] = {p: r["verdict"] for p, r in rules.items()}
    verdict = _gate(run, by_protocol(summary["verdict_by_protocol"]))
    run.results["barriers"] = {"pairs": out, "summary": summary}
    n = len(out["P-T"])
    text = (f"Error barrier on the target test set (chord height, {opts['steps']} points), {n} pairs per kind from "
            f"{len({u for us in units for u in us})} models (pairs share models: intervals are delete-one-model "
            f"jackknife t-intervals, widened by the test set's sampling noise, {len(test)} examples). The finding "
            f"needs both halves: P-T's barrier interval below the 'no barrier' line {tol} and RI-T's above it. ")
    for proto, r in rules.items():
        text += ("; ".join(c["text"] for c in r["checks"].values()) + f" ⇒ {r['verdict']} ({ivs[proto]['text']}). ")
    if not run.has_bn:
        text += "The model has no BatchNorm: one protocol applies."
    elif len(rules) > 1 and len(set(summary["verdict_by_protocol"].values())) > 1:
        text += "The two BatchNorm protocols disagree: the verdict depends on the statistics."
    run.findings.append({"id": "a", "claim": "Two P-T models show no error barrier between them; two RI-T models of "
                         "the same recipe do, even from the same random initialisation.",
                         "verdict": verdict, "numbers": _gate_text(run) + text.strip(), "figures": ["barriers.png"],
                         "table": "barriers.csv", "sub_verdicts": summary["sub_verdicts"]})


def _seed_of(run: TransferRun, label: str) -> tuple[int, str]:
    """A fine-tuned model's unit of replication: (init seed, data-order seed), shared by its P-T and RI-T twins."""
    return run.init_of[label], label.rsplit("-", 1)[-1]


def _gate(run: TransferRun, verdict: str) -> str:
    """``verdict``, unless P-T or RI-T models fell below the recipe's minimum accuracy (then nothing is tested)."""
    return verdict if run.results.get("training", {}).get("ok", True) else UNDER_TRAINED


def _gate_text(run: TransferRun) -> str:
    t = run.results.get("training")
    if not t or t["ok"]:
        return ""
    return ("Not tested: mean target test accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in t["mean"].items())
            + f" — a comparison needs both kinds at {t['minimum']:g} or above. ")


def _linear_cka(m: dict) -> float | None:
    """A module's linear CKA on the full test set, else its minibatch estimate (sets above full_limit)."""
    return m["linear_cka"] if m.get("linear_cka") is not None else m.get("minibatch_cka")


def analyse_similarity(run: TransferRun, opts: dict) -> None:
    """(b) L2 distance (parameters) and CKA (activations on the target test set) within each kind's pairs."""
    import weightspace.report as report
    from ..analysis.similarity import model_similarity
    test = run.data["target_test"]
    model = run.build(test.num_classes)
    out: dict[str, list] = {}
    per_module: dict[str, dict[str, list]] = {}
    for kind in KINDS:
        out[kind] = []
        per_module[kind] = {}
        for a, b in _pairs(run, kind):
            r = model_similarity(run.models[kind][a], run.models[kind][b], model, test, modules=opts["modules"],
                                 batch_size=int(opts["batch_size"] or run.batch_size), device=run.device,
                                 full_limit=int(opts["full_limit"]))
            cka = [_linear_cka(m) for m in r.modules if _linear_cka(m) is not None]
            out[kind].append({"pair": [a, b], "l2": r.total["l2"], "relative_l2": r.total["relative"],
                              "mean_linear_cka": mean(cka),
                              "mean_rbf_cka": mean([m.get("rbf_cka") for m in r.modules]),
                              "same_prediction": r.agreement["same_prediction"],
                              "agreement": r.agreement["counts"], "modules": r.modules})
            for m in r.modules:
                per_module[kind].setdefault(m["module"], []).append(m)
    modules = list(per_module["P-T"])
    rows = []
    for kind in KINDS:
        for m in modules:
            ms = per_module[kind][m]
            rows.append([kind, m, mean([_linear_cka(x) for x in ms]), mean([x.get("rbf_cka") for x in ms]),
                         mean([x["l2"] for x in ms]), mean([x["relative_l2"] for x in ms])])
    run.csv("similarity.csv", ["kind", "module", "linear_cka", "rbf_cka", "l2", "relative_l2"],
                     rows)
    x = list(range(len(modules)))
    series_cka = [{"x": x, "y": [r[2] for r in rows if r[0] == k], "label": k} for k in KINDS]
    series_l2 = [{"x": x, "y": [r[4] for r in rows if r[0] == k], "label": k} for k in KINDS]
    fig = report.line_panels([{"xlabel": "module", "ylabel": "linear CKA within pairs", "title": "CKA (higher = more alike)",
                               "series": series_cka},
                              {"xlabel": "module", "ylabel": "L2 distance within pairs", "title": "parameter distance",
                               "series": series_l2}], title="similarity of models of the same kind")
    for ax in fig.axes[:2]:
        ax.set_xticks(x)
        ax.set_xticklabels(modules, rotation=45, ha="right", fontsize=7)
    report.save_figure(fig, run.figure("similarity.png"), force=run.force)
    s = {f"{k}_{q}": mean([p[q] for p in out[k]]) for k in KINDS for q in ("l2", "relative_l2", "mean_linear_cka",
                                                                             "mean_rbf_cka", "same_prediction")}
    run.results["similarity"] = {"pairs": out, "summary": s, "per_module": rows}
    units = [[_seed_of(run, x) for x in p["pair"]] for p in out["P-T"]]
    rule = similarity_rule([p["l2"] for p in out["P-T"]], [p["l2"] for p in out["RI-T"]],
                           [p["mean_linear_cka"] for p in out["P-T"]], [p["mean_linear_cka"] for p in out["RI-T"]],
                           float(opts["cka_margin"]), units=units)
    l2, cka = rule["checks"]["l2"], rule["checks"]["cka"]
    s["checks"] = rule["checks"]
    s["sub_verdicts"] = rule["sub_verdicts"]
    verdict = _gate(run, rule["verdict"])
    text = (f"Parameter L2 within pairs: P-T {s['P-T_l2']:.3f} vs RI-T {s['RI-T_l2']:.3f} (relative "
            f"{s['P-T_relative_l2']:.3f} vs {s['RI-T_relative_l2']:.3f}); linear CKA averaged over modules"
            f"{'' if len(test) <= int(opts['full_limit']) else ' (minibatch estimate: the test set is above full_limit)'}: "
            f"P-T {s['P-T_mean_linear_cka']:.4f} vs RI-T {s['RI-T_mean_linear_cka']:.4f} (RBF "
            f"{s['P-T_mean_rbf_cka']:.4f} vs {s['RI-T_mean_rbf_cka']:.4f}); same prediction on "
            f"{100 * s['P-T_same_prediction']:.1f}% vs {100 * s['RI-T_same_prediction']:.1f}% of test examples. "
            f"Paired over {len(out['P-T'])} pairs (jackknife over the models they share): {l2['text']}; {cka['text']}. Activations use each model's own "
            "stored BatchNorm statistics, which match its weights (no interpolation or rewinding is involved).")
    run.findings.append({"id": "b", "claim": "P-T pairs are closer in parameter L2 and more similar in CKA than RI-T pairs.",
                         "verdict": verdict, "numbers": _gate_text(run) + text, "sub_verdicts": rule["sub_verdicts"], "figures": ["similarity.png"], "table": "similarity.csv"})


def analyse_rewind(run: TransferRun, opts: dict) -> None:
    """(c) Rewinding one module at a time (to its value at initialisation, or a fresh random draw)."""
    import weightspace.report as report
    from ..analysis.criticality import rewind
    test = run.data["target_test"]
    ev = run.evaluator_on(test)
    k = test.num_classes
    out, rows = {}, []
    reset = set(run.cfg["train"]["reset"])
    for kind in KINDS:
        per_model, deltas, errors, recal = {}, {}, {}, {}
        for label, sd in run.models[kind].items():
            i = run.init_of[label]
            r = rewind(sd, run.inits[kind][i], ev, modules=opts["modules"], to=list(opts["to"]),
                       model=lambda: run.build(k), seed=i + 1000)  # 'random': a draw that is not the init itself
            if opts["recalibrate_bn"] and run.has_bn:  # the same rewinds with every BatchNorm's statistics re-estimated
                rr = rewind(sd, run.inits[kind][i], ev, modules=opts["modules"], to="init",
                            recalibrate_bn=run.data["target_train"])
                b = rr.baseline["target_test"]["error"]
                for m in rr.modules:
                    recal.setdefault(m, []).append(rr.value(m, "init") - b)
            base = r.baseline["target_test"]["error"]
            per_model[label] = r.to_dict()
            for m in r.modules:
                errors.setdefault(m, {}).setdefault("(FINAL)", []).append(base)
                for t in r.targets:
                    errors[m].setdefault(t, []).append(r.value(m, t))
                if "init" in r.targets:
                    deltas.setdefault(m, []).append(r.value(m, "init") - base)
            modules, targets = r.modules, r.targets
        mean_err = {m: {t: mean(v) for t, v in errors[m].items()} for m in modules}
        mean_delta = {m: mean(v) for m, v in deltas.items()}
        out[kind] = {"models": per_model, "mean_error": mean_err, "delta_error_init": mean_delta,
                     "delta_error_init_bn_recalibrated": {m: mean(v) for m, v in recal.items()},
                     "per_model_delta": {"stored": deltas, "re-estimated": recal}}
        for m in modules:
            rows.append([kind, m, mean_err[m]["(FINAL)"], *[mean_err[m][t] for t in targets]])
        fig = report.heatmap([[mean_err[m][t] for t in targets] for m in modules], modules,
                             [f"{kind}: {t}" for t in targets], fmt="{:.3f}", cmap="magma",
                             title=f"{kind}: one module rewound (mean of {len(per_model)})\n"
                                   f"FINAL test error {mean([mean_err[m]['(FINAL)'] for m in modules]):.3f}",
                             cbar_label="test error")
        report.save_figure(fig, run.figure(f"rewind_{'pt' if kind == 'P-T' else 'ri'}.png"), force=run.force)
    targets = list(opts["to"])
    run.csv("rewind.csv", ["kind", "module", "error_final", *[f"error_{t}" for t in targets]], rows)
    run.results["rewind"] = out
    pt = out["P-T"]["delta_error_init"]
    body = [m for m in pt if m not in reset]
    half = len(body) // 2
    lower, upper = body[:half], body[len(body) - half:]
    n = len(run.models["P-T"])
    checks = {}
    for proto, per in out["P-T"]["per_model_delta"].items():
        if not per:
            continue
        # per P-T model: mean increase over the upper half minus over the lower half (paired within the model)
        hi_m = [mean([per[m][i] for m in upper]) for i in range(n)]
        lo_m = [mean([per[m][i] for m in lower]) for i in range(n)]
        checks[proto] = rewind_rule(hi_m, lo_m, n_test=len(test), label=PROTOCOLS[proto])["checks"][
            "upper_minus_lower"]
        means = {m: mean(per[m]) for m in body}
        checks[proto]["monotone"] = all(means[a] <= means[b] for a, b in zip(body, body[1:]))
    verdict = by_protocol({p: c["verdict"] for p, c in checks.items()}) if lower else "inconclusive"
    out["checks"] = checks
    out["verdict_by_protocol"] = {p: c["verdict"] for p, c in checks.items()}
    ri = out["RI-T"]["delta_error_init"]
    text = (f"P-T models ({n}), each module rewound to its pre-trained value, increase in test error (mean): "
            + ", ".join(f"{m} {pt[m]:+.4f}" for m in pt)
            + f". Lower half of the body: {', '.join(lower)}; upper half: {', '.join(upper)}. Modules re-initialised "
            + f"for the new task ({', '.join(sorted(reset)) or 'none'}) are left out: their 'initial value' is random. "
            + "The finding needs the 95% t-interval (over models, widened by the test set's sampling noise) of upper "
            + "− lower above 0, under each BatchNorm protocol. ")
    for c in checks.values():
        text += f"{c['text']} ({'monotone' if c['monotone'] else 'not monotone'} in depth). "
    pt_recal = out["P-T"]["delta_error_init_bn_recalibrated"]
    if pt_recal:
        text += ("Mean P-T increases with statistics re-estimated: " + ", ".join(f"{m} {pt_recal[m]:+.4f}"
                                                                            for m in pt_recal) + ". ")
    if len(checks) > 1 and len({c["verdict"] for c in checks.values()}) > 1:
        text += "The two BatchNorm protocols disagree: the verdict depends on the statistics. "
    text += (f"RI-T models ({n}, rewound to their random init): " + ", ".join(f"{m} {ri[m]:+.4f}" for m in ri) + ".")
    run.findings.append({"id": "c", "claim": "Rewinding lower modules (to their value before fine-tuning) hurts less "
                         "than rewinding upper ones.", "verdict": verdict, "numbers": text,
                         "figures": ["rewind_pt.png", "rewind_ri.png"], "table": "rewind.csv",
                         "sub_verdicts": out["verdict_by_protocol"]})


def _curve_stats(history: list) -> tuple[list[int], list[float]]:
    pts = [h for h in history if "eval_accuracy" in h]
    return [h["step"] for h in pts], [h["eval_accuracy"] for h in pts]


def analyse_block_shuffle(run: TransferRun, opts: dict) -> None:
    """(d) Fine-tune P-T and RI-T on block-shuffled target images, block sizes from the image size down."""
    import weightspace.report as report
    from ..eval.transforms import BlockShuffle
    tr = run.cfg["train"]
    train_d, test_d = run.data["target_train"], run.data["target_test"]
    size = int(train_d.x.shape[-1])
    blocks = [int(b) for b in (opts["blocks"] or [size])]
    seeds = list(opts["seeds"] or tr["seeds"])
    first = init_seeds(run.cfg)[0]  # one initialisation per kind; the data-order seeds vary
    ft = {**tr["finetune"], **(opts["finetune"] or {})}
    if not ft.get("eval_every"):
        ft["eval_every"] = max(1, math.ceil(len(train_d) / int(ft["batch_size"])))
    out, rows, panels = [], [], []
    for b in blocks:
        # The shuffle sits in front of the network: normalised image → augmentation → block shuffle → network,
        # so augmentations (shifts) act on the image, not on its shuffled blocks; test images are shuffled alike.
        shuffle = BlockShuffle(b, int(opts["seed"]))
        entry: dict[str, Any] = {"block": b}
        series = []
        for kind in KINDS:
            finals, aulcs, curves = [], [], []
            for seed in seeds:
                _, hist = run.train(run.inits[kind][first], train_d, ft, seed, test_d, test_d.num_classes, shuffle)
                steps, accs = _curve_stats(hist)
                finals.append(accs[-1])
                aulcs.append(mean(accs))
                curves.append(accs)
            mean_curve = [mean(col) for col in zip(*curves)]
            entry[kind] = {"final_accuracy": mean(finals), "mean_accuracy_over_training": mean(aulcs),
                           "steps": steps, "curve": mean_curve, "per_seed_final": finals,
                           "per_seed_mean_accuracy": aulcs}
            series.append({"x": steps, "y": mean_curve, "label": kind})
        entry["benefit"] = entry["P-T"]["final_accuracy"] - entry["RI-T"]["final_accuracy"]
        entry["per_seed_benefit"] = [p - r for p, r in zip(entry["P-T"]["per_seed_final"], entry["RI-T"]["per_seed_final"])]
        entry["per_seed_speed_benefit"] = [p - r for p, r in zip(entry["P-T"]["per_seed_mean_accuracy"],
                                                                 entry["RI-T"]["per_seed_mean_accuracy"])]
        entry["speed_benefit"] = (entry["P-T"]["mean_accuracy_over_training"]
                                  - entry["RI-T"]["mean_accuracy_over_training"])
        out.append(entry)
        rows.append([b, entry["P-T"]["final_accuracy"], entry["RI-T"]["final_accuracy"], entry["benefit"],
                     entry["P-T"]["mean_accuracy_over_training"], entry["RI-T"]["mean_accuracy_over_training"],
                     entry["speed_benefit"]])
        panels.append({"xlabel": "step", "ylabel": "target test accuracy", "title": f"block {b}×{b}" +
                       (" (no shuffle)" if b == size else ""), "series": series})
    run.csv("block_shuffle.csv", ["block", "pt_final_accuracy", "ri_final_accuracy", "benefit",
                                                     "pt_mean_accuracy", "ri_mean_accuracy", "speed_benefit"],
                     rows)
    report.save_figure(report.line_panels(panels, title="learning curves on block-shuffled target data"),
                       run.figure("block_shuffle_curves.png"), force=run.force)
    fig = report.line_panels([{"xlabel": "block size", "ylabel": "P-T − RI-T accuracy", "title": "benefit of pre-training",
                               "series": [{"x": [e["block"] for e in out], "y": [e["benefit"] for e in out],
                                           "label": "final accuracy"},
                                          {"x": [e["block"] for e in out], "y": [e["speed_benefit"] for e in out],
                                           "label": "mean accuracy over training"}]}])
    fig.axes[0].axhline(0.0, color="black", linewidth=0.8)
    report.save_figure(fig, run.figure("block_shuffle_benefit.png"), force=run.force)
    run.results["block_shuffle"] = {"seeds": seeds, "shuffle_seed": int(opts["seed"]), "blocks": out}
    ordered = sorted(out, key=lambda e: -e["block"])  # image size first, smallest blocks last
    benefits = [e["benefit"] for e in ordered]
    monotone = all(a >= b for a, b in zip(benefits, benefits[1:]))
    rule = block_shuffle_rule({e["block"]: e["per_seed_benefit"] for e in ordered},
                              {e["block"]: e["per_seed_speed_benefit"] for e in ordered}, n_test=len(test_d))
    checks = rule["checks"]
    verdict = _gate(run, rule["verdict"])
    run.results["block_shuffle"]["checks"] = checks
    run.results["block_shuffle"]["sub_verdicts"] = rule["sub_verdicts"]
    text = (f"Benefit of pre-training (P-T − RI-T final test accuracy, {len(seeds)} data-order seeds, paired) by block "
            "size: " + ", ".join(f"{e['block']}: {fmt_interval(t_interval(e['per_seed_benefit']))}" for e in ordered)
            + f" ({'monotone' if monotone else 'not monotone'} in the means). Each check needs its 95% t-interval "
            "(widened by the test set's sampling noise) above 0: " + "; ".join(c["text"] for c in checks.values()) + ".")
    run.findings.append({"id": "d", "claim": "With block shuffling of decreasing block size, the benefit of pre-training "
                         "shrinks but stays above zero, and P-T still converges faster.", "verdict": verdict,
                         "numbers": _gate_text(run) + text, "sub_verdicts": rule["sub_verdicts"], "figures": ["block_shuffle_curves.png", "block_shuffle_benefit.png"],
                         "table": "block_shuffle.csv"})


def analyse_criticality(run: TransferRun, opts: dict) -> None:
    """Module criticality (Chatterji et al.) of every P-T and RI-T model on the target training data, with stored
    and (for BatchNorm models) re-estimated statistics; Σμ compared between kinds with a t-interval."""
    from ..analysis.criticality import module_criticality
    train_d = run.data["target_train"]
    ev = run.evaluator_on(train_d)
    protocols = {"stored": None, **({"re-estimated": train_d} if run.has_bn else {})}
    out: dict[str, Any] = {}
    for proto, recal in protocols.items():
        out[proto] = {}
        for kind in KINDS:
            per = {}
            for label, sd in run.models[kind].items():
                r = module_criticality(sd, run.inits[kind][run.init_of[label]], ev, modules=opts["modules"],
                                       epsilon=float(opts["epsilon"]), relative_epsilon=bool(opts["relative_epsilon"]),
                                       alphas=opts["alphas"], sigma_range=tuple(opts["sigma_range"]),
                                       bisect_steps=int(opts["bisect_steps"]), samples=int(opts["samples"]),
                                       seed=int(opts["seed"]), recalibrate_bn=recal)
                sub = run.out / f"criticality_{proto}_{label}"
                r.write(sub, force=run.force)
                per[label] = {"total_mu": r.total, "mu": {m["module"]: m["mu"] for m in r.modules},
                              "folder": sub.name, "notes": r.notes}
            out[proto][kind] = per
    checks = {}
    for proto in protocols:
        # log Σμ: μ spans orders of magnitude; an infinite Σμ (no feasible point) is left out of the interval
        logs = {k: [math.log10(v["total_mu"]) if 0 < v["total_mu"] < math.inf else None
                    for v in out[proto][k].values()] for k in KINDS}
        checks[proto] = check(f"criticality_{proto}", logs["RI-T"], logs["P-T"], 0.0, "above", paired=True,
                              what=f"log10 Σμ RI-T − P-T ({PROTOCOLS[proto]})")
    run.results["criticality"] = {"models": out, "checks": checks}
    text = "; ".join(f"{proto}, {kind}: Σμ per model " + ", ".join(f"{v['total_mu']:.4g}" for v in out[proto][kind].values())
                     for proto in protocols for kind in KINDS)
    text += ". " + "; ".join(c["text"] for c in checks.values()) + "."
    run.findings.append({"id": "criticality", "claim": "(extra, no claim of the paper checked) module criticality Σμ "
                         "of P-T and RI-T models", "verdict": "measured", "numbers": text,
                         "figures": [f"{v['folder']}/criticality.png" for proto in protocols
                                     for v in out[proto]["P-T"].values()][:2], "table": None})


RUNNERS: dict[str, Callable[[TransferRun, dict], None]] = {
    "barriers": analyse_barriers, "similarity": analyse_similarity, "rewind": analyse_rewind,
    "block_shuffle": analyse_block_shuffle, "criticality": analyse_criticality,
}
