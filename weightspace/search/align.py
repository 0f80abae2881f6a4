"""Permutation alignment (Ainsworth et al. 2023, "Git Re-Basin"): weight matching and activation matching.

Hidden units can be permuted without changing what a network computes. Aligning B to A finds, for every group of
axes that must move together, the permutation that makes B's weights (or activations) closest to A's.

The groups are derived from the model's graph (``torch.fx.symbolic_trace``), not written by hand:

* every value in the graph carries a *channel space* (dim 1 of an ``NC…`` tensor, or the features of an ``NF``
  tensor); a Linear/Conv output opens a new space, element-wise ops, pooling, BatchNorm and flatten keep it, and
  ``x + y`` (a residual add) or ``x * y`` (a gate) joins the spaces of its operands (union-find), so a residual
  stream shares one permutation;
* the graph's inputs and outputs, and anything an op we do not understand touches, are *fixed* (never permuted);
  so an unknown layer costs alignment quality, never correctness;
* each space's tensor axes are: the producing layers' out-axis (weight axis 0, bias), BatchNorm/GroupNorm
  weight/bias/running_mean/running_var, and the consumers' in-axis (weight axis 1); a Linear after ``flatten``
  that sees C·k features takes the permutation expanded to blocks of k (channel-major layout).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..io.checkpoint import Source
from ..io.sources import load
from ..errors import AlignmentError, IncompatibleCheckpoints, misfit
from ..io.outputs import StateDict, finish_provenance
from ..ops.engine import tensor_progress
from ..ops.parallel import single_thread
from ..registry import Entry, Paper, register

__all__ = ["AlignmentError", "PermGroup", "PermutationSpec", "trace", "permutation_spec", "apply_permutations",
           "random_permutations", "weight_matching", "activation_matching", "align", "REBASIN_PAPER"]


@dataclass
class PermGroup:
    """Tensor axes that share one permutation of ``size`` units: (state-dict key, axis, block size k)."""

    name: str
    size: int
    axes: list[tuple[str, int, int]]
    producers: list[str] = field(default_factory=list)


@dataclass
class PermutationSpec:
    """All permutation groups of a model, and for each key the (group, axis, k) triples that act on it."""

    groups: list[PermGroup]
    fixed: list[str] = field(default_factory=list)

    def axes_of(self) -> dict[str, list[tuple[int, int, int]]]:
        """key → [(group index, axis, block size)]."""
        out: dict[str, list[tuple[int, int, int]]] = {}
        for gi, g in enumerate(self.groups):
            for key, axis, k in g.axes:
                out.setdefault(key, []).append((gi, axis, k))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Graph analysis

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                nn.Hardsigmoid, nn.Mish, nn.Softplus)
# Element-wise and pooling ops: the output's channel c is a function of the input's channel c only.
_PASS_MODULES = _ACT_MODULES + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ACT_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
              F.leaky_relu, F.elu, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_PASS_FUNCS = _ACT_FUNCS | {F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                            F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                            F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                            torch.clone, torch.Tensor.contiguous}
_PASS_METHODS = _ACT_METHODS | {"contiguous", "clone", "detach", "float", "to", "type_as"}
_BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                 operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_META_METHODS = {"size", "dim"}
_META_ATTRS = {"shape", "dtype", "device", "ndim"}
_META = -1  # node_space value for non-tensor values (sizes, shapes)


class _Spaces:
    """Union-find over channel spaces, with a size, a fixed flag and the producing layers of each."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int | None] = []
        self.fixed: list[bool] = []
        self.producers: list[list[str]] = []

    def new(self, size: int | None = None, fixed: bool = False, producer: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        self.producers.append([producer] if producer else [])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        lo, hi = min(ra, rb), max(ra, rb)  # keep the older root so names follow graph order
        self.parent[hi] = lo
        if self.size[lo] is None:
            self.size[lo] = self.size[hi]
        elif self.size[hi] is not None and self.size[hi] != self.size[lo]:
            self.fixed[lo] = True  # joined spaces of different widths: not a permutation symmetry we understand
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        self.producers[lo] += self.producers[hi]
        return lo

    def fix(self, s: int) -> None:
        self.fixed[self.find(s)] = True


def _nodes_in(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Analysis:
    """One walk over an fx graph that assigns channel spaces to values and attaches parameter axes to spaces."""

    def __init__(self, gm: fx.GraphModule, shapes: Mapping[str, tuple[int, ...]]):
        self.gm = gm
        self.shapes = shapes
        self.spaces = _Spaces()
        self.node_space: dict[fx.Node, int] = {}
        self.attach: dict[tuple[str, int], int] = {}
        self.unknown: list[str] = []
        for node in gm.graph.nodes:
            self._visit(node)

    # helpers
    def _attach(self, key: str, axis: int, space: int) -> None:
        if key not in self.shapes:
            return
        if (key, axis) in self.attach:  # a module called twice: both uses share one permutation
            self.spaces.union(self.attach[(key, axis)], space)
        else:
            self.attach[(key, axis)] = space

    def _space(self, n: Any) -> int | None:
        return self.node_space.get(n) if isinstance(n, fx.Node) else None

    def _unknown(self, node: fx.Node, why: str) -> None:
        for n in _nodes_in((node.args, node.kwargs)):
            s = self._space(n)
            if s is not None and s != _META:
                self.spaces.fix(s)
        self.node_space[node] = self.spaces.new(fixed=True)
        self.unknown.append(f"{node.name} ({why})")

    def _same(self, node: fx.Node, src: Any) -> None:
        s = self._space(src)
        if s is None or s == _META:
            return self._unknown(node, "input without a channel space")
        self.node_space[node] = s

    # the walk
    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.node_space[node] = self.spaces.new(fixed=True)
        elif node.op == "get_attr":
            self.node_space[node] = self.spaces.new(fixed=True)  # a raw tensor used by functional code
        elif node.op == "output":
            for n in _nodes_in(node.args):
                s = self._space(n)
                if s is not None and s != _META:
                    self.spaces.fix(s)
        elif node.op == "call_module":
            self._module(node, self.gm.get_submodule(node.target))
        elif node.op == "call_function":
            self._function(node)
        elif node.op == "call_method":
            self._method(node)

    def _module(self, node: fx.Node, mod: nn.Module) -> None:
        t = node.target
        x = node.args[0] if node.args else None
        src = self._space(x)
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and src not in (None, _META):
            groups = getattr(mod, "groups", 1)
            out_ch = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            if groups == 1:
                out = self.spaces.new(size=out_ch, producer=t)
                self._attach(f"{t}.weight", 0, out)
                self._attach(f"{t}.bias", 0, out)
                self._attach(f"{t}.weight", 1, src)
                self.node_space[node] = out
            elif groups == mod.in_channels == out_ch:  # depthwise: each output channel follows its input channel
                self._attach(f"{t}.weight", 0, src)
                self._attach(f"{t}.bias", 0, src)
                self.node_space[node] = src
            else:
                self._unknown(node, f"grouped convolution {t}")
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) or (
                isinstance(mod, nn.GroupNorm) and mod.num_groups in (1, mod.num_channels)):
            self._same(node, x)
            for p in ("weight", "bias", "running_mean", "running_var"):
                self._attach(f"{t}.{p}", 0, self.node_space[node])
        elif isinstance(mod, _PASS_MODULES):
            self._same(node, x)
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            self._same(node, x)
        else:
            self._unknown(node, f"module {t} ({type(mod).__name__})")

    def _binary(self, node: fx.Node, operands: list[Any]) -> None:
        spaces = []
        for a in operands:
            if isinstance(a, fx.Node):
                s = self._space(a)
                if s is None or (s != _META and self.spaces.fixed[self.spaces.find(s)] and a.op == "get_attr"):
                    return self._unknown(node, "operand is a raw tensor")
                if s != _META:
                    spaces.append(s)
            elif not isinstance(a, (int, float, bool)):
                return self._unknown(node, f"operand of type {type(a).__name__}")
        if not spaces:
            self.node_space[node] = _META
            return
        root = spaces[0]
        for s in spaces[1:]:
            root = self.spaces.union(root, s)
        self.node_space[node] = root

    def _flatten_ok(self, start: Any, end: Any) -> bool:
        return start == 1 and end == -1

    def _reduce_ok(self, node: fx.Node, dims: Any) -> bool:
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, (tuple, list)) and len(dims) > 0 and all(isinstance(d, int) and d >= 2 for d in dims)

    def _function(self, node: fx.Node) -> None:
        f = node.target
        x = node.args[0] if node.args else None
        if f is getattr:
            if node.args[1] in _META_ATTRS:
                self.node_space[node] = _META
            else:
                self._unknown(node, f"attribute {node.args[1]}")
        elif f is operator.getitem:
            if self._space(x) == _META:
                self.node_space[node] = _META
            else:
                self._unknown(node, "indexing")
        elif f in _BINARY_FUNCS:
            self._binary(node, list(node.args[:2]))
        elif f in _PASS_FUNCS:
            self._same(node, x)
        elif f is torch.flatten:
            if self._flatten_ok(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)):
                self._same(node, x)
            else:
                self._unknown(node, "flatten over other dims")
        elif f in _REDUCE_FUNCS:
            if self._reduce_ok(node, _arg(node, 1, "dim", None)):
                self._same(node, x)
            else:
                self._unknown(node, "reduction over the channel dim")
        elif f is F.batch_norm:
            self._same(node, x)
            s = self.node_space.get(node)
            if s is not None and s != _META:
                for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
                    arg = _arg(node, i, name, None)
                    if isinstance(arg, fx.Node) and arg.op == "get_attr":
                        self._attach(arg.target, 0, s)
        else:
            self._unknown(node, f"function {getattr(f, '__name__', f)}")

    def _method(self, node: fx.Node) -> None:
        m = node.target
        x = node.args[0]
        rest = node.args[1:]
        if m in _META_METHODS:
            self.node_space[node] = _META
        elif m in _BINARY_METHODS:
            self._binary(node, [x, *rest[:1]])
        elif m in _PASS_METHODS:
            self._same(node, x)
        elif m == "flatten":
            if self._flatten_ok(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)):
                self._same(node, x)
            else:
                self._unknown(node, "flatten over other dims")
        elif m in ("view", "reshape"):
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if len(shape) == 2 and shape[1] == -1:  # x.view(x.size(0), -1): a flatten
                self._same(node, x)
            else:
                self._unknown(node, f"{m} to another shape")
        elif m in _REDUCE_METHODS:
            if self._reduce_ok(node, _arg(node, 1, "dim", None)):
                self._same(node, x)
            else:
                self._unknown(node, "reduction over the channel dim")
        else:
            self._unknown(node, f"method {m}")

    def spec(self) -> PermutationSpec:
        """The permutation groups: non-fixed spaces whose axes all divide evenly by the space's width."""
        by_root: dict[int, list[tuple[str, int]]] = {}
        for (key, axis), s in self.attach.items():
            by_root.setdefault(self.spaces.find(s), []).append((key, axis))
        groups, fixed = [], []
        for root in sorted(by_root):
            size = self.spaces.size[root]
            producers = self.spaces.producers[root]
            axes = sorted(by_root[root])
            name = producers[0] if producers else f"{axes[0][0]}[axis {axes[0][1]}]"
            ok = not self.spaces.fixed[root] and size is not None and size > 1 and all(
                len(self.shapes[k]) > a and self.shapes[k][a] % size == 0 for k, a in axes)
            if not ok:
                fixed.append(name)
                continue
            groups.append(PermGroup(name, size, [(k, a, self.shapes[k][a] // size) for k, a in axes],
                                    list(producers)))
        return PermutationSpec(groups, fixed)


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx symbolic trace of a model, or a one-line error saying why it cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on data-dependent control flow, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AlignmentError(f"{type(model).__name__}: cannot be traced with torch.fx ({msg})") from None


def permutation_spec(model: nn.Module | fx.GraphModule) -> PermutationSpec:
    """Derive the permutation groups of a model from its torch.fx graph."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items() if v.is_floating_point()}
    return _Analysis(gm, shapes).spec()


def _spec_and_graph(model: nn.Module) -> tuple[fx.GraphModule, _Analysis, PermutationSpec]:
    gm = trace(model)
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items() if v.is_floating_point()}
    an = _Analysis(gm, shapes)
    return gm, an, an.spec()


# ---------------------------------------------------------------------------------------------------------------
# Applying permutations

def _expand(perm: torch.Tensor, k: int) -> torch.Tensor:
    """A permutation of C units as one of C·k entries laid out channel-major (unit c owns entries c·k … c·k+k−1)."""
    if k == 1:
        return perm
    return (perm[:, None] * k + torch.arange(k)).reshape(-1)


def _permute_tensor(t: torch.Tensor, axes: list[tuple[int, int, int]], perms: list[torch.Tensor]) -> torch.Tensor:
    for gi, axis, k in axes:
        t = t.index_select(axis, _expand(perms[gi], k))
    return t


def apply_permutations(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute a state dict: unit i of each group becomes unit perms[g][i] of the input. Other keys are unchanged."""
    axes = spec.axes_of()
    return {k: _permute_tensor(v, axes[k], perms).contiguous() if k in axes else v for k, v in state_dict.items()}


def random_permutations(spec: PermutationSpec, seed: int = 0) -> list[torch.Tensor]:
    """One random permutation per group (seeded): handy for checking that a spec preserves the function."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(grp.size, generator=g) for grp in spec.groups]


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
            self.t[key] = self.t[key].index_select(axis, _expand(step, k))
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
                        analysis: _Analysis, spec: PermutationSpec, data: Any, *,
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
        if s == _META:
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
    gm, analysis, spec = _spec_and_graph(model)
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
    sa, sb = ca.to_dict(), cb.to_dict()
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
