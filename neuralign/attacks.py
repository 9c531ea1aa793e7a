"""Adversarial attacks on a network at given weights: L-infinity PGD (Madry et al. 2018), as used by Tatro et al.
(2020, §4) for robust end points, robust curves and their evaluation.

The attack runs the model with :func:`torch.func.functional_call` at a dict of parameters and buffers (a curve
point :math:`w(t)` and its re-estimated batch-norm statistics, say), so the same code attacks an end point, a
point on a curve or a module at its own weights, and never changes the module. It lives outside the four library
packages because training (``experiments``), curves and alignment all use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from neuralign._options import Options
from neuralign._utils import as_generator, classification_loss, seeded_rng
from neuralign._validate import check_bool, check_int, check_real

__all__ = ["PGD", "pgd_attack"]


@dataclass(frozen=True)
class PGD(Options):
    """Settings of an L-infinity PGD attack (see :func:`pgd_attack`); :meth:`attack` runs it.

    Attributes
    ----------
    eps : float
        Radius :math:`\\varepsilon \\ge 0` of the L-infinity ball, in input units ([0, 1] images). Default 8/255
        (CIFAR in Tatro et al. 2020; Tiny ImageNet: 4/255).
    alpha : float
        Step size :math:`\\alpha > 0` (default 2/255; Tiny ImageNet 1/255).
    steps : int
        Number of steps :math:`K \\ge 0` (default 5).
    random_start : bool
        Start from a uniform draw in the eps-ball (default True, as in the official code).

    Raises
    ------
    ValueError
        For a negative or non-finite ``eps``, ``alpha <= 0``, a negative or non-int ``steps``.

    Examples
    --------
    >>> PGD()
    PGD(eps=0.03137254901960784, alpha=0.00784313725490196, steps=5, random_start=True)
    >>> PGD.from_dict(PGD(eps=0.1).to_dict()) == PGD(eps=0.1)
    True
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 5
    random_start: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_real(self.eps, "eps", low=0.0))
        object.__setattr__(self, "alpha", check_real(self.alpha, "alpha", low=0.0, low_open=True))
        object.__setattr__(self, "steps", check_int(self.steps, "steps", minimum=0))
        self._check("random_start", check_bool)

    def attack(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        train: bool,
        params: Mapping[str, torch.Tensor] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | int | None = None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: :func:`pgd_attack` with these settings."""
        return pgd_attack(
            model,
            x,
            y,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            random_start=self.random_start,
            train=train,
            params=params,
            buffers=buffers,
            generator=generator,
            loss_fn=loss_fn,
        )


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 5,
    random_start: bool = True,
    train: bool,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | int | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """L-infinity projected gradient ascent on the loss of ``model`` at ``params`` (Madry et al. 2018).

    .. math::

        x^{0} = \\Pi\\bigl(x + u\\bigr), \\qquad
        x^{k+1} = \\Pi\\bigl(x^{k} + \\alpha \\, \\operatorname{sign} \\nabla_{x} \\ell(f(x^{k}; w), y)\\bigr),
        \\qquad \\Pi(z) = \\operatorname{clamp}_{[0, 1]}\\bigl(\\operatorname{clamp}_{[x - \\varepsilon,
        x + \\varepsilon]}(z)\\bigr),

    for :math:`k = 0, \\dots, K - 1`, with :math:`u \\sim U[-\\varepsilon, \\varepsilon]^d` (or :math:`u = 0`
    without a random start), :math:`\\ell` the mean cross-entropy (plus 0.3 x each auxiliary head for GoogLeNet's
    train-mode output), :math:`f(\\cdot; w)` the model at weights :math:`w` = ``params``. The result lies in the
    eps-ball around ``x`` and in :math:`[0, 1]` (Tatro et al. 2020, code ``utils/attack.py``).

    Parameters
    ----------
    model : nn.Module
        The architecture; run with :func:`torch.func.functional_call`, its parameters, buffers and train/eval
        flags are left as they were.
    x : Tensor
        Clean inputs in [0, 1], finite (normalisation belongs inside the model, e.g.
        ``nn.Sequential(torchvision.transforms.Normalize(mean, std), model)``: torchvision's transforms are
        modules), float, shape ``(N, ...)``, on the weights' device.
    y : Tensor
        Integer class labels (any integer dtype; used as int64), shape ``(N,)``.
    eps, alpha, steps, random_start : float, float, int, bool
        Ball radius (>= 0), step size (> 0), number of steps (>= 0), uniform random start (see :class:`PGD`).
    train : bool
        The mode the model runs in during the attack: True (batch statistics, as the official code generates
        training attacks) or False (running statistics, for evaluation). Required: the choice changes the attack.
    params : dict str -> Tensor, optional
        The weights to attack (e.g. a curve point :math:`w(t)`); default the model's own parameters. They are
        used detached: the attack adds no gradient to them.
    buffers : dict str -> Tensor, optional
        Buffers (batch-norm statistics); default the model's own. They are copied, so a train-mode attack never
        updates running statistics.
    generator : torch.Generator or int, optional
        Source of the random start and, in train mode, of the model's own randomness (dropout): a CPU generator
        (its state advances) or a seed; the draw is made on the CPU and moved to ``x``'s device, so a seed gives
        the same start on any device. A train-mode attack runs its forward passes under
        :func:`torch.random.fork_rng` with the global RNG seeded from this generator, so that it repeats with the
        seed and leaves the global RNG as it was.
    loss_fn : callable, optional
        ``(model output, targets) -> scalar`` to ascend; default cross-entropy as above.

    Returns
    -------
    Tensor
        The adversarial examples, detached, same shape, dtype and device as ``x``.

    Raises
    ------
    TypeError
        If ``x`` is not a floating-point tensor or ``y`` not an integer tensor (bool and float labels are refused).
    ValueError
        For bad settings, ``x`` and ``y`` of different lengths, or inputs outside [0, 1] or not finite.

    Notes
    -----
    Costs ``steps`` forward and backward passes of the model (the backward pass runs to the inputs only: the
    weights are detached); the loss at the returned point is left to the caller. With ``eps = 0`` the result
    equals ``x``.

    References
    ----------
    .. [1] A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu, "Towards Deep Learning Models Resistant to
       Adversarial Attacks", ICLR 2018, arXiv:1706.06083.
    .. [2] N. J. Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020,
       arXiv:2009.02439.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    >>> adv = pgd_attack(net, x, y, eps=0.1, alpha=0.05, steps=3, train=False, generator=0)
    >>> bool((adv - x).abs().max() <= 0.1 + 1e-7), bool(adv.min() >= 0 and adv.max() <= 1)
    (True, True)
    """
    settings = PGD(eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(train, bool):
        raise TypeError(f"`train` must be a bool (the mode of the attack), got {type(train).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"`y` must be an integer Tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")
    y = y.long()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"`x` has {x.shape[0]} examples but `y` has {y.shape[0]}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("`x` must be finite inputs in [0, 1], got NaN or infinite values")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(
            f"`x` must lie in [0, 1], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]: attack raw images "
            "and put the normalisation inside the model, e.g. "
            "nn.Sequential(torchvision.transforms.Normalize(mean, std), model)"
        )
    loss_fn = loss_fn if loss_fn is not None else classification_loss
    source = params if params is not None else dict(model.named_parameters())
    weights = {k: v.detach() for k, v in source.items()}
    own_buffers = buffers if buffers is not None else dict(model.named_buffers())
    x = x.detach()
    low, high = (x - settings.eps).clamp_(0.0, 1.0), (x + settings.eps).clamp_(0.0, 1.0)
    gen = None
    if settings.random_start and settings.eps > 0:
        gen = as_generator(generator)
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype, device=gen.device).to(x.device)
        adv = torch.minimum(torch.maximum(x + (2.0 * noise - 1.0) * settings.eps, low), high)
    else:
        adv = x.clone()
    if settings.steps == 0 or settings.eps == 0:
        return adv
    # train mode: dropout draws from a global RNG forked and seeded from the attack's generator
    rng = seeded_rng(gen or as_generator(generator), x.device) if train else contextlib.nullcontext()
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        with rng, torch.enable_grad():
            for _ in range(settings.steps):
                adv.requires_grad_(True)
                # fresh copies each step: train-mode batch norm writes its running statistics into the buffers
                state = {k: v.clone() for k, v in own_buffers.items()} if train else dict(own_buffers)
                loss = loss_fn(functional_call(model, (weights, state), (adv,)), y)
                (grad,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = torch.minimum(torch.maximum(adv + settings.alpha * grad.sign(), low), high)
    finally:
        for m, flag in saved:
            m.training = flag
    return adv.detach()
