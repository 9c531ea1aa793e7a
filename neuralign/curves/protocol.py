"""One protocol for linear mode connectivity, as data: the λ grid, the barrier definitions, the area under the
curve, the batch-norm handling (re-estimated, interpolated, or REPAIR) and the alignment data, recorded with every
result.

The anchors of the field disagree on each of these (Ainsworth et al. 2023 use 25 points and
:math:`\\max_\\lambda L(\\lambda) - \\frac12 (L_A + L_B)`; Garipov et al. 2018 61 points; Entezari et al. 2022 and
Theus et al. 2025 :math:`\\sup_\\lambda [L(\\lambda) - ((1 - \\lambda) L_A + \\lambda L_B)]`), so
:func:`evaluate_interpolation` reports both barriers, for loss and accuracy, and records the
:class:`InterpolationProtocol` it ran under.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuralign._options import Options
from neuralign._validate import check_choice, check_int
from neuralign.curves import _weights
from neuralign.curves.families import Line
from neuralign.curves.repair import repair, repair_statistics

__all__ = [
    "BARRIER_DEFINITIONS",
    "BN_MODES",
    "InterpolationProtocol",
    "InterpolationResult",
    "SplitSummary",
    "area_under_curve",
    "barrier",
    "evaluate_interpolation",
]

logger = logging.getLogger(__name__)

#: Barrier definitions: ``"average"`` (Ainsworth et al. 2023), ``"linear"`` (Garipov et al. 2018; Entezari et al.
#: 2022; Theus et al. 2025). See :func:`barrier`.
BARRIER_DEFINITIONS = ("average", "linear")
#: Batch-norm handling along the path. See :class:`InterpolationProtocol`.
BN_MODES = ("reestimate", "interpolate", "repair")
_SPLITS = ("train", "test")


def _values(t: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    ts = [float(v) for v in t]
    vs = [float(v) for v in values]
    if len(ts) < 2 or len(ts) != len(vs):
        raise ValueError(f"`t` and `values` must have one equal length >= 2, got {len(ts)} and {len(vs)}")
    if ts[0] != 0.0 or ts[-1] != 1.0 or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"`t` must increase from 0 to 1, got {ts}")
    return ts, vs


def barrier(t: Sequence[float], values: Sequence[float], *, definition: str = "average",
            higher_is_better: bool = False) -> float:  # fmt: skip
    """The barrier of a loss (or the drop of an accuracy) along a path evaluated at ``t``.

    For a loss :math:`L` (``higher_is_better=False``):

    .. math::

        B_{\\text{average}} = \\max_i L(t_i) - \\tfrac12 (L_0 + L_1), \\qquad
        B_{\\text{linear}} = \\max_i \\big[L(t_i) - ((1 - t_i) L_0 + t_i L_1)\\big],

    with :math:`L_0 = L(t_0 = 0)`, :math:`L_1 = L(t_{m-1} = 1)`. For an accuracy :math:`a`
    (``higher_is_better=True``) the barrier is the drop, with the same sign convention (positive is worse):
    :math:`\\tfrac12 (a_0 + a_1) - \\min_i a(t_i)` and :math:`\\max_i [(1 - t_i) a_0 + t_i a_1 - a(t_i)]`.
    Both are :math:`\\ge 0`, since the end points are among the :math:`t_i`.

    Parameters
    ----------
    t : sequence of float
        Increasing, from 0 to 1 (length :math:`m \\ge 2`).
    values : sequence of float
        The values at ``t``.
    definition : {"average", "linear"}
        ``"average"``: Ainsworth et al. (2023, Git Re-Basin, §2); ``"linear"``: the excess over the linear
        interpolation of the end values (Garipov et al. 2018; Entezari et al. 2022, Def. 1; Theus et al. 2025).
    higher_is_better : bool
        True for accuracies.

    Returns
    -------
    float
        NaN when any value is NaN (a diverged point), infinite when one is infinite.

    Raises
    ------
    ValueError
        For an unknown definition or ``t`` that does not increase from 0 to 1.

    Examples
    --------
    >>> barrier([0, 0.5, 1], [0.2, 0.5, 1.0]), barrier([0, 0.5, 1], [0.2, 0.5, 1.0], definition="linear")
    (0.4, 0.0)
    """
    check_choice(definition, "definition", BARRIER_DEFINITIONS)
    ts, vs = _values(t, values)
    sign = -1.0 if higher_is_better else 1.0
    v = [sign * x for x in vs]
    if any(math.isnan(x) for x in v):  # a diverged point (max() would skip it) is no barrier of 0
        return math.nan
    if definition == "average":
        out = max(v) - (v[0] + v[-1]) / 2.0
    else:
        out = max(x - ((1.0 - u) * v[0] + u * v[-1]) for u, x in zip(ts, v))
    return max(out, 0.0) + 0.0  # rounding can leave -1e-17 where the maximum is an end point


def area_under_curve(t: Sequence[float], values: Sequence[float]) -> float:
    """Area under the values along the path, :math:`\\int_0^1 v(t)\\,dt` by the trapezoid rule over ``t``
    (Navon et al. 2024's "AUC" of the loss along the interpolation; lower is better for a loss).

    Examples
    --------
    >>> round(area_under_curve([0, 0.5, 1], [0.2, 0.5, 1.0]), 12)
    0.55
    """
    ts, vs = _values(t, values)
    return sum((b - a) * (x + y) / 2.0 for a, b, x, y in zip(ts, ts[1:], vs, vs[1:]))


@dataclass(frozen=True)
class InterpolationProtocol(Options):
    """How a path between two end points is evaluated: the options of :func:`evaluate_interpolation`, recorded
    with its result.

    Attributes
    ----------
    num_points : int
        Evaluated :math:`\\lambda_i = i / (m - 1)` (>= 2; default 25 as Ainsworth et al. 2023; 11 and 61 are
        common). Odd values put a point at 0.5.
    bn : {"reestimate", "interpolate", "repair"}
        Batch-norm handling at each :math:`\\lambda`: ``"reestimate"`` the running statistics on the batch-norm
        data (:func:`reestimate_bn`; Garipov et al. 2018, Ainsworth et al. 2023), ``"interpolate"`` them linearly
        with the weights (the stored statistics, no data pass), or ``"repair"`` (:func:`repair`, Jordan et al.
        2023: channels rescaled to the interpolation of the end points' statistics, then batch norm
        re-estimated). For a network without batch norm, ``"reestimate"`` and ``"interpolate"`` coincide.
    max_bn_batches : int, optional
        Batches per batch-norm re-estimation and per REPAIR pass (default: full passes).
    splits : tuple of str
        Where loss and accuracy are measured: ``"test"`` and/or ``"train"`` (default both).
    alignment_data : str, optional
        What the permutation was computed from (recorded, e.g. ``"train[:10000], test transforms"``).
    alignment_size : int, optional
        Its number of examples (recorded).

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong kind or value (names it).
    """

    num_points: int = 25
    bn: str = "reestimate"
    max_bn_batches: int | None = None
    splits: tuple[str, ...] = ("test", "train")
    alignment_data: str | None = None
    alignment_size: int | None = None

    def __post_init__(self) -> None:
        self._check("num_points", check_int, minimum=2)
        check_choice(self.bn, "bn", BN_MODES)
        self._check("max_bn_batches", check_int, minimum=1, allow_none=True)
        splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
        for s in splits:
            check_choice(s, "splits", _SPLITS)
        if not splits or len(set(splits)) != len(splits):
            raise ValueError(f"`splits` must name 'test' and/or 'train' once each, got {self.splits!r}")
        object.__setattr__(self, "splits", splits)
        if self.alignment_data is not None and not isinstance(self.alignment_data, str):
            raise TypeError(f"`alignment_data` must be a str or None, got {type(self.alignment_data).__name__}")
        self._check("alignment_size", check_int, minimum=1, allow_none=True)

    @property
    def t(self) -> tuple[float, ...]:
        """The grid :math:`\\lambda_i = i / (m - 1)`."""
        return tuple(i / (self.num_points - 1) for i in range(self.num_points))


@dataclass(frozen=True)
class SplitSummary:
    """Loss and accuracy along a path on one split, and their summary (accuracies are fractions).

    Attributes
    ----------
    loss, accuracy : tuple of float
        Mean cross-entropy and accuracy at each :math:`\\lambda`.
    loss_barrier_average, loss_barrier_linear : float
        :func:`barrier` of the loss, both definitions.
    accuracy_barrier_average, accuracy_barrier_linear : float
        :func:`barrier` of the accuracy (the drop; positive is worse).
    loss_auc, accuracy_auc : float
        :func:`area_under_curve`.
    midpoint_loss, midpoint_accuracy : float
        At the :math:`\\lambda` nearest 0.5 (the smaller on a tie).
    endpoint_loss, endpoint_accuracy : tuple of float
        At :math:`\\lambda = 0` and 1 (under the same batch-norm handling).
    """

    loss: tuple[float, ...]
    accuracy: tuple[float, ...]
    loss_barrier_average: float
    loss_barrier_linear: float
    accuracy_barrier_average: float
    accuracy_barrier_linear: float
    loss_auc: float
    accuracy_auc: float
    midpoint_loss: float
    midpoint_accuracy: float
    endpoint_loss: tuple[float, float]
    endpoint_accuracy: tuple[float, float]

    @classmethod
    def from_values(cls, t: Sequence[float], loss: Sequence[float], accuracy: Sequence[float]) -> SplitSummary:
        """The summary of per-point values (``t`` increasing from 0 to 1).

        Examples
        --------
        >>> s = SplitSummary.from_values([0, 0.5, 1], [0.2, 0.5, 1.0], [0.9, 0.6, 0.5])
        >>> s.loss_barrier_average, s.loss_barrier_linear, round(s.accuracy_barrier_average, 12), s.midpoint_accuracy
        (0.4, 0.0, 0.2, 0.6)
        """
        ts, lv = _values(t, loss)
        _, av = _values(t, accuracy)
        mid = min(range(len(ts)), key=lambda i: (round(abs(ts[i] - 0.5), 12), ts[i]))
        return cls(
            loss=tuple(lv),
            accuracy=tuple(av),
            loss_barrier_average=barrier(ts, lv, definition="average"),
            loss_barrier_linear=barrier(ts, lv, definition="linear"),
            accuracy_barrier_average=barrier(ts, av, definition="average", higher_is_better=True),
            accuracy_barrier_linear=barrier(ts, av, definition="linear", higher_is_better=True),
            loss_auc=area_under_curve(ts, lv),
            accuracy_auc=area_under_curve(ts, av),
            midpoint_loss=lv[mid],
            midpoint_accuracy=av[mid],
            endpoint_loss=(lv[0], lv[-1]),
            endpoint_accuracy=(av[0], av[-1]),
        )


@dataclass(frozen=True)
class InterpolationResult:
    """Outcome of :func:`evaluate_interpolation`.

    Attributes
    ----------
    t : tuple of float
        The grid.
    splits : dict str -> SplitSummary
        Per split (``"test"``, ``"train"``), the values and their summary.
    protocol : InterpolationProtocol
        The protocol it ran under.
    seconds : float
        Wall-clock time of the evaluation.
    """

    t: tuple[float, ...]
    splits: dict[str, SplitSummary]
    protocol: InterpolationProtocol
    seconds: float = field(default=0.0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""

        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "t": list(self.t),
            "splits": {k: {f: plain(v) for f, v in dataclasses.asdict(s).items()} for k, s in self.splits.items()},
            "protocol": self.protocol.to_dict(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InterpolationResult:
        """Inverse of :meth:`to_dict`."""
        splits = {
            k: SplitSummary(**{f: tuple(v) if isinstance(v, list) else v for f, v in s.items()})
            for k, s in data["splits"].items()
        }
        return cls(
            t=tuple(data["t"]),
            splits=splits,
            protocol=InterpolationProtocol.from_dict(data["protocol"]),
            seconds=float(data.get("seconds", 0.0)),
        )


def _interpolated_buffers(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                          t: float, device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    out = {}
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in persistent and name not in state_a and name not in state_b:
            out[name] = buffer.detach().to(device)  # a constant no state dict carries (RoPE's frequencies)
            continue
        for label, state in (("state_a", state_a), ("state_b", state_b)):
            if name not in state:
                raise ValueError(f"bn='interpolate' needs the buffer `{name}` in `{label}` (pass a full state dict)")
        a, b = state_a[name].to(device), state_b[name].to(device)
        out[name] = torch.lerp(a, b.to(a.dtype), t) if a.is_floating_point() else a.clone()
    return out


def evaluate_interpolation(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    bn_loader: Iterable,
    test_loader: Iterable,
    *,
    train_loader: Iterable | None = None,
    protocol: InterpolationProtocol | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> InterpolationResult:
    """Loss and accuracy along the segment :math:`\\theta(\\lambda) = (1 - \\lambda)\\,\\theta_A + \\lambda\\,
    \\theta_B` under one protocol, with both barrier definitions and the area under the curve.

    ``state_b`` is the second end point as it is to be interpolated: for alignment, :math:`P(\\theta_B)`
    (:func:`~neuralign.alignment.apply_permutation`). At each :math:`\\lambda_i` of ``protocol.t`` the batch-norm
    statistics are handled as ``protocol.bn`` says, and loss and accuracy are measured in eval mode on the
    protocol's splits (:class:`SplitSummary`).

    Parameters
    ----------
    model : nn.Module
        The architecture (never modified).
    state_a, state_b : dict str -> Tensor
        The end points' parameters; full state dicts (with buffers) for ``bn="interpolate"``. Their device is the
        device of the computation.
    bn_loader : iterable
        Data for batch-norm re-estimation and REPAIR (the training loader, as in the references).
    test_loader : iterable
        ``(inputs, targets)`` batches.
    train_loader : iterable, optional
        ``(inputs, targets)`` batches; needed when ``protocol.splits`` holds ``"train"``.
    protocol : InterpolationProtocol, optional
        Default ``InterpolationProtocol()``: 25 points, batch norm re-estimated, test and train.
    callback : callable, optional
        Called after each point with ``{"index", "t", "<split>_loss", "<split>_accuracy", ...}``.

    Returns
    -------
    InterpolationResult

    Raises
    ------
    TypeError
        For a protocol that is not an :class:`InterpolationProtocol`.
    ValueError
        If ``protocol.splits`` holds ``"train"`` without a ``train_loader``, a state lacks a buffer for
        ``bn="interpolate"``, or a loader yields nothing or inputs the model cannot take.
    ShapeMismatchError
        If a state does not match ``model``'s parameters (names the parameter).

    Notes
    -----
    With ``"reestimate"`` and ``"repair"`` the end points too are evaluated with re-estimated statistics, so the
    barriers compare values measured alike. Cost per point: one batch-norm pass (``"reestimate"``, networks with
    batch norm only), none (``"interpolate"``) or one or two (``"repair"``, plus one per end point once), and one
    pass per split.

    References
    ----------
    .. [1] S. K. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
       ICLR 2023, arXiv:2209.04836.
    .. [2] T. Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018,
       arXiv:1802.10026.
    .. [3] R. Entezari, H. Sedghi, O. Saukh, B. Neyshabur, "The Role of Permutation Invariance in Linear Mode
       Connectivity of Neural Networks", ICLR 2022, arXiv:2110.06296.
    .. [4] K. Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023,
       arXiv:2211.08403.
    .. [5] A. Navon et al., "Equivariant Deep Weight Space Alignment", ICML 2024, arXiv:2310.13397.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a = model.state_dict()
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> res = evaluate_interpolation(model, a, a, data, data, protocol=InterpolationProtocol(num_points=3,
    ...                              splits=("test",)))
    >>> res.t, res.splits["test"].loss_barrier_average
    ((0.0, 0.5, 1.0), 0.0)
    """
    start = time.perf_counter()
    model = _weights.check_model(model)
    protocol = InterpolationProtocol() if protocol is None else protocol
    if not isinstance(protocol, InterpolationProtocol):
        raise TypeError(f"`protocol` must be an InterpolationProtocol, got {type(protocol).__name__}")
    if "train" in protocol.splits and train_loader is None:
        raise ValueError("`protocol.splits` holds 'train' but no `train_loader` was given")
    params_a = _weights.parameters_of(model, state_a, "state_a")
    params_b = _weights.parameters_of(model, state_b, "state_b")
    if not params_a:
        raise ValueError("`model` has no parameter")
    line = Line.between(params_a, params_b)
    device = line.device
    loaders = {"test": test_loader, "train": train_loader}
    batches = protocol.max_bn_batches
    if protocol.bn == "repair":
        stats_a = repair_statistics(model, state_a, bn_loader, max_batches=batches)
        stats_b = repair_statistics(model, state_b, bn_loader, max_batches=batches)
    values: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in protocol.splits}
    for i, t in enumerate(protocol.t):
        params = line(t)
        if protocol.bn == "reestimate":
            buffers = _weights.reestimate(model, params, bn_loader, batches, device, "bn_loader")
        elif protocol.bn == "interpolate":
            buffers = _interpolated_buffers(model, state_a, state_b, t, device)
        else:
            state = repair(model, params, stats_a, stats_b, bn_loader, t=t, max_batches=batches)
            params = {k: state[k] for k in params}
            buffers = {k: v for k, v in state.items() if k not in params}
        record: dict[str, Any] = {"index": i, "t": t}
        for split in protocol.splits:
            loss, acc = _weights.evaluate(model, params, buffers, loaders[split], device, f"{split}_loader")
            values[split][0].append(loss)
            values[split][1].append(acc)
            record.update({f"{split}_loss": loss, f"{split}_accuracy": acc})
        logger.debug("interpolation point %s", record)
        if callback is not None:
            callback(record)
    ts = protocol.t
    splits = {s: SplitSummary.from_values(ts, lv, av) for s, (lv, av) in values.items()}
    return InterpolationResult(t=ts, splits=splits, protocol=protocol, seconds=time.perf_counter() - start)
