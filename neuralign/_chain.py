"""The layers that produce and consume a permutation group, evaluated on the units a move changes only.

A transposition of units ``i`` and ``j`` of a group changes, at every point of the curve, only the rows ``i, j``
of the layer that produces the group (its weight and bias), the same entries of the channel-wise layers between
(batch norm's affine parameters) and the columns ``i, j`` of the layer that consumes it. Where the three form a
chain (the producer's output goes through channel-wise layers to the consumer and nowhere else), the consumer's
output under the move is the identity's plus the change that the moved channels make:

.. math::

    C(a') = C(a) - W_C[:, S] * a[:, S] + W'_C[:, S] * a'[:, S]

(``*``: the consumer's convolution or matrix product without bias; ``S``: the moved units; :math:`a'[:, S]`: the
producer's moved channels, computed from its unchanged input through the channel-wise layers). The producer and
the consumer then cost ``|S|`` of their channels instead of all of them, and only the layers after the consumer run
per move. Batch norm between them normalises each channel over the batch, so the moved channels' statistics are
their own and the others' are the identity's: the formula is exact up to float rounding (the sums run in another
order).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

# parameter-free layers that act on each channel alone, and on each example alone: elementwise activations, and
# after a convolution (channels on dim 1) pooling over positions (a flatten from dim 1 then keeps the channels where
# the consumer's axis is the group's: the positions were pooled to one)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                        nn.Hardswish, nn.Hardtanh, nn.Identity)  # fmt: skip
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d,
          nn.MaxPool2d, nn.MaxPool3d)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh,
                          torch.sigmoid, F.hardswish, F.hardtanh}  # fmt: skip
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weights_on(spec, group: str, names: set[str]) -> dict[str, set[tuple[str, int]]]:
    """Per module path: its parameters' ``(name, axis)`` on ``group``'s axes."""
    out: dict[str, set[tuple[str, int]]] = {}
    for key, axis in spec.perm_to_axes[group]:
        if key in names:
            module, _, name = key.rpartition(".")
            out.setdefault(module, set()).add((name, axis))
    return out


@dataclass
class Chain:
    """A group's producer, the channel-wise layers after it, and its consumer (see the module's docstring), with
    the graph of the layers after the consumer (``tail``: its inputs are the consumer's output and the values of
    the identity's forward pass it reads, ``needs``)."""

    producer: str
    between: list[fx.Node]
    consumer: str
    keys: list[str]
    graph: fx.GraphModule
    producer_input: fx.Node
    consumer_input: fx.Node
    consumer_node: fx.Node
    tail: fx.GraphModule
    needs: list[fx.Node]
    probe: fx.GraphModule
    probed: list[fx.Node]

    @property
    def consumer_weight(self) -> str:
        return f"{self.consumer}.weight"

    @cached_property
    def modules(self) -> dict[str, nn.Module]:
        """The graph's layers by name (looked up for every move)."""
        return dict(self.graph.named_modules())

    @cached_property
    def input_axis(self) -> int:
        """The consumer's input channels: a linear layer's last dim, a convolution's dim 1."""
        return -1 if isinstance(self.modules[self.consumer], nn.Linear) else 1

    @property
    def probe_names(self) -> list[str]:
        """The parameters of the layers the forward pass calls."""
        return [name for name, _ in self.probe.named_parameters()]

    @property
    def tail_names(self) -> list[str]:
        """The parameters of the layers after the consumer."""
        return [name for name, _ in self.tail.named_parameters()]

    @classmethod
    def find(cls, model: nn.Module, spec, group: str, names: Sequence[str], graph: fx.GraphModule | None = None
             ) -> Chain | None:  # fmt: skip
        """The chain of ``group`` in ``model`` (its parameters on the group's axes: a producer's weight and bias on
        axis 0, batch norms' affine parameters between, a consumer's weight on axis 1, each axis permuted whole), or
        ``None`` where the model does not have one or cannot be traced by :func:`torch.fx.symbolic_trace`
        (``graph``: its trace, where made already)."""
        modules = dict(model.named_modules())
        size = spec.sizes[group]
        on = _weights_on(spec, group, set(names))
        for module, axes in on.items():
            for name, axis in axes:
                if spec.axis_length(f"{module}.{name}" if module else name, axis) != size:
                    return None
        producers = [m for m, axes in on.items() if ("weight", 0) in axes and isinstance(modules.get(m), _LAYERS)]
        consumers = [m for m, axes in on.items() if axes == {("weight", 1)} and isinstance(modules.get(m), _LAYERS)]
        if len(producers) != 1 or len(consumers) != 1:
            return None
        producer, consumer = producers[0], consumers[0]
        if on[producer] - {("weight", 0), ("bias", 0)} or any(getattr(modules[m], "groups", 1) != 1
                                                             for m in (producer, consumer)):  # fmt: skip
            return None
        norms = {m for m in on if m not in (producer, consumer)}
        if any(not isinstance(modules.get(m), nn.modules.batchnorm._BatchNorm) or on[m] - {("weight", 0), ("bias", 0)}
               for m in norms):  # fmt: skip
            return None
        graph = graph or trace(model)
        if graph is None:
            return None
        calls = [n for n in graph.graph.nodes if n.op == "call_module" and n.target == producer]
        if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
            return None
        node, between, seen = calls[0], [], set()
        while True:
            users = list(node.users)
            if len(users) != 1:
                return None
            user = users[0]
            if user.op == "call_module" and user.target == consumer:
                break
            if not _channelwise(user, node, modules, norms, positions=not isinstance(modules[producer], nn.Linear)):
                return None
            seen |= {user.target} if user.op == "call_module" and user.target in norms else set()
            between.append(user)
            node = user
        if seen != norms or len(user.args) != 1 or user.kwargs or user.args[0] is not node:
            return None
        called = [n for n in graph.graph.nodes if n.op == "call_module" and n.target in {consumer, *norms}]
        if len(called) != 1 + len(norms):  # each layer called once (a layer called twice is used elsewhere too)
            return None
        keys = sorted(f"{m}.{name}" if m else name for m, axes in on.items() for name, _ in axes)
        if any(n.op == "get_attr" and n.target in keys for n in graph.graph.nodes):  # read outside its layer
            return None
        prod = modules[producer]
        if prod.bias is not None and f"{producer}.bias" not in keys:  # the bias not among ``names``
            return None
        for m in norms:  # the screen's batch norm: on each batch's statistics, affine on the group's axis
            bn = modules[m]
            if not (bn.training or bn.running_mean is None) or {f"{m}.weight", f"{m}.bias"} - set(keys):
                return None
        tail, needs = _tail(graph, user)
        # the identity's values are read after the forward pass: none may change in place after it is made (the
        # consumer's output is copied as it is made; an in-place layer after it then acts on its own tensor)
        kept = _aliases(graph, {calls[0].args[0], *needs}, modules)
        if any(_inplace(n, modules) and n.args and n.args[0] in kept for n in graph.graph.nodes if n not in between):
            return None
        probed = list(dict.fromkeys([calls[0].args[0], node, user, *needs]))
        return cls(producer, between, consumer, keys, graph, calls[0].args[0], node, user, tail, needs,
                   _probe(graph, probed, user), probed)

    def identity_values(self, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
        """The identity's values of the nodes the moves read (``weights``: the identity's point of the curve, ``x``
        the inputs): the producer's and the consumer's inputs, the consumer's output, and those the tail reads."""
        with torch.no_grad():
            out = functional_call(self.probe, {k: weights[k] for k in self.probe_names}, (x,))
        return dict(zip(self.probed, out))

    def parts(self, values: Mapping[fx.Node, torch.Tensor], rows: Callable[[str, int], torch.Tensor],
              identity: Mapping[str, torch.Tensor], moved: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of one move that :meth:`output` reads: ``rows(key, axis)`` gives the move's parameter ``key``
        at the curve's point on the moved units along ``axis``, ``identity`` the identity's parameters, ``moved``
        the moved units (``(|S|,)`` int64): the producer's rows and the batch norms' entries of the moved units,
        the consumer's columns of them under the move and at the identity, and the consumer's input on them at the
        identity."""
        parts = {key: rows(key, 0) for key in self.keys if key != self.consumer_weight}
        parts["new"] = rows(self.consumer_weight, 1)
        parts["old"] = identity[self.consumer_weight].index_select(1, moved)
        parts["input"] = values[self.consumer_input].index_select(self.input_axis % values[self.consumer_input].dim(),
                                                                  moved)  # fmt: skip
        return parts

    def consumer_output(self, values: Mapping[fx.Node, torch.Tensor], parts: Mapping[str, torch.Tensor]
                        ) -> torch.Tensor:  # fmt: skip
        """The consumer's output under one move (its :meth:`parts`; ``values``: :meth:`identity_values`):
        the identity's, less the moved units' contribution at the identity, plus theirs under the move (the two
        in one call of the consumer, on the moved channels under the move and at the identity side by side)."""
        modules = self.modules
        prod = modules[self.producer]
        a = _layer(prod, values[self.producer_input], parts[f"{self.producer}.weight"],
                   parts.get(f"{self.producer}.bias"))  # fmt: skip
        a = self._between(a, lambda key: (parts.get(f"{key}.weight"), parts.get(f"{key}.bias")))
        change = _layer(modules[self.consumer], torch.cat([a, parts["input"]], self.input_axis),
                        torch.cat([parts["new"], -parts["old"]], 1))  # fmt: skip
        return values[self.consumer_node] + change

    def _between(self, a: torch.Tensor, affine: Callable[[str], tuple[torch.Tensor | None, torch.Tensor | None]]
                 ) -> torch.Tensor:  # fmt: skip
        """The channel-wise layers between the producer and the consumer applied to ``a``, each batch norm on the
        batch's statistics with the weight and bias ``affine(its name)``."""
        modules = self.modules
        for n in self.between:
            if n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm):
                a = F.batch_norm(a, None, None, *affine(n.target), True, 0.0, modules[n.target].eps)
            elif n.op == "call_module":
                a = modules[n.target](a)
            else:
                a = n.target(a, *n.args[1:], **n.kwargs)
        return a

    def output(self, values: Mapping[fx.Node, torch.Tensor], parts: Mapping[str, torch.Tensor],
               tail_weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's output under one move (its :meth:`parts`; ``values``: :meth:`identity_values`;
        ``tail_weights``: the identity's parameters of the layers after the consumer). Vmappable over ``parts``."""
        out = self.consumer_output(values, parts)
        return functional_call(self.tail, dict(tail_weights), (out, *(values[n] for n in self.needs)))

    def squares_change(self, rows: Callable[[str, int], torch.Tensor], identity: Mapping[str, torch.Tensor],
                       moved: torch.Tensor) -> float:  # fmt: skip
        """The change of the sum of squares of every parameter under one move (``rows`` and ``identity`` as in
        :meth:`parts`): the chain's parameters on the moved units are the only entries a move of its group
        changes."""
        change = 0.0
        for key in self.keys:
            axis = 1 if key == self.consumer_weight else 0
            change += squares([rows(key, axis)]) - squares([identity[key].index_select(axis, moved)])
        return change

    def linearised(self, values: Mapping[fx.Node, torch.Tensor], grad: torch.Tensor,
                   weights: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], c: float,
                   per_example: bool = True, block: int = 1 << 22) -> torch.Tensor:  # fmt: skip
        """Every transposition's change of each example's loss, to first order in the layers after the consumer:
        the producer, the channel-wise layers and the consumer exact (as :meth:`output`), the layers after the
        consumer replaced by their linearisation at the identity.

        With :math:`O` the consumer's output at the identity, :math:`g = \\partial L / \\partial O` (``grad``, ``L``
        the batch's summed loss) and :math:`\\Delta O_{ij}` the exact change of :math:`O` under the transposition
        of units ``i`` and ``j``, the estimate of example ``e`` is :math:`\\langle g_e, \\Delta O_{ij, e}\\rangle`.
        A transposition gives unit ``i`` the curve point's parameters with B's entries of unit ``j``:
        :math:`w_i + c\\,(b_j - b_i)` on every key of the chain (a point of the curve is affine in B, with
        weight ``c``). The producer's output under it is therefore :math:`z_i + c\\,(z^B_j - z^B_i)`
        (:math:`z^B`: the producer with B's entries alone), the channel-wise layers act on each unit alone, and
        the consumer is linear in its input and weight, so that
        :math:`\\langle g, \\Delta O_{ij}\\rangle = M_{ij} + M_{ji} - M_{ii} - M_{jj}` with
        :math:`M_{ij} = \\langle R_i + c\\,(R^B_j - R^B_i),\\ a_{i \\leftarrow j}\\rangle` (:math:`R`, :math:`R^B`:
        the consumer's adjoint applied to ``g`` with its weight at the point and B's; :math:`a_{i \\leftarrow j}`:
        unit ``i``'s input to the consumer with B's entries of unit ``j``): one pass over all ``n^2`` ordered
        pairs instead of a pass of the network per transposition. Batch norm between normalises each pair's
        channel with its own statistics, as in the exact chain; batch norm after the consumer couples a batch's
        examples, so only the sum over the batch is the first-order change of the batch's summed loss.

        Parameters
        ----------
        values : mapping
            :meth:`identity_values` on the batch.
        grad : Tensor
            The gradient of the batch's summed loss with respect to the consumer's output at the identity, its
            shape and dtype.
        weights, other : mapping of str to Tensor
            The curve's point at ``t`` (the identity) and B's parameters (permuted by the alignment), at least the
            chain's ``keys``.
        c : float
            The weight of B's parameters in the curve's point (its time ``t`` for a quadratic Bezier curve written
            as :math:`(1 - t) A + t B + 2 t (1 - t) \\theta`: the curve problem's parametrisation).
        per_example : bool
            Each example's estimate (default), or their sum over the batch.
        block : int
            The most elements of one intermediate tensor (the ordered pairs are taken in blocks of units ``i``).

        Returns
        -------
        Tensor
            ``(B, n, n)`` float64 (``(n, n)``: summed over the batch), symmetric in its last two dimensions with
            a zero diagonal: entry ``(e, i, j)`` is example ``e``'s estimate under the transposition of ``i`` and
            ``j``.
        """
        modules = self.modules
        prod, cons = modules[self.producer], modules[self.consumer]
        # the channel axis: a linear layer's last dim, a convolution's dim 1
        axis = -1 if isinstance(prod, nn.Linear) else 1
        weight, bias = f"{self.producer}.weight", f"{self.producer}.bias"
        with torch.no_grad():
            x = values[self.producer_input]
            z = _layer(prod, x, weights[weight], weights.get(bias))
            zb = _layer(prod, x, other[weight], other.get(bias))
        u = values[self.consumer_input].detach().requires_grad_(True)
        with torch.enable_grad():
            r, rb = (torch.autograd.grad(_layer(cons, u, w[self.consumer_weight]), u, grad)[0]
                     for w in (weights, other))  # fmt: skip
        n = z.shape[axis]
        rows_per_block = max(1, block // max(z.numel(), u.numel(), 1))
        m = torch.zeros(*z.shape[:1] if per_example else (), n, n, dtype=torch.float64, device=z.device)
        with torch.no_grad():
            for lo in range(0, n, rows_per_block):
                rows = torch.arange(lo, min(n, lo + rows_per_block), device=z.device)
                a = _pairs(z, zb, rows, c, axis).flatten(*((1, 2) if axis == 1 else (-2, -1)))
                a = self._between(a, lambda key, rows=rows: tuple(
                    _pairs(weights[f"{key}.{name}"], other[f"{key}.{name}"], rows, c, 0).flatten()
                    for name in ("weight", "bias")))  # fmt: skip
                # (B, rows, n, P): the pairs' channels, their positions (or tokens) flattened last
                a = a.unflatten(axis, (rows.numel(), n))
                a = (a if axis == 1 else a.movedim((-2, -1), (1, 2))).flatten(3) if a.dim() > 3 else a.unsqueeze(-1)
                # M_ij = <R_i - c R^B_i, a_ij> + c <R^B_j, a_ij> (the adjoint's pairs never formed)
                ri = (r - c * rb).index_select(axis % r.dim(), rows)
                ri, rbj = ((v if axis == 1 else v.movedim(-1, 1)).flatten(2) if v.dim() > 2 else v.unsqueeze(-1)
                           for v in (ri, rb))  # fmt: skip
                out = "rn" if not per_example else "brn"
                block_m = torch.einsum(f"brnp,brp->{out}", a, ri) + c * torch.einsum(f"brnp,bnp->{out}", a, rbj)
                m[..., lo:lo + rows.numel(), :] = block_m.double()
        d = m.diagonal(dim1=-2, dim2=-1)
        return (m + m.transpose(-2, -1)) - (d[..., :, None] + d[..., None, :])  # symmetric to the bit


def squares(tensors: Iterable[torch.Tensor]) -> float:
    """The sum of the squares of every entry of ``tensors``, in float64 (a weight-decay term's sum)."""
    return float(sum(v.double().square().sum() for v in tensors))


def to_channels_last(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with every 4-D tensor on a CPU in channels-last memory format (the same values, other strides):
    a 2-D convolution with a channels-last weight computes in that format, and so do the batch norms, activations
    and convolutions after it. On a CPU the verification's held-out scoring of TinyTen at the demo's sizes runs
    1.16x faster so (``python benchmarks/bench_verification.py --skip race power verify``, ``compare_layouts``, side
    by side); the results agree up to float rounding (other sums' order). Tensors on other devices are returned as
    they are (not measured there)."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and v.device.type == "cpu" else v
            for k, v in weights.items()}  # fmt: skip


def curve_rows(wa: Mapping[str, torch.Tensor], wb: Mapping[str, torch.Tensor], offset: Mapping[str, torch.Tensor],
               t: float, moved: torch.Tensor, source: torch.Tensor) -> Callable[[str, int], torch.Tensor]:
    """A move's parameters on the units it moves, at the point :math:`(1-t) w_A + t P w_B + 2t(1-t)
    \\theta_{\\text{off}}` of a quadratic Bezier curve (:class:`~neuralign.curves.Bezier`): ``rows(key, axis)`` is
    parameter ``key`` there on the ``moved`` positions along ``axis`` (``(|S|,)`` int64), :math:`P w_B` having the
    entries ``source`` of ``wb`` along ``axis`` there (``wb``: B, or B with its other axes permuted already;
    for B itself and a move's index permutation ``perm`` of its units, ``source = perm[moved]``, as
    :func:`~neuralign.alignment.apply_permutation` indexes), so that no permuted copy of B is made."""

    def rows(key: str, axis: int) -> torch.Tensor:
        a, off = wa[key].index_select(axis, moved), offset[key].index_select(axis, moved)
        return (1.0 - t) * a + t * wb[key].index_select(axis, source) + 2.0 * t * (1.0 - t) * off

    return rows


def _channelwise(node: fx.Node, source: fx.Node, modules: Mapping[str, nn.Module], norms: set[str],
                 positions: bool) -> bool:  # fmt: skip
    """Does ``node`` act on each channel of ``source`` alone (one of the group's batch norms, a parameter-free
    elementwise activation, a dropout layer in eval mode, or where ``positions`` (channels on dim 1, after a
    convolution) a pooling over positions or a flatten from dim 1), with ``source`` its only tensor input?"""
    if node.op == "call_module":
        m = modules.get(node.target)
        flat = isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1)
        pool = positions and (isinstance(m, _POOLS) or flat)
        off = isinstance(m, nn.modules.dropout._DropoutNd) and not m.training  # a dropout switched off: identity
        ok = node.target in norms or pool or off or (isinstance(m, _ELEMENTWISE_MODULES) and not list(m.parameters()))
        return ok and len(node.args) == 1 and not node.kwargs and node.args[0] is source
    if node.op == "call_function" and node.target is torch.flatten:
        return positions and node.args == (source, 1) and not node.kwargs
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        rest = [*node.args[1:], *node.kwargs.values()]
        return bool(node.args) and node.args[0] is source and not any(isinstance(v, fx.Node) for v in rest)
    return False


def _pairs(x: torch.Tensor, xb: torch.Tensor, rows: torch.Tensor, c: float, axis: int) -> torch.Tensor:
    """``x`` with its units along ``axis`` given B's entries ``xb`` of every unit in turn: ``x_i + c (xb_j - xb_i)``
    for ``i`` in ``rows`` and every ``j``, a new axis ``j`` after ``axis``."""
    axis = axis % x.dim()
    xi, xbi = x.index_select(axis, rows).unsqueeze(axis + 1), xb.index_select(axis, rows).unsqueeze(axis + 1)
    return xi + c * (xb.unsqueeze(axis) - xbi)


def _layer(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``module`` (a linear or convolution layer with ``groups == 1``) with ``weight`` and ``bias``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module)]
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return conv(x, weight, bias, module.stride, 0, module.dilation)
    return conv(x, weight, bias, module.stride, module.padding, module.dilation)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``model``'s graph (:func:`torch.fx.symbolic_trace`), or ``None`` where fx cannot trace it."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - a model fx cannot trace (any error) has no chain
        return None


def _inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Does ``node`` change its first input in place (a layer with ``inplace=True``, a function called with it, a
    method or function named with a trailing underscore, an augmented assignment)?"""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or node.target in _AUGMENTED:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature, or arguments it does not take
        return bool(node.kwargs.get("inplace", False))
    return bool(bound.arguments.get("inplace", False))


# layers and functions whose output is a new tensor (never a view of an input)
_FRESH_MODULES = (*_LAYERS, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, *_POOLS)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, torch.add,
                    torch.cat, torch.stack, torch.matmul, F.linear, F.conv1d, F.conv2d, F.conv3d}  # fmt: skip
# methods and functions whose output may be a view of their first input
_VIEWS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t", "narrow",
          "select", "squeeze", "unsqueeze", "expand", "expand_as", "split", "chunk", "unbind", "contiguous", "detach",
          "to", "type_as", "as_strided", "movedim", "swapaxes", "diagonal", "getitem", "__getitem__"}  # fmt: skip


def _aliases(graph: fx.GraphModule, kept: set[fx.Node], modules: Mapping[str, nn.Module]) -> set[fx.Node]:
    """``kept`` and every node whose value may share memory with one of them: views and in-place results of
    their first input, and (unknown operations) of any input; a layer or function of ``_FRESH_*`` makes a new
    tensor (an activation layer unless in place; ``nn.Identity`` and dropout may return their input)."""
    alias = set(kept)
    for n in graph.graph.nodes:
        if n in alias or n.op not in ("call_module", "call_function", "call_method"):
            continue
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if _inplace(n, modules) or name in _VIEWS or n.target in (torch.flatten, torch.reshape, torch.squeeze,
                                                                   torch.unsqueeze, torch.transpose, torch.narrow):
            if first in alias:
                alias.add(n)
            continue
        module = modules.get(n.target) if n.op == "call_module" else None
        fresh = (isinstance(module, _FRESH_MODULES)
                 or (isinstance(module, _ELEMENTWISE_MODULES) and not isinstance(module, nn.Identity))
                 or (n.op == "call_function" and (n.target in _FRESH_FUNCTIONS or n.target in _ELEMENTWISE_FUNCTIONS)))
        if not fresh and any(a in alias for a in n.all_input_nodes):
            alias.add(n)
    return alias


_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
              operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
              operator.imatmul}  # fmt: skip


def _probe(graph: fx.GraphModule, nodes: Sequence[fx.Node], copied: fx.Node) -> fx.GraphModule:
    """``graph`` up to the last of ``nodes``, returning their values (a tuple) instead of its output, ``copied``'s
    as a copy made where it is made (a later in-place layer may change it)."""
    probe = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out: dict[fx.Node, fx.Node] = {}
    left = set(nodes)
    for n in graph.graph.nodes:
        if n.op == "output" or not left:
            break
        left.discard(n)
        env[n] = out[n] = probe.node_copy(n, lambda a: env[a])
        if n is copied:
            out[n] = probe.call_function(torch.clone, (env[n],))
    probe.output(tuple(out[n] for n in nodes))
    return fx.GraphModule(graph, probe)


def _tail(graph: fx.GraphModule, consumer: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The nodes after ``consumer`` that depend on it, as a graph whose inputs are the consumer's output and the
    other nodes they read (``needs``, in order)."""
    after: list[fx.Node] = []
    dirty = {consumer}
    for n in graph.graph.nodes:
        if n is not consumer and any(a in dirty for a in n.all_input_nodes):
            dirty.add(n)
            after.append(n)
    needs = [a for n in after for a in n.all_input_nodes if a not in dirty]
    needs = list(dict.fromkeys(needs))
    tail = fx.Graph()
    env = {consumer: tail.placeholder("consumer_output")}
    for i, n in enumerate(needs):
        env[n] = tail.placeholder(f"identity_{i}")
    for n in after:
        env[n] = tail.node_copy(n, lambda a: env[a])
    return fx.GraphModule(graph, tail), needs
