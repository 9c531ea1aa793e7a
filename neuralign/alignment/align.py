"""Neuron alignment: the permutation of model B's hidden units that best matches model A's."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuralign._utils import as_generator, check_compatible
from neuralign.alignment.permutation import (
    Permutation,
    apply_permutation,
    identity_permutation,
    validate_permutation,
)
from neuralign.alignment.spec import PermutationSpec, _segments_for
from neuralign.alignment.stats import activation_moments
from neuralign.alignment.trace import trace_spec
from neuralign.errors import ConvergenceWarning, SpecError
from neuralign.optim import solve_assignment

__all__ = ["AlignmentResult", "align", "weight_similarity", "ALIGNMENT_METHODS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignmentResult:
    """The permutation that maps model B onto model A, with diagnostics.

    Attributes
    ----------
    perms : dict[str, LongTensor]
        Per group, ``perm`` such that ``apply_permutation(B, spec, perms)`` is B aligned to A
        (``B_aligned[i] = B[perm[i]]``: unit ``i`` of A is matched with unit ``perm[i]`` of B).
    spec : PermutationSpec
    method : str
    similarity : dict[str, Tensor]
        Per group, the ``K x K`` (float64, CPU) matrix whose assignment was solved (maximised): the summed
        correlation matrices of the group's taps (``"correlation"``), the summed cross moments (``"l2"``), or the
        weight inner products at the last sweep (``"weight"``).
    objective_before, objective_after : dict[str, float]
        Per group, :math:`\\sum_i S_{i,i}` and :math:`\\sum_i S_{i,\\pi(i)}` of ``similarity``.
    correlation_before, correlation_after : dict[str, float]
        Per group, the mean Pearson correlation between matched units (averaged over the group's taps), before
        and after alignment: the paper's "correlation signature". Empty when no data was used.
    fun : float
        Sum of ``objective_after`` over groups.
    n_iter : int
        Sweeps of weight matching (1 for the data-driven methods).
    converged, status, message
        ``status`` 0: solved; 1: weight matching hit ``max_iter`` before a sweep without change.
    """

    perms: dict[str, torch.Tensor]
    spec: PermutationSpec
    method: str
    similarity: dict[str, torch.Tensor]
    objective_before: dict[str, float]
    objective_after: dict[str, float]
    correlation_before: dict[str, float] = field(default_factory=dict)
    correlation_after: dict[str, float] = field(default_factory=dict)
    fun: float = 0.0
    n_iter: int = 1
    converged: bool = True
    status: int = 0
    message: str = ""


def _matched(S: torch.Tensor, perm: torch.Tensor) -> float:
    return float(S[torch.arange(S.shape[0]), perm.cpu()].sum())


def _solve(S: torch.Tensor, group: str) -> torch.Tensor:
    return solve_assignment(S, maximize=True, name=group).perm.cpu()


def _data_similarity(moments, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per group: the matrix to maximise and the tap-averaged correlation matrix."""
    sim, corr = {}, {}
    for g, ms in moments.items():
        c = sum(m.correlation() for m in ms)
        corr[g] = c / len(ms)
        sim[g] = c if kind == "correlation" else sum(m.cross for m in ms)
    return sim, corr


def _unit_rows(tensor: torch.Tensor, axis: int, offset: int, seg) -> torch.Tensor:
    """The rows of one group inside one tensor axis, as a ``(units, rest)`` matrix."""
    moved = tensor.movedim(axis, 0)[offset : offset + seg.length]
    return moved.reshape(seg.size, -1)


def weight_similarity(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    group: str,
    keys: Iterable[str] | None = None,
) -> torch.Tensor:
    """Weight-matching matrix of one group with every other group held at ``perms``.

    .. math::  S_g = \\sum_{(W, \\text{axis}) \\ni g} W^A_{(g)} \\, \\big(\\Pi_{-g} W^B\\big)_{(g)}^\\top

    where :math:`W_{(g)}` are the rows of ``W`` along ``axis`` that belong to ``g`` (a ``K x rest`` matrix) and
    :math:`\\Pi_{-g}` applies all permutations except ``g``'s. Maximising :math:`\\langle S_g, P_g\\rangle` over
    :math:`P_g` is one coordinate step of weight matching (Ainsworth et al. 2023).
    """
    others = dict(perms)
    others[group] = torch.arange(spec.sizes[group])
    keys = set(keys) if keys is not None else set(spec.axes)
    involved = {k for k, a in spec.perm_to_axes[group] if k in keys}
    sub_a = {k: state_a[k] for k in involved}
    sub_b = apply_permutation({k: state_b[k] for k in involved}, spec.restrict(involved), others)
    n = spec.sizes[group]
    S = torch.zeros(n, n, dtype=torch.float64)
    for key in involved:
        for axis, action in spec.axes[key].items():
            for offset, seg in _segments_for(action):
                if seg.group == group:
                    a = _unit_rows(sub_a[key].detach().double().cpu(), axis, offset, seg)
                    b = _unit_rows(sub_b[key].detach().double().cpu(), axis, offset, seg)
                    S += a @ b.T
    return S


def _weight_matching(state_a, state_b, spec, keys, *, max_iter: int, generator) -> tuple[Permutation, dict, int, bool]:
    perms = identity_permutation(spec)
    gen = as_generator(generator)
    for sweep in range(1, max_iter + 1):
        changed = False
        order = torch.randperm(len(spec.groups), generator=gen).tolist()
        sims = {}
        for i in order:
            g = spec.groups[i]
            S = weight_similarity(state_a, state_b, spec, perms, g, keys)
            new = _solve(S, g)
            # accept only strict improvements so that ties cannot make the sweep cycle
            if _matched(S, new) > _matched(S, perms[g]) + 1e-12 * max(1.0, abs(_matched(S, perms[g]))):
                perms[g] = new
                changed = True
            sims[g] = S
        if not changed:
            return perms, sims, sweep, True
    return perms, sims, max_iter, False


ALIGNMENT_METHODS = ("correlation", "l2", "weight")


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable | None = None,
    *,
    method: str = "correlation",
    spec: PermutationSpec | None = None,
    activations: str | None = None,
    max_batches: int | None = None,
    max_iter: int = 100,
    generator: torch.Generator | int | None = None,
    example_input: Any = None,
    callback: Callable[[int], Any] | None = None,
) -> AlignmentResult:
    """Find the permutation of B's hidden units that best matches A's (neuron alignment).

    For each permutation group :math:`g` with similarity matrix :math:`S_g` between A's units (rows) and B's
    units (columns), solve the linear assignment problem

    .. math::  \\pi_g = \\arg\\max_{\\pi \\in S_{K_g}} \\sum_{i=1}^{K_g} (S_g)_{i, \\pi(i)}

    with the Hungarian method. The methods differ in :math:`S_g`:

    * ``"correlation"`` (Tatro et al. 2020): :math:`(S_g)_{ij}` is the Pearson correlation of A's unit ``i`` and
      B's unit ``j`` over the data, every spatial position a sample, post-activation; for groups tied by residual
      additions the correlation matrices of all tied activations are summed.
    * ``"l2"``: the uncentred cross moment :math:`E[a_i b_j]`; maximising it minimises
      :math:`\\sum_i E\\|a_i - b_{\\pi(i)}\\|^2`. Pre-activations by default, as in the paper's appendix variant.
    * ``"weight"`` (Ainsworth et al. 2023): data-free weight matching, maximising
      :math:`\\sum_\\ell \\langle W^A_\\ell, P_\\ell W^B_\\ell P_{\\ell-1}^\\top\\rangle` by coordinate ascent over
      groups (one assignment each, random order) until a sweep changes nothing.

    Parameters
    ----------
    model_a, model_b : nn.Module
        The target and the model to permute; same architecture. Neither is modified.
    loader : iterable, optional
        Batches of inputs (or ``(inputs, targets)``), e.g. the paper's first 10k training images with test-time
        transforms in a fixed order. Required for ``"correlation"`` and ``"l2"``; optional for ``"weight"``
        (then used only to report correlations).
    method : {"correlation", "l2", "weight"}
    spec : PermutationSpec, optional
        Traced from ``model_a`` when omitted (on the loader's first batch or ``example_input``).
    activations : {"post", "pre"}, optional
        Where activations are read; default ``"post"`` for correlation and ``"pre"`` for l2.
    max_batches : int, optional
        Use at most this many batches of ``loader``.
    max_iter : int
        Sweeps of weight matching.
    generator : torch.Generator or int, optional
        Group order of weight matching.
    example_input : Tensor, optional
        Needed to trace the spec for ``"weight"`` without a loader.
    callback : callable, optional
        Called with the number of batches processed (progress).

    Returns
    -------
    AlignmentResult

    Raises
    ------
    ShapeMismatchError
        If the models differ in parameter names or shapes (names the first one).
    ValueError
        Unknown method, empty loader, or a data method without a loader.
    NonFiniteError
        If an activation is NaN or infinite (names the layer).

    References
    ----------
    .. [1] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
    .. [2] Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, arXiv:2209.04836.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from neuralign.alignment import apply_permutation, invert_permutation, random_permutation, trace_spec
    >>> a = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> x = torch.randn(256, 5)
    >>> spec = trace_spec(a, x)
    >>> p = random_permutation(spec, generator=0)
    >>> b = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> b.load_state_dict(apply_permutation(a.state_dict(), spec, p))
    <All keys matched successfully>
    >>> res = align(a, b, [x])
    >>> bool(torch.equal(res.perms["0"], invert_permutation(p)["0"]))
    True
    """
    if method not in ALIGNMENT_METHODS:
        raise ValueError(f"unknown method '{method}'; expected one of {list(ALIGNMENT_METHODS)}")
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError("`model_a` and `model_b` must be nn.Module instances")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible(state_a, state_b)
    if method in ("correlation", "l2") and loader is None:
        raise ValueError(f"method '{method}' needs a `loader` of inputs")
    kind = activations or ("pre" if method == "l2" else "post")
    moments = None
    if loader is not None:
        spec, moments = activation_moments(
            model_a, model_b, loader, spec, kind=kind, max_batches=max_batches, callback=callback
        )
    elif spec is None:
        if example_input is None:
            raise ValueError("method 'weight' without a loader needs `spec` or `example_input` to trace the model")
        spec = trace_spec(model_a, example_input)
    spec.validate(state_a, name="model_a")

    corr: dict[str, torch.Tensor] = {}
    n_iter, converged, status, message = 1, True, 0, "solved one assignment per group"
    if moments is not None:
        sim, corr = _data_similarity(moments, method)
    if method == "weight":
        keys = {k for k, _ in model_a.named_parameters()}
        if not any(k in keys for k in spec.axes):
            raise SpecError("the spec permutes no parameter; weight matching has nothing to match")
        perms, sim, n_iter, converged = _weight_matching(
            state_a, state_b, spec, keys, max_iter=max_iter, generator=generator
        )
        status = 0 if converged else 1
        message = (
            f"weight matching converged after {n_iter} sweeps"
            if converged
            else f"weight matching stopped after max_iter={max_iter} sweeps while still changing"
        )
        if not converged:
            warnings.warn(message + "; raise `max_iter`", ConvergenceWarning, stacklevel=2)
    else:
        perms = {g: _solve(S, g) for g, S in sim.items()}
    validate_permutation(spec, perms)
    ident = identity_permutation(spec)
    before = {g: _matched(sim[g], ident[g]) for g in spec.groups}
    after = {g: _matched(sim[g], perms[g]) for g in spec.groups}
    corr_before = {g: _matched(c, ident[g]) / spec.sizes[g] for g, c in corr.items()}
    corr_after = {g: _matched(c, perms[g]) / spec.sizes[g] for g, c in corr.items()}
    logger.info("aligned %d groups with method %s", len(spec.groups), method)
    return AlignmentResult(
        perms=perms,
        spec=spec,
        method=method,
        similarity=sim,
        objective_before=before,
        objective_after=after,
        correlation_before=corr_before,
        correlation_after=corr_after,
        fun=float(sum(after.values())),
        n_iter=n_iter,
        converged=converged,
        status=status,
        message=message,
    )
