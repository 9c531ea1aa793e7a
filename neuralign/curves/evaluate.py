"""Evaluation along a curve and over a plane: loss and accuracy with batch norm re-estimated at every point.

The summary of a curve follows Tatro et al. (2020, code ``viz_curve.py``): an arc-length-weighted average of the test
accuracy ("Avg"), its minimum ("Min") and the mean of the end points, plus loss and accuracy barriers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuralign._utils import as_generator
from neuralign.attacks import PGD
from neuralign.curves import _weights
from neuralign.curves.families import Bezier, Curve, _check_t, _flatten_points

__all__ = [
    "arc_length",
    "arc_length_average",
    "evaluate_curve",
    "CurveEvaluation",
    "evaluate_plane",
    "PlaneEvaluation",
    "project_to_plane",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ARC_METHODS = ("auto", "planar", "chord")


# ----------------------------------------------------------------------------------------------------------------
# geometry
def _centered_gram(rows: torch.Tensor, others: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """``(rows - origin) @ (others - origin).T`` in float64, accumulated over chunks of columns (no big copies)."""
    out = torch.zeros(rows.shape[0], others.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], _CHUNK):
        stop = start + _CHUNK
        o = origin[start:stop].double()
        x = rows[:, start:stop].double() - o
        y = others[:, start:stop].double() - o
        out += x @ y.t()
    return out.cpu()


def _check_ts(t: Iterable[float]) -> list[float]:
    ts = [_check_t(v) for v in t]
    if not ts:
        raise ValueError("`t` must hold at least one value")
    return ts


def arc_length(curve: Curve, t: Iterable[float], *, method: str = "auto") -> torch.Tensor:
    """Cumulative chord length :math:`s_i` of a curve through the points :math:`w(t_0), \\dots, w(t_{m-1})`.

    .. math::

        s_0 = 0, \\qquad s_i = s_{i-1} + \\lVert w(t_i) - w(t_{i-1}) \\rVert_2 ,

    the norm being over all parameter entries (batch-norm :math:`\\gamma, \\beta` included; running statistics are
    not parameters).

    Parameters
    ----------
    curve : Curve
        The curve.
    t : iterable of float
        Parameter values in [0, 1], in the order of travel.
    method : {"auto", "planar", "chord"}
        ``"planar"`` (quadratic Bezier only, as in Tatro et al.): Gram-Schmidt of :math:`u = w_B - w_A` and
        :math:`v = \\theta - w_A` gives the 2-D coordinates :math:`w_A = (0, 0)`, :math:`w_B = (\\lVert u \\rVert,
        0)`, :math:`\\theta = (\\langle u, v\\rangle / \\lVert u \\rVert, (\\lVert v \\rVert^2 -
        \\langle u, v\\rangle^2/\\lVert u \\rVert^2)^{1/2})`, the curve is :math:`2t(1-t)\\theta + t^2 w_B` in that
        plane and the chords are measured there. ``"chord"``: exact chord lengths in the full weight space, for any
        family (from the float64 Gram matrix of :math:`p_j - p_0`, since :math:`\\sum_j c_j(t) = 1`). A quadratic
        Bezier curve lies in its plane, so both agree for it. ``"auto"``: planar for a quadratic Bezier curve,
        chord otherwise.

    Returns
    -------
    torch.Tensor
        float64 CPU tensor of shape ``(m,)``, starting at 0.

    Raises
    ------
    ValueError
        For ``t`` outside [0, 1], an unknown method, or "planar" on anything but a quadratic Bezier curve.

    Examples
    --------
    >>> import torch
    >>> from neuralign.curves import Line
    >>> line = Line.between({"w": torch.zeros(2)}, {"w": torch.tensor([3.0, 4.0])})
    >>> arc_length(line, [0.0, 0.5, 1.0])
    tensor([0.0000, 2.5000, 5.0000], dtype=torch.float64)
    """
    if not isinstance(curve, Curve):
        raise TypeError(f"`curve` must be a Curve, got {type(curve).__name__}")
    if method not in _ARC_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(_ARC_METHODS)}")
    ts = _check_ts(t)
    quadratic = isinstance(curve, Bezier) and curve.degree == 2
    if method == "auto":
        method = "planar" if quadratic else "chord"
    if method == "planar" and not quadratic:
        raise ValueError(
            f"method 'planar' needs a quadratic Bezier curve, got a {type(curve).__name__} with "
            f"{curve.num_points} points; use method='chord'"
        )
    flat = curve._flat
    gram = _centered_gram(flat[1:], flat[1:], flat[0])  # H[j-1, k-1] = <p_j - p_0, p_k - p_0>
    coeffs = torch.tensor([curve._coefficient_list(v) for v in ts], dtype=torch.float64)  # (m, n)
    if method == "planar":
        uu, uv, vv = gram[1, 1].item(), gram[0, 1].item(), gram[0, 0].item()
        dx = math.sqrt(max(uu, 0.0))
        if dx == 0.0:  # w_A == w_B: the plane is undefined; the chord formula still holds
            return arc_length(curve, ts, method="chord")
        theta = torch.tensor([uv / dx, math.sqrt(max(vv - (uv / dx) ** 2, 0.0))], dtype=torch.float64)
        end_b = torch.tensor([dx, 0.0], dtype=torch.float64)
        xy = coeffs[:, 1:2] * theta + coeffs[:, 2:3] * end_b  # (m, 2); w_A is the origin
        steps = (xy[1:] - xy[:-1]).norm(dim=1)
    else:
        delta = coeffs[1:, 1:] - coeffs[:-1, 1:]  # (m-1, n-1): the p_0 term cancels since sum_j c_j = 1
        steps = torch.einsum("ij,jk,ik->i", delta, gram, delta).clamp_min(0.0).sqrt()
    return torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])


def arc_length_average(values: Sequence[float], arc_length: Sequence[float] | torch.Tensor) -> float:
    """Arc-length-weighted (trapezoid) average of ``values`` along a curve (Tatro et al. 2020, "Avg").

    .. math::

        \\bar a = \\frac{\\sum_i \\omega_i a_i}{s_{m-1} - s_0}, \\qquad
        \\omega_i = \\tfrac12 (s_{i+1} - s_{i-1}), \\quad s_{-1} = s_0,\\; s_m = s_{m-1},

    with :math:`s_i` the cumulative arc length at the evaluated points (:func:`arc_length`). The weights sum to
    :math:`s_{m-1} - s_0`, so the average of a constant is that constant. A curve of length 0 gives the plain mean.

    Examples
    --------
    >>> arc_length_average([0.9, 0.9, 0.9], [0.0, 1.0, 3.0])
    0.9
    >>> arc_length_average([1.0, 0.0, 0.0], [0.0, 1.0, 2.0])
    0.25
    """
    v = torch.as_tensor([float(x) for x in values], dtype=torch.float64)
    s = torch.as_tensor(arc_length, dtype=torch.float64).flatten()
    if v.numel() == 0 or v.numel() != s.numel():
        raise ValueError(
            f"`values` and `arc_length` must have the same nonzero length, got {v.numel()} and {s.numel()}"
        )
    padded = torch.cat([s[:1], s, s[-1:]])
    weights = (padded[2:] - padded[:-2]) / 2.0
    total = float(weights.sum())  # = s[-1] - s[0]; summing the weights stays exact when they underflow
    if not total > 0.0:
        return float(v.mean())
    return float((weights * v).sum() / total)


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurveEvaluation:
    """Loss and accuracy along a curve, and their summary (accuracies are fractions in [0, 1]).

    Attributes
    ----------
    t : tuple of float
        Evaluated parameter values (``linspace(0, 1, num_points)``).
    test_loss, test_accuracy : tuple of float
        Mean cross-entropy and accuracy on the test loader at each ``t`` (batch norm re-estimated at each ``t``).
    arc_length : tuple of float
        Cumulative arc length :math:`s_i` at each ``t`` (:func:`arc_length`).
    geometry : str
        ``"planar"`` or ``"chord"``: how ``arc_length`` was measured.
    avg_accuracy, avg_loss : float
        Arc-length-weighted averages (:func:`arc_length_average`), "Avg" of Tatro et al. (2020).
    min_accuracy, max_loss : float
        Worst values along the curve ("Min").
    endpoint_accuracy, endpoint_loss : float
        Means of the values at :math:`t = 0` and :math:`t = 1`.
    accuracy_barrier, loss_barrier : float
        :math:`\\max_i [(1 - t_i) a_0 + t_i a_1 - a(t_i)]` and :math:`\\max_i [L(t_i) - (1 - t_i) L_0 - t_i L_1]`:
        the largest drop below (rise above) the linear interpolation of the end values (Entezari et al. 2022,
        arXiv:2110.06296); 0 at the end points, so never negative.
    mid_t, mid_accuracy, mid_loss : float
        The evaluated ``t`` nearest to 0.5 (the smaller one on a tie) and the values there; odd ``num_points``
        put a point at exactly 0.5.
    train_loss, train_accuracy : tuple of float or None
        The same on the train loader, when one was given.
    max_bn_batches : int or None
        Batches used per batch-norm re-estimation (None: full passes).
    robust_test_loss, robust_test_accuracy : tuple of float or None
        With an attack (:func:`evaluate_curve` ``adversarial``): loss and accuracy on the test loader's PGD
        examples at each ``t`` (eval mode, same batch-norm statistics as the clean values).
    robust_avg_loss, robust_avg_accuracy : float or None
        Arc-length-weighted averages of the robust values (the official "line integral" of the robust loss).
    robust_loss_barrier : float or None
        :math:`\\max_i [L^{rob}(t_i) - (1 - t_i) L^{rob}_0 - t_i L^{rob}_1]` (never negative).
    robust_min_accuracy, robust_max_accuracy : float or None
        Least and most robust accuracy along the curve (the first ``t`` on ties).
    clean_accuracy_at_robust_min, clean_accuracy_at_robust_max : float or None
        Clean test accuracy at those two points.
    robust_endpoint_accuracy : float or None
        Mean robust accuracy of the end points.
    adversarial : dict or None
        The attack's settings (:meth:`neuralign.attacks.PGD.to_dict`).
    bn_inputs : str or None
        ``"adversarial"`` or ``"clean"``: what batch norm was re-estimated on, with an attack.
    """

    t: tuple[float, ...]
    test_loss: tuple[float, ...]
    test_accuracy: tuple[float, ...]
    arc_length: tuple[float, ...]
    geometry: str
    avg_accuracy: float
    avg_loss: float
    min_accuracy: float
    max_loss: float
    endpoint_accuracy: float
    endpoint_loss: float
    accuracy_barrier: float
    loss_barrier: float
    mid_t: float
    mid_accuracy: float
    mid_loss: float
    train_loss: tuple[float, ...] | None = None
    train_accuracy: tuple[float, ...] | None = None
    max_bn_batches: int | None = None
    robust_test_loss: tuple[float, ...] | None = None
    robust_test_accuracy: tuple[float, ...] | None = None
    robust_avg_loss: float | None = None
    robust_avg_accuracy: float | None = None
    robust_loss_barrier: float | None = None
    robust_min_accuracy: float | None = None
    robust_max_accuracy: float | None = None
    clean_accuracy_at_robust_min: float | None = None
    clean_accuracy_at_robust_max: float | None = None
    robust_endpoint_accuracy: float | None = None
    adversarial: dict[str, Any] | None = None
    bn_inputs: str | None = None

    @classmethod
    def from_values(
        cls,
        t: Sequence[float],
        test_loss: Sequence[float],
        test_accuracy: Sequence[float],
        arc_length: Sequence[float],
        *,
        geometry: str = "chord",
        train_loss: Sequence[float] | None = None,
        train_accuracy: Sequence[float] | None = None,
        max_bn_batches: int | None = None,
        robust_test_loss: Sequence[float] | None = None,
        robust_test_accuracy: Sequence[float] | None = None,
        adversarial: Mapping[str, Any] | None = None,
        bn_inputs: str | None = None,
    ) -> CurveEvaluation:
        """Build the evaluation, computing the summary from per-point values (``t`` must start at 0, end at 1).

        Examples
        --------
        >>> ev = CurveEvaluation.from_values([0, 0.5, 1], [0.1, 0.5, 0.3], [0.9, 0.6, 0.8], [0, 1, 2])
        >>> round(ev.avg_accuracy, 4), ev.min_accuracy, round(ev.accuracy_barrier, 4), round(ev.loss_barrier, 4)
        (0.725, 0.6, 0.25, 0.3)
        """
        ts = tuple(float(v) for v in t)
        loss = tuple(float(v) for v in test_loss)
        acc = tuple(float(v) for v in test_accuracy)
        s = tuple(float(v) for v in arc_length)
        if not (len(ts) == len(loss) == len(acc) == len(s)) or len(ts) < 2:
            raise ValueError("`t`, `test_loss`, `test_accuracy` and `arc_length` must have one equal length >= 2")
        if ts[0] != 0.0 or ts[-1] != 1.0:
            raise ValueError(f"`t` must start at 0 and end at 1, got {ts[0]} and {ts[-1]}")
        mid = min(range(len(ts)), key=lambda i: (round(abs(ts[i] - 0.5), 12), ts[i]))  # ties: smaller t
        robust: dict[str, Any] = {}
        if (robust_test_loss is None) != (robust_test_accuracy is None):
            raise ValueError("give both `robust_test_loss` and `robust_test_accuracy`, or neither")
        if robust_test_loss is not None:
            r_loss = tuple(float(v) for v in robust_test_loss)
            r_acc = tuple(float(v) for v in robust_test_accuracy)
            if not len(r_loss) == len(r_acc) == len(ts):
                raise ValueError("`robust_test_loss` and `robust_test_accuracy` must have the length of `t`")
            worst = min(range(len(ts)), key=lambda i: r_acc[i])
            best = max(range(len(ts)), key=lambda i: r_acc[i])
            robust = {
                "robust_test_loss": r_loss,
                "robust_test_accuracy": r_acc,
                "robust_avg_loss": arc_length_average(r_loss, s),
                "robust_avg_accuracy": arc_length_average(r_acc, s),
                "robust_loss_barrier": max(v - (1 - u) * r_loss[0] - u * r_loss[-1] for u, v in zip(ts, r_loss)),
                "robust_min_accuracy": r_acc[worst],
                "robust_max_accuracy": r_acc[best],
                "clean_accuracy_at_robust_min": acc[worst],
                "clean_accuracy_at_robust_max": acc[best],
                "robust_endpoint_accuracy": (r_acc[0] + r_acc[-1]) / 2.0,
                "adversarial": None if adversarial is None else dict(adversarial),
                "bn_inputs": bn_inputs,
            }
        return cls(
            t=ts,
            test_loss=loss,
            test_accuracy=acc,
            arc_length=s,
            geometry=geometry,
            avg_accuracy=arc_length_average(acc, s),
            avg_loss=arc_length_average(loss, s),
            min_accuracy=min(acc),
            max_loss=max(loss),
            endpoint_accuracy=(acc[0] + acc[-1]) / 2.0,
            endpoint_loss=(loss[0] + loss[-1]) / 2.0,
            accuracy_barrier=max((1 - u) * acc[0] + u * acc[-1] - a for u, a in zip(ts, acc)),
            loss_barrier=max(v - (1 - u) * loss[0] - u * loss[-1] for u, v in zip(ts, loss)),
            mid_t=ts[mid],
            mid_accuracy=acc[mid],
            mid_loss=loss[mid],
            train_loss=None if train_loss is None else tuple(float(v) for v in train_loss),
            train_accuracy=None if train_accuracy is None else tuple(float(v) for v in train_accuracy),
            max_bn_batches=max_bn_batches,
            **robust,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists and floats)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CurveEvaluation:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown CurveEvaluation fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def evaluate_curve(
    model: nn.Module,
    curve: Curve,
    bn_loader: Iterable,
    test_loader: Iterable,
    *,
    num_points: int = 65,
    train_loader: Iterable | None = None,
    max_bn_batches: int | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    adversarial: PGD | None = None,
    bn_inputs: str = "adversarial",
    generator: torch.Generator | int | None = None,
) -> CurveEvaluation:
    """Test loss and accuracy along a curve, batch norm re-estimated at every point, with the paper's summary.

    At each :math:`t_i = i / (m - 1)`, :math:`i = 0, \\dots, m - 1`: the model is run at :math:`w(t_i)`, its
    batch-norm statistics are re-estimated on ``bn_loader`` (:func:`reestimate_bn`), and the mean cross-entropy
    and accuracy are measured on ``test_loader`` (and ``train_loader``) in eval mode. The summary
    (:class:`CurveEvaluation`) holds "Avg" :math:`= \\sum_i \\omega_i a_i / s_{m-1}` with arc-length weights
    (:func:`arc_length_average`, :func:`arc_length`), "Min", the end-point mean, the barriers and the midpoint.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (never modified).
    curve : Curve
        The curve, over ``model``'s parameters; its device is the device of the computation.
    bn_loader : iterable
        Data for batch-norm re-estimation: the training loader with its augmentation, as in the paper.
    test_loader : iterable
        Yields ``(inputs, targets)``.
    num_points : int
        Number :math:`m \\ge 2` of evaluated points; default 65 as in Tatro et al. (Garipov et al.: 61).
    train_loader : iterable, optional
        Also measure loss and accuracy on it (eval mode).
    max_bn_batches : int, optional
        Re-estimate batch norm on the first ``max_bn_batches`` batches of ``bn_loader`` only (the full pass per
        point dominates the cost). Measured with ``python benchmarks/bn_subset.py`` (MNIST, batch 128, an MLP and
        a conv net with batch norm, end points trained for 1 epoch, 9 values of t, 2 shuffles; reference = a full
        pass of 469 batches): the largest change of test accuracy over t was 0.16 / 0.10 / 0.07 / 0.08
        percentage points with 5 / 10 / 20 / 50 batches along fitted Bezier curves (accuracy 96.8-97.8 %), and
        0.73 / 0.55 / 0.28 / 0.38 points along straight lines, whose midpoints fall to 30 % accuracy (conv net).
    callback : callable, optional
        Called after each point with ``{"index", "t", "test_loss", "test_accuracy"[, "train_loss",
        "train_accuracy", "robust_test_loss", "robust_test_accuracy"]}`` (for progress; its return value is
        ignored).
    adversarial : PGD, optional
        Also measure robust test loss and accuracy at every ``t`` (Tatro et al. 2020 §4, code
        ``eval_adversarial_curve.py``): PGD examples of the test batches against the network at :math:`w(t)` in
        eval mode with the re-estimated statistics. The summary then adds the robust loss barrier, the
        arc-length average of the robust loss, min and max robust accuracy and the clean accuracy at those points.
        Inputs must be in [0, 1].
    bn_inputs : {"adversarial", "clean"}
        With ``adversarial``: re-estimate batch norm on PGD examples of the ``bn_loader`` batches (generated at
        :math:`w(t)` in train mode, as the official code does; the default) or on the clean batches. Clean and
        robust test values use the same statistics.
    generator : torch.Generator or int, optional
        Attack randomness. Every ``t`` uses a fresh CPU generator seeded with the same seed (an int as given; a
        seed drawn once from a Generator, or from the global RNG for None), first for the batch-norm pass's
        attacks, then for the test attacks, so that points differ by their weights only and the evaluation at
        ``t`` = 0 equals :func:`reestimate_bn` then :func:`~neuralign.curves.evaluate_model` at the end point with
        ``generator=torch.Generator().manual_seed(seed)`` passed to both.

    Returns
    -------
    CurveEvaluation

    Raises
    ------
    ShapeMismatchError
        If the curve does not match ``model``'s parameters (names the parameter).
    ValueError
        For ``num_points < 2``, an empty loader, inputs the model cannot take, an unknown ``bn_inputs``, or
        inputs outside [0, 1] with an attack.

    References
    ----------
    .. [1] T. Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018,
       arXiv:1802.10026.
    .. [2] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.
    .. [3] P. Zhao, P.-Y. Chen, P. Das, K. N. Ramamurthy, X. Lin, "Bridging Mode Connectivity in Loss Landscapes
       and Adversarial Robustness", ICLR 2020, arXiv:2005.00060.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from neuralign.curves import Bezier
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    >>> a = dict(model.named_parameters())
    >>> b = {k: torch.randn_like(v) for k, v in a.items()}
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> ev = evaluate_curve(model, Bezier.between(a, b), data, data, num_points=5)
    >>> ev.t
    (0.0, 0.25, 0.5, 0.75, 1.0)
    >>> ev.geometry, ev.min_accuracy <= ev.avg_accuracy
    ('planar', True)
    """
    model = _weights.check_model(model)
    if not isinstance(curve, Curve):
        raise TypeError(f"`curve` must be a Curve, got {type(curve).__name__}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"`num_points` must be an int >= 2, got {num_points!r}")
    max_bn_batches = _weights.check_max_batches(max_bn_batches, "max_bn_batches")
    _weights.check_curve_matches_model(model, curve.names, curve.shapes)
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    if bn_inputs not in ("adversarial", "clean"):
        raise ValueError(f"unknown bn_inputs {bn_inputs!r}; expected one of ['adversarial', 'clean']")
    seed = 0
    if adversarial is not None:
        if isinstance(generator, int) and not isinstance(generator, bool):
            seed = generator
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=as_generator(generator)).item())
    bn_attack = adversarial if bn_inputs == "adversarial" else None
    device = curve.device
    ts = [i / (num_points - 1) for i in range(num_points)]
    test_loss, test_acc, train_loss, train_acc, robust_loss, robust_acc = [], [], [], [], [], []
    for i, t in enumerate(ts):
        params = curve(t)
        gen = torch.Generator().manual_seed(seed) if adversarial is not None else None
        buffers = _weights.reestimate(
            model, params, bn_loader, max_bn_batches, device, "bn_loader", adversarial=bn_attack, generator=gen
        )
        loss, acc = _weights.evaluate(model, params, buffers, test_loader, device, "test_loader")
        test_loss.append(loss)
        test_acc.append(acc)
        record: dict[str, Any] = {"index": i, "t": t, "test_loss": loss, "test_accuracy": acc}
        if adversarial is not None:
            loss, acc = _weights.evaluate(
                model, params, buffers, test_loader, device, "test_loader", adversarial=adversarial, generator=gen
            )
            robust_loss.append(loss)
            robust_acc.append(acc)
            record.update(robust_test_loss=loss, robust_test_accuracy=acc)
        if train_loader is not None:
            loss, acc = _weights.evaluate(model, params, buffers, train_loader, device, "train_loader")
            train_loss.append(loss)
            train_acc.append(acc)
            record.update(train_loss=loss, train_accuracy=acc)
        logger.debug("curve point %s", record)
        if callback is not None:
            callback(record)
    geometry = "planar" if isinstance(curve, Bezier) and curve.degree == 2 else "chord"
    s = arc_length(curve, ts, method=geometry)
    return CurveEvaluation.from_values(
        ts,
        test_loss,
        test_acc,
        s.tolist(),
        geometry=geometry,
        train_loss=train_loss if train_loader is not None else None,
        train_accuracy=train_acc if train_loader is not None else None,
        max_bn_batches=max_bn_batches,
        robust_test_loss=robust_loss if adversarial is not None else None,
        robust_test_accuracy=robust_acc if adversarial is not None else None,
        adversarial=None if adversarial is None else adversarial.to_dict(),
        bn_inputs=None if adversarial is None else bn_inputs,
    )


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlaneEvaluation:
    """Loss and accuracy over a grid in the plane through three points (accuracies are fractions).

    The orthonormal frame is Gram-Schmidt of :math:`u = w_B - w_A` and :math:`v = w_C - w_A`:
    :math:`e_1 = u / \\lVert u \\rVert`, :math:`e_2 = v_\\perp / \\lVert v_\\perp \\rVert` with
    :math:`v_\\perp = v - \\langle v, e_1 \\rangle e_1`. Grid point :math:`(\\alpha_i, \\beta_j)` is
    :math:`w_A + \\alpha_i u + \\beta_j v_\\perp`, at coordinates :math:`(x_i, y_j) = (\\alpha_i \\lVert u \\rVert,
    \\beta_j \\lVert v_\\perp \\rVert)`.

    Attributes
    ----------
    alpha, beta : tuple of float
        Grid coordinates in units of :math:`\\lVert u \\rVert` and :math:`\\lVert v_\\perp \\rVert` (A at (0, 0),
        B at (1, 0), C at height 1).
    x, y : tuple of float
        The same in weight-space distance (plot axes).
    test_loss, test_accuracy : tuple of tuple of float
        ``[i][j]`` is the value at ``(x[i], y[j])``.
    point_coordinates : tuple of (float, float)
        :math:`(x, y)` of A, B and C.
    max_bn_batches : int or None
        Batches used per batch-norm re-estimation.
    """

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    x: tuple[float, ...]
    y: tuple[float, ...]
    test_loss: tuple[tuple[float, ...], ...]
    test_accuracy: tuple[tuple[float, ...], ...]
    point_coordinates: tuple[tuple[float, float], ...]
    max_bn_batches: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (nested lists and floats)."""

        def plain(v: Any) -> Any:
            return [plain(e) for e in v] if isinstance(v, (tuple, list)) else v

        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlaneEvaluation:
        """Inverse of :meth:`to_dict`."""

        def frozen(v: Any) -> Any:
            return tuple(frozen(e) for e in v) if isinstance(v, (tuple, list)) else v

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PlaneEvaluation fields {unknown}")
        return cls(**{k: frozen(v) for k, v in data.items()})


def _plane_frame(abc: torch.Tensor) -> tuple[float, float, float, float]:
    """(|u|, <v, e1>, |v_perp|, <v,u>/<u,u>) for the rows A, B, C of ``abc``; ValueError if degenerate."""
    gram = _centered_gram(abc[1:], abc[1:], abc[0])  # [[<u,u>, <u,v>], [<v,u>, <v,v>]]
    uu, uv, vv = gram[0, 0].item(), gram[0, 1].item(), gram[1, 1].item()
    if not uu > 0.0:
        raise ValueError("`point_a` and `point_b` coincide: they do not span a plane")
    dx = math.sqrt(uu)
    cx = uv / dx
    dy2 = vv - cx * cx
    if not dy2 > 1e-12 * max(vv, uu):
        raise ValueError("`point_c` lies on the line through `point_a` and `point_b`: the three do not span a plane")
    return dx, cx, math.sqrt(dy2), uv / uu


def project_to_plane(
    points: Sequence[Mapping[str, torch.Tensor]] | Curve,
    point_a: Mapping[str, torch.Tensor],
    point_b: Mapping[str, torch.Tensor],
    point_c: Mapping[str, torch.Tensor],
    *,
    t: Iterable[float] | None = None,
) -> torch.Tensor:
    """2-D coordinates of points in the plane frame of :class:`PlaneEvaluation` (orthogonal projection).

    .. math::

        x = \\langle p - w_A, e_1 \\rangle, \\qquad y = \\langle p - w_A, e_2 \\rangle .

    Parameters
    ----------
    points : sequence of dict str -> Tensor, or Curve
        Points with the same keys and shapes as ``point_a``; a :class:`Curve` stands for its weights
        :math:`w(t)` at ``t`` (default ``linspace(0, 1, 65)``).
    point_a, point_b, point_c : dict str -> Tensor
        The three points of the plane (parameters only, the same keys as the points).
    t : iterable of float, optional
        Where to evaluate a curve.

    Returns
    -------
    torch.Tensor
        float64 CPU tensor of shape ``(k, 2)``.

    Raises
    ------
    ShapeMismatchError
        If the keys or shapes differ (names the parameter).
    ValueError
        If the three points do not span a plane.

    Examples
    --------
    >>> import torch
    >>> a, b, c = {"w": torch.zeros(3)}, {"w": torch.tensor([2.0, 0, 0])}, {"w": torch.tensor([1.0, 1, 0])}
    >>> project_to_plane([{"w": torch.tensor([0.5, 3.0, 7.0])}], a, b, c)
    tensor([[0.5000, 3.0000]], dtype=torch.float64)
    """
    if isinstance(points, Curve):
        ts = _check_ts(t if t is not None else [i / 64 for i in range(65)])
        points = [points(v) for v in ts]
    elif isinstance(points, Mapping) or not isinstance(points, Sequence):
        raise TypeError(f"`points` must be a sequence of dicts or a Curve, got {type(points).__name__}")
    flat, _, _ = _flatten_points([point_a, point_b, point_c, *points], label="points")
    dx, _, dy, ratio = _plane_frame(flat[:3])
    dots = _centered_gram(flat[3:], flat[1:3], flat[0])  # (k, 2): <p - a, u>, <p - a, v>
    x = dots[:, 0] / dx
    y = (dots[:, 1] - ratio * dots[:, 0]) / dy
    return torch.stack([x, y], dim=1)


def evaluate_plane(
    model: nn.Module,
    point_a: Mapping[str, torch.Tensor],
    point_b: Mapping[str, torch.Tensor],
    point_c: Mapping[str, torch.Tensor],
    bn_loader: Iterable,
    test_loader: Iterable,
    *,
    grid: int | tuple[int, int] = 17,
    margin: tuple[float, float, float, float] = (0.05, 0.05, 0.10, 0.50),
    max_bn_batches: int | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> PlaneEvaluation:
    """Test loss and accuracy over a grid in the plane through three networks (Garipov et al. 2018, Fig. 1).

    With :math:`u = w_B - w_A` and :math:`v_\\perp` the part of :math:`w_C - w_A` orthogonal to :math:`u`, the
    grid points are :math:`w_A + \\alpha_i u + \\beta_j v_\\perp` for :math:`\\alpha` evenly spaced in
    :math:`[-m_l, 1 + m_r]` and :math:`\\beta` in :math:`[-m_b, 1 + m_t]`; at each, batch norm is re-estimated on
    ``bn_loader`` and the test loss and accuracy are measured (eval mode). For a curve, pass :math:`C = w(0.5)`
    (default margins give the paper's :math:`[-0.05, 1.05] \\times [-0.1, 1.5]`); for alignment, pass
    :math:`(w_A, w_B, P w_B)` with ``margin=(0.05, 0.05, 0.05, 0.05)``.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (never modified).
    point_a, point_b, point_c : dict str -> Tensor
        The three networks' parameters (full state dicts accepted; buffers ignored), on one device.
    bn_loader, test_loader : iterable
        As in :func:`evaluate_curve`.
    grid : int or (int, int)
        Number of grid values along :math:`\\alpha` and :math:`\\beta` (default 17 x 17, as in the paper).
    margin : (float, float, float, float)
        ``(left, right, bottom, top)`` margins in units of :math:`\\lVert u \\rVert` and
        :math:`\\lVert v_\\perp \\rVert`.
    max_bn_batches : int, optional
        Batches per batch-norm re-estimation (see :func:`evaluate_curve`).
    callback : callable, optional
        Called after each grid point with ``{"i", "j", "alpha", "beta", "test_loss", "test_accuracy"}``.

    Returns
    -------
    PlaneEvaluation

    Raises
    ------
    ShapeMismatchError
        If a point does not match ``model``'s parameters (names the parameter).
    ValueError
        If the three points do not span a plane, or for a bad grid or margin.

    References
    ----------
    .. [1] T. Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018,
       arXiv:1802.10026.
    .. [2] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> a = dict(model.named_parameters())
    >>> b, c = ({k: torch.randn_like(v) for k, v in a.items()} for _ in range(2))
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> plane = evaluate_plane(model, a, b, c, data, data, grid=3, margin=(0, 0, 0, 0))
    >>> plane.alpha, len(plane.test_accuracy), plane.point_coordinates[0]
    ((0.0, 0.5, 1.0), 3, (0.0, 0.0))
    """
    model = _weights.check_model(model)
    max_bn_batches = _weights.check_max_batches(max_bn_batches, "max_bn_batches")
    nx, ny = (grid, grid) if isinstance(grid, int) and not isinstance(grid, bool) else tuple(grid)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in (nx, ny)):
        raise ValueError(f"`grid` must be an int >= 2 or a pair of them, got {grid!r}")
    if len(margin) != 4 or not all(math.isfinite(float(m)) for m in margin):
        raise ValueError(f"`margin` must be 4 finite numbers (left, right, bottom, top), got {margin!r}")
    left, right, bottom, top = (float(m) for m in margin)
    labelled = ((point_a, "point_a"), (point_b, "point_b"), (point_c, "point_c"))
    params = [_weights.parameters_of(model, p, label) for p, label in labelled]
    flat, names, shapes = _flatten_points(params, label="points")
    dx, cx, dy, ratio = _plane_frame(flat)
    with torch.no_grad():
        u = flat[1] - flat[0]
        v_perp = flat[2] - flat[0] - ratio * u
    numels = [s.numel() for s in shapes]
    alphas = torch.linspace(-left, 1.0 + right, nx, dtype=torch.float64).tolist()
    betas = torch.linspace(-bottom, 1.0 + top, ny, dtype=torch.float64).tolist()
    device = flat.device
    losses = [[0.0] * ny for _ in range(nx)]
    accs = [[0.0] * ny for _ in range(nx)]
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            with torch.no_grad():
                w = flat[0] + alpha * u + beta * v_perp
            point = {n: part.view(s) for n, part, s in zip(names, w.split(numels), shapes)}
            buffers = _weights.reestimate(model, point, bn_loader, max_bn_batches, device, "bn_loader")
            losses[i][j], accs[i][j] = _weights.evaluate(model, point, buffers, test_loader, device, "test_loader")
            if callback is not None:
                callback(
                    {"i": i, "j": j, "alpha": alpha, "beta": beta, "test_loss": losses[i][j],
                     "test_accuracy": accs[i][j]}
                )
    return PlaneEvaluation(
        alpha=tuple(alphas),
        beta=tuple(betas),
        x=tuple(a * dx for a in alphas),
        y=tuple(b * dy for b in betas),
        test_loss=tuple(tuple(r) for r in losses),
        test_accuracy=tuple(tuple(r) for r in accs),
        point_coordinates=((0.0, 0.0), (dx, 0.0), (cx, dy)),
        max_bn_batches=max_bn_batches,
    )
