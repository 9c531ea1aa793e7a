r"""Proximal Alternating Minimization (PAM) over continuous variables and products of permutations.

The problem is

.. math::

    \min_{x,\ P} \; F(x, P) + \delta_\Pi(P), \qquad P = (P_g)_{g \in \mathcal G},\quad P_g \in \Pi_{n_g},

where :math:`x = (x_1, \dots, x_m)` is a list of real tensors, :math:`\Pi_{n}` the :math:`n \times n` permutation
matrices, :math:`\delta_\Pi` the indicator of their product (0 on it, :math:`+\infty` elsewhere), and some groups may
be *tied* (forced to share one permutation). PAM (Attouch, Bolte, Redont, Soubeyran 2010) alternates two proximal
steps, the permutation first:

.. math::

    P_{k+1} &\in \arg\min_{P \in \Pi} F(x_k, P) + \tfrac{1}{2\lambda} \|P - P_k\|_F^2, \\
    x_{k+1} &\in \arg\min_{x} F(x, P_{k+1}) + \tfrac{1}{2\mu} \|x - x_k\|^2 .

Three P-steps are offered (``method=``):

``"linearized"`` (default; the PALM step of Bolte, Sabach, Teboulle 2014)
    :math:`F(x_k, \cdot)` is replaced by its linearisation at :math:`P_k` with :math:`G_k = \nabla_P F(x_k, P_k)`.
    On permutation matrices :math:`\|P - P_k\|_F^2 = 2n - 2\langle P, P_k\rangle`, so the step is one linear
    assignment per free group with cost :math:`G_k - P_k / \lambda`. A tied set is one free variable: its
    gradient is the sum of its members' partial gradients and its proximal term is counted once.
``"exact"``
    For problems linear in :math:`P` given :math:`x`, :math:`F(x, P) = \langle C(x), P\rangle + c(x)`: the exact
    proximal step, one linear assignment with cost :math:`C(x_k) - P_k/\lambda`.
``"birkhoff"`` (the scheme of Tatro et al.'s code)
    Relax :math:`P` to the Birkhoff polytope, take ``birkhoff_steps`` projected gradient steps on
    :math:`F(x_k, P) + \frac{1}{2\nu}\|P - P_k\|_F^2`, then round: the candidates are the nearest permutation of the
    relaxed matrices, :math:`P_k` itself and ``birkhoff_samples`` Birkhoff–von Neumann draws; the one with the lowest
    monitored objective wins (ties keep :math:`P_k`).

Every assignment of these steps is :meth:`PermutationProblem.assign`: one linear assignment per free group by
default, or the problem's own minimiser over a smaller feasible set of permutations (e.g. attention heads that move
whole, supplied by the curve problem of :mod:`neuralign.curves`), so that every iterate stays feasible.

The x-step runs ``x_steps`` steps of a torch optimizer (default plain SGD) on the proximal objective
:math:`\Phi_k(x) = F(x, P_{k+1}) + \frac{1}{2\mu}\|x - x_k\|^2`.

Sufficient decrease (what the tests check)
------------------------------------------
* ``"linearized"``: if :math:`\nabla_P F(x_k, \cdot)` is :math:`L_P`-Lipschitz on the Birkhoff polytope, the
  descent lemma and the optimality of :math:`P_{k+1}` give

  .. math:: F(x_k, P_{k+1}) \le F(x_k, P_k) - \big(\tfrac{1}{2\lambda} - \tfrac{L_P}{2}\big)\|P_{k+1} - P_k\|_F^2,

  a decrease whenever :math:`\lambda < 1/L_P`.
* ``"exact"``: :math:`F(x_k, P_{k+1}) + \frac{1}{2\lambda}\|P_{k+1} - P_k\|_F^2 \le F(x_k, P_k)` for every
  :math:`\lambda > 0`.
* ``"birkhoff"``: the rounding keeps :math:`P_k` unless a candidate is strictly better, so the monitored objective
  never increases in the P-step (for a deterministic ``value``).
* x-step: gradient steps of size :math:`\eta \le 1/(L_x + 1/\mu)` on :math:`\Phi_k` (with :math:`L_x` the
  Lipschitz constant of :math:`\nabla_x F(\cdot, P_{k+1})`) do not increase :math:`\Phi_k`, hence
  :math:`F(x_{k+1}, P_{k+1}) + \frac{1}{2\mu}\|x_{k+1} - x_k\|^2 \le F(x_k, P_{k+1})`.

Together, :math:`F(x_k, P_k)` is nonincreasing. Stochastic losses (mini-batches) give these guarantees only in
expectation at best. Attouch et al. prove convergence of bounded PAM sequences to a critical point for
Kurdyka–Łojasiewicz functions with exact proximal steps; the discrete constraint makes "critical point" mean a
point that no further proximal step moves (a local optimum in the assignment sense), not a global optimum.

Why one module: the solver class, its three P-steps, backtracking and resumable state are one algorithm
whose parts read each other's state.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from neuralign._options import Options
from neuralign._utils import as_generator
from neuralign._validate import check_bool, check_int, check_real
from neuralign.errors import ConvergenceWarning, NonFiniteError
from neuralign.optim.assignment import solve_assignment
from neuralign.optim.birkhoff import (
    birkhoff_decomposition,
    is_permutation,
    perm_to_matrix,
    project_doubly_stochastic,
    sample_permutations,
)
from neuralign.status import Status

__all__ = [
    "BirkhoffStep",
    "ExactStep",
    "LinearizedStep",
    "PStep",
    "PermutationProblem",
    "FunctionProblem",
    "PAM",
    "PAMResult",
    "PAMState",
    "pam",
    "resolve_ties",
    "PAM_METHODS",
    "DEFAULT_X_LR",
    "p_step",
]

logger = logging.getLogger(__name__)

#: Learning rate of the default x optimizer (plain SGD, no momentum).
DEFAULT_X_LR = 1e-2



@dataclass(frozen=True)
class LinearizedStep(Options):
    r"""The linearised P-step of :class:`PAM` (the PALM step of Bolte, Sabach, Teboulle 2014).

    :math:`P_{k+1} = \arg\min_{P \in \Pi} \langle G_k, P\rangle + \frac{1}{2\lambda}\|P - P_k\|_F^2` with
    :math:`G_k = \nabla_P F(x_k, P_k)`: one linear assignment per free group with cost :math:`G_k - P_k/\lambda`.

    Attributes
    ----------
    backtrack : bool
        When the step would increase :math:`F(x_k, \cdot)` (the problem's ``value``), halve :math:`\lambda` and
        solve again, up to ``max_backtracks`` times (the step with :math:`P_{k+1} = P_k` always qualifies): PALM
        with a backtracked step for an unknown :math:`L_P`; the monitored objective then never increases in the
        P-step. ``lam`` itself is not changed between iterations. Default False.
    max_backtracks : int
        Halvings per P-step with ``backtrack`` (>= 0; default 30).
    max_moved : float, optional
        The fraction in (0, 1] of each group's units that one step may reassign (at least 2; when every move of
        the step family is larger, its smallest move is taken). The step's :math:`\lambda` is then chosen per
        group, by bisection on :math:`\log\lambda`, as the largest value up to ``lam`` whose assignment moves no
        more units (block-wise step sizes, as PALM allows). Linearising is only accurate near :math:`P_k`. The
        bisection counts the moves of each group's unconstrained assignment; the step taken at the chosen
        :math:`\lambda` is the problem's (:meth:`PermutationProblem.assign`), so on a structured problem the bound
        is approximate. Default None: unbounded.
    p_steps : int
        Linearised steps per P-step (>= 1), each at a fresh gradient and each backtracked, with :math:`x` fixed;
        stops early when a step moves nothing. Default 1.

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong kind or out of its range (names it).
    """

    method: ClassVar[str] = "linearized"
    backtrack: bool = False
    max_backtracks: int = 30
    max_moved: float | None = None
    p_steps: int = 1

    def __post_init__(self) -> None:
        self._check("backtrack", check_bool)
        self._check("max_backtracks", check_int, minimum=0)
        self._check("max_moved", check_real, low=0.0, high=1.0, low_open=True, allow_none=True)
        self._check("p_steps", check_int, minimum=1)


@dataclass(frozen=True)
class ExactStep(Options):
    r"""The exact proximal P-step of :class:`PAM`, for problems linear in :math:`P` given :math:`x`
    (:math:`F(x, P) = \langle C(x), P\rangle + c(x)`): one linear assignment with cost :math:`C(x_k) - P_k/\lambda`.
    It has no options."""

    method: ClassVar[str] = "exact"


@dataclass(frozen=True)
class BirkhoffStep(Options):
    r"""The relaxed P-step of :class:`PAM` (the scheme of Tatro et al.'s code): projected gradient steps on the
    Birkhoff polytope, then rounding to a permutation.

    ``steps`` steps of size :math:`\eta` on :math:`F(x_k, P) + \frac{1}{2\nu}\|P - P_k\|_F^2`, each followed by
    the projection onto the doubly stochastic matrices; the candidates of the rounding are the nearest permutation
    of the relaxed matrices, :math:`P_k` itself and ``samples`` Birkhoff–von Neumann draws; the one with the lowest
    monitored objective wins (ties keep :math:`P_k`).

    Attributes
    ----------
    steps : int
        Projected gradient steps per P-step (>= 1; default 20).
    lr : float, optional
        Their step size :math:`\eta > 0` (default: PAM's ``lam``).
    samples : int
        Birkhoff–von Neumann draws among the rounding candidates (>= 0; default 32).
    prox : float, optional
        :math:`\nu > 0` of the relaxed proximal term (``math.inf``: none; default: PAM's ``lam``). Tatro et al. use
        :math:`\eta = 0.05, \nu = 1000`.

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong kind or out of its range (names it).
    """

    method: ClassVar[str] = "birkhoff"
    steps: int = 20
    lr: float | None = None
    samples: int = 32
    prox: float | None = None

    def __post_init__(self) -> None:
        self._check("steps", check_int, minimum=1)
        self._check("lr", check_real, low=0.0, low_open=True, allow_none=True)
        self._check("samples", check_int, minimum=0)
        self._check("prox", check_real, low=0.0, low_open=True, allow_none=True, allow_inf=True)


#: A P-step of :class:`PAM` and its options.
PStep = LinearizedStep | ExactStep | BirkhoffStep

#: The P-step methods of :class:`PAM` by name (the registry of ``method=``).
PAM_METHODS: dict[str, type] = {"linearized": LinearizedStep, "exact": ExactStep, "birkhoff": BirkhoffStep}

# the P-step options :class:`PAM` took as keywords before 0.2 -> (method, field of its step object)
_LEGACY_STEP_OPTIONS = {
    "backtrack": ("linearized", "backtrack"), "max_backtracks": ("linearized", "max_backtracks"),
    "max_moved": ("linearized", "max_moved"), "p_steps": ("linearized", "p_steps"),
    "birkhoff_steps": ("birkhoff", "steps"), "birkhoff_lr": ("birkhoff", "lr"),
    "birkhoff_samples": ("birkhoff", "samples"), "birkhoff_prox": ("birkhoff", "prox"),
}  # fmt: skip


def p_step(method: str | PStep, **legacy: Any) -> PStep:
    """The P-step object of ``method`` (a name of :data:`PAM_METHODS`, or a step object itself).

    ``legacy`` takes the keyword options of before 0.2 (``birkhoff_steps=``, ``max_moved=``, ...) with a
    :class:`DeprecationWarning`, folded into the step object.

    Raises
    ------
    ValueError
        For an unknown method, or a legacy option of another method (names both).
    TypeError
        For an unknown keyword.
    """
    if isinstance(method, (LinearizedStep, ExactStep, BirkhoffStep)):
        step = method
    elif isinstance(method, str) and method in PAM_METHODS:
        step = PAM_METHODS[method]()
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(PAM_METHODS)} or a step object")
    if not legacy:
        return step
    unknown = sorted(k for k in legacy if k not in _LEGACY_STEP_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    changes = {}
    for name, value in legacy.items():
        owner, field_name = _LEGACY_STEP_OPTIONS[name]
        if owner != step.method:
            raise ValueError(f"`{name}` applies to method {owner!r}, not {step.method!r}")
        changes[field_name] = value
    warnings.warn(f"the P-step keywords {sorted(legacy)} are deprecated since neuralign 0.2: pass "
                  f"method={type(step).__name__}({', '.join(f'{k}=...' for k in changes)})", DeprecationWarning,
                  stacklevel=3)  # fmt: skip
    return step.replace(**changes)


def resolve_ties(sizes: Mapping[str, int], ties: Mapping[str, str] | None) -> dict[str, str]:
    """Map every group to the representative of its tied set (following chains ``c -> b -> a``).

    Parameters
    ----------
    sizes : Mapping[str, int]
        Group -> permutation size.
    ties : Mapping[str, str] or None
        Group -> the group whose permutation it shares.

    Returns
    -------
    dict[str, str]
        Group -> representative, for every group of ``sizes`` (in its order).

    Raises
    ------
    ValueError
        If a tie names an unknown group, forms a cycle, or joins groups of different sizes.

    Examples
    --------
    >>> resolve_ties({"a": 3, "b": 3, "c": 3, "d": 2}, {"c": "b", "b": "a"})
    {'a': 'a', 'b': 'a', 'c': 'a', 'd': 'd'}
    """
    ties = dict(ties or {})
    for g, r in ties.items():
        if g not in sizes:
            raise ValueError(f"`ties` names group `{g}`, which is not in `sizes`")
        if r not in sizes:
            raise ValueError(f"`ties` ties group `{g}` to `{r}`, which is not in `sizes`")
    reps: dict[str, str] = {}
    for g in sizes:
        seen = [g]
        r = g
        while r in ties and ties[r] != r:
            r = ties[r]
            if r in seen:
                raise ValueError(f"`ties` has a cycle: {' -> '.join(seen + [r])}")
            seen.append(r)
        if sizes[r] != sizes[g]:
            raise ValueError(
                f"tied groups `{g}` (size {sizes[g]}) and `{r}` (size {sizes[r]}) have different sizes"
            )
        reps[g] = r
    return reps


class PermutationProblem(ABC):
    r"""A problem :math:`\min_{x, P} F(x, P)` over real tensors :math:`x` and permutation matrices :math:`P`.

    Subclasses set ``sizes`` (and optionally ``ties``) and implement :meth:`loss`; the other methods have defaults.

    Attributes
    ----------
    sizes : Mapping[str, int]
        Group name -> :math:`n_g`; the group's permutation matrix is :math:`n_g \times n_g`.
    ties : Mapping[str, str]
        Group -> group whose permutation it shares (default: none). Tied groups receive the *same* tensor object in
        ``P`` and form one free variable.
    dtype : torch.dtype or None
        dtype of the dense matrices ``P`` handed to the problem (default: that of the first ``x`` tensor, else
        ``torch.get_default_dtype()``).

    Notes
    -----
    Dense matrices follow the package convention ``P[i, perm[i]] = 1`` (so ``P @ B == B[perm]``). During the
    ``"birkhoff"`` P-step the matrices are doubly stochastic rather than permutations, so :meth:`loss` and
    :meth:`gradient_p` must accept any real ``(n_g, n_g)`` matrix (e.g. apply ``P`` by matrix products).
    """

    sizes: Mapping[str, int]
    ties: Mapping[str, str] = MappingProxyType({})
    dtype: torch.dtype | None = None

    @abstractmethod
    def loss(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:math:`F(x, P)` as a scalar tensor, differentiable in ``x`` and in the dense matrices ``P``.

        May be stochastic (e.g. a fresh mini-batch per call). ``P`` maps every group (tied ones included) to an
        ``(n_g, n_g)`` tensor.
        """

    def value(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> float:
        """The monitored objective (history, convergence test, Birkhoff rounding); deterministic if possible.

        Default: :meth:`loss` under ``torch.no_grad()``.
        """
        with torch.no_grad():
            return float(self.loss(x, P).item())

    def gradient_p(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r""":math:`\nabla_P F(x, P)`: a dict group -> ``(n_g, n_g)`` tensor.

        Entries are summed over each tied set, so give either each member's partial derivative or only the
        representative's total (the default, autograd through the shared tensor, does the latter).
        """
        reps = resolve_ties(self.sizes, self.ties)
        leaves: dict[str, torch.Tensor] = {}
        for g in self.sizes:
            r = reps[g]
            if r not in leaves:
                leaves[r] = P[r].detach().clone().requires_grad_(True)
        full = {g: leaves[reps[g]] for g in self.sizes}
        with torch.enable_grad():
            out = self.loss([t.detach() for t in x], full)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return {r: torch.zeros_like(t) for r, t in leaves.items()}
        grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
        return {r: torch.zeros_like(leaves[r]) if gr is None else gr for r, gr in zip(leaves, grads)}

    def linear_cost(self, x: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        r"""For problems linear in :math:`P` given :math:`x`, :math:`F(x, P) = \sum_g \langle C_g(x), P_g\rangle
        + c(x)`: the dict group -> :math:`C_g(x)` (summed over tied sets like :meth:`gradient_p`).

        Optional; needed by ``method="exact"``.
        """
        raise TypeError(f"{type(self).__name__} does not define linear_cost (needed by method='exact')")

    def has_linear_cost(self) -> bool:
        """Whether :meth:`linear_cost` is implemented."""
        return type(self).linear_cost is not PermutationProblem.linear_cost

    def assign(self, costs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r"""The feasible permutations minimising :math:`\sum_g \langle C_g, P_g\rangle`: what every P-step solves.

        ``costs`` maps each free group (one per tied set, its representative) to an ``(n_g, n_g)`` float tensor;
        the result maps the same groups to int64 index tensors ``perm`` (``P[i, perm[i]] = 1``). Default: every
        permutation is feasible, one linear assignment per group (:func:`~neuralign.optim.solve_assignment`). A
        problem whose feasible set is smaller (e.g. blocks of units that move whole, with a permutation inside each)
        overrides it with the exact minimiser over its set; :class:`PAM` then keeps every iterate feasible (the
        Birkhoff rounding's candidates are mapped to their nearest feasible permutation by the same method).
        """
        return {g: solve_assignment(c, name=g).perm for g, c in costs.items()}

    def has_structure(self) -> bool:
        """Whether :meth:`assign` is overridden (the feasible set is smaller than all permutations)."""
        return type(self).assign is not PermutationProblem.assign


class FunctionProblem(PermutationProblem):
    """A :class:`PermutationProblem` built from plain callables.

    Parameters
    ----------
    sizes : Mapping[str, int]
        Group -> permutation size.
    loss : callable
        ``loss(x, P) -> scalar Tensor``.
    ties : Mapping[str, str], optional
        Group -> group it shares its permutation with.
    value : callable, optional
        ``value(x, P) -> float``; default ``loss`` under no_grad.
    gradient_p : callable, optional
        ``gradient_p(x, P) -> dict``; default autograd of ``loss``.
    linear_cost : callable, optional
        ``linear_cost(x) -> dict`` for problems linear in ``P``.
    dtype : torch.dtype, optional
        dtype of the dense ``P``.

    Examples
    --------
    >>> import torch
    >>> C = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> prob = FunctionProblem({"p": 2}, lambda x, P: (C * P["p"]).sum(), linear_cost=lambda x: {"p": C})
    >>> prob.value([], {"p": torch.eye(2)}), prob.has_linear_cost()
    (0.0, True)
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        loss: Callable[[Sequence[torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor],
        *,
        ties: Mapping[str, str] | None = None,
        value: Callable[..., float] | None = None,
        gradient_p: Callable[..., dict[str, torch.Tensor]] | None = None,
        linear_cost: Callable[..., dict[str, torch.Tensor]] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(sizes, Mapping) or not sizes:
            raise ValueError(f"`sizes` must be a non-empty mapping group -> int, got {sizes!r}")
        for name, fn in (("loss", loss), ("value", value), ("gradient_p", gradient_p), ("linear_cost", linear_cost)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
        self.sizes = dict(sizes)
        self.ties = dict(ties or {})
        resolve_ties(self.sizes, self.ties)
        self.dtype = dtype
        self._loss = loss
        self._value = value
        self._gradient_p = gradient_p
        self._linear_cost = linear_cost

    def loss(self, x, P):
        return self._loss(x, P)

    def value(self, x, P):
        if self._value is None:
            return super().value(x, P)
        return float(self._value(x, P))

    def gradient_p(self, x, P):
        if self._gradient_p is None:
            return super().gradient_p(x, P)
        return self._gradient_p(x, P)

    def linear_cost(self, x):
        if self._linear_cost is None:
            return super().linear_cost(x)
        return self._linear_cost(x)

    def has_linear_cost(self) -> bool:
        return self._linear_cost is not None


class _Record(dict):
    """A callback's record: a dict whose keys also read as attributes (``record.fun``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class PAMState:
    r"""What a ``callback`` sees after each outer iteration (copies; changing them does not affect the solver).

    Attributes
    ----------
    n_iter : int
        Iterations done so far.
    fun : float
        Monitored objective :math:`F(x_k, P_k)`.
    x : list[torch.Tensor]
        Current continuous variables.
    perms : dict[str, torch.Tensor]
        Current permutations (every group, int64).
    changed : dict[str, int]
        Number of changed assignments per group in this iteration.
    x_change : float
        :math:`\|x_k - x_{k-1}\|`.
    """

    n_iter: int
    fun: float
    x: list[torch.Tensor]
    perms: dict[str, torch.Tensor]
    changed: dict[str, int]
    x_change: float


@dataclass(frozen=True)
class PAMResult:
    """Result of :func:`pam` / :meth:`PAM.run`.

    Attributes
    ----------
    x : list[torch.Tensor]
        Final continuous variables (detached copies).
    perms : dict[str, torch.Tensor]
        Final permutation of every group (int64 index tensors; tied groups hold equal tensors).
    fun : float
        Final monitored objective.
    history : list[float]
        Monitored objective at the start and after every iteration (``len == n_iter + 1`` for a fresh solver).
    changed : dict[str, list[int]]
        Group -> number of changed assignments in each iteration.
    n_iter : int
        Iterations done (in total, for a resumed solver).
    converged : bool
        ``status == 0``.
    status : Status
        SUCCESS: converged (no assignment changed and objective and x moved by at most ``tol``); MAX_ITER:
        ``max_iter`` reached; CALLBACK: stopped by the callback.
    message : str
        Why it stopped.
    """

    x: list[torch.Tensor]
    perms: dict[str, torch.Tensor]
    fun: float
    history: list[float]
    changed: dict[str, list[int]]
    n_iter: int
    converged: bool
    status: Status
    message: str


def _default_x_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=DEFAULT_X_LR)


class PAM:
    r"""Proximal alternating minimisation over :math:`(x, P)`: a solver object with ``step`` / ``run`` and a
    checkpointable state (see the module documentation for the iteration and its guarantees).

    Parameters
    ----------
    problem : PermutationProblem
        Defines :math:`F`, the groups (``sizes``) and ``ties``.
    x0 : sequence of torch.Tensor
        Initial continuous variables (floating point; copied, never modified). May be empty (e.g. QAP).
    perms0 : Mapping[str, torch.Tensor], optional
        Initial permutations (index tensors). Missing groups start at the identity; a tied group may be omitted or
        must equal its representative. Default: identities.
    method : str or LinearizedStep or ExactStep or BirkhoffStep
        The P-step: a name of :data:`PAM_METHODS` (``"linearized"``, ``"exact"``, ``"birkhoff"``) for its default
        options, or a step object with its options (:class:`LinearizedStep`, :class:`ExactStep`,
        :class:`BirkhoffStep`).
    lam : float
        P proximal parameter :math:`\lambda > 0` (``math.inf``: no proximal term). For ``"linearized"`` the step
        decreases :math:`F` when :math:`\lambda < 1/L_P`.
    mu : float
        x proximal parameter :math:`\mu > 0`; ``math.inf`` (default) drops the proximal term, so that one SGD step
        per iteration is the PALM x-step.
    x_optimizer : callable, optional
        ``params -> torch.optim.Optimizer``, built once (its state persists across iterations). Default: plain SGD
        with ``lr=DEFAULT_X_LR`` (1e-2). ``step`` is called with a closure, so L-BFGS works too.
    x_steps : int
        Optimizer steps per x-step (0: :math:`x` is never updated).
    generator : torch.Generator or int or None
        Randomness of the ``"birkhoff"`` rounding. A stochastic problem that draws its mini-batches from this same
        generator is resumed exactly by :meth:`load_state_dict`.
    local_search : callable, optional
        ``local_search(x, perms) -> perms`` (dicts keyed by the free groups) applied after each P-step, e.g. a
        2-opt for QAP; it must not increase :math:`F(x, \cdot)` for the decrease guarantee to hold.
    x_step : callable, optional
        ``x_step(x, perms) -> new x``: a custom x-step replacing the ``x_steps`` optimizer steps (``x_optimizer``
        is then unused). It receives detached copies of the current ``x`` and the new permutations (every group)
        and is responsible for its own proximal term, e.g. curve fitting for several epochs with
        :math:`\frac{1}{2\mu}\|x - x_k\|^2` (see :func:`neuralign.curves.fit_curve_pam`).

    Raises
    ------
    ValueError
        For an unknown ``method``, a nonpositive ``lam`` or ``mu``, invalid ``perms0``, or ``method="exact"`` on
        a problem without ``linear_cost``.

    References
    ----------
    .. [1] H. Attouch, J. Bolte, P. Redont, A. Soubeyran, "Proximal alternating minimization and projection
       methods for nonconvex problems: an approach based on the Kurdyka–Łojasiewicz inequality", Math. Oper. Res.
       35(2), 2010, arXiv:0801.1780.
    .. [2] J. Bolte, S. Sabach, M. Teboulle, "Proximal alternating linearized minimization for nonconvex and
       nonsmooth problems", Math. Program. 146, 2014.
    .. [3] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.

    Examples
    --------
    >>> import torch
    >>> C = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 2.0, 0.0]])
    >>> prob = FunctionProblem({"p": 3}, lambda x, P: (C * P["p"]).sum(), linear_cost=lambda x: {"p": C})
    >>> solver = PAM(prob, [], method="exact", lam=10.0)
    >>> res = solver.run(max_iter=10)
    >>> res.perms["p"].tolist(), res.fun, res.converged
    ([1, 0, 2], 2.0, True)
    """

    def __init__(
        self,
        problem: PermutationProblem,
        x0: Sequence[torch.Tensor] = (),
        perms0: Mapping[str, torch.Tensor] | None = None,
        *,
        method: str | PStep = "linearized",
        lam: float = 1.0,
        mu: float = math.inf,
        x_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        x_steps: int = 1,
        generator: torch.Generator | int | None = None,
        local_search: Callable[[list[torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]
        | None = None,
        x_step: Callable[[list[torch.Tensor], dict[str, torch.Tensor]], Sequence[torch.Tensor]] | None = None,
        **legacy_step_options: Any,
    ) -> None:
        if not isinstance(problem, PermutationProblem):
            raise TypeError(f"`problem` must be a PermutationProblem, got {type(problem).__name__}")
        self.step_options = p_step(method, **legacy_step_options)
        self.method = self.step_options.method
        if self.method == "exact" and not problem.has_linear_cost():
            raise ValueError(
                f"method 'exact' needs a problem linear in P that defines linear_cost(x); "
                f"{type(problem).__name__} does not (use method='linearized')"
            )
        self.problem = problem
        self.lam = check_real(lam, "lam", low=0.0, low_open=True, allow_inf=True, hint="math.inf for no proximal term")
        self.mu = check_real(mu, "mu", low=0.0, low_open=True, allow_inf=True, hint="math.inf for no proximal term")
        self.x_steps = check_int(x_steps, "x_steps", minimum=0)
        if self.method == "birkhoff" and self.step_options.lr is None and math.isinf(self.lam):
            raise ValueError("method 'birkhoff' needs a finite step: set BirkhoffStep(lr=...) when `lam` is inf")
        if x_optimizer is not None and not callable(x_optimizer):
            raise TypeError(f"`x_optimizer` must be a callable params -> Optimizer, got {type(x_optimizer).__name__}")
        if local_search is not None and not callable(local_search):
            raise TypeError(f"`local_search` must be callable, got {type(local_search).__name__}")
        self.local_search = local_search
        if x_step is not None and not callable(x_step):
            raise TypeError(f"`x_step` must be callable, got {type(x_step).__name__}")
        self.custom_x_step = x_step
        self.backtracks: list[int] = []
        self._pending: dict[str, Any] | None = None
        self.generator = as_generator(generator)

        sizes = problem.sizes
        if not isinstance(sizes, Mapping) or not sizes:
            raise ValueError(f"`problem.sizes` must be a non-empty mapping group -> int, got {sizes!r}")
        for g, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"group `{g}`: size must be a positive int, got {n!r}")
        self._sizes = dict(sizes)
        self._reps = resolve_ties(self._sizes, problem.ties)
        self._free = list(dict.fromkeys(self._reps.values()))

        if isinstance(x0, torch.Tensor) or not isinstance(x0, Sequence):
            raise TypeError(f"`x0` must be a list of tensors, got {type(x0).__name__}")
        for i, t in enumerate(x0):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"`x0[{i}]` must be a floating-point tensor, got {kind}")
        self.x: list[torch.Tensor] = [t.detach().clone().requires_grad_(True) for t in x0]

        if problem.dtype is not None:
            self._dtype = problem.dtype
        elif self.x:
            self._dtype = self.x[0].dtype
        else:
            self._dtype = torch.get_default_dtype()
        first_perm = next(iter(perms0.values()), None) if isinstance(perms0, Mapping) and perms0 else None
        if self.x:
            self._device = self.x[0].device
        elif isinstance(first_perm, torch.Tensor):
            self._device = first_perm.device
        else:
            self._device = torch.device("cpu")
        self.perms = self._check_perms(perms0)

        self.optimizer: torch.optim.Optimizer | None = None
        if self.x and self.x_steps > 0 and x_step is None:
            factory = x_optimizer if x_optimizer is not None else _default_x_optimizer
            self.optimizer = factory(self.x)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"`x_optimizer` must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}"
                )
        self.n_iter = 0
        self.history: list[float] = [self._value(self.x, self.perms, where="at the start")]
        self.changed: dict[str, list[int]] = {g: [] for g in self._sizes}
        self._last_x_change = math.inf

    # ------------------------------------------------------------------ helpers
    def _check_perms(self, perms0: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if perms0 is None:
            perms0 = {}
        if not isinstance(perms0, Mapping):
            raise TypeError(f"`perms0` must be a mapping group -> index tensor, got {type(perms0).__name__}")
        for g in perms0:
            if g not in self._sizes:
                raise ValueError(f"`perms0` has group `{g}`, which the problem does not have")
        out: dict[str, torch.Tensor] = {}
        for g, n in self._sizes.items():
            if g not in perms0:
                continue
            p = perms0[g]
            if not isinstance(p, torch.Tensor) or not is_permutation(p) or p.numel() != n:
                shown = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"`perms0[{g!r}]` must be a permutation of 0..{n - 1}, got {shown}")
            r = self._reps[g]
            p = p.detach().to(device=self._device, dtype=torch.int64).clone()
            if r in out and not torch.equal(out[r], p):
                raise ValueError(f"`perms0` gives tied groups `{g}` and `{r}` different permutations")
            out.setdefault(r, p)
        for r in self._free:
            if r not in out:
                out[r] = torch.arange(self._sizes[r], device=self._device)
        return {r: out[r] for r in self._free}

    def _dense(self, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense matrices for every group, tied groups sharing one tensor object."""
        mats = {r: perm_to_matrix(perms[r], dtype=self._dtype, device=self._device) for r in self._free}
        return {g: mats[r] for g, r in self._reps.items()}

    def _full(self, mats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {g: mats[r] for g, r in self._reps.items()}

    def _all_groups(self, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {g: perms[r].clone() for g, r in self._reps.items()}

    def _value(self, x: Sequence[torch.Tensor], perms: Mapping[str, torch.Tensor], *, where: str) -> float:
        f = self.problem.value(x, self._dense(perms))
        if not isinstance(f, (int, float)) or not math.isfinite(f):
            raise NonFiniteError(f"objective F(x, P) is {f!r} {where}")
        return float(f)

    def _collect(self, raw: Any, what: str) -> dict[str, torch.Tensor]:
        """Validate a per-group dict of (n, n) tensors and sum it over tied sets (keyed by representatives)."""
        if not isinstance(raw, Mapping):
            raise TypeError(f"{what} must be a dict group -> tensor, got {type(raw).__name__}")
        out: dict[str, torch.Tensor] = {}
        for g, t in raw.items():
            if g not in self._sizes:
                raise ValueError(f"{what} has an entry for group `{g}`, which the problem does not have")
            n = self._sizes[g]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"group `{g}`: {what} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != (n, n):
                raise ValueError(
                    f"group `{g}`: {what} has shape {tuple(t.shape)} but the group's permutation matrix has "
                    f"shape {(n, n)}"
                )
            bad = int((~torch.isfinite(t)).sum().item())
            if bad:
                raise NonFiniteError(f"group `{g}`: {what} has {bad} non-finite entries")
            r = self._reps[g]
            t = t.detach()
            out[r] = t if r not in out else out[r] + t
        for r in self._free:
            if r not in out:
                raise ValueError(f"{what} has no entry for group `{r}` (nor for any group tied to it)")
        return out

    def _gradient(self, mats_full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raw = self.problem.gradient_p(self.x, mats_full)
        return self._collect(raw, "gradient dF/dP")

    def _assign(self, costs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.problem.assign({r: costs[r] for r in self._free})
        return {r: out[r].to(self._device) for r in self._free}

    # ------------------------------------------------------------------ P-steps
    def _p_step_linearized(self) -> dict[str, torch.Tensor]:
        current, halvings = dict(self.perms), 0
        for _ in range(self.step_options.p_steps):
            new, h = self._linearized_move(current)
            halvings += h
            if self._key(new) == self._key(current):
                break
            current = new
        self.backtracks.append(halvings)
        return current

    def _linearized_move(self, perms: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """One PALM step from ``perms`` (x fixed): per-group steps bounded by ``max_moved``, then backtracked."""
        mats = self._dense(perms)
        grad = self._gradient(mats)
        anchor = {r: mats[r].to(grad[r].dtype) for r in self._free}
        lams = {r: self.lam for r in self._free}
        if self.step_options.max_moved is not None:
            lams = {r: self._bounded_lam(grad[r], anchor[r], perms[r]) for r in self._free}

        def solve(lams: Mapping[str, float]) -> dict[str, torch.Tensor]:
            return self._assign({r: grad[r] - (1.0 / lams[r]) * anchor[r] for r in self._free})

        new, halvings = solve(lams), 0
        if self.step_options.backtrack:
            f0 = self._value(self.x, perms, where="before the P-step")
            while self._key(new) != self._key(perms) and halvings < self.step_options.max_backtracks:
                if self._value(self.x, new, where="for a backtracking trial") <= f0:
                    break
                lams, halvings = {r: v / 2.0 for r, v in lams.items()}, halvings + 1
                new = solve(lams)
            else:
                if self._key(new) != self._key(perms) and self._value(self.x, new, where="backtracking") > f0:
                    new = dict(perms)  # out of halvings: keep P_k, which never increases F
        return new, halvings

    def _bounded_lam(self, grad: torch.Tensor, anchor: torch.Tensor, perm: torch.Tensor) -> float:
        """The largest step up to ``lam`` whose assignment moves at most ``max_moved`` of the group's units."""
        n = perm.numel()
        limit = max(2, math.floor(self.step_options.max_moved * n))  # type: ignore[operator]

        def moved(lam: float) -> int:
            p = solve_assignment(grad - (1.0 / lam) * anchor).perm.to(perm.device)
            return int((p != perm).sum())

        if moved(self.lam) <= limit:
            return self.lam
        spread = float(grad.max() - grad.min())
        if spread == 0.0:
            return 1.0  # a constant gradient: any finite step keeps P_k, the unique minimiser of -<P_k, P>
        # Below 1 / spread no assignment beats P_k: a move of k units gains at most k * spread in <G, P> and
        # loses k / lam in the proximal term.
        lo, hi = math.log(0.5 / spread), math.log(self.lam) if math.isfinite(self.lam) else math.log(1e6 / spread)
        lo_moved = 0
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            k = moved(math.exp(mid))
            if k <= limit:
                lo, lo_moved = mid, k
            else:
                hi = mid
        # when the fewest units any step moves exceeds the limit (e.g. a 3-cycle for a limit of 2), take that step
        return math.exp(lo if lo_moved else hi)

    def _p_step_exact(self) -> dict[str, torch.Tensor]:
        mats = self._dense(self.perms)
        with torch.no_grad():
            raw = self.problem.linear_cost([t.detach() for t in self.x])
        cost = self._collect(raw, "linear cost C(x)")
        inv = 1.0 / self.lam
        return self._assign({r: cost[r] - inv * mats[r].to(cost[r].dtype) for r in self._free})

    def _p_step_birkhoff(self) -> dict[str, torch.Tensor]:
        options = self.step_options
        eta = options.lr if options.lr is not None else self.lam
        nu = options.prox if options.prox is not None else self.lam
        anchor = {r: perm_to_matrix(self.perms[r], dtype=self._dtype, device=self._device) for r in self._free}
        relaxed = {r: m.clone() for r, m in anchor.items()}
        pull = 0.0 if math.isinf(nu) else eta / nu
        for _ in range(options.steps):
            grad = self._gradient(self._full(relaxed))
            for r in self._free:
                q = relaxed[r] - eta * grad[r].to(self._dtype)
                if pull:
                    q = (q + pull * anchor[r]) / (1.0 + pull)
                relaxed[r] = project_doubly_stochastic(q)
        # Rounding: P_k first (so that ties keep it), then the nearest permutations, then BvN draws.
        best = dict(self.perms)
        best_value = self._value(self.x, best, where="for the previous permutation in the Birkhoff rounding")
        seen = {self._key(best)}
        candidates = [self._assign({r: -m for r, m in relaxed.items()})]  # the nearest (feasible) permutations
        if options.samples:
            draws = {}
            for r in self._free:
                dec = birkhoff_decomposition(relaxed[r])
                if dec.coefficients.numel():
                    draws[r] = sample_permutations(dec, options.samples, generator=self.generator)
                else:
                    draws[r] = candidates[0][r].expand(options.samples, -1)
            for s in range(options.samples):
                draw = {r: draws[r][s].to(self._device) for r in self._free}
                if self.problem.has_structure():  # the nearest feasible permutation to the draw
                    draw = self._assign({r: -perm_to_matrix(p, dtype=self._dtype) for r, p in draw.items()})
                candidates.append(draw)
        for cand in candidates:
            key = self._key(cand)
            if key in seen:
                continue
            seen.add(key)
            f = self._value(self.x, cand, where="for a candidate of the Birkhoff rounding")
            if f < best_value:  # always compared against the best so far
                best, best_value = cand, f
        return best

    @staticmethod
    def _key(perms: Mapping[str, torch.Tensor]) -> tuple:
        return tuple(tuple(p.tolist()) for p in perms.values())

    # ------------------------------------------------------------------ x-step
    def _x_step(self, x_prev: list[torch.Tensor]) -> None:
        assert self.optimizer is not None
        mats = self._dense(self.perms)
        coef = 0.0 if math.isinf(self.mu) else 1.0 / (2.0 * self.mu)

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            loss = self.problem.loss(self.x, mats)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"`problem.loss` must return a scalar tensor, got {type(loss).__name__}")
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NonFiniteError(f"objective F(x, P) is {loss.item()} in the x-step of iteration {self.n_iter}")
            if coef:
                loss = loss + coef * sum((xi - xp).square().sum() for xi, xp in zip(self.x, x_prev))
            loss.backward()
            for i, xi in enumerate(self.x):
                if xi.grad is not None:
                    bad = int((~torch.isfinite(xi.grad)).sum().item())
                    if bad:
                        raise NonFiniteError(f"x[{i}]: gradient dF/dx has {bad} non-finite entries")
            return loss

        for _ in range(self.x_steps):
            self.optimizer.step(closure)

    def _custom_x_step(self) -> None:
        new = self.custom_x_step([t.detach().clone() for t in self.x], self._all_groups(self.perms))
        if isinstance(new, torch.Tensor) or not isinstance(new, Sequence) or len(new) != len(self.x):
            raise TypeError(f"`x_step` must return a list of {len(self.x)} tensors, got {type(new).__name__}")
        with torch.no_grad():
            for i, (xi, ni) in enumerate(zip(self.x, new)):
                if not isinstance(ni, torch.Tensor) or ni.shape != xi.shape:
                    shown = tuple(ni.shape) if isinstance(ni, torch.Tensor) else type(ni).__name__
                    raise ValueError(f"`x_step` returned x[{i}] of shape {shown}, expected {tuple(xi.shape)}")
                bad = int((~torch.isfinite(ni)).sum().item())
                if bad:
                    raise NonFiniteError(f"x[{i}]: the x-step returned {bad} non-finite entries")
                xi.copy_(ni)

    # ------------------------------------------------------------------ public API
    def step(self) -> PAMState:
        """One outer iteration: the P-step, the optional local search, then the x-step (Attouch's order).

        Returns
        -------
        PAMState
            The state after the iteration (also appended to ``history`` / ``changed``).
        """
        if self._pending is None:
            x_prev = [t.detach().clone() for t in self.x]
            old = self.perms
            new = _P_STEPS[self.method](self)
            if self.local_search is not None:
                searched = self.local_search([t.detach() for t in self.x], dict(new))
                new = self._check_local_search(searched)
            self.perms = {r: new[r] for r in self._free}
            # a state saved from here on (e.g. by a long x-step) resumes with the x-step, not a new P-step
            self._pending = {"old": old, "x_prev": x_prev}
        old, x_prev = self._pending["old"], self._pending["x_prev"]
        if self.custom_x_step is not None and self.x:
            self._custom_x_step()
        elif self.optimizer is not None:
            self._x_step(x_prev)
        self._pending = None
        self.n_iter += 1
        f = self._value(self.x, self.perms, where=f"after iteration {self.n_iter}")
        self.history.append(f)
        changed = {g: int((self.perms[r] != old[r]).sum().item()) for g, r in self._reps.items()}
        for g, c in changed.items():
            self.changed[g].append(c)
        with torch.no_grad():
            dx = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(self.x, x_prev)))
            self._last_x_norm = math.sqrt(sum(float(b.square().sum()) for b in x_prev))
        self._last_x_change = dx
        logger.debug("PAM iteration %d: F=%.6g, changed=%s, |dx|=%.3g", self.n_iter, f, changed, dx)
        return PAMState(
            n_iter=self.n_iter,
            fun=f,
            x=[t.detach().clone() for t in self.x],
            perms=self._all_groups(self.perms),
            changed=changed,
            x_change=dx,
        )

    def _check_local_search(self, searched: Any) -> dict[str, torch.Tensor]:
        if not isinstance(searched, Mapping):
            raise TypeError(f"`local_search` must return a dict group -> perm, got {type(searched).__name__}")
        out = {}
        for r in self._free:
            p = searched.get(r)
            if not isinstance(p, torch.Tensor) or not is_permutation(p) or p.numel() != self._sizes[r]:
                raise ValueError(f"`local_search` returned no valid permutation for group `{r}`")
            out[r] = p.to(device=self._device, dtype=torch.int64)
        return out

    def _converged(self, tol: float) -> bool:
        if self.n_iter == 0:
            return False
        if any(self.changed[g][-1] for g in self._sizes):
            return False
        f_old, f_new = self.history[-2], self.history[-1]
        if abs(f_new - f_old) > tol * max(1.0, abs(f_old)):
            return False
        return self._last_x_change <= tol * max(1.0, getattr(self, "_last_x_norm", 0.0))

    def result(self, status: Status = Status.MAX_ITER, message: str = "") -> PAMResult:
        """The current iterate as a :class:`PAMResult` (``run`` fills ``status`` and ``message``)."""
        return PAMResult(
            x=[t.detach().clone() for t in self.x],
            perms=self._all_groups(self.perms),
            fun=self.history[-1],
            history=list(self.history),
            changed={g: list(c) for g, c in self.changed.items()},
            n_iter=self.n_iter,
            converged=status == 0,
            status=Status(status),
            message=message,
        )

    def run(
        self,
        *,
        max_iter: int = 100,
        tol: float = 1e-6,
        callback: Callable[[dict[str, Any]], bool | None] | None = None,
    ) -> PAMResult:
        r"""Iterate until convergence, ``max_iter`` iterations, or the callback asks to stop.

        Converged means: no assignment changed in the last iteration,
        :math:`|F_{k+1} - F_k| \le \mathrm{tol}\cdot\max(1, |F_k|)` and
        :math:`\|x_{k+1} - x_k\| \le \mathrm{tol}\cdot\max(1, \|x_k\|)`.

        Parameters
        ----------
        max_iter : int
            Maximum number of outer iterations in this call.
        tol : float
            Relative tolerance (nonnegative).
        callback : callable, optional
            ``callback(record)`` after every iteration, with the record ``{"stage": "iteration", "n_iter",
            "fun", "x", "perms", "changed", "x_change"}`` (the fields of :class:`PAMState`, also readable as
            attributes: ``record.fun``); returning ``True`` stops (``Status.CALLBACK``).

        Returns
        -------
        PAMResult
            ``Status.MAX_ITER`` (with a :class:`ConvergenceWarning`) when ``max_iter`` is reached first.
        """
        max_iter = check_int(max_iter, "max_iter", minimum=0)
        tol = check_real(tol, "tol", low=0.0)
        if callback is not None and not callable(callback):
            raise TypeError(f"`callback` must be callable, got {type(callback).__name__}")
        for _ in range(max_iter):
            state = self.step()
            record = _Record(stage="iteration", **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)})
            if callback is not None and callback(record):
                return self.result(Status.CALLBACK, f"stopped by the callback after iteration {self.n_iter}")
            if self._converged(tol):
                return self.result(Status.SUCCESS, f"converged after {self.n_iter} iterations: no assignment changed "
                                                   f"and the objective moved by at most tol={tol:g}")
        if max_iter == 0:
            return self.result(Status.MAX_ITER, "max_iter=0: no iteration was run")
        moved = sum(self.changed[g][-1] for g in self._sizes) if self.n_iter else 0
        message = (
            f"max_iter={max_iter} reached before tol={tol:g} was met ({moved} assignments changed in the last "
            f"iteration, objective {self.history[-1]:.6g})"
        )
        hint = "a smaller `lam` (stronger proximal pull on P), a smaller x step size, or a larger `max_iter`"
        warnings.warn(f"PAM: {message}; try {hint}", ConvergenceWarning, stacklevel=2)
        return self.result(Status.MAX_ITER, message)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: x, permutations, the optimizer's state, iteration count, history,
        changed counts and the generator's state (plain tensors and Python data, loadable with
        ``torch.load(weights_only=True)``)."""
        return {
            "kind": "pam",
            "method": self.method,
            "x": [t.detach().clone() for t in self.x],
            "perms": {r: p.clone() for r, p in self.perms.items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "n_iter": self.n_iter,
            "history": list(self.history),
            "changed": {g: list(c) for g, c in self.changed.items()},
            "generator": self.generator.get_state(),
            "last_x_change": self._last_x_change,
            "last_x_norm": getattr(self, "_last_x_norm", 0.0),
            "backtracks": list(self.backtracks),
            "pending": None
            if self._pending is None
            else {
                "old": {r: p.clone() for r, p in self._pending["old"].items()},
                "x_prev": [t.clone() for t in self._pending["x_prev"]],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the solver must be built with the same problem and options).

        Raises
        ------
        ValueError
            If the state is not a PAM state, was made with another method, or its x or permutations do not fit.
        """
        required = ("kind", "method", "x", "perms", "optimizer", "n_iter", "history", "changed", "generator")
        if not isinstance(state, Mapping) or state.get("kind") != "pam":
            raise ValueError("`state` is not a PAM state dict (its 'kind' is not 'pam')")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"`state` lacks the entries {missing}")
        if state["method"] != self.method:
            raise ValueError(f"`state` was made with method {state['method']!r}, this solver uses {self.method!r}")
        xs = state["x"]
        if len(xs) != len(self.x):
            raise ValueError(f"`state` holds {len(xs)} x tensors, this solver has {len(self.x)}")
        for i, (a, b) in enumerate(zip(self.x, xs)):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"`state` has x[{i}] of shape {tuple(b.shape)}, this solver has {tuple(a.shape)}")
        perms = self._check_perms(state["perms"])
        if set(state["perms"]) != set(self._free):
            raise ValueError(f"`state` has permutations for {sorted(state['perms'])}, expected {sorted(self._free)}")
        with torch.no_grad():
            for a, b in zip(self.x, xs):
                a.copy_(b)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.perms = perms
        self.n_iter = int(state["n_iter"])
        self.history = [float(f) for f in state["history"]]
        self.changed = {g: [int(c) for c in state["changed"].get(g, [])] for g in self._sizes}
        self.generator.set_state(state["generator"])
        self._last_x_change = float(state.get("last_x_change", math.inf))
        self._last_x_norm = float(state.get("last_x_norm", 0.0))
        self.backtracks = [int(b) for b in state.get("backtracks", [])]
        pending = state.get("pending")
        self._pending = (
            None
            if pending is None
            else {"old": self._check_perms(pending["old"]), "x_prev": [t.clone() for t in pending["x_prev"]]}
        )


_P_STEPS: dict[str, Callable[[PAM], dict[str, torch.Tensor]]] = {
    "linearized": PAM._p_step_linearized,
    "exact": PAM._p_step_exact,
    "birkhoff": PAM._p_step_birkhoff,
}


def pam(
    problem: PermutationProblem,
    x0: Sequence[torch.Tensor] = (),
    perms0: Mapping[str, torch.Tensor] | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    **options: Any,
) -> PAMResult:
    r"""Solve :math:`\min_{x, P} F(x, P) + \delta_\Pi(P)` by proximal alternating minimisation.

    Builds :class:`PAM` with ``options`` (``method``, ``lam``, ``mu``, ``x_optimizer``, ``x_steps``,
    ``generator``, ``local_search``, ``x_step``; see :class:`PAM`) and calls :meth:`PAM.run`.

    Parameters
    ----------
    problem : PermutationProblem
        The objective and its groups.
    x0 : sequence of torch.Tensor
        Initial continuous variables (not modified).
    perms0 : Mapping[str, torch.Tensor], optional
        Initial permutations (default identities).
    max_iter, tol, callback
        As in :meth:`PAM.run`.

    Returns
    -------
    PAMResult

    Examples
    --------
    Shuffled regression :math:`\min_{x, P}\|y - PAx\|^2`, linear in :math:`P` given :math:`x` since
    :math:`\|PAx\| = \|Ax\|`, so that ``method="exact"`` applies:

    >>> import torch
    >>> A = torch.tensor([[1.0], [2.0], [3.0]])
    >>> y = torch.tensor([6.0, 2.0, 4.0])  # = P* A x* with x* = 2, perm* = [2, 0, 1]
    >>> prob = FunctionProblem({"rows": 3}, lambda x, P: (y - P["rows"] @ A @ x[0]).square().sum(),
    ...                        linear_cost=lambda x: {"rows": -2 * torch.outer(y, A @ x[0])})
    >>> res = pam(prob, [torch.tensor([1.0])], method="exact", x_steps=30,
    ...           x_optimizer=lambda p: torch.optim.SGD(p, lr=0.03), max_iter=20, tol=1e-8)
    >>> res.perms["rows"].tolist(), round(res.x[0].item(), 4), res.converged
    ([2, 0, 1], 2.0, True)
    """
    solver = PAM(problem, x0, perms0, **options)
    return solver.run(max_iter=max_iter, tol=tol, callback=callback)
