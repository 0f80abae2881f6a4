"""Head2Toe (Evci et al. 2022): select features from every layer of a backbone for a linear transfer head.

Per layer: Head2Toe pooling to about T features (:func:`weightspace.analysis.taps.pool_features`), per-example L2
normalisation, concatenation. A linear head with the group-lasso penalty coef·Σ_j‖W_j‖₂ (rows j = features) scores
each feature by Σ_c W_jc²; the top fraction f is kept and a plain linear head (the probe's, :func:`fit_linear`)
is retrained on the kept features. f is chosen from ``keep`` by stratified k-fold cross-validation on the
training set; the test set is only used for the final report.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..eval.data import TensorData
from ..errors import ConfigError
from .probe import L2, MAX_ITER, fit_linear, load_weights, num_classes_of, setup
from .taps import Features, FeatureTaps

__all__ = ["TARGET", "COEF", "KEEP", "FOLDS", "LASSO_ITERS", "concat_features", "group_lasso_scores", "top_fraction",
           "stratified_folds", "Head2ToeResult", "check_keep", "head2toe_features", "head2toe"]

TARGET = 8192     # pooled features per layer (the paper's default)
COEF = 1e-5       # group-lasso coefficient on the mean cross-entropy (the paper's default)
KEEP = (0.01, 0.1, 0.2)
FOLDS = 5
LASSO_ITERS = 200  # proximal-gradient (FISTA) iterations of the group-lasso head: a fixed budget, deterministic


def concat_features(feats: Features, layers: Sequence[str] | None = None
                    ) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """Per-example L2-normalise each layer's features and concatenate; returns (N, F) and (layer, start, end) spans."""
    parts, spans, pos = [], [], 0
    for name in layers or feats.layers:
        x = feats.x[name].float()
        parts.append(F.normalize(x, p=2.0, dim=1))
        spans.append((name, pos, pos + x.shape[1]))
        pos += x.shape[1]
    return torch.cat(parts, dim=1), spans


def group_lasso_scores(z: torch.Tensor, y: torch.Tensor, num_classes: int, *, coef: float = COEF,
                       iters: int = LASSO_ITERS, device: str | torch.device | None = None) -> torch.Tensor:
    """Feature scores Σ_c W_jc² of a linear head trained with mean cross-entropy + coef·Σ_j‖W_j‖₂ (FISTA from zeros)."""
    dev = torch.device(device) if device is not None else z.device
    z = z.to(dev, torch.float32)
    # Centring changes neither the optimum W nor the scores (the bias absorbs the mean) but removes the mean
    # direction from the Hessian; then [z 1]ᵀ[z 1] is block-diagonal and W and b take their own steps 1/L:
    # L_W = ½·λmax(zᵀz)/n, L_b = ½ (softmax cross-entropy curvature ≤ ½). ~10× larger steps than one joint bound.
    z = z - z.mean(0)
    n, d = z.shape
    onehot = F.one_hot(y.to(dev, torch.long), num_classes).float()
    v = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(dev)  # fixed start: deterministic
    v = v / v.norm()
    lam = torch.tensor(1.0, device=dev)
    for _ in range(50):  # power iteration for λmax(zᵀz)
        v_new = z.T @ (z @ v)
        lam = v_new.norm()
        v = v_new / lam.clamp_min(1e-12)
    step = 1.0 / (0.5 * float(lam) / n * 1.01 + 1e-12)
    step_b = 1.0 / (0.5 * 1.01)
    w = torch.zeros(d, num_classes, device=dev)
    b = torch.zeros(num_classes, device=dev)
    wy, by, t = w.clone(), b.clone(), 1.0
    for _ in range(iters):
        g = (torch.softmax(z @ wy + by, dim=1) - onehot) / n
        w_new = wy - step * (z.T @ g)
        b_new = by - step_b * g.sum(0)
        norms = w_new.norm(dim=1, keepdim=True)
        w_new = w_new * (1 - step * coef / norms.clamp_min(1e-30)).clamp_min(0.0)  # group soft-threshold
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        wy = w_new + ((t - 1) / t_new) * (w_new - w)
        by = b_new + ((t - 1) / t_new) * (b_new - b)
        w, b, t = w_new, b_new, t_new
    return (w * w).sum(1)


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the round(fraction·F) highest scores (at least one); ties go to the earlier feature."""
    d = scores.numel()
    k = max(1, min(d, round(fraction * d)))
    order = torch.sort(-scores.cpu(), stable=True).indices
    return torch.sort(order[:k]).values


def stratified_folds(y: torch.Tensor, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k (train, validation) index pairs; each class is spread evenly over the folds in a seeded random order."""
    y = y.cpu()
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % k
    return [(torch.nonzero(fold != i).flatten(), torch.nonzero(fold == i).flatten()) for i in range(k)]


@dataclass
class Head2ToeResult:
    """Head2Toe vs the last-layer linear probe, the cross-validation table and where the kept features come from."""

    config: dict
    cv: dict[float, float]                 # fraction kept → mean cross-validated accuracy
    test: dict[float, float]               # fraction kept → test accuracy (reported, never used to choose)
    chosen: float
    baseline: dict                         # {"layer", "features", "test_accuracy"}
    layers: list[dict] = field(default_factory=list)  # per layer: features, kept (at the chosen fraction)
    predictions: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)  # fraction → test predictions

    @property
    def accuracy(self) -> float:
        """Test accuracy of Head2Toe at the cross-validated fraction."""
        return self.test[self.chosen]

    def table(self) -> tuple[list[str], list[list]]:
        """One row per fraction kept: kept features, CV accuracy, test accuracy, chosen flag."""
        total = sum(r["features"] for r in self.layers)
        rows = [[f, max(1, min(total, round(f * total))), self.cv[f], self.test[f], f == self.chosen] for f in self.cv]
        return ["keep", "features_kept", "cv_accuracy", "test_accuracy", "chosen"], rows

    def layer_table(self) -> tuple[list[str], list[list]]:
        """One row per layer: pooled features, kept features, fraction of the layer kept."""
        return (["depth", "layer", "features", "kept", "fraction_of_layer"],
                [[i, r["layer"], r["features"], r["kept"], r["kept"] / max(1, r["features"])]
                 for i, r in enumerate(self.layers)])

    def to_dict(self) -> dict:
        """JSON-ready form: settings, chosen fraction, accuracies vs the last-layer probe, features per layer."""
        return {**self.config, "chosen_keep": self.chosen, "test_accuracy": self.accuracy,
                "baseline": self.baseline, "gain_over_baseline": self.accuracy - self.baseline["test_accuracy"],
                "cv_accuracy": {str(k): v for k, v in self.cv.items()},
                "test_accuracy_by_keep": {str(k): v for k, v in self.test.items()}, "layers": self.layers}

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """PNG: test accuracy (last-layer probe vs Head2Toe per fraction) and kept features per layer.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        from ..report import COLORS, new_figure, save_figure
        n = len(self.layers)
        fig, (ax1, ax2) = new_figure(ncols=2, size=(max(4.5, 0.35 * n + 2.5), 3.8))
        names = [f"last layer\n({self.baseline['layer']})"] + [f"H2T f={f:g}" + (" *" if f == self.chosen else "")
                                                               for f in self.test]
        vals = [self.baseline["test_accuracy"]] + list(self.test.values())
        colors = [COLORS[7]] + [COLORS[0] if f != self.chosen else COLORS[1] for f in self.test]
        ax1.bar(range(len(vals)), vals, color=colors)
        for i, v in enumerate(vals):
            ax1.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        ax1.set_xticks(range(len(vals)))
        ax1.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        lo = min(vals)
        ax1.set_ylim(max(0.0, lo - 0.1 * (1 - lo) - 0.02), 1.0)
        ax1.set_ylabel("test accuracy")
        ax1.set_title("* = chosen by cross-validation", fontsize=8)
        kept = [r["kept"] for r in self.layers]
        ax2.bar(range(n), kept, color=COLORS[1])
        for i, r in enumerate(self.layers):
            ax2.text(i, r["kept"], f"{r['kept'] / max(1, r['features']):.0%}", ha="center", va="bottom", fontsize=6)
        ax2.set_xticks(range(n))
        ax2.set_xticklabels([r["layer"] for r in self.layers], rotation=60, ha="right", fontsize=7)
        ax2.set_ylabel(f"features kept (f={self.chosen:g})")
        ax2.set_title("where the kept features come from (% of layer)", fontsize=8)
        for ax in (ax1, ax2):
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"Head2Toe {self.accuracy:.4f} vs last-layer probe {self.baseline['test_accuracy']:.4f}",
                     fontsize=10)
        return save_figure(fig, path, force=force)

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json (``extra`` and the result), head2toe.csv, head2toe_layers.csv and head2toe.png in ``folder``;
        role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        from ..report import write_result
        return write_result(folder, self, {"csv": ("head2toe.csv", self.table()),
                                           "layers": ("head2toe_layers.csv", self.layer_table()),
                                           "png": ("head2toe.png", self.plot)}, extra=extra, force=force)


def check_keep(keep: Sequence[float]) -> list[float]:
    """Validate fractions (0 < f ≤ 1), drop repeats, keep the given order.

    Raises:
        ConfigError: a fraction outside (0, 1].
    """
    out = list(dict.fromkeys(float(f) for f in keep))
    if not out or any(not (0.0 < f <= 1.0) for f in out):
        raise ConfigError(f"keep={','.join(map(str, keep))}: fractions must lie in (0, 1]", param="keep")
    return out


def head2toe_features(train: Features, test: Features, *, keep: Sequence[float] = KEEP, coef: float = COEF,
                      folds: int = FOLDS, seed: int = 0, l2: float = L2, max_iter: int = MAX_ITER,
                      lasso_iters: int = LASSO_ITERS, baseline_layer: str | None = None,
                      device: str | torch.device | None = None, progress: bool = False) -> Head2ToeResult:
    """Head2Toe on precomputed features (every layer of ``train`` is a candidate).

    Raises:
        ConfigError: fewer than 2 folds, a bad ``keep``, or a class with fewer training examples than folds.
    """
    keep = check_keep(keep)
    if folds < 2:
        raise ConfigError(f"folds={folds}: cross-validation needs at least 2 folds", param="folds")
    counts = torch.bincount(train.y.cpu())
    if int(counts[counts > 0].min()) < folds:
        raise ConfigError(f"{train.dataset}: a class has {int(counts[counts > 0].min())} training examples, "
                          f"fewer than --folds {folds}")
    c = num_classes_of(train, test)
    z_tr, spans = concat_features(train)
    z_te, _ = concat_features(test, train.layers)
    splits = stratified_folds(train.y, folds, seed)
    steps = [("fold", i) for i in range(folds)] + [("final", 0)]
    if progress:
        from ..progress import progress as _progress_bar
        steps = _progress_bar(steps, desc="head2toe", unit="fit")
    cv_scores: dict[float, list[float]] = {f: [] for f in keep}
    test_acc: dict[float, float] = {}
    final_idx: dict[float, torch.Tensor] = {}
    preds: dict[float, torch.Tensor] = {}
    for kind, i in steps:
        if kind == "fold":
            tr, va = splits[i]
            scores = group_lasso_scores(z_tr[tr], train.y[tr], c, coef=coef, iters=lasso_iters, device=device)
            for f in keep:
                idx = top_fraction(scores, f)
                head = fit_linear(z_tr[tr][:, idx], train.y[tr], c, l2=l2, max_iter=max_iter, device=device)
                cv_scores[f].append(head.accuracy(z_tr[va][:, idx], train.y[va]))
        else:
            scores = group_lasso_scores(z_tr, train.y, c, coef=coef, iters=lasso_iters, device=device)
            for f in keep:
                idx = top_fraction(scores, f)
                head = fit_linear(z_tr[:, idx], train.y, c, l2=l2, max_iter=max_iter, device=device)
                preds[f] = head.predict(z_te[:, idx]).cpu()
                test_acc[f] = float((preds[f] == test.y.cpu()).double().mean())
                final_idx[f] = idx
    cv = {f: sum(v) / len(v) for f, v in cv_scores.items()}
    best = max(cv.values())
    chosen = min(f for f in keep if cv[f] == best)  # ties: the smaller head
    kept = final_idx[chosen]
    layers = [{"layer": name, "features": e - s, "kept": int(((kept >= s) & (kept < e)).sum())} for name, s, e in spans]
    base_name = baseline_layer or train.layers[-1]
    base = fit_linear(train.x[base_name], train.y, c, l2=l2, max_iter=max_iter, device=device)
    baseline = {"layer": base_name, "features": int(train.x[base_name].shape[1]),
                "test_accuracy": base.accuracy(test.x[base_name], test.y)}
    config = {"train": train.dataset, "test": test.dataset, "coef": coef, "folds": folds, "seed": seed, "l2": l2,
              "keep": keep, "lasso_iters": lasso_iters, "features_total": int(z_tr.shape[1])}
    return Head2ToeResult(config, cv, test_acc, chosen, baseline, layers, preds)


def head2toe(checkpoint: str, model: str | torch.nn.Module, train: str | TensorData, test: str | TensorData, *,
             layers: str | Sequence[str] = "all", keep: Sequence[float] = KEEP, target: int = TARGET,
             coef: float = COEF, folds: int = FOLDS, seed: int = 0, l2: float = L2, max_iter: int = MAX_ITER,
             lasso_iters: int = LASSO_ITERS, device: str | torch.device = "auto", batch_size: int = 256,
             cache_dir: str | os.PathLike | None = None, num_classes: int | None = None, in_chans: int | None = None,
             progress: bool = False) -> Head2ToeResult:
    """Head2Toe for one checkpoint: features from every tapped layer, one backbone pass per dataset.

    Raises:
        ConfigError: a bad model, data or layer spec, fractions outside (0, 1], fewer than 2 folds, or multi-label or
            empty data.
        SourceError, CheckpointError: the checkpoint cannot be found or read.
        IncompatibleCheckpoints: the checkpoint does not fit the model.
    """
    keep = check_keep(keep)  # bad options fail before any forward pass
    net, train_d, test_d, spec = setup(model, train, test, checkpoint=checkpoint, num_classes=num_classes,
                                       in_chans=in_chans)
    taps = FeatureTaps(net, layers, target=target, device=device, batch_size=batch_size, cache_dir=cache_dir,
                       progress=progress)
    from ..eval.evaluator import Evaluator
    sha = load_weights(Evaluator(taps.model, [], device=taps.device), checkpoint)
    tr, te = taps(train_d, weights_id=sha), taps(test_d, weights_id=sha)
    res = head2toe_features(tr, te, keep=keep, coef=coef, folds=folds, seed=seed, l2=l2, max_iter=max_iter,
                            lasso_iters=lasso_iters, device=taps.device, progress=progress)
    res.config = {"checkpoint": str(checkpoint), "model": spec, "layers_spec": layers if isinstance(layers, str)
                  else ",".join(layers), "target": target, **res.config, "forward_passes": taps.forward_passes}
    return res
