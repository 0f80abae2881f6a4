"""Layer probes: a linear classifier on each tapped layer's pooled features ("move the head to different layers").

The linear head is multinomial logistic regression on standardised features (z-scored with the training set's
mean and standard deviation), trained full-batch with L-BFGS from zero weights: deterministic, no seed needed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..eval.data import TensorData
from ..errors import ConfigError
from ..io.checkpoint import Source
from .taps import Features, FeatureTaps

if TYPE_CHECKING:
    from ..eval.evaluator import Evaluator

__all__ = ["L2", "MAX_ITER", "LinearHead", "fit_linear", "num_classes_of", "ProbeResult", "probe_features",
           "checkpoint_labels", "probe", "build_net", "setup", "load_weights"]

L2 = 1e-3        # weight decay on the mean cross-entropy (≈ scikit-learn's C=1 at N=1000); scale-free on z-scores
MAX_ITER = 50    # L-BFGS iterations (strong-Wolfe line search); digits probes reach their final test accuracy by ~25


@dataclass
class LinearHead:
    """A trained linear classifier: logits = ((x − mean) / std) @ weight + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    loss: float = float("nan")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C) for features (N, D)."""
        x = x.to(self.weight.device, torch.float32)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class indices."""
        return self.logits(x).argmax(1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy on (x, y)."""
        if len(y) == 0:
            return float("nan")
        return float((self.predict(x).cpu() == y.cpu()).double().mean())


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = L2, max_iter: int = MAX_ITER,
               standardize: bool = True, device: str | torch.device | None = None) -> LinearHead:
    """Multinomial logistic regression (mean cross-entropy + l2/2·‖W‖²) by full-batch L-BFGS from zeros."""
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev, torch.float32)
    y = y.to(dev, torch.long)
    d = x.shape[1]
    if standardize:
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))  # constant features stay 0
    else:
        mean, std = torch.zeros(d, device=dev), torch.ones(d, device=dev)
    z = (x - mean) / std
    w = torch.zeros(d, num_classes, device=dev, requires_grad=True)
    b = torch.zeros(num_classes, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return F.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    return LinearHead(w.detach(), b.detach(), mean, std, final)


def num_classes_of(*datasets: TensorData | Features) -> int:
    """Number of classes: the datasets' own count, or 1 + the largest label."""
    n = 0
    for d in datasets:
        n = max(n, int(getattr(d, "num_classes", None) or 0), int(d.y.max()) + 1 if len(d.y) else 0)
    return n


@dataclass
class ProbeResult:
    """Probe accuracies: one row per (checkpoint, layer), layers in depth order."""

    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint labels in the order they were probed."""
        return list(dict.fromkeys(r["checkpoint"] for r in self.rows))

    def best(self) -> dict[str, dict]:
        """Per checkpoint, the row with the highest test accuracy (the deepest on ties)."""
        out: dict[str, dict] = {}
        for r in self.rows:
            cur = out.get(r["checkpoint"])
            if cur is None or r["test_accuracy"] >= cur["test_accuracy"]:
                out[r["checkpoint"]] = r
        return out

    def table(self) -> tuple[list[str], list[list]]:
        """Headers and rows for Markdown/CSV."""
        headers = ["checkpoint", "depth", "layer", "features", "train_accuracy", "test_accuracy"]
        return headers, [[r[h] for h in headers] for r in self.rows]

    def to_dict(self) -> dict:
        """JSON-ready form: the settings, every row and each checkpoint's best layer."""
        return {**self.config, "rows": self.rows,
                "best": {k: {"layer": v["layer"], "test_accuracy": v["test_accuracy"]} for k, v in self.best().items()}}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """PNG of test accuracy vs depth, one line per checkpoint.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        from ..report import COLORS, new_figure, save_figure
        fig, (ax,) = new_figure(size=(max(5.0, 0.45 * len({r['layer'] for r in self.rows}) + 2.5), 3.8))
        layers: list[str] = []
        for i, ck in enumerate(self.checkpoints):
            rows = [r for r in self.rows if r["checkpoint"] == ck]
            ax.plot([r["depth"] for r in rows], [r["test_accuracy"] for r in rows], marker="o", markersize=3,
                    label=ck, color=COLORS[i % len(COLORS)])
            if len(rows) > len(layers):
                layers = [r["layer"] for r in rows]
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("tapped layer (depth order)")
        ax.set_ylabel("linear probe test accuracy")
        ax.set_title(f"linear probes: {self.config.get('train', '')} → {self.config.get('test', '')}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        return save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json (``extra`` and the result), probe.csv and probe.png in ``folder``; role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        from ..report import write_result
        return write_result(folder, self, {"csv": ("probe.csv", self.table()), "png": ("probe.png", self.plot)},
                            extra=extra, force=force)


def probe_features(train: Features, test: Features, *, layers: Sequence[str] | None = None, l2: float = L2,
                   max_iter: int = MAX_ITER, device: str | torch.device | None = None,
                   label: str = "model") -> list[dict]:
    """Fit a linear probe on each layer of ``train`` and score it on ``test``; one row per layer."""
    c = num_classes_of(train, test)
    rows = []
    for depth, name in enumerate(layers or train.layers):
        head = fit_linear(train.x[name], train.y, c, l2=l2, max_iter=max_iter, device=device)
        rows.append({"checkpoint": label, "depth": depth, "layer": name, "features": int(train.x[name].shape[1]),
                     "train_accuracy": head.accuracy(train.x[name], train.y),
                     "test_accuracy": head.accuracy(test.x[name], test.y)})
    return rows


def checkpoint_labels(sources: Sequence[str]) -> list[str]:
    """Short unique labels for checkpoint sources: file stems, or the full strings where stems collide."""
    stems = [Path(str(s).split("?")[0]).stem or str(s) for s in sources]
    return stems if len(set(stems)) == len(stems) else [str(s) for s in sources]


def probe(checkpoints: Sequence[str], model: str | torch.nn.Module, train: str | TensorData, test: str | TensorData,
          *, layers: str | Sequence[str] = "all", dim: int = 8192, l2: float = L2, max_iter: int = MAX_ITER,
          device: str | torch.device = "auto", batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
          num_classes: int | None = None, in_chans: int | None = None, progress: bool = False) -> ProbeResult:
    """Linear probes at every tapped layer of each checkpoint (one model instance, weights copied in place).

    Raises:
        ConfigError: no checkpoint, a bad layer spec, or multi-label or empty data.
        SourceError, CheckpointError: a checkpoint cannot be found or read.
    """
    if not checkpoints:
        raise ConfigError("probe: give at least one checkpoint")
    net, train_d, test_d, spec = setup(model, train, test, checkpoint=checkpoints[0], num_classes=num_classes,
                                       in_chans=in_chans)
    from ..errors import IncompatibleCheckpoints
    from ..eval.evaluator import Evaluator

    def tapper(net: torch.nn.Module) -> tuple[FeatureTaps, Evaluator]:
        taps = FeatureTaps(net, layers, target=dim, device=device, batch_size=batch_size, cache_dir=cache_dir,
                           progress=progress)
        return taps, Evaluator(taps.model, [], device=taps.device)

    taps, ev = tapper(net)
    passes = 0
    result = ProbeResult(config={"model": spec, "train": train_d.name, "test": test_d.name,
                                 "layers": layers if isinstance(layers, str) else ",".join(layers), "dim": dim,
                                 "l2": l2, "max_iter": max_iter, "checkpoints": list(map(str, checkpoints))})
    for src, label in zip(checkpoints, checkpoint_labels(checkpoints)):
        try:
            sha = load_weights(ev, src)
        except IncompatibleCheckpoints:
            if not isinstance(model, str):
                raise
            # another head size (e.g. pre-training vs downstream classes): a model instance sized for this one
            passes += taps.forward_passes
            taps, ev = tapper(build_net(model, src, num_classes=num_classes, in_chans=in_chans))
            sha = load_weights(ev, src)
        tr, te = taps(train_d, weights_id=sha), taps(test_d, weights_id=sha)
        result.rows += probe_features(tr, te, l2=l2, max_iter=max_iter, device=taps.device, label=label)
    result.config["forward_passes"] = passes + taps.forward_passes
    return result


def build_net(spec: str, checkpoint: Source | None = None, *, num_classes: int | None = None,
              in_chans: int | None = None) -> torch.nn.Module:
    """build_model(spec), with the classifier / stem sized from the checkpoint's shapes where the options do not say.

    Raises:
        ConfigError: an unknown model spec.
        SourceError, CheckpointError: the checkpoint cannot be found or read.
    """
    from ..eval.modules import build_model_for
    return build_model_for(spec, checkpoint, num_classes=num_classes, in_chans=in_chans)


def setup(model: str | torch.nn.Module, train: str | TensorData, test: str | TensorData, *,
          checkpoint: Source | None = None, num_classes: int | None = None, in_chans: int | None = None
          ) -> tuple[torch.nn.Module, TensorData, TensorData, str]:
    """Build the model from a spec (its head sized to fit ``checkpoint``) and load the datasets on the CPU.

    Raises:
        ConfigError: a bad data or model spec, multi-label data, or a dataset with no examples.
    """
    from ..eval.data import load_data
    spec = model if isinstance(model, str) else type(model).__name__
    net = build_net(model, checkpoint, num_classes=num_classes, in_chans=in_chans) if isinstance(model, str) else model
    # a probe fits its own head: the labels are the dataset's classes, not the model's outputs
    tr = load_data(train, model=net, map_labels=False) if isinstance(train, str) else train
    te = load_data(test, model=net, map_labels=False) if isinstance(test, str) else test
    for d in (tr, te):
        if d.multilabel:
            raise ConfigError(f"{d.name}: probes need single-label data (class indices), not multi-label targets")
        if len(d) == 0:
            raise ConfigError(f"{d.name}: no examples")
    return net, tr, te, spec


def load_weights(evaluator: Evaluator, source: Source) -> str:
    """Copy a checkpoint into the evaluator's model in place; returns its sha256 (the feature cache key).

    Raises:
        SourceError, CheckpointError: the checkpoint cannot be found or read.
        IncompatibleCheckpoints: its keys or shapes do not fit the model.
    """
    from ..io.sources import load
    ck = load(source)
    evaluator.load(ck)
    return ck.sha256()
