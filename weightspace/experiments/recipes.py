"""Recipes: small YAML files that describe an experiment (data, model, training schedule, analyses) and a runner
that trains the models, runs the analyses and writes results.json, PNGs and a REPORT.md with a verdict per finding.

One recipe kind exists: ``transfer`` (Neyshabur, Sedghi & Zhang 2020, "What is being transferred in transfer
learning?"). A source model is pre-trained; fine-tuned-from-pretrained (P-T) and random-init (RI-T) models are
trained on a different target task from one shared initialisation per kind, with several data-order seeds; then

- ``barriers``      (a) error barriers between pairs of P-T models vs pairs of RI-T models;
- ``similarity``    (b) L2 distance and CKA between P-T pairs vs RI-T pairs;
- ``rewind``        (c) rewinding one module at a time to its initial value: lower vs upper modules;
- ``block_shuffle`` (d) the benefit of pre-training and the learning speed as the target images' blocks shrink;
- ``criticality``   (optional) module criticality of one P-T and one RI-T model.

The format is documented in docs/analysis.md; ``recipes/what-is-transferred.yaml`` is the reference recipe.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..eval.data import TensorData, load_data
from ..errors import ConfigError
from ..registry import Entry, Paper, register
from ..report.stats import Interval, fmt_interval, t_interval
from .verdicts import PROTOCOLS, check, combine, has_batchnorm

__all__ = ["overlay_recipe", "KINDS", "DEFAULTS", "ANALYSES", "ANALYSIS_DEFAULTS", "merge_config", "set_path", "parse_override",
           "read_recipe", "load_recipe", "build_task", "split_per_class", "Run", "InputTransform", "pt_init",
           "model_label", "prepare", "init_seeds", "analyse_barriers", "analyse_similarity", "analyse_rewind",
           "analyse_block_shuffle", "analyse_criticality", "RUNNERS", "render_report", "run_transfer_recipe",
           "TRANSFER_PAPER"]

KINDS = ("P-T", "RI-T")

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


# --------------------------------------------------------------------------------------------- the config
def merge_config(base: dict, extra: dict, where: str, strict: bool = True) -> dict:
    """``base`` updated by ``extra``, nested dicts merged key by key (``base`` itself is not changed).

    Raises:
        ConfigError: with ``strict``, a key of ``extra`` that ``base`` lacks (named with ``where``)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if strict and k not in base:
            raise ConfigError(f"{where}: unknown key '{k}' (known: {', '.join(base)})")
        if isinstance(v, dict) and isinstance(base.get(k), dict) and base[k]:
            out[k] = merge_config(base[k], v, f"{where}.{k}", strict)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_path(cfg: dict, dotted: str, value: Any, where: str) -> None:
    """Set ``a.b.c`` in a nested dict (creating dicts on the way)."""
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"{where}: '{dotted}' goes through '{k}', which is not a mapping")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.finetune.epochs=3' → ('train.finetune.epochs', 3) (the value is read as YAML)."""
    import yaml
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. train.finetune.epochs=3")
    return key.strip(), yaml.safe_load(raw)


def read_recipe(source: str | os.PathLike | dict) -> tuple[dict, str]:
    """A recipe's raw mapping (a copy when given a dict) and where it came from, with one-line errors."""
    import yaml
    if isinstance(source, dict):
        return copy.deepcopy(source), "<recipe>"
    where = os.fspath(source)
    try:
        raw = yaml.safe_load(Path(where).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the recipe ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe is a YAML mapping")
    return raw, where


def overlay_recipe(raw: dict, where: str, defaults: dict, *, small: bool = False,
                   overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """``defaults`` overlaid with the recipe ``raw`` once its ``small:`` overrides (when asked) and then the
    KEY=VALUE ``overrides`` are set in it; every recipe kind's loader reads its file this way.

    Raises:
        ConfigError: a malformed override, or a key that ``defaults`` does not know (named with ``where``)."""
    pending = list((raw.get("small") or {}).items()) if small else []
    pending += [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    for k, v in pending:
        set_path(raw, k, v, where)
    return merge_config(defaults, raw, where)


def load_recipe(source: str | os.PathLike | dict, *, small: bool = False,
                overrides: Sequence[str | tuple[str, Any]] = ()) -> dict:
    """Read a recipe (file or dict), apply its ``small:`` overrides (when asked) and KEY=VALUE overrides."""
    raw, where = read_recipe(source)
    if raw.get("kind", "transfer") != "transfer":
        raise ConfigError(f"{where}: not a transfer recipe (kind: {raw.get('kind')}); run it with run_recipe")
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


# -------------------------------------------------------------------------------------------------- data
def _take(d: TensorData, idx: torch.Tensor, y: torch.Tensor | None = None, name: str | None = None) -> TensorData:
    return TensorData(name or d.name, d.x[idx].contiguous(), (d.y if y is None else y)[idx], d.num_classes,
                      mean=d.mean, std=d.std,  # uint8 images keep the model's normalisation
                      meta={"classes": d.meta["classes"]} if d.meta.get("classes") else {})


def build_task(entry: dict, name: str, where: str, model: Callable[[], torch.nn.Module] | None = None) -> TensorData:
    """One task's examples: concatenated specs, optionally filtered to ``classes`` and ``relabel``-ed. Image
    sources (folders, ``hfds/``, shards) are decoded with the eval transform of ``model()`` (built on first need);
    the task keeps its own classes whatever the model's head, and the model's mean/std (uint8 images are normalised
    per batch as the model expects).

    Raises ConfigError for a missing spec, an unknown key, a relabel table too short, or specs decoded with
    different normalisations."""
    from ..eval.data.readers import is_image_source
    known = {"spec", "classes", "relabel", "train_per_class"}
    bad = set(entry) - known
    if bad:
        raise ConfigError(f"{where}: data.{name}: unknown key(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
    specs = entry.get("spec")
    if not specs:
        raise ConfigError(f"{where}: data.{name} needs a 'spec' (e.g. digits:train)")
    parts = [load_data(s, model=model() if model is not None and is_image_source(s.split("?", 1)[0]) else None,
                       map_labels=False) for s in (specs if isinstance(specs, list) else [specs])]
    x, y = torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])
    names = parts[0].meta.get("classes") if len(parts) == 1 else None  # class folder names, when one source
    if entry.get("classes") is not None:
        classes = [int(c) for c in entry["classes"]]
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
        y = torch.tensor([classes.index(int(v)) for v in y], dtype=torch.long)
        names = [names[c] for c in classes] if names and max(classes) < len(names) else None
    original = y.clone()
    if entry.get("relabel") is not None:
        table = [int(v) for v in entry["relabel"]]
        if int(y.max()) >= len(table):
            raise ConfigError(f"{where}: data.{name}.relabel maps {len(table)} labels, the data has {int(y.max()) + 1}")
        y = torch.tensor(table, dtype=torch.long)[y]
        names = None
    norms = {(p.mean, p.std) for p in parts}
    if len(norms) > 1:
        raise ConfigError(f"{where}: data.{name}: its specs are normalised differently ({', '.join(map(str, norms))})")
    mean, std = norms.pop()
    d = TensorData(name, x.contiguous(), y, num_classes=int(y.max()) + 1, mean=mean, std=std)
    d.meta = {"original_labels": original, **({"classes": list(names)} if names else {})}
    return d


def split_per_class(d: TensorData, per_class: int, name: str) -> tuple[TensorData, TensorData]:
    """The first ``per_class`` examples of every original class → train; the rest → test (deterministic)."""
    original = d.meta["original_labels"]
    train_idx = torch.cat([torch.nonzero(original == c).squeeze(1)[:per_class] for c in torch.unique(original)])
    train_idx = torch.sort(train_idx).values
    mask = torch.ones(len(d), dtype=torch.bool)
    mask[train_idx] = False
    return _take(d, train_idx, name=f"{name}_train"), _take(d, torch.nonzero(mask).squeeze(1), name=f"{name}_test")


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class Run:
    """Everything a recipe produced, kept in memory for the analyses."""

    cfg: dict
    out: Path
    data: dict[str, TensorData]
    in_chans: int | None = None
    inits: dict[str, dict[int, dict]] = field(default_factory=dict)  # kind → init seed → state dict
    models: dict[str, dict[str, dict]] = field(default_factory=dict)  # kind → model label → state dict
    init_of: dict[str, int] = field(default_factory=dict)  # model label → its init seed
    histories: dict[str, dict[str, list]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    progress: bool = True
    device: str = "cpu"
    batch_size: int = 256
    force: bool = False
    has_bn: bool = True

    def build(self, num_classes: int) -> torch.nn.Module:
        """A fresh model of the recipe's architecture (random weights from the global RNG)."""
        from ..eval.modules import build_model_for
        return build_model_for(self.cfg["model"], num_classes=num_classes, in_chans=self.in_chans)

    def note(self, msg: str) -> None:
        """Progress note on stderr."""
        if self.progress:
            import sys
            print(f"[recipe] {msg}", file=sys.stderr, flush=True)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


class InputTransform(torch.nn.Module):
    """A fixed transform in front of a network, so training augments the raw image before the transform."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], net: torch.nn.Module):
        super().__init__()
        self.transform = transform
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.transform(x))


def _train(run: Run, init: dict, data: TensorData, opts: dict, seed: int, eval_data: TensorData | None,
           num_classes: int, transform: Callable | None = None) -> tuple[dict, list]:
    from ..eval.train import train
    net = run.build(num_classes)
    net.load_state_dict(init)
    model = net if transform is None else InputTransform(transform, net)
    hist = train(model, data, epochs=int(opts["epochs"]), lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]),
                 momentum=float(opts["momentum"]), batch_size=int(opts["batch_size"]), seed=int(seed),
                 augment=opts["augment"], eval_data=eval_data, eval_every=int(opts.get("eval_every") or 0),
                 device=run.device)
    return _state(net), hist


def _seeded_init(run: Run, num_classes: int, seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _state(run.build(num_classes))


def pt_init(source: dict, random: dict, reset: Sequence[str], model: torch.nn.Module) -> dict:
    """P-T initialisation: the pre-trained weights, with the ``reset`` modules (e.g. the head) from ``random``."""
    from ..eval.modules import grouping
    groups = grouping(list(random), "tree:layer", model)
    unknown = [r for r in reset if r not in groups]
    if unknown:
        raise ConfigError(f"train.reset: no module '{unknown[0]}' (modules: {', '.join(groups)})")
    fresh = {k for r in reset for k in groups[r]}
    out = {}
    for k, v in random.items():
        if k in fresh or (k not in source and not v.is_floating_point()):  # e.g. num_batches_tracked, not published
            out[k] = v
        elif k not in source or tuple(source[k].shape) != tuple(v.shape):
            raise ConfigError(f"train.reset: '{k}' differs between the source and target models; reset its module")
        else:
            out[k] = source[k]
    return out


def _save(run: Run, name: str, sd: dict) -> str:
    from ..files import make_folder
    from ..io.save import save
    path = run.out / "checkpoints" / f"{name}.safetensors"
    make_folder(path.parent)
    save(sd, path, force=run.force, provenance={"op": "recipe", "recipe": run.cfg["name"], "model": name})
    run.checkpoints[name] = str(path)
    return str(path)


def _save_data(run: Run, d: TensorData) -> None:
    from ..files import atomic_output, make_folder
    path = run.out / "data" / f"{d.name}.pt"
    make_folder(path.parent)
    with atomic_output(path, run.force) as tmp:
        torch.save({"x": d.x.contiguous(), "y": d.y.contiguous()}, tmp)


def _evaluator(run: Run, data: TensorData):
    from ..eval.evaluator import Evaluator
    return Evaluator(run.build(data.num_classes), data, device=run.device, batch_size=run.batch_size)


def model_label(kind: str, init_seed: int, seed: int) -> str:
    """'pt-7-1' / 'ri-7-2' (kind, init seed, data-order seed): the file stem of a fine-tuned model."""
    return f"{'pt' if kind == 'P-T' else 'ri'}-{init_seed}-{seed}"


def prepare(run: Run) -> None:
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
    for d in run.data.values():
        _save_data(run, d)
    run.note(f"data: {f'source {len(src)} examples ({src.num_classes} classes), ' if src is not None else ''}"
             f"target {len(t_train)} train / {len(t_test)} test ({t_train.num_classes} classes)")
    k_tgt = t_train.num_classes
    run.has_bn = has_batchnorm(run.build(k_tgt))
    if cfg["pretrained"]:  # published weights (e.g. ImageNet): no pre-training here, nothing to save again
        from ..io.sources import load
        ck = load(cfg["pretrained"])
        try:
            source_model = ck.to_dict()
        finally:
            ck.close()
        run.histories["pretrain"] = {}
        run.note(f"source model: {cfg['pretrained']}")
    else:
        k_src = src.num_classes
        source_model, hist = _train(run, _seeded_init(run, k_src, int(tr["pretrain"]["seed"])), src,
                                    tr["pretrain"], int(tr["pretrain"]["seed"]), None, k_src)
        run.histories["pretrain"] = {"source": hist}
        _save(run, "source", source_model)
        run.note(f"pre-trained the source model ({time.perf_counter() - t0:.1f} s)")
    run.timings["pretrain"] = time.perf_counter() - t0
    run.inits = {"RI-T": {}, "P-T": {}}
    for i in init_seeds(cfg):
        random = _seeded_init(run, k_tgt, i)
        run.inits["RI-T"][i] = random
        run.inits["P-T"][i] = pt_init(source_model, random, tr["reset"], run.build(k_tgt))
        _save(run, f"pt-init-{i}", run.inits["P-T"][i])
        _save(run, f"ri-init-{i}", run.inits["RI-T"][i])
    t1 = time.perf_counter()
    for kind in KINDS:
        run.models[kind], run.histories[kind] = {}, {}
        for i in init_seeds(cfg):
            for seed in tr["seeds"]:
                label = model_label(kind, i, seed)
                sd, h = _train(run, run.inits[kind][i], t_train, tr["finetune"], seed, t_test, k_tgt)
                run.models[kind][label], run.histories[kind][label] = sd, h
                run.init_of[label] = i
                _save(run, label, sd)
    run.timings["finetune"] = time.perf_counter() - t1
    ev = _evaluator(run, t_test)
    run.results["models"] = {label: ev(sd)["target_test"] for kind in KINDS for label, sd in run.models[kind].items()}
    n = len(run.models["P-T"])
    run.note(f"fine-tuned {n} P-T and {n} RI-T models ({run.timings['finetune']:.1f} s)")


def init_seeds(cfg: dict) -> list[int]:
    """The recipe's random initialisations (train.init_seeds)."""
    return [int(i) for i in cfg["train"]["init_seeds"]]


def _pairs(run: Run, kind: str) -> list[tuple[str, str]]:
    """Every pair of models of one kind that share their initialisation (they differ only in data order)."""
    return [(a, b) for a, b in itertools.combinations(run.models[kind], 2) if run.init_of[a] == run.init_of[b]]


def _iv(d: dict) -> Interval:
    return Interval(d["mean"], d["low"], d["high"], d["n"], d["level"])


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _fig(run: Run, name: str) -> Path:
    run.figures.append(name)
    return run.out / name


# ------------------------------------------------------------------------------------------- the analyses
def analyse_barriers(run: Run, opts: dict) -> None:
    """(a) Error barriers along the line between two models, for every pair of each kind."""
    from .. import report
    from ..analysis.curve import CurveSet, interpolation_curve
    test = run.data["target_test"]
    ev = _evaluator(run, test)
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
    report.write_csv(run.out / "barriers.csv", ["kind", "pair", "error_barrier", "loss_barrier",
                                                "error_barrier_bn_recalibrated", "loss_barrier_bn_recalibrated"],
                     rows, force=run.force)
    CurveSet(curves).plot(_fig(run, "barriers.png"), force=run.force)
    tol = float(opts["no_barrier_below"])
    protocols = {"stored": "error_barrier"}
    if opts["recalibrate_bn"] and run.has_bn:
        protocols["re-estimated"] = "error_barrier_bn_recalibrated"
    checks = {}
    for proto, key in protocols.items():
        pt_b, ri_b = [e[key] for e in out["P-T"]], [e[key] for e in out["RI-T"]]
        # P-T pair i and RI-T pair i share init seed and data-order seeds: paired differences
        checks[proto] = check(f"barrier_{proto}", ri_b, pt_b, tol, "above",
                              what=f"RI-T − P-T error barrier ({PROTOCOLS[proto]})")
        checks[proto]["pt"] = t_interval(pt_b).to_dict()
        checks[proto]["ri"] = t_interval(ri_b).to_dict()
    summary = {"tolerance": tol, "checks": checks, "protocols": list(protocols),
               "pt_mean": checks["stored"]["pt"]["mean"], "ri_mean": checks["stored"]["ri"]["mean"]}
    if "re-estimated" in checks:
        summary["pt_mean_bn_recalibrated"] = checks["re-estimated"]["pt"]["mean"]
        summary["ri_mean_bn_recalibrated"] = checks["re-estimated"]["ri"]["mean"]
    verdict = combine({p: c["verdict"] for p, c in checks.items()})
    summary["verdict_by_protocol"] = {p: c["verdict"] for p, c in checks.items()}
    run.results["barriers"] = {"pairs": out, "summary": summary}
    n = len(out["P-T"])
    text = (f"Error barrier on the target test set (chord height, {opts['steps']} points), {n} pairs per kind "
            f"(P-T pair i and RI-T pair i share their seeds, so differences are paired); the finding needs the 95% "
            f"t-interval of RI-T − P-T above the 'no barrier' line {tol}. ")
    for proto, c in checks.items():
        text += (f"With {PROTOCOLS[proto]}: P-T {fmt_interval(_iv(c['pt']))}, RI-T {fmt_interval(_iv(c['ri']))}; "
                 f"{c['text']}. ")
    if not run.has_bn:
        text += "The model has no BatchNorm: one protocol applies."
    elif len(checks) > 1 and len(set(summary["verdict_by_protocol"].values())) > 1:
        text += "The two BatchNorm protocols disagree: the verdict depends on the statistics."
    run.findings.append({"id": "a", "claim": "Two P-T models show no error barrier between them; two RI-T models of "
                         "the same recipe do, even from the same random initialisation.",
                         "verdict": verdict, "numbers": text.strip(), "figures": ["barriers.png"],
                         "table": "barriers.csv"})


def _linear_cka(m: dict) -> float | None:
    """A module's linear CKA on the full test set, else its minibatch estimate (sets above full_limit)."""
    return m["linear_cka"] if m.get("linear_cka") is not None else m.get("minibatch_cka")


def analyse_similarity(run: Run, opts: dict) -> None:
    """(b) L2 distance (parameters) and CKA (activations on the target test set) within each kind's pairs."""
    from .. import report
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
                              "mean_linear_cka": _mean(cka),
                              "mean_rbf_cka": _mean([m.get("rbf_cka") for m in r.modules]),
                              "same_prediction": r.agreement["same_prediction"],
                              "agreement": r.agreement["counts"], "modules": r.modules})
            for m in r.modules:
                per_module[kind].setdefault(m["module"], []).append(m)
    modules = list(per_module["P-T"])
    rows = []
    for kind in KINDS:
        for m in modules:
            ms = per_module[kind][m]
            rows.append([kind, m, _mean([_linear_cka(x) for x in ms]), _mean([x.get("rbf_cka") for x in ms]),
                         _mean([x["l2"] for x in ms]), _mean([x["relative_l2"] for x in ms])])
    report.write_csv(run.out / "similarity.csv", ["kind", "module", "linear_cka", "rbf_cka", "l2", "relative_l2"],
                     rows, force=run.force)
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
    report.save_figure(fig, _fig(run, "similarity.png"), force=run.force)
    s = {f"{k}_{q}": _mean([p[q] for p in out[k]]) for k in KINDS for q in ("l2", "relative_l2", "mean_linear_cka",
                                                                             "mean_rbf_cka", "same_prediction")}
    run.results["similarity"] = {"pairs": out, "summary": s, "per_module": rows}
    l2 = check("l2", [p["l2"] for p in out["RI-T"]], [p["l2"] for p in out["P-T"]], 0.0, "above",
               what="RI-T − P-T parameter L2 within pairs")
    cka = check("cka", [p["mean_linear_cka"] for p in out["P-T"]], [p["mean_linear_cka"] for p in out["RI-T"]],
                float(opts["cka_margin"]), "above", what="P-T − RI-T linear CKA (mean over modules)")
    s["checks"] = {"l2": l2, "cka": cka}
    verdict = combine([l2["verdict"], cka["verdict"]])
    text = (f"Parameter L2 within pairs: P-T {s['P-T_l2']:.3f} vs RI-T {s['RI-T_l2']:.3f} (relative "
            f"{s['P-T_relative_l2']:.3f} vs {s['RI-T_relative_l2']:.3f}); linear CKA averaged over modules"
            f"{'' if len(test) <= int(opts['full_limit']) else ' (minibatch estimate: the test set is above full_limit)'}: "
            f"P-T {s['P-T_mean_linear_cka']:.4f} vs RI-T {s['RI-T_mean_linear_cka']:.4f} (RBF "
            f"{s['P-T_mean_rbf_cka']:.4f} vs {s['RI-T_mean_rbf_cka']:.4f}); same prediction on "
            f"{100 * s['P-T_same_prediction']:.1f}% vs {100 * s['RI-T_same_prediction']:.1f}% of test examples. "
            f"Paired over {len(out['P-T'])} pairs: {l2['text']}; {cka['text']}. Activations use each model's own "
            "stored BatchNorm statistics, which match its weights (no interpolation or rewinding is involved).")
    run.findings.append({"id": "b", "claim": "P-T pairs are closer in parameter L2 and more similar in CKA than RI-T pairs.",
                         "verdict": verdict, "numbers": text, "figures": ["similarity.png"], "table": "similarity.csv"})


def analyse_rewind(run: Run, opts: dict) -> None:
    """(c) Rewinding one module at a time (to its value at initialisation, or a fresh random draw)."""
    from .. import report
    from ..analysis.criticality import rewind
    test = run.data["target_test"]
    ev = _evaluator(run, test)
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
        mean_err = {m: {t: _mean(v) for t, v in errors[m].items()} for m in modules}
        mean_delta = {m: _mean(v) for m, v in deltas.items()}
        out[kind] = {"models": per_model, "mean_error": mean_err, "delta_error_init": mean_delta,
                     "delta_error_init_bn_recalibrated": {m: _mean(v) for m, v in recal.items()},
                     "per_model_delta": {"stored": deltas, "re-estimated": recal}}
        for m in modules:
            rows.append([kind, m, mean_err[m]["(FINAL)"], *[mean_err[m][t] for t in targets]])
        fig = report.heatmap([[mean_err[m][t] for t in targets] for m in modules], modules,
                             [f"{kind}: {t}" for t in targets], fmt="{:.3f}", cmap="magma",
                             title=f"{kind}: one module rewound (mean of {len(per_model)})\n"
                                   f"FINAL test error {_mean([mean_err[m]['(FINAL)'] for m in modules]):.3f}",
                             cbar_label="test error")
        report.save_figure(fig, _fig(run, f"rewind_{'pt' if kind == 'P-T' else 'ri'}.png"), force=run.force)
    targets = list(opts["to"])
    report.write_csv(run.out / "rewind.csv", ["kind", "module", "error_final", *[f"error_{t}" for t in targets]], rows,
                     force=run.force)
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
        hi_m = [_mean([per[m][i] for m in upper]) for i in range(n)]
        lo_m = [_mean([per[m][i] for m in lower]) for i in range(n)]
        checks[proto] = check(f"rewind_{proto}", hi_m, lo_m, 0.0, "above",
                              what=f"upper − lower half rewind cost ({PROTOCOLS[proto]})")
        means = {m: _mean(per[m]) for m in body}
        checks[proto]["monotone"] = all(means[a] <= means[b] for a, b in zip(body, body[1:]))
    verdict = combine({p: c["verdict"] for p, c in checks.items()}) if lower else "inconclusive"
    out["checks"] = checks
    ri = out["RI-T"]["delta_error_init"]
    text = (f"P-T models ({n}), each module rewound to its pre-trained value, increase in test error (mean): "
            + ", ".join(f"{m} {pt[m]:+.4f}" for m in pt)
            + f". Lower half of the body: {', '.join(lower)}; upper half: {', '.join(upper)}. Modules re-initialised "
            + f"for the new task ({', '.join(sorted(reset)) or 'none'}) are left out: their 'initial value' is random. "
            + "The finding needs the 95% t-interval (over models) of upper − lower above 0. ")
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
                         "figures": ["rewind_pt.png", "rewind_ri.png"], "table": "rewind.csv"})


def _curve_stats(history: list) -> tuple[list[int], list[float]]:
    pts = [h for h in history if "eval_accuracy" in h]
    return [h["step"] for h in pts], [h["eval_accuracy"] for h in pts]


def analyse_block_shuffle(run: Run, opts: dict) -> None:
    """(d) Fine-tune P-T and RI-T on block-shuffled target images, block sizes from the image size down."""
    from .. import report
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
                _, hist = _train(run, run.inits[kind][first], train_d, ft, seed, test_d, test_d.num_classes, shuffle)
                steps, accs = _curve_stats(hist)
                finals.append(accs[-1])
                aulcs.append(_mean(accs))
                curves.append(accs)
            mean_curve = [_mean(col) for col in zip(*curves)]
            entry[kind] = {"final_accuracy": _mean(finals), "mean_accuracy_over_training": _mean(aulcs),
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
    report.write_csv(run.out / "block_shuffle.csv", ["block", "pt_final_accuracy", "ri_final_accuracy", "benefit",
                                                     "pt_mean_accuracy", "ri_mean_accuracy", "speed_benefit"],
                     rows, force=run.force)
    report.save_figure(report.line_panels(panels, title="learning curves on block-shuffled target data"),
                       _fig(run, "block_shuffle_curves.png"), force=run.force)
    fig = report.line_panels([{"xlabel": "block size", "ylabel": "P-T − RI-T accuracy", "title": "benefit of pre-training",
                               "series": [{"x": [e["block"] for e in out], "y": [e["benefit"] for e in out],
                                           "label": "final accuracy"},
                                          {"x": [e["block"] for e in out], "y": [e["speed_benefit"] for e in out],
                                           "label": "mean accuracy over training"}]}])
    fig.axes[0].axhline(0.0, color="black", linewidth=0.8)
    report.save_figure(fig, _fig(run, "block_shuffle_benefit.png"), force=run.force)
    run.results["block_shuffle"] = {"seeds": seeds, "shuffle_seed": int(opts["seed"]), "blocks": out}
    ordered = sorted(out, key=lambda e: -e["block"])  # image size first, smallest blocks last
    benefits = [e["benefit"] for e in ordered]
    monotone = all(a >= b for a, b in zip(benefits, benefits[1:]))
    first, last = ordered[0], ordered[-1]
    checks = {}
    if len(ordered) > 1:  # same data-order seed at both block sizes: paired
        checks["shrinks"] = check("shrinks", first["per_seed_benefit"], last["per_seed_benefit"], 0.0, "above",
                                  what=f"benefit at block {first['block']} − at block {last['block']}")
    checks["positive"] = check("positive", last["per_seed_benefit"], None, 0.0, "above",
                               what=f"benefit (P-T − RI-T final accuracy) at block {last['block']}")
    for e in ordered:
        checks[f"faster_{e['block']}"] = check(f"faster_{e['block']}", e["per_seed_speed_benefit"], None, 0.0, "above",
                                               what=f"P-T − RI-T mean accuracy over training at block {e['block']}")
    verdict = combine([c["verdict"] for c in checks.values()])
    run.results["block_shuffle"]["checks"] = checks
    text = (f"Benefit of pre-training (P-T − RI-T final test accuracy, {len(seeds)} data-order seeds, paired) by block "
            "size: " + ", ".join(f"{e['block']}: {fmt_interval(t_interval(e['per_seed_benefit']))}" for e in ordered)
            + f" ({'monotone' if monotone else 'not monotone'} in the means). Each check needs its 95% t-interval "
            "above 0: " + "; ".join(c["text"] for c in checks.values()) + ".")
    run.findings.append({"id": "d", "claim": "With block shuffling of decreasing block size, the benefit of pre-training "
                         "shrinks but stays above zero, and P-T still converges faster.", "verdict": verdict,
                         "numbers": text, "figures": ["block_shuffle_curves.png", "block_shuffle_benefit.png"],
                         "table": "block_shuffle.csv"})


def analyse_criticality(run: Run, opts: dict) -> None:
    """Module criticality (Chatterji et al.) of every P-T and RI-T model on the target training data, with stored
    and (for BatchNorm models) re-estimated statistics; Σμ compared between kinds with a t-interval."""
    from ..analysis.criticality import module_criticality
    train_d = run.data["target_train"]
    ev = _evaluator(run, train_d)
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


RUNNERS: dict[str, Callable[[Run, dict], None]] = {
    "barriers": analyse_barriers, "similarity": analyse_similarity, "rewind": analyse_rewind,
    "block_shuffle": analyse_block_shuffle, "criticality": analyse_criticality,
}


# ---------------------------------------------------------------------------------------------- the report
def render_report(run: Run) -> str:
    """REPORT.md: settings, models, and one section per finding with its verdict and numbers."""
    from ..report import markdown_table
    cfg = run.cfg
    tr = cfg["train"]
    lines = [f"# {cfg['name']}", ""]
    if cfg["description"]:
        lines += [cfg["description"].strip(), ""]
    d = run.data
    lines += ["## Setup", "",
              f"- Model: `{cfg['model']}`; recipe `{cfg['where']}`{' (reduced size: --small)' if cfg.get('small_run') else ''}.",
              (f"- Source model: the published weights `{cfg['pretrained']}` (not pre-trained here)."
               if cfg["pretrained"] else
               f"- Source task: {len(d['source'])} examples, {d['source'].num_classes} classes "
               f"(`{cfg['data']['source'].get('spec')}`); pre-trained {tr['pretrain']['epochs']} epochs."),
              f"- Target task: {len(d['target_train'])} training / {len(d['target_test'])} test examples, "
              f"{d['target_train'].num_classes} classes (`{cfg['data']['target'].get('spec')}`, relabelled "
              f"{cfg['data']['target'].get('relabel')}); fine-tuned {tr['finetune']['epochs']} epochs, lr "
              f"{tr['finetune']['lr']}, batch {tr['finetune']['batch_size']}, augment {tr['finetune']['augment']}.",
              f"- P-T: pre-trained weights, modules {', '.join(tr['reset'])} re-initialised; RI-T: one random "
              f"initialisation per init seed ({', '.join(str(i) for i in tr['init_seeds'])}), shared by the RI-T models "
              f"and the P-T heads of that seed. Data-order seeds {', '.join(str(s) for s in tr['seeds'])}: one P-T and "
              f"one RI-T model per (init seed, data-order seed); pairs are compared within an init seed.", "",
              "Target test accuracy of every fine-tuned model:", "",
              markdown_table(["model", "accuracy", "loss"],
                             [[k, v["accuracy"], v["loss"]] for k, v in run.results["models"].items()]), "",
              "## Findings", "",
              "A finding is *reproduced* only when the 95% Student-t interval of the difference between its two "
              "conditions (over seeds or pairs of seeds) lies entirely beyond the threshold named in its text; "
              "*not reproduced* when it lies entirely on the other side; *inconclusive* when it straddles it. Verdicts "
              "that involve BatchNorm statistics are drawn with the stored statistics and with statistics re-estimated "
              "on the target training data; *partly* means the protocols (or the finding's sub-checks) disagree.", "",
              markdown_table(["finding", "verdict"], [[f["id"], f["verdict"]] for f in run.findings]), ""]
    for f in run.findings:
        lines += [f"### ({f['id']}) {f['claim']}", "", f"**{f['verdict'].upper()}.** {f['numbers']}", ""]
        lines += [f"![{fig}]({fig})" for fig in f["figures"]]
        if f.get("table"):
            lines += ["", f"Table: `{f['table']}`."]
        lines.append("")
    lines += ["Checkpoints of every model are in `checkpoints/`, the target data in `data/` (tensor files that "
              "`--data` accepts), every number in `results.json`.", ""]
    return "\n".join(lines)


def run_transfer_recipe(recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool = False,
                        overrides: Sequence[str] = (), force: bool = False, progress: bool = True,
                        device: str = "cpu", batch_size: int = 256) -> dict:
    """Run a ``transfer`` recipe end to end into ``out``: checkpoints/, data/, results.json, CSVs, PNGs and REPORT.md.

    Raises:
        ConfigError: the recipe is malformed or not of kind ``transfer``.
        OutputExists: ``out`` holds an earlier run and ``force`` is False.
    """
    from .. import report
    cfg = load_recipe(recipe, small=small, overrides=overrides)
    cfg["small_run"] = small
    out = Path(out)
    report.check_outputs(out, ["results.json", "REPORT.md"], force)
    run = Run(cfg=cfg, out=out, data={}, progress=progress, device=device, batch_size=batch_size, force=force)
    threads = cfg.get("threads")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            prepare(run)
            for name, opts in cfg["analyses"].items():
                t = time.perf_counter()
                RUNNERS[name](run, opts)
                run.timings[name] = time.perf_counter() - t
                run.note(f"{name} done ({run.timings[name]:.1f} s)")
    finally:
        torch.set_num_threads(old_threads)
    run.timings["total"] = time.perf_counter() - t0
    public_cfg = {k: v for k, v in cfg.items() if k not in ("where",)}
    results = {"recipe": public_cfg, "findings": run.findings, "results": run.results,
               "checkpoints": {k: os.path.relpath(v, out) for k, v in run.checkpoints.items()},
               "figures": run.figures}
    report.write_json(out / "results.json", results, force=force)
    report.write_text(out / "REPORT.md", render_report(run), force=force)
    # Wall-clock times differ run to run; they stay out of results.json and REPORT.md (same inputs, same bytes).
    report.write_json(out / "timing.json", {"seconds": run.timings, "threads": torch.get_num_threads() if not threads
                                            else int(threads)}, force=True)
    return {"findings": run.findings, "timings": run.timings, "out": str(out)}


TRANSFER_PAPER = Paper("Neyshabur, Sedghi & Zhang", 2020, "What is being transferred in transfer learning?",
                       "NeurIPS 2020", "https://arxiv.org/abs/2008.11687")
register(Entry("recipe", "transfer", "What is being transferred",
               "barrier(P-T pair) vs barrier(RI-T pair); L2/CKA within pairs; per-module rewinding; block shuffles",
               "pre-trained (P-T) and random-init (RI-T) models fine-tuned on a target task from shared "
               "initialisations, compared by barriers, distances, CKA, module rewinding and block-shuffled inputs",
               TRANSFER_PAPER, {k: v for k, v in DEFAULTS.items() if k not in ("kind", "name", "description", "small")}, target=run_transfer_recipe))
