"""Running an unmodified model at given weights: the helpers that curve fitting, evaluation along a curve,
batch-norm re-estimation, PAM on curves and alignment along a curve share.

Every function evaluates the model with :func:`torch.func.functional_call` on parameter and buffer dicts that it
owns, so the caller's model and its buffers are never modified. A private module of :mod:`neuralign.curves` (its
names are the package's, not the library's API).
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
from neuralign._utils import flat_logits, seeded_rng, split_batch, split_logits
from neuralign.attacks import PGD
from neuralign.errors import ShapeMismatchError

__all__ = [
    "attack",
    "bn_modules",
    "buffer_copies",
    "call",
    "check_curve_matches_model",
    "check_max_batches",
    "check_model",
    "evaluate",
    "load_weights",
    "module_mode",
    "parameters_of",
    "reestimate",
]

logger = logging.getLogger(__name__)


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return model


def parameters_of(model: nn.Module, state: Any, label: str) -> dict[str, torch.Tensor]:
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


def load_weights(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
    """Copy ``params`` (one entry per parameter, as :func:`parameters_of` gives: a tied parameter once) and the
    entries of ``buffers`` that name a buffer of ``model`` (non-persistent ones included) into ``model`` in place.

    ``load_state_dict`` would want every tied name and refuse non-persistent buffers (a language model's tied output
    head, RoPE's ``inv_freq``).
    """
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
        for name, value in buffers.items():
            if name in own:
                own[name].copy_(value)


def check_curve_matches_model(model: nn.Module, names: Iterable[str], shapes: Iterable[torch.Size]) -> None:
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


def buffer_copies(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: buf.detach().to(device=device, copy=True) for name, buf in model.named_buffers()}


@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[None]:
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


def call(
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


def attack(
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


def bn_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    ]


def reestimate(
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
    buffers = buffer_copies(model, device)
    modules = bn_modules(model)
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
    with torch.no_grad(), module_mode(model, True), rng:
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
                x = attack(adversarial, model, x, y, train=True, params=params, buffers=buffers, generator=generator,
                            check=check)  # fmt: skip
            for mean, var, count, _, _ in slots:
                mean.zero_()
                var.zero_()
                if count is not None:
                    count.zero_()
            call(model, params, buffers, x, check=check)
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


def evaluate(
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
    with torch.no_grad(), module_mode(model, False):
        for index, batch in enumerate(loader):
            x, y = split_batch(batch, device, label)
            if y is None:
                raise TypeError(f"`{label}` must yield (inputs, targets) pairs to measure loss and accuracy")
            if index == 0:
                check_same_batch(x, y, label=label)
            if not owns_batch(index):  # whole batches round-robin, as in reestimate
                continue
            check = label if count == 0 else None
            if adversarial is not None:
                x = attack(adversarial, model, x, y, train=False, params=params, buffers=buffers, generator=generator,
                            check=check)  # fmt: skip
            logits, _ = split_logits(call(model, params, buffers, x, check=check))
            logits, y = flat_logits(logits, y)  # a language model: every token one example
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=-1) == y).sum()
            count += int(y.shape[0])
    if is_distributed():
        totals = all_reduce_sum(torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(count))]))
        loss_sum, correct, count = totals[0], int(totals[1]), int(totals[2])
    if count == 0:
        raise ValueError(f"`{label}` yielded no batch")
    return float(loss_sum) / count, int(correct) / count


def check_max_batches(value: Any, label: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{label}` must be None or an int >= 1, got {value!r}")
    return value
