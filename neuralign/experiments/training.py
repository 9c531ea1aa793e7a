"""Endpoint training with the paper's recipe, checkpointed every epoch and resumable after an interruption."""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuralign._distributed import (
    all_reduce_sum,
    broadcast_,
    check_same_batch,
    is_distributed,
    shard_batch,
    sum_gradients_,
)
from neuralign._epochs import EpochCheckpoint
from neuralign._options import Options, renamed_keywords
from neuralign._utils import as_generator, classification_loss, flat_logits, split_logits
from neuralign._validate import check_choice, check_int, check_real
from neuralign.attacks import PGD
from neuralign.curves import evaluate_model, garipov_lr_factor, paper_lr_factor
from neuralign.errors import NonFiniteError
from neuralign.status import Status

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "TrainResult", "TrainingOptions", "train_model"]

logger = logging.getLogger(__name__)


#: The learning-rate schedules of :class:`TrainingOptions`.
LR_SCHEDULES = ("paper", "garipov")
#: The optimizers of :func:`train_model`.
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainingOptions(Options):
    """A training recipe of the study: epochs, learning rate, weight decay, schedule and optimizer (the paper's
    Nesterov SGD, momentum 0.9, or AdamW), for end points (:func:`train_model`) and curves
    (:func:`~neuralign.curves.fit_curve`, the x-steps of :func:`~neuralign.curves.fit_curve_pam`).

    Attributes
    ----------
    epochs : int
        Epochs (>= 1; the paper: 250).
    lr : float
        Initial learning rate (> 0; default 0.1).
    weight_decay : float
        L2 penalty (>= 0; default 5e-4).
    schedule : {"paper", "garipov"}
        The learning-rate factor per epoch: ``"paper"`` (:func:`~neuralign.curves.paper_lr_factor`, halved every 20
        epochs) or ``"garipov"`` (:func:`~neuralign.curves.garipov_lr_factor`, the official robust schedule).
    optimizer : {"sgd", "adamw"}
        ``"sgd"`` (default, the paper's): Nesterov SGD, momentum 0.9. ``"adamw"``: AdamW (Loshchilov & Hutter 2019,
        arXiv:1711.05101), the usual optimizer of transformers such as ``tinylm``, which SGD does not train (see
        :func:`train_model`); it wants a smaller ``lr`` (e.g. 5e-3 for ``tinylm``). End points take ``weight_decay``
        in the optimizer (decoupled for AdamW); curves keep it as the L2 term of their objective, so their AdamW
        has no decay of its own (:meth:`curve_optimizer`). A configuration written before this option reads as
        ``"sgd"``.

    Raises
    ------
    TypeError, ValueError
        For a setting of the wrong kind or out of its range (names it).
    """

    epochs: int = 250
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "paper"
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        self._check("epochs", check_int, minimum=1)
        self._check("lr", check_real, low=0.0, low_open=True)
        self._check("weight_decay", check_real, low=0.0)
        check_choice(self.schedule, "schedule", LR_SCHEDULES)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)

    def lr_lambda(self) -> Callable[[int], float]:
        """The learning-rate factor per epoch for a run of ``epochs`` epochs (for ``LambdaLR``)."""
        if self.schedule == "garipov":
            return functools.partial(garipov_lr_factor, epochs=self.epochs)
        return paper_lr_factor

    def curve_optimizer(self) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        """The ``optimizer`` factory of :func:`~neuralign.curves.fit_curve` and
        :func:`~neuralign.curves.fit_curve_pam` for this recipe: ``params -> `` Nesterov SGD (momentum 0.9) or AdamW
        at ``lr``, with no weight decay of its own (the curve objective holds the L2 term ``weight_decay``).

        >>> opt = TrainingOptions(lr=0.01, optimizer="adamw").curve_optimizer()([torch.zeros(3, requires_grad=True)])
        >>> type(opt).__name__, opt.defaults["lr"], opt.defaults["weight_decay"]
        ('AdamW', 0.01, 0.0)
        """
        return functools.partial(_make_optimizer, self.optimizer, lr=self.lr, weight_decay=0.0)


def _make_optimizer(
    name: str, params: Iterable[torch.Tensor], *, lr: float, weight_decay: float, momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS` over ``params`` (SGD's Nesterov momentum only when > 0)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_model`.

    Attributes
    ----------
    state_dict : dict[str, Tensor]
        The trained parameters and buffers.
    history : list of dict
        Per epoch: ``epoch``, ``lr``, ``train_loss``, ``train_acc`` (running means over the epoch's batches) and,
        with a test loader, ``test_loss`` and ``test_acc``; ``seconds``.
    n_iter : int
        Epochs completed.
    converged, status, message
        ``status``: ``Status.SUCCESS`` when all epochs ran, ``Status.CALLBACK`` when the callback stopped it.
    """

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = True
    status: Status = Status.SUCCESS
    message: str = ""


def train_model(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    lr_lambda: Callable[[int], float] | None = None,
    test_loader: Iterable | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    checkpoint: str | os.PathLike | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    max_batches: int | None = None,
    adversarial: PGD | None = None,
    generator: torch.Generator | int | None = None,
    optimizer: str = "sgd",
    **renamed: Any,
) -> TrainResult:
    """Train a copy of ``model`` with SGD, the recipe of Tatro et al. (2020) for end points (standard or robust).

    .. math::  \\min_w \\; \\mathbb{E}_{(x, y)} \\, \\ell(f(x; w), y) + \\tfrac{\\lambda}{2} \\|w\\|^2

    with Nesterov SGD (momentum 0.9), learning rate ``lr * lr_lambda(epoch)`` stepped once per epoch (default
    :func:`~neuralign.curves.paper_lr_factor`, ``0.5 ** (e // 20) * 0.9996 ** e``), weight decay in the optimizer.
    With ``adversarial``, Madry et al.'s robust training (arXiv:1706.06083): :math:`x` is replaced by its PGD
    example :math:`x' = \\mathrm{PGD}(x, y; w)`, generated with the network in train mode (batch statistics), as the
    official ``train_model_adversarial.py`` does; the loss is on the adversarial examples only. The official robust
    schedule is ``lr_lambda=functools.partial(garipov_lr_factor, epochs=epochs)``
    (:func:`~neuralign.curves.garipov_lr_factor`) with the default SGD settings (PAPER_NOTES §4).

    Parameters
    ----------
    model : nn.Module
        The initial network; it is copied, never modified.
    train_loader : iterable
        ``(inputs, targets)`` batches (with the training augmentation).
    epochs : int
        Total number of epochs (a resumed run continues up to this number).
    lr, momentum, nesterov, weight_decay : float, float, bool, float
        SGD settings (PAPER_NOTES §5.4: 0.1, 0.9, True, 5e-4).
    lr_lambda : callable, optional
        Epoch -> learning-rate factor.
    test_loader : iterable, optional
        Evaluated after every epoch (eval mode) for the history.
    loss_fn : callable, optional
        ``loss_fn(output, targets)``; default cross-entropy (plus 0.3 x auxiliary heads for GoogLeNet).
    checkpoint : path-like, optional
        Written atomically after every epoch; if it exists when the call starts, training resumes from it (the same
        model shapes are required), giving the same result as an uninterrupted run on CPU.
    callback : callable, optional
        Called after every epoch with its record; returning True stops (``Status.CALLBACK``).
    max_batches : int, optional
        Cut epochs short (smoke tests; ``max_batches_per_epoch`` before 0.2, still accepted with a
        :class:`DeprecationWarning`).
    adversarial : PGD, optional
        Train on the attack's examples (:class:`neuralign.attacks.PGD`); inputs must be in [0, 1]. The attack does
        not update batch-norm running statistics; the forward pass on the adversarial examples does.
    generator : torch.Generator or int, optional
        Source of the attack's random starts (CPU; checkpointed with the run). Unused without ``adversarial``.
    optimizer : {"sgd", "adamw"}
        ``"sgd"``: the paper's SGD above. ``"adamw"``: AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101; torch's
        betas (0.9, 0.999)) with ``lr`` and ``weight_decay`` (decoupled), ``momentum`` and ``nesterov`` unused:
        the usual optimizer of transformers such as ``tinylm``, on which SGD at a learning rate fast enough to
        learn diverges (tried on ``pydoc``: lr 0.3 and 1.0 gave a NaN loss within the first epoch).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        For ``epochs < 1`` or an empty loader.
    NonFiniteError
        If the training loss becomes NaN or infinite.
    CheckpointError
        If ``checkpoint`` exists but belongs to another model or was written with other ``adversarial`` settings.
    WriteError
        If ``checkpoint`` cannot be written (a full disk): the checkpoint of the previous epoch is left in place,
        so a later call resumes from it.

    Notes
    -----
    Data-parallel under a torch.distributed process group (:mod:`neuralign._distributed`): every rank iterates the
    same ``train_loader`` (same seed, so the same global batches), trains on its slice of each batch, and the
    gradients of the global batch's mean loss are summed over the ranks in one all-reduce per step (each rank
    weights its loss by its share of the batch, which averages exactly even when the slices differ in size, where
    ``DistributedDataParallel``'s plain mean would not; the price is no overlap of communication with the backward
    pass). Batch norm normalises each slice with its own statistics and its running buffers are rank 0's, broadcast
    after every epoch (``DistributedDataParallel``'s ``broadcast_buffers``). Without batch norm an epoch equals the
    one-process epoch on the same global batches up to float rounding. Rank 0 writes the checkpoint; every rank
    resumes from it.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    >>> res = train_model(nn.Linear(4, 2), [(x, y)], epochs=3, lr=0.1)
    >>> len(res.history), res.status
    (3, <Status.SUCCESS: 0>)
    """
    check_int(epochs, "epochs", minimum=1)
    max_batches = renamed_keywords(renamed, {"max_batches_per_epoch": "max_batches"}, where="train_model").get(
        "max_batches", max_batches)
    check_int(max_batches, "max_batches", minimum=1, allow_none=True)
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    attack_settings = None if adversarial is None else adversarial.to_dict()
    # only an attack draws from it (None would otherwise take a seed from, and so shift, the global RNG)
    attack_generator = as_generator(generator) if adversarial is not None else None
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    loss_fn = loss_fn or classification_loss
    lr_lambda = lr_lambda or paper_lr_factor
    work = copy.deepcopy(model)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    config: dict[str, Any] = {"adversarial": attack_settings}
    if optimizer == "adamw":  # recorded only then, so that SGD checkpoints of before stay resumable
        config["optimizer"] = optimizer
    opt = _make_optimizer(optimizer, work.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum,
                          nesterov=nesterov)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    distributed = is_distributed()
    params = [p for p in work.parameters() if p.requires_grad]
    broadcast_(list(work.parameters()) + list(work.buffers()))  # rank 0's start everywhere, as DDP does
    history: list[dict[str, float]] = []
    start = 0
    saved = EpochCheckpoint(
        checkpoint, "train_model", config=config, loader=train_loader,
        objects={"model": work, "optimizer": opt, "scheduler": scheduler, "attack_generator": attack_generator},
    )  # fmt: skip
    resumed = saved.restore()
    if resumed is not None:
        history, start = list(resumed["history"]), int(resumed["epoch"])
        logger.info("resuming training from %s at epoch %d", checkpoint, start)
    status, message = Status.SUCCESS, f"trained for {epochs} epochs"
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        work.train()
        total, correct, loss_sum = 0, 0, 0.0
        finished = True
        for index, batch in enumerate(train_loader):
            if max_batches is not None and index >= max_batches:
                finished = False
                break
            x, y = batch[0].to(device), batch[1].to(device)
            if distributed and index == 0 and epoch == start:
                check_same_batch(x, y, label="train_loader")
            x, y, share = shard_batch(x, y, label="train_loader")
            if adversarial is not None:
                x = adversarial.attack(work, x, y, train=True, generator=attack_generator, loss_fn=loss_fn)
            out = work(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            if distributed:  # gradients (and the loss) of the global batch: this rank's share, summed over ranks
                (loss * share).backward()
                global_loss = sum_gradients_(params, loss.detach() * share)
            else:
                global_loss = loss.detach()
            if not torch.isfinite(global_loss):
                raise NonFiniteError(f"training loss is {global_loss.item()} at epoch {epoch}, batch {index}")
            if not distributed:
                loss.backward()
            opt.step()
            main, _ = split_logits(out)
            main, y = flat_logits(main, y)  # a language model: every token one example
            n = int(y.shape[0])
            total += n
            loss_sum += float(loss.detach()) * n
            correct += int((main.detach().argmax(-1) == y).sum())
        if distributed:  # the epoch's sums over every rank's slices; rank 0's batch-norm buffers on every rank
            total, correct, loss_sum = (
                float(v) for v in all_reduce_sum(torch.tensor([total, correct, loss_sum], dtype=torch.float64))
            )
            total, correct = int(total), int(correct)
            broadcast_(list(work.buffers()))
        if total == 0:
            raise ValueError("`train_loader` yielded no batches")
        record = {
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": loss_sum / total,
            "train_acc": correct / total,
        }
        scheduler.step()
        if test_loader is not None:
            record["test_loss"], record["test_acc"] = evaluate_model(work, test_loader)
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        saved.save({"epoch": epoch + 1, "history": history}, at_epoch_end=finished)
        logger.info("epoch %d: %s", epoch + 1, record)
        if callback is not None and callback(record):
            status, message = Status.CALLBACK, f"stopped by the callback after epoch {epoch + 1}"
            break
    final = {k: v.detach().clone() for k, v in work.state_dict().items()}
    if any(not torch.isfinite(v).all() for v in final.values() if v.is_floating_point()):
        raise NonFiniteError("the trained weights contain NaN or inf")
    return TrainResult(final, history, len(history), status == 0, status, message)

