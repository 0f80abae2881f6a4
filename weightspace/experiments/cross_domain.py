"""Recipe kind ``cross-domain``: are P-T models fine-tuned on different domains of one task in one basin?

Neyshabur, Sedghi & Zhang (2020) find that models fine-tuned from one pre-trained model on one target task lie in
one basin (no barrier between them). This recipe asks what happens across target *domains* that share a label
set (e.g. digits and inverted digits, ten classes each): from one pre-trained model and one random head, a model is
fine-tuned on each domain with every data-order seed. Barriers are measured on each domain's test set:

- within a domain: between models of that domain fine-tuned with seeds i and i+1 (cyclically, so each seed pairs
  once as the first model);
- across domains: between the domain-A and the domain-B model of seed i, evaluated on A's test set and on B's.

Findings, each on a 95% t-interval over seeds, under stored and (with BatchNorm) re-estimated statistics (the
statistics re-estimated on the training data of the domain being evaluated): (a) within each domain the barrier
lies below ``no_barrier_below``; (b) on each domain's test set, cross-domain − within-domain barrier (paired by
seed) lies above ``margin``.

With ``pretrained`` (a published checkpoint, e.g. ``hf-hub:timm/resnet50.a1_in1k``) nothing is pre-trained: the
fine-tunes start from those weights (``model`` names their architecture, ``timm:hf-hub:...``; image sources are
decoded with its eval transform; ``source.test`` scores it on the source task). The two domains' folders must hold
the same class folders (one label set, e.g. the 200 classes of ImageNet-R).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from ..errors import ConfigError
from ..report.stats import Interval, fmt_interval, t_interval
from .config import load_kind_recipe
from .kit import (DIGITS_SOURCE, DIGITS_TARGET, bn_protocols, error_barrier, kind_defaults,
                  named_tasks, open_session, pt_setup, published, published_source, register_recipe, render_report,
                  source_data, state_of, train_from, train_options)
from .transfer import TRANSFER_PAPER
from .verdicts import PROTOCOLS, by_protocol, check, combine, has_batchnorm

__all__ = ["KIND", "load_cross_domain_recipe", "run_cross_domain_recipe"]

KIND = "cross-domain"
DEFAULTS: dict[str, Any] = kind_defaults(KIND, {
    "source": DIGITS_SOURCE,
    "target": DIGITS_TARGET,
    "domains": [],
    "pretrained": None,
    "pretrain": train_options(epochs=20, lr=0.05, batch_size=64, seed=0),
    "finetune": train_options(epochs=20, lr=0.02, batch_size=16),
    "reset": ["fc"],
    "head_seed": 7,
    "seeds": [1, 2, 3],
    "analysis": {"steps": 11, "no_barrier_below": 0.02, "margin": 0.02, "recalibrate_bn": True},
})


def load_cross_domain_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                             overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a cross-domain recipe (``small:`` and KEY=VALUE overrides applied).

    Raises ConfigError: not exactly two named domains, fewer than three seeds, or an unknown key.
    """
    cfg = load_kind_recipe(source, KIND, DEFAULTS, small=small, overrides=overrides)
    doms = cfg["domains"]
    if not isinstance(doms, list) or len(doms) != 2 or not all(isinstance(d, dict) and d.get("name") for d in doms) \
            or doms[0]["name"] == doms[1]["name"]:
        raise ConfigError(f"{cfg['where']}: domains needs exactly two entries with different names (name, transform, "
                          "optional spec), one label set")
    return cfg


def run_cross_domain_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                            overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                            device: str = "cpu", batch_size: int = 256) -> dict:
    """Pre-train once, fine-tune on both domains with every seed, measure within- and cross-domain barriers on each
    domain's test set; write checkpoints/, results.json, cross_domain.csv, cross_domain.png and REPORT.md.
    Returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: a malformed recipe or data spec, or domains with different label sets (numbers of classes,
            or class folder names).
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from ..eval.train import accuracy

    s = open_session(load_cross_domain_recipe, recipe, out, small=small, overrides=overrides, force=force,
                     progress=progress, device=device, batch_size=batch_size)
    cfg = s.cfg
    an, pre, spec = cfg["analysis"], cfg["pretrain"], cfg["model"]
    seeds = s.seeds
    with s.threads() as t0:
        shaper = None
        if cfg["pretrained"]:  # published weights: nothing pre-trained here
            shaper, src_test = published_source(spec, cfg["pretrained"], cfg["source"]["test"])
            src = None
        else:
            src, src_test, _ = source_data(cfg["source"])
        doms = named_tasks(cfg, cfg["domains"], (lambda: shaper) if shaper else None)
        (na, (a_tr, _)), (nb, (b_tr, _)) = doms.items()
        ca, cb = a_tr.meta.get("classes"), b_tr.meta.get("classes")
        if ca and cb and ca != cb:  # labels are class folders in sorted order: they must be the same folders
            diff = next((f"'{x}' vs '{y}'" for x, y in zip(ca, cb) if x != y), f"{len(ca)} vs {len(cb)} classes")
            raise ConfigError(f"{cfg['where']}: domains '{na}' and '{nb}' hold different classes ({diff}); "
                              "cross-domain interpolation needs one label set")
        in_chans = int((src if src is not None else a_tr).x.shape[1])
        if a_tr.num_classes != b_tr.num_classes:
            raise ConfigError(f"{cfg['where']}: domains '{na}' and '{nb}' have {a_tr.num_classes} and "
                              f"{b_tr.num_classes} classes; cross-domain interpolation needs one label set")
        k = a_tr.num_classes
        s.claim_output()
        if shaper is not None:
            source_sd = published(cfg["pretrained"])
            source_acc = float(s.evaluator_of(shaper, src_test)(source_sd))
        else:
            source_net, _ = train_from(spec, None, src, pre, int(pre["seed"]), in_chans=in_chans)
            source_acc = accuracy(source_net, src_test)
            s.save("source", source_net.state_dict())
            source_sd = state_of(source_net)
        template, pt_start = pt_setup(cfg, k, in_chans)
        start = pt_start(source_sd)
        s.save("pt-init", start)
        s.lap("pretrain", t0)
        t1 = time.perf_counter()
        models: dict[str, dict[int, dict]] = {n: {} for n in doms}
        acc: dict[str, dict[int, dict]] = {n: {} for n in doms}
        for n, (tr, _) in doms.items():
            for seed in seeds:
                m, _ = train_from(spec, start, tr, cfg["finetune"], seed, in_chans=in_chans, device=device)
                models[n][seed] = state_of(m)
                acc[n][seed] = {f"on {d}": accuracy(m, te, device=device) for d, (_, te) in doms.items()}
                s.save(f"{n}-seed-{seed}".replace(" ", "_").replace("/", "_"), models[n][seed])
        s.lap("finetune", t1)
        s.note(f"fine-tuned {len(seeds)} models per domain from one pre-trained model (source accuracy "
               f"{source_acc:.3f}): " + "; ".join(
                   f"{n} on its test set " + ", ".join(f"{acc[n][x][f'on {n}']:.3f}" for x in seeds) for n in doms))

        t2 = time.perf_counter()
        has_bn = has_batchnorm(template)
        protocols = bn_protocols(an, template)
        within, cross, l2 = _barriers(s, doms, models, k, in_chans, protocols)
        s.lap("barriers", t2)

    findings, summary = _findings(within, cross, seeds, an, protocols, na, nb,
                                  n_test={n: len(te) for n, (_, te) in doms.items()})
    rows = [[i, seeds[i], n, p, within[n][p][i], cross[n][p][i]] for n in doms for p in protocols
            for i in range(len(seeds))]
    s.csv("cross_domain.csv", ["pair", "seed", "evaluated_on", "protocol", "within_barrier", "cross_barrier"], rows)
    _plot(within, cross, protocols, s.figure("cross_domain.png"), force)
    for f in findings:
        f["figures"] = list(s.figures)
    results = {"source_accuracy": source_acc, "has_batchnorm": has_bn, "protocols": protocols,
               "domains": {n: {"train": len(tr), "test": len(te),
                               "accuracy": {str(x): acc[n][x] for x in seeds}} for n, (tr, te) in doms.items()},
               "within": within, "cross": cross, "l2": l2, "l2_interval": {
                   kk: t_interval(v).to_dict() for kk, v in l2.items()}, **summary}
    return s.finish(findings, results, _render(cfg, results, findings))


def _barriers(s: Any, doms: dict, models: dict, k: int, in_chans: int, protocols: list[str]) -> tuple[dict, dict,
                                                                                                      dict]:
    """Within- and cross-domain barriers on each domain's test set under each protocol, and the L2 distances."""
    from ..analysis.distance import distance
    na, nb = list(doms)
    an, spec, seeds = s.cfg["analysis"], s.cfg["model"], s.seeds
    evs = {n: s.evaluator(spec, k, in_chans, te) for n, (_, te) in doms.items()}

    def barrier(x: dict, y: dict, on: str, p: str) -> float:
        return error_barrier(x, y, evs[on], doms[on][1], an["steps"], doms[on][0] if p == "re-estimated" else None)

    within: dict[str, dict[str, list[float]]] = {n: {p: [] for p in protocols} for n in doms}
    cross: dict[str, dict[str, list[float]]] = {n: {p: [] for p in protocols} for n in doms}
    l2 = {"within " + n: [] for n in doms} | {"cross": []}
    for i, seed in enumerate(seeds):
        nxt = seeds[(i + 1) % len(seeds)]
        for n in doms:
            for p in protocols:
                within[n][p].append(barrier(models[n][seed], models[n][nxt], n, p))
                cross[n][p].append(barrier(models[na][seed], models[nb][seed], n, p))
            l2["within " + n].append(distance(models[n][seed], models[n][nxt])["total"]["l2"])
        l2["cross"].append(distance(models[na][seed], models[nb][seed])["total"]["l2"])
    return within, cross, l2


def _findings(within: dict, cross: dict, seeds: list[int], an: dict, protocols: list[str], na: str,
              nb: str, n_test: dict[str, int] | None = None) -> tuple[list, dict]:
    """(a) within-domain barriers below ``no_barrier_below`` and (b) cross − within above ``margin``, per domain and
    protocol. Within pairs are cyclic (seed i with seed i+1), so values share seeds: each interval is a jackknife
    over the seeds (a seed's models of both domains are one unit). Sub-checks combine over domains, then over
    protocols (:func:`.verdicts.by_protocol`). Pure: per-pair numbers in."""
    tol, margin = float(an["no_barrier_below"]), float(an["margin"])
    k = len(seeds)
    units = [[seeds[i], seeds[(i + 1) % k]] for i in range(k)]
    nt = n_test or {}
    checks_a = {f"{n}/{p}": check(f"within_{n}_{p}", within[n][p], None, tol, "below", units=units,
                                  n_test=nt.get(n), what=f"within-domain barrier on {n} ({PROTOCOLS[p]})")
                for n in within for p in protocols}
    checks_b = {f"{n}/{p}": check(f"cross_minus_within_{n}_{p}", cross[n][p], within[n][p], margin, "above",
                                  units=units, n_test=nt.get(n), what=f"cross − within barrier on {n} ({PROTOCOLS[p]})")
                for n in within for p in protocols}

    def verdict(checks: dict) -> tuple[str, dict]:
        per = {p: combine([c["verdict"] for key, c in checks.items() if key.endswith(f"/{p}")]) for p in protocols}
        return by_protocol(per), per
    text_a = (f"Error barrier between two models fine-tuned on the same domain with different seeds (chord, test set "
              f"of that domain), {len(seeds)} cyclic pairs per domain (jackknife over the seeds they share, widened by "
              f"the test set's noise). Needs the 95% interval below {tol:g}: "
              + "; ".join(c["text"] for c in checks_a.values()) + ".")
    means = "; ".join(f"on {n} ({p}): within {fmt_interval(t_interval(within[n][p]))}, cross "
                      f"{fmt_interval(t_interval(cross[n][p]))}" for n in within for p in protocols)
    text_b = (f"Error barrier between the {na} and the {nb} model of each seed, evaluated on each domain's test set, "
              f"vs the within-domain barrier of that domain: {means}. Paired by seed, cross − within needs its 95% "
              f"t-interval above {margin:g}: " + "; ".join(c["text"] for c in checks_b.values()) + ".")
    findings = [
        {"id": "a", "claim": "P-T models fine-tuned on one domain share a basin (no barrier between them).",
         "verdict": verdict(checks_a)[0], "numbers": text_a, "verdict_by_protocol": verdict(checks_a)[1],
         "sub_verdicts": {k: c["verdict"] for k, c in checks_a.items()},
         "table": "cross_domain.csv"},
        {"id": "b", "claim": f"P-T models fine-tuned on different domains ({na}, {nb}; one label set) are separated "
                             "by a barrier larger than the within-domain one, on either domain's test set.",
         "verdict": verdict(checks_b)[0], "numbers": text_b, "verdict_by_protocol": verdict(checks_b)[1],
         "sub_verdicts": {k: c["verdict"] for k, c in checks_b.items()},
         "table": "cross_domain.csv"},
    ]
    return findings, {"checks": {"a": checks_a, "b": checks_b}, "no_barrier_below": tol, "margin": margin}


def _plot(within: dict, cross: dict, protocols: list[str], path: Any, force: bool) -> None:
    from ..report import COLORS, new_figure, save_figure
    fig, (ax,) = new_figure(size=(6, 4))
    labels, pos = [], 0
    for n in within:
        for p in protocols:
            for j, (what, vals) in enumerate((("within", within[n][p]), ("cross", cross[n][p]))):
                iv = t_interval(vals)
                ax.bar(pos, iv.mean, color=COLORS[j], yerr=[[iv.mean - iv.low], [iv.high - iv.mean]]
                       if iv.n > 1 and iv.high == iv.high else None, capsize=3)
                ax.scatter([pos] * len(vals), vals, s=8, color="black", zorder=3)
                labels.append(f"{what}\non {n}\n({p})")
                pos += 1
        pos += 0.5
    ax.set_xticks([i + 0.5 * (i // (2 * len(protocols))) for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("error barrier (test set of the domain)")
    ax.set_title("within- vs cross-domain barriers (mean ± 95% t-interval, dots: pairs)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, force=force)


def _render(cfg: dict, results: dict, findings: list[dict]) -> str:
    from ..report import markdown_table
    pre, ft = cfg["pretrain"], cfg["finetune"]
    doms = results["domains"]
    setup = [(f"Source: the published weights `{cfg['pretrained']}` (not pre-trained here); accuracy on "
              f"`{cfg['source']['test']}` {results['source_accuracy']:.4f}." if cfg["pretrained"] else
              f"Source: `{cfg['source']['train']}`, pre-trained once (seed {pre['seed']}, {pre['epochs']} epochs, lr "
              f"{pre['lr']}); source test accuracy {results['source_accuracy']:.4f}."),
             "Domains (one label set): " + "; ".join(
                 f"{d['name']} (`{d.get('spec', cfg['target']['spec'])}`, transform {d.get('transform') or 'none'}, "
                 f"{doms[d['name']]['train']} train / {doms[d['name']]['test']} test)" for d in cfg["domains"]) + ".",
             f"Fine-tuning: from the pre-trained model with {cfg['reset']} replaced by one random head (seed "
             f"{cfg['head_seed']}), {ft['epochs']} epochs, lr {ft['lr']}, batch {ft['batch_size']}; seeds "
             f"{cfg['seeds']}.",
             f"Barriers: chord error barrier, {cfg['analysis']['steps']} points, "
             + " and ".join(PROTOCOLS[p] for p in results["protocols"]) + " (re-estimated on the training data of "
             "the domain evaluated)."]
    names = list(doms)
    rows = [[n, str(x), *[a[f"on {m}"] for m in names]] for n in names for x, a in doms[n]["accuracy"].items()]
    iv = lambda x: fmt_interval(Interval(x["mean"], x["low"], x["high"], x["n"], x["level"]))  # noqa: E731
    body = ["## Models", "", "Test accuracy of every fine-tuned model on each domain:", "",
            markdown_table(["fine-tuned on", "seed", *[f"on {m}" for m in names]], rows), "",
            "Parameter L2 distance between paired models: " + "; ".join(
                f"{kk} {iv(v)}" for kk, v in results["l2_interval"].items()) + "."]
    return render_report(cfg, setup, body, findings)


register_recipe(KIND, "Interpolation across target domains",
                "barrier(P-T on domain A, P-T on domain B) on each domain vs barrier within a domain",
                "P-T models fine-tuned from one pre-trained model on two domains with one label set; within- and "
                "cross-domain barriers on each domain's test set under both BatchNorm protocols",
                TRANSFER_PAPER, DEFAULTS, run_cross_domain_recipe)
