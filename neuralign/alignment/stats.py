"""Streaming activation statistics of two networks on the same inputs (one pass, bounded memory)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.func import functional_call

from neuralign._utils import check_compatible
from neuralign.alignment.spec import PermutationSpec, Tap
from neuralign.alignment.trace import _trace_graph
from neuralign.errors import NonFiniteError, SpecError

__all__ = ["ActivationMoments", "activation_moments"]

logger = logging.getLogger(__name__)

_EPS_STD = 1e-5  # added to the standard deviation, as in the official code's z-scores


@dataclass(frozen=True)
class ActivationMoments:
    """First and second moments of one tap's activations in models A and B (float64).

    Every sample (example x spatial position) is one observation of the ``K`` units.

    Attributes
    ----------
    count : int
        Number of observations ``M``.
    mean_a, mean_b : Tensor (K,)
    var_a, var_b : Tensor (K,)
        Population variances (ddof = 0).
    cross : Tensor (K, K)
        Uncentred cross moment :math:`E[a b^\\top]`.
    """

    count: int
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    var_a: torch.Tensor
    var_b: torch.Tensor
    cross: torch.Tensor

    def correlation(self) -> torch.Tensor:
        """Pearson correlation matrix, with the official code's :math:`\\epsilon = 10^{-5}` on the deviations.

        .. math::  C_{ij} = \\frac{\\mathrm{cov}(a_i, b_j)}{(\\sigma_{a,i} + \\epsilon)(\\sigma_{b,j} + \\epsilon)}
        """
        cov = self.cross - torch.outer(self.mean_a, self.mean_b)
        sa = self.var_a.clamp_min(0).sqrt() + _EPS_STD
        sb = self.var_b.clamp_min(0).sqrt() + _EPS_STD
        return cov / torch.outer(sa, sb)


def _units_view(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, bool]:
    """A view of ``t`` as ``(N, K, P)`` (units on axis 1, positions last) or ``(M, K)``, copying only if needed."""
    if axis == t.ndim - 1:
        return t.reshape(-1, t.shape[-1]), False
    if axis == 1:
        view = t.reshape(t.shape[0], t.shape[1], -1)
        return (view[..., 0], False) if view.shape[-1] == 1 else (view, True)
    return t.movedim(axis, -1).reshape(-1, t.shape[axis]), False


class _Accumulator:
    """Streaming moments of paired activations: per-batch float32 sums merged in float64 (Chan et al.).

    Each batch contributes its own centred moments, merged with the pairwise update of Chan, Golub & LeVeque
    (1983), so that a large mean never cancels against the spread across batches; the activations are read a
    few times per batch and never copied for the usual layouts (``N x K x H x W`` and ``N x K``).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_a = self.mean_b = self.m2_a = self.m2_b = self.c_ab = None
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, a: torch.Tensor, b: torch.Tensor, axis: int) -> bool:
        """Add one batch; returns False if a sum is not finite (NaN or inf in the activations)."""
        va, spatial = _units_view(a, axis)
        vb, _ = _units_view(b, axis)
        dims = (0, 2) if spatial else (0,)
        if self.mean_a is None:
            # Units whose mean dwarfs their spread would lose the covariance to float32 cancellation inside a
            # batch: for those (rare) layers, subtract the first batch's mean before forming the products.
            ratio = max(_mean_to_spread(va, dims), _mean_to_spread(vb, dims))
            if ratio > 30.0:
                shape = (1, -1, 1) if spatial else (1, -1)
                self.shift = (va.mean(dims).reshape(shape), vb.mean(dims).reshape(shape))
        if self.shift is not None:
            va, vb = va - self.shift[0], vb - self.shift[1]
        n = va.numel() // va.shape[1]
        sa, sb = va.sum(dims).double(), vb.sum(dims).double()
        qa = torch.linalg.vector_norm(va, dim=dims).double() ** 2
        qb = torch.linalg.vector_norm(vb, dim=dims).double() ** 2
        cross = (torch.bmm(va, vb.transpose(1, 2)).sum(0) if spatial else va.T @ vb).double()
        if not (torch.isfinite(sa).all() and torch.isfinite(sb).all() and torch.isfinite(cross).all()):
            return False
        ma, mb = sa / n, sb / n
        m2a, m2b = qa - n * ma * ma, qb - n * mb * mb
        cab = cross - n * torch.outer(ma, mb)
        if self.mean_a is None:
            self.n, self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.c_ab = n, ma, mb, m2a, m2b, cab
            return True
        total = self.n + n
        da, db = ma - self.mean_a, mb - self.mean_b
        w = self.n * n / total
        self.mean_a = self.mean_a + da * (n / total)
        self.mean_b = self.mean_b + db * (n / total)
        self.m2_a = self.m2_a + m2a + da * da * w
        self.m2_b = self.m2_b + m2b + db * db * w
        self.c_ab = self.c_ab + cab + torch.outer(da, db) * w
        self.n = total
        return True

    def moments(self) -> ActivationMoments:
        n = self.n
        mean_a, mean_b = self.mean_a, self.mean_b
        if self.shift is not None:
            mean_a = mean_a + self.shift[0].flatten().double()
            mean_b = mean_b + self.shift[1].flatten().double()
        cross = self.c_ab / n + torch.outer(mean_a, mean_b)
        var_a, var_b = (self.m2_a / n).cpu(), (self.m2_b / n).cpu()
        return ActivationMoments(n, mean_a.cpu(), mean_b.cpu(), var_a, var_b, cross.cpu())


def _mean_to_spread(v: torch.Tensor, dims: tuple[int, ...]) -> float:
    mean = v.mean(dims)
    std = v.std(dims, correction=0)
    return float((mean.abs() / (std + 1e-12)).max()) if mean.numel() else 0.0


def _capture_module(gm: torch.fx.GraphModule, nodes: list[str]) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose output is the tuple of the named nodes' values (the rest is dead-code eliminated)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    missing = [n for n in nodes if n not in by_name]
    if missing:
        raise SpecError(f"the spec's taps name fx nodes {missing} that the traced model does not have")
    graph.output(tuple(by_name[n] for n in nodes))
    cap = torch.fx.GraphModule(gm, graph)
    cap.graph.eliminate_dead_code()
    cap.recompile()
    cap.eval()
    return cap


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        raise TypeError("loaders yielding dicts are not supported; yield (inputs, targets) or inputs")
    return batch


def activation_moments(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    spec: PermutationSpec | None = None,
    *,
    kind: str = "post",
    max_batches: int | None = None,
    callback: Callable[[int], Any] | None = None,
) -> tuple[PermutationSpec, dict[str, list[ActivationMoments]]]:
    """Moments of every group's activations in both models, in one pass over ``loader``.

    Parameters
    ----------
    model_a, model_b : nn.Module
        Two networks of the same architecture (run in eval mode on copies; the models are untouched).
    loader : iterable
        Yields input batches or ``(inputs, targets)`` pairs; both models see the same inputs.
    spec : PermutationSpec, optional
        Traced from ``model_a`` on the first batch when omitted. Its taps must name nodes of the traced graph.
    kind : {"post", "pre"}
        Read activations after the activation function (the paper's choice for correlation) or before it.
        Groups without an activation function are read at the output of their producing layer.
    max_batches : int, optional
        Stop after this many batches.
    callback : callable, optional
        Called with the number of batches done after each batch (progress reporting).

    Returns
    -------
    spec, moments
        The spec used and, per group, one :class:`ActivationMoments` per tap (several for groups tied by
        residual additions).

    Raises
    ------
    ValueError
        If ``loader`` yields no batch, or ``kind`` is unknown.
    ShapeMismatchError
        If the models' state dicts differ.
    NonFiniteError
        If an activation is NaN or infinite (names the fx node and the model).
    """
    if kind not in ("post", "pre"):
        raise ValueError(f"unknown activation kind '{kind}'; expected one of ['post', 'pre']")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible(state_a, state_b)
    iterator = iter(loader)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("`loader` yielded no batches") from None
    x0 = _first_input(first)
    traced, gm = _trace_graph(model_a, x0)
    if spec is None:
        spec = traced
    taps: dict[str, list[Tap]] = {}
    for g in spec.groups:
        chosen = [t for t in spec.taps.get(g, ()) if t.kind in (kind, "out")]
        if not chosen:
            raise SpecError(f"group `{g}` has no activation tap; add one with SpecBuilder.tap or use method='weight'")
        taps[g] = chosen
    nodes = list(dict.fromkeys(t.node for ts in taps.values() for t in ts))
    cap = _capture_module(gm, nodes)
    params_b = {k: v for k, v in state_b.items() if k in cap.state_dict()}
    device = next(iter(state_a.values())).device
    accs = {(g, t): _Accumulator() for g, ts in taps.items() for t in ts}
    n_batches = 0

    def batches():
        yield first
        yield from iterator

    with torch.no_grad():
        for batch in batches():
            if max_batches is not None and n_batches >= max_batches:
                break
            x = _first_input(batch).to(device)
            out_a = dict(zip(nodes, cap(x)))
            out_b = dict(zip(nodes, functional_call(cap, params_b, (x,))))
            for (_, t), acc in accs.items():
                if not acc.update(out_a[t.node].float(), out_b[t.node].float(), t.axis):
                    for which, out in (("model_a", out_a), ("model_b", out_b)):
                        if not torch.isfinite(out[t.node]).all():
                            raise NonFiniteError(f"activations of layer `{t.node}` in `{which}` contain NaN or inf")
                    raise NonFiniteError(f"the moments of layer `{t.node}` overflowed float32")
            n_batches += 1
            if callback is not None:
                callback(n_batches)
    moments: dict[str, list[ActivationMoments]] = {g: [] for g in taps}
    for (g, _), acc in accs.items():
        moments[g].append(acc.moments())
    logger.debug("activation moments over %d batches for %d groups", n_batches, len(moments))
    return spec, moments
