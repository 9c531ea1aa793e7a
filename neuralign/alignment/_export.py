"""The tracer's second front end: a ``torch.export`` graph written in the torch functions its rules know.

``torch.fx.symbolic_trace`` cannot follow control flow on shapes (TensorFlow-style "same" padding computed from
``x.shape``, ``if x.shape[-1] > k``). ``torch.export`` runs the model on the example input instead and specialises
such shapes; :func:`exported_graph` takes its graph (``ExportedProgram.module()``: parameters and buffers are
``get_attr`` nodes named by their state-dict keys) and rewrites every ATen operation listed in :data:`ATEN` into the
torch function or Tensor method that dispatches to it, with the arguments in that function's order, so that
:mod:`neuralign.alignment.trace` proves the graph with its own rules. An ATen operation without an entry is left as
it is: the tracer knows no rule for it, so it is refused as soon as one of its operands carries a group (default
deny).

Shapes are specialised to the example input except the batch axis (``Dim.AUTO``: kept symbolic unless the model
constrains it). A permutation spec does not depend on shapes, so it holds for every input the model accepts; a
graph whose shapes differ from the model's at another input is only ever used to read activations (alignment), and
it then fails loudly on the mismatched shape.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# ATen operations that are the Tensor method of the same name with the same arguments (``aten.add.Tensor(x, y,
# alpha=a)`` is ``x.add(y, alpha=a)``); every overload of the name is covered.
_METHODS = frozenset({
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "abs",
    "clamp", "clamp_min", "clamp_max", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "erf", "square",
    "eq", "ne", "lt", "le", "gt", "ge", "masked_fill", "masked_fill_", "type_as", "clone", "contiguous", "detach",
    "view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "unsqueeze", "squeeze", "expand",
    "repeat", "repeat_interleave", "mean", "sum", "amax", "amin", "softmax", "log_softmax", "matmul", "mm", "bmm",
    "select", "index_select", "narrow", "split", "chunk", "unbind", "flip", "roll", "new_zeros", "new_ones",
    "new_full", "new_empty",
})  # fmt: skip
# ATen operations that are the torch or torch.nn.functional function of the same name with the same arguments (an
# in-place ``aten.silu_(x)`` is ``F.silu(x, inplace=True)``).
_FUNCTIONS = {
    name: getattr(F, name, None) or getattr(torch, name)
    for name in (
        "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "mish", "softplus", "dropout",
        "scaled_dot_product_attention", "cat", "stack",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "max_pool1d", "max_pool2d",
        "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "pad", "pixel_shuffle", "pixel_unshuffle",
        "channel_shuffle", "where",
    )
}  # fmt: skip


def _slice(x, dim, start=None, end=None, step=1):
    return (operator.getitem, (x, (slice(None),) * dim + (slice(start, end, step),)), {})


def _index(x, indices):
    return (operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)), {})


# ATen operations whose torch function takes its arguments in another order: the rewrite of one call.
_ADAPTED = {
    "batch_norm": lambda x, w, b, mean, var, training, momentum, eps, *_: (
        F.batch_norm, (x, mean, var, w, b, training, momentum, eps), {}),
    "instance_norm": lambda x, w, b, mean, var, use_input_stats, momentum, eps, *_: (
        F.instance_norm, (x, mean, var, w, b, use_input_stats, momentum, eps), {}),
    "layer_norm": lambda x, shape, w=None, b=None, eps=1e-5, *_: (F.layer_norm, (x, shape, w, b, eps), {}),
    "rms_norm": lambda x, shape, w=None, eps=None: (F.rms_norm, (x, shape, w, eps), {}),
    "group_norm": lambda x, groups, w=None, b=None, eps=1e-5, *_: (F.group_norm, (x, groups, w, b, eps), {}),
    "embedding": lambda w, idx, *_: (F.embedding, (idx, w), {}),
    "constant_pad_nd": lambda x, pad, value=0: (F.pad, (x, pad, "constant", value), {}),
    "split_with_sizes": lambda x, sizes, dim=0: ("split", (x, sizes, dim), {}),
    "sym_size": lambda x, dim: ("size", (x, dim), {}),
    "_to_copy": lambda x, **kw: ("to", (x,), {k: kw[k] for k in ("dtype", "device") if kw.get(k) is not None}),
    "lift_fresh_copy": lambda x: ("clone", (x,), {}),
    "einsum": lambda eq, tensors, path=None: (torch.einsum, (eq, *tensors), {}),
    "expand": lambda x, size, implicit=False: ("expand", (x, size), {}),
}  # fmt: skip

#: The ATen operations the rewrite maps (by overload packet name): methods, functions, and adapted calls.
ATEN = frozenset(_METHODS) | frozenset(_FUNCTIONS) | frozenset(_ADAPTED) | {"slice", "index"}
ATEN |= {f"{name}_" for name in _FUNCTIONS}


def _rewrite(n: torch.fx.Node) -> None:
    """Replace the ATen call ``n`` by the torch call that dispatches to it (nothing if the operation is unmapped)."""
    name = n.target.overloadpacket.__name__
    if name == "slice":
        x, *rest = n.args
        ndim = n.args[0].meta["val"].ndim
        dim = (rest[0] if rest else n.kwargs.get("dim", 0)) % ndim
        target, args, kwargs = _slice(x, dim, *rest[1:], **{k: v for k, v in n.kwargs.items() if k != "dim"})
    elif name == "index":
        target, args, kwargs = _index(*n.args, **n.kwargs)
    elif name in _ADAPTED:
        target, args, kwargs = _ADAPTED[name](*n.args, **n.kwargs)
    elif name in _FUNCTIONS or name.endswith("_") and name[:-1] in _FUNCTIONS:
        target, args, kwargs = _FUNCTIONS[name.rstrip("_")], n.args, dict(n.kwargs)
        if name.endswith("_"):
            kwargs["inplace"] = True
    elif name in _METHODS:
        # a number first (``aten.pow.Scalar(10000, x)``, ``10000 ** x``): the torch function, not a method of it
        target = name if isinstance(n.args[0], torch.fx.Node) else getattr(torch, name)
        args, kwargs = n.args, n.kwargs
    else:
        return
    n.op = "call_method" if isinstance(target, str) else "call_function"
    n.target, n.args, n.kwargs = target, tuple(args), dict(kwargs)


def exported_graph(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """``torch.export.export(model, inputs, strict=False)`` as a GraphModule of torch functions (see the module
    docstring), the batch axis of every tensor input kept symbolic where the model allows it.

    Raises whatever ``torch.export`` raises when it cannot export the model (the caller words it).
    """
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(i, torch.Tensor) and i.ndim else None for i in inputs)
    program = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
    gm = program.module()
    position = {n: i for i, n in enumerate(gm.graph.nodes)}  # moving get_attr nodes keeps the others' order
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            _rewrite(n)
        elif n.op == "get_attr" and n.users:
            # read each parameter just before its first use, as torch.fx does: the tracer creates groups in graph
            # order and names a union of groups after its earliest member, so both front ends name groups alike
            min(n.users, key=position.__getitem__).prepend(n)
    for n in gm.graph.nodes:  # names no torch.fx graph of the model has (taps name the graph they were traced on)
        if n.op not in ("placeholder", "output"):
            n._rename(f"export_{n.name}")
    gm.graph.lint()
    gm.recompile()
    gm.meta["tracer"] = "export"
    return gm


def is_exported(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` comes from :func:`exported_graph`."""
    return gm.meta.get("tracer") == "export"


def aten_name(target: Any) -> str | None:
    """``aten.x.y`` for an ATen operation left in an exported graph (unmapped), else None."""
    return str(target) if isinstance(target, torch._ops.OpOverload) else None
