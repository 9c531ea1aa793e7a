"""Functional equivalence of permuted networks: the property every permutation spec must satisfy."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from neuralign._utils import as_generator, split_logits
from neuralign.alignment.permutation import apply_permutation, random_permutation
from neuralign.alignment.spec import PermutationSpec

__all__ = ["EquivalenceResult", "check_equivalence"]


@dataclass(frozen=True)
class EquivalenceResult:
    """Outcome of :func:`check_equivalence`.

    Attributes
    ----------
    passed : bool
        Whether every trial matched within ``tol`` in every mode.
    max_diff_eval, max_diff_train : float
        Largest absolute output difference over the trials in eval mode (running statistics) and train mode
        (batch statistics; dropout disabled).
    unpermuted : list of str
        Parameters and buffers the spec never permutes (``num_batches_tracked`` excluded). For a network whose
        every hidden layer is permuted, these are only tensors on the input side or the output side.
    trials : int
    tol : float
    message : str
    """

    passed: bool
    max_diff_eval: float
    max_diff_train: float
    unpermuted: list[str]
    trials: int
    tol: float
    message: str


def _outputs(model: nn.Module, state: dict[str, torch.Tensor], x: Any) -> list[torch.Tensor]:
    args = x if isinstance(x, tuple) else (x,)
    out = functional_call(model, state, args)
    main, aux = split_logits(out)
    return [main, *aux]


def check_equivalence(
    model: nn.Module,
    spec: PermutationSpec,
    example_input: Any,
    *,
    trials: int = 3,
    generator: torch.Generator | int | None = None,
    tol: float = 1e-5,
) -> EquivalenceResult:
    """Check that random permutations of ``spec`` leave the function of ``model`` unchanged.

    For each trial a permutation :math:`P` is drawn uniformly, the state dict is permuted with
    :func:`~neuralign.alignment.apply_permutation`, and the outputs :math:`f(x; P\\theta)` and
    :math:`f(x; \\theta)` are compared in eval mode (batch norm with its running statistics, which must have been
    permuted consistently) and in train mode (batch statistics; dropout is switched off, since its random mask is
    drawn per position and cannot follow a relabelling).

    Parameters
    ----------
    model : nn.Module
        The network; it is copied, never modified.
    spec : PermutationSpec
        The spec to check, e.g. from :func:`~neuralign.alignment.trace_spec`.
    example_input : Tensor or tuple of Tensor
        A batch (of at least 2 examples when the model has batch norm).
    trials : int
        Number of random permutations.
    generator : torch.Generator or int, optional
        Source of the permutations.
    tol : float
        Largest absolute difference, relative to ``max(1, max|f(x)|)``, accepted as float error.

    Returns
    -------
    EquivalenceResult

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from neuralign.alignment import trace_spec
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.randn(5, 4)
    >>> check_equivalence(net, trace_spec(net, x), x, generator=0).passed
    True
    """
    if trials < 1:
        raise ValueError(f"`trials` must be at least 1, got {trials}")
    gen = as_generator(generator)
    work = copy.deepcopy(model)
    state = {k: v.detach() for k, v in work.state_dict().items()}
    spec.validate(state, name="model")
    device = next(iter(state.values())).device if state else torch.device("cpu")
    x = tuple(t.to(device) for t in example_input) if isinstance(example_input, tuple) else example_input.to(device)
    diffs = {"eval": 0.0, "train": 0.0}
    with torch.no_grad():
        for mode in diffs:
            work.train(mode == "train")
            for m in work.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
            base = _outputs(work, {k: v.clone() for k, v in state.items()}, x)
            scale = max(1.0, max(float(b.abs().max()) for b in base))
            for _ in range(trials):
                perms = random_permutation(spec, generator=gen, device=device)
                permuted = apply_permutation(state, spec, perms)
                out = _outputs(work, permuted, x)
                for b, o in zip(base, out):
                    diffs[mode] = max(diffs[mode], float((b - o).abs().max()) / scale)
    passed = diffs["eval"] <= tol and diffs["train"] <= tol
    message = (
        f"max relative difference {max(diffs.values()):.3g} over {trials} random permutations "
        f"({'within' if passed else 'ABOVE'} tol {tol:g})"
    )
    return EquivalenceResult(passed, diffs["eval"], diffs["train"], spec.unpermuted(state), trials, tol, message)
