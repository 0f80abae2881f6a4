"""Permutation symmetry of a model, derived from its graph: which tensor axes must be permuted together, and how
to apply permutations to a state dict (the groups that ``search.align`` matches).

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

import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AlignmentError

__all__ = ["PermGroup", "PermutationSpec", "GraphAnalysis", "META", "trace", "permutation_spec", "spec_and_graph",
           "expand_permutation", "apply_permutations", "random_permutations"]


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
META = -1  # node_space value for non-tensor values (sizes, shapes)


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


class GraphAnalysis:
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
            if s is not None and s != META:
                self.spaces.fix(s)
        self.node_space[node] = self.spaces.new(fixed=True)
        self.unknown.append(f"{node.name} ({why})")

    def _same(self, node: fx.Node, src: Any) -> None:
        s = self._space(src)
        if s is None or s == META:
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
                if s is not None and s != META:
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
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and src not in (None, META):
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
                if s is None or (s != META and self.spaces.fixed[self.spaces.find(s)] and a.op == "get_attr"):
                    return self._unknown(node, "operand is a raw tensor")
                if s != META:
                    spaces.append(s)
            elif not isinstance(a, (int, float, bool)):
                return self._unknown(node, f"operand of type {type(a).__name__}")
        if not spaces:
            self.node_space[node] = META
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
                self.node_space[node] = META
            else:
                self._unknown(node, f"attribute {node.args[1]}")
        elif f is operator.getitem:
            if self._space(x) == META:
                self.node_space[node] = META
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
            if s is not None and s != META:
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
            self.node_space[node] = META
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
    return GraphAnalysis(gm, shapes).spec()


def spec_and_graph(model: nn.Module) -> tuple[fx.GraphModule, GraphAnalysis, PermutationSpec]:
    gm = trace(model)
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items() if v.is_floating_point()}
    an = GraphAnalysis(gm, shapes)
    return gm, an, an.spec()


# ---------------------------------------------------------------------------------------------------------------
# Applying permutations

def expand_permutation(perm: torch.Tensor, k: int) -> torch.Tensor:
    """A permutation of C units as one of C·k entries laid out channel-major (unit c owns entries c·k … c·k+k−1)."""
    if k == 1:
        return perm
    return (perm[:, None] * k + torch.arange(k)).reshape(-1)


def _permute_tensor(t: torch.Tensor, axes: list[tuple[int, int, int]], perms: list[torch.Tensor]) -> torch.Tensor:
    for gi, axis, k in axes:
        t = t.index_select(axis, expand_permutation(perms[gi], k))
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
