"""Recipe kind ``transfer`` (Neyshabur, Sedghi & Zhang 2020, "What is being transferred in transfer learning?").

A source model is pre-trained (or published weights are read); fine-tuned-from-pretrained (P-T) and random-init
(RI-T) models are trained on a different target task from one shared initialisation per kind and init seed, with
several data-order seeds; then the analyses of :mod:`.transfer_analyses` (barriers, similarity, rewind,
block_shuffle, criticality) draw the findings. The format is documented in docs/analysis.md;
``recipes/what-is-transferred.yaml`` is the reference recipe.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..registry import Paper
from .config import check_kind, merge_config, overlay_recipe, read_recipe
from .kit import build_task, fresh_state, pt_init, published, register_recipe, render_report, split_per_class
from .transfer_analyses import KINDS, RUNNERS, TransferRun, init_seeds, model_label
from .verdicts import has_batchnorm, trained_enough

__all__ = ["DEFAULTS", "ANALYSES", "ANALYSIS_DEFAULTS", "load_transfer_recipe", "prepare", "run_transfer_recipe",
           "TRANSFER_PAPER"]

DEFAULTS: dict[str, Any] = {
    "kind": "transfer",
    "name": "recipe",
    "description": "",
    "seed": 0,
    "threads": None,
    "model": "weightspace.eval.zoo:small_cnn",
    # a source string (hf-hub:timm/resnet50.a1_in1k, a file, ...): the source model's weights, instead of
    # pre-training on data.source (which may then be left out)
    "pretrained": None,
    "data": {"source": {}, "target": {}},
    "train": {
        "pretrain": {"epochs": 10, "lr": 0.05, "batch_size": 64, "weight_decay": 0.0, "augment": "none",
                     "momentum": 0.9, "seed": 0},
        "finetune": {"epochs": 10, "lr": 0.05, "batch_size": 64, "weight_decay": 0.0, "augment": "none",
                     "momentum": 0.9, "eval_every": 0},
        "init_seeds": [0],
        "seeds": [1, 2],
        "reset": ["fc"],
        # findings comparing P-T with RI-T need both kinds at this mean target test accuracy (None: twice chance)
        "min_accuracy": None,
    },
    "analyses": {},
    "small": {},
}
ANALYSES = ("barriers", "similarity", "rewind", "block_shuffle", "criticality")
ANALYSIS_DEFAULTS: dict[str, dict] = {
    "barriers": {"steps": 11, "no_barrier_below": 0.02, "recalibrate_bn": True},
    # full_limit: test sets larger than this get the minibatch estimate of linear CKA only: the activations of a
    # big model on a whole test set do not fit in memory (ResNet-50's stem and stages at 224 px: ~9 MB per image
    # and model in float32)
    "similarity": {"modules": "tree:layer", "batch_size": None, "cka_margin": 0.0, "full_limit": 4096},
    "rewind": {"modules": "tree:layer", "to": ["init", "random"], "recalibrate_bn": True},
    "block_shuffle": {"blocks": [], "seed": 0, "seeds": None, "finetune": {}},
    "criticality": {"modules": "tree:layer", "epsilon": 0.1, "relative_epsilon": False, "alphas": 6,
                    "bisect_steps": 6, "sigma_range": [0.01, 1.0], "samples": 2, "seed": 0},
}


def load_transfer_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a transfer recipe (file or dict), apply its ``small:`` overrides (when asked) and KEY=VALUE overrides.

    Raises:
        ConfigError: unreadable or malformed recipe: another kind, an unknown key or analysis, no target data,
            fewer than three data-order seeds, or no init seeds."""
    raw, where = read_recipe(source)
    check_kind(raw, where, "transfer", default="transfer")
    cfg = overlay_recipe(raw, where, DEFAULTS, small=small, overrides=overrides)
    for name, opts in list(cfg["analyses"].items()):
        if name not in ANALYSES:
            raise ConfigError(f"{where}: unknown analysis '{name}' (known: {', '.join(ANALYSES)})")
        cfg["analyses"][name] = merge_config(ANALYSIS_DEFAULTS[name], opts or {}, f"{where}: analyses.{name}")
    if not cfg["data"].get("target") or not (cfg["data"].get("source") or cfg["pretrained"]):
        raise ConfigError(f"{where}: data needs a 'target', and a 'source' unless 'pretrained' names the source "
                          "model's weights")
    seeds = cfg["train"]["seeds"]
    if not isinstance(seeds, list) or len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: train.seeds needs at least three different seeds (verdicts rest on 95% "
                          "t-intervals over seeds)")
    bs = (cfg["analyses"].get("block_shuffle") or {}).get("seeds")
    if bs is not None and (not isinstance(bs, list) or len(set(bs)) < 3):
        raise ConfigError(f"{where}: analyses.block_shuffle.seeds needs at least three different seeds")
    inits = cfg["train"]["init_seeds"]
    if not isinstance(inits, list) or not inits or len(set(inits)) != len(inits):
        raise ConfigError(f"{where}: train.init_seeds needs a list of different seeds, e.g. [7]")
    cfg["where"] = where
    return cfg


def prepare(run: TransferRun) -> None:
    """Data, pre-training, the two initialisations and the fine-tuned models of both kinds."""
    cfg, tr = run.cfg, run.cfg["train"]
    t0 = time.perf_counter()
    shaper: list[torch.nn.Module] = []

    def transform_model() -> torch.nn.Module:  # whose eval transform decodes image sources (one, built once)
        if not shaper:
            from ..eval.models import build_model
            shaper.append(build_model(cfg["model"]))
        return shaper[0]

    src = build_task(cfg["data"]["source"], "source", cfg["where"], transform_model) if cfg["data"].get("source") \
        else None
    tgt_entry = cfg["data"]["target"]
    tgt = build_task(tgt_entry, "target", cfg["where"], transform_model)
    run.in_chans = int((src if src is not None and not cfg["pretrained"] else tgt).x.shape[1])
    per_class = tgt_entry.get("train_per_class")
    if not per_class:
        raise ConfigError(f"{cfg['where']}: data.target needs train_per_class (the rest of the target is its test set)")
    t_train, t_test = split_per_class(tgt, int(per_class), "target")
    run.data = {**({"source": src} if src is not None else {}), "target_train": t_train, "target_test": t_test}
    run.claim_output()  # once the data are read: a bad data spec leaves no folder behind
    for d in run.data.values():
        run.save_data(d)
    run.note(f"data: {f'source {len(src)} examples ({src.num_classes} classes), ' if src is not None else ''}"
             f"target {len(t_train)} train / {len(t_test)} test ({t_train.num_classes} classes)")
    k_tgt = t_train.num_classes
    run.has_bn = has_batchnorm(run.build(k_tgt))
    if cfg["pretrained"]:  # published weights (e.g. ImageNet): no pre-training here, nothing to save again
        source_model = published(cfg["pretrained"])
        run.histories["pretrain"] = {}
        run.note(f"source model: {cfg['pretrained']}")
    else:
        k_src = src.num_classes
        source_model, hist = run.train(fresh_state(cfg["model"], k_src, run.in_chans, int(tr["pretrain"]["seed"])), src,
                                   tr["pretrain"], int(tr["pretrain"]["seed"]), None, k_src)
        run.histories["pretrain"] = {"source": hist}
        run.save("source", source_model)
        run.note(f"pre-trained the source model ({time.perf_counter() - t0:.1f} s)")
    run.timings["pretrain"] = time.perf_counter() - t0
    run.inits = {"RI-T": {}, "P-T": {}}
    for i in init_seeds(cfg):
        random = fresh_state(cfg["model"], k_tgt, run.in_chans, i)
        run.inits["RI-T"][i] = random
        run.inits["P-T"][i] = pt_init(source_model, random, tr["reset"], run.build(k_tgt))
        run.save(f"pt-init-{i}", run.inits["P-T"][i])
        run.save(f"ri-init-{i}", run.inits["RI-T"][i])
    t1 = time.perf_counter()
    for kind in KINDS:
        run.models[kind], run.histories[kind] = {}, {}
        for i in init_seeds(cfg):
            for seed in tr["seeds"]:
                label = model_label(kind, i, seed)
                sd, h = run.train(run.inits[kind][i], t_train, tr["finetune"], seed, t_test, k_tgt)
                run.models[kind][label], run.histories[kind][label] = sd, h
                run.init_of[label] = i
                run.save(label, sd)
    run.timings["finetune"] = time.perf_counter() - t1
    ev = run.evaluator_on(t_test)
    run.results["models"] = {label: ev(sd)["target_test"] for kind in KINDS for label, sd in run.models[kind].items()}
    minimum = tr["min_accuracy"]
    minimum = 2.0 / k_tgt if minimum is None else float(minimum)
    run.results["training"] = trained_enough(
        {kind: [run.results["models"][lb]["accuracy"] for lb in run.models[kind]] for kind in KINDS}, minimum)
    n = len(run.models["P-T"])
    run.note(f"fine-tuned {n} P-T and {n} RI-T models ({run.timings['finetune']:.1f} s)")


def run_transfer_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                        overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                        device: str = "cpu", batch_size: int = 256) -> dict:
    """Run a ``transfer`` recipe end to end into ``out``: checkpoints/, data/, results.json, CSVs, PNGs and REPORT.md.
    Returns {"findings", "timings", "out"}.

    Raises:
        ConfigError: the recipe is malformed or not of kind ``transfer``.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    cfg = load_transfer_recipe(recipe, small=small, overrides=overrides)
    cfg["small_run"] = small
    run = TransferRun(cfg, out, force=force, progress=progress, device=device, batch_size=batch_size)
    with run.threads():
        prepare(run)
        for name, opts in cfg["analyses"].items():
            t = time.perf_counter()
            RUNNERS[name](run, opts)
            run.note(f"{name} done ({run.lap(name, t):.1f} s)")
    return run.finish(run.findings, run.results, _report(run))


def _report(run: TransferRun) -> str:
    """REPORT.md: the setup, every fine-tuned model's accuracy, one section per finding."""
    from ..report import markdown_table
    cfg, d = run.cfg, run.data
    tr = cfg["train"]
    setup = [(f"Source model: the published weights `{cfg['pretrained']}` (not pre-trained here)."
              if cfg["pretrained"] else
              f"Source task: {len(d['source'])} examples, {d['source'].num_classes} classes "
              f"(`{cfg['data']['source'].get('spec')}`); pre-trained {tr['pretrain']['epochs']} epochs."),
             f"Target task: {len(d['target_train'])} training / {len(d['target_test'])} test examples, "
             f"{d['target_train'].num_classes} classes (`{cfg['data']['target'].get('spec')}`, relabelled "
             f"{cfg['data']['target'].get('relabel')}); fine-tuned {tr['finetune']['epochs']} epochs, lr "
             f"{tr['finetune']['lr']}, batch {tr['finetune']['batch_size']}, augment {tr['finetune']['augment']}.",
             f"P-T: pre-trained weights, modules {', '.join(tr['reset'])} re-initialised; RI-T: one random "
             f"initialisation per init seed ({', '.join(str(i) for i in tr['init_seeds'])}), shared by the RI-T "
             f"models and the P-T heads of that seed. Data-order seeds {', '.join(str(s) for s in tr['seeds'])}: one "
             "P-T and one RI-T model per (init seed, data-order seed); pairs are compared within an init seed.",
             f"Findings comparing P-T with RI-T need both kinds at a mean target test accuracy of "
             f"{run.results['training']['minimum']:.3g} or above: P-T "
             f"{run.results['training']['mean']['P-T']:.3f}, RI-T {run.results['training']['mean']['RI-T']:.3f}."]
    body = ["Target test accuracy of every fine-tuned model:", "",
            markdown_table(["model", "accuracy", "loss"],
                           [[k, v["accuracy"], v["loss"]] for k, v in run.results["models"].items()])]
    return render_report(cfg, setup, body, run.findings,
                         "Checkpoints of every model are in `checkpoints/`, the target data in `data/` (tensor files "
                         "that `--data` accepts), every number in `results.json`.")


TRANSFER_PAPER = Paper("Neyshabur, Sedghi & Zhang", 2020, "What is being transferred in transfer learning?",
                       "NeurIPS 2020", "https://arxiv.org/abs/2008.11687")
register_recipe("transfer", "What is being transferred",
                "barrier(P-T pair) vs barrier(RI-T pair); L2/CKA within pairs; per-module rewinding; block shuffles",
                "pre-trained (P-T) and random-init (RI-T) models fine-tuned on a target task from shared "
                "initialisations, compared by barriers, distances, CKA, module rewinding and block-shuffled inputs",
                TRANSFER_PAPER, DEFAULTS, run_transfer_recipe)
