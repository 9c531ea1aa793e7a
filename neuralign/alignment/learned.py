"""Learned permutations: the permutation of model B learned by gradient descent on the loss along the line to A.

Three methods of the field, on one :class:`~neuralign.alignment.PermutationSpec`, with one options object
(:class:`LearnedOptions`) and one result (:class:`LearnedResult`, which records the objective's history and the
cost: wall seconds, passes over the data, linear assignments solved):

- :func:`straight_through`: the straight-through estimator of Ainsworth et al. (2023, §3.3, Algorithm 2);
- :func:`sinkhorn_rebasin`: Sinkhorn re-basin (Peña et al. 2023), soft permutations by the Sinkhorn operator;
- :func:`learned_from_weight_matching`: latent scores started at weight matching, hard permutations in the forward
  pass with a straight-through gradient (Theus et al. 2025, the permutation-only variant).

Each minimises a loss of the network on the line between :math:`\\theta_A` and the permuted :math:`\\theta_B`,

.. math::

    \\min_{\\pi} \\; \\mathbb{E}_{\\lambda, (x, y)} \\,
    \\ell\\big(f\\big((1-\\lambda)\\,\\theta_A + \\lambda\\, \\pi(\\theta_B);\\, x\\big), y\\big),

with :math:`\\lambda = 1/2` (``loss="midpoint"``) or :math:`\\lambda \\sim U(a, b)` drawn per batch
(``loss="random"``), or (Sinkhorn re-basin only) the data-free distance
:math:`\\sum_\\ell \\|\\theta_{A,\\ell} - \\pi(\\theta_B)_\\ell\\|` (``"l1"``, ``"l2"`` squared). The network runs
with :func:`torch.func.functional_call` in train mode (batch norm normalises with the batch's statistics, as in
curve fitting); the models are never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from neuralign._distributed import check_same_batch, is_distributed, shard_batch, sum_gradients_, world_size
from neuralign._epochs import EpochCheckpoint
from neuralign._options import Options, resolve_options
from neuralign._utils import as_generator, check_compatible, classification_loss, split_batch, stable_seed
from neuralign._validate import check_choice, check_int, check_real
from neuralign.alignment.align import AlignmentResult, _ascent, _WeightProblem, align
from neuralign.alignment.heads import match_heads
from neuralign.alignment.permutation import (
    apply_permutation,
    apply_permutation_matrices,
    identity_permutation,
    permutation_distance,
    validate_permutation,
)
from neuralign.alignment.spec import PermutationSpec
from neuralign.alignment.trace import trace_spec
from neuralign.errors import NonFiniteError, SpecError
from neuralign.optim import perm_to_matrix, sinkhorn, solve_assignment
from neuralign.status import Status

__all__ = [
    "LEARNED_METHODS",
    "LearnedCost",
    "LearnedOptions",
    "LearnedResult",
    "learn_permutation",
    "learned_from_weight_matching",
    "sinkhorn_rebasin",
    "straight_through",
]

logger = logging.getLogger(__name__)

LOSSES = ("midpoint", "random", "l1", "l2")

# per method: its default loss, lambda range, learning rate and optimizer (the papers' settings, see each function)
_DEFAULTS = {
    "straight_through": {"loss": "midpoint", "lam_range": (0.0, 1.0), "lr": 1e-2, "optimizer": "sgd"},
    "sinkhorn": {"loss": "random", "lam_range": (0.0, 1.0), "lr": 0.1, "optimizer": "adam"},
    "learned": {"loss": "random", "lam_range": (0.4, 0.6), "lr": 1e-2, "optimizer": "adam"},
}


@dataclass(frozen=True)
class LearnedOptions(Options):
    """The options of the learned-permutation methods, defined and validated once.

    Attributes
    ----------
    epochs : int
        Passes over ``loader`` (>= 1); with a data-free loss (``"l1"``, ``"l2"``), gradient steps.
    loss : {"midpoint", "random", "l1", "l2"}, optional
        The objective (module docstring); default the method's own: ``"midpoint"`` for the straight-through
        estimator, ``"random"`` for the others. ``"l1"``/``"l2"`` only for :func:`sinkhorn_rebasin`.
    lam_range : (float, float), optional
        :math:`(a, b)`, :math:`0 \\le a \\le b \\le 1`, of :math:`\\lambda \\sim U(a, b)` for ``loss="random"``;
        default (0, 1), and (0.4, 0.6) for :func:`learned_from_weight_matching` (Theus et al. 2025, App. C.1.1).
    lr : float, optional
        Learning rate (> 0); default 1e-2 (straight-through, SGD; learned, Adam) and 0.1 (Sinkhorn, Adam).
    momentum : float
        Momentum of the straight-through estimator's SGD, in [0, 1) (default 0.9, Ainsworth et al.'s MLP setting).
    tau : float
        Sinkhorn temperature (> 0; default 1).
    sinkhorn_iter : int
        Sinkhorn sweeps per forward pass (>= 1; default 20).
    score_noise : float
        Standard deviation of the Gaussian noise added to the one-hot start of the Sinkhorn scores (>= 0; default
        0.1, Peña et al.'s :math:`I + 0.1\\,\\mathcal N(0, 1)`).
    projection_iter : int
        Sweeps of the weight-matching projection of the straight-through estimator (>= 1; default 100).
    max_batches : int, optional
        At most this many batches of ``loader`` per epoch (>= 1).

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong kind or out of its range (names it).
    """

    epochs: int = 1
    loss: str | None = None
    lam_range: tuple[float, float] | None = None
    lr: float | None = None
    momentum: float = 0.9
    tau: float = 1.0
    sinkhorn_iter: int = 20
    score_noise: float = 0.1
    projection_iter: int = 100
    max_batches: int | None = None

    def __post_init__(self) -> None:
        self._check("epochs", check_int, minimum=1)
        if self.loss is not None:
            check_choice(self.loss, "loss", LOSSES)
        if self.lam_range is not None:
            pair = self.lam_range
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"`lam_range` must be a pair (low, high), got {pair!r}")
            low, high = (check_real(v, "lam_range", low=0.0, high=1.0) for v in pair)
            if low > high:
                raise ValueError(f"`lam_range` must have low <= high, got {tuple(pair)!r}")
            object.__setattr__(self, "lam_range", (low, high))
        self._check("lr", check_real, low=0.0, low_open=True, allow_none=True)
        self._check("momentum", check_real, low=0.0, high=1.0, high_open=True)
        self._check("tau", check_real, low=0.0, low_open=True)
        self._check("sinkhorn_iter", check_int, minimum=1)
        self._check("score_noise", check_real, low=0.0)
        self._check("projection_iter", check_int, minimum=1)
        self._check("max_batches", check_int, minimum=1, allow_none=True)


@dataclass(frozen=True)
class LearnedCost:
    """What a learned permutation cost.

    Attributes
    ----------
    wall_seconds : float
        Wall-clock seconds of the call (the start included: weight matching for ``init="weight"``), summed over
        the calls of a resumed run.
    data_passes : float
        Passes over the loader: one per epoch, or with ``max_batches`` the share of the loader's batches an epoch
        runs (``max_batches / len(loader)``; one per epoch for a loader without a length); 0 for a data-free loss.
    samples : int
        Examples run forward and backward (the global batches under a process group).
    steps : int
        Gradient steps.
    assignments : int
        Linear assignment problems solved: one per group for each hard forward pass and each rounding, and for
        weight matching (the start, the straight-through projections) one per group and sweep of its coordinate
        ascent plus one per group for its greedy start (an upper bound if the ascent skips a group whose neighbours
        did not change since its last step).
    """

    wall_seconds: float = 0.0
    data_passes: float = 0.0
    samples: int = 0
    steps: int = 0
    assignments: int = 0


@dataclass(frozen=True)
class LearnedResult:
    """Outcome of a learned-permutation method.

    Attributes
    ----------
    perms : dict[str, LongTensor]
        The hard permutation: ``apply_permutation(B, spec, perms)`` is B aligned to A (as
        :attr:`AlignmentResult.perms`).
    init_perms : dict[str, LongTensor]
        Where the method started (identity, weight matching or the given permutation).
    spec : PermutationSpec
    method : str
        ``"straight_through"``, ``"sinkhorn"`` or ``"learned"``.
    loss : str
        The objective that was minimised (``"midpoint"``, ``"random"``, ``"l1"``, ``"l2"``).
    fun : float
        The straight-through estimator: the lowest batch objective seen (its permutation is ``perms``); the others:
        the mean objective of the last epoch.
    history : list of dict
        One record per epoch: ``epoch``, ``loss`` (mean objective of its batches), ``best`` (lowest batch objective
        so far), ``changed`` (units whose hard permutation moved during the epoch, all groups), ``time`` (seconds).
    cost : LearnedCost
    options : LearnedOptions
        The options used, defaults filled in.
    n_iter : int
        Epochs completed.
    converged, status, message
        ``status`` SUCCESS when every epoch ran (a fixed budget), CALLBACK when the callback stopped it.
    """

    perms: dict[str, torch.Tensor]
    init_perms: dict[str, torch.Tensor]
    spec: PermutationSpec
    method: str
    loss: str
    fun: float
    history: list[dict[str, Any]] = field(default_factory=list)
    cost: LearnedCost = field(default_factory=LearnedCost)
    options: LearnedOptions = field(default_factory=LearnedOptions)
    n_iter: int = 0
    converged: bool = True
    status: Status = Status.SUCCESS
    message: str = ""


# ---------------------------------------------------------------------------------------------------------------
# the shared loop


class _Run:
    """Inputs, start and bookkeeping of one learned-permutation run (validated once for the three methods)."""

    def __init__(self, method, model_a, model_b, loader, *, spec, init, options, overrides, loss_fn, generator,
                 example_input) -> None:  # fmt: skip
        where = {"straight_through": "straight_through", "sinkhorn": "sinkhorn_rebasin",
                 "learned": "learned_from_weight_matching"}[method]  # fmt: skip
        self.started = time.perf_counter()
        self.method = method
        opts = resolve_options(LearnedOptions, options, overrides, where=where)
        own = _DEFAULTS[method]
        loss = opts.loss or own["loss"]
        if loss in ("l1", "l2") and method != "sinkhorn":
            raise ValueError(f"loss {loss!r} is data-free, which only sinkhorn_rebasin offers; {where} takes "
                             "'midpoint' or 'random'")  # fmt: skip
        self.options = opts.replace(loss=loss, lam_range=opts.lam_range or own["lam_range"], lr=opts.lr or own["lr"])
        self.data_free = loss in ("l1", "l2")
        if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
            raise TypeError("`model_a` and `model_b` must be nn.Module instances")
        if spec is not None and not isinstance(spec, PermutationSpec):
            raise TypeError(f"`spec` must be a PermutationSpec or None, got {type(spec).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
        if not self.data_free and loader is None:
            raise ValueError(f"loss {loss!r} needs a `loader` of (inputs, targets)")
        check_compatible(model_a.state_dict(), model_b.state_dict())
        self.loader = loader
        self.loss_fn = loss_fn or classification_loss
        self.generator = as_generator(generator)
        self.seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        # the network is run from a private copy in train mode (the caller's flags and buffers stay as they were)
        self.template = copy.deepcopy(model_a).train()
        self.buffers = {k: b.detach().clone() for k, b in self.template.named_buffers()}
        self.params_a = {k: p.detach() for k, p in model_a.named_parameters()}
        self.params_b = {k: p.detach() for k, p in model_b.named_parameters()}
        if not self.params_a or not any(t.is_floating_point() for t in self.params_a.values()):
            raise ValueError("`model_a` has no floating-point parameter to interpolate")
        self.device = next(iter(self.params_a.values())).device
        if spec is None:
            if example_input is None:
                if loader is None:
                    raise ValueError("a data-free loss without a loader needs `spec` or `example_input` to trace "
                                     "the model")  # fmt: skip
                first = next(iter(loader), None)
                if first is None:
                    raise ValueError("`loader` yielded no batches")
                example_input = split_batch(first, torch.device("cpu"), "loader")[0][:2]
            spec = trace_spec(model_a, example_input)
        self.spec = spec
        self.pspec = spec.restrict(self.params_a)
        if not self.pspec.axes:
            raise SpecError("the spec permutes no parameter; there is no permutation to learn")
        self.groups = list(spec.groups)
        self.cost = {"assignments": 0, "samples": 0, "steps": 0, "data_passes": 0.0, "wall_seconds": 0.0}
        self.init_perms = self._start(init, model_a, model_b)

    def _start(self, init, model_a, model_b) -> dict[str, torch.Tensor]:
        if isinstance(init, AlignmentResult):
            init = init.perms
        if isinstance(init, Mapping):
            perms = {g: torch.as_tensor(p).long().cpu() for g, p in init.items()}
            validate_permutation(self.spec, perms, name="init")
            return perms
        if init == "identity":
            return identity_permutation(self.spec)
        if init == "weight":
            res = align(model_a, model_b, method="weight", spec=self.spec,
                        generator=stable_seed(self.seed, "init"))  # fmt: skip
            # align's weight matching solves one assignment per group in each sweep, and once more in the greedy start
            self.cost["assignments"] += (res.n_iter + 1) * len(self.groups)
            return {g: p.cpu() for g, p in res.perms.items()}
        raise ValueError(f"unknown init {init!r}; expected 'identity', 'weight', a permutation dict or an "
                         "AlignmentResult")  # fmt: skip

    def objective(self, permuted_b: Mapping[str, torch.Tensor], x, y, share: float) -> torch.Tensor:
        """The loss of one (slice of a) batch at :math:`\\lambda` (drawn here), or the data-free distance."""
        opts = self.options
        if opts.loss == "l1":
            return share * sum((self.params_a[k] - permuted_b[k]).abs().sum() for k in self.params_a)
        if opts.loss == "l2":
            return share * sum((self.params_a[k] - permuted_b[k]).pow(2).sum() for k in self.params_a)
        if opts.loss == "midpoint":
            lam = 0.5
        else:
            low, high = opts.lam_range
            lam = low + (high - low) * float(torch.rand((), dtype=torch.float64, generator=self.generator))
        params = {k: torch.lerp(a, permuted_b[k], lam) for k, a in self.params_a.items()}
        output = functional_call(self.template, (params, self.buffers), (x,))
        return self.loss_fn(output, y) * share

    def _epoch_share(self, batches: int) -> float:
        """The share of a pass over the loader that ``batches`` batches are (1 without ``max_batches``, or for a
        loader without a length)."""
        try:
            total = len(self.loader)
        except TypeError:
            return 1.0
        return 1.0 if self.options.max_batches is None or total == 0 else min(1.0, batches / total)

    def loop(self, step: Callable[[Any, Any, float], float], hard: Callable[[], dict[str, torch.Tensor]],
             objects: Mapping[str, Any], state: dict[str, Any], checkpoint, callback) -> LearnedResult:  # fmt: skip
        """Run the epochs: ``step(x, y, share)`` takes one gradient step and returns the batch objective (global),
        ``hard()`` is the current hard permutation. ``state`` holds the method's plain values to checkpoint."""
        opts = self.options
        config = {"method": self.method, "options": opts.to_dict(), "sizes": dict(self.spec.sizes), "seed": self.seed,
                  "init": self.init_perms, "fingerprint": _fingerprint(self.params_a, self.params_b)}  # fmt: skip
        saved = EpochCheckpoint(checkpoint, f"learned permutation ({self.method})", config=config,
                                objects={**objects, "generator": self.generator}, loader=self.loader)  # fmt: skip
        history: list[dict[str, Any]] = []
        spent = 0.0
        resumed = saved.restore()
        if resumed is not None:
            history, spent = resumed["history"], resumed["cost"].pop("wall_seconds")
            self.cost.update(resumed["cost"])
            state.update(resumed["state"])
            logger.info("resuming %s from %s after %d epochs", self.method, checkpoint, len(history))
        status, message = Status.SUCCESS, f"completed {opts.epochs} epochs"
        for epoch in range(len(history), opts.epochs):
            started = time.perf_counter()
            before = hard()
            total, batches = 0.0, 0
            for x, y, share in self._batches(first=epoch == 0):
                value = step(x, y, share)
                if not math.isfinite(value):
                    raise NonFiniteError(f"the {self.method} objective became {value} in epoch {epoch}; lower `lr`")
                total += value
                batches += 1
                state["lowest"] = min(state.get("lowest", math.inf), value)
                self.cost["steps"] += 1
            if batches == 0:
                raise ValueError("`loader` yielded no batch")
            after = hard()
            self.cost["data_passes"] += 0.0 if self.data_free else self._epoch_share(batches)
            record = {"epoch": epoch, "loss": total / batches, "best": state["lowest"],
                      "changed": sum(permutation_distance(before, after).values()),
                      "time": time.perf_counter() - started}  # fmt: skip
            history.append(record)
            wall = spent + time.perf_counter() - self.started
            saved.save({"history": history, "state": state, "cost": {**self.cost, "wall_seconds": wall}},
                       at_epoch_end=opts.max_batches is None)  # fmt: skip
            if callback is not None and callback(dict(record)) is True:
                status, message = Status.CALLBACK, f"stopped by the callback after epoch {epoch}"
                break
        self.cost["wall_seconds"] = spent + time.perf_counter() - self.started
        self.history = history
        return status, message

    def _batches(self, first: bool):
        if self.data_free:  # every rank computes the same distance: its gradient is summed over the ranks
            yield None, None, 1.0 / world_size()
            return
        for index, batch in enumerate(self.loader):
            if self.options.max_batches is not None and index >= self.options.max_batches:
                break
            x, y = split_batch(batch, self.device, "loader")
            if y is None:
                raise TypeError("`loader` must yield (inputs, targets) pairs")
            if first and index == 0:
                check_same_batch(x, y, label="loader")
            self.cost["samples"] += int(y.shape[0])
            yield shard_batch(x, y, label="loader")

    def result(self, perms, fun, status, message) -> LearnedResult:
        return LearnedResult(
            perms={g: p.cpu() for g, p in perms.items()}, init_perms=self.init_perms, spec=self.spec,
            method=self.method, loss=self.options.loss, fun=float(fun), history=self.history,
            cost=LearnedCost(**self.cost), options=self.options, n_iter=len(self.history),
            converged=status == Status.SUCCESS, status=status, message=message,
        )  # fmt: skip


def _fingerprint(params_a, params_b) -> torch.Tensor:
    """Per parameter of A and of B: its sum and sum of squares (float64, CPU): what a resume must match."""
    rows = [(t.double().sum(), t.double().pow(2).sum()) for p in (params_a, params_b) for t in p.values()]
    return torch.tensor([[float(s), float(q)] for s, q in rows], dtype=torch.float64)


def _backward(run: _Run, loss: torch.Tensor, leaves: list[torch.Tensor]) -> float:
    """Gradients of the (share-weighted) loss, summed over the ranks; returns the global batch objective."""
    loss.backward()
    return float(sum_gradients_(leaves, loss.detach()) if is_distributed() else loss.detach())


def _optimizer(kind: str, leaves: list[torch.Tensor], opts: LearnedOptions) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(leaves, lr=opts.lr, momentum=opts.momentum)
    return torch.optim.Adam(leaves, lr=opts.lr)


_COMMON_PARAMETERS = """
    Parameters
    ----------
    model_a, model_b : nn.Module
        The end points, same architecture (never modified). B is the model whose units are permuted.
    loader : iterable
        ``(inputs, targets)`` batches (training data), moved to the models' device.
    spec : PermutationSpec, optional
        Traced from ``model_a`` on the loader's first batch (or ``example_input``) when omitted.
    init : {"weight", "identity"}, dict or AlignmentResult
        The start: weight matching (:func:`~neuralign.alignment.align`, ``method="weight"``, default), the
        identity, or a given permutation (e.g. a correlation alignment's ``perms`` or its result).
    options : LearnedOptions, optional
        Keyword arguments of the same names (``epochs=3``, ``lr=0.1``) override single ones.
    loss_fn : callable, optional
        ``(model output, targets) -> scalar``; default cross-entropy.
    generator : torch.Generator or int, optional
        The seed of every draw (:math:`\\lambda`, noise, group orders); the same seed gives the same result.
    callback : callable, optional
        Receives each epoch's history record after the checkpoint is written; returning True stops.
    checkpoint : path-like, optional
        Written atomically after every epoch; a run with the same inputs and options resumes from it, giving the
        same result, bit for bit on the CPU, as an uninterrupted one. A run with other models, method, seed, start
        or options is refused (:class:`~neuralign.errors.CheckpointError`); the data is not identified (reading it
        to fingerprint it would move the loader's random state), so a checkpoint made on other data is resumed as
        if it were this data's: give each data set its own checkpoint path.
    example_input : Tensor, optional
        Input to trace the spec without a loader.

    Returns
    -------
    LearnedResult

    Raises
    ------
    TypeError
        Non-module models, a loader that does not yield (inputs, targets), options of the wrong type.
    ValueError
        An unknown ``init`` or loss, a loss the method does not offer, a missing or empty loader, options out of range.
    ShapeMismatchError
        If the models differ in parameter names or shapes.
    SpecError
        If the spec permutes no parameter.
    NonFiniteError
        If the objective becomes NaN or infinite.

    Notes
    -----
    Data-parallel under a torch.distributed process group (:mod:`neuralign._distributed`): every rank runs its slice
    of each global batch, weighted by its share of the batch, the gradients are summed over the ranks (one
    all-reduce per step), and every rank takes the same step and the same assignments; rank 0 writes the checkpoint.
"""


def _document(fn: Callable) -> Callable:
    fn.__doc__ = fn.__doc__.replace("    {parameters}\n", _COMMON_PARAMETERS.lstrip("\n"))
    return fn


# ---------------------------------------------------------------------------------------------------------------
# the methods


@_document
def straight_through(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    *,
    spec: PermutationSpec | None = None,
    init: str | Mapping[str, torch.Tensor] | AlignmentResult = "weight",
    options: LearnedOptions | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | int | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    example_input: Any = None,
    **option_overrides: Any,
) -> LearnedResult:
    """Learn the permutation of B with the straight-through estimator (Git Re-Basin, Algorithm 2).

    Free weights :math:`\\tilde\\theta_B`, initialised at :math:`\\theta_A`, are trained by SGD with momentum. The
    forward pass of each step uses their projection onto the permutations of :math:`\\theta_B`,

    .. math::

        \\operatorname{proj}(\\tilde\\theta_B) = \\pi(\\theta_B), \\qquad
        \\pi = \\arg\\max_{\\pi} \\sum_\\ell \\langle \\tilde\\theta_{B,\\ell}, \\pi(\\theta_B)_\\ell \\rangle,

    weight matching (block coordinate ascent, one exact assignment per group, or one structured assignment per
    block of groups sharing an attention-head permutation, warm-started from the previous step's :math:`\\pi`, at
    most ``projection_iter`` sweeps), and the backward pass treats the projection as the
    identity: the gradient of :math:`\\ell((1-\\lambda)\\theta_A + \\lambda \\operatorname{proj}(\\tilde\\theta_B))`
    is applied to :math:`\\tilde\\theta_B`. The loss is at the midpoint (default) or at
    :math:`\\lambda \\sim U(a, b)` per batch. The permutation with the lowest batch objective seen is returned.

    {parameters}
    The start ``init`` is where the first projection is warm-started; with ``"weight"`` the first forward pass is
    at the weight-matching permutation (Ainsworth et al.: "step 0 equals weight matching"). Defaults: SGD, lr 1e-2,
    momentum 0.9 (their MLP setting; they use batches of 1000).

    References
    ----------
    .. [1] S. K. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
       ICLR 2023, §3.3 and Algorithm 2, arXiv:2209.04836.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> def net():
    ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a, b = net(), net()
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,))) for _ in range(3)]
    >>> res = straight_through(a, b, data, epochs=2, generator=0)
    >>> res.n_iter, res.cost.data_passes, sorted(res.perms["0"].tolist()) == list(range(8))
    (2, 2.0, True)
    """
    run = _Run("straight_through", model_a, model_b, loader, spec=spec, init=init, options=options,
               overrides=option_overrides, loss_fn=loss_fn, generator=generator,
               example_input=example_input)  # fmt: skip
    opts = run.options
    free = {k: a.detach().clone().requires_grad_(True) for k, a in run.params_a.items()}
    leaves = list(free.values())
    optimizer = _optimizer("sgd", leaves, opts)
    keys = set(run.pspec.axes)
    state: dict[str, Any] = {"perms": dict(run.init_perms), "best_perms": dict(run.init_perms)}

    def step(x, y, share) -> float:
        target = {k: t.detach() for k, t in free.items()}
        problem = _WeightProblem(target, run.params_b, run.spec, keys)
        perms, sweeps, _ = _ascent(problem, state["perms"], dict.fromkeys(run.groups), greedy=False,
                                   generator=run.generator, max_iter=opts.projection_iter)  # fmt: skip
        run.cost["assignments"] += sweeps * len(run.groups)
        state["perms"] = perms
        projected = apply_permutation(run.params_b, run.pspec, perms)
        # forward: the projection; backward: the identity onto the free weights (their difference is exactly 0)
        through = {k: projected[k] + (free[k] - free[k].detach()) for k in free}
        optimizer.zero_grad(set_to_none=True)
        value = _backward(run, run.objective(through, x, y, share), leaves)
        if value < state.get("lowest", math.inf):  # the loop records the lowest batch objective after this step
            state["best_perms"] = {g: p.clone() for g, p in perms.items()}
        optimizer.step()
        return value

    objects = {**{f"free.{k}": t for k, t in free.items()}, "optimizer": optimizer}
    status, message = run.loop(step, lambda: state["perms"], objects, state, checkpoint, callback)
    return run.result(state["best_perms"], state.get("lowest", math.nan), status, message)


def _scores(run: _Run, noise: float) -> dict[str, torch.Tensor]:
    """One-hot matrices of the start, plus ``noise`` times standard Gaussian noise (float64 is not needed: the
    parameters' dtype)."""
    dtype = next(iter(run.params_a.values())).dtype
    out = {}
    for g in run.groups:
        z = perm_to_matrix(run.init_perms[g], dtype=dtype, device=run.device)
        if noise:
            z = z + noise * torch.randn(z.shape, generator=run.generator, dtype=dtype).to(run.device)
        out[g] = z.requires_grad_(True)
    return out


def _round(run: _Run, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hard permutation of the scores, :math:`\\arg\\max_P \\sum_g \\langle Z_g, P_g\\rangle`: one linear
    assignment per group, and for the groups with attention heads the structured assignment of
    :func:`~neuralign.alignment.heads.match_heads` (heads kept whole), which replaces theirs."""
    run.cost["assignments"] += len(scores)
    perms = {g: solve_assignment(z.detach(), maximize=True, name=g).perm.cpu() for g, z in scores.items()}
    return match_heads(run.spec, {g: z.detach() for g, z in scores.items()}, perms) if run.spec.heads else perms


@_document
def sinkhorn_rebasin(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable | None = None,
    *,
    spec: PermutationSpec | None = None,
    init: str | Mapping[str, torch.Tensor] | AlignmentResult = "weight",
    options: LearnedOptions | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | int | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    example_input: Any = None,
    **option_overrides: Any,
) -> LearnedResult:
    """Learn the permutation of B as a soft permutation by the Sinkhorn operator (Sinkhorn re-basin).

    One score matrix :math:`Z_g` per group (started at the one-hot matrix of ``init`` plus
    ``score_noise`` :math:`\\cdot \\mathcal N(0, 1)`) gives the doubly-stochastic
    :math:`S_g = \\operatorname{sinkhorn}(Z_g / \\tau)` (:func:`~neuralign.optim.sinkhorn`, ``sinkhorn_iter``
    log-domain sweeps), applied to B as dense matrices (:func:`~neuralign.alignment.apply_permutation_matrices`);
    Adam minimises the loss (module docstring) over the scores: at the midpoint, at :math:`\\lambda \\sim U(0, 1)`
    per batch (default, Peña et al.'s ``RndLoss``) or the data-free weight distance (``"l1"``, ``"l2"``; then
    ``loader`` may be omitted and each epoch is one step). The result is the linear assignment of the final scores
    (Peña et al. round the parameter, not the Sinkhorn output).

    The result is the final rounding, not the best permutation seen, and it can be worse than the start: the relaxed
    objective can be lower at a mixed (doubly-stochastic, not permutation) matrix than at the exact answer. Measured
    on a planted problem (an MLP 10-64-64-3, B an exact permutation of A, 20 batches of 100): one epoch from the
    exact weight-matching start with the default lr 0.1 moved 82 of 128 units away from it (``tau=0.1`` and
    ``score_noise=0`` did not help; ``lr=0.01`` kept it exact). Start from a good permutation with a small lr, and
    compare the result with the start.

    With attention heads (``spec.heads``) the soft permutation of a group with heads is still a point of the
    Birkhoff polytope of its whole flat group of ``H * d`` units (it may mix units of different heads): a
    relaxation of the structured permutations (head blocks moved whole, a permutation inside each), whose convex
    hull is smaller. The hard permutations (each epoch's and the result) are structured: the rounding is the
    structured assignment on the scores (:func:`~neuralign.alignment.heads.match_heads`).

    {parameters}
    The gradient through the Sinkhorn sweeps is unrolled autograd (see :func:`~neuralign.optim.sinkhorn`: the exact
    derivative of the forward pass's matrix; Peña et al. differentiate the fixed point implicitly). Defaults: Adam, lr
    0.1 (their examples use AdamW, lr 0.1; their data-free CNN example lr 10.1), :math:`\\tau = 1`, 20 sweeps.

    References
    ----------
    .. [1] F. A. G. Peña, H. R. Medeiros, T. Dubail, M. Aminbeidokhti, E. Granger, M. Pedersoli, "Re-basin via
       implicit Sinkhorn differentiation", CVPR 2023, arXiv:2212.12042.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from neuralign.alignment import apply_permutation, random_permutation, trace_spec
    >>> torch.manual_seed(0) and None
    >>> def net():
    ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a, b = net(), net()
    >>> spec = trace_spec(a, torch.randn(2, 4))
    >>> _ = b.load_state_dict(apply_permutation(a.state_dict(), spec, random_permutation(spec, generator=1)))
    >>> res = sinkhorn_rebasin(a, b, spec=spec, loss="l2", init="identity", epochs=50, generator=0)
    >>> torch.equal(apply_permutation(b.state_dict(), spec, res.perms)["0.weight"], a.state_dict()["0.weight"])
    True
    """
    run = _Run("sinkhorn", model_a, model_b, loader, spec=spec, init=init, options=options,
               overrides=option_overrides, loss_fn=loss_fn, generator=generator,
               example_input=example_input)  # fmt: skip
    opts = run.options
    scores = _scores(run, opts.score_noise)
    leaves = list(scores.values())
    optimizer = _optimizer("adam", leaves, opts)

    def step(x, y, share) -> float:
        soft = {g: sinkhorn(z, tau=opts.tau, n_iter=opts.sinkhorn_iter) for g, z in scores.items()}
        optimizer.zero_grad(set_to_none=True)
        value = _backward(run, run.objective(apply_permutation_matrices(run.params_b, run.pspec, soft), x, y, share),
                          leaves)  # fmt: skip
        optimizer.step()
        return value

    def hard() -> dict[str, torch.Tensor]:
        return _round(run, scores)

    objects = {**{f"scores.{g}": z for g, z in scores.items()}, "optimizer": optimizer}
    status, message = run.loop(step, hard, objects, {}, checkpoint, callback)
    final = _round(run, scores)
    return run.result(final, run.history[-1]["loss"] if run.history else math.nan, status, message)


@_document
def learned_from_weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    *,
    spec: PermutationSpec | None = None,
    init: str | Mapping[str, torch.Tensor] | AlignmentResult = "weight",
    options: LearnedOptions | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | int | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    example_input: Any = None,
    **option_overrides: Any,
) -> LearnedResult:
    """Learn the permutation of B from latent scores started at weight matching (Theus et al. 2025, permutations
    only).

    One latent score matrix :math:`Z_g` per group, started at the one-hot matrix of ``init`` (weight matching by
    default). The forward pass uses the hard permutation :math:`P_g = \\arg\\max_P \\langle Z_g, P\\rangle` (one
    linear assignment per group and step; with attention heads the structured assignment over the groups sharing a
    head permutation, :func:`~neuralign.alignment.heads.match_heads`) and the backward pass passes the gradient
    with respect to :math:`P_g` straight to :math:`Z_g` (:math:`P_g + Z_g - \\operatorname{sg}(Z_g)`, exactly
    :math:`P_g` in the forward pass, so B's end point stays an exact permutation). Adam minimises the loss at
    :math:`\\lambda \\sim U(0.4, 0.6)` per batch (their ablation's best, App. C.1.1). The final hard permutation is
    returned.

    {parameters}
    Theus et al. report that without the weight-matching start a barrier remains after 15 epochs (App. C.1.2).
    Default lr 1e-2 (Adam): they train with AdamW at 3e-4 for thousands of steps per epoch (batch 32); with the
    one-hot start, a swap of two units needs score changes of order 1, which 1e-2 reaches within the few dozen steps
    of an MNIST epoch at batch 1000.

    References
    ----------
    .. [1] D. Theus et al., "Generalized Linear Mode Connectivity for Transformers", NeurIPS 2025,
       arXiv:2506.22712 (Algorithm 1, permutation-only variant).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> def net():
    ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a, b = net(), net()
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,))) for _ in range(3)]
    >>> res = learned_from_weight_matching(a, b, data, epochs=2, generator=0)
    >>> res.method, res.options.lam_range, res.cost.steps, res.cost.data_passes
    ('learned', (0.4, 0.6), 6, 2.0)
    """
    run = _Run("learned", model_a, model_b, loader, spec=spec, init=init, options=options,
               overrides=option_overrides, loss_fn=loss_fn, generator=generator,
               example_input=example_input)  # fmt: skip
    opts = run.options
    scores = _scores(run, 0.0)
    leaves = list(scores.values())
    optimizer = _optimizer("adam", leaves, opts)
    state: dict[str, Any] = {"perms": dict(run.init_perms)}

    def step(x, y, share) -> float:
        perms = _round(run, scores)
        state["perms"] = perms
        through = {g: perm_to_matrix(perms[g], dtype=z.dtype, device=z.device) + (z - z.detach())
                   for g, z in scores.items()}  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        value = _backward(run, run.objective(apply_permutation_matrices(run.params_b, run.pspec, through), x, y,
                                             share), leaves)  # fmt: skip
        optimizer.step()
        return value

    def hard() -> dict[str, torch.Tensor]:
        return state["perms"]

    objects = {**{f"scores.{g}": z for g, z in scores.items()}, "optimizer": optimizer}
    status, message = run.loop(step, hard, objects, state, checkpoint, callback)
    final = _round(run, scores)
    return run.result(final, run.history[-1]["loss"] if run.history else math.nan, status, message)


#: The learned-permutation methods by name.
LEARNED_METHODS: dict[str, Callable[..., LearnedResult]] = {
    "straight_through": straight_through,
    "sinkhorn": sinkhorn_rebasin,
    "learned": learned_from_weight_matching,
}


def learn_permutation(model_a: nn.Module, model_b: nn.Module, loader: Iterable | None = None, *, method: str,
                      **kwargs: Any) -> LearnedResult:  # fmt: skip
    """Run the learned-permutation method named ``method`` (a key of :data:`LEARNED_METHODS`) with ``kwargs``.

    Raises
    ------
    ValueError
        ``unknown method 'x'; expected one of [...]``; otherwise as the method.

    Examples
    --------
    >>> learn_permutation(None, None, method="gumbel")
    Traceback (most recent call last):
    ...
    ValueError: unknown method 'gumbel'; expected one of ['learned', 'sinkhorn', 'straight_through']
    """
    if method not in LEARNED_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(LEARNED_METHODS)}")
    return LEARNED_METHODS[method](model_a, model_b, loader, **kwargs)
