"""Fitting a curve between two fixed networks (Garipov et al. 2018), on an unmodified ``nn.Module``."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuralign._distributed import (
    all_reduce_,
    all_reduce_sum,
    broadcast_,
    check_same_batch,
    is_distributed,
    rank,
    shard_batch,
)
from neuralign._epochs import EpochCheckpoint
from neuralign._options import renamed_keywords
from neuralign._utils import (
    as_generator,
    classification_loss,
    split_batch,
    split_logits,
    stable_seed,
)
from neuralign._validate import check_int
from neuralign.attacks import PGD
from neuralign.curves import _weights
from neuralign.curves.families import Bezier, Curve, Line, PolyChain, _flatten_points
from neuralign.errors import NonFiniteError
from neuralign.status import Status

__all__ = ["fit_curve", "CurveResult", "paper_lr_factor", "garipov_lr_factor"]

logger = logging.getLogger(__name__)

_CHECKPOINT_KIND = "fit_curve"
_CURVE_BUILDERS: dict[str, Callable[[Mapping, Mapping], Curve]] = {
    "bezier": lambda a, b: Bezier.between(a, b, degree=2),
    "polychain": lambda a, b: PolyChain.between(a, b, bends=1),
    "line": lambda a, b: Line.between(a, b),
}


def paper_lr_factor(epoch: int) -> float:
    """The learning-rate factor of Tatro et al. (2020): :math:`0.5^{\\lfloor e/20 \\rfloor} \\cdot 0.9996^{e}`.

    Stepped once per epoch (``torch.optim.lr_scheduler.LambdaLR``); it halves the rate every 20 epochs.

    >>> paper_lr_factor(0), paper_lr_factor(20) == 0.5 * 0.9996**20
    (1.0, True)
    """
    return 0.5 ** (epoch // 20) * 0.9996**epoch


def garipov_lr_factor(epoch: int, epochs: int) -> float:
    """The learning-rate factor of Garipov et al. (2018), used by Tatro et al. (2020) for robust training.

    With :math:`a = e / E` (epoch :math:`e` of :math:`E`): 1 for :math:`a \\le 0.5`, linear from 1 to 0.01 for
    :math:`0.5 < a \\le 0.9`, then 0.01. Pass ``functools.partial(garipov_lr_factor, epochs=E)`` as ``lr_lambda``.

    Raises
    ------
    ValueError
        For ``epochs < 1`` or a negative ``epoch``.

    >>> [round(garipov_lr_factor(e, 10), 4) for e in (0, 5, 7, 9)]
    [1.0, 1.0, 0.505, 0.01]
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1, got {epochs!r}")
    if epoch < 0:
        raise ValueError(f"`epoch` must be >= 0, got {epoch!r}")
    a = epoch / epochs
    if a <= 0.5:
        return 1.0
    if a <= 0.9:
        return 1.0 - (a - 0.5) / 0.4 * 0.99
    return 0.01


def _default_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)


@dataclass(frozen=True)
class CurveResult:
    """Result of :func:`fit_curve`.

    Attributes
    ----------
    curve : Curve
        The fitted curve (same family and trainable mask as the start; end points unchanged unless freed).
    history : tuple of dict
        One record per completed epoch (resumed epochs included): ``epoch`` (0-based index :math:`e`, the lr
        factor used was ``lr_lambda(e)``), ``loss`` (mean data loss), ``objective`` (mean of loss + L2 penalty
        on :math:`w(t)` + proximal term), ``accuracy`` (fraction of correct main-head predictions, in [0, 1]),
        ``lr``, ``time`` (wall seconds of the epoch), ``batches``.
    n_iter : int
        Number of epochs completed.
    converged : bool
        True when all requested epochs ran (a fixed-budget fit has no other stopping rule).
    status : Status
        SUCCESS: all epochs ran; CALLBACK: stopped by the callback.
    message : str
        Why it stopped.
    fun : float
        ``objective`` of the last epoch (NaN when no epoch ran).
    """

    curve: Curve
    history: tuple[dict[str, Any], ...] = field(repr=False)
    n_iter: int
    converged: bool
    status: Status
    message: str
    fun: float


class _CurveStepper:
    """One stochastic step of curve fitting, on flat buffers (internal; also timed by benchmarks/bench_curves.py).

    The points live in one ``(n, D)`` buffer; trainable rows are leaf views handed to the optimizer. A step writes
    ``w = P^T c(t)`` into a persistent buffer (one matrix-vector product, no autograd), runs the model on leaf views
    of ``w`` (their gradients are the network's own, as in a plain step), and applies the chain rule by hand into
    persistent gradient buffers: ``dL/dp_j = c_j(t) (dL/dw + wd * w) [+ (p_j - p_j^0) / mu]``. Nothing of size D is
    allocated per step (fresh large buffers cost page faults on the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        curve: Curve,
        *,
        weight_decay: float,
        proximal: float | None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None,
        adversarial: PGD | None = None,
        attack_generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.adversarial = adversarial
        self.attack_generator = attack_generator
        self.curve = curve
        self.device = curve.device
        self.names, self.shapes, self.numels = curve.names, curve.shapes, tuple(s.numel() for s in curve.shapes)
        self.points = curve._flat.detach().clone()
        self.train_index = [j for j, flag in enumerate(curve.trainable) if flag]
        self.leaves = [self.points[j] for j in self.train_index]
        for leaf in self.leaves:
            leaf.requires_grad_(True)
        self.buffers = _weights.buffer_copies(model, self.device)
        self.weight_decay = float(weight_decay)
        self.proximal = proximal
        self.anchor = self.points[self.train_index].clone() if proximal is not None else None
        self.loss_fn = loss_fn
        numel = self.points.shape[1]
        self._w = torch.empty(numel, dtype=self.points.dtype, device=self.device)
        self._w_parts = self._w.split(self.numels)
        # persistent leaf views of w handed to the model: made once, like a model's own parameters (fresh views per
        # step measured ~5 % slower on TinyTen, CPU)
        self._views = [part.view(shape).requires_grad_(True) for part, shape in zip(self._w_parts, self.shapes)]
        self._params = dict(zip(self.names, self._views))
        self._grads = [torch.empty_like(self._w) for _ in self.leaves]
        # dL/dw + wd * w: the single trainable point's own gradient buffer (scaled by c), else a shared scratch
        self._dw = self._grads[0] if len(self.leaves) == 1 else torch.empty_like(self._w)
        self._dw_parts = self._dw.split(self.numels)
        factory = optimizer if optimizer is not None else _default_optimizer
        self.optimizer = factory(self.leaves)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}"
            )

    def step(
        self, x: torch.Tensor, y: torch.Tensor, t: float, check: str | None = None, share: float = 1.0
    ) -> torch.Tensor:
        """One optimizer step at ``t``; returns ``[data loss, objective, correct]`` (float64, on the device).

        Under a process group ``x, y`` are this rank's slice, ``share`` its fraction of the global batch: the
        network gradient of ``share * loss`` is summed over the ranks (one all-reduce of the flat ``dL/dw`` buffer)
        before the weight decay and the chain rule to the control points, which every rank then applies alike.
        """
        distributed = is_distributed()
        coeffs = self.curve._coefficient_list(t)
        c = torch.tensor(coeffs, dtype=self.points.dtype, device=self.device)
        w = self._w
        views = self._views
        for view in views:
            view.grad = None
        with torch.no_grad():
            torch.mv(self.points.t(), c, out=w)
        if self.adversarial is not None:  # attack the network at w(t), batch statistics (the official code)
            x = _weights.attack(self.adversarial, self.model, x, y, train=True, params=self._params,
                                buffers=self.buffers, generator=self.attack_generator, check=check,
                                loss_fn=self.loss_fn)  # fmt: skip
        output = _weights.call(self.model, self._params, self.buffers, x, check)
        loss = self.loss_fn(output, y)
        single = len(self.leaves) == 1
        # With one trainable point, dL/dp = c (dL/dw): scaling the loss by c gives it from backward for free.
        scale = coeffs[self.train_index[0]] if single else 1.0
        if distributed:
            scale_data = scale * share
            (loss * scale_data).backward()
        else:
            (loss * scale if single else loss).backward()
        with torch.no_grad():
            alpha = self.weight_decay * scale
            # under a process group the decay is added once, after the ranks' data gradients are summed
            local_alpha = 0.0 if distributed else alpha
            for view, w_part, dw_part in zip(views, self._w_parts, self._dw_parts):
                if view.grad is None:  # a parameter the loss does not reach
                    torch.mul(w_part, local_alpha, out=dw_part)
                else:
                    torch.add(view.grad.reshape(-1), w_part, alpha=local_alpha, out=dw_part)
            if distributed:
                all_reduce_(self._dw)
                if alpha:
                    self._dw.add_(w, alpha=alpha)
            if not single:
                for j, g in zip(self.train_index, self._grads):
                    torch.mul(self._dw, coeffs[j], out=g)
            objective = loss.detach()
            if self.weight_decay:
                objective = objective + 0.5 * self.weight_decay * torch.dot(w, w)
            if self.proximal is not None:
                inv_mu = 1.0 / self.proximal
                for leaf, anchor, g in zip(self.leaves, self.anchor, self._grads):
                    objective = objective + 0.5 * inv_mu * torch.dist(leaf, anchor) ** 2
                    g.add_(leaf, alpha=inv_mu).sub_(anchor, alpha=inv_mu)
            for leaf, g in zip(self.leaves, self._grads):
                leaf.grad = g
        self.optimizer.step()
        logits, _ = split_logits(output)
        correct = (logits.detach().argmax(dim=-1) == y).sum()
        return torch.stack([loss.detach().double(), objective.double(), correct.double()])

    def fitted_curve(self) -> Curve:
        return type(self.curve)._from_flat(
            self.points.detach(), self.names, self.shapes, self.curve.trainable
        )


def _fingerprint(rows: torch.Tensor) -> torch.Tensor:
    """Cheap float64 summary of each row (sum, sum of squares, position-weighted sum), on the CPU."""
    weights = (torch.arange(rows.shape[1], device=rows.device) % 8191 + 1).to(torch.float64)
    r = rows.detach().to(torch.float64)
    return torch.stack([r.sum(1), r.pow(2).sum(1), r @ weights], dim=1).cpu()


def _ends_match(curve: Curve, flat_ends: torch.Tensor) -> tuple[bool, str]:
    """Do the curve's end points equal ``flat_ends`` (2, D)? Also names the first differing parameter."""
    for row, label in ((0, "point_a"), (1, "point_b")):
        mine = curve._flat[0 if row == 0 else -1]
        theirs = flat_ends[row].to(device=mine.device, dtype=mine.dtype)
        if not torch.equal(mine, theirs):
            differ = (mine != theirs).nonzero()
            index = int(differ[0]) if differ.numel() else 0
            offsets = torch.tensor([0, *[s.numel() for s in curve.shapes]]).cumsum(0)
            name = curve.names[int((offsets <= index).sum()) - 1]
            return False, f"its {'first' if row == 0 else 'last'} point differs from `{label}` (first in `{name}`)"
    return True, ""


def _config(
    curve: Curve, weight_decay: float, proximal: float | None, max_batches: int | None, adversarial: PGD | None
) -> dict:
    return {
        "adversarial": None if adversarial is None else adversarial.to_dict(),
        "family": curve.family,
        "num_points": curve.num_points,
        "trainable": list(curve.trainable),
        "names": list(curve.names),
        "shapes": [list(s) for s in curve.shapes],
        "dtype": str(curve.dtype),
        "weight_decay": float(weight_decay),
        "proximal": None if proximal is None else float(proximal),
        "max_batches": max_batches,
    }


def fit_curve(
    model: nn.Module,
    point_a: Mapping[str, torch.Tensor],
    point_b: Mapping[str, torch.Tensor],
    train_loader: Iterable,
    *,
    curve: str | Curve = "bezier",
    epochs: int,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    weight_decay: float = 5e-4,
    proximal: float | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | int | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    max_batches: int | None = None,
    adversarial: PGD | None = None,
    **renamed: Any,
) -> CurveResult:
    """Fit the trainable points of a curve between two fixed networks by SGD over a uniform :math:`t`.

    Solves (Garipov et al. 2018, eq. 2; Tatro et al. 2020, §3)

    .. math::

        \\min_{\\theta}\\; \\mathbb{E}_{t \\sim U[0, 1]} \\Bigl[ \\ell\\bigl(w_\\theta(t)\\bigr)
            + \\frac{\\lambda}{2} \\lVert w_\\theta(t) \\rVert^2 \\Bigr]
            \\;\\Bigl[ + \\frac{1}{2\\mu} \\lVert \\theta - \\theta^{0} \\rVert^2 \\Bigr],

    where :math:`w_\\theta(t) = \\sum_j c_j(t) p_j` is the curve (points :math:`p_j`; the trainable ones form
    :math:`\\theta`, the end points :math:`w_A = p_0`, :math:`w_B = p_{n-1}` are fixed by default), :math:`\\ell`
    the mini-batch training loss of ``model`` evaluated at :math:`w_\\theta(t)` with batch norm in train mode
    (batch statistics), :math:`\\lambda` = ``weight_decay`` (the L2 term is on the interpolated weights, every
    parameter included: conv/linear weights and biases, batch-norm :math:`\\gamma, \\beta`), :math:`\\mu` =
    ``proximal`` and :math:`\\theta^0` the trainable points at the start of this call. Each mini-batch draws one
    :math:`t` shared by the whole batch. With ``adversarial`` (robust curves, Tatro et al. 2020 §4, code
    ``train_curve_adversarial.py``), the batch's inputs are replaced by PGD examples against the network at
    :math:`w_\\theta(t)` (train mode, batch statistics) for that same :math:`t`, and :math:`\\ell` is the loss on them.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture. It is run with :func:`torch.func.functional_call` at :math:`w(t)` and with batch-norm
        buffers owned by the fit: its parameters, buffers and train/eval flags are left as they were.
    point_a, point_b : dict str -> Tensor
        End points :math:`w_A` (t = 0) and :math:`w_B` (t = 1): every parameter of ``model`` (a full state dict
        is accepted; its buffers are ignored). Their device and dtype are those of the fit. To fit an "aligned"
        curve, pass the permuted state dict of model B.
    train_loader : iterable
        Yields ``(inputs, targets)``; batches are moved to the points' device. If it has a ``generator``
        attribute (``DataLoader(generator=...)``), its state is checkpointed.
    curve : {"bezier", "polychain"} or Curve
        ``"bezier"``: quadratic Bezier with its control point at the midpoint (the paper's setting);
        ``"polychain"``: one bend at the midpoint. A :class:`Curve` starts from its points and trainable mask;
        its end points must equal ``point_a`` and ``point_b``.
    epochs : int
        Total number of epochs (a resumed fit runs only the missing ones).
    optimizer : callable, optional
        ``params -> torch.optim.Optimizer`` over the list of trainable flat points. Default: SGD, lr 0.1, momentum
        0.9, Nesterov, weight decay 0 (the L2 term is in the objective).
    lr_lambda : callable, optional
        ``epoch -> factor`` for ``LambdaLR``, stepped once per epoch. Default :func:`paper_lr_factor`.
    weight_decay : float
        :math:`\\lambda >= 0`, default 5e-4.
    proximal : float, optional
        :math:`\\mu > 0` of the proximal term (used by PAM's curve step).
    loss_fn : callable, optional
        ``(model output, targets) -> scalar``. Default :func:`neuralign._utils.classification_loss` (cross-entropy,
        plus 0.3 x each auxiliary head for GoogLeNet's train-mode tuple).
    generator : torch.Generator or int, optional
        Source of the :math:`t` draws (one per global batch, the same on every rank) and of the seed of the attack's
        own generator (random starts and train-mode dropout), which is re-seeded each epoch from that seed, the
        rank and the epoch (a CPU generator or a seed).
    callback : callable, optional
        Called after each epoch (and after the checkpoint is written) with the epoch's record; returning True stops.
    checkpoint : path-like, optional
        Written atomically after every epoch with everything needed to resume (points, optimizer and schedule, history,
        the :math:`t`-generator, the attack's seed, the global CPU RNG and the loader generator's states). If the file
        exists and was written by a fit with the same family, trainable mask, shapes, end points (fingerprint), weight
        decay, proximal and batch settings, the fit resumes from it: an interrupted then resumed CPU fit gives the same
        result, bit for bit, as an uninterrupted one (a fit stopped by the callback resumes the same way).
    max_batches : int, optional
        Stop each epoch after this many batches (``max_batches_per_epoch`` before 0.2, still accepted with a
        :class:`DeprecationWarning`).
    adversarial : PGD, optional
        Fit a robust curve against this attack (:class:`neuralign.attacks.PGD`; inputs in [0, 1]). Part of the
        checkpoint's settings: a fit with other attack settings does not resume it.

    Returns
    -------
    CurveResult

    Raises
    ------
    ShapeMismatchError
        If an end point or ``curve`` does not match ``model``'s parameters (names the parameter).
    ValueError
        For a curve with nothing trainable (a Line), a ``curve`` fitted for other end points, an unknown family,
        bad numbers, an empty loader, or inputs the model cannot take (names the expected shape).
    NonFiniteError
        If the training loss becomes NaN or infinite (the checkpoint keeps the last finite epoch).
    CheckpointError
        If ``checkpoint`` exists but is unreadable or belongs to another fit.

    Notes
    -----
    Data-parallel under a torch.distributed process group (:mod:`neuralign._distributed`): every rank iterates the
    same ``train_loader`` (same seed, so the same global batches), runs its slice of each batch at the same
    :math:`t` (the ``generator`` is seeded alike on every rank), and the network gradient is summed over the ranks
    with one all-reduce of the flat ``dL/dw`` buffer per step, so the points stay identical on every rank. Without
    batch norm an epoch equals the one-process epoch on the same global batches up to float rounding; batch norm
    normalises each rank's slice with its own statistics (as ``DistributedDataParallel`` does). The loss, accuracy
    and objective of the history are the global batches' (float64 all-reduce); rank 0 writes the checkpoint.

    Speed: all points sit in one contiguous ``(n, D)`` buffer. A step costs one matrix-vector product for
    :math:`w(t)` (into a persistent buffer), the network's forward/backward on persistent views of :math:`w(t)`,
    one pass for :math:`\\lVert w \\rVert^2` and one fused pass for the gradient
    :math:`c_j(t)(\\nabla_w \\ell + \\lambda w)` of each trainable point; the fixed points never enter the autograd
    graph and nothing of size :math:`D` is allocated per step. On 2 CPU threads the step costs about as much as a
    plain training step of the network (``benchmarks/bench_curves.py``).

    References
    ----------
    .. [1] T. Garipov, P. Izmailov, D. Podoprikhin, D. Vetrov, A. G. Wilson, "Loss Surfaces, Mode Connectivity,
       and Fast Ensembling of DNNs", NeurIPS 2018, arXiv:1802.10026.
    .. [2] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via
       Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    >>> b = {k: torch.randn_like(v) for k, v in a.items()}
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
    >>> result = fit_curve(model, a, b, data, epochs=2, generator=0)
    >>> result.status, result.n_iter, len(result.history)
    (<Status.SUCCESS: 0>, 2, 2)
    >>> torch.equal(result.curve(1.0)["0.weight"], b["0.weight"])
    True
    """
    model = _weights.check_model(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"`epochs` must be an int >= 0, got {epochs!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
        math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}")
    if proximal is not None and (
        isinstance(proximal, bool)
        or not isinstance(proximal, (int, float))
        or not (math.isfinite(proximal) and proximal > 0)
    ):
        raise ValueError(f"`proximal` must be None or a finite number > 0, got {proximal!r}")
    max_batches = renamed_keywords(renamed, {"max_batches_per_epoch": "max_batches"}, where="fit_curve").get(
        "max_batches", max_batches)
    max_batches = check_int(max_batches, "max_batches", minimum=1, allow_none=True)
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable, got {type(callback).__name__}")
    params_a = _weights.parameters_of(model, point_a, "point_a")
    params_b = _weights.parameters_of(model, point_b, "point_b")
    if not params_a:
        raise ValueError("`model` has no parameter to interpolate")

    if isinstance(curve, str):
        if curve not in _CURVE_BUILDERS:
            raise ValueError(f"unknown curve {curve!r}; expected one of {sorted(_CURVE_BUILDERS)}")
        start = _CURVE_BUILDERS[curve](params_a, params_b)
    elif isinstance(curve, Curve):
        _weights.check_curve_matches_model(model, curve.names, curve.shapes)
        ordered_a = {k: params_a[k] for k in curve.names}
        ordered_b = {k: params_b[k] for k in curve.names}
        ends, _, _ = _flatten_points([ordered_a, ordered_b], label="end points")
        same, why = _ends_match(curve, ends)
        if not same:
            raise ValueError(f"`curve` was fitted for other end points: {why}")
        start = curve
    else:
        raise TypeError(f"`curve` must be a family name or a Curve, got {type(curve).__name__}")
    if not any(start.trainable):
        raise ValueError(
            f"a {type(start).__name__} with no trainable point has nothing to fit; use curve='bezier' or "
            "'polychain' (or free the end points)"
        )

    t_generator = as_generator(generator)
    if t_generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU generator, got one on {t_generator.device}")
    stepper = _CurveStepper(
        model,
        start,
        weight_decay=weight_decay,
        proximal=proximal,
        loss_fn=loss_fn if loss_fn is not None else classification_loss,
        optimizer=optimizer,
        adversarial=adversarial,
    )
    # The attack draws its random starts (and dropout masks) from its own generator: the t generator then draws one
    # value per global batch on every rank, whatever the size of the rank's slice, and each rank attacks its slice
    # with its own noise. Re-seeded per epoch from (seed, rank, epoch), so a resumed fit needs only the seed.
    attack_seed = int(torch.randint(0, 2**62, (1,), generator=t_generator)) if adversarial is not None else None
    broadcast_([stepper.points])  # every rank starts from rank 0's points, as DistributedDataParallel does
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        stepper.optimizer, lr_lambda if lr_lambda is not None else paper_lr_factor
    )
    config = _config(start, weight_decay, proximal, max_batches, adversarial)
    config["end points"] = _fingerprint(start._flat[[0, -1]])
    history: list[dict[str, Any]] = []
    first_epoch = 0
    saved = EpochCheckpoint(
        checkpoint, _CHECKPOINT_KIND, config=config, loader=train_loader,
        objects={"points": stepper.points, "anchor": stepper.anchor, "optimizer": stepper.optimizer,
                 "scheduler": scheduler, "t_generator": t_generator},
    )  # fmt: skip
    resumed = saved.restore()
    if resumed is not None:
        history, first_epoch = [dict(r) for r in resumed["history"]], int(resumed["epoch"])
        if attack_seed is not None:
            attack_seed = int(resumed["attack_seed"])
        logger.info("resuming curve fit from %s at epoch %d", checkpoint, first_epoch)

    status, message = Status.SUCCESS, f"completed {epochs} epochs"
    for epoch in range(first_epoch, epochs):
        lr = float(stepper.optimizer.param_groups[0]["lr"])
        started = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=stepper.device)
        count = 0
        batches = 0
        if attack_seed is not None:
            stepper.attack_generator = torch.Generator().manual_seed(
                stable_seed("fit_curve attack", attack_seed, rank(), epoch)
            )
        with _weights.module_mode(model, True):
            for index, batch in enumerate(train_loader):
                if max_batches is not None and index >= max_batches:
                    break
                x, y = split_batch(batch, stepper.device, "train_loader")
                if y is None:
                    raise TypeError("`train_loader` must yield (inputs, targets) pairs")
                if epoch == first_epoch and index == 0:
                    check_same_batch(x, y, label="train_loader")
                x, y, share = shard_batch(x, y, label="train_loader")
                t = float(torch.rand((), dtype=torch.float64, generator=t_generator))
                check = "train_loader" if (epoch == first_epoch and index == 0) else None
                stats = stepper.step(x, y, t, check, share)
                b = int(y.shape[0])
                sums += stats * torch.tensor([b, b, 1.0], dtype=torch.float64, device=stats.device)
                count += b
                batches += 1
        if batches == 0:
            raise ValueError("`train_loader` yielded no batch")
        if is_distributed():  # the global batches' sums; `batches` counts global batches, equal on every rank
            sums = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(count)])]))
            sums, count = sums[:3], int(sums[3])
        scheduler.step()
        loss_sum, objective_sum, correct = sums.tolist()
        record = {
            "epoch": epoch,
            "loss": loss_sum / count,
            "objective": objective_sum / count,
            "accuracy": correct / count,
            "lr": lr,
            "time": time.perf_counter() - started,
            "batches": batches,
        }
        if not (math.isfinite(record["loss"]) and math.isfinite(record["objective"])):
            raise NonFiniteError(
                f"the curve's training loss became {record['loss']} (objective {record['objective']}) during epoch "
                f"{epoch}; lower the learning rate or check the end points"
            )
        history.append(record)
        logger.debug("curve epoch %d: %s", epoch, record)
        saved.save({"epoch": epoch + 1, "history": history, "attack_seed": attack_seed},
                   at_epoch_end=max_batches is None or batches < max_batches)  # fmt: skip
        if callback is not None and callback(dict(record)) is True:
            status = Status.CALLBACK
            message = f"stopped by the callback after epoch {epoch} ({epoch + 1} of {epochs} done)"
            break

    n_iter = len(history)
    return CurveResult(
        curve=stepper.fitted_curve(),
        history=tuple(history),
        n_iter=n_iter,
        converged=status == 0,
        status=status,
        message=message,
        fun=history[-1]["objective"] if history else math.nan,
    )
