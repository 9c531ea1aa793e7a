"""Loss and accuracy of a network on a loader, at its own weights or at given ones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from neuralign.curves.bn import _evaluate

__all__ = ["evaluate_model"]


def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy of the main logits and accuracy (a fraction) over ``loader``, in eval mode.

    Parameters
    ----------
    model : nn.Module
        The network; evaluated with :func:`torch.func.functional_call`, its mode and weights untouched.
    loader : iterable
        ``(inputs, targets)`` batches, moved to the model's device.
    params, buffers : dict, optional
        Weights and buffers (e.g. a point on a curve and re-estimated batch-norm statistics); default the model's.

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
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return _evaluate(model, params, buffers, loader, device, "loader")
