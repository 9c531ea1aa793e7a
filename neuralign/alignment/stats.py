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


class _Accumulator:
    """Shifted sums (shift = first batch mean) in float64: no cancellation when the mean dwarfs the spread."""

    def __init__(self) -> None:
        self.n = 0
        self.shift_a = self.shift_b = None
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
            k_a, k_b = a.shape[1], b.shape[1]
            z = {"dtype": torch.float64, "device": a.device}
            self.sa, self.sb = torch.zeros(k_a, **z), torch.zeros(k_b, **z)
            self.saa, self.sbb = torch.zeros(k_a, **z), torch.zeros(k_b, **z)
            self.sab = torch.zeros(k_a, k_b, **z)
        a = a - self.shift_a
        b = b - self.shift_b
        self.n += a.shape[0]
        self.sa += a.sum(0, dtype=torch.float64)
        self.sb += b.sum(0, dtype=torch.float64)
        self.saa += (a * a).sum(0, dtype=torch.float64)
        self.sbb += (b * b).sum(0, dtype=torch.float64)
        self.sab += (a.T @ b).double()

    def moments(self) -> ActivationMoments:
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        var_a = self.saa / n - ma * ma
        var_b = self.sbb / n - mb * mb
        cross_shifted = self.sab / n - torch.outer(ma, mb)  # centred cross moment
        mean_a, mean_b = ma + self.shift_a.double(), mb + self.shift_b.double()
        cross = cross_shifted + torch.outer(mean_a, mean_b)
        return ActivationMoments(n, mean_a.cpu(), mean_b.cpu(), var_a.cpu(), var_b.cpu(), cross.cpu())


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
            for node in nodes:
                for which, out in (("model_a", out_a), ("model_b", out_b)):
                    if not torch.isfinite(out[node]).all():
                        raise NonFiniteError(f"activations of layer `{node}` in `{which}` contain NaN or inf")
            for (g, t), acc in accs.items():
                a = out_a[t.node].movedim(t.axis, -1).reshape(-1, spec.sizes[g])
                b = out_b[t.node].movedim(t.axis, -1).reshape(-1, spec.sizes[g])
                acc.update(a.float(), b.float())
            n_batches += 1
            if callback is not None:
                callback(n_batches)
    moments: dict[str, list[ActivationMoments]] = {g: [] for g in taps}
    for (g, _), acc in accs.items():
        moments[g].append(acc.moments())
    logger.debug("activation moments over %d batches for %d groups", n_batches, len(moments))
    return spec, moments
