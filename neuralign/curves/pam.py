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
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralign._epochs import EpochCheckpoint
from neuralign._options import Options, nested, renamed_keywords, resolve_options
from neuralign._stats import bonferroni_quantile, paired_change
from neuralign._utils import as_generator, split_batch, stable_seed
from neuralign._validate import check_int, check_real
from neuralign.alignment import (
    PermutationSpec,
    align,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.alignment.heads import head_blocks
from neuralign.curves.families import Bezier
from neuralign.curves.fit import fit_curve
from neuralign.curves.problem import CurvePermutationProblem
from neuralign.errors import ConvergenceWarning
from neuralign.optim import (
    PAM,
    BirkhoffStep,
    LinearizedStep,
    PAMResult,
    PAMState,
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
        family-wise level ``swap_alpha``); with attention heads, per block of groups sharing a head permutation,
        this many random exchanges of two whole heads or of two units inside one head (moves that keep heads whole).
        Linearised steps cannot see improvements that lie behind a barrier of the relaxation (averaging two units'
        weights is worse than either), which swaps reach directly. 0 (default): off.
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
    swap_proposals: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    **option_overrides: Any,
) -> CurvePAMResult:
    """Fit a quadratic Bezier curve jointly with the permutation of end point B by PAM.

    Solves :math:`\\min_{\\theta_{\\text{off}}, P} F(\\theta_{\\text{off}}, P)` of the module docstring by proximal
    alternating minimisation. Each outer iteration is

    1. a P-step: with :math:`G = \\nabla_P F(\\theta_{\\text{off}}, P_k)` estimated on ``gradient_batches``
       training batches, :math:`P_{k+1} = \\arg\\min_P \\langle G, P\\rangle + \\frac{1}{2\\lambda}\\|P - P_k\\|^2`
       (one linear assignment per group, or with attention heads the structured assignment that keeps heads whole,
       :meth:`CurvePermutationProblem.assign`; ``method="birkhoff"`` gives the official code's relaxed steps with
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
    swap_proposals : dict str -> sequence of (int, int), optional
        Transpositions the swap local search (``swap_trials``) tries first in a group, in order, before random
        ones fill its trials: positions ``(i, j)`` of the group's permutation relative to ``init`` (the units of
        A whose partners in B exchange), e.g. the transpositions the verification's neighbourhood check ranks
        best. Groups without head permutations only.
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
    proposals = _check_proposals(swap_proposals, problem.spec)
    if any(proposals.values()) and not opts.swap_trials:
        warnings.warn("`swap_proposals` are not tried: the swap local search is off (swap_trials=0)", stacklevel=2)
    search = (_swap_search(problem, opts.swap_trials, opts.swap_alpha, gen, opts.swap_min_improvement, proposals)
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


def _check_proposals(proposals: Mapping[str, Sequence[tuple[int, int]]] | None, spec: PermutationSpec
                     ) -> dict[str, list[tuple[int, int]]]:  # fmt: skip
    """``swap_proposals`` validated: groups of ``spec`` without head permutations, pairs of distinct positions."""
    out: dict[str, list[tuple[int, int]]] = {}
    if proposals is None:
        return out
    if not isinstance(proposals, Mapping):
        raise TypeError(f"`swap_proposals` must be a dict of group -> (i, j) pairs, got {type(proposals).__name__}")
    blocked = {g for members in head_blocks(spec).values() for g in members}
    for g, pairs in proposals.items():
        if g not in spec.sizes or g in blocked:
            raise ValueError(f"`swap_proposals` names {g!r}, which is not a group of the spec without head "
                             "permutations")  # fmt: skip
        n = spec.sizes[g]
        out[g] = []
        for pair in pairs:
            try:  # ints, NumPy integers, integer tensors of one element; not bools, floats or strings
                i, j = (operator.index(u) for u in pair if not isinstance(u, (bool, np.bool_)))
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"`swap_proposals[{g!r}]` holds {pair!r}: a transposition is a pair of integer "
                                 "positions (i, j)") from None  # fmt: skip
            if not (0 <= i < n and 0 <= j < n and i != j):
                raise ValueError(f"`swap_proposals[{g!r}]` holds {tuple(pair)}: a transposition needs two distinct "
                                 f"positions in [0, {n})")  # fmt: skip
            out[g].append((i, j))
    return out


def _swap_search(problem: CurvePermutationProblem, trials: int, alpha: float, generator: torch.Generator,
                 min_improvement: float = 0.0, proposals: Mapping[str, Sequence[tuple[int, int]]] | None = None):
    """A local search on the P-step: per coordinate, ``trials`` random moves scored on the value batches; the best
    one that lowers the objective significantly (Bonferroni over the trials) by more than ``min_improvement`` of it
    is applied. A coordinate is a group (a move: a transposition of two units), or with attention heads the groups
    sharing one head permutation (:func:`~neuralign.alignment.heads.head_blocks`; a move: the exchange of two whole
    head blocks in all of them, or a transposition of two units inside one head block in the groups sharing that
    inside permutation, or under grouped-query attention the exchange of two query heads inside one block in the
    groups sharing that order, ``Heads.within``), so every move keeps heads whole. A group's ``proposals``
    (position pairs) are tried first, random transpositions fill the rest of its ``trials``."""
    spec = problem.spec
    blocks = head_blocks(spec)
    in_block = {g: head for head, members in blocks.items() for g in members}

    def moves(current: dict[str, torch.Tensor], coordinate: str | tuple) -> list[dict[str, torch.Tensor]]:
        if not isinstance(coordinate, tuple):  # a plain group: transpositions
            p = current[coordinate]
            n = p.numel()
            if n < 2:
                return []
            out = []
            first = list((proposals or {}).get(coordinate, ()))[:trials]
            drawn = torch.randint(0, n, (trials - len(first), 2), generator=generator).tolist()
            for i, j in first + drawn:
                if i != j:
                    cand = p.clone()
                    cand[i], cand[j] = p[j], p[i]
                    out.append({coordinate: cand})
            return out
        head, members = coordinate
        flat = [g for g in members if g in spec.heads]
        n_blocks = spec.heads[flat[0]].blocks
        kinds: list = [None] if head is not None and n_blocks > 1 else []  # None: exchange two head blocks
        kinds += sorted({spec.heads[g].inner for g in flat if spec.heads[g].inner is not None
                         and spec.heads[g].size > 1})  # fmt: skip
        # ("within", key): exchange two query heads inside one block (grouped-query attention)
        kinds += [("within", key) for key in sorted({spec.heads[g].within for g in flat
                                                     if spec.heads[g].within is not None and spec.heads[g].tie > 1})]
        out = []
        for _ in range(trials if kinds else 0):
            kind = kinds[int(torch.randint(0, len(kinds), (), generator=generator))]
            cand = {g: current[g].clone() for g in members}
            if kind is None:
                p, q = torch.randperm(n_blocks, generator=generator)[:2].tolist()
                for g in members:
                    w = 1 if g not in spec.heads else spec.heads[g].tie * spec.heads[g].size
                    cand[g][p * w : (p + 1) * w] = current[g][q * w : (q + 1) * w]
                    cand[g][q * w : (q + 1) * w] = current[g][p * w : (p + 1) * w]
            elif isinstance(kind, tuple):
                tie = next(spec.heads[g].tie for g in flat if spec.heads[g].within == kind[1])
                block = int(torch.randint(0, n_blocks, (), generator=generator))
                r, t = torch.randperm(tie, generator=generator)[:2].tolist()
                for g in flat:
                    h = spec.heads[g]
                    if h.within == kind[1]:
                        a, b = (block * h.tie + r) * h.size, (block * h.tie + t) * h.size
                        cand[g][a : a + h.size] = current[g][b : b + h.size]
                        cand[g][b : b + h.size] = current[g][a : a + h.size]
            else:
                size = next(spec.heads[g].size for g in flat if spec.heads[g].inner == kind)
                block = int(torch.randint(0, n_blocks, (), generator=generator))
                j, k = torch.randperm(size, generator=generator)[:2].tolist()
                for g in flat:
                    h = spec.heads[g]
                    if h.inner == kind:
                        for r in range(h.tie):
                            base = (block * h.tie + r) * h.size
                            cand[g][base + j], cand[g][base + k] = current[g][base + k], current[g][base + j]
            out.append(cand)
        return out

    def search(x: list[torch.Tensor], perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        current = {g: p.clone() for g, p in perms.items()}

        def mats(ps):
            return {g: perm_to_matrix(p, dtype=problem.dtype, device=problem.device) for g, p in ps.items()}

        base = problem.batch_values(x, mats(current))
        coordinates = list(dict.fromkeys((in_block[g], blocks[in_block[g]]) if g in in_block else g for g in current))
        for coordinate in coordinates:
            candidates = moves(current, coordinate)
            z = bonferroni_quantile(alpha, len(candidates), len(base)) if candidates else 0.0
            best = None
            for cand, vals in zip(candidates, problem.move_values(x, current, candidates)):
                mean, se = paired_change(vals, base)
                if mean + z * se < -min_improvement * abs(float(base.mean())) and (best is None or mean < best[0]):
                    best = (mean, cand, vals)
            if best is not None:
                current.update(best[1])
                base = best[2]
        return current

    return search
