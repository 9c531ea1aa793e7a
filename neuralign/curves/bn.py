"""Batch-norm statistics along a curve, and the helpers that run an unmodified model at given weights.

Running statistics are not interpolated along a curve: at each evaluated weight vector they are reset and
re-estimated from data (Garipov et al. 2018, §A; Tatro et al. 2020). Every function here evaluates the model with
:func:`torch.func.functional_call` on parameter and buffer dicts that it owns, so the caller's model and its buffers
are never modified.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from neuralign._distributed import all_reduce_, all_reduce_sum, check_same_batch, is_distributed, owns_batch
from neuralign._utils import as_generator, seeded_rng, split_batch, split_logits
from neuralign.attacks import PGD
from neuralign.errors import ShapeMismatchError

__all__ = ["reestimate_bn"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# private helpers shared by fit.py and evaluate.py
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _parameters_of(model: nn.Module, state: Any, label: str) -> dict[str, torch.Tensor]:
    """The parameter entries of ``state`` (a parameter dict or a full state dict; buffer entries are dropped).

    Raises ShapeMismatchError naming the first missing, unknown or mis-shaped parameter.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"`{label}` must be a dict name -> Tensor, got {type(state).__name__}")
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    first: dict[int, str] = {}
    tied = {}  # second and later names of a tied parameter -> its first name (the one named_parameters keeps)
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            tied[name] = first[id(p)]
    for key in state:
        if key in tied:
            if tied[key] in state and not torch.equal(state[key], state[tied[key]]):
                raise ShapeMismatchError(
                    f"`{label}` gives the tied parameters `{tied[key]}` and `{key}` different values"
                )
        elif key not in params and key not in buffers:
            raise ShapeMismatchError(f"`{label}` has an entry `{key}` that is not a parameter of `model`")
    out: dict[str, torch.Tensor] = {}
    for key, param in params.items():
        if key not in state:
            raise ShapeMismatchError(f"`{label}` has no parameter `{key}`, which `model` has")
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{label}` entry `{key}` must be a Tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(param.shape):
            raise ShapeMismatchError(
                f"`{label}` has parameter `{key}` of shape {tuple(value.shape)} but `model` has {tuple(param.shape)}"
            )
        out[key] = value
    return out


def _check_curve_matches_model(model: nn.Module, names: Iterable[str], shapes: Iterable[torch.Size]) -> None:
    params = dict(model.named_parameters())
    names = list(names)
    for name, shape in zip(names, shapes):
        if name not in params:
            raise ShapeMismatchError(f"`curve` has parameter `{name}`, which `model` lacks")
        if tuple(params[name].shape) != tuple(shape):
            raise ShapeMismatchError(
                f"`curve` has parameter `{name}` of shape {tuple(shape)} but `model` has {tuple(params[name].shape)}"
            )
    missing = [k for k in params if k not in set(names)]
    if missing:
        raise ShapeMismatchError(f"`curve` has no parameter `{missing[0]}`, which `model` has")


def _buffer_copies(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: buf.detach().to(device=device, copy=True) for name, buf in model.named_buffers()}


@contextlib.contextmanager
def _module_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Set train/eval mode for the duration of the block and restore every submodule's own flag afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _first_layer_hint(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            spatial = ", ".join("HWD"[i] if dims > 1 else "L" for i in range(dims))
            return (
                f"its first layer `{name}` is {module!r}, which expects inputs of shape "
                f"(N, {module.in_channels}, {spatial})"
            )
        if isinstance(module, nn.Linear):
            return (
                f"its first layer `{name}` is {module!r}, which expects {module.in_features} features per sample "
                "(after any flattening before it)"
            )
    return "it has no Conv or Linear layer from which to tell the expected input shape"


def _call(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    check: str | None = None,
) -> Any:
    """``model(x)`` at ``params``/``buffers``; with ``check`` (a loader's name) a failure names the expected shape."""
    if check is None:
        return functional_call(model, (params, buffers), (x,))
    try:
        return functional_call(model, (params, buffers), (x,))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise ValueError(
            f"`{check}` yielded inputs of shape {tuple(x.shape)} (dtype {x.dtype}) that the model cannot take: "
            f"{_first_layer_hint(model)}; the model raised: {exc}"
        ) from exc


def _attack(
    adversarial: PGD,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    train: bool,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    generator: torch.Generator | None,
    check: str | None = None,
    loss_fn: Any = None,
) -> torch.Tensor:
    """PGD examples of ``(x, y)`` at ``params``; with ``check`` (a loader's name) a failure names the expected shape."""
    try:
        return adversarial.attack(model, x, y, train=train, params=params, buffers=buffers, generator=generator,
                                  loss_fn=loss_fn)  # fmt: skip
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        if check is None:
            raise
        raise ValueError(
            f"`{check}` yielded inputs of shape {tuple(x.shape)} (dtype {x.dtype}) that the model cannot take: "
            f"{_first_layer_hint(model)}; the model raised: {exc}"
        ) from exc


def _bn_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    ]


def _reestimate(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    loader: Iterable,
    max_batches: int | None,
    device: torch.device,
    label: str = "loader",
    adversarial: PGD | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Core of :func:`reestimate_bn` without input validation."""
    buffers = _buffer_copies(model, device)
    modules = _bn_modules(model)
    if not modules:
        return buffers
    # Per batch, the layers' own update r <- (1 - m) r + m s runs on zeroed copies, so that s = r / m (m = 1 for
    # momentum=None with num_batches_tracked reset); the sample-weighted sums of s are kept in float64.
    slots = []
    for name, module in modules:
        prefix = f"{name}." if name else ""
        factor = 1.0 if module.momentum is None else float(module.momentum)
        if factor == 0.0:
            raise ValueError(f"batch norm `{name}` has momentum 0: its running statistics cannot be re-estimated")
        mean, var = buffers[prefix + "running_mean"], buffers[prefix + "running_var"]
        count = buffers.get(prefix + "num_batches_tracked")
        sums = (torch.zeros_like(mean, dtype=torch.float64), torch.zeros_like(var, dtype=torch.float64))
        slots.append((mean, var, count, factor, sums))
    seen = 0
    batches = 0
    # with an attack, the pass's own dropout also draws from a global RNG forked and seeded from the attack's
    # generator: a seeded robust evaluation repeats, whatever the global RNG
    forked = adversarial is not None and generator is not None
    rng = seeded_rng(generator, device) if forked else contextlib.nullcontext()
    with torch.no_grad(), _module_mode(model, True), rng:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            x, y = split_batch(batch, device, label)
            if index == 0:
                check_same_batch(x, y, label=label)
            if not owns_batch(index):  # whole batches round-robin: each batch's statistics are one process's
                continue
            check = label if batches == 0 else None
            if adversarial is not None:
                if y is None:
                    raise TypeError(f"`{label}` must yield (inputs, targets) pairs to attack them")
                # train mode (batch statistics), as the official PGD wrapper runs inside bn_update
                x = _attack(adversarial, model, x, y, train=True, params=params, buffers=buffers, generator=generator,
                            check=check)  # fmt: skip
            for mean, var, count, _, _ in slots:
                mean.zero_()
                var.zero_()
                if count is not None:
                    count.zero_()
            _call(model, params, buffers, x, check=check)
            b = int(x.shape[0])
            for mean, var, _, factor, (sum_mean, sum_var) in slots:
                sum_mean.add_(mean.double(), alpha=b / factor)
                sum_var.add_(var.double(), alpha=b / factor)
            seen += b
            batches += 1
    if is_distributed():  # sums over every rank's whole batches; the batch count is the global one
        for _, _, _, _, sums in slots:
            for part in sums:
                all_reduce_(part)
        seen, batches = (int(v) for v in all_reduce_sum(torch.tensor([seen, batches])).tolist())
    if seen == 0:
        raise ValueError(f"`{label}` yielded no batch: batch-norm statistics cannot be re-estimated")
    for mean, var, count, _, (sum_mean, sum_var) in slots:
        mean.copy_(sum_mean / seen)
        var.copy_(sum_var / seen)
        if count is not None:
            count.fill_(batches)
    return buffers


def _evaluate(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    loader: Iterable,
    device: torch.device,
    label: str,
    adversarial: PGD | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy of the main logits and accuracy (fraction) over ``loader``, eval mode, no grad (on PGD
    examples generated in eval mode at ``params``/``buffers`` with ``adversarial``)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    with torch.no_grad(), _module_mode(model, False):
        for index, batch in enumerate(loader):
            x, y = split_batch(batch, device, label)
            if y is None:
                raise TypeError(f"`{label}` must yield (inputs, targets) pairs to measure loss and accuracy")
            if index == 0:
                check_same_batch(x, y, label=label)
            if not owns_batch(index):  # whole batches round-robin, as in _reestimate
                continue
            check = label if count == 0 else None
            if adversarial is not None:
                x = _attack(adversarial, model, x, y, train=False, params=params, buffers=buffers, generator=generator,
                            check=check)  # fmt: skip
            logits, _ = split_logits(_call(model, params, buffers, x, check=check))
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=-1) == y).sum()
            count += int(y.shape[0])
    if is_distributed():
        totals = all_reduce_sum(torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(count))]))
        loss_sum, correct, count = totals[0], int(totals[1]), int(totals[2])
    if count == 0:
        raise ValueError(f"`{label}` yielded no batch")
    return float(loss_sum) / count, int(correct) / count


def _check_max_batches(value: Any, label: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{label}` must be None or an int >= 1, got {value!r}")
    return value


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
    model = _check_model(model)
    max_batches = _check_max_batches(max_batches, "max_batches")
    parameters = _parameters_of(model, params, "params")
    if not parameters:
        raise ValueError("`model` has no parameter")
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    device = next(iter(parameters.values())).device
    gen = None if adversarial is None else as_generator(generator)
    return _reestimate(model, parameters, loader, max_batches, device, adversarial=adversarial, generator=gen)
