"""What the smaller recipe kinds share: reading a recipe of one kind, building target tasks from data specs and
input transforms, training a model from given weights, saving checkpoints and writing results.json + REPORT.md.

The kinds built on it (``head2toe-targets``, ``trajectory``, ``cross-domain``, ``saturation-pairs``) each live in
their own module and register themselves in the one registry (family ``recipe``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..eval.data import TensorData

__all__ = ["kind_defaults", "register_recipe", "open_session", "Session", "task", "named_tasks",
           "source_data", "train_from", "state_of", "fresh_state", "render_report", "VERDICT_RULE",
           "rank_correlation", "mean", "with_option", "published", "hub_model_spec", "DIGITS_SOURCE",
           "DIGITS_TARGET", "pt_setup", "bn_protocols", "error_barrier", "train_options", "published_source",
           "build_task", "split_per_class", "pt_init", "InputTransform"]

VERDICT_RULE = ("Each sub-check is *reproduced* only when the 95% interval of its quantity (a t-interval over "
                "seeds, or a jackknife over the models that pairs share, widened by the test set's sampling noise) "
                "lies entirely beyond the threshold its text names; *not reproduced* when it lies entirely on the "
                "other side; *inconclusive* when it straddles it. A finding is *reproduced* when all its sub-checks "
                "are, *not reproduced* when any is refuted, *partly* when some are reproduced and none refuted; "
                "under BatchNorm it must hold with stored and with re-estimated statistics, else the verdict names "
                "the protocol it needs.")

SMALL_CNN = "weightspace.eval.zoo:small_cnn"
DIGITS_SOURCE = {"train": "digits:train", "test": "digits:test"}
DIGITS_TARGET = {"spec": ["digits:val", "digits:test"], "train_per_class": 20}
# keys the registry leaves out of a recipe kind's listed defaults: they name the run, not the experiment
UNLISTED = ("kind", "name", "description", "small")

TRAIN_DEFAULTS = {"epochs": 10, "lr": 0.05, "batch_size": 32, "weight_decay": 0.0005, "momentum": 0.9,
                  "augment": "none"}


def kind_defaults(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """A recipe kind's defaults: the keys every kind starts with (kind, name, description, seed, threads, model),
    then ``options`` (which may replace any of them), then an empty ``small:``."""
    return {"kind": kind, "name": kind, "description": "", "seed": 0, "threads": None, "model": SMALL_CNN,
            **copy.deepcopy(options), "small": {}}


def register_recipe(kind: str, title: str, formula: str, summary: str, paper: Any, defaults: dict,
                    run: Any) -> None:
    """Register a recipe kind (family ``recipe``) with ``run`` as its target; its listed options are ``defaults``
    less the keys that name the run rather than the experiment."""
    from ..registry import Entry, register
    register(Entry("recipe", kind, title, formula, summary, paper,
                   {k: v for k, v in defaults.items() if k not in UNLISTED}, target=run))


def train_options(**changes: Any) -> dict[str, Any]:
    """Training options for :func:`train_from`: the defaults (SGD, weight decay 0.0005, momentum 0.9, no
    augmentation) with ``changes``, in the defaults' key order (extra keys last)."""
    return {**TRAIN_DEFAULTS, **changes}


def open_session(load: Any, recipe: str | os.PathLike | dict, out: str | os.PathLike, *, small: bool,
                 overrides: Sequence[str], force: bool, progress: bool, device: str, batch_size: int) -> "Session":
    """The recipe read by ``load`` (with ``small`` and ``overrides``) and the Session that runs it into ``out``.

    Raises:
        ConfigError: whatever ``load`` raises for a malformed recipe.
    """
    cfg = load(recipe, small=small, overrides=overrides)
    return Session(cfg, out, force=force, progress=progress, device=device, batch_size=batch_size)


class Session:
    """One recipe run: output folder, progress notes, timings, checkpoints, the thread setting."""

    def __init__(self, cfg: dict, out: str | os.PathLike, *, force: bool, progress: bool, device: str,
                 batch_size: int):
        self.cfg, self.out, self.force, self.progress = cfg, Path(out), force, progress
        self.device, self.batch_size = device, batch_size
        self.timings: dict[str, float] = {}
        self.checkpoints: dict[str, str] = {}
        self.figures: list[str] = []
        self.t0 = time.perf_counter()

    def note(self, msg: str) -> None:
        """A progress line on stderr (silent with ``--quiet``)."""
        if self.progress:
            from ..report.terminal import printable
            print(printable(f"[recipe] {msg}"), file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def threads(self) -> Iterator[float]:
        """torch's thread count set to the recipe's ``threads`` (when given) and restored afterwards, with the
        global RNG forked so a run leaves the caller's random state alone; yields the time it starts (for
        :meth:`lap`)."""
        old = torch.get_num_threads()
        if self.cfg.get("threads"):
            torch.set_num_threads(int(self.cfg["threads"]))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.cfg.get("seed", 0)))
                yield time.perf_counter()
        finally:
            torch.set_num_threads(old)

    @property
    def seeds(self) -> list[int]:
        """The recipe's seeds, as integers."""
        return [int(x) for x in self.cfg["seeds"]]

    def claim_output(self) -> None:
        """Refuse an output folder that holds an earlier run (unless forced). Called once the data are read, so a
        bad data spec leaves no folder behind.

        Raises:
            OutputExists: the folder holds results.json or REPORT.md and ``force`` is False.
        """
        import weightspace.report as report
        report.check_outputs(self.out, ["results.json", "REPORT.md", "timing.json"], self.force)

    def target(self, rel: str) -> Path:
        """``out/rel``, checked by the writer rule before it is written (``files.check_targets``): refused when it
        exists and the run is not forced, and never through a linked sub-folder of the run folder.

        Raises:
            OutputExists, OutputError: as ``files.check_targets``."""
        from ..files import check_targets
        path = self.out / rel
        check_targets([path], self.force, root=self.out)
        return path

    def evaluator_of(self, model: torch.nn.Module, data: TensorData) -> Any:
        """An Evaluator of ``model`` on ``data``, on the run's device and batch size."""
        from ..eval.evaluator import Evaluator
        return Evaluator(model, data, device=self.device, batch_size=self.batch_size)

    def evaluator(self, spec: str, num_classes: int, in_chans: int | None, data: TensorData) -> Any:
        """An Evaluator of a fresh ``spec`` model on ``data``, on the run's device and batch size."""
        from ..eval.modules import build_model_for
        return self.evaluator_of(build_model_for(spec, num_classes=num_classes, in_chans=in_chans), data)

    def csv(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Write NAME (a CSV table) in the run folder.

        Raises:
            OutputExists: the file exists and the run is not forced.
        """
        import weightspace.report as report
        report.write_csv(self.target(name), header, rows, force=self.force)

    def lap(self, name: str, since: float) -> float:
        """Record the seconds since ``since`` under ``name``; returns them."""
        self.timings[name] = time.perf_counter() - since
        return self.timings[name]

    def save(self, name: str, sd: dict) -> str:
        """Save a state dict as checkpoints/NAME.safetensors (with provenance); returns the path."""
        from ..files import make_folder
        from ..io.save import save
        path = self.target(f"checkpoints/{name}.safetensors")
        make_folder(path.parent)
        save(sd, path, force=self.force, provenance={"op": "recipe", "recipe": self.cfg["name"], "model": name})
        self.checkpoints[name] = os.path.relpath(path, self.out)
        return str(path)

    def save_data(self, d: TensorData) -> None:
        """Save a data set's tensors as data/NAME.pt (a file ``--data`` accepts).

        Raises:
            OutputExists: the file exists and the run is not forced."""
        from ..files import atomic_output, make_folder
        path = self.target(f"data/{d.name}.pt")
        make_folder(path.parent)
        with atomic_output(path, self.force) as tmp:
            torch.save({"x": d.x.contiguous(), "y": d.y.contiguous()}, tmp)

    def figure(self, name: str) -> Path:
        """The path of a figure in the run folder (listed in results.json)."""
        self.figures.append(name)
        return self.target(name)

    def finish(self, findings: list[dict], results: dict, report: str) -> dict:
        """Write results.json, REPORT.md and timing.json; returns {"findings", "timings", "out"}."""
        import weightspace.report as rep
        self.timings["total"] = time.perf_counter() - self.t0
        public = {k: v for k, v in self.cfg.items() if k != "where"}
        rep.write_json(self.out / "results.json", {"recipe": public, "findings": findings, "results": results,
                                                   "checkpoints": self.checkpoints, "figures": self.figures},
                       force=self.force)
        rep.write_text(self.out / "REPORT.md", report, force=self.force)
        rep.write_json(self.out / "timing.json", {"seconds": self.timings, "threads": torch.get_num_threads()
                                                  if not self.cfg.get("threads") else int(self.cfg["threads"])},
                       force=self.force)
        return {"findings": findings, "timings": self.timings, "out": str(self.out)}


def _take(d: TensorData, idx: torch.Tensor, y: torch.Tensor | None = None, name: str | None = None) -> TensorData:
    return TensorData(name or d.name, d.x[idx].contiguous(), (d.y if y is None else y)[idx], d.num_classes,
                      mean=d.mean, std=d.std,  # uint8 images keep the model's normalisation
                      meta={"classes": d.meta["classes"]} if d.meta.get("classes") else {})


def build_task(entry: dict, name: str, where: str, model: Callable[[], torch.nn.Module] | None = None) -> TensorData:
    """One task's examples: concatenated specs, optionally filtered to ``classes`` and ``relabel``-ed. Image
    sources (folders, ``hfds/``, shards) are decoded with the eval transform of ``model()`` (built on first need);
    the task keeps its own classes whatever the model's head, and the model's mean/std (uint8 images are normalised
    per batch as the model expects).

    Raises:
        ConfigError: a missing spec, an unknown key, a relabel table too short, or specs decoded with different
            normalisations."""
    from ..eval.data import load_data
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


def task(entry: dict, name: str, where: str, model: Any = None) -> tuple[TensorData, TensorData]:
    """A target task's (train, test): ``spec`` (one or a list), optional ``classes``/``relabel``, ``train_per_class``
    images per class for training (the rest is the test set) and an input ``transform`` (weightspace.eval.transforms
    spec, e.g. ``invert`` or ``block-shuffle:2``) applied to both. Image sources (folders, shards, ``hfds/``) are
    decoded with the eval transform of ``model()`` (a callable returning the model, built on first need).

    Raises ConfigError for a missing spec, an unknown key or transform, or a missing train_per_class.
    """
    from ..eval.transforms import parse_transform
    e = dict(entry)
    transform = parse_transform(e.pop("transform", None))
    e.pop("name", None)
    if not e.get("train_per_class"):
        raise ConfigError(f"{where}: {name} needs train_per_class (the rest of its data is its test set)")
    d = build_task(e, name, where, model)
    tr, te = split_per_class(d, int(e["train_per_class"]), name)
    return (replace(tr, x=transform(tr.x).contiguous(), name=f"{name}:train"),
            replace(te, x=transform(te.x).contiguous(), name=f"{name}:test"))


def published_source(spec: str, checkpoint: str, test: str) -> tuple[torch.nn.Module, TensorData]:
    """For a recipe over published weights: the model ``spec`` sized by ``checkpoint`` (e.g. 1,000 ImageNet
    classes), and the source test data ``test`` decoded with that model's eval transform.

    Raises:
        ConfigError: an unknown model or data spec.
        SourceError, CheckpointError: the checkpoint cannot be found or read.
    """
    from ..eval.data import load_data
    from ..eval.modules import build_model_for
    model = build_model_for(spec, checkpoint)
    return model, load_data(test, model=model)


def named_tasks(cfg: dict, entries: Sequence[dict], model: Any = None) -> dict[str, tuple[TensorData, TensorData]]:
    """name → (train, test) for each entry (a ``name`` and its own keys over the recipe's ``target``), in order;
    ``model`` as for :func:`task`.

    Raises:
        ConfigError: as :func:`task`, for any entry.
    """
    out = {}
    for e in entries:
        entry = {**cfg["target"], **{k: v for k, v in e.items() if k != "name"}}
        out[e["name"]] = task(entry, e["name"], cfg["where"], model)
    return out


def source_data(pair: dict) -> tuple[TensorData, TensorData, int]:
    """The (train, test) data a recipe names under ``pair`` (``train:`` and ``test:`` specs) and the number of
    input channels of its images.

    Raises:
        ConfigError: a malformed or unknown data spec.
    """
    from ..eval.data import load_data
    train, test = load_data(pair["train"]), load_data(pair["test"])
    return train, test, int(train.x.shape[1])


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict."""
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def fresh_state(spec: str, num_classes: int, in_chans: int | None, seed: int) -> dict[str, torch.Tensor]:
    """The random initialisation of ``spec`` drawn with ``seed`` (the global RNG is left as it was)."""
    from ..eval.modules import build_model_for
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return state_of(build_model_for(spec, num_classes=num_classes, in_chans=in_chans))


def train_from(spec: str, init: dict | None, data: TensorData, opts: dict, seed: int, *,
               in_chans: int | None = None, on_epoch: Any = None, device: str | None = None,
               eval_data: TensorData | None = None, transform: Callable | None = None,
               num_classes: int | None = None) -> tuple[torch.nn.Module, list]:
    """Build ``spec`` for ``num_classes`` (``data``'s classes when None), load ``init`` (a random init drawn with
    ``seed`` when None) and train it with ``opts`` (epochs, lr, batch_size, weight_decay, momentum, augment,
    optional eval_every) and data order ``seed``, on ``device`` when given (the model stays there). With
    ``eval_data`` the history records its accuracy every ``eval_every`` steps; with ``transform`` the network is
    trained behind that fixed input transform (:class:`InputTransform`). Returns (the trained network in eval mode,
    without the transform, and its history).

    Raises:
        ConfigError: an unknown augmentation."""
    from ..eval.modules import build_model_for
    from ..eval.train import train
    o = {**TRAIN_DEFAULTS, **opts}
    k = data.num_classes if num_classes is None else int(num_classes)
    net = build_model_for(spec, num_classes=k, in_chans=in_chans)
    net.load_state_dict(init if init is not None else fresh_state(spec, k, in_chans, seed))
    model = net if transform is None else InputTransform(transform, net)
    hist = train(model, data, epochs=int(o["epochs"]), lr=float(o["lr"]), weight_decay=float(o["weight_decay"]),
                 momentum=float(o["momentum"]), batch_size=int(o["batch_size"]), seed=int(seed),
                 augment=o["augment"], on_epoch=on_epoch, device=device, eval_data=eval_data,
                 eval_every=int(o.get("eval_every") or 0))
    return net, hist


class InputTransform(torch.nn.Module):
    """A fixed transform in front of a network, so training augments the raw image before the transform."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], net: torch.nn.Module):
        super().__init__()
        self.transform = transform
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.transform(x))


def pt_init(source: dict, random: dict, reset: Sequence[str], model: torch.nn.Module) -> dict:
    """P-T initialisation: the pre-trained weights, with the ``reset`` modules (e.g. the head) from ``random``.

    Raises:
        ConfigError: a ``reset`` name that is no module of ``model``, or a tensor that differs in shape between
            the source and the target model outside the reset modules."""
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


def pt_setup(cfg: dict, num_classes: int, in_chans: int | None) -> tuple[torch.nn.Module,
                                                                         Callable[[dict], dict]]:
    """P-T fine-tuning on a target of ``num_classes``: a template of the recipe's model, and the function that turns
    a pre-trained state into the fine-tuning start (the ``reset`` modules replaced by one random head, drawn with
    ``head_seed`` and shared by every start)."""
    from ..eval.modules import build_model_for
    spec = cfg["model"]
    head = fresh_state(spec, num_classes, in_chans, int(cfg["head_seed"]))
    template = build_model_for(spec, num_classes=num_classes, in_chans=in_chans)
    return template, lambda sd: pt_init(sd, head, cfg["reset"], template)


def bn_protocols(analysis: dict, template: torch.nn.Module) -> list[str]:
    """The BatchNorm protocols a barrier is measured under: ``stored``, and ``re-estimated`` when the recipe's
    ``analysis.recalibrate_bn`` asks for it and the model has BatchNorm."""
    from .verdicts import has_batchnorm
    return ["stored"] + (["re-estimated"] if analysis["recalibrate_bn"] and has_batchnorm(template) else [])


def error_barrier(a: dict, b: dict, ev: Any, on: TensorData, steps: int,
                  recalibrate_bn: TensorData | None = None) -> float:
    """The chord error barrier between ``a`` and ``b`` on ``on`` (the data ``ev`` evaluates), BatchNorm statistics
    re-estimated on ``recalibrate_bn`` at every point when given."""
    from ..analysis.curve import interpolation_curve
    c = interpolation_curve(a, b, ev, steps=int(steps), progress=False, recalibrate_bn=recalibrate_bn)
    return c.barriers[on.name]["error"]["chord"]


def published(source: str) -> dict[str, torch.Tensor]:
    """The weights of a published checkpoint (``hf-hub:ORG/NAME``, a file, ...) as a state dict.

    Raises:
        ConfigError: the source names nothing readable.
        HubError: a Hub id that is neither reachable nor in the local HF cache.
    """
    from ..io.sources import load
    ck = load(source)
    try:
        return ck.materialise()
    finally:
        ck.close()


def hub_model_spec(source: str) -> str:
    """The model spec that builds a published Hub checkpoint's architecture: ``timm:hf-hub:ORG/NAME`` for
    ``hf-hub:ORG/NAME`` (timm reads the repo's config.json: architecture and eval transform).

    Raises ConfigError for a source that is not an hf-hub: id."""
    if source.startswith("hf-hub:"):
        return "timm:" + source
    raise ConfigError(f"{source}: name a published model by its Hub id, hf-hub:ORG/NAME")


def with_option(spec: str, param: str, value: int) -> str:
    """The model spec with ``param=value`` set in its query (added, or replacing the spec's own value)."""
    from urllib.parse import parse_qsl, urlencode
    base, _, query = spec.partition("?")
    opts = dict(parse_qsl(query))
    opts[param] = str(value)
    return f"{base}?{urlencode(opts, safe=':,')}"


def mean(xs: Sequence[float | None]) -> float:
    """Mean of the finite values (nan when there are none)."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else float("nan")


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import spearmanr
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def render_report(cfg: dict, setup: Sequence[str], body: Sequence[str], findings: Sequence[dict],
                  closing: str = "") -> str:
    """REPORT.md: title, description, setup bullets, the body (tables), then every finding with its verdict (and
    the table it draws on), and a ``closing`` line saying where the files are."""
    from ..report import markdown_table
    lines = [f"# {cfg['name']}", ""]
    if cfg.get("description"):
        lines += [str(cfg["description"]).strip(), ""]
    size = " (reduced size: --small)" if cfg.get("small_run") else ""
    lines += ["## Setup", "", f"- Recipe `{cfg['where']}`, kind `{cfg['kind']}`{size}; model `{cfg['model']}`.",
              *[f"- {s}" for s in setup], "", *body, "", "## Findings", "", VERDICT_RULE, "",
              markdown_table(["finding", "verdict"], [[f["id"], f["verdict"]] for f in findings]), ""]
    for f in findings:
        lines += [f"### ({f['id']}) {f['claim']}", "", f"**{f['verdict'].upper()}.** {f['numbers']}", ""]
        lines += [f"![{fig}]({fig})" for fig in f.get("figures", [])] + ([""] if f.get("figures") else [])
        lines += [f"Table: `{f['table']}`.", ""] if f.get("table") else []
    lines += [closing or "Every number is in `results.json`; checkpoints are in `checkpoints/`.", ""]
    return "\n".join(lines)
