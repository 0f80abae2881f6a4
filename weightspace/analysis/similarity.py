"""How alike are two models? CKA of their activations per module, L2 per module, and where their mistakes differ.

- Linear and RBF CKA (Kornblith et al. 2019) and debiased linear CKA (the unbiased HSIC estimator of Song et al.
  2012) on the full evaluation set; RBF bandwidth σ = 0.5 · median pairwise distance (Kornblith's threshold).
- Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021): the unbiased HSIC summed over minibatches, so the
  evaluation set never has to fit in memory; computed for every pair of modules (A's × B's) for a heat map.
- Activations are module outputs seen by forward hooks (the first tensor of a tuple), flattened per example.
- L2 distance per module over parameters (buffers such as BatchNorm running statistics left out by default).
- Prediction agreement: a 2×2 table (A right/wrong × B right/wrong) with the example indices off the diagonal.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..io.checkpoint import Source
from ..io.sources import load
from ..eval.data import TensorData
from ..errors import ConfigError
from ..eval.modules import ModuleUnit, model_units

__all__ = ["BN_STATS", "gram_linear", "gram_rbf", "rbf_from_linear", "center_gram", "cka_from_grams", "linear_cka",
           "rbf_cka", "hsic1", "MinibatchCKA", "minibatch_cka", "Activations", "SimilarityResult", "module_distances",
           "prediction_agreement", "model_similarity"]

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------------------------- CKA maths
def _features(x: Any) -> torch.Tensor:
    """Examples × features as float64 (numpy arrays and tensors of any rank; rank > 2 is flattened)."""
    t = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
    t = t.detach().to(torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    return t.reshape(t.shape[0], -1)


def gram_linear(x: Any) -> torch.Tensor:
    """The linear kernel X·Xᵀ."""
    f = _features(x)
    return f @ f.T


def gram_rbf(x: Any, threshold: float = 0.5) -> torch.Tensor:
    """The RBF kernel exp(−d²/(2σ²)) with σ = threshold · median pairwise distance (all n² pairs, as Kornblith)."""
    return rbf_from_linear(gram_linear(x), threshold)


def rbf_from_linear(dots: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The RBF kernel from a linear Gram matrix X·Xᵀ (so one X·Xᵀ serves linear, debiased and RBF CKA)."""
    sq = torch.diagonal(dots)
    d2 = (sq[:, None] + sq[None, :] - 2 * dots).clamp_min(0)
    median = float(np.median(d2.cpu().numpy()))  # numpy's median averages the two middle values, as the reference
    if median <= 0:
        return torch.ones_like(d2)
    return torch.exp(-d2 / (2 * threshold ** 2 * median))


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Double-centre a Gram matrix; ``unbiased`` gives the U-statistic form (zero diagonal) of Song et al. 2012.

    Raises:
        ConfigError: ``unbiased`` with fewer than 4 examples.
    """
    g = gram.clone().to(torch.float64)
    n = g.shape[0]
    if unbiased:
        if n < 4:
            raise ConfigError(f"debiased CKA needs at least 4 examples, got {n}")
        g.fill_diagonal_(0)
        means = g.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
    else:
        means = g.mean(0)
        means = means - means.mean() / 2
    g = g - means[:, None] - means[None, :]
    if unbiased:
        g.fill_diagonal_(0)
    return g


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> float:
    """CKA = ⟨K̃, L̃⟩ / (‖K̃‖‖L̃‖) of two Gram matrices over the same examples.

    Raises:
        ConfigError: ``debiased`` with fewer than 4 examples.
    """
    gx, gy = center_gram(gram_x, debiased), center_gram(gram_y, debiased)
    den = float(torch.linalg.norm(gx) * torch.linalg.norm(gy))
    return float((gx * gy).sum()) / den if den > 0 else float("nan")


def linear_cka(x: Any, y: Any, debiased: bool = False) -> float:
    """Linear CKA of two representations of the same examples (rows); feature-space form when not debiased.

    Raises:
        ConfigError: the two representations have different numbers of rows (or, debiased, fewer than 4).
    """
    fx, fy = _features(x), _features(y)
    if fx.shape[0] != fy.shape[0]:
        raise ConfigError(f"CKA needs the same examples: {fx.shape[0]} rows vs {fy.shape[0]}")
    if debiased or max(fx.shape[1], fy.shape[1]) > fx.shape[0]:
        return cka_from_grams(fx @ fx.T, fy @ fy.T, debiased)
    fx, fy = fx - fx.mean(0), fy - fy.mean(0)
    den = float(torch.linalg.norm(fx.T @ fx) * torch.linalg.norm(fy.T @ fy))
    return float(torch.linalg.norm(fy.T @ fx) ** 2) / den if den > 0 else float("nan")


def rbf_cka(x: Any, y: Any, threshold: float = 0.5, debiased: bool = False) -> float:
    """RBF-kernel CKA with σ = threshold · median distance, per representation."""
    return cka_from_grams(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)


def _zero_diagonal(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K̃ (K with a zero diagonal) and its column sums K̃·1, computed once per Gram matrix."""
    k = k.clone()
    k.fill_diagonal_(0)
    return k, k.sum(0)


def _hsic1_zeroed(k: tuple[torch.Tensor, torch.Tensor], l: tuple[torch.Tensor, torch.Tensor]) -> float:
    (kt, one_k), (lt, one_l) = k, l
    n = kt.shape[0]
    trace = float((kt * lt).sum())
    middle = float(one_k.sum() * one_l.sum()) / ((n - 1) * (n - 2))
    last = 2.0 * float(one_k @ one_l) / (n - 2)
    return (trace + middle - last) / (n * (n - 3))


def hsic1(k: torch.Tensor, l: torch.Tensor) -> float:
    """The unbiased HSIC estimator HSIC₁ of Song et al. 2012 (Nguyen et al. 2021, eq. 3) for n ≥ 4."""
    return _hsic1_zeroed(_zero_diagonal(k), _zero_diagonal(l))


class MinibatchCKA:
    """Minibatch linear CKA between lists of representations: update() per batch, value() at the end.

    ``cross=True`` accumulates every pair (X's module i, Y's module j); ``cross=False`` only the pairs (i, i).
    """

    def __init__(self, n_x: int, n_y: int, cross: bool = True):
        self.xy = np.zeros((n_x, n_y))
        self.xx = np.zeros(n_x)
        self.yy = np.zeros(n_y)
        self.cross = cross
        self.batches = 0

    def update(self, xs: Sequence[Any], ys: Sequence[Any]) -> None:
        """Add one minibatch: the representations of its examples in every module of X and of Y."""
        if xs and _features(xs[0]).shape[0] < 4:
            return  # HSIC₁ is undefined below 4 examples; a tiny last batch is dropped
        kx = [_zero_diagonal(gram_linear(x)) for x in xs]
        ky = [_zero_diagonal(gram_linear(y)) for y in ys]
        for i, a in enumerate(kx):
            self.xx[i] += _hsic1_zeroed(a, a)
            for j, b in enumerate(ky):
                if self.cross or i == j:
                    self.xy[i, j] += _hsic1_zeroed(a, b)
        for j, b in enumerate(ky):
            self.yy[j] += _hsic1_zeroed(b, b)
        self.batches += 1

    def value(self) -> np.ndarray:
        """CKA matrix Σ HSIC₁(K, L) / sqrt(Σ HSIC₁(K, K) · Σ HSIC₁(L, L)) (rows: X's modules, columns: Y's)."""
        den = np.sqrt(np.outer(np.clip(self.xx, 0, None), np.clip(self.yy, 0, None)))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, self.xy / np.where(den > 0, den, 1), np.nan)


def minibatch_cka(x: Any, y: Any, batch_size: int) -> float:
    """Minibatch linear CKA of two representations split into consecutive batches."""
    fx, fy = _features(x), _features(y)
    acc = MinibatchCKA(1, 1)
    for i in range(0, fx.shape[0], batch_size):
        acc.update([fx[i:i + batch_size]], [fy[i:i + batch_size]])
    return float(acc.value()[0, 0])


# ------------------------------------------------------------------------------------------ activations
class Activations:
    """Forward hooks that keep each unit's output (flattened per example) during a with-block."""

    def __init__(self, model: nn.Module, units: Sequence[ModuleUnit]):
        self.model = model
        self.units = [u for u in units if u.output is not None]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "Activations":
        mods = dict(self.model.named_modules())
        for u in self.units:
            self._handles.append(mods[u.output].register_forward_hook(self._hook(u.name)))
        return self

    def _hook(self, name: str):
        def keep(_module, _inputs, output):
            while isinstance(output, (tuple, list)):
                output = output[0]
            if torch.is_tensor(output):
                self.outputs[name] = output.detach().float().reshape(output.shape[0], -1)
        return keep

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _loaded(model: nn.Module, weights: Source, device: torch.device) -> nn.Module:
    from ..eval.evaluator import Evaluator
    ev = Evaluator(copy.deepcopy(model), [], device=device)
    ev.load(weights)  # same key checks and one-line errors as everywhere else
    return ev.model.eval()


# --------------------------------------------------------------------------------------------- results
@dataclass
class SimilarityResult:
    """Per-module CKA and L2, the minibatch CKA matrix, and the prediction agreement of two models."""

    a: str
    b: str
    data: str
    n: int
    modules: list[dict]
    matrix: list[list[float]] = field(default_factory=list)
    matrix_modules: list[str] = field(default_factory=list)
    agreement: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"a": self.a, "b": self.b, "data": self.data, "n": self.n, "settings": self.settings,
                "modules": self.modules, "total": self.total, "agreement": self.agreement,
                "cka_matrix": {"modules": self.matrix_modules, "values": self.matrix}, "notes": self.notes}

    def table(self) -> tuple[list[str], list[list]]:
        """module × (CKA variants, L2, relative L2, numel) rows."""
        cols = ["linear_cka", "rbf_cka", "debiased_cka", "minibatch_cka", "l2", "relative_l2", "numel"]
        return ["module", *cols], [[m["module"], *[m.get(c) for c in cols]] for m in self.modules]

    def agreement_table(self) -> tuple[list[str], list[list]]:
        """The 2×2 table: rows A right/wrong, columns B right/wrong."""
        c = self.agreement["counts"]
        return ["", "B right", "B wrong"], [["A right", c["both_right"], c["a_right_b_wrong"]],
                                            ["A wrong", c["a_wrong_b_right"], c["both_wrong"]]]

    def write(self, folder: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> dict[str, Path]:
        """results.json, similarity.csv, agreement.csv, cka.png and (with a minibatch CKA matrix) cka_matrix.png
        into a folder; role → path.

        Raises:
            OutputExists, OutputError: as :func:`weightspace.report.write_files` (nothing is left half-written).
        """
        import weightspace.report as report
        files = {"csv": ("similarity.csv", self.table()), "agreement": ("agreement.csv", self.agreement_table()),
                 "png": ("cka.png", self.plot)}
        if self.matrix:
            files["matrix"] = ("cka_matrix.png", self.plot_matrix)
        return report.write_result(folder, self, files, extra=extra, force=force)

    def plot_matrix(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Heat map of minibatch linear CKA between every module of A and every module of B.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        fig = report.heatmap(self.matrix, [f"A {m}" for m in self.matrix_modules],
                             [f"B {m}" for m in self.matrix_modules], title="minibatch linear CKA",
                             cbar_label="CKA", cmap="magma")
        return report.save_figure(fig, path, force=force)

    def plot(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """CKA per module (one line per variant) beside relative L2 per module.

        Raises:
            OutputExists: the file exists and ``force`` is False.
            OutputError: its folder is missing or writing fails.
        """
        import weightspace.report as report
        names = [m["module"] for m in self.modules]
        x = list(range(len(names)))
        series = [{"x": x, "y": [m.get(c) if m.get(c) is not None else float("nan") for m in self.modules],
                   "label": c.replace("_cka", "")}
                  for c in ("linear_cka", "rbf_cka", "debiased_cka", "minibatch_cka")
                  if any(m.get(c) is not None for m in self.modules)]
        fig = report.line_panels([
            {"xlabel": "module", "ylabel": "CKA (A vs B)", "title": "activation similarity", "series": series},
            {"xlabel": "module", "ylabel": "‖A−B‖ / ‖A‖", "title": "relative L2 distance",
             "series": [{"x": x, "y": [m["relative_l2"] for m in self.modules]}]},
        ], title=f"{Path(self.a).name} vs {Path(self.b).name}")
        for ax in fig.axes[:2]:
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        return report.save_figure(fig, path, force=force)


def module_distances(a: Source, b: Source, units: Sequence[ModuleUnit], *, parameters: set[str] | None = None,
                     include_buffers: bool = False) -> tuple[dict[str, dict], dict]:
    """L2, relative L2 and cosine per unit (ops.Distance sums) over floating parameters (buffers on request).

    ``parameters``: the names that are parameters (not buffers); without it, BatchNorm statistics are the
    buffers recognised by name.

    Raises:
        SourceError, CheckpointError: a checkpoint cannot be found or read.
        IncompatibleCheckpoints: the two checkpoints differ in keys, shapes or dtype kinds.
    """
    from ..ops.engine import check_compatible
    from .distance import Distance
    ca, cb = load(a), load(b)
    check_compatible([ca, cb])
    total = Distance()
    per: dict[str, dict] = {}
    for u in units:
        d = Distance()
        for k in u.keys:
            if k not in ca or k in ca.aliases or not ca.info(k)[0].is_floating_point:
                continue
            is_buffer = k not in parameters if parameters is not None else k.rsplit(".", 1)[-1] in BN_STATS
            if is_buffer and not include_buffers:
                continue
            ta, tb = ca[k], cb[k]
            d.add(ta, tb)
            total.add(ta, tb)
        per[u.name] = d.to_dict()
    return per, total.to_dict()


def prediction_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor, y: torch.Tensor,
                         max_indices: int | None = None) -> dict:
    """2×2 counts of (A right/wrong) × (B right/wrong), the off-diagonal example indices, and argmax agreement."""
    pa, pb = logits_a.argmax(1).cpu(), logits_b.argmax(1).cpu()
    y = y.cpu()
    ra, rb = pa == y, pb == y

    def idx(mask: torch.Tensor) -> list[int]:
        out = torch.nonzero(mask).squeeze(1).tolist()
        return out[:max_indices] if max_indices is not None else out

    counts = {"both_right": int((ra & rb).sum()), "a_right_b_wrong": int((ra & ~rb).sum()),
              "a_wrong_b_right": int((~ra & rb).sum()), "both_wrong": int((~ra & ~rb).sum())}
    n = max(len(y), 1)
    return {"counts": counts, "n": len(y), "accuracy_a": float(ra.sum()) / n, "accuracy_b": float(rb.sum()) / n,
            "same_prediction": float((pa == pb).sum()) / n,
            "a_right_b_wrong": idx(ra & ~rb), "a_wrong_b_right": idx(~ra & rb)}


def model_similarity(a: Source, b: Source, model: nn.Module, data: TensorData, *, modules: str | None = None,
               batch_size: int = 256, device: str | torch.device = "cpu", full_limit: int = 4096,
               rbf_threshold: float = 0.5, cross: bool = True, include_buffers: bool = False,
               progress: bool = False) -> SimilarityResult:
    """Compare two checkpoints of one architecture on ``data``: CKA per module, L2 per module, agreement.

    Raises:
        ConfigError: no module of the model produces an output to compare, or a bad ``modules`` spec.
        SourceError, CheckpointError: a checkpoint cannot be found or read.
        IncompatibleCheckpoints: a checkpoint does not fit the model.
    """
    from ..eval.evaluator import resolve_device
    dev = resolve_device(device)
    units = model_units(model, modules)
    hooked = [u for u in units if u.output is not None]
    if not hooked:
        raise ConfigError(f"modules={modules}: no module of the model produces an output to compare", param="modules")
    ma, mb = _loaded(model, a, dev), _loaded(model, b, dev)
    n = len(data)
    keep_full = n <= full_limit
    notes = [] if keep_full else [f"{n} examples > full_limit {full_limit}: only minibatch CKA is computed"]
    acc = MinibatchCKA(len(hooked), len(hooked), cross=cross)
    full_a: dict[str, list] = {u.name: [] for u in hooked}
    full_b: dict[str, list] = {u.name: [] for u in hooked}
    logits_a, logits_b = [], []
    batches: Any = data.batches(batch_size)
    if progress:
        from ..progress import progress as _progress_bar
        batches = _progress_bar(batches, total=math.ceil(n / batch_size), desc="similarity", unit="batch")
    with torch.inference_mode(), Activations(ma, hooked) as ha, Activations(mb, hooked) as hb:
        for xb, _ in batches:
            xb = xb.to(dev)
            logits_a.append(ma(xb).float().cpu())
            logits_b.append(mb(xb).float().cpu())
            xs = [ha.outputs[u.name].double() for u in hooked]
            ys = [hb.outputs[u.name].double() for u in hooked]
            acc.update(xs, ys)
            if keep_full:
                for u in hooked:
                    full_a[u.name].append(ha.outputs[u.name].cpu())
                    full_b[u.name].append(hb.outputs[u.name].cpu())
    mat = acc.value()
    params = {k for k, _ in model.named_parameters()}
    dists, total = module_distances(a, b, units, parameters=params, include_buffers=include_buffers)
    rows = []
    for u in units:
        row: dict[str, Any] = {"module": u.name}
        if u.output is not None:
            j = hooked.index(u)
            row["minibatch_cka"] = float(mat[j, j])
            if keep_full:
                x, y = torch.cat(full_a[u.name]), torch.cat(full_b[u.name])
                kx, ky = gram_linear(x), gram_linear(y)  # one X·Xᵀ per model serves all three variants
                row["linear_cka"] = cka_from_grams(kx, ky)
                row["rbf_cka"] = cka_from_grams(rbf_from_linear(kx, rbf_threshold), rbf_from_linear(ky, rbf_threshold))
                row["debiased_cka"] = cka_from_grams(kx, ky, debiased=True)
                row["features"] = int(x.shape[1])
        d = dists[u.name]
        row.update({"l2": d["l2"], "relative_l2": d["relative"], "cosine": d["cosine"], "numel": d["numel"]})
        rows.append(row)
    la, lb = torch.cat(logits_a), torch.cat(logits_b)
    agreement = prediction_agreement(la, lb, data.y)
    ck_a, ck_b = load(a), load(b)
    return SimilarityResult(
        a=ck_a.source, b=ck_b.source, data=data.name, n=n, modules=rows,
        matrix=mat.tolist() if cross else [], matrix_modules=[u.name for u in hooked] if cross else [],
        agreement=agreement, total=total, notes=notes,
        settings={"modules": modules or "tree:layer", "batch_size": batch_size, "rbf_threshold": rbf_threshold,
                  "full_limit": full_limit, "include_buffers": include_buffers})
