"""Alignment along a curve: is the network at :math:`w(t)` neuron-aligned with the end points?

Tatro et al. (2020, §4, code ``align_along_curve.py``) build the midpoint of a fitted curve (batch norm re-estimated),
align it to each end point by activation correlation, and compare the mean correlation of matched units before and
after: for a curve between aligned end points the midpoint is claimed to be aligned already.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuralign._options import renamed_keywords
from neuralign.alignment import PermutationSpec, align, identity_permutation
from neuralign.curves._weights import (
    bn_modules,
    check_max_batches,
    check_model,
    load_weights,
    parameters_of,
    reestimate,
)
from neuralign.curves.families import Curve, _check_t

__all__ = ["MidpointAlignment", "midpoint_alignment"]

_ENDS = ("a", "b")


@dataclass(frozen=True)
class MidpointAlignment:
    """Result of :func:`midpoint_alignment`.

    Attributes
    ----------
    t : float
        Where on the curve the network was built.
    groups : tuple of str
        Permutation groups, input to output.
    before, after : dict
        ``before[end][group]`` for ``end`` in ``"a"``, ``"b"``: mean Pearson correlation of matched units between
        the network at ``t`` and that end point with the units as they are (``before``) and after aligning the
        network at ``t`` to that end point (``after``); NaN for a group without live units
        (:attr:`neuralign.alignment.AlignmentResult.correlation_before` / ``correlation_after``).
    moved : dict
        ``moved[end][group]``: units that aligning the network at ``t`` to that end point reassigns.
    """

    t: float
    groups: tuple[str, ...]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    moved: dict[str, dict[str, int]]

    def gain(self, end: str) -> dict[str, float]:
        """Per group, ``after - before`` for end point ``end`` (``"a"`` or ``"b"``)."""
        if end not in _ENDS:
            raise ValueError(f"`end` must be 'a' or 'b', got {end!r}")
        return {g: self.after[end][g] - self.before[end][g] for g in self.groups}

    def mean(self, which: str, end: str) -> float:
        """Unweighted mean over groups (NaN groups left out) of ``before`` or ``after`` for ``end``."""
        if which not in ("before", "after") or end not in _ENDS:
            raise ValueError(f"expected which in ('before', 'after') and end in ('a', 'b'), got {which!r}, {end!r}")
        values = [v for v in getattr(self, which)[end].values() if math.isfinite(v)]
        return math.fsum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (NaN stays a float; the study's JSON writer encodes it)."""
        return {"t": self.t, "groups": list(self.groups), "before": self.before, "after": self.after,
                "moved": self.moved}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MidpointAlignment:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["t"]), tuple(data["groups"]),
                   {e: {g: float(v) for g, v in data["before"][e].items()} for e in _ENDS},
                   {e: {g: float(v) for g, v in data["after"][e].items()} for e in _ENDS},
                   {e: {g: int(v) for g, v in data["moved"][e].items()} for e in _ENDS})  # fmt: skip


def _first_batch(loader: Iterable) -> Any:
    return next(iter(loader), None)


def _same_batch(a: Any, b: Any) -> bool:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return len(a) == len(b) and all(
        torch.equal(u, v) if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) else u == v
        for u, v in zip(a, b)
    )


def midpoint_alignment(
    model: nn.Module,
    curve: Curve,
    point_a: Mapping[str, torch.Tensor],
    point_b: Mapping[str, torch.Tensor],
    align_loader: Iterable,
    bn_loader: Iterable,
    *,
    t: float = 0.5,
    max_bn_batches: int | None = None,
    max_align_batches: int | None = None,
    spec: PermutationSpec | None = None,
    **renamed: Any,
) -> MidpointAlignment:
    """Align the network at :math:`w(t)` of a curve to each of its end points and report the correlations.

    The network :math:`M_t` has the curve's weights :math:`w(t)` and batch-norm statistics re-estimated at them
    (:func:`~neuralign.curves.reestimate_bn` on ``bn_loader``); the end points' batch-norm statistics are
    re-estimated on the same batches (not the stored ones), so that at ``t = 0`` :math:`M_t` is :math:`A` itself.
    For each end point :math:`E \\in \\{A, B\\}`,
    :func:`~neuralign.alignment.align` (correlation, post-activation) matches :math:`M_t`'s units to :math:`E`'s;
    per group :math:`g` with correlation matrix :math:`C_g` between :math:`E`'s and :math:`M_t`'s units,

    .. math::  \\text{before}_g = \\overline{(C_g)_{ii}}, \\qquad
               \\text{after}_g = \\overline{(C_g)_{i\\pi(i)}}, \\quad
               \\pi = \\arg\\max_\\pi \\sum_i (C_g)_{i\\pi(i)},

    the means over pairs of live units. ``after - before`` near 0 for both end points means that :math:`M_t` is
    already aligned with both (the claim of Tatro et al. for curves between aligned end points).

    Parameters
    ----------
    model : nn.Module
        The architecture (never modified; copies are loaded).
    curve : Curve
        A curve whose parameter names are ``model``'s parameters (e.g. a fitted :class:`Bezier`, or a
        :class:`Line` for the straight segment).
    point_a, point_b : dict str -> Tensor
        Full state dicts (parameters and buffers) of the curve's end points, in the frame of the curve: for a curve
        between A and the aligned B, ``point_b`` is the aligned B.
    align_loader : iterable
        Inputs for the correlations (e.g. the paper's first 10k training images, test-time transforms).
    bn_loader : iterable
        Batches on which the batch-norm statistics at :math:`w(t)` and at both end points are re-estimated
        (training batches). With ``max_bn_batches`` its first ``max_bn_batches`` batches are drawn once and used
        for all three; without, it must yield the same batches on every pass (a shuffling loader is refused).
    t : float
        Position on the curve, in [0, 1] (default the midpoint).
    max_bn_batches, max_align_batches : int, optional
        Use at most this many batches of ``bn_loader`` / ``align_loader`` (``bn_batches`` / ``max_batches`` before
        0.2, still accepted with a :class:`DeprecationWarning`).
    spec : PermutationSpec, optional
        Traced from ``model`` when absent (by :func:`~neuralign.alignment.align`).

    Returns
    -------
    MidpointAlignment

    Raises
    ------
    ShapeMismatchError
        If the curve or an end point lacks a parameter of ``model`` or has another shape.
    ValueError
        For ``t`` outside [0, 1], an empty loader, a bad batch count, or a shuffling ``bn_loader`` without
        ``max_bn_batches``.

    References
    ----------
    .. [1] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439 (§4, alignment along the curve; code ``align_along_curve.py``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from neuralign.curves import Line
    >>> torch.manual_seed(0) is not None
    True
    >>> a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2))
    >>> names = [k for k, _ in a.named_parameters()]
    >>> line = Line.between({k: a.state_dict()[k] for k in names}, {k: b.state_dict()[k] for k in names})
    >>> x = [torch.randn(64, 4)]
    >>> res = midpoint_alignment(a, line, a.state_dict(), b.state_dict(), x, x, t=0.0)
    >>> round(res.mean("before", "a"), 3), res.moved["a"]        # at t = 0 the network is A itself
    (1.0, {'0': 0})
    """
    model = check_model(model)
    if not isinstance(curve, Curve):
        raise TypeError(f"`curve` must be a Curve, got {type(curve).__name__}")
    t = _check_t(t)
    old = renamed_keywords(renamed, {"bn_batches": "max_bn_batches", "max_batches": "max_align_batches"},
                           where="midpoint_alignment")  # fmt: skip
    bn_batches = check_max_batches(old.get("max_bn_batches", max_bn_batches), "max_bn_batches")
    max_batches = old.get("max_align_batches", max_align_batches)
    params = parameters_of(model, {k: v.detach() for k, v in curve(t).items()}, "curve")
    device = next(iter(params.values())).device
    # the same batches for w(t) and both end points: with bn_batches they are drawn once; without, a loader that
    # reshuffles between passes is refused (its first batch differs between two passes)
    if bn_batches is not None:
        bn_loader = list(itertools.islice(iter(bn_loader), bn_batches))
    elif (first := _first_batch(bn_loader)) is not None and not _same_batch(first, _first_batch(bn_loader)):
        raise ValueError("`bn_loader` yields other batches on each pass (a shuffling loader): give max_bn_batches=N "
                         "(its first N batches are drawn once) or a fixed-order loader")  # fmt: skip
    buffers = reestimate(model, params, bn_loader, bn_batches, device, "bn_loader")
    bn_keys = {f"{name}.{k}" if name else k for name, _ in bn_modules(model)
               for k in ("running_mean", "running_var", "num_batches_tracked")}  # fmt: skip
    ends = {}
    for end, point in zip(_ENDS, (point_a, point_b)):
        end_params = {k: v.to(device) for k, v in parameters_of(model, point, f"point_{end}").items()}
        # the end point's batch-norm statistics are re-estimated on the same batches as w(t)'s, so that like is
        # compared with like: at t = 0 the network is A itself, correlation 1 and nothing moved
        end_buffers = reestimate(model, end_params, bn_loader, bn_batches, device, "bn_loader")
        net = copy.deepcopy(model)
        load_weights(net, end_params, {**{k: v for k, v in point.items() if k not in end_params},
                                       **{k: v for k, v in end_buffers.items() if k in bn_keys}})  # fmt: skip
        ends[end] = net.eval()
    mid = copy.deepcopy(model)
    load_weights(mid, params, buffers)
    mid.eval()
    before, after, moved, groups = {}, {}, {}, ()
    for end, net in ends.items():
        res = align(net, mid, align_loader, spec=spec, max_batches=max_batches)
        spec = res.spec
        groups = tuple(res.spec.groups)
        ident = identity_permutation(res.spec)
        before[end] = {g: float(res.correlation_before[g]) for g in groups}
        after[end] = {g: float(res.correlation_after[g]) for g in groups}
        moved[end] = {g: int((res.perms[g].cpu() != ident[g].cpu()).sum()) for g in groups}
    return MidpointAlignment(t, groups, before, after, moved)
