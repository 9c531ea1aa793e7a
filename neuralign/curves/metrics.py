"""Loss and accuracy of a network on a loader, at its own weights or at given ones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from neuralign._utils import as_generator
from neuralign.attacks import PGD
from neuralign.curves._weights import evaluate

__all__ = ["evaluate_model"]


def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    adversarial: PGD | None = None,
    generator: torch.Generator | int | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy of the main logits and accuracy (a fraction) over ``loader``, in eval mode.

    With ``adversarial``, the robust loss and accuracy: each batch is replaced by its PGD examples against the
    model at ``params``/``buffers`` in eval mode (:class:`neuralign.attacks.PGD`; inputs in [0, 1]).

    Parameters
    ----------
    model : nn.Module
        The network; evaluated with :func:`torch.func.functional_call`, its mode and weights untouched.
    loader : iterable
        ``(inputs, targets)`` batches, moved to the model's device.
    params, buffers : dict, optional
        Weights and buffers (e.g. a point on a curve and re-estimated batch-norm statistics); default the model's.
    adversarial : PGD, optional
        Attack every batch first.
    generator : torch.Generator or int, optional
        Source of the attack's random starts (a CPU generator, whose state advances, or a seed).

    Returns
    -------
    loss, accuracy : float, float

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
    >>> x = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> loss, acc = evaluate_model(net, [(x, torch.tensor([0, 1]))])
    >>> round(loss, 4), acc
    (0.1269, 1.0)
    """
    if params is None:
        params = dict(model.named_parameters())
    if buffers is None:
        buffers = dict(model.named_buffers())
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    device = next(iter(params.values())).device if params else torch.device("cpu")
    gen = None if adversarial is None else as_generator(generator)
    return evaluate(model, params, buffers, loader, device, "loader", adversarial=adversarial, generator=gen)
