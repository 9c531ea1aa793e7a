"""Discover a network's permutation groups automatically by tracing it with torch.fx (or torch.export).

The tracer runs the model's fx graph on an example input and propagates, for every tensor, which permutation group
(if any) acts on each of its axes. Layers that mix features (Linear, Conv) start a new group on their output axis
and record that their weight's input axis carries the incoming group; normalisation layers, elementwise functions
and pooling carry groups through; additions and other broadcasting arithmetic tie the groups of their operands;
concatenation builds a block-structured axis; reshapes expand a group over the positions it is flattened with;
contractions (matmul, einsum, ``F.linear``) tie the contracted axes. Groups that reach the network's output are
fixed (never permuted), as is the input.

Attention heads: a reshape that splits an axis of ``H * d`` units into ``(H, d)`` axes (or ``(3, H, d)``, a fused
query/key/value projection, whose parts are then taken apart by ``unbind`` or indexing) gives the group a *head
axis* and an axis *inside heads* instead of a refusal. The permutation inside heads may differ from head to head, so
it is kept only if every tensor that carries the inside axis also carries its head axis (a parameter shared by all
heads, a reduction over heads, or RoPE's constant frequencies fix it: the heads still move); the query/key dot
product ties their insides, the batch axes of matmul / ``scaled_dot_product_attention`` tie the heads of queries,
keys and values, and merging the two axes back gives the flat group again. Key/value heads repeated for
grouped-query attention (``repeat_interleave`` of a head axis, ``enable_gqa``) are a new group of copies: the query
heads tied to it may be reordered inside each block of copies of one key/value head (``Heads.within``) when they
are a whole, live head axis that no parameter carries; otherwise they are coarsened into blocks that move whole.
Multi-query attention (one key/value head, Shazeer 2019, arXiv:1911.02150) has no head split of its keys and values
(their head axis has size 1): the repeat of that axis (``repeat_interleave`` over the axis before the positions, or
SDPA's broadcasting) gives copies of one unpermuted head, and merging them with the value units splits those units
into one head of their own, so that all query heads form one block that may reorder (``Heads.within``, no head
group) with the value's inside permutation shared by all; where the query heads cannot reorder, the value units keep
one permutation tiled over the heads, as without the split.
The spec records the result as :class:`~neuralign.alignment.spec.Heads`.

Where torch.fx cannot trace a model (control flow on shapes), the graph is the one ``torch.export`` records on the
example input, its ATen operations rewritten into the torch functions below (:mod:`neuralign.alignment._export`;
an operation without a mapping has no rule): the same rules prove it.

The tracer is default-deny: every fx node whose value holds a tensor is handled by a rule below or, if one of its
inputs carries a group, refused with :class:`~neuralign.errors.SpecError` naming the node. Every input of a node
(positional, keyword, inside lists) is accounted for: a rule that reads only its first operand refuses a node whose
other tensor operands carry a group. The graph is traced in both train and eval mode (branches on
``self.training`` differ), and the two traces share their groups. ``tests/alignment/test_trace_fuzz.py`` proves
every rule by a float64 equivalence check on a family of generated modules.

Why one module: the rules share the interpreter's state (the union-find over groups, the records of
which tensor axis carries which group) and are only meaningful together.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import string
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from neuralign.alignment._export import aten_name, exported_graph, is_exported
from neuralign.alignment.spec import Heads, PermutationSpec, Segment, Tap
from neuralign.errors import SpecError

__all__ = ["trace_spec"]

logger = logging.getLogger(__name__)

# A segment while tracing: (group id or None, units, entries per unit). An action (the state of one axis) is a
# tuple of segments, or None for an axis that no group acts on. A tensor's state is a tuple of actions (one per
# axis); a container's state is a _Seq or dict of states; anything else has state None.


class _Seq(tuple):
    """The state of a tuple or list value (distinguishes containers from a tensor's tuple of axis actions)."""


class _Poisoned:
    """The state of a tensor that depends on the order of permuted units (e.g. indices into a permuted axis).

    Any use of it is refused; ``action`` is the axis it depends on (fixed under ``on_unsupported='fix'``).
    """

    def __init__(self, why: str, action: tuple) -> None:
        self.why = why
        self.action = action


class _Stack:
    """The state of a tensor whose axis ``axis`` enumerates parts with states of their own: the query, key and value
    of a fused projection after ``reshape(B, N, 3, H, d)``. Only moving axes and taking a part are proven; any
    other use is refused (``parts`` holds one tensor state per part, over the other axes)."""

    def __init__(self, axis: int, parts: tuple) -> None:
        self.axis = axis
        self.parts = parts


class _Unsupported(Exception):
    """Internal: an operation touches a permuted axis in a way the tracer cannot prove safe."""


class _Opaque(_Unsupported):
    """Internal: an operation of unknown meaning (no rule) touches a permuted axis."""


# ------------------------------------------------------------------------------------------- operation table
# Operations are looked up by name; a call_function target counts only if it *is* the torch / functional /
# operator object of that name (a user function that happens to be called ``relu`` is unknown).
_KINDS: dict[str, tuple[str, ...]] = {
    # elementwise with an activation tap (post = output, pre = input)
    "act": (
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu",
        "mish", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid",
        "sigmoid", "sigmoid_", "tanh", "tanh_", "tanhshrink", "threshold", "hardshrink", "softshrink",
    ),
    # elementwise over all tensor operands, broadcasting (random ones are exchangeable: same law for every unit)
    "ew": (
        "exp", "expm1", "log", "log1p", "log2", "abs", "neg", "negative", "clamp", "clip", "clamp_min",
        "clamp_max", "clamp_", "square", "sqrt", "rsqrt", "sin", "cos", "erf", "reciprocal", "sign", "floor",
        "ceil", "round", "trunc", "pow", "add", "add_", "sub", "sub_", "subtract", "mul", "mul_", "multiply",
        "div", "div_", "divide", "true_divide", "maximum", "minimum", "fmax", "fmin", "where", "masked_fill",
        "masked_fill_", "lerp", "addcmul", "addcdiv", "atan2", "hypot", "eq", "ne", "lt", "le", "gt", "ge",
        "logical_and", "logical_or", "logical_not", "isnan", "isfinite", "nan_to_num", "dropout", "dropout1d",
        "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "stochastic_depth", "truediv",
        "floordiv", "mod", "pos", "invert", "zeros_like", "ones_like", "full_like",
        "rand_like", "randn_like",
    ),
    # one tensor operand, equivariant along every axis, extra tensor operands only for their dtype/device
    "cast": ("contiguous", "clone", "float", "double", "to", "type", "type_as", "detach",
             "cpu", "requires_grad_", "data"),
    # one tensor operand, equivariant along every axis (including the one it normalises over)
    "equi": ("softmax", "log_softmax", "softmin", "normalize"),
    "axes": ("transpose", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis", "T", "mT", "H", "mH"),
    "reshape": ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
                "expand", "expand_as", "repeat", "repeat_interleave"),
    "reduce": ("sum", "mean", "amax", "amin", "max", "min", "logsumexp", "prod", "std", "var", "norm",
               "vector_norm", "all", "any", "nansum", "nanmean", "argmax", "argmin"),
    "scan": ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "flip", "roll", "diff"),
    "sort": ("sort", "argsort", "topk", "kthvalue", "msort"),
    "select": ("getitem", "index_select", "gather", "narrow", "select", "take_along_dim"),
    "cat": ("cat", "concat", "concatenate", "stack"),
    "split": ("split", "chunk", "unbind", "tensor_split"),
    "spatial": (
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "pad",
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    ),
    "pixel": ("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"),
    "contract": ("matmul", "mm", "bmm", "einsum", "linear"),
    "conv": ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    "embedding": ("embedding",),
    "fnorm": ("layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"),
    "attention": ("scaled_dot_product_attention",),
    "factory": ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"),
    # metadata: methods and attribute reads (any non-tensor attribute is "getattr_meta") that return no tensor
    "meta": ("size", "dim", "numel", "is_contiguous", "is_floating_point", "element_size", "stride",
             "getattr_meta", "_assert"),
}  # fmt: skip
_KIND = {name: kind for kind, names in _KINDS.items() for name in names}
_OPERATORS = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "truediv",
    operator.floordiv: "floordiv",
    operator.mod: "mod", operator.neg: "neg", operator.pos: "pos", operator.abs: "abs", operator.pow: "pow",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le", operator.gt: "gt",
    operator.ge: "ge", operator.getitem: "getitem", operator.matmul: "matmul", getattr: "getattr",
    operator.invert: "invert",
}  # fmt: skip


@functools.cache  # built on first trace: torchvision.ops (imported here) costs a second at import
def _function_table() -> dict[Any, str]:
    table: dict[Any, str] = dict(_OPERATORS)
    namespaces: list[Any] = [torch, F, torch.linalg, torch.special]
    try:
        import torchvision.ops

        namespaces.append(torchvision.ops)
    except ImportError:  # torchvision is a dependency, but the tracer does not need it
        pass
    for ns in namespaces:
        for name in _KIND:
            obj = getattr(ns, name, None)
            if callable(obj) and not isinstance(obj, type):
                table.setdefault(obj, name)
    table[torch._assert] = "_assert"
    table.pop(torch.embedding, None)  # torch.embedding(weight, indices), unlike F.embedding(input, weight)
    table[F.embedding] = "embedding"
    return table


_TENSOR_ATTRS = {"T", "mT", "H", "mH", "data"}

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.PReLU,
    nn.Threshold, nn.Hardshrink, nn.Softshrink,
)  # fmt: skip
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)  # fmt: skip


class _Groups:
    """Union-find over provisional groups with a 'fixed' flag (must stay identity) and a 'layer' flag."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []
        self.fixed: list[bool] = []
        self.layer: list[bool] = []
        self.axis_named: list[bool] = []  # named after a parameter's axis ("key:axis"), not after a layer
        self.on_union: Any = None  # called with (root, child) after a union (the interpreter merges head splits)

    def new(self, name: str, size: int, *, layer: bool = True) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.size.append(size)
        self.name.append(name)
        self.fixed.append(False)
        self.layer.append(layer)
        self.axis_named.append(not layer)
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
        root, child = (ra, rb) if ra < rb else (rb, ra)  # the earlier group names the union, a layer before an axis
        if self.axis_named[root] and not self.axis_named[child]:
            self.name[root], self.axis_named[root] = self.name[child], False
        self.parent[child] = root
        self.fixed[root] = self.fixed[root] or self.fixed[child]
        self.layer[root] = self.layer[root] or self.layer[child]
        if self.on_union is not None:
            self.on_union(root, child, node)

    def fix(self, gid: int) -> None:
        self.fixed[self.find(gid)] = True

    def live(self, gid: int) -> bool:
        r = self.find(gid)
        return self.layer[r] and not self.fixed[r]


def _length(action: Sequence) -> int:
    return sum(n * e for _, n, e in action)


def _bounds(action) -> set[int]:
    """Interior segment boundaries of an action."""
    out, offset = set(), 0
    for _, k, e in action[:-1]:
        offset += k * e
        out.add(offset)
    return out


def _segment_at(action, position: int) -> tuple:
    """The segment of ``action`` that covers entry ``position``."""
    offset = 0
    for seg in action:
        offset += seg[1] * seg[2]
        if position < offset:
            return seg
    raise IndexError(position)


def _grouped_output(blocks, per_in: int, per_out: int):
    """The output channels of a grouped convolution whose input channels are ``blocks`` (whole blocks of ``per_in``
    channels per unit): each block of ``per_in`` inputs gives a block of ``per_out`` outputs."""
    if blocks is None:
        return None
    return tuple((g, k, e // per_in * per_out) if g is not None else (None, k * e // per_in * per_out, 1)
                 for g, k, e in blocks)  # fmt: skip


def _is_tensor_state(state: Any) -> bool:
    return isinstance(state, tuple) and not isinstance(state, _Seq)


def _none_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (None,) * value.ndim
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return _Seq(_none_state(v) for v in value)
    if isinstance(value, dict):
        return {k: _none_state(v) for k, v in value.items()}
    return None


def _state_fits(value: Any, state: Any) -> bool:
    """Whether ``state`` describes every tensor inside ``value`` (the default-deny invariant)."""
    if isinstance(value, torch.Tensor):
        if isinstance(state, _Stack):
            return value.shape[state.axis] == len(state.parts) and all(len(p) == value.ndim - 1 for p in state.parts)
        return isinstance(state, _Poisoned) or (_is_tensor_state(state) and len(state) == value.ndim)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return isinstance(state, _Seq) and len(state) == len(value) and all(map(_state_fits, value, state))
    if isinstance(value, dict):
        return isinstance(state, dict) and state.keys() == value.keys() and all(
            _state_fits(v, state[k]) for k, v in value.items()
        )
    return True


def _iter_segments(state: Any):
    """Every traced segment inside a (possibly nested) state."""
    if isinstance(state, _Poisoned):
        yield from state.action or ()
    elif isinstance(state, _Stack):
        for part in state.parts:
            for action in part:
                yield from action or ()
    elif _is_tensor_state(state):
        for action in state:
            yield from action or ()
    elif isinstance(state, _Seq):
        for s in state:
            yield from _iter_segments(s)
    elif isinstance(state, dict):
        for s in state.values():
            yield from _iter_segments(s)


def _has_group(state: Any) -> bool:
    return any(seg[0] is not None for seg in _iter_segments(state))


def _poison(state: Any) -> _Poisoned | None:
    """The first poisoned tensor inside a (possibly nested) state."""
    if isinstance(state, _Poisoned):
        return state
    for s in state if isinstance(state, _Seq) else state.values() if isinstance(state, dict) else ():
        found = _poison(s)
        if found is not None:
            return found
    return None


class _SpecInterpreter(torch.fx.Interpreter):
    """Runs one graph and propagates per-axis group states next to the real values.

    Several interpreters (the train-mode and eval-mode graphs) share one ``groups`` / ``records`` / ``subst`` so
    that the spec covers both; only the one with ``taps=True`` records taps (its node names are the ones the
    alignment reads).
    """

    def __init__(self, gm: torch.fx.GraphModule, shared: _SpecInterpreter | None, *, on_unsupported: str,
                 taps: bool, aliases: dict[str, str]) -> None:  # fmt: skip
        super().__init__(gm)
        self.groups = shared.groups if shared else _Groups()
        self.records: dict[tuple[str, int], Any] = shared.records if shared else {}
        self.subst: dict[int, Any] = shared.subst if shared else {}
        self.taps: list[tuple[int, Tap]] = []
        self.collect_taps = taps
        self.on_unsupported = on_unsupported
        self.aliases = aliases
        self.states: dict[str, Any] = {}
        self.node: torch.fx.Node | None = None
        self.extra_traceback = False  # our errors name the node in one line; fx would append the graph
        self.used: set[str] = shared.used if shared else set()  # names of the table's rules applied (for tests)
        # attention heads: a flat group (root) split by a reshape into (heads, inside) axes -> (head gid, inner gid,
        # H, d); every interpreter's node states, for the final check that inside axes travel with their heads
        self.split: dict[int, tuple[int, int, int, int]] = shared.split if shared else {}
        self.all_states: list[dict[str, Any]] = shared.all_states if shared else []
        self.all_states.append(self.states)
        # grouped-query attention: (query-head gid, key/value head action, repeats) for every axis of copies of
        # key/value heads; after tracing, the query-head roots that may reorder their heads inside each block of
        # copies (-> (key/value head action, repeats)), and the splits whose insides are fixed but whose heads keep
        # that freedom
        self.copies: list[tuple[int, Any, int]] = shared.copies if shared else []
        self.within: dict[int, tuple[Any, int]] = shared.within if shared else {}
        self.fixed_inside: set[int] = shared.fixed_inside if shared else set()
        self.groups.on_union = self._on_union

    # -------------------------------------------------------------- helpers
    def _fail(self, why: str) -> None:
        raise _Unsupported(why)

    def _new(self, name: str, size: int, *, layer: bool = True) -> tuple | None:
        """A new group of ``size`` units (None for a single unit: it has only the identity permutation)."""
        return ((self.groups.new(name, size, layer=layer), size, 1),) if size > 1 else None

    def _subgroup(self, root: int, size: int) -> int:
        """A new group that replaces part of ``root`` (after a split or coarsening); it stays fixed if root was."""
        if root in self.split:
            self._fail("it regroups the units of a projection that is split into attention heads")
        gid = self.groups.new(self.groups.name[root], size)
        if self.groups.fixed[root]:
            self.groups.fix(gid)
        return gid

    def _produce(self, n: torch.fx.Node, name: str, size: int, axis: int) -> tuple | None:
        """A new layer group produced at ``axis`` of node ``n``, with an "out" tap there."""
        out = self._new(name, size)
        if out is not None and self.collect_taps:
            self.taps.append((out[0][0], Tap(n.name, axis, "out")))
        return out

    def _norm(self, action):
        """Replace groups that were split into blocks or coarsened (see :meth:`_unify`, :meth:`_coarsen`) and
        merge neighbouring unpermuted segments."""
        if action is None:
            return None
        out: list = []
        for gid, size, expand in action:
            root = self.groups.find(gid) if gid is not None else None
            if root is not None and root in self.subst:
                parts = self._norm(tuple((g, n, e * expand) for g, n, e in self.subst[root]))
            else:
                parts = ((gid, size, expand) if gid is not None else (None, size * expand, 1),)
            for p in parts:
                if p[0] is None and out and out[-1][0] is None:
                    out[-1] = (None, out[-1][1] + p[1], 1)
                else:
                    out.append(p)
        return tuple(out)

    def _fix_action(self, action) -> None:
        for gid, _, _ in self._norm(action) or ():
            if gid is not None:
                self.groups.fix(gid)

    def _fix_state(self, state: Any) -> None:
        for gid, _, _ in _iter_segments(state):
            if gid is not None:
                self._fix_action(((gid, 1, 1),))

    def _promote(self, action) -> None:
        """Groups of a parameter axis that now produce units of the network (e.g. ``x @ self.w``) are layers."""
        for gid, _, _ in self._norm(action) or ():
            if gid is not None:
                self.groups.layer[self.groups.find(gid)] = True

    def _unify(self, a, b):
        """Both actions must act identically on one axis: union their groups (or fix them against None).

        The two may be segmented differently (a whole group against a concatenation, or two differently split
        groups): every group is first cut at the other side's segment boundaries (:meth:`_cut`), so that both
        sides cover the same intervals; then each interval's groups are tied (a finer group is coarsened to the
        other side's wider units) or fixed against an unpermuted interval.
        """
        if a is None and b is None:
            return None
        if a is None or b is None:
            self._fix_action(a if a is not None else b)
            return None
        if _length(self._norm(a)) != _length(self._norm(b)):
            self._fail("operands of different lengths on one axis")
        for c in sorted(_bounds(self._norm(a)) | _bounds(self._norm(b))):
            self._cut(a, 0, c)
            self._cut(b, 0, c)
        ia, ib = self._norm(a), self._norm(b)
        cuts = sorted(_bounds(ia) | _bounds(ib) | {0, _length(ia)})
        merged = []
        for lo, hi in zip(cuts, cuts[1:]):
            x, y = _segment_at(ia, lo), _segment_at(ib, lo)
            if x[0] is None or y[0] is None:
                for seg in (x, y):
                    if seg[0] is not None:
                        self.groups.fix(seg[0])
                merged.append((None, hi - lo, 1))
            elif x[2] != y[2]:
                # the same entries in units of different widths: the finer group is coarsened to the wider units
                fine, coarse = (x, y) if x[2] < y[2] else (y, x)
                if coarse[2] % fine[2]:
                    self._fail("operands carry groups expanded over different numbers of positions")
                root = self.groups.find(fine[0])
                new = self._subgroup(root, coarse[1])
                self.subst[root] = ((new, coarse[1], coarse[2] // fine[2]),)
                self.groups.union(new, coarse[0], self.node.name)
                merged.append(coarse)
            else:
                self.groups.union(x[0], y[0], self.node.name)
                merged.append(x)
        return self._norm(tuple(merged))

    def _record(self, key: str, axis: int, action) -> None:
        if action is None:
            return
        key = self.aliases.get(key, key)
        if (key, axis) in self.records:
            self.records[(key, axis)] = self._unify(self.records[(key, axis)], action)
        else:
            self.records[(key, axis)] = action

    def _state(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.states[arg.name]
        if isinstance(arg, (list, tuple)):
            return _Seq(self._state(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self._state(v) for k, v in arg.items()}
        if isinstance(arg, torch.Tensor):
            return (None,) * arg.ndim
        return None

    def _value(self, arg: Any) -> Any:
        return torch.fx.node.map_arg(arg, lambda a: self.env[a])

    def _tstate(self, arg: Any) -> tuple:
        """The per-axis state of a tensor operand (refusing operands that depend on the order of units)."""
        st = self._state(arg)
        if isinstance(st, _Poisoned):
            self._fail(f"it uses {st.why}")
        if isinstance(st, _Stack):
            self._fail("it uses the fused query/key/value parts of an attention before they are taken apart")
        if not _is_tensor_state(st):
            self._fail("an operand the tracer expected to be a tensor is not one")
        return st

    def _tap(self, state: tuple, kind: str, node_name: str) -> None:
        if not self.collect_taps:
            return
        for axis, action in enumerate(state):
            action = self._norm(action)
            if action is not None and len(action) == 1 and action[0][0] is not None and action[0][2] == 1:
                self.taps.append((action[0][0], Tap(node_name, axis, kind)))

    def _opaque(self, state: Any) -> bool:
        """Keep the groups of an operand that an operation does not follow unpermuted; False if that is not
        possible (a layer's units or indices that depend on their order would be read without their labels)."""
        if _poison(state) is not None:
            return False
        segs = [g for g, _, _ in _iter_segments(state) if g is not None]
        if any(self.groups.layer[self.groups.find(g)] for g in segs):
            return False
        for g in segs:  # only parameter axes that no layer's units flow through yet: fix them
            self.groups.fix(g)
        return True

    def _account(self, n: torch.fx.Node, used: Sequence[Any]) -> None:
        """Refuse a node whose inputs other than ``used`` carry a group (nothing is silently ignored)."""
        used_nodes = {u for u in used if isinstance(u, torch.fx.Node)}
        for a in n.all_input_nodes:
            if a not in used_nodes and not self._opaque(self.states[a.name]):
                self._fail(f"its operand `{a.name}` is permuted but the rule for this operation does not use it")

    @staticmethod
    def _arg(n: torch.fx.Node, pos: int, name: str, default: Any = None) -> Any:
        if len(n.args) > pos:
            return n.args[pos]
        return n.kwargs.get(name, default)

    # -------------------------------------------------------------- running
    def run_node(self, n: torch.fx.Node) -> Any:
        self.node = n
        value = super().run_node(n)
        if n.op == "output":
            state = self._state(n.args[0])
            bad = _poison(state)
            if bad is not None and self.on_unsupported != "fix":
                raise SpecError(
                    f"cannot prove that the output of the network is safe to permute: it returns {bad.why}. Build "
                    "the spec by hand with neuralign.alignment.SpecBuilder, or pass on_unsupported='fix'."
                )
            self._fix_state(state)
            return value
        try:
            state = self._rule(n, value)
            if not _state_fits(value, state):
                self._fail("the tracer has no rule for the structure of its output")
        except _Unsupported as exc:
            if self.on_unsupported != "fix":
                what = n.target if n.op != "call_module" else type(self.module.get_submodule(n.target)).__name__
                what = aten_name(what) or getattr(what, "__name__", what)
                err = SpecError(
                    f"cannot prove that fx node `{n.name}` ({n.op} {what}) is safe to "
                    f"permute: {exc}. Build the spec by hand with neuralign.alignment.SpecBuilder, or pass "
                    f"on_unsupported='fix' to leave the groups it touches unpermuted."
                )
                # an fx leaf (a torch.fx.wrap'ped function, a module fx does not enter): torch.export traces inside
                err.opaque_fx_node = isinstance(exc, _Opaque) and not is_exported(self.module)
                raise err from None
            for a in n.all_input_nodes:
                self._fix_state(self.states[a.name])
            logger.info("fx node `%s`: %s; the groups it touches stay unpermuted", n.name, exc)
            state = _none_state(value)
        self.states[n.name] = state
        return value

    def _rule(self, n: torch.fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return _none_state(value)
        if n.op == "get_attr":
            return self._get_attr(n, value)
        if n.op == "call_module":
            return self._module_rule(n, self.module.get_submodule(n.target), value)
        if n.op == "call_method":
            name = n.target
            if not isinstance(self._value(n.args[0]), torch.Tensor):
                name = None
        elif isinstance(n.target, type) and issubclass(n.target, tuple) and hasattr(n.target, "_fields"):
            # a named tuple built in forward: its state is the tuple of its fields' states
            fields = list(n.args) + [n.kwargs[f] for f in n.target._fields[len(n.args) :] if f in n.kwargs]
            return _Seq(self._state(a) for a in fields) if len(fields) == len(value) else self._unknown(n, value)
        else:
            name = _function_table().get(n.target) if _hashable(n.target) else None
            if name == "getattr":
                owner = self._value(n.args[0])
                fields = getattr(type(owner), "_fields", None) or getattr(type(owner), "__match_args__", ())
                if isinstance(owner, tuple) and n.args[1] in fields:
                    # a field of a named tuple (torch.max(...).values, a model's own output type)
                    st = self._state(n.args[0])
                    return st[fields.index(n.args[1])] if isinstance(st, _Seq) else _none_state(value)
                name = n.args[1] if n.args[1] in _TENSOR_ATTRS else "getattr_meta"
        kind = _KIND.get(name)
        if kind is None:
            return self._unknown(n, value)
        self.used.add(name)
        return getattr(self, f"_r_{kind}")(n, name, value)

    def _get_attr(self, n: torch.fx.Node, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return _none_state(value)
        key = self.aliases.get(n.target)
        if key is None:
            return (None,) * value.ndim  # a constant that is not in the state dict is never permuted
        state = tuple(self._new(f"{key}:{ax}", s, layer=False) if s > 1 else None for ax, s in enumerate(value.shape))
        for ax, action in enumerate(state):
            self._record(key, ax, action)
        return state

    def _unknown(self, n: torch.fx.Node, value: Any) -> Any:
        """An operation of unknown meaning is safe only if none of its inputs carries a group."""
        for a in n.all_input_nodes:
            if not self._opaque(self.states[a.name]):
                what = aten_name(n.target)
                raise _Opaque(
                    (f"the ATen operation `{what}` of the torch.export graph has no rule (no mapping to a torch "
                     f"function the tracer knows)" if what else "it is not a known permutation-equivariant operation")
                    + f" and its operand `{a.name}` is permuted"
                )
        return _none_state(value)

    # ---------------------------------------------------------------- attention heads
    def _on_union(self, root: int, child: int, node: str) -> None:
        """Two flat groups are tied: their splits into heads must agree (heads tied to heads, insides to insides)."""
        theirs = self.split.pop(child, None)
        if theirs is None:
            return
        mine = self.split.setdefault(root, theirs)
        if mine is theirs:
            return
        if mine[2:] != theirs[2:]:
            raise _Unsupported(
                f"it ties units split into {mine[2]} heads of {mine[3]} with units split into {theirs[2]} heads of "
                f"{theirs[3]}"
            )
        self.groups.union(mine[0], theirs[0], node)
        self.groups.union(mine[1], theirs[1], node)

    def _rooted(self, action) -> tuple:
        """``action`` normalised with every group replaced by its root (for comparing actions)."""
        return tuple((self.groups.find(g) if g is not None else None, c, e) for g, c, e in self._norm(action) or ())

    def _roots(self, action) -> list[int]:
        return [self.groups.find(g) for g, _, _ in self._norm(action) or () if g is not None]

    def _live_norm(self, action):
        """``action`` normalised, or None when no live group acts on it (fixed groups are the identity)."""
        action = self._norm(action)
        if action is None or all(g is None or self.groups.fixed[self.groups.find(g)] for g, _, _ in action):
            return None
        return action

    def _tie(self, a, b):
        """:meth:`_unify`, except that a head axis tied to an unpermuted one stays in the result, fixed: it still
        says which head each entry belongs to, and so which permutation acts inside it (ALiBi's constant slopes)."""
        tied = self._unify(a, b)
        kept = a if a is not None else b
        if tied is None and kept is not None and self.split:
            heads = {r for h, _, n, _ in self.split.values() for r in self._roots(((h, n, 1),))}
            if set(self._roots(kept)) & heads:
                return self._norm(kept)
        return tied

    def _split_group(self, gid: int, heads: int, size: int) -> tuple[int, int]:
        """Split the flat group of ``gid`` into ``heads`` heads of ``size`` units: (head gid, inner gid)."""
        root = self.groups.find(gid)
        if root in self.split:
            h, i, n_heads, n_inner = self.split[root]
            if (n_heads, n_inner) != (heads, size):
                self._fail(f"a reshape splits units into {heads} heads of {size} that were split into {n_heads} "
                           f"heads of {n_inner} elsewhere")  # fmt: skip
            return h, i
        name = self.groups.name[root]
        h = self.groups.new(f"{name}.heads", heads)
        i = self.groups.new(f"{name}.inner", size)
        if self.groups.fixed[root]:
            self.groups.fix(h)
            self.groups.fix(i)
        self.split[root] = (h, i, heads, size)
        return h, i

    def _split_heads(self, action, sizes: list[int]) -> list | None:
        """A reshape of one axis into ``(H, d)`` or ``(c, H, d)``: per part (c of them, or one), the actions of the
        head axis and of the axis inside heads; None when a part is not one whole group of single units."""
        *lead, heads, size = sizes
        count, length = (lead[0] if lead else 1), heads * size
        for k in range(1, count):
            self._cut(action, 0, k * length)
        parts = []
        for k in range(count):
            part = self._live_norm(self._cut(action, k * length, (k + 1) * length) if count > 1 else action)
            if part is None:
                parts.append((None, None))
                continue
            if len(part) != 1 or part[0][2] != 1:
                return None
            h, i = self._split_group(part[0][0], heads, size)
            parts.append((((h, heads, 1),), ((i, size, 1),)))
        return parts

    def _merge_heads(self, head, inner, *, create: bool = True):
        """A reshape merging a head axis (outer) with the axis inside heads (inner): the flat group they were split
        from, or a new flat group over these heads (value heads repeated for groups of query heads; under
        multi-query attention the copies of its one value head, whose flat units become a split into one head);
        None if the two axes are not a head split."""
        head, inner = self._norm(head), self._norm(inner)
        inner_roots = {self.groups.find(i): (h, n, d) for h, i, n, d in self.split.values()}
        if len(inner) != 1 or inner[0][2] != 1 or inner[0][0] is None:
            return None
        if self.groups.find(inner[0][0]) not in inner_roots:
            one = self.split.get(self.groups.find(inner[0][0]), (None, None, 1))[2] == 1
            if not create or not one or not self._single_copies(head):
                return None
            # multi-query attention: the units of the one key/value head are one head of their own (its head axis,
            # one unit, is fixed); the query heads reading it are its copies
            h, i = self._split_group(inner[0][0], 1, inner[0][1])
            self.groups.fix(h)
            inner = ((i, inner[0][1], 1),)
            inner_roots[self.groups.find(i)] = (h, 1, inner[0][1])
        ri, size = self.groups.find(inner[0][0]), inner[0][1]
        for f, (h, i, n, d) in self.split.items():
            if self.groups.find(i) == ri and d == size and self._rooted(((h, n, 1),)) == self._rooted(head):
                return self._norm(((f, n * d, 1),))
        h0, n0, _ = inner_roots[ri]
        copied = {self.groups.find(c): self._roots(source) for c, source, _ in self.copies}
        roots = {r for x in self._roots(head) for r in copied.get(x, [x])}  # query heads: the heads they copy
        if not create or not roots <= set(self._roots(((h0, n0, 1),))):
            return None
        count = _length(head)
        if len(head) == 1 and head[0][2] == 1:
            h = head[0][0]
        else:
            h = self.groups.new(self.groups.name[head[0][0]], count)
            self.subst[h] = head
        f = self.groups.new(self.groups.name[ri].removesuffix(".inner"), count * size)
        self.split[f] = (h, ri, count, size)
        return ((f, count * size, 1),)

    def _release(self, inner_root: int, keep: str) -> None:
        """Give up the permutations inside the heads of every split whose inside is ``inner_root``: ``keep="heads"``
        fixes the insides (each flat group becomes its heads, ``d`` units wide); ``keep="inner"`` fixes the heads
        (the flat group becomes the inside permutation tiled over the heads, e.g. a channel shuffle's view)."""
        for f, (h, i, n, d) in list(self.split.items()):
            if inner_root not in self._roots(((i, d, 1),)):
                continue
            if keep == "heads" and set(self._roots(((h, n, 1),))) & self.within.keys():
                self._fix_action(((i, d, 1),))  # query heads that reorder inside their blocks keep their split
                self.fixed_inside.add(f)
                continue
            del self.split[f]
            if keep == "heads":
                self._fix_action(((i, d, 1),))
                self.subst[f] = ((h, n, d),)
            else:
                self._fix_action(((h, n, 1),))
                self.groups.name[self.groups.find(i)] = self.groups.name[f]
                self.subst[f] = ((i, d, 1),) * n

    def _head_roots(self) -> set[int]:
        """Roots of the head axes of every split."""
        return {r for h, _, n, _ in self.split.values() for r in self._roots(((h, n, 1),))}

    def _copies(self, source, rep: int) -> tuple:
        """An axis of ``rep`` consecutive copies of each key/value head of ``source`` (None: the one unpermuted head
        of multi-query attention), read by as many query heads: a new group, so that the query heads it is tied to
        stay free to reorder among the copies of one key/value head (:meth:`_settle_copies`)."""
        n = rep * (_length(source) if source is not None else 1)
        # copies of one unpermuted head are no layer's units until a head axis is tied to them: an operation without
        # a rule fixes them (as it would the unpermuted axis they replace) instead of refusing
        c = self.groups.new(f"{self.node.name}.query_heads", n, layer=source is not None)
        self.copies.append((c, source, rep))
        return ((c, n, 1),)

    def _single_copies(self, head) -> bool:
        """Whether ``head`` is one whole axis of copies of one unpermuted key/value head (multi-query attention)."""
        if head is None or len(head) != 1 or head[0][2] != 1 or head[0][0] is None:
            return False
        sources = [s for c, s, _ in self.copies if self.groups.find(c) == self.groups.find(head[0][0])]
        return bool(sources) and all(s is None for s in sources)

    def _split_copies(self, state: tuple, shape, out_shape) -> None:
        """A reshape that splits an axis of query heads tied to copies of key/value heads (e.g. into (key/value
        heads, copies)) reads their order inside a block: they move as blocks from here on (:meth:`_coarsen_copies`).
        An axis kept whole or merged with the axes after it (heads and their insides) keeps the freedom."""
        copied = {self.groups.find(c) for c, _, _ in self.copies}
        for i, action in enumerate(state):
            if not set(self._roots(action)) & copied:
                continue
            before = math.prod(shape[:i])
            kept = any(math.prod(out_shape[:j]) == before and out_shape[j] % shape[i] == 0
                       for j in range(len(out_shape)))  # fmt: skip
            if not kept:
                roots = set(self._roots(action))
                self._coarsen_copies([e for e in self.copies if self.groups.find(e[0]) in roots])

    def _settle_copies(self) -> None:
        """After tracing: the query heads tied to copies of key/value heads may be reordered inside each block of
        copies (:attr:`Heads.within`) where they are one whole, live head axis of a split that no parameter carries
        and every copy they read repeats one whole head axis as often; otherwise they are tied to the key/value
        heads they copy, moving as blocks (:meth:`_coarsen_copies`)."""
        by_root: dict[int, list[tuple[int, Any, int]]] = {}
        for c, source, rep in self.copies:
            by_root.setdefault(self.groups.find(c), []).append((c, source, rep))
        carried = {r for action in self.records.values() for r in self._roots(action)}
        heads = self._head_roots()
        # multi-query attention: heads of the splits that merge copies of one value head with its units (their
        # insides are the inside of a one-head split); copies of one unpermuted tensor that no value merges with
        # (a mask repeated over the heads) do not free the heads they are tied to
        ones = {self.groups.find(i) for _, i, n, _ in self.split.values() if n == 1}
        mqa = {r for h, i, n, _ in self.split.values() if self.groups.find(i) in ones
               for r in self._roots(((h, n, 1),))}  # fmt: skip
        for root, entries in by_root.items():
            sources = [self._norm(source) for _, source, _ in entries]
            reps = {rep for _, _, rep in entries}
            whole = all(s is None or (len(s) == 1 and s[0][2] == 1 and s[0][0] is not None) for s in sources)
            ok = (len(reps) == 1 and whole and len({s is None for s in sources}) == 1 and root in heads
                  and (sources[0] is not None or root in mqa)
                  and root not in carried and not self.groups.fixed[root] and root not in self.subst
                  and root not in {r for s in sources for r in self._roots(s)})  # fmt: skip
            if not ok:
                self._coarsen_copies(entries)
                continue
            for s in sources[1:]:  # the keys and the values read by one query head move alike
                self._unify(sources[0], s)
            self.within[root] = (sources[0], reps.pop())

    def _coarsen_copies(self, entries) -> None:
        for c, source, rep in entries:
            wide = None if source is None else tuple((g, k, e * rep) for g, k, e in self._norm(source))
            self._unify(((c, self.groups.size[c], 1),), wide)

    def _check_copies(self) -> bool:
        """After :meth:`_settle_heads`: coarsen the query-head roots that lost their freedom there (fixed, or tied
        to other units); True if any did."""
        broken = []
        for root, (source, _) in list(self.within.items()):
            s = self._norm(source)
            if (self.groups.fixed[self.groups.find(root)] or self.groups.find(root) in self.subst
                    or (s is not None and (len(s) != 1 or s[0][2] != 1))):  # fmt: skip
                del self.within[root]
                broken += [e for e in self.copies if self.groups.find(e[0]) == self.groups.find(root)]
        self._coarsen_copies(broken)
        return bool(broken)

    def _within_roots(self, roots) -> set[int]:
        """``roots`` with every query-head root that keeps its freedom (:attr:`within`) replaced by the roots of
        the key/value heads it copies: the blocks that the permutations inside heads are chosen for."""
        out: set[int] = set()
        for r in roots:
            out |= set(self._roots(self.within[r][0])) if r in self.within else {r}
        return out

    def _settle_heads(self) -> None:
        """After tracing: keep a permutation inside heads only where every tensor and parameter that carries the
        inside axis also carries its head axis (the inside permutation is chosen per head), and where the split is
        whole (one head group, one inside group); release the others (:meth:`_release`). Then flat groups with
        the same heads and insides are tied (the query and key units of one attention)."""
        while True:
            heads_of: dict[int, frozenset] = {}
            bad: set[int] = set()
            for f, (h, i, n, d) in self.split.items():
                if f in self.fixed_inside:
                    continue
                # (the one head of a multi-query attention's values has no head group: one unit, fixed)
                hr = frozenset(r for r in self._within_roots(self._roots(((h, n, 1),))) if self.groups.size[r] > 1)
                inner = self._norm(((i, d, 1),))
                for r in self._roots(inner):
                    if heads_of.setdefault(r, hr) != hr:
                        bad.add(r)
                whole = len(inner) == 1 and len(self._norm(((h, n, 1),))) == 1
                if not whole or self.groups.fixed[self.groups.find(f)] or self._live_norm(inner) is None:
                    if self.groups.fixed[self.groups.find(f)]:
                        self._fix_action(((h, n, 1),))
                    bad.update(self._roots(inner))
            for states in self.all_states:
                for st in states.values():
                    bad.update(self._orphan_insides(st, heads_of))
            for (_, _), action in self.records.items():  # a parameter axis cannot be permuted per head
                bad.update(r for r in self._roots(action) if r in heads_of)
            if not bad:
                break
            for r in bad:
                self._release(r, "inner" if self._tiled_inside(r) else "heads")
        keys: dict[tuple, int] = {}
        for f in list(self.split):
            if f in self.split:
                h, i, n, d = self.split[f]
                key = (self._rooted(((h, n, 1),)), self.groups.find(i), n, d)
                other = keys.setdefault(key, f)
                if other != f:
                    self.groups.union(other, f, "heads")

    def _tiled_inside(self, inner_root: int) -> bool:
        """Whether ``inner_root`` is the inside of the one value head of a multi-query attention whose query heads
        are all fixed: its one permutation then stays, tiled over the query heads (as before the heads split)."""
        splits = [(h, n) for h, i, n, _ in self.split.values() if self.groups.find(i) == inner_root]
        return any(n == 1 for _, n in splits) and all(self.groups.fixed[self.groups.find(h)] for h, _ in splits)

    def _orphan_insides(self, state: Any, heads_of: dict[int, frozenset]) -> set[int]:
        """Inside-head groups of ``state`` carried by a tensor that has no axis of their heads."""
        if isinstance(state, _Stack):
            return set().union(*(self._orphan_insides(p, heads_of) for p in state.parts))
        if isinstance(state, (_Seq, dict)):
            return set().union(set(), *(self._orphan_insides(s, heads_of) for s in (
                state.values() if isinstance(state, dict) else state)))  # fmt: skip
        if not _is_tensor_state(state):
            return set()
        axes = [self._within_roots(self._roots(a)) for a in state]
        out = set()
        for roots in axes:
            for r in roots & heads_of.keys():
                if not any(a and a <= heads_of[r] for a in axes):
                    out.add(r)
        return out

    # ---------------------------------------------------------------- modules
    def _module_rule(self, n: torch.fx.Node, m: nn.Module, value: Any) -> Any:
        x_node = self._arg(n, 0, "input")
        x = self._value(x_node)
        if isinstance(m, nn.MultiheadAttention):
            return self._mha(n, m, value)
        if not isinstance(x, torch.Tensor):
            return self._unknown(n, value)
        st = self._tstate(x_node)
        name = n.target
        known = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                 nn.RMSNorm, nn.Embedding, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Flatten,
                 nn.Unflatten,
                 *_ACTIVATION_MODULES, *_PASS_MODULES, *_SPATIAL_MODULES)  # fmt: skip
        if not isinstance(m, known) or not _genuine_forward(m):
            return self._unknown(n, value)
        self._account(n, [x_node])
        if isinstance(m, nn.Linear):
            self._record(f"{name}.weight", 1, st[-1])
            out = self._produce(n, name, m.out_features, value.ndim - 1)
            self._record(f"{name}.weight", 0, out)
            if m.bias is not None:
                self._record(f"{name}.bias", 0, out)
            return st[:-1] + (out,)
        if isinstance(m, nn.modules.conv._ConvNd):
            return self._conv(n, m, st, x, value)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            if x.ndim < 2:
                self._fail("a normalisation layer on an unbatched input")
            if isinstance(m, nn.GroupNorm):
                st = (st[0], self._within_blocks(st[1], m.num_groups, "GroupNorm")) + st[2:]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, attr, None) is not None:
                    self._record(f"{name}.{attr}", 0, st[1])
            return st
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            k = len(m.normalized_shape)
            for j in range(k):
                for attr in ("weight", "bias"):
                    if getattr(m, attr, None) is not None:
                        self._record(f"{name}.{attr}", j, st[x.ndim - k + j])
            return st
        if isinstance(m, nn.Embedding):
            out = self._produce(n, name, m.embedding_dim, value.ndim - 1)
            self._record(f"{name}.weight", 1, out)
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
            out = self._spatial(st, x, value[0] if isinstance(value, tuple) else value)
            return _Seq((out, out)) if isinstance(value, tuple) else out
        if isinstance(m, (nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)):
            kind = {nn.PixelShuffle: "pixel_shuffle", nn.PixelUnshuffle: "pixel_unshuffle"}.get(type(m), "channel")
            factor = getattr(m, "upscale_factor", None) or getattr(m, "downscale_factor", None) or m.groups
            return self._pixel(st, kind, factor, x, value, 1 if kind == "channel" else x.ndim - 3)
        return self._reshape(st, x, value)  # Flatten, Unflatten

    def _conv(self, n, m, st, x, value) -> tuple:
        name = n.target
        nd = len(m.kernel_size)
        if x.ndim != nd + 2:
            self._fail(f"unbatched input of shape {tuple(x.shape)}")
        for ax in range(2, x.ndim):
            if st[ax] is not None:
                self._fail(f"a convolution mixes spatial positions, and axis {ax} is permuted")
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        in_axis, out_axis = (0, 1) if transposed else (1, 0)
        if m.groups == 1:
            self._record(f"{name}.weight", in_axis, st[1])
            out = self._produce(n, name, m.out_channels, 1)
            self._record(f"{name}.weight", out_axis, out)
        else:
            # groups of channels are permuted as whole blocks (the weight's in-block axis is shared by all
            # groups, so channels cannot move within a block): every unit of the input must cover whole blocks
            # of in_channels / groups channels (a finer group is coarsened); the output follows block by block
            blocks = self._coarsen(st[1], m.groups, "a grouped convolution")
            out = _grouped_output(blocks, m.in_channels // m.groups, m.out_channels // m.groups)
            self._record(f"{name}.weight", 0, blocks if transposed else out)
        if m.bias is not None:
            self._record(f"{name}.bias", 0, out)
        return (st[0], out) + (None,) * (value.ndim - 2)

    def _cut(self, action, start: int, stop: int):
        """The part ``[start, stop)`` of an axis. A group that the cut crosses is split (``subst``) at unit
        boundaries into subgroups that are relabelled separately, so the part keeps whole groups; a cut through a
        unit is refused."""
        action = self._norm(action)
        if action is None:
            return None
        offset = 0
        for g, k, e in action:
            lo, hi = offset, offset + k * e
            offset = hi
            cuts = sorted({c for c in (start, stop) if lo < c < hi})
            if g is None or not cuts:
                continue
            if any((c - lo) % e for c in cuts):
                self._fail("it cuts a permuted unit in two")
            bounds = [0] + [(c - lo) // e for c in cuts] + [k]
            root = self.groups.find(g)
            parts = []
            for a, b in zip(bounds, bounds[1:]):
                parts.append((self._subgroup(root, b - a), b - a, 1))
            self.subst[root] = tuple(parts)
        out, offset = [], 0
        for g, k, e in self._norm(action):
            lo, hi = offset, offset + k * e
            offset = hi
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                out.append((g, k, e) if g is not None else (None, b - a, 1))
        return self._norm(tuple(out)) if any(g is not None for g, _, _ in out) else None

    def _coarsen(self, action, groups: int, what: str):
        """``action`` on a channel axis read in ``groups`` contiguous blocks, with every unit covering whole
        blocks: a group whose units are finer than a block is coarsened (``subst``) into units of whole blocks."""
        action = self._norm(action)
        if action is None or groups == 1:
            return action
        block = _length(action) // groups
        offset = 0
        for gid, k, e in action:
            if gid is not None and e % block:
                if block % e or k % (block // e) or offset % block:
                    self._fail(f"{what} with {groups} groups splits permuted units across its groups")
                r = block // e
                root = self.groups.find(gid)
                self.subst[root] = ((self._subgroup(root, k // r), k // r, r),)
            elif gid is None and (offset % block or (k * e) % block):
                self._fail(f"{what} with {groups} groups mixes permuted and unpermuted channels in one group")
            offset += k * e
        return self._norm(action)

    def _within_blocks(self, action, groups: int, what: str):
        """``action`` on a channel axis whose ``groups`` contiguous blocks are normalised separately (GroupNorm):
        units may move within a block, or carry whole blocks, but not straddle blocks, so a group of units finer
        than a block is cut at every block boundary (:meth:`_cut`) into groups relabelled separately."""
        action = self._norm(action)
        if action is None or groups == 1:
            return action
        block = _length(action) // groups
        offset = 0
        for gid, k, e in action:
            lo, hi = offset, offset + k * e
            offset = hi
            if gid is not None and e % block:
                try:
                    for c in range((lo // block + 1) * block, hi, block):
                        self._cut(action, 0, c)
                except _Unsupported:
                    self._fail(f"{what} with {groups} groups splits permuted units across its groups")
        return self._norm(action)

    def _mha(self, n, m: nn.MultiheadAttention, value) -> Any:
        """nn.MultiheadAttention: the model dimension of query/key/value is read by the input projections and a
        new group is produced by the output projection; sequence and batch axes must be unpermuted. The
        projections' ``H * d`` rows form heads: one group for the query and key rows, one for the value rows and
        the output projection's columns, sharing one head permutation (a per-head ``attn_mask`` of shape
        ``(B * H, L, S)`` fixes the heads; per-head weights returned with ``average_attn_weights=False`` carry
        it)."""
        q, k, v = (self._arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
        used = [q, k, v]
        for extra, pos in (("key_padding_mask", 3), ("attn_mask", 5)):
            used.append(self._arg(n, pos, extra))
            if not self._opaque(self._state(used[-1])):  # a stored mask is a constant: its axes are pinned
                self._fail(f"its `{extra}` is permuted")
        self._account(n, used)
        sts = [self._tstate(t) for t in (q, k, v)]
        for st in sts:
            if any(a is not None for a in st[:-1]):
                self._fail("multi-head attention mixes positions, and a sequence or batch axis is permuted")
        name = n.target
        if m._qkv_same_embed_dim:
            for st in sts:
                self._record(f"{name}.in_proj_weight", 1, st[-1])
        else:
            for st, w in zip(sts, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                self._record(f"{name}.{w}", 1, st[-1])
        n_heads, size, dim = m.num_heads, m.head_dim, m.embed_dim
        qk, vo = self.groups.new(f"{name}.qk", dim), self.groups.new(f"{name}.vo", dim)
        if n_heads > 1:
            heads = self.groups.new(f"{name}.heads", n_heads)
            self.split[qk] = (heads, self.groups.new(f"{name}.qk.inner", size), n_heads, size)
            self.split[vo] = (heads, self.groups.new(f"{name}.vo.inner", size), n_heads, size)
            mask = self._value(self._arg(n, 5, "attn_mask"))
            if isinstance(mask, torch.Tensor) and mask.ndim == 3:  # one mask per (batch, head): heads stay put
                self.groups.fix(heads)
        rows = {"q": (qk, dim, 1), "k": (qk, dim, 1), "v": (vo, dim, 1)}
        if m._qkv_same_embed_dim:
            self._record(f"{name}.in_proj_weight", 0, (rows["q"], rows["k"], rows["v"]))
        else:
            for p in "qkv":
                self._record(f"{name}.{p}_proj_weight", 0, (rows[p],))
        if m.in_proj_bias is not None:
            self._record(f"{name}.in_proj_bias", 0, (rows["q"], rows["k"], rows["v"]))
        for p, attr in (("k", "bias_k"), ("v", "bias_v")):
            if getattr(m, attr) is not None:
                self._record(f"{name}.{attr}", 2, (rows[p],))
        self._record(f"{name}.out_proj.weight", 1, (rows["v"],))
        out = self._new(f"{name}.out_proj", dim)  # no tap: the node's value is a tuple
        self._record(f"{name}.out_proj.weight", 0, out)
        if m.out_proj.bias is not None:
            self._record(f"{name}.out_proj.bias", 0, out)
        attn_out = sts[0][:-1] + (out,)
        weights = _none_state(value[1])
        if isinstance(value[1], torch.Tensor) and n_heads > 1 and value[1].ndim == value[0].ndim + 1:
            weights = weights[:-3] + (((heads, n_heads, 1),), None, None)  # per-head weights
        return _Seq((attn_out, weights))

    # ------------------------------------------------------- functions/methods
    def _r_factory(self, n, name, value) -> Any:
        # x.new_zeros(shape) and friends: only x's dtype and device are used
        return (None,) * value.ndim

    def _r_meta(self, n, name, value) -> Any:
        if isinstance(value, torch.Tensor):
            return self._unknown(n, value)
        return _none_state(value)

    def _r_act(self, n, name, value) -> Any:
        st = self._r_ew(n, name, value)
        x_node = n.args[0] if n.args else n.kwargs.get("input")
        self._tap(st, "post", n.name)
        if isinstance(x_node, torch.fx.Node):
            self._tap(st, "pre", x_node.name)
        return st

    def _r_ew(self, n, name, value) -> Any:
        """Elementwise over every tensor operand with broadcasting: the operands' groups are tied axis by axis
        (from the right); an axis broadcast from size 1 must be unpermuted in that operand."""
        if not isinstance(value, torch.Tensor):
            return self._unknown(n, value)
        operands = []
        for a in (*n.args, *n.kwargs.values()):
            for item in a if isinstance(a, (list, tuple)) else (a,):
                v = self._value(item)
                if isinstance(v, torch.Tensor):
                    operands.append((self._tstate(item), v))
        if len(operands) == 0:
            return (None,) * value.ndim
        out: list = []
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
                action = a if first else self._tie(action, a)
                first = False
            out.append(action)
        if any(v.ndim > value.ndim for _, v in operands):
            self._fail("an operand has more axes than the result")
        return tuple(reversed(out))

    def _r_cast(self, n, name, value) -> Any:
        # extra tensor operands (x.to(y), x.type_as(y)) contribute only their dtype and device
        if not isinstance(value, torch.Tensor):
            return self._unknown(n, value)
        if isinstance(self._state(n.args[0]), _Stack):
            return self._state(n.args[0])
        return self._tstate(n.args[0])

    def _r_equi(self, n, name, value) -> Any:
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        return self._tstate(x)

    def _r_axes(self, n, name, value) -> Any:
        x = n.args[0] if n.args else n.kwargs["input"]
        self._account(n, [x])
        raw, nd = self._state(x), self._value(x).ndim
        st = raw if isinstance(raw, _Stack) else self._tstate(x)
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = (int(self._value(self._arg(n, i, nm))) % nd for i, nm in ((1, "dim0"), (2, "dim1")))
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        elif name in ("t", "T", "H"):
            order = list(reversed(range(nd)))
        elif name in ("mT", "mH"):
            order = list(range(nd - 2)) + [nd - 1, nd - 2]
        elif name == "permute":
            dims = list(n.args[1:]) if len(n.args) > 1 else n.kwargs["dims"]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            order = [int(self._value(d)) % nd for d in dims]
        else:  # movedim / moveaxis
            src, dst = self._value(self._arg(n, 1, "source")), self._value(self._arg(n, 2, "destination"))
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % nd for s in src], [d % nd for d in dst]
            rest = [a for a in range(nd) if a not in src]
            order = [None] * nd
            for s, d in zip(src, dst):
                order[d] = s
            it = iter(rest)
            order = [o if o is not None else next(it) for o in order]
        if sorted(order) != list(range(nd)) or len(order) != value.ndim:
            self._fail("an axis permutation the tracer cannot read")
        if isinstance(st, _Stack):  # the parts' axes follow, the parts' axis moves
            rest = [o - (o > st.axis) for o in order if o != st.axis]
            return _Stack(order.index(st.axis), tuple(tuple(p[o] for o in rest) for p in st.parts))
        return tuple(st[o] for o in order)

    def _r_reshape(self, n, name, value) -> Any:
        x = self._arg(n, 0, "input")
        self._account(n, list(n.args) if name.endswith("_as") else [x])  # the other operand gives only a shape
        st, xv = self._tstate(x), self._value(x)
        if name in ("expand", "expand_as"):
            lead = value.ndim - xv.ndim
            return (None,) * lead + tuple(
                None if xv.shape[i] == 1 and value.shape[lead + i] != 1 else st[i] for i in range(xv.ndim)
            )
        if name in ("repeat", "repeat_interleave"):
            return self._repeat(n, name, st, xv, value)
        self._split_copies(st, xv.shape, value.shape)
        self.merged_heads = False
        out = self._reshape(st, xv, value)
        if self.merged_heads:  # the attention's output before its output projection (Verma & Elbayad's features)
            self._tap(out, "post", n.name)
        return out

    def _repeat(self, n, name, st, xv, value) -> tuple:
        if name == "repeat":
            reps = list(n.args[1:]) if len(n.args) > 1 else n.kwargs.get("repeats", n.kwargs.get("sizes"))
            if len(reps) == 1 and isinstance(reps[0], (list, tuple, torch.Size)):
                reps = reps[0]
            reps = [int(self._value(r)) for r in reps]
            lead = len(reps) - xv.ndim
            out = [None] * lead
            for i in range(xv.ndim):
                a, r = self._norm(st[i]), reps[lead + i]
                out.append(None if a is None else a * r)  # the axis tiled r times: the same units, r blocks
            return tuple(out)
        reps = self._value(self._arg(n, 1, "repeats"))
        dim = self._value(self._arg(n, 2, "dim"))
        if not isinstance(reps, int) or dim is None:
            self._fail("repeat_interleave with tensor repeats or without `dim`")
        dim %= xv.ndim
        a = self._norm(st[dim])
        if reps > 1 and a is not None and len(a) == 1 and a[0][2] == 1 and set(self._roots(a)) <= self._head_roots():
            a = self._copies(a, reps)  # key/value heads repeated for their query heads (grouped-query attention)
            return tuple(a if i == dim else st[i] for i in range(xv.ndim))
        if reps > 1 and xv.shape[dim] == 1 and dim == xv.ndim - 3:
            # the one key/value head of multi-query attention, (..., 1, N, d), repeated for the query heads: its axis
            # of size 1 is no split, so copies of one unpermuted head (:meth:`_merge_heads` gives the value units
            # their one-head split)
            return tuple(self._copies(None, reps) if i == dim else st[i] for i in range(xv.ndim))
        return tuple(
            (None if a is None else tuple((g, k, e * reps) for g, k, e in a)) if i == dim else st[i]
            for i in range(xv.ndim)
        )

    def _r_reduce(self, n, name, value) -> Any:
        """Reductions: a reduced permuted axis disappears (the result is invariant); ``argmax`` over it and the
        indices of ``max``/``min`` along it depend on the order of units and are poisoned."""
        x = self._arg(n, 0, "input")
        if name in ("max", "min") and isinstance(self._value(self._arg(n, 1, "other")), torch.Tensor):
            return self._r_ew(n, name, value)  # torch.max(a, b) is elementwise
        self._account(n, [x])
        st, xv = self._tstate(x), self._value(x)
        dim = self._value(self._arg(n, 2, "dim") if name in ("norm", "vector_norm") else self._arg(n, 1, "dim"))
        if isinstance(dim, (int, list, tuple, torch.Size)) and not isinstance(dim, bool) and dim != []:
            dims = {int(d) % xv.ndim for d in (dim if isinstance(dim, (list, tuple, torch.Size)) else [dim])}
        else:
            dims = set(range(xv.ndim))
        main = value[0] if isinstance(value, tuple) else value
        if main.ndim == xv.ndim:
            out = tuple(None if ax in dims else a for ax, a in enumerate(st))
        elif main.ndim == xv.ndim - len(dims):
            out = tuple(a for ax, a in enumerate(st) if ax not in dims)
        else:
            self._fail("a reduction the tracer cannot read")
        permuted = tuple(seg for d in dims for seg in (self._norm(st[d]) or ()))
        index = _Poisoned(f"`{n.name}`, indices into a permuted axis", permuted) if any(
            g is not None for g, _, _ in permuted) else out  # fmt: skip
        if name in ("argmax", "argmin"):
            return index
        return _Seq((out, index)) if isinstance(value, tuple) else out

    def _r_scan(self, n, name, value) -> Any:
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        st, xv = self._tstate(x), self._value(x)
        pos = {"roll": 2, "diff": 2}.get(name, 1)
        dim = self._value(self._arg(n, pos, "dims" if name in ("flip", "roll") else "dim"))
        if name == "diff" and dim is None:
            dim = -1
        if dim is None:
            dims = set(range(xv.ndim))
        else:
            dims = {int(d) % xv.ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if any(st[d] is not None for d in dims):
            self._fail(f"`{name}` depends on the order along a permuted axis")
        if isinstance(value, tuple):
            return _Seq((st, st))
        return st if value.ndim == xv.ndim else self._fail("a scan that changes the number of axes")

    def _r_sort(self, n, name, value) -> Any:
        """Sorting along a permuted axis gives sorted values that no longer carry the group (they are invariant)
        and indices that are poisoned; along an unpermuted axis both keep the input's groups."""
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        st, xv = self._tstate(x), self._value(x)
        if name == "msort":
            dim = 0
        else:
            pos = 2 if name in ("topk", "kthvalue") else 1
            dim = self._value(self._arg(n, pos, "dim", -1))
            dim = -1 if isinstance(dim, bool) or not isinstance(dim, int) else dim
        dim %= xv.ndim
        action = self._norm(st[dim])
        values = tuple(None if ax == dim else a for ax, a in enumerate(st))
        main = value[0] if isinstance(value, tuple) else value
        if main.ndim < xv.ndim:
            values = values[:dim] + values[dim + 1 :]
        index = _Poisoned(f"`{n.name}`, indices into a permuted axis", action) if action else values
        if name == "argsort":
            return index
        return _Seq((values, index)) if isinstance(value, tuple) else values

    def _r_select(self, n, name, value) -> Any:
        """index_select / narrow / select / gather along an unpermuted axis (the index operand must be
        unpermuted too); gather and take_along_dim only on tensors with no permuted axis."""
        if name == "getitem":
            return self._getitem(n, value)
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        raw, xv = self._state(x), self._value(x)
        if isinstance(raw, _Stack) and name == "select":
            if int(self._value(self._arg(n, 1, "dim"))) % xv.ndim != raw.axis:
                self._fail("it selects inside the fused parts of an attention")
            return raw.parts[int(self._value(self._arg(n, 2, "index")))]
        st = self._tstate(x)
        if name in ("gather", "take_along_dim"):
            if any(a is not None for a in st):
                self._fail(f"`{name}` on a tensor with a permuted axis")
            return (None,) * value.ndim
        dim = int(self._value(self._arg(n, 1, "dim"))) % xv.ndim
        if st[dim] is None:
            return st[:dim] + st[dim + 1 :] if name == "select" else st[:dim] + (None,) + st[dim + 1 :]
        if name == "index_select":
            self._fail("it selects part of a permuted axis")
        start = int(self._value(self._arg(n, 2, "start" if name == "narrow" else "index"))) % xv.shape[dim]
        stop = start + (int(self._value(self._arg(n, 3, "length"))) if name == "narrow" else 1)
        part = self._cut(st[dim], start, stop)
        return st[:dim] + st[dim + 1 :] if name == "select" else st[:dim] + (part,) + st[dim + 1 :]

    def _getitem(self, n, value) -> Any:
        container, index = n.args[0], self._value(n.args[1])
        if isinstance(index, torch.Size):
            index = tuple(index)
        cv = self._value(container)
        if not isinstance(cv, torch.Tensor):
            st = self._state(container)
            if isinstance(st, (_Seq, dict)):
                if _has_group(self._state(n.args[1])):
                    self._fail("it indexes a container with a permuted tensor")
                if isinstance(index, slice) and isinstance(st, _Seq):
                    return _Seq(st[index])
                try:
                    return st[index]
                except (IndexError, KeyError, TypeError):
                    pass
            return self._unknown(n, value)
        idx = index if isinstance(index, tuple) else (index,)
        if isinstance(self._state(container), _Stack):  # one part of a fused projection: x[0], x[:, :, 1]
            stack = self._state(container)
            k = stack.axis
            whole = all(isinstance(i, slice) and i == slice(None) for i in idx[:k])
            if len(idx) <= k or not whole or not isinstance(idx[k], int):
                self._fail("it indexes the fused parts of an attention other than by taking one part")
            part = stack.parts[idx[k]]
            if len(idx) == k + 1:
                return part
            return self._index(part, idx[:k] + idx[k + 1 :], torch.Size(s for a, s in enumerate(cv.shape) if a != k),
                               value)  # fmt: skip
        return self._index(self._tstate(container), idx, cv.shape, value)

    def _index(self, st: tuple, idx: tuple, shape: torch.Size, value: torch.Tensor) -> tuple:
        """Basic indexing (ints, slices, None, Ellipsis) of a tensor of ``shape`` with state ``st``."""
        n = self.node
        if any(isinstance(i, (torch.Tensor, list)) or (isinstance(i, bool)) for i in idx):
            # advanced indexing: index tensors that carry no group, on unpermuted axes, while every permuted axis is
            # taken whole (a relative-position bias table ``biases[:, idx]`` whose first axis is the heads)
            if not self._opaque(self._state(n.args[1])):  # index tensors: constants (buffers are fixed)
                self._fail("advanced indexing with a permuted index")
            advanced = [k for k, i in enumerate(idx) if isinstance(i, (torch.Tensor, list))]
            st = tuple(None if k in advanced and self._opaque((a,)) else a for k, a in enumerate(st))
            if all(a is None for a in st):
                return (None,) * value.ndim
            whole = all(isinstance(i, slice) and i == slice(None) for k, i in enumerate(idx) if k not in advanced)
            if len(idx) > len(st) or not whole or any(st[k] is not None for k in advanced):
                self._fail("advanced indexing of a tensor with a permuted axis")
            new = value.ndim - (len(st) - len(advanced))  # the axes the broadcast index tensors create
            adjacent = advanced == list(range(advanced[0], advanced[-1] + 1))
            rest = [st[k] for k in range(len(st)) if k not in advanced]
            at = advanced[0] if adjacent else 0
            return tuple(rest[:at]) + (None,) * new + tuple(rest[at:])
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            fill = len(shape) - (len(idx) - 1 - sum(i is None for i in idx))
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1 :]
        out, ax = [], 0
        for i in idx:
            if i is None:
                out.append(None)
                continue
            if st[ax] is None:
                if isinstance(i, slice):
                    out.append(None)
            elif isinstance(i, slice) and i.step in (None, 1):
                a, b, _ = slice(i.start, i.stop).indices(shape[ax])
                out.append(self._cut(st[ax], a, max(a, b)))
            elif isinstance(i, int):
                self._cut(st[ax], i % shape[ax], i % shape[ax] + 1)  # one unit, a group of its own
            else:
                self._fail("indexing selects a strided part of a permuted axis")
            ax += 1
        out.extend(st[ax:])
        if len(out) != value.ndim:
            self._fail("an indexing expression the tracer cannot read")
        return tuple(out)

    def _r_cat(self, n, name, value) -> Any:
        tensors = self._arg(n, 0, "tensors")
        dim = self._value(self._arg(n, 1, "dim", 0))
        self._account(n, [tensors, *tensors] if isinstance(tensors, (list, tuple)) else [tensors])
        states, vals = self._state(tensors), self._value(tensors)
        if not isinstance(states, _Seq) or any(_poison(st) or not _is_tensor_state(st) for st in states):
            self._fail("it joins operands the tracer cannot read")
        parts = list(zip(states, vals))
        if name == "stack":
            dim %= value.ndim
            out = []
            for ax in range(parts[0][1].ndim):
                action = parts[0][0][ax]
                for st, _ in parts[1:]:
                    action = self._unify(action, st[ax])
                out.append(action)
            return tuple(out[:dim]) + (None,) + tuple(out[dim:])
        dim %= value.ndim
        out = []
        for ax in range(value.ndim):
            if ax == dim:
                segs = []
                for st, v in parts:
                    segs.extend(self._norm(st[ax]) if st[ax] is not None else ((None, v.shape[ax], 1),))
                out.append(self._norm(tuple(segs)) if any(s[0] is not None for s in segs) else None)
            else:
                action = parts[0][0][ax]
                for st, _ in parts[1:]:
                    action = self._unify(action, st[ax])
                out.append(action)
        return tuple(out)

    def _r_split(self, n, name, value) -> Any:
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        raw, xv = self._state(x), self._value(x)
        dim = int(self._value(self._arg(n, 2 if name != "unbind" else 1, "dim", 0))) % xv.ndim
        if isinstance(raw, _Stack) and name == "unbind" and dim == raw.axis:  # q, k, v = qkv.unbind(0)
            return _Seq(raw.parts)
        st = self._tstate(x)
        if name == "unbind":
            if st[dim] is not None:
                self._fail("unbind along a permuted axis")
            return _Seq(tuple(a for ax, a in enumerate(st) if ax != dim) for _ in value)
        pieces, offset = [], 0
        for v in value:
            length = v.shape[dim]
            pieces.append((offset, offset + length))
            offset += length
        for a, b in pieces:  # split every crossed group first, then read the parts
            self._cut(st[dim], a, b)
        pieces = [st[:dim] + (self._cut(st[dim], a, b),) + st[dim + 1 :] for a, b in pieces]
        return _Seq(pieces)

    def _r_spatial(self, n, name, value) -> Any:
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        st, xv = self._tstate(x), self._value(x)
        if name == "pad":
            pads = list(self._value(self._arg(n, 1, "pad")))
            out = []
            for ax in range(xv.ndim):
                k = xv.ndim - 1 - ax  # F.pad lists (before, after) pairs from the last axis backwards
                padded = 2 * k < len(pads) and any(pads[2 * k : 2 * k + 2])
                if padded and st[ax] is not None:
                    self._fail("padding a permuted axis")
                out.append(None if padded else st[ax])
            return tuple(out)
        main = value[0] if isinstance(value, tuple) else value
        out = self._spatial(st, xv, main)
        return _Seq((out, out)) if isinstance(value, tuple) else out

    def _spatial(self, st: tuple, x: torch.Tensor, value: torch.Tensor) -> tuple:
        if value.ndim != x.ndim:
            self._fail("pooling changed the number of axes")
        for ax in range(2, x.ndim):
            if st[ax] is not None:
                self._fail(f"pooling mixes positions along axis {ax}, which is permuted")
        if x.ndim < 3:
            self._fail("pooling of an unbatched input")
        return st[:2] + (None,) * (x.ndim - 2)

    def _r_pixel(self, n, name, value) -> Any:
        x = self._arg(n, 0, "input")
        self._account(n, [x])
        factor = int(self._value(n.args[1] if len(n.args) > 1 else next(iter(n.kwargs.values()))))
        kind = name if name.startswith("pixel") else "channel"
        xv = self._value(x)
        return self._pixel(self._tstate(x), kind, factor, xv, value, 1 if kind == "channel" else xv.ndim - 3)

    def _pixel(self, st, kind, factor, x, value, c: int) -> tuple:
        """pixel_shuffle moves blocks of r^2 channels to positions, pixel_unshuffle the reverse; a channel shuffle
        (g groups) interleaves g equal blocks, so the blocks must carry the same groups (they are tied)."""
        for ax in range(c + 1, x.ndim):
            if st[ax] is not None:
                self._fail("a pixel shuffle mixes positions along a permuted axis")
        action = self._norm(st[c])
        if action is None:
            return st[:c] + (None,) * (value.ndim - c)
        r2 = factor * factor
        if kind == "pixel_shuffle":
            if any(e % r2 for _, _, e in action):
                self._fail(f"pixel_shuffle({factor}) splits permuted units across positions")
            new = tuple((g, k, e // r2) for g, k, e in action)
        elif kind == "pixel_unshuffle":
            new = tuple((g, k, e * r2) for g, k, e in action)
        else:
            chunk = self._chunks(action, factor)
            new = None if chunk is None else tuple((g, k, e * factor) for g, k, e in chunk)
        return st[:c] + (new,) + (None,) * (value.ndim - c - 1)

    def _chunks(self, action, count: int):
        """Cut an axis into ``count`` equal consecutive chunks and tie them (an interleaving of the chunks, as in
        a channel shuffle, is consistent only if every chunk is relabelled alike); returns the tied chunk."""
        length = _length(self._norm(action)) // count
        for c in range(1, count):  # a group crossing a chunk boundary is split there (at a unit boundary)
            self._cut(action, 0, c * length)
        action = list(self._norm(action))
        chunks, cur, acc = [], [], 0
        while action:
            g, k, e = action.pop(0)
            room = length - acc
            if k * e <= room:
                cur.append((g, k, e))
                acc += k * e
            elif g is None:
                cur.append((None, room, 1))
                action.insert(0, (None, k * e - room, 1))
                acc = length
            else:
                self._fail("it splits a permuted group across interleaved blocks")
            if acc == length:
                chunks.append(tuple(cur))
                cur, acc = [], 0
        tied = chunks[0]
        for other in chunks[1:]:
            tied = self._unify(tied, other) if tied is not None else self._unify(None, other)
        if tied is None or all(g is None for g, _, _ in self._norm(tied)):
            return None
        return self._norm(tied)

    def _r_contract(self, n, name, value) -> Any:
        """matmul / einsum / F.linear: the contracted axes of both operands are tied (a consistent relabelling of
        a summed index leaves the sum unchanged); the result's axes come from the operands' free axes."""
        if name == "einsum":
            eq = self._value(n.args[0])
            ops = list(n.args[1:])
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = list(ops[0])
            self._account(n, ops)
            return self._einsum(eq, [self._tstate(o) for o in ops], [self._value(o) for o in ops], value)
        if name == "linear":
            x, w, b = self._arg(n, 0, "input"), self._arg(n, 1, "weight"), self._arg(n, 2, "bias")
            self._account(n, [x, w, b])
            sx, sw = self._tstate(x), self._tstate(w)
            if self._value(w).ndim != 2:
                self._fail("F.linear with a weight that is not a matrix")
            self._unify(sx[-1], sw[1])
            out = sw[0]
            if b is not None:
                out = self._unify(out, self._tstate(b)[0])
            self._layer_output(n, w, out, value.ndim - 1)
            return sx[:-1] + (out,)
        a, b = self._arg(n, 0, "input"), self._arg(n, 1, "other" if name == "matmul" else "mat2")
        self._account(n, [a, b])
        va, vb = self._value(a), self._value(b)
        if va.ndim == 1 or vb.ndim == 1:
            self._fail("matmul with a vector operand")
        # batch axes broadcast from the right; the contraction is a[-1] with b[-2]
        batch = max(va.ndim, vb.ndim) - 2
        letters = string.ascii_uppercase[:batch]
        la = letters[batch - (va.ndim - 2) :] + "xy"
        lb = letters[batch - (vb.ndim - 2) :] + "yz"
        return self._einsum(f"{la},{lb}->{letters}xz", [self._tstate(a), self._tstate(b)], [va, vb], value)

    def _layer_output(self, n, w, out, axis: int) -> None:
        """The output units of a functional layer (``F.linear``, ``F.conv2d``, ``F.embedding``) are a layer's. A
        weight read from a state-dict entry ``<module>.weight`` names the group after the module and taps it here,
        as the rules for the nn modules do, so that a torch.export graph gives the spec of the fx graph."""
        segments = self._norm(out) or ()
        fresh = [g for g, _, _ in segments if g is not None and not self.groups.layer[self.groups.find(g)]]
        self._promote(out)
        key = self.aliases.get(w.target) if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None
        if key is None or not key.endswith(".weight") or len(segments) != 1 or segments[0][0] is None:
            return
        if len(fresh) == 1:  # the first trace that reads this weight names its units
            root = self.groups.find(fresh[0])
            self.groups.name[root], self.groups.axis_named[root] = key[: -len(".weight")], False
        if self.collect_taps and segments[0][2] == 1:
            self.taps.append((self.groups.find(segments[0][0]), Tap(n.name, axis, "out")))

    def _r_conv(self, n, name, value) -> Any:
        """``F.conv1d/2d/3d`` and ``F.conv_transpose1d/2d/3d`` with any weight: the rule of the nn modules
        (:meth:`_conv`) on the weight's own axes: its input-channel axis is tied to the input's channels, its
        output-channel axis gives the output's; kernel positions are never permuted. With ``groups > 1`` the
        weight's in-block axis is shared by every group, so it is fixed and channels move as whole blocks."""
        x, w, b = self._arg(n, 0, "input"), self._arg(n, 1, "weight"), self._arg(n, 2, "bias")
        groups = int(self._value(self._arg(n, 6, "groups", 1)))
        self._account(n, [x, w, b])
        st, sw = self._tstate(x), self._tstate(w)
        xv, wv = self._value(x), self._value(w)
        if xv.ndim != wv.ndim:
            self._fail(f"unbatched input of shape {tuple(xv.shape)}")
        for ax in range(2, xv.ndim):
            if st[ax] is not None:
                self._fail(f"a convolution mixes spatial positions, and axis {ax} is permuted")
            self._fix_action(sw[ax])
        transposed = name.startswith("conv_transpose")
        in_axis, out_axis = (0, 1) if transposed else (1, 0)
        if groups == 1:
            self._unify(st[1], sw[in_axis])
            out = sw[out_axis]
        else:
            blocks = self._coarsen(st[1], groups, "a grouped convolution")
            out = _grouped_output(blocks, xv.shape[1] // groups, value.shape[1] // groups)
            self._fix_action(sw[1])
            self._unify(sw[0], blocks if transposed else out)
        if b is not None:
            out = self._unify(out, self._tstate(b)[0])
        self._layer_output(n, w, out, 1)
        return (st[0], out) + (None,) * (value.ndim - 2)

    def _r_embedding(self, n, name, value) -> Any:
        """``F.embedding(input, weight)``: the rows are addressed by the index values, so they stay in place; the
        embedding axis gives the output's last axis; the output's other axes are the indices'."""
        idx, w = self._arg(n, 0, "input"), self._arg(n, 1, "weight")
        self._account(n, [idx, w])
        si, sw = self._tstate(idx), self._tstate(w)
        if self._value(w).ndim != 2:
            self._fail("an embedding table that is not a matrix")
        self._fix_action(sw[0])
        self._layer_output(n, w, sw[1], value.ndim - 1)
        return si + (sw[1],)

    def _einsum(self, eq: str, states, vals, value) -> tuple:
        eq = eq.replace(" ", "")
        if "->" not in eq or "." in eq:
            self._fail("einsum without an explicit output or with an ellipsis")
        lhs, rhs = eq.split("->")
        terms = lhs.split(",")
        if len(terms) != len(states) or any(len(t) != v.ndim for t, v in zip(terms, vals)):
            self._fail("einsum operands do not match the equation")
        letter_action: dict[str, Any] = {}
        for term, st, v in zip(terms, states, vals):
            for ax, ch in enumerate(term):
                a = st[ax]
                if v.shape[ax] == 1 and value.ndim and ch in rhs and value.shape[rhs.index(ch)] != 1:
                    if a is not None:
                        self._fix_action(a)
                    continue
                letter_action[ch] = self._tie(letter_action[ch], a) if ch in letter_action else a
        out = tuple(letter_action.get(ch) for ch in rhs)
        for a in out:
            self._promote(a)
        return out

    def _r_fnorm(self, n, name, value) -> Any:
        """Functional normalisations: their per-channel (or per-feature) weight and bias tensors are tied to the
        axis they scale; batch/instance/group norm act on axis 1, layer norm on the trailing axes."""
        x = self._arg(n, 0, "input")
        st, xv = self._tstate(x), self._value(x)
        if name in ("layer_norm", "rms_norm"):  # both normalise over the trailing axes (mean and variance / RMS)
            shape = list(self._value(self._arg(n, 1, "normalized_shape")))
            params = [self._arg(n, 2, "weight")] + ([self._arg(n, 3, "bias")] if name == "layer_norm" else [])
            self._account(n, [x, *params])
            k = len(shape)
            for p in params:
                if p is not None:
                    ps = self._tstate(p)
                    for j in range(k):
                        self._unify(ps[j], st[xv.ndim - k + j])
            return st
        if name == "batch_norm":
            params = [self._arg(n, i, nm) for i, nm in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                         (4, "bias"))]  # fmt: skip
        elif name == "instance_norm":
            params = [self._arg(n, i, nm) for i, nm in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                         (4, "bias"))]  # fmt: skip
        else:
            groups = int(self._value(self._arg(n, 1, "num_groups")))
            params = [self._arg(n, 2, "weight"), self._arg(n, 3, "bias")]
            st = (st[0], self._within_blocks(st[1], groups, "group_norm")) + st[2:]
        self._account(n, [x, *params])
        for p in params:
            if p is not None:
                self._unify(self._tstate(p)[0], st[1])
        return st

    def _r_attention(self, n, name, value) -> Any:
        """``F.scaled_dot_product_attention``: the batch axes (batch, heads) of query, key, value and mask are tied
        (a head axis moves the heads of all four alike; under ``enable_gqa`` each key/value head serves a block of
        query heads); the query and key feature axes are tied (their dot product), the output's feature axis is the
        value's. Sequence axes and the mask's last two axes must stay unpermuted."""
        q, k, v = (self._arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
        mask = self._arg(n, 3, "attn_mask")
        self._account(n, [q, k, v, mask])
        sq, sk, sv = (self._tstate(t) for t in (q, k, v))
        vq, vk, vv = (self._value(t) for t in (q, k, v))
        if vq.ndim < 2 or not (vq.ndim == vk.ndim == vv.ndim):
            self._fail("attention with query, key and value of different numbers of axes")
        for st in (sq, sk, sv):
            if st[-2] is not None:
                self._fail("attention mixes positions, and a sequence axis is permuted")
        batch = list(sq[:-2])
        for st, val in ((sk, vk), (sv, vv)):
            for ax in range(vq.ndim - 2):
                a = st[ax]
                if val.shape[ax] != vq.shape[ax] and a is not None:
                    if ax != vq.ndim - 3 or vq.shape[ax] % val.shape[ax]:
                        self._fail("attention with key/value axes that do not match the query's")
                    # enable_gqa: key/value head j serves query heads j*rep..
                    a = self._copies(self._norm(a), vq.shape[ax] // val.shape[ax])
                elif val.shape[ax] == 1 != vq.shape[ax] and ax == vq.ndim - 3:
                    a = self._copies(None, vq.shape[ax])  # multi-query: one key/value head serves every query head
                batch[ax] = self._tie(batch[ax], a)
        self._unify(sq[-1], sk[-1])
        if mask is not None and isinstance(self._value(mask), torch.Tensor):
            sm, vm = self._tstate(mask), self._value(mask)
            if not self._opaque(tuple(sm[-2:])):  # a stored mask's position axes are pinned
                self._fail("its attention mask is permuted along a query or key position")
            lead = vm.ndim - 2
            for j in range(lead):
                ax = vq.ndim - 2 - lead + j
                if ax < 0:
                    self._fail("an attention mask with more axes than the query")
                if vm.shape[j] == 1 and vq.shape[ax] != 1:
                    self._fix_action(sm[j])
                else:
                    batch[ax] = self._tie(batch[ax], sm[j])
        return tuple(batch) + (None, sv[-1])

    # ------------------------------------------------------------------ rules
    @staticmethod
    def _flat(action) -> tuple:
        """``action`` with its unpermuted entries as one segment per run (a canonical form to compare)."""
        out: list = []
        for g, k, e in action:
            seg = (g, k, e) if g is not None else (None, k * e, 1)
            if seg[0] is None and out and out[-1][0] is None:
                out[-1] = (None, out[-1][1] + seg[1], 1)
            elif seg[1]:
                out.append(seg)
        return tuple(out)

    def _regroup(self, actions: list, ins: list[int], outs: list[int]) -> list | None:
        """A block of axes of sizes ``ins`` reshaped into axes of sizes ``outs`` (equal products) whose one permuted
        axis carries ``actions[p]``: the block's entries in row-major order carry that axis' units expanded over the
        later input axes and tiled over the earlier ones. If one output axis ``b`` holds that pattern whole (the
        same action, expanded over the later output axes and tiled over the earlier ones: MobileViT's unfolding of
        ``(B, C, H, W)`` into ``(B * C * h, ph, w, pw)`` keeps the channels inside the merged axis), the output
        axes' actions (None but at ``b``); else None."""
        p = next(a for a, act in enumerate(actions) if act is not None)
        flat = self._flat(tuple((g, k, e * math.prod(ins[p + 1 :])) for g, k, e in actions[p]) * math.prod(ins[:p]))
        for b, size in enumerate(outs):
            inner, outer = math.prod(outs[b + 1 :]), math.prod(outs[:b])
            tile, length = [], 0
            for g, k, e in flat:
                if length >= size * inner:
                    break
                tile.append((g, k, e))
                length += k * e
            if length != size * inner or any(e % inner for g, _, e in tile if g is not None):
                continue
            if any((k * e) % inner for g, k, e in tile if g is None):
                continue
            action = tuple((g, k, e // inner) if g is not None else (None, k * e // inner, 1) for g, k, e in tile)
            if self._flat(tuple((g, k, e * inner) for g, k, e in action) * outer) == flat:
                return [action if c == b else None for c in range(len(outs))]
        return None

    def _reshape(self, st: tuple, x: torch.Tensor, value: torch.Tensor) -> Any:
        """Carry groups through a reshape by matching blocks of input and output axes with equal products.

        Attention heads: an axis of ``H * d`` units split into ``(H, d)`` (or ``(c, H, d)``, a fused projection's
        parts) gains a head axis and an axis inside heads (:meth:`_split_heads`); merging the two back (head axis
        outer) gives the flat group again (:meth:`_merge_heads`)."""
        original = st
        ins, outs = list(x.shape), list(value.shape)
        out: list = [None] * len(outs)
        stack = None
        full = tuple(self._norm(a) for a in st)  # fixed groups kept: a fixed head axis still indexes its insides
        st = tuple(self._live_norm(a) for a in st)
        i = j = 0
        while i < len(ins) or j < len(outs):
            bi, bj = [i], [j]
            if i >= len(ins) or j >= len(outs):  # trailing size-1 axes
                if i < len(ins) and st[i] is not None:
                    self._fail("a reshape drops a permuted axis")
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
            i, j = i + 1, j + 1
            nin = [a for a in bi if ins[a] > 1]
            nout = [b for b in bj if outs[b] > 1]
            permuted = [a for a in bi if st[a] is not None]
            both = [a for a in bi if full[a] is not None]
            if len(nout) == 1 and len(both) == 2 and both[1] == nin[nin.index(both[0]) + 1]:
                # a head axis merged with the axis inside heads (and unpermuted positions around them)
                merged = self._merge_heads(full[both[0]], full[both[1]])
                if merged is not None:
                    inner = math.prod(ins[a] for a in nin if a > both[1])
                    outer = math.prod(ins[a] for a in nin if a < both[0])
                    out[nout[0]] = tuple((g, k, e * inner) for g, k, e in merged) * outer
                    self.merged_heads = True
                    continue
            if not permuted:
                continue
            if len(nin) == 1 and len(nout) == 1:
                out[nout[0]] = st[nin[0]]
            elif len(nout) == 1 and len(permuted) == 1:
                # merging axes: the permuted one's units are expanded over the later axes and tiled over the
                # earlier ones
                p = permuted[0]
                inner = math.prod(ins[a] for a in nin if a > p)
                outer = math.prod(ins[a] for a in nin if a < p)
                out[nout[0]] = tuple((g, k, e * inner) for g, k, e in st[p]) * outer
            elif len(nin) == 1 and len(nout) > 1:
                action = st[nin[0]]
                rest = math.prod(outs[b] for b in nout[1:])
                split = None
                if any(e % rest for _, _, e in action) and len(nout) in (2, 3) and stack is None:
                    split = self._split_heads(action, [outs[b] for b in nout])
                if not any(e % rest for _, _, e in action):
                    out[nout[0]] = tuple((g, k, e // rest) for g, k, e in action)
                elif split is not None and len(nout) == 2:
                    out[nout[0]], out[nout[1]] = split[0]
                elif split is not None:
                    stack = (nout[0], nout[1], nout[2], split)
                elif len(nout) == 2:
                    # the leading factor indexes equal chunks (e.g. a channel shuffle's view): tie the chunks
                    out[nout[1]] = self._chunks(action, outs[nout[0]])  # None when nothing stays permuted
                else:
                    self._fail("a reshape splits permuted units")
            elif len(nout) == 1 and len(permuted) == 2 and permuted[1] == nin[nin.index(permuted[0]) + 1]:
                # two permuted axes merged that are not a head axis and its inside (tried above)
                if self._merge_heads(st[permuted[1]], st[permuted[0]], create=False) is not None:
                    # the inside axis outer, heads inner (a channel shuffle's view): heads stay fixed
                    self._release(self._roots(st[permuted[0]])[0], "inner")
                    return self._reshape(original, x, value)
                insides = {r for h, i, c, d in self.split.values() for r in self._roots(((i, d, 1),))}
                cut = [r for r in self._roots(st[permuted[1]]) if r in insides]
                if cut:
                    # one part of the axis inside heads (a query/key/value split of each head's units, as in LeViT):
                    # the parts cannot be expressed as flat groups, so the units inside heads stay in place
                    for r in cut:
                        self._release(r, "heads")
                    return self._reshape(original, x, value)
                self._fail(f"a reshape from {tuple(ins)} to {tuple(outs)} interleaves permuted units")
            elif len(permuted) == 1 and (moved := self._regroup([st[a] for a in bi], [ins[a] for a in bi],
                                                                 [outs[b] for b in bj])) is not None:  # fmt: skip
                for b, action in zip(bj, moved):
                    out[b] = action
            else:
                self._fail(f"a reshape from {tuple(ins)} to {tuple(outs)} interleaves permuted units")
        if stack is not None:
            c, ha, ia, parts = stack
            rest = [a for a in range(len(outs)) if a != c]
            return _Stack(c, tuple(tuple(hd if a == ha else inn if a == ia else out[a] for a in rest)
                                   for hd, inn in parts))  # fmt: skip
        return tuple(out)


def _genuine_forward(m: nn.Module) -> bool:
    """Whether ``m`` runs the forward of a torch.nn class itself (a subclass that overrides forward, or one that
    only claims a torch.nn module path to be a leaf of the fx trace, is not covered by the rule for its base)."""
    import sys

    owner = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    home = sys.modules.get(owner.__module__)
    return owner.__module__.startswith("torch.nn.") and getattr(home, owner.__name__, None) is owner


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _aliases(model: nn.Module) -> dict[str, str]:
    """State-dict key -> the first key naming the same tensor (tied parameters share one set of records)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        out[key] = first.setdefault(id(value), key)
    return out


def _trace_graph(
    model: nn.Module, example_input: Any, *, on_unsupported: str = "raise", tracer: str = "auto"
) -> tuple[PermutationSpec, torch.fx.GraphModule]:
    """Trace ``model`` in train and eval mode, each with and without gradients, into one spec.

    Returns the spec and the eval-mode, no-grad GraphModule, whose node names the spec's taps refer to (alignment
    reads activations there). Groups that exist only in other graphs (e.g. auxiliary heads) have no tap. Under
    ``tracer="auto"`` a model that torch.fx cannot trace, or whose fx graph is refused at an operation the rules do
    not know (an fx leaf such as torchvision's ``shifted_window_attention``), is traced again through torch.export,
    which records the operations inside such leaves.
    """
    if on_unsupported not in ("raise", "fix"):
        raise ValueError(f"unknown on_unsupported '{on_unsupported}'; expected one of ['raise', 'fix']")
    if tracer not in _TRACERS:
        raise ValueError(f"unknown tracer '{tracer}'; expected one of {list(_TRACERS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = tuple(i.to(device) if isinstance(i, torch.Tensor) else i for i in inputs)
    try:
        return _trace_modes(model, inputs, on_unsupported=on_unsupported, tracer=tracer)
    except SpecError as exc:
        if tracer != "auto" or not getattr(exc, "opaque_fx_node", False):
            raise
        logger.info("%s; tracing it with torch.export, which records the operations inside", _first_line(exc))
        try:
            return _trace_modes(model, inputs, on_unsupported=on_unsupported, tracer="export")
        except SpecError as again:
            raise SpecError(f"{exc} torch.export, tried because it traces inside such operations, fails too: "
                            f"{_first_line(again)}") from again  # fmt: skip


def _trace_modes(
    model: nn.Module, inputs: tuple, *, on_unsupported: str, tracer: str
) -> tuple[PermutationSpec, torch.fx.GraphModule]:
    """:func:`_trace_graph` for one choice of front end."""
    aliases = _aliases(model)
    shared = None
    # every mode a network runs in: training (grad), batch-norm re-estimation (train, no grad), evaluation with and
    # without grad; the last is the graph alignment reads activations from, so it records the taps
    for train, grad in ((True, True), (True, False), (False, True), (False, False)):
        gm = _fx_graph(model, train=train, grad=grad, example_input=inputs, tracer=tracer)
        last = not train and not grad
        interp = _SpecInterpreter(gm, shared, on_unsupported=on_unsupported, taps=last, aliases=aliases)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # train-mode dropout must not move the user's RNG
            try:
                interp.run(*inputs)
            except SpecError:
                raise
            # AssertionError: the model's own checks of its input (torch._assert, e.g. timm's image size)
            except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, KeyError, AssertionError) as exc:
                where = f" at fx node `{interp.node.name}`" if interp.node is not None else ""
                raise SpecError(
                    f"{type(model).__name__} could not run on `example_input` of shape {_describe(inputs)} "
                    f"in {'train' if train else 'eval'} mode{where}: {_first_line(exc)}"
                ) from exc
        shared = shared or interp
    spec = _build_spec(shared, interp.taps, aliases, model)
    gm.meta["rules_used"] = frozenset(shared.used)  # which rules of the table proved this spec (tests read it)
    return spec, gm


def _tap_graph(model: nn.Module, example_input: Any, nodes: set[str], *, train: bool = False) -> torch.fx.GraphModule:
    """The graph whose nodes a spec's taps name (eval mode without gradients, or train mode with them): torch.export's
    for taps on an exported graph (its node names all start with ``export_``), else torch.fx's (torch.export's where
    fx cannot trace the model)."""
    if any(name.startswith("export_") for name in nodes):
        try:
            gm = _fx_graph(model, train=train, grad=train, example_input=example_input, tracer="export")
        except SpecError:  # an fx node that happens to be called export_...
            gm = None
        if gm is not None and nodes & {n.name for n in gm.graph.nodes}:
            return gm
    return _fx_graph(model, train=train, grad=train, example_input=example_input)


_TRACERS = ("auto", "fx", "export")


def _check_traceable(model: nn.Module) -> None:
    """Refuse what a torch.fx graph cannot show: forward hooks (module-level or global; pruning and old-style weight
    norm are pre-hooks) and parametrizations (the weight is computed in forward, outside the state dict's name)."""
    from torch.nn.modules import module as _module
    from torch.nn.utils import parametrize

    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(_module, kind, None):
            raise SpecError(
                "global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook or "
                "..._pre_hook); the traced graph would not contain them: remove them before tracing"
            )
    for name, m in model.named_modules():
        where = f"module `{name}`" if name else f"the model ({type(m).__name__})"
        if m._forward_hooks or m._forward_pre_hooks:
            raise SpecError(
                f"{where} has forward hooks (pruning and torch.nn.utils.weight_norm add them too); the traced graph "
                "would not contain them: remove them (e.g. torch.nn.utils.prune.remove) before tracing"
            )
        if parametrize.is_parametrized(m):
            raise SpecError(
                f"{where} is parametrized (e.g. weight_norm or spectral_norm): its weights are computed in forward; "
                "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) before tracing"
            )


def _fx_graph(
    model: nn.Module, *, train: bool, grad: bool | None = None, example_input: Any = None, tracer: str = "auto"
) -> torch.fx.GraphModule:
    """The graph of a copy of ``model`` in train or eval mode, with gradients enabled or not (default: enabled in
    train mode only). Branches on ``self.training`` or ``torch.is_grad_enabled()`` are resolved at trace time, so
    the graphs can differ.

    ``tracer="fx"``: ``torch.fx.symbolic_trace``; ``"export"``: ``torch.export`` on ``example_input`` (shapes
    specialised to it, see :mod:`neuralign.alignment._export`); ``"auto"``: fx, and export where fx fails (if an
    ``example_input`` is given). Raises SpecError when the model cannot be copied or traced."""
    import copy

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    _check_traceable(model)
    try:
        work = copy.deepcopy(model).train(train)
    except Exception as exc:
        raise SpecError(f"could not copy {type(model).__name__} to trace it: {_first_line(exc)}") from exc
    what = type(model).__name__
    failed = ""
    if tracer != "export":
        try:
            with torch.set_grad_enabled(train if grad is None else grad):
                return torch.fx.symbolic_trace(work).train(train)
        except Exception as exc:
            failed = f"torch.fx could not trace {what}: {_first_line(exc)}"
            if tracer == "fx" or example_input is None:
                raise SpecError(f"{failed}. Build the spec by hand with neuralign.alignment.SpecBuilder.") from exc
            logger.info("%s; tracing it with torch.export instead", failed)
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        with torch.set_grad_enabled(train if grad is None else grad):
            gm = exported_graph(work, tuple(inputs))
    except Exception as exc:
        raise SpecError(
            (f"{failed}, and " if failed else "") + f"torch.export could not export {what} on `example_input` of "
            f"shape {_describe(tuple(inputs))}: {_first_line(exc)}. Build the spec by hand with "
            "neuralign.alignment.SpecBuilder."
        ) from exc
    _warn_unused_by_export(work, gm)
    return gm  # an exported module refuses .train(): its graph already holds the mode it was exported in


def _warn_unused_by_export(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Warn when an exported graph leaves parameters of ``model`` unused: torch.export records only the branch that
    ``example_input``'s shapes take, so a branch on shapes that uses them (and may need their units permuted with
    the rest) was not seen, and the spec is proven for inputs shaped like the example only."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    unused = [aliases[0] for aliases in names.values() if not used.intersection(aliases)]
    if unused:
        shown = ", ".join(f"`{k}`" for k in unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
        warnings.warn(
            f"torch.export recorded {type(model).__name__} for the shapes of `example_input` only, and that graph "
            f"does not use the parameters {shown}: a branch on the input's shape that uses them was not seen, so "
            "the spec is proven for inputs shaped like `example_input` only (check_equivalence on other shapes, or "
            "trace with an example that takes that branch)",
            stacklevel=4,
        )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _describe(inputs: tuple) -> str:
    return ", ".join(str(tuple(i.shape)) if isinstance(i, torch.Tensor) else type(i).__name__ for i in inputs)


def _build_spec(interp: _SpecInterpreter, taps: list, aliases: dict[str, str], model: nn.Module) -> PermutationSpec:
    groups = interp.groups
    try:
        interp._settle_copies()
        interp._settle_heads()
        if interp._check_copies():
            interp._settle_heads()
    except _Unsupported as exc:
        what = type(model).__name__
        raise SpecError(f"cannot prove that the attention heads of {what} are safe to permute: {exc}") from None
    insides = {groups.find(i) for _, i, _, _ in interp.split.values()}
    names: dict[int, str] = {}
    used: set[str] = set()
    for gid in range(len(groups.parent)):
        root = groups.find(gid)
        if (root == gid and groups.live(gid) and gid not in interp.subst and gid not in insides
                and gid not in interp.within):  # fmt: skip
            base = name = groups.name[gid]
            k = 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            used.add(name)
            names[gid] = name

    def resolve(action) -> tuple[Segment, ...] | None:
        if action is None:
            return None
        segs = []
        for gid, size, expand in interp._norm(action):
            g = names.get(groups.find(gid)) if gid is not None and groups.live(gid) else None
            segs.append(Segment(g, size, expand))
        return tuple(segs) if any(s.group is not None for s in segs) else None

    axes: dict[str, dict[int, tuple[Segment, ...]]] = {}
    for (key, axis), action in interp.records.items():
        segs = resolve(action)
        if segs is not None:
            if key not in aliases:
                raise SpecError(
                    f"traced tensor `{key}` is not in the model's state dict (a weight computed in forward, e.g. by a "
                    "parametrization, cannot be permuted through its state)"
                )
            for alias, canonical in aliases.items():
                if canonical == key:
                    axes.setdefault(alias, {})[axis] = segs
    sizes = {names[g]: groups.size[g] for g in sorted(names)}
    by_group: dict[str, list[Tap]] = {}
    for gid, tap in taps:
        if groups.live(gid) and groups.find(gid) in names:
            by_group.setdefault(names[groups.find(gid)], []).append(tap)
    final_taps = {}
    for g, ts in by_group.items():
        chosen = [t for t in ts if t.kind != "out"] or ts
        final_taps[g] = tuple(dict.fromkeys(chosen))
    heads: dict[str, Heads] = {}
    inner_keys: dict[int, str] = {}
    within_keys: dict[int, str] = {}
    for f, (h, i, n, d) in sorted(interp.split.items()):
        if groups.find(f) not in names:
            continue
        name = names[groups.find(f)]
        ((hg, _, tie),) = interp._norm(((h, n, 1),))
        within = None
        if groups.find(hg) in interp.within:  # grouped-query attention: query heads reorder inside their blocks
            source, tie = interp.within[groups.find(hg)]
            within = within_keys.setdefault(groups.find(hg), f"{name}.within")
            hg = interp._norm(source)[0][0] if source is not None else None
        key = None if f in interp.fixed_inside else inner_keys.setdefault(groups.find(i), f"{name}.inner")
        head_group = names.get(groups.find(hg)) if hg is not None and groups.live(hg) else None
        heads[name] = Heads(n, d, head_group, key, tie, within)
    return PermutationSpec(sizes, axes, final_taps, heads)


def trace_spec(
    model: nn.Module, example_input: Any, *, on_unsupported: str = "raise", tracer: str = "auto"
) -> PermutationSpec:
    """Discover the permutation groups of ``model`` by tracing it with torch.fx (or torch.export where fx fails).

    A relabelling :math:`P_\\ell` of the units of each hidden layer leaves the network's function unchanged when
    every tensor that reads or writes those units is permuted consistently
    (:math:`W_\\ell \\to P_\\ell W_\\ell P_{\\ell-1}^\\top`). This function finds the groups of units that must be
    relabelled together and the tensor axes each one acts on.

    Parameters
    ----------
    model : nn.Module
        Any module torch.fx can trace, or torch.export can export on ``example_input``. It is copied; the model
        itself is not modified.
    example_input : Tensor or tuple of Tensor
        An input batch (values are irrelevant, shapes matter: flattening is resolved from them). Use a batch of
        at least 2 for models with BatchNorm1d.
    on_unsupported : {"raise", "fix"}
        What to do with an operation that cannot be proven safe: raise :class:`SpecError` naming the fx node
        (default), or keep the groups it touches unpermuted.
    tracer : {"auto", "fx", "export"}
        How the graph is obtained: ``torch.fx.symbolic_trace`` ("fx"), ``torch.export.export(..., strict=False)``
        on ``example_input`` ("export"), or fx and, where fx cannot trace the model (control flow on shapes, such
        as "same" padding computed from ``x.shape``) or its graph is refused at an operation no rule knows (an fx
        leaf such as torchvision's ``shifted_window_attention``, whose body torch.export records), export ("auto",
        default; under ``on_unsupported="fix"`` such a refusal fixes groups instead). An exported graph is
        specialised to the shapes of ``example_input`` (the batch axis stays symbolic where the model allows it); its
        ATen operations are rewritten into the torch functions the rules know and proven by the same rules (an
        operation without a mapping is refused as soon as it touches a group). The exported graph is the branch that
        ``example_input``'s shapes take, so such a spec is proven for inputs of those shapes (any batch size where
        the batch axis stayed symbolic): a branch on shapes the example does not take is not seen (a warning names
        the parameters the exported graph does not use). The taps name the exported graph's nodes.

    Returns
    -------
    PermutationSpec
        Groups named after the layer that produces them (a union of groups tied by residual additions is named
        after its earliest member that is a layer; a parameter's axis, ``key:axis``, names a group no layer
        produces), with ``taps`` pointing at the post-activation nodes of the eval-mode graph used
        for alignment.

    Raises
    ------
    ValueError
        If ``on_unsupported`` or ``tracer`` is not one of its values.
    SpecError
        If neither torch.fx nor (where allowed) torch.export can trace the model, the model cannot run on
        ``example_input``, or an operation is not provably safe (naming the graph node).

    Notes
    -----
    Default-deny: every fx node that produces a tensor is handled by a proven rule or refused. Handled:
    Linear, Conv1d/2d/3d and ConvTranspose (modules and functional forms; any stride, padding, bias; grouped
    convolutions permute whole groups of channels as blocks, depthwise ones channel by channel), BatchNorm /
    InstanceNorm / GroupNorm / LayerNorm / RMSNorm (modules and functional forms, channels-last included),
    Embedding (module and ``F.embedding``), attention heads (see the module docstring: ``nn.MultiheadAttention``'s
    projection rows, ``F.scaled_dot_product_attention`` with masks,
    causal and grouped-query, and attention written by hand with ``reshape(B, N, 3, H, d)`` or ``view(B, N, H,
    d)``, matmul or einsum and softmax), elementwise functions of any number of operands
    with broadcasting (activations, arithmetic, ``clamp`` with tensor bounds, ``where``, ``masked_fill``,
    dropout and stochastic depth), softmax/normalize, pooling, padding and interpolation of unpermuted axes,
    residual additions (operands' groups are tied into one; a group added to an unpermuted tensor is fixed),
    concatenation and stacking, split/chunk at group boundaries, flatten/view/reshape/expand/repeat (a group is
    expanded over the positions it is flattened with and tiled over the axes before it, also when the merged axis is
    split elsewhere, as in MobileViT's unfolding into patches; equal chunks split by a view are tied, which covers
    channel shuffles), transpose/permute/movedim and ``.T``/``.mT``, reductions (indices into a permuted axis may only
    be dropped), sort/topk along unpermuted axes, contractions (matmul, einsum, ``F.linear``), pixel shuffles,
    and parameters used directly (``x * self.scale``). Tied parameters share their groups. The network's input
    axes and any group that reaches its output (tensors, tuples, dicts, named tuples) are never permuted. The
    graph is traced in train mode and in eval mode, so branches that exist in only one mode are covered.

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
    spec, _ = _trace_graph(model, example_input, on_unsupported=on_unsupported, tracer=tracer)
    return spec
