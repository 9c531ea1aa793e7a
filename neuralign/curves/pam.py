"""PAM on curves: the joint optimisation of a Bezier curve and the permutation of its end point B.

The curve problem of Tatro et al. (2020, §3) is

.. math::

    \\min_{\\theta, P} \\; F(\\theta, P) = \\mathbb{E}_{t \\sim U[0,1]} \\,
    \\Big[\\ell\\big(\\phi(t)\\big) + \\tfrac{\\lambda_{wd}}{2}\\|\\phi(t)\\|^2\\Big], \\qquad
    \\phi(t) = (1-t)\\, w_A + t\\, P w_B + 2t(1-t)\\, \\theta_{\\text{off}},

the quadratic Bezier curve with control point :math:`\\theta = \\tfrac12 w_A + \\tfrac12 P w_B + \\theta_{\\text{off}}`
(so that :math:`P` acts on :math:`w_B` in both the end point and the control point), :math:`P` a product of
permutation matrices, one per group of a :class:`~neuralign.alignment.PermutationSpec`. It is solved with the
general :class:`~neuralign.optim.PAM` solver: the continuous variable is :math:`x = \\theta_{\\text{off}}`, the
P-step uses :math:`\\nabla_P F` obtained by applying every :math:`P` as a dense matrix
(:func:`~neuralign.alignment.apply_permutation_matrices`), and the x-step is curve fitting
(:func:`~neuralign.curves.fit_curve`) with the permutation fixed.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from neuralign._distributed import all_reduce_, check_same_batch, is_distributed, shard_batch, world_size
from neuralign._epochs import EpochCheckpoint
from neuralign._options import Options, nested, renamed_keywords, resolve_options
from neuralign._stats import bonferroni_quantile, paired_change
from neuralign._utils import as_generator, classification_loss, split_batch, stable_seed
from neuralign._validate import check_int, check_real
from neuralign.alignment import (
    PermutationSpec,
    align,
    apply_permutation,
    apply_permutation_matrices,
    compose_permutations,
    identity_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.curves.bn import _parameters_of
from neuralign.curves.families import Bezier
from neuralign.curves.fit import fit_curve
from neuralign.errors import ConvergenceWarning, NonFiniteError
from neuralign.optim import (
    PAM,
    BirkhoffStep,
    LinearizedStep,
    PAMResult,
    PAMState,
    PermutationProblem,
    PStep,
    p_step,
    perm_to_matrix,
)
from neuralign.status import Status

__all__ = ["CurvePAMOptions", "CurvePermutationProblem", "CurvePAMResult", "fit_curve_pam"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurvePAMOptions(Options):
    """The options of PAM on a curve (:func:`fit_curve_pam`), defined and validated once; the study's ``pam``
    settings are this object.

    Attributes
    ----------
    step : LinearizedStep or BirkhoffStep
        The P-step (:class:`~neuralign.optim.LinearizedStep`, backtracked by default so that the monitored objective
        never increases, or :class:`~neuralign.optim.BirkhoffStep`, the official code's relaxed steps with
        Birkhoff–von Neumann rounding); a name (``"linearized"``, ``"birkhoff"``) gives its default here. The exact
        step does not apply: the curve objective is not linear in P.
    lam : float
        P proximal step :math:`\\lambda > 0` (the official code's :math:`\\nu = 1000`).
    max_iter : int
        Outer iterations (>= 1; the paper uses 1).
    tol : float
        Convergence tolerance of :meth:`~neuralign.optim.PAM.run` (>= 0).
    x_epochs : int
        Curve-fitting epochs per x-step (>= 1; the paper: 250).
    mu : float, optional
        Proximal parameter of the x-step, :math:`\\frac{1}{2\\mu}\\|\\theta - \\theta_k\\|^2` (default none: plain
        curve fitting; the official code's pull is ``mu=1000``).
    gradient_batches : int, optional
        Training batches for each :math:`\\nabla_P F` estimate (>= 1); default a tenth of an epoch (at least 1).
    value_batches : int
        Held-out batches (each at every time of ``value_ts``) on which the monitored objective, and so every P-step
        candidate, is evaluated (>= 1; default 8).
    value_ts : tuple of float
        Times in [0, 1] at which every value batch is evaluated (default 0.25, 0.5, 0.75).
    swap_trials : int
        The swap local search after each P-step: try this many random transpositions per group, scored on the value
        batches, and apply the best one that lowers the objective significantly (paired over batches, Bonferroni at
        family-wise level ``swap_alpha``). Linearised steps cannot see improvements that lie behind a barrier of the
        relaxation (averaging two units' weights is worse than either), which swaps reach directly. 0 (default):
        off.
    swap_alpha : float
        Family-wise level of the local search's tests, in (0, 1) (default 0.05).
    swap_min_improvement : float
        A swap of the local search must lower the objective by more than this fraction of it (>= 0; default 0;
        the verification's ``min_improvement``).

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong kind or out of its range (names it).
    """

    step: PStep = nested(LinearizedStep, BirkhoffStep, default=LinearizedStep(backtrack=True),
                         named=(LinearizedStep(backtrack=True),))  # fmt: skip
    lam: float = 1000.0
    max_iter: int = 1
    tol: float = 0.0
    x_epochs: int = 1
    mu: float | None = None
    gradient_batches: int | None = None
    value_batches: int = 8
    value_ts: tuple[float, ...] = (0.25, 0.5, 0.75)
    swap_trials: int = 0
    swap_alpha: float = 0.05
    swap_min_improvement: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.step, (LinearizedStep, BirkhoffStep)):
            raise ValueError(f"`step` must be a LinearizedStep or a BirkhoffStep (the curve objective is not linear "
                             f"in P), got {self.step!r}")  # fmt: skip
        self._check("lam", check_real, low=0.0, low_open=True, allow_inf=True)
        self._check("max_iter", check_int, minimum=1)
        self._check("tol", check_real, low=0.0)
        self._check("x_epochs", check_int, minimum=1)
        self._check("mu", check_real, low=0.0, low_open=True, allow_none=True, allow_inf=True)
        self._check("gradient_batches", check_int, minimum=1, allow_none=True)
        self._check("value_batches", check_int, minimum=1)
        ts = self.value_ts if isinstance(self.value_ts, (tuple, list)) else (self.value_ts,)
        object.__setattr__(self, "value_ts", tuple(check_real(t, "value_ts", low=0.0, high=1.0) for t in ts))
        if not self.value_ts:
            raise ValueError("`value_ts` must be a non-empty sequence of times in [0, 1], got ()")
        self._check("swap_trials", check_int, minimum=0)
        self._check("swap_alpha", check_real, low=0.0, high=1.0, low_open=True, high_open=True)
        self._check("swap_min_improvement", check_real, low=0.0)



def _shard(x: torch.Tensor, y: torch.Tensor, label: str) -> tuple:
    """``(x, y)``, or under a process group this rank's ``(x_r, y_r, share)`` (see :meth:`batch_loss`)."""
    if not is_distributed():
        return x, y
    return shard_batch(x, y, label=label)


def _fixed_batches(loader: Iterable, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        if len(out) >= n:
            break
        x, y = split_batch(batch, device, "heldout_loader")
        if y is None:
            raise TypeError("`heldout_loader` must yield (inputs, targets) pairs")
        if not out:
            check_same_batch(x, y, label="heldout_loader")
        out.append(_shard(x, y, "heldout_loader"))
    if not out:
        raise ValueError("`heldout_loader` yielded no batches")
    return out


class CurvePermutationProblem(PermutationProblem):
    """The curve objective :math:`F(\\theta_{\\text{off}}, P)` as a :class:`~neuralign.optim.PermutationProblem`.

    Parameters
    ----------
    model : nn.Module
        The architecture (copied; run in train mode, batch norm on batch statistics, with private buffers).
    point_a, point_b : dict str -> Tensor
        End points (parameter dicts or full state dicts; only parameters are used).
    spec : PermutationSpec
        The groups acting on ``point_b``.
    train_loader : iterable
        ``(inputs, targets)`` batches for :meth:`loss` and :meth:`gradient_p`.
    weight_decay : float
        :math:`\\lambda_{wd}` of the penalty on :math:`\\phi(t)`.
    loss_fn : callable, optional
        Default cross-entropy (with GoogLeNet's auxiliary heads).
    heldout_loader : iterable, optional
        Fixed-order batches (default ``train_loader``): the first ``value_batches`` of them, each evaluated at every
        time in ``value_ts``, define the deterministic monitored value (the official code scores permutations on a
        full training pass with :math:`t` swept across batches; a fixed time grid per batch makes per-batch
        differences between two permutations comparable).
    value_batches : int
    value_ts : sequence of float
        Times at which every value batch is evaluated (the end points, where :math:`P` has no effect on the
        cross-entropy, are left out by default).
    gradient_batches : int
        Mini-batches (each with its own :math:`t \\sim U[0,1]`) averaged in :meth:`gradient_p`.
    generator : torch.Generator or int, optional
        Source of the :math:`t` draws; share it with :class:`~neuralign.optim.PAM` for exact resumes.

    Notes
    -----
    :math:`x` is a list holding one flat tensor :math:`\\theta_{\\text{off}}` over all parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        point_a: Mapping[str, torch.Tensor],
        point_b: Mapping[str, torch.Tensor],
        spec: PermutationSpec,
        train_loader: Iterable,
        *,
        weight_decay: float = 5e-4,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        heldout_loader: Iterable | None = None,
        value_batches: int = 8,
        value_ts: Sequence[float] = (0.25, 0.5, 0.75),
        gradient_batches: int = 8,
        generator: torch.Generator | int | None = None,
        **renamed: Any,
    ) -> None:
        heldout_loader = renamed_keywords(renamed, {"value_loader": "heldout_loader"},
                                          where="CurvePermutationProblem").get("heldout_loader", heldout_loader)
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
        for name, value in (("value_batches", value_batches), ("gradient_batches", gradient_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        self.model = copy.deepcopy(model).train()
        self.wa = {k: v.detach() for k, v in _parameters_of(model, point_a, "point_a").items()}
        self.wb = {k: v.detach() for k, v in _parameters_of(model, point_b, "point_b").items()}
        self.names = list(self.wa)
        self.shapes = [self.wa[k].shape for k in self.names]
        self.numels = [self.wa[k].numel() for k in self.names]
        first = self.wa[self.names[0]]
        self.device, self.dtype = first.device, first.dtype
        self.spec = spec.restrict(self.wb)
        self.spec.validate(self.wb, name="point_b")
        self.sizes = dict(spec.sizes)
        self.ties = {}
        self.weight_decay = float(weight_decay)
        self.loss_fn = loss_fn or classification_loss
        self.train_loader = train_loader
        self.gradient_batches = gradient_batches
        self.generator = as_generator(generator)
        self.buffers = {k: b.detach().to(self.device, copy=True) for k, b in self.model.named_buffers()}
        self.value_set = _fixed_batches(heldout_loader if heldout_loader is not None else train_loader,
                                        value_batches, self.device)  # fmt: skip
        self.value_ts = tuple(float(t) for t in value_ts)
        if not self.value_ts or any(not 0.0 <= t <= 1.0 for t in self.value_ts):
            raise ValueError(f"`value_ts` must be a non-empty sequence of times in [0, 1], got {value_ts!r}")

    def to(self, dtype: torch.dtype) -> CurvePermutationProblem:
        """A copy computing in ``dtype`` (e.g. float64 for a Taylor test); the data batches are converted too."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model).to(dtype)
        other.wa = {k: v.to(dtype) for k, v in self.wa.items()}
        other.wb = {k: v.to(dtype) for k, v in self.wb.items()}
        other.buffers = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.buffers.items()}
        other.value_set = [(x.to(dtype) if x.is_floating_point() else x, *rest) for x, *rest in self.value_set]
        other.dtype = dtype
        return other

    # ------------------------------------------------------------------ the curve
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat parameter vector into named views."""
        return {k: t.view(s) for k, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named parameters into one flat vector (the inverse of :meth:`unflatten`)."""
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def permuted_b(self, P: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`P w_B` with dense (possibly relaxed) matrices, differentiable in ``P``."""
        return apply_permutation_matrices(self.wb, self.spec, P)

    def weights(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
        """:math:`\\phi(t) = (1-t) w_A + t P w_B + 2t(1-t)\\theta_{\\text{off}}`."""
        pb = self.permuted_b(P)
        off = self.unflatten(x[0])
        c = 2.0 * t * (1.0 - t)
        return {k: (1.0 - t) * self.wa[k] + t * pb[k] + c * off[k] for k in self.names}

    def control_point(self, x: Sequence[torch.Tensor], perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Bezier control point :math:`\\theta = \\tfrac12 w_A + \\tfrac12 P w_B + \\theta_{\\text{off}}`."""
        pb = apply_permutation(self.wb, self.spec, perms)
        off = self.unflatten(x[0].detach())
        return {k: 0.5 * (self.wa[k] + pb[k]) + off[k] for k in self.names}

    def offset(self, theta: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:math:`\\theta_{\\text{off}} = \\theta - \\tfrac12 w_A - \\tfrac12 P w_B` as a flat vector."""
        pb = apply_permutation(self.wb, self.spec, perms)
        return self.flatten({k: theta[k].detach() - 0.5 * (self.wa[k] + pb[k]) for k in self.names})

    def start_offset(self, curve: Bezier) -> torch.Tensor:
        """:math:`\\theta_{\\text{off}}` (flat) of a quadratic Bezier curve whose end points are the problem's.

        Raises
        ------
        ValueError
            If ``curve`` is not a quadratic Bezier curve or was fitted for other end points (names the parameter).
        """
        if not isinstance(curve, Bezier) or curve.num_points != 3:
            raise ValueError("`curve` must be a quadratic Bezier curve (3 points)")
        a, theta, b = curve.points
        for name, given, expected in (("point_a", a, self.wa), ("the permuted point_b", b, self.wb)):
            for k in self.names:
                if k not in given or not torch.allclose(given[k].to(expected[k]), expected[k], rtol=1e-6, atol=1e-7,
                                                        equal_nan=True):
                    raise ValueError(f"`curve` was fitted for other end points: its end differs from {name} at `{k}`")
        return self.offset({k: theta[k].to(self.wa[k]) for k in self.names}, identity_permutation(self.spec))

    # ------------------------------------------------------------------ objective
    def batch_loss(
        self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor],
        t: float,
    ) -> torch.Tensor:  # fmt: skip
        """:math:`\\ell(\\phi(t)) + \\tfrac{\\lambda_{wd}}{2}\\|\\phi(t)\\|^2` on one batch (differentiable).

        Under a process group ``batch`` is ``(x_r, y_r, share)``, this rank's slice: the result is this rank's term
        ``share * loss_r + penalty / W`` of a sum over the ranks that equals the global batch's value.
        """
        w = self.weights(x, P, t)
        out = functional_call(self.model, (w, self.buffers), (batch[0],))
        loss = self.loss_fn(out, batch[1])
        share, penalty_share = (batch[2], 1.0 / world_size()) if len(batch) > 2 else (1.0, 1.0)
        if share != 1.0:
            loss = loss * share
        if self.weight_decay:
            loss = loss + (0.5 * self.weight_decay * penalty_share) * sum(v.square().sum() for v in w.values())
        return loss

    def objective(
        self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batches: Sequence, ts: Sequence[float]
    ) -> torch.Tensor:
        """The mean of :meth:`batch_loss` over given batches and times (deterministic, differentiable)."""
        return sum(self.batch_loss(x, P, b, t) for b, t in zip(batches, ts)) / len(batches)

    def batch_value(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batch) -> torch.Tensor:
        """The objective on one batch averaged over ``value_ts``."""
        return sum(self.batch_loss(x, P, batch, t) for t in self.value_ts) / len(self.value_ts)

    def batch_values(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per value batch, the objective averaged over ``value_ts`` (float64, no gradient)."""
        with torch.no_grad():
            values = torch.tensor([float(self.batch_value(x, P, b)) for b in self.value_set], dtype=torch.float64)
        values = all_reduce_(values)  # the ranks' terms of each value batch, summed (float64)
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"the curve objective is {values[bad[0]].item()} on value batch {bad[0]}")
        return values

    def value_pairs(self, n_batches: int | None = None) -> tuple[list, list[float]]:
        """``(batches, ts)`` listing every (value batch, value time) pair, for :meth:`objective`."""
        batches = self.value_set[:n_batches] if n_batches else self.value_set
        return [b for b in batches for _ in self.value_ts], [t for _ in batches for t in self.value_ts]

    def _train_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for batch in self.train_loader:
            if len(out) >= n:
                break
            x, y = split_batch(batch, self.device, "train_loader")
            if y is None:
                raise TypeError("`train_loader` must yield (inputs, targets) pairs")
            out.append(_shard(x, y, "train_loader"))
        if not out:
            raise ValueError("`train_loader` yielded no batches")
        return out

    def _draw_t(self, n: int) -> list[float]:
        return torch.rand(n, generator=self.generator, dtype=torch.float64).tolist()

    def loss(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A stochastic estimate of :math:`F` on one training batch at one random :math:`t`.

        Raises
        ------
        RuntimeError
            Under a process group: this estimate is not data-parallel (:func:`fit_curve_pam`'s x-step is
            :func:`fit_curve`, which is).
        """
        if is_distributed():
            raise RuntimeError(
                "CurvePermutationProblem.loss is not data-parallel; under a process group use fit_curve_pam, whose "
                "x-step (fit_curve) is"
            )
        (batch,) = self._train_batches(1)
        return self.batch_loss(x, P, batch, self._draw_t(1)[0])

    def value(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> float:
        """Deterministic :math:`F`: the mean of :meth:`batch_values` (raises :class:`NonFiniteError` on NaN/inf)."""
        with torch.no_grad():
            return float(self.batch_values(x, P).mean())

    def gradient_at(
        self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batches: Sequence, ts: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        """:math:`\\nabla_P` of :meth:`objective` on given batches and times.

        Under a process group, batches ``(x_r, y_r, share)`` (this class's own) give the gradient of the global
        objective (summed over the ranks); plain ``(x, y)`` batches give this rank's own, without communication.
        """
        leaves = {g: m.detach().clone().requires_grad_(True) for g, m in P.items()}
        with torch.enable_grad():
            f = self.objective([t.detach() for t in x], leaves, batches, ts)
            grads = torch.autograd.grad(f, list(leaves.values()), allow_unused=True)
        out = {g: torch.zeros_like(leaves[g]) if gr is None else gr for g, gr in zip(leaves, grads)}
        if is_distributed() and any(len(b) > 2 for b in batches):
            # batches that carry this rank's share (its slices of global batches): each rank's gradient is of its
            # terms of the objective, and their sum is the global one; plain (x, y) batches stay this rank's own
            sizes = [v.numel() for v in out.values()]
            flat = all_reduce_(torch.cat([v.reshape(-1) for v in out.values()]))
            out = {g: part.view_as(out[g]) for g, part in zip(out, flat.split(sizes))}
        return out

    def gradient_p(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`\\nabla_P F` averaged over ``gradient_batches`` training batches, each at its own random t."""
        batches = self._train_batches(self.gradient_batches)
        return self.gradient_at(x, P, batches, self._draw_t(len(batches)))


@dataclass(frozen=True)
class CurvePAMResult:
    """Outcome of :func:`fit_curve_pam`.

    Attributes
    ----------
    perms : dict[str, LongTensor]
        The final permutation of the raw ``point_b``, composed with the initial one
        (``apply_permutation(point_b, spec, perms)`` is the curve's end point).
    init_perms : dict[str, LongTensor]
        Where PAM started (identity, the alignment, or the given permutation).
    curve : Bezier
        The fitted quadratic Bezier curve from ``point_a`` to the permuted ``point_b``.
    spec : PermutationSpec
    fun : float
        The monitored objective at the end.
    history : list of float
        The monitored objective at the start and after every outer iteration.
    changed : dict[str, list[int]]
        Per group, the number of reassigned units in each outer iteration.
    curve_history : list of dict
        The x-steps' per-epoch records (loss, accuracy, lr), tagged with the outer iteration.
    backtracks : list of int
        Halvings of ``lam`` in each P-step (``backtrack=True``).
    n_iter, converged, status, message
        As in :class:`~neuralign.optim.PAMResult`.
    """

    perms: dict[str, torch.Tensor]
    init_perms: dict[str, torch.Tensor]
    curve: Bezier
    spec: PermutationSpec
    fun: float
    history: list[float]
    changed: dict[str, list[int]]
    curve_history: list[dict[str, Any]] = field(default_factory=list)
    backtracks: list[int] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    status: Status = Status.MAX_ITER
    message: str = ""


def _resolve_init(init, model, point_a, point_b, spec, align_loader) -> dict[str, torch.Tensor]:
    if isinstance(init, Mapping):
        perms = {g: torch.as_tensor(p).long().cpu() for g, p in init.items()}
        validate_permutation(spec, perms, name="init")
        return perms
    if init == "identity":
        return identity_permutation(spec)
    if init == "alignment":
        if align_loader is None:
            raise ValueError("init='alignment' needs `align_loader` (inputs for the correlation alignment)")
        buffers = {k for k, _ in model.named_buffers()}
        missing = [k for k in buffers if k not in point_a or k not in point_b]
        if missing:
            raise ValueError(
                f"init='alignment' needs full state dicts with the batch-norm statistics; `{missing[0]}` is missing"
            )
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        a.load_state_dict(dict(point_a))
        b.load_state_dict(dict(point_b))
        return align(a, b, align_loader, spec=spec).perms
    raise ValueError(f"unknown init {init!r}; expected 'identity', 'alignment' or a permutation dict")


def fit_curve_pam(
    model: nn.Module,
    point_a: Mapping[str, torch.Tensor],
    point_b: Mapping[str, torch.Tensor],
    train_loader: Iterable,
    *,
    init: str | Mapping[str, torch.Tensor] = "identity",
    curve: Bezier | None = None,
    spec: PermutationSpec | None = None,
    align_loader: Iterable | None = None,
    heldout_loader: Iterable | None = None,
    options: CurvePAMOptions | None = None,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    weight_decay: float = 5e-4,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    max_batches: int | None = None,
    generator: torch.Generator | int | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    **option_overrides: Any,
) -> CurvePAMResult:
    """Fit a quadratic Bezier curve jointly with the permutation of end point B by PAM.

    Solves :math:`\\min_{\\theta_{\\text{off}}, P} F(\\theta_{\\text{off}}, P)` of the module docstring by proximal
    alternating minimisation. Each outer iteration is

    1. a P-step: with :math:`G = \\nabla_P F(\\theta_{\\text{off}}, P_k)` estimated on ``gradient_batches``
       training batches, :math:`P_{k+1} = \\arg\\min_P \\langle G, P\\rangle + \\frac{1}{2\\lambda}\\|P - P_k\\|^2`
       (one linear assignment per group; ``method="birkhoff"`` gives the official code's relaxed steps with
       Birkhoff–von Neumann rounding instead); with ``backtrack`` the step is halved until the monitored objective
       does not increase;
    2. an x-step: ``x_epochs`` epochs of :func:`~neuralign.curves.fit_curve` on the curve between :math:`w_A` and
       :math:`P_{k+1} w_B`, starting from the current control point, with the proximal term
       :math:`\\frac{1}{2\\mu}\\|\\theta - \\theta_k\\|^2` when ``mu`` is given.

    Parameters
    ----------
    model : nn.Module
        The architecture (never modified).
    point_a, point_b : dict str -> Tensor
        End points; full state dicts (with batch-norm statistics) are needed for ``init="alignment"``.
    train_loader : iterable
        ``(inputs, targets)`` training batches.
    init : {"identity", "alignment"} or dict
        Start of the permutation: identity ("PAM Unaligned"), the correlation alignment computed on
        ``align_loader`` ("PAM Aligned"), or a given permutation. As in the official code, ``point_b`` is
        permuted by ``init`` first and PAM starts at the identity relative to it; the result is composed back.
    curve : Bezier, optional
        A quadratic Bezier curve from ``point_a`` to ``point_b`` permuted by ``init`` to start from (e.g. the
        fitted aligned curve); default the straight line (:math:`\\theta_{\\text{off}} = 0`).
    spec : PermutationSpec, optional
        Traced from ``model`` on the first training batch when omitted.
    align_loader : iterable, optional
        Inputs for ``init="alignment"``.
    heldout_loader : iterable, optional
        Fixed-order batches of the monitored objective, held out from the gradient estimates (default
        ``train_loader``; see :class:`CurvePermutationProblem`): give training images without augmentation.
    options : CurvePAMOptions, optional
        The PAM options (P-step, ``lam``, ``max_iter``, ``x_epochs``, batches, local search); keyword arguments
        of the same names (``x_epochs=2``, ``step="birkhoff"``) override single ones.
    optimizer, lr_lambda, weight_decay, loss_fn
        As in :func:`~neuralign.curves.fit_curve` (the schedule restarts at every x-step).
    max_batches : int, optional
        Cut the x-step epochs short (at most this many batches each).
    generator : torch.Generator or int, optional
        Randomness of t, of the Birkhoff rounding, and (derived) of the x-steps.
    callback : callable, optional
        Receives dict records: ``{"stage": "x-epoch", "iteration": k, ...}`` after each x-step epoch and
        ``{"stage": "iteration", "iteration": k, "fun": ..., "changed": {...}, "perms": {...}, "curve": Bezier}``
        after each outer iteration (``perms`` of the raw ``point_b``, ``curve`` the curve after this iteration's
        x-step); returning True from the latter stops.
    checkpoint : path-like, optional
        PAM state written atomically before each x-step and after each iteration (the x-step itself checkpoints
        to ``<checkpoint>.xstep``); an interrupted run resumes from it.
    **option_overrides
        Options of :class:`CurvePAMOptions` by name. The keywords of before 0.2 still work with a
        :class:`DeprecationWarning`: ``method`` (now ``step``), the P-step's own (``backtrack``, ``max_moved``,
        ``p_steps``, ``birkhoff_steps``, ...; now fields of ``step``), ``value_loader`` (now ``heldout_loader``),
        ``max_batches_per_epoch`` (now ``max_batches``) and ``local_search``, ``local_search_alpha``,
        ``local_search_min_improvement`` (now ``swap_trials``, ``swap_alpha``, ``swap_min_improvement``).

    Returns
    -------
    CurvePAMResult

    Notes
    -----
    Data-parallel under a torch.distributed process group (:mod:`neuralign._distributed`): the x-step is
    :func:`fit_curve` (data-parallel itself); the P-gradient estimate and the monitored values are computed on each
    rank's slice of the same global batches, each rank weighting its loss by its share of the batch, and summed over
    the ranks (one all-reduce per estimate), so every rank takes the same P-step. Rank 0 writes the checkpoints.

    References
    ----------
    .. [1] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.
    .. [2] H. Attouch, J. Bolte, P. Redont, A. Soubeyran, Math. Oper. Res. 35(2), 2010, arXiv:0801.1780.
    .. [3] T. Garipov et al., NeurIPS 2018, arXiv:1802.10026.
    """
    opts = _curve_pam_options(options, option_overrides)
    renamed = renamed_keywords({k: option_overrides.pop(k) for k in ("value_loader", "max_batches_per_epoch")
                                if k in option_overrides}, _RENAMED, where="fit_curve_pam")  # fmt: skip
    heldout_loader = renamed.get("heldout_loader", heldout_loader)
    max_batches = check_int(renamed.get("max_batches", max_batches), "max_batches", minimum=1, allow_none=True)
    gen = as_generator(generator)
    base_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    if spec is None:
        first = next(iter(train_loader), None)
        if first is None:
            raise ValueError("`train_loader` yielded no batches")
        spec = trace_spec(model, split_batch(first, torch.device("cpu"), "train_loader")[0][:2])
    p0 = _resolve_init(init, model, point_a, point_b, spec, align_loader)
    b0 = apply_permutation(point_b, spec.restrict(point_b), p0)
    gradient_batches = opts.gradient_batches
    if gradient_batches is None:
        try:
            gradient_batches = max(1, len(train_loader) // 10)  # type: ignore[arg-type]
        except TypeError:
            gradient_batches = 8
    problem = CurvePermutationProblem(
        model, point_a, b0, spec, train_loader, weight_decay=weight_decay, loss_fn=loss_fn,
        heldout_loader=heldout_loader, value_batches=opts.value_batches, value_ts=opts.value_ts,
        gradient_batches=gradient_batches, generator=gen,
    )  # fmt: skip
    wa = problem.wa
    x_path = None if checkpoint is None else Path(checkpoint).with_name(Path(checkpoint).name + ".xstep")
    curve_history: list[dict[str, Any]] = []
    solver: PAM
    saved: EpochCheckpoint

    def save() -> None:
        # the loader may be mid-epoch (the P-step reads a few batches): its generator is what a resume needs
        saved.save({"curve_history": curve_history}, at_epoch_end=False)

    def x_step(x: list[torch.Tensor], perms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        k = solver.n_iter + 1
        save()  # the P-step is done: a resume goes straight to this x-step
        pb = apply_permutation(problem.wb, problem.spec, perms)
        theta = problem.control_point(x, perms)
        start = Bezier([wa, theta, pb], trainable=(False, True, False))

        def on_epoch(record: dict[str, Any]) -> None:
            rec = {"stage": "x-epoch", "iteration": k, **record}
            curve_history.append(rec)
            if callback is not None:
                callback(rec)

        fitted = fit_curve(
            model, wa, pb, train_loader, curve=start, epochs=opts.x_epochs, optimizer=optimizer,
            lr_lambda=lr_lambda, weight_decay=weight_decay, proximal=opts.mu, loss_fn=loss_fn,
            generator=stable_seed(base_seed, "x-step", k), callback=on_epoch, checkpoint=x_path,
            max_batches=max_batches,
        )  # fmt: skip
        if x_path is not None:
            x_path.unlink(missing_ok=True)
        return [problem.offset(fitted.curve.points[1], perms)]

    if curve is None:
        x0 = [torch.zeros(sum(problem.numels), dtype=problem.dtype, device=problem.device)]
    else:
        x0 = [problem.start_offset(curve)]
    search = (_swap_search(problem, opts.swap_trials, opts.swap_alpha, gen, opts.swap_min_improvement)
              if opts.swap_trials else None)  # fmt: skip
    solver = PAM(problem, x0, method=opts.step, lam=opts.lam, generator=gen, x_step=x_step, local_search=search)
    saved = EpochCheckpoint(checkpoint, "fit_curve_pam", config={"sizes": dict(spec.sizes), "initial permutation": p0},
                            objects={"pam": solver}, loader=train_loader)  # fmt: skip
    resumed = saved.restore()
    if resumed is not None:
        curve_history.extend(resumed["curve_history"])
        logger.info("resuming PAM from %s after %d iterations", checkpoint, solver.n_iter)

    def on_iteration(st: PAMState) -> bool | None:
        save()
        if callback is not None:
            perms = compose_permutations(p0, {g: p.cpu() for g, p in st.perms.items()})
            pb = apply_permutation(problem.wb, problem.spec, st.perms)
            now = Bezier([wa, problem.control_point(st.x, st.perms), pb], trainable=(False, True, False))
            record = {"stage": "iteration", "iteration": st.n_iter, "fun": st.fun, "changed": st.changed,
                      "perms": perms, "curve": now}  # fmt: skip
            return callback(record)
        return None

    remaining = max(0, opts.max_iter - solver.n_iter)
    with warnings.catch_warnings():
        # the x-step is a fixed budget of epochs, so x never stops moving: judge convergence by P alone below
        warnings.simplefilter("ignore", ConvergenceWarning)
        result: PAMResult = solver.run(max_iter=remaining, tol=opts.tol, callback=on_iteration)
    status, message = result.status, result.message
    moved = sum(c[-1] for c in result.changed.values()) if result.n_iter else 0
    if status == Status.MAX_ITER and result.n_iter and moved == 0:
        status = Status.SUCCESS
        message = f"permutation stable: no unit was reassigned in outer iteration {result.n_iter}"
    elif status == Status.MAX_ITER:
        message = f"{moved} units were still reassigned in the last of {result.n_iter} outer iterations"
        warnings.warn(f"PAM on the curve: {message}; more iterations (`max_iter`) may move P further",
                      ConvergenceWarning, stacklevel=2)  # fmt: skip
    final = compose_permutations(p0, {g: p.cpu() for g, p in result.perms.items()})
    pb = apply_permutation(problem.wb, problem.spec, result.perms)
    theta = problem.control_point(result.x, result.perms)
    curve = Bezier([wa, theta, pb], trainable=(False, True, False))
    return CurvePAMResult(
        perms=final,
        init_perms=p0,
        curve=curve,
        spec=spec,
        fun=result.fun,
        history=result.history,
        changed=result.changed,
        curve_history=curve_history,
        backtracks=list(solver.backtracks),
        n_iter=result.n_iter,
        converged=status == 0,
        status=status,
        message=message,
    )


# keywords of fit_curve_pam before neuralign 0.2 -> their names now
_RENAMED = {"value_loader": "heldout_loader", "max_batches_per_epoch": "max_batches"}
_RENAMED_OPTIONS = {"local_search": "swap_trials", "local_search_alpha": "swap_alpha",
                    "local_search_min_improvement": "swap_min_improvement"}  # fmt: skip
# P-step keywords of fit_curve_pam before neuralign 0.2 (now fields of CurvePAMOptions.step)
_STEP_KEYWORDS = ("method", "backtrack", "max_backtracks", "max_moved", "p_steps", "birkhoff_steps", "birkhoff_lr",
                  "birkhoff_samples", "birkhoff_prox")  # fmt: skip


def _curve_pam_options(options: CurvePAMOptions | None, overrides: dict[str, Any]) -> CurvePAMOptions:
    """``options`` with the keyword overrides of :func:`fit_curve_pam` (the P-step keywords of before 0.2 folded
    into ``step`` with a DeprecationWarning). Removes what it uses from ``overrides``."""
    legacy = {k: overrides.pop(k) for k in _STEP_KEYWORDS if k in overrides}
    overrides.update(renamed_keywords({k: overrides.pop(k) for k in _RENAMED_OPTIONS if k in overrides},
                                      _RENAMED_OPTIONS, where="fit_curve_pam"))  # fmt: skip
    own = {k: overrides.pop(k) for k in list(overrides) if k not in _RENAMED}
    opts = resolve_options(CurvePAMOptions, options, own, where="fit_curve_pam")
    if legacy:
        method = legacy.pop("method", None)
        if method is not None:
            warnings.warn("fit_curve_pam(): `method` is deprecated since neuralign 0.2; use `step`",
                          DeprecationWarning, stacklevel=3)  # fmt: skip
        base = opts.step if method is None else CurvePAMOptions().replace(step=method).step
        opts = opts.replace(step=p_step(base, **legacy) if legacy else base)
    return opts


def _swap_search(problem: CurvePermutationProblem, trials: int, alpha: float, generator: torch.Generator,
                 min_improvement: float = 0.0):
    """A local search on the P-step: per group, ``trials`` random transpositions scored on the value batches; the
    best one that lowers the objective significantly (Bonferroni over the trials) by more than ``min_improvement``
    of it is applied."""

    def search(x: list[torch.Tensor], perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        current = {g: p.clone() for g, p in perms.items()}

        def mats(ps):
            return {g: perm_to_matrix(p, dtype=problem.dtype, device=problem.device) for g, p in ps.items()}

        base = problem.batch_values(x, mats(current))
        for g, p in list(current.items()):
            n = p.numel()
            if n < 2:
                continue
            pairs = torch.randint(0, n, (trials, 2), generator=generator)
            pairs = [(int(i), int(j)) for i, j in pairs if i != j]
            z = bonferroni_quantile(alpha, len(pairs), len(base))
            best = None
            for i, j in pairs:
                cand = p.clone()
                cand[i], cand[j] = p[j], p[i]
                vals = problem.batch_values(x, mats({**current, g: cand}))
                mean, se = paired_change(vals, base)
                if mean + z * se < -min_improvement * abs(float(base.mean())) and (best is None or mean < best[0]):
                    best = (mean, cand, vals)
            if best is not None:
                current[g], base = best[1], best[2]
        return current

    return search
