"""Permutation alignment (Ainsworth et al. 2023, "Git Re-Basin"): weight matching and activation matching.

Hidden units can be permuted without changing what a network computes. Aligning B to A finds, for every group of
axes that must move together, the permutation that makes B's weights (or activations) closest to A's. The groups
come from the model's graph (``search.permutations``: fixed where an op is not understood, so an unknown layer
costs alignment quality, never correctness).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import fx, nn

from ..io.checkpoint import Source
from ..io.sources import load
from ..errors import AlignmentError, IncompatibleCheckpoints, misfit
from ..io.outputs import StateDict, finish_provenance
from ..ops.engine import tensor_progress
from ..ops.parallel import single_thread
from ..registry import Entry, Paper, register
from .permutations import (META, GraphAnalysis, PermGroup, PermutationSpec, apply_permutations, expand_permutation,
                           permutation_spec, random_permutations, spec_and_graph, trace)

__all__ = ["AlignmentError", "PermGroup", "PermutationSpec", "trace", "permutation_spec", "apply_permutations",
           "random_permutations", "weight_matching", "activation_matching", "align", "REBASIN_PAPER"]


# ---------------------------------------------------------------------------------------------------------------
# Weight matching

def _rows(t: torch.Tensor, axis: int, c: int) -> torch.Tensor:
    """A tensor as a (c, everything else) matrix with ``axis`` as rows, in float32."""
    return t.float().movedim(axis, 0).reshape(c, -1)


def _assign(cost: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    assert (rows == np.arange(len(rows))).all()
    return torch.from_numpy(cols).long()


class _PermutedB:
    """B with every group's current permutation applied, and its tensors laid out as (axis, rest) matrices.

    A group's score Σ W_A·W_Bᵀ needs B with the *other* groups' permutations applied. Keeping B fully permuted
    gives that score with the group's own columns permuted, which a C×C gather undoes; so a visit costs only the
    matrix products, and B's tensors are copied only when a group's permutation changes."""

    def __init__(self, b: Mapping[str, torch.Tensor], spec: PermutationSpec):
        self.t = {k: b[k] for g in spec.groups for k, _, _ in g.axes}
        self.rows: dict[tuple[str, int], torch.Tensor] = {}
        self.sizes = {(k, ax): g.size for g in spec.groups for k, ax, _ in g.axes}

    def matrix(self, key: str, axis: int) -> torch.Tensor:
        m = self.rows.get((key, axis))
        if m is None:
            m = self.rows[(key, axis)] = _rows(self.t[key], axis, self.sizes[(key, axis)])
        return m

    def permute(self, group: PermGroup, step: torch.Tensor) -> None:
        for key, axis, k in group.axes:
            self.t[key] = self.t[key].index_select(axis, expand_permutation(step, k))
            for other in [ka for ka in self.rows if ka[0] == key]:
                del self.rows[other]


def weight_matching(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: PermutationSpec, *,
                    seed: int = 0, max_rounds: int = 100, progress: bool = False) -> tuple[list[torch.Tensor], dict]:
    """Coordinate ascent over groups (random seeded order per round) until no group improves, or max_rounds."""
    # One thread: the products are thin (C × rest·rest × C with C ≤ 2048) and most other work is small copies;
    # with the cores shared, two OpenMP threads waiting for each other made resnet18 rounds 3× slower.
    with single_thread():
        return _weight_matching(a, b, spec, seed, max_rounds, progress)


def _weight_matching(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: PermutationSpec,
                     seed: int, max_rounds: int, progress: bool) -> tuple[list[torch.Tensor], dict]:
    perms = [torch.arange(g.size) for g in spec.groups]
    a_rows = {(k, ax): _rows(a[k], ax, g.size) for g in spec.groups for k, ax, _ in g.axes}  # A never moves
    bp = _PermutedB(b, spec)
    rng = np.random.default_rng(seed)
    rounds, converged = 0, not spec.groups
    bar = tensor_progress(range(max_rounds), max_rounds, "weight matching", progress)
    for _ in bar:
        if not spec.groups:
            break
        rounds += 1
        improved = 0
        for gi in rng.permutation(len(spec.groups)):
            g = spec.groups[gi]
            shifted = torch.zeros(g.size, g.size)  # = score[:, perms[gi]]
            for key, axis, _ in g.axes:
                shifted.addmm_(a_rows[(key, axis)], bp.matrix(key, axis).T)  # accumulated inside the matmul
            inverse = torch.argsort(perms[gi])
            score = shifted[:, inverse].double()  # score[i, j] = ⟨A unit i, B unit j⟩, the other groups as they are
            new = _assign(score)
            idx = torch.arange(g.size)
            old_score, new_score = float(score[idx, perms[gi]].sum()), float(score[idx, new].sum())
            # Accept only a gain above float32 rounding, so noise cannot cycle and A aligned to itself stays the identity.
            if new_score > old_score + 1e-6 * max(1e-12, abs(old_score)):
                bp.permute(g, inverse[new])
                perms[gi] = new
                improved += 1
        if improved == 0:
            converged = True
            break
    if hasattr(bar, "close"):
        bar.close()
    return perms, {"rounds": rounds, "converged": converged}


# ---------------------------------------------------------------------------------------------------------------
# Activation matching

def _batches(data: Any) -> Iterator[torch.Tensor]:
    """Input batches from a TensorData, a tensor, an iterable of tensors or (x, y) pairs, or a callable giving one."""
    if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)):
        data = data()
    if hasattr(data, "batches") and hasattr(data, "x"):
        data = (x for x, _ in data.batches(256))
    elif isinstance(data, torch.Tensor):
        data = data.split(256)
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, Mapping):
            item = item.get("x", item.get("input"))
        if not isinstance(item, torch.Tensor):
            raise AlignmentError(f"data: expected tensors or (x, y) batches, got {type(item).__name__}")
        yield item


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of chosen nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out.detach().clone()  # later in-place ops (ReLU(inplace=True)) must not alter it
        return out


def _channels(t: torch.Tensor, c: int) -> torch.Tensor | None:
    """(samples, c) view of an activation whose dim 1 holds the c channels, else None."""
    if t.dim() < 2 or t.shape[1] != c:
        return None
    return t.movedim(1, -1).reshape(-1, c).to(torch.float64)


def activation_matching(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], gm: fx.GraphModule,
                        analysis: GraphAnalysis, spec: PermutationSpec, data: Any, *,
                        progress: bool = False) -> tuple[list[torch.Tensor], dict]:
    """Per group: correlate A's and B's channel activations on data; assign to maximise the summed correlation."""
    # Every value in a group's space contributes (pre- and post-nonlinearity): post-ReLU values alone leave units
    # that are dead on the data with no signal, and those would be matched arbitrarily.
    root_of_group = {}
    for gi, g in enumerate(spec.groups):
        key, axis, _ = g.axes[0]
        root_of_group[analysis.spaces.find(analysis.attach[(key, axis)])] = gi
    nodes: dict[int, list[str]] = {gi: [] for gi in range(len(spec.groups))}
    for node, s in analysis.node_space.items():
        if s == META:
            continue
        gi = root_of_group.get(analysis.spaces.find(s))
        if gi is not None:
            nodes[gi].append(node.name)
    chosen = nodes
    wanted = {n for names in chosen.values() for n in names}
    models = []
    for sd in (a, b):
        m = copy.deepcopy(gm)
        m.load_state_dict(dict(sd), strict=False)
        models.append(m.eval())
    stats: dict[str, dict[str, torch.Tensor | int]] = {}
    n_batches = 0
    with torch.no_grad():
        for x in tensor_progress(_batches(data), None, "activation matching", progress):
            ra, rb = _Recorder(models[0], wanted), _Recorder(models[1], wanted)
            ra.run(x)
            rb.run(x)
            n_batches += 1
            for gi, names in chosen.items():
                c = spec.groups[gi].size
                for name in names:
                    va, vb = _channels(ra.values[name], c), _channels(rb.values[name], c)
                    if va is None or vb is None:
                        continue
                    s = stats.setdefault(name, {"n": 0, "sa": 0, "sb": 0, "saa": 0, "sbb": 0, "sab": 0})
                    s["n"] += va.shape[0]
                    s["sa"] += va.sum(0)
                    s["sb"] += vb.sum(0)
                    s["saa"] += (va * va).sum(0)
                    s["sbb"] += (vb * vb).sum(0)
                    s["sab"] += va.T @ vb
    if n_batches == 0:
        raise AlignmentError("data: no input batches for activation matching")
    perms, used = [], {}
    for gi, g in enumerate(spec.groups):
        cost = torch.zeros(g.size, g.size, dtype=torch.float64)
        names = [n for n in chosen[gi] if n in stats]
        for name in names:
            s = stats[name]
            n = s["n"]
            ma, mb = s["sa"] / n, s["sb"] / n
            cov = s["sab"] / n - ma[:, None] * mb[None, :]
            sd_a = (s["saa"] / n - ma * ma).clamp(min=0).sqrt()
            sd_b = (s["sbb"] / n - mb * mb).clamp(min=0).sqrt()
            cost += cov / (sd_a[:, None] * sd_b[None, :] + 1e-12)
        used[g.name] = len(names)
        perms.append(_assign(cost) if names else torch.arange(g.size))
    return perms, {"batches": n_batches, "activations_per_group": used}


# ---------------------------------------------------------------------------------------------------------------
# The public entry point

def _l2(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum(dtype=torch.float64))
                         for k in a if a[k].is_floating_point()))


def _verify(gm: fx.GraphModule, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
            x: torch.Tensor) -> float:
    m = copy.deepcopy(gm).eval()
    outs = []
    with torch.no_grad():
        for sd in (before, after):
            m.load_state_dict(dict(sd), strict=False)
            outs.append(m(x))
    diff = float((outs[0].double() - outs[1].double()).abs().max())
    scale = float(outs[0].double().abs().max())
    if not diff <= 1e-4 * max(1.0, scale):
        raise AlignmentError(f"aligned model changed B's outputs (max |Δ| = {diff:.3g}); the graph holds an op "
                             f"whose permutation rule is wrong: please report it with the model")
    return diff


def align(a: Source, b: Source, model: nn.Module, *, method: str = "weights", data: Any = None,
          seed: int = 0, max_rounds: int = 100, example_input: torch.Tensor | None = None,
          progress: bool = False) -> tuple[StateDict, dict]:
    """Permute B's hidden units to match A (Git Re-Basin); returns (B permuted, info). B's function is unchanged.

    Raises:
        AlignmentError: an unknown ``method``, activation matching without ``data``, a model torch.fx cannot
            trace, or an aligned model whose outputs differ from B's.
        IncompatibleCheckpoints: A or B lacks keys of ``model`` or holds another shape.
        CheckpointError, SourceError: A or B cannot be read."""
    if method not in ("weights", "activations"):
        raise AlignmentError(f"method '{method}': expected 'weights' or 'activations'")
    if method == "activations" and data is None:
        raise AlignmentError("activation matching needs data (input batches)")
    ca, cb = load(a), load(b)
    gm, analysis, spec = spec_and_graph(model)
    want = gm.state_dict()
    for ck in (ca, cb):
        # a BatchNorm's num_batches_tracked is neither permuted nor read: published files may leave it out
        missing = [k for k in want if k not in ck and not k.endswith("num_batches_tracked")]
        if missing:
            raise misfit(ck.source, missing)
        bad = [k for k in want if k in ck and tuple(ck.info(k)[1]) != tuple(want[k].shape)]
        if bad:
            raise IncompatibleCheckpoints(f"{ck.source}: key '{bad[0]}' has shape {list(ck.info(bad[0])[1])}, "
                                          f"the model has {list(want[bad[0]].shape)}", path=ck.source, key=bad[0])
    sa, sb = ca.materialise(), cb.materialise()
    if method == "weights":
        perms, extra = weight_matching(sa, sb, spec, seed=seed, max_rounds=max_rounds, progress=progress)
    else:
        perms, extra = activation_matching(sa, sb, gm, analysis, spec, data, progress=progress)
    out = StateDict(apply_permutations(sb, spec, perms))
    if example_input is None and data is not None:
        example_input = next(_batches(data))[:64]
    diff = _verify(gm, sb, out, example_input) if example_input is not None else None
    model_keys = [k for k in want if want[k].is_floating_point()]
    info = {
        "method": method,
        "seed": seed,
        **extra,
        "groups": [{"name": g.name, "size": g.size, "tensors": len(g.axes), "moved": int((p != torch.arange(g.size)).sum())}
                   for g, p in zip(spec.groups, perms)],
        "fixed": spec.fixed,
        "identity": all(bool((p == torch.arange(len(p))).all()) for p in perms),
        "l2_before": _l2({k: sa[k] for k in model_keys}, {k: sb[k] for k in model_keys}),
        "l2_after": _l2({k: sa[k] for k in model_keys}, {k: out[k] for k in model_keys}),
        "max_abs_output_change": diff,
        "permutations": {g.name: p.tolist() for g, p in zip(spec.groups, perms)},
    }
    prov = {"op": "align", "method": method, "seed": seed,
            "ingredients": [{"source": ca.source, "role": "reference"}, {"source": cb.source, "role": "aligned"}],
            "groups": len(spec.groups), **{k: info[k] for k in ("l2_before", "l2_after")}}
    if method == "weights":
        prov.update(rounds=extra["rounds"], converged=extra["converged"])
    from .._version import __version__
    prov["weightspace_version"] = __version__
    out.provenance = finish_provenance(prov, [ca, cb])
    return out, info


REBASIN_PAPER = Paper("Ainsworth et al.", 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
                      "ICLR 2023", "https://arxiv.org/abs/2209.04836")
register(Entry("op", "align", "Permutation alignment", "θ_B' = P(θ_B),  P = argmin_P ‖θ_A − P(θ_B)‖ (weight matching) "
               "or the activation-matching permutation",
               "B's hidden units permuted to match A's (weight or activation matching); B's function is unchanged",
               REBASIN_PAPER, {"method": "weights", "seed": 0, "max_rounds": 100}, target=align))
