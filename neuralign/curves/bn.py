"""Batch-norm statistics along a curve.

Running statistics are not interpolated along a curve: at each evaluated weight vector they are reset and
re-estimated from data (Garipov et al. 2018, §A; Tatro et al. 2020). Every function here evaluates the model with
:func:`torch.func.functional_call` on parameter and buffer dicts that it owns, so the caller's model and its buffers
are never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from neuralign._utils import as_generator
from neuralign.attacks import PGD
from neuralign.curves import _weights

__all__ = ["reestimate_bn"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
def reestimate_bn(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    loader: Iterable,
    *,
    max_batches: int | None = None,
    adversarial: PGD | None = None,
    generator: torch.Generator | int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch-norm running statistics of ``model`` at weights ``params``, re-estimated exactly from ``loader``.

    For every batch-norm layer with running statistics, the running mean and variance are reset and set to the
    sample-weighted average of the per-batch statistics over the batches :math:`B_1, \\dots, B_K` of ``loader``:

    .. math::

        \\hat\\mu = \\frac{\\sum_k |B_k|\\, \\mu_{B_k}}{\\sum_k |B_k|}, \\qquad
        \\hat\\sigma^2 = \\frac{\\sum_k |B_k|\\, s^2_{B_k}}{\\sum_k |B_k|},

    where :math:`\\mu_{B_k}` and :math:`s^2_{B_k}` (unbiased) are the statistics the layer sees in train mode on
    batch :math:`k` of a forward pass at ``params``. This equals batch norm's own update
    :math:`r \\leftarrow (1 - m) r + m\\, s_{B_k}` with momentum :math:`m = |B_k| / (n_{\\text{seen}} + |B_k|)`
    (Garipov et al.'s ``bn_update``); here the per-batch statistics are read from each layer's update on zeroed
    buffer copies and averaged in float64, so that no attribute of the model is ever changed.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture; its parameters, buffers and attributes are not changed (its submodules' train/eval
        flags are set for the pass and restored afterwards).
    params : dict str -> Tensor
        The weights at which to run the model: every parameter of ``model`` (extra buffer entries of a full state
        dict are ignored). Their device is the device of the computation.
    loader : iterable
        Yields input tensors or ``(inputs, targets)`` tuples (targets unused), usually the training loader.
    max_batches : int, optional
        Use only the first ``max_batches`` batches (an approximation; see :func:`evaluate_curve`).
    adversarial : PGD, optional
        Re-estimate on PGD examples of each batch instead (:class:`neuralign.attacks.PGD`, generated at ``params``
        in train mode, as the official robust evaluation does); the loader must yield ``(inputs, targets)`` with
        inputs in [0, 1].
    generator : torch.Generator or int, optional
        Source of the attack's random starts and, with ``adversarial``, of the pass's dropout masks (run under
        :func:`torch.random.fork_rng`, leaving the global RNG as it was): a CPU generator, whose state advances, or
        a seed.

    Returns
    -------
    dict str -> Tensor
        Copies of all of ``model``'s buffers on the parameters' device, with the batch-norm statistics
        re-estimated (``num_batches_tracked`` holds the number of batches used); pass them with the parameters to
        :func:`torch.func.functional_call`.

    Raises
    ------
    ShapeMismatchError
        If ``params`` lacks a parameter of ``model`` or has one of another shape (names it).
    ValueError
        If ``loader`` yields no batch, or inputs the model cannot take (names the expected shape), or a batch
        norm has momentum 0.

    Notes
    -----
    Runs in train mode under ``torch.no_grad()``. A model without batch norm costs no data pass. Dropout, if any,
    is active during the pass, as in the reference implementations.

    Under a torch.distributed process group (:mod:`neuralign._distributed`) every rank iterates the same loader and
    runs whole batches round-robin (rank ``r`` of ``W`` takes batches ``r, r + W, ...``); the float64 sums and the
    counts are all-reduced, so the result, identical on every rank, is the one-process average above (to float64
    summation order) and ``num_batches_tracked`` the one-process batch count, whatever the world size. With
    ``adversarial`` each rank draws its batches' random starts from its own ``generator``, so those starts (and the
    result, in distribution only) differ from one process's.

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
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> params = dict(model.named_parameters())
    >>> x = torch.randn(10, 3)
    >>> buffers = reestimate_bn(model, params, [x[:6], x[6:]])
    >>> h = model[0](x).detach()
    >>> torch.allclose(buffers["1.running_mean"], h.mean(0), atol=1e-6)
    True
    >>> bool(model[1].running_mean.eq(0).all())     # the model is untouched
    True
    """
    model = _weights.check_model(model)
    max_batches = _weights.check_max_batches(max_batches, "max_batches")
    parameters = _weights.parameters_of(model, params, "params")
    if not parameters:
        raise ValueError("`model` has no parameter")
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    device = next(iter(parameters.values())).device
    gen = None if adversarial is None else as_generator(generator)
    return _weights.reestimate(model, parameters, loader, max_batches, device, adversarial=adversarial, generator=gen)
