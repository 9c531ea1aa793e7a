"""Discover a network's permutation groups automatically by tracing it with torch.fx.

The tracer runs the model's fx graph once on an example input and propagates, for every tensor, which
permutation group (if any) acts on each of its axes. Layers that mix features (Linear, Conv) start a new group on
their output axis and record that their weight's input axis carries the incoming group; batch norm, layer norm,
elementwise functions and pooling carry groups through; residual additions tie the groups of both operands into
one; channel concatenation builds a block-structured axis from the branches' groups; flattening expands a channel
group over the spatial positions. Groups that reach the network's output are fixed (never permuted), as is the
input. An operation the tracer cannot prove safe raises :class:`~neuralign.errors.SpecError` naming the fx node.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from neuralign.alignment.spec import PermutationSpec, Segment, Tap
from neuralign.errors import SpecError

__all__ = ["trace_spec"]

logger = logging.getLogger(__name__)

# A segment while tracing: (group id or None, units, entries per unit).
_Seg = tuple
_Action = tuple  # tuple of _Seg, or None for an axis that is never permuted

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.PReLU,
)  # fmt: skip
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax,
                 nn.LogSoftmax)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)  # fmt: skip
_ACTIVATION_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.relu_, torch.relu_,
}  # fmt: skip
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_PASS_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.exp, torch.abs, operator.neg,
    torch.neg, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.clone, torch.clamp, torch.square,
    torch.sqrt, operator.pos,
}  # fmt: skip
_PASS_METHODS = {
    "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as", "detach", "exp", "abs", "neg",
    "clamp", "clamp_min", "clamp_max", "softmax", "log_softmax", "square", "sqrt", "requires_grad_",
}  # fmt: skip
_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate, F.pad,
}  # fmt: skip
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "logsumexp"}


class _Groups:
    """Union-find over provisional groups with a 'fixed' flag (must stay identity) and a 'layer' flag."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []
        self.fixed: list[bool] = []
        self.layer: list[bool] = []

    def new(self, name: str, size: int, *, layer: bool = True) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.size.append(size)
        self.name.append(name)
        self.fixed.append(False)
        self.layer.append(layer)
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int, node: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise SpecError(
                f"fx node `{node}` ties groups `{self.name[ra]}` ({self.size[ra]} units) and "
                f"`{self.name[rb]}` ({self.size[rb]} units) of different sizes"
            )
        root, child = (ra, rb) if ra < rb else (rb, ra)  # the earlier group names the union
        self.parent[child] = root
        self.fixed[root] = self.fixed[root] or self.fixed[child]
        self.layer[root] = self.layer[root] or self.layer[child]

    def fix(self, gid: int) -> None:
        self.fixed[self.find(gid)] = True

    def live(self, gid: int) -> bool:
        r = self.find(gid)
        return self.layer[r] and not self.fixed[r]


class _Unsupported(Exception):
    """Internal: an operation touches a permuted axis in a way the tracer cannot prove safe."""


class _SpecInterpreter(torch.fx.Interpreter):
    """Runs the graph once and propagates per-axis group states next to the real values."""

    def __init__(self, gm: torch.fx.GraphModule, on_unsupported: str) -> None:
        super().__init__(gm)
        self.groups = _Groups()
        self.states: dict[str, Any] = {}
        self.records: dict[tuple[str, int], _Action] = {}
        self.subst: dict[int, _Action] = {}
        self.taps: list[tuple[int, Tap]] = []
        self.on_unsupported = on_unsupported
        self.node: torch.fx.Node | None = None

    # -------------------------------------------------------------- helpers
    def _fail(self, why: str) -> None:
        raise _Unsupported(why)

    def _new(self, name: str, size: int, *, layer: bool = True) -> _Action:
        return ((self.groups.new(name, size, layer=layer), size, 1),)

    def _norm(self, action: _Action) -> _Action:
        """Replace groups that were split into blocks (see :meth:`_unify`) by those blocks."""
        if action is None:
            return None
        out = []
        for gid, size, expand in action:
            root = self.groups.find(gid) if gid is not None else None
            if root is not None and root in self.subst:
                out.extend(self._norm(tuple((g, n, e * expand) for g, n, e in self.subst[root])))
            else:
                out.append((gid, size, expand))
        return tuple(out)

    def _fix_action(self, action: _Action) -> None:
        for gid, _, _ in self._norm(action) or ():
            if gid is not None:
                self.groups.fix(gid)

    def _fix_state(self, state: Any) -> None:
        for gid, _, _ in _iter_segments(state):
            if gid is not None:
                self.groups.fix(gid)

    def _unify(self, a: _Action, b: _Action) -> _Action:
        """Both actions must act identically on one axis: union their groups (or fix them against None)."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            self._fix_action(a if a is not None else b)
            return None
        ia, ib = list(self._norm(a)), list(self._norm(b))
        if sum(s[1] * s[2] for s in ia) != sum(s[1] * s[2] for s in ib):
            self._fail("operands of different lengths on one axis")
        for one, many in ((ia, ib), (ib, ia)):
            # a whole group meeting a block structure (e.g. a learnt per-channel scale applied to a
            # concatenation) is split into the same blocks
            if len(one) == 1 and len(many) > 1 and one[0][0] is not None and all(m[2] == one[0][2] for m in many):
                self.subst[self.groups.find(one[0][0])] = tuple((g, n, 1) for g, n, _ in many)
                return tuple(many)
        if len(ia) != len(ib) or any(x[1] * x[2] != y[1] * y[2] for x, y in zip(ia, ib)):
            self._fail("operands carry differently structured (concatenated) groups on one axis")
        merged = []
        for x, y in zip(ia, ib):
            if x[2] != y[2]:
                self._fail("operands carry groups expanded over different numbers of positions")
            if x[0] is None or y[0] is None:
                for s in (x, y):
                    if s[0] is not None:
                        self.groups.fix(s[0])
                merged.append((None, x[1], x[2]))
            else:
                self.groups.union(x[0], y[0], self.node.name)
                merged.append(x)
        return tuple(merged)

    def _record(self, key: str, axis: int, action: _Action) -> None:
        if action is None:
            return
        if (key, axis) in self.records:
            self.records[(key, axis)] = self._unify(self.records[(key, axis)], action)
        else:
            self.records[(key, axis)] = action

    def _state(self, arg: Any, value: Any = None) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.states.get(arg.name)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._state(a) for a in arg)
        return None

    @staticmethod
    def _tensor_state(state: Any, value: torch.Tensor) -> tuple:
        if isinstance(state, tuple) and len(state) == value.ndim:
            return state
        return (None,) * value.ndim

    def _arg_tensor_states(self, args: Sequence, values: Sequence) -> list[tuple[tuple, torch.Tensor]]:
        out = []
        for a, v in zip(args, values):
            if isinstance(v, torch.Tensor):
                out.append((self._tensor_state(self._state(a), v), v))
        return out

    def _tap(self, state: tuple, kind: str, node_name: str) -> None:
        for axis, action in enumerate(state):
            if action is not None and len(action) == 1 and action[0][0] is not None and action[0][2] == 1:
                self.taps.append((action[0][0], Tap(node_name, axis, kind)))

    # -------------------------------------------------------------- running
    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.node = n
        try:
            state = self._rule(n, value)
        except _Unsupported as exc:
            inputs = [self._state(a) for a in n.all_input_nodes]
            if self.on_unsupported == "fix":
                for s in inputs:
                    self._fix_state(s)
                logger.info("fx node `%s`: %s; the groups it touches stay unpermuted", n.name, exc)
                state = _none_state(value)
            else:
                what = n.target if n.op != "call_module" else type(self.module.get_submodule(n.target)).__name__
                raise SpecError(
                    f"cannot prove that fx node `{n.name}` ({n.op} {getattr(what, '__name__', what)}) is safe to "
                    f"permute: {exc}. Build the spec by hand with neuralign.alignment.SpecBuilder, or pass "
                    f"on_unsupported='fix' to leave the groups it touches unpermuted."
                ) from None
        self.states[n.name] = state
        return value

    def _rule(self, n: torch.fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return _none_state(value)
        if n.op == "get_attr":
            if not isinstance(value, torch.Tensor):
                return None
            state = tuple(self._new(f"{n.target}:{ax}", s, layer=False) if s > 1 else None
                          for ax, s in enumerate(value.shape))  # fmt: skip
            for ax, action in enumerate(state):
                self._record(n.target, ax, action)
            return state
        if n.op == "output":
            self._fix_state(self._state(n.args[0]))
            return None
        args = n.args
        if n.op == "call_module":
            return self._module_rule(n, self.module.get_submodule(n.target), value)
        vals = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in args]
        if n.op == "call_method":
            return self._method_rule(n, n.target, args, vals, value)
        return self._function_rule(n, n.target, args, vals, value)

    # ---------------------------------------------------------------- modules
    def _module_rule(self, n: torch.fx.Node, m: nn.Module, value: Any) -> Any:
        x_node = n.args[0] if n.args else None
        x = self.env.get(x_node) if isinstance(x_node, torch.fx.Node) else None
        st = self._tensor_state(self._state(x_node), x) if isinstance(x, torch.Tensor) else None
        name = n.target
        if isinstance(m, nn.Linear):
            self._record(f"{name}.weight", 1, st[-1])
            out = self._new(name, m.out_features)
            self._record(f"{name}.weight", 0, out)
            if m.bias is not None:
                self._record(f"{name}.bias", 0, out)
            self.taps.append((out[0][0], Tap(n.name, value.ndim - 1, "out")))
            return st[:-1] + (out,)
        if isinstance(m, nn.modules.conv._ConvNd):
            nd = len(m.kernel_size)
            if x.ndim != nd + 2:
                self._fail(f"unbatched input of shape {tuple(x.shape)}")
            self._require_none(st, range(2, x.ndim), "a convolution mixes spatial positions")
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            in_axis, out_axis = (0, 1) if transposed else (1, 0)
            if m.groups == 1:
                self._record(f"{name}.weight", in_axis, st[1])
                out = self._new(name, m.out_channels)
                self._record(f"{name}.weight", out_axis, out)
                if m.bias is not None:
                    self._record(f"{name}.bias", 0, out)
                self.taps.append((out[0][0], Tap(n.name, 1, "out")))
            elif m.groups == m.in_channels == m.out_channels and not transposed:
                out = st[1]  # depthwise: channel c only sees channel c
                self._record(f"{name}.weight", 0, out)
                if m.bias is not None:
                    self._record(f"{name}.bias", 0, out)
            elif st[1] is None:
                out = None
            else:
                self._fail(f"grouped convolution with groups={m.groups} on permuted channels")
            return (st[0], out) + (None,) * (value.ndim - 2)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            if isinstance(m, nn.GroupNorm) and m.num_groups not in (1, m.num_channels) and st[1] is not None:
                self._fail(f"GroupNorm with {m.num_groups} groups mixes the statistics of permuted channels")
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, attr, None) is not None:
                    self._record(f"{name}.{attr}", 0, st[1])
            return st
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            for j in range(k):
                for attr in ("weight", "bias"):
                    if getattr(m, attr, None) is not None:
                        self._record(f"{name}.{attr}", j, st[x.ndim - k + j])
            return st
        if isinstance(m, nn.Embedding):
            out = self._new(name, m.embedding_dim)
            self._record(f"{name}.weight", 1, out)
            self.taps.append((out[0][0], Tap(n.name, value.ndim - 1, "out")))
            return st + (out,)
        if isinstance(m, _ACTIVATION_MODULES):
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self._record(f"{name}.weight", 0, st[1])
            self._tap(st, "post", n.name)
            if isinstance(x_node, torch.fx.Node):
                self._tap(st, "pre", x_node.name)
            return st
        if isinstance(m, _PASS_MODULES):
            return st
        if isinstance(m, _SPATIAL_MODULES):
            return self._spatial(st, x, value)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self._reshape(st, x, value)
        return self._unknown(n, value)

    # ------------------------------------------------------- functions/methods
    def _function_rule(self, n, fn, args, vals, value) -> Any:
        if fn in _ACTIVATION_FUNCTIONS or fn in _PASS_FUNCTIONS:
            st = self._tensor_state(self._state(args[0]), vals[0])
            if fn in _ACTIVATION_FUNCTIONS:
                self._tap(st, "post", n.name)
                if isinstance(args[0], torch.fx.Node):
                    self._tap(st, "pre", args[0].name)
            return st
        if fn in _BINARY:
            return self._broadcast(args, vals, value)
        if fn in _RESHAPE_FUNCTIONS:
            return self._reshape(self._tensor_state(self._state(args[0]), vals[0]), vals[0], value)
        if fn in _SPATIAL_FUNCTIONS:
            return self._spatial(self._tensor_state(self._state(args[0]), vals[0]), vals[0], value)
        if fn in (torch.cat, torch.concat):
            return self._cat(n, value)
        if fn in (torch.transpose, torch.permute):
            return self._permute_axes(fn.__name__, args, vals, value)
        if fn in _REDUCTIONS:
            return self._reduce(n, args, vals, value)
        if fn is getattr or fn is operator.getitem:
            return self._getitem(n, fn, args, vals, value)
        return self._unknown(n, value)

    def _method_rule(self, n, name, args, vals, value) -> Any:
        if name in ("size", "dim", "numel") or not isinstance(vals[0], torch.Tensor):
            return self._unknown(n, value) if isinstance(value, torch.Tensor) else None
        st = self._tensor_state(self._state(args[0]), vals[0])
        if name in _ACTIVATION_METHODS or name in _PASS_METHODS:
            if name in _ACTIVATION_METHODS:
                self._tap(st, "post", n.name)
                if isinstance(args[0], torch.fx.Node):
                    self._tap(st, "pre", args[0].name)
            return st
        if name in _BINARY_METHODS:
            return self._broadcast(args, vals, value)
        if name in _RESHAPE_METHODS:
            return self._reshape(st, vals[0], value)
        if name in ("transpose", "permute", "t"):
            return self._permute_axes(name, args, vals, value)
        if name in _REDUCTION_METHODS:
            return self._reduce(n, args, vals, value)
        return self._unknown(n, value)

    # ------------------------------------------------------------------ rules
    def _unknown(self, n: torch.fx.Node, value: Any) -> Any:
        """An operation of unknown meaning is safe only if none of its inputs is permuted."""
        for a in n.all_input_nodes:
            if _has_group(self.states.get(a.name)):
                self._fail("it is not a known permutation-equivariant operation and one of its inputs is permuted")
        return _none_state(value)

    def _require_none(self, st: tuple, axes, why: str) -> None:
        for ax in axes:
            if st[ax] is not None:
                self._fail(f"{why}, and axis {ax} is permuted")

    def _spatial(self, st: tuple, x: torch.Tensor, value: torch.Tensor) -> tuple:
        if value.ndim != x.ndim:
            self._fail("pooling changed the number of axes")
        changed = [ax for ax in range(x.ndim) if x.shape[ax] != value.shape[ax]] + list(range(2, x.ndim))
        self._require_none(st, sorted(set(changed)), "pooling mixes positions along an axis")
        return st[:2] + (None,) * (x.ndim - 2)

    def _broadcast(self, args, vals, value) -> tuple:
        if not isinstance(value, torch.Tensor):
            return None
        out: list = []
        operands = self._arg_tensor_states(args, vals)
        for k in range(1, value.ndim + 1):
            action, first = None, True
            for st, v in operands:
                if v.ndim < k:
                    continue
                a = st[-k]
                if v.shape[-k] == 1 and value.shape[-k] != 1:
                    if a is not None:
                        self._fix_action(a)
                    continue
                action = a if first else self._unify(action, a)
                first = False
            out.append(action)
        return tuple(reversed(out))

    def _reshape(self, st: tuple, x: torch.Tensor, value: torch.Tensor) -> tuple:
        """Carry groups through a reshape by matching blocks of input and output axes with equal products."""
        ins, outs = list(x.shape), list(value.shape)
        out: list = [None] * len(outs)
        i = j = 0
        while i < len(ins) or j < len(outs):
            bi, bj = [i], [j]
            if i >= len(ins) or j >= len(outs):  # trailing size-1 axes
                if i < len(ins):
                    self._require_none(st, [i], "a reshape drops an axis")
                i, j = min(i + 1, len(ins)), min(j + 1, len(outs))
                continue
            pi, pj = ins[i], outs[j]
            while pi != pj:
                if pi < pj:
                    i += 1
                    bi.append(i)
                    pi *= ins[i]
                else:
                    j += 1
                    bj.append(j)
                    pj *= outs[j]
            # absorb following size-1 axes only when both sides end here
            i, j = i + 1, j + 1
            nin = [a for a in bi if ins[a] > 1]
            nout = [b for b in bj if outs[b] > 1]
            permuted = [a for a in bi if st[a] is not None]
            if not permuted:
                continue
            if len(nin) == 1 and len(nout) == 1:
                out[nout[0]] = st[nin[0]]
            elif len(nout) == 1 and permuted == nin[:1]:
                factor = math.prod(ins[a] for a in nin[1:])
                out[nout[0]] = tuple((g, s, e * factor) for g, s, e in st[nin[0]])
            elif len(nin) == 1 and len(nout) > 1:
                rest = math.prod(outs[b] for b in nout[1:])
                if any(e % rest for _, _, e in st[nin[0]]):
                    self._fail("a reshape splits permuted units")
                out[nout[0]] = tuple((g, s, e // rest) for g, s, e in st[nin[0]])
            else:
                self._fail(f"a reshape from {tuple(ins)} to {tuple(outs)} interleaves permuted units")
        return tuple(out)

    def _cat(self, n: torch.fx.Node, value: torch.Tensor) -> tuple:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        dim = dim % value.ndim
        parts = [(self._tensor_state(self._state(t), self.env[t]), self.env[t]) for t in tensors]
        out: list = []
        for ax in range(value.ndim):
            if ax == dim:
                segs = []
                for st, v in parts:
                    segs.extend(st[ax] if st[ax] is not None else ((None, v.shape[ax], 1),))
                out.append(tuple(segs) if any(s[0] is not None for s in segs) else None)
            else:
                action = parts[0][0][ax]
                for st, _ in parts[1:]:
                    action = self._unify(action, st[ax])
                out.append(action)
        return tuple(out)

    def _permute_axes(self, name, args, vals, value) -> tuple:
        st = self._tensor_state(self._state(args[0]), vals[0])
        nd = vals[0].ndim
        if name in ("transpose",):
            a, b = (int(v) % nd for v in vals[1:3])
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        elif name == "t":
            order = list(reversed(range(nd)))
        else:
            dims = vals[1] if len(vals) == 2 and isinstance(vals[1], (list, tuple)) else vals[1:]
            order = [int(d) % nd for d in dims]
        return tuple(st[o] for o in order)

    def _reduce(self, n, args, vals, value) -> Any:
        st = self._tensor_state(self._state(args[0]), vals[0])
        dim = vals[1] if len(vals) > 1 else n.kwargs.get("dim")
        keepdim = bool(vals[2]) if len(vals) > 2 else bool(n.kwargs.get("keepdim", False))
        if dim is None:
            return ()
        dims = {int(d) % vals[0].ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if keepdim:
            return tuple(None if ax in dims else a for ax, a in enumerate(st))
        return tuple(a for ax, a in enumerate(st) if ax not in dims)

    def _getitem(self, n, fn, args, vals, value) -> Any:
        if fn is getattr:
            return None  # attribute reads such as x.shape carry no permuted tensor
        container, index = args[0], vals[1]
        if not isinstance(vals[0], torch.Tensor):
            st = self._state(container)
            if isinstance(st, (list, tuple)) and isinstance(index, int) and index < len(st):
                return st[index]
            return self._unknown(n, value)
        st = self._tensor_state(self._state(container), vals[0])
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (vals[0].ndim - (len(idx) - 1 - sum(i is None for i in idx))) + idx[k + 1:]
        out, ax = [], 0
        for i in idx:
            if i is None:
                out.append(None)
                continue
            if isinstance(i, slice) and i == slice(None):
                out.append(st[ax])
            elif st[ax] is not None:
                self._fail("indexing selects part of a permuted axis")
            elif isinstance(i, slice):
                out.append(None)
            ax += 1
        out.extend(st[ax:])
        if len(out) != value.ndim:
            return self._unknown(n, value)
        return tuple(out)


def _none_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (None,) * value.ndim
    if isinstance(value, (list, tuple)):
        return type(value)(_none_state(v) for v in value)
    return None


def _is_segment(obj: Any) -> bool:
    return (isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[1], int) and isinstance(obj[2], int)
            and (obj[0] is None or isinstance(obj[0], int)))  # fmt: skip


def _iter_segments(state: Any):
    """Every traced segment inside a (possibly nested) state."""
    if _is_segment(state):
        yield state
    elif isinstance(state, (list, tuple)):
        for s in state:
            yield from _iter_segments(s)
    elif isinstance(state, dict):
        for s in state.values():
            yield from _iter_segments(s)


def _has_group(state: Any) -> bool:
    return any(seg[0] is not None for seg in _iter_segments(state))


def _fx_graph(model: nn.Module, *, train: bool) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` of a copy of ``model`` in train or eval mode (branches on ``self.training`` are
    resolved at trace time, so the two graphs can differ). Raises SpecError when fx cannot trace the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).train(train)
    try:
        gm = torch.fx.symbolic_trace(work)
    except Exception as exc:
        raise SpecError(
            f"torch.fx could not trace {type(model).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}. "
            "Build the spec by hand with neuralign.alignment.SpecBuilder."
        ) from exc
    return gm.train(train)


def _trace_graph(
    model: nn.Module, example_input: Any, *, on_unsupported: str = "raise"
) -> tuple[PermutationSpec, torch.fx.GraphModule]:
    """Trace ``model`` (a copy, in train mode so that train-only branches such as auxiliary heads are included).

    Returns the spec and the traced GraphModule (in eval mode), whose node names the spec's taps refer to.
    """
    if on_unsupported not in ("raise", "fix"):
        raise ValueError(f"unknown on_unsupported '{on_unsupported}'; expected one of ['raise', 'fix']")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model)
    gm = _fx_graph(work, train=True)
    gm.eval()
    interp = _SpecInterpreter(gm, on_unsupported)
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    inputs = tuple(i.to(device) if isinstance(i, torch.Tensor) else i for i in inputs)
    with torch.no_grad():
        try:
            interp.run(*inputs)
        except SpecError:
            raise
        except (RuntimeError, TypeError, ValueError) as exc:
            shapes = [tuple(i.shape) for i in inputs if isinstance(i, torch.Tensor)]
            where = f" at fx node `{interp.node.name}`" if interp.node is not None else ""
            raise SpecError(
                f"{type(model).__name__} could not run on `example_input` of shape {', '.join(map(str, shapes))}"
                f"{where}: {str(exc).splitlines()[0]}"
            ) from exc
    spec = _build_spec(interp, dict(gm.state_dict()), model)
    return spec, gm


def _build_spec(interp: _SpecInterpreter, state: dict[str, torch.Tensor], model: nn.Module) -> PermutationSpec:
    groups = interp.groups
    names: dict[int, str] = {}
    used: set[str] = set()
    for gid in range(len(groups.parent)):
        root = groups.find(gid)
        if root == gid and groups.live(gid) and gid not in interp.subst:
            base = name = groups.name[gid]
            k = 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            used.add(name)
            names[gid] = name

    def resolve(action: _Action) -> tuple[Segment, ...] | None:
        if action is None:
            return None
        segs = []
        for gid, size, expand in interp._norm(action):
            g = names.get(groups.find(gid)) if gid is not None and groups.live(gid) else None
            segs.append(Segment(g, size, expand))
        return tuple(segs) if any(s.group is not None for s in segs) else None

    model_keys = set(model.state_dict())
    axes: dict[str, dict[int, tuple[Segment, ...]]] = {}
    for (key, axis), action in interp.records.items():
        segs = resolve(action)
        if segs is not None:
            if key not in model_keys:
                raise SpecError(f"traced tensor `{key}` is not in the model's state dict")
            axes.setdefault(key, {})[axis] = segs
    sizes = {names[g]: groups.size[g] for g in sorted(names)}
    taps: dict[str, list[Tap]] = {}
    for gid, tap in interp.taps:
        if groups.live(gid) and groups.find(gid) in names:
            taps.setdefault(names[groups.find(gid)], []).append(tap)
    final_taps = {}
    for g, ts in taps.items():
        chosen = [t for t in ts if t.kind != "out"] or ts
        final_taps[g] = tuple(dict.fromkeys(chosen))
    return PermutationSpec(sizes, axes, final_taps)


def trace_spec(model: nn.Module, example_input: Any, *, on_unsupported: str = "raise") -> PermutationSpec:
    """Discover the permutation groups of ``model`` by tracing it with torch.fx.

    A relabelling :math:`P_\\ell` of the units of each hidden layer leaves the network's function unchanged when
    every tensor that reads or writes those units is permuted consistently
    (:math:`W_\\ell \\to P_\\ell W_\\ell P_{\\ell-1}^\\top`). This function finds the groups of units that must be
    relabelled together and the tensor axes each one acts on.

    Parameters
    ----------
    model : nn.Module
        Any module torch.fx can trace. It is copied; the model itself is not modified or run.
    example_input : Tensor or tuple of Tensor
        An input batch (values are irrelevant, shapes matter: flattening is resolved from them). Use a batch of
        at least 2 for models with BatchNorm1d.
    on_unsupported : {"raise", "fix"}
        What to do with an operation that cannot be proven safe: raise :class:`SpecError` naming the fx node
        (default), or keep the groups it touches unpermuted.

    Returns
    -------
    PermutationSpec
        Groups named after the layer that produces them (a union of groups tied by residual additions is named
        after its earliest member), with ``taps`` pointing at the post-activation nodes used for alignment.

    Raises
    ------
    SpecError
        If torch.fx cannot trace the model, or an operation is not provably safe (naming the fx node).

    Notes
    -----
    Handled: Linear, Conv1d/2d/3d (any stride, padding, bias; depthwise), ConvTranspose, BatchNorm (weight,
    bias, running statistics), LayerNorm and GroupNorm(1 or C groups), Embedding, elementwise activations,
    dropout, softmax, pooling and padding, residual additions and other broadcasting arithmetic (operands' groups
    are tied into one; a group added to an unpermuted tensor is fixed), channel concatenation (block-structured
    axis), flatten/view/reshape (a channel group expanded over the positions it is flattened with),
    transpose/permute, reductions, and parameters used directly (``x + self.bias``). The network's input axes and
    any group that reaches its output are never permuted. The graph is traced in train mode, so branches that
    exist only in training (e.g. auxiliary heads) are covered.

    References
    ----------
    .. [1] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
    .. [2] Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, arXiv:2209.04836.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> spec = trace_spec(net, torch.randn(2, 4))
    >>> spec.sizes
    {'0': 8}
    >>> sorted(spec.perm_to_axes["0"])
    [('0.bias', 0), ('0.weight', 0), ('2.weight', 1)]
    """
    spec, _ = _trace_graph(model, example_input, on_unsupported=on_unsupported)
    return spec
