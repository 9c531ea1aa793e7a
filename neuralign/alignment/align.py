"""Neuron alignment: the permutation of model B's hidden units that best matches model A's.

Why one module: the data methods (``"correlation"``, ``"l2"``) hand the units their data cannot decide (ties, dead
units) to weight matching, so :func:`align`, the data similarities and weight matching (its problem with cached
summands, greedy start and coordinate ascent) share one set of private helpers (``_WeightProblem``, ``_ascent``,
``_step``, ``_solve``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from neuralign._utils import as_generator, check_compatible
from neuralign._validate import check_bool
from neuralign.alignment.heads import head_blocks, match_heads
from neuralign.alignment.permutation import (
    Permutation,
    _axis_index,
    identity_permutation,
    random_permutation,
    validate_permutation,
)
from neuralign.alignment.spec import Action, PermutationSpec, Segment, _segments_for
from neuralign.alignment.stats import ActivationMoments, activation_moments, check_batch_budget
from neuralign.alignment.trace import trace_spec
from neuralign.attacks import PGD
from neuralign.errors import ConvergenceWarning, SpecError
from neuralign.optim import solve_assignment
from neuralign.status import Status

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
        weight inner products at the final permutation, every other group held at its final permutation
        (``"weight"``; accumulated in float32 when the weights' range allows, see ``align``). For the data methods
        the rows of A's dead units and the columns of B's are zero (the data
        says nothing about them; they are matched by weights, see ``dead_units``).
    objective_before, objective_after : dict[str, float]
        Per group, :math:`\\sum_i S_{i,i}` and :math:`\\sum_i S_{i,\\pi(i)}` of ``similarity``.
    correlation_before, correlation_after : dict[str, float]
        Per group, the mean Pearson correlation between matched units (averaged over the group's taps), before
        and after alignment, over the pairs whose two units are both live: the paper's "correlation signature".
        NaN for a group without such a pair (every unit dead, or no activation tap). Empty when no data was used.
    fun : float
        Sum of ``objective_after`` over groups.
    n_iter : int
        Sweeps of weight matching summed over restarts (``"weight"``), or 1 for the data-driven methods.
    converged, status, message
        ``status`` 0: solved; 1: a weight-matching coordinate ascent (the best restart of ``"weight"``, or the
        matching of dead units of the data methods) hit ``max_iter`` before a sweep without change (or, for
        ``"weight"`` with ``tol > 0``, one that raised the objective by at most ``tol`` of it).
    dead_units : dict[str, tuple[int, int]]
        Per group, the number of units of A and of B that were constant on the alignment data (at every tap of
        the group; all units of a group without an activation tap). Their assignment is decided by weight
        similarity among themselves. Empty when no data was used.
    restarts : int
        Coordinate-ascent runs of weight matching (1 for the data methods).
    restarts_agreed : int
        How many of those runs ended at the returned permutation (exactly, in every group).
    restart_objectives : tuple[float, ...]
        Weight-matching objective :math:`\\sum_\\ell \\langle W^A_\\ell, \\Pi(W^B)_\\ell\\rangle` (over the permuted
        parameters) at the end of each run, in run order; empty for the data methods.
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
    status: Status = Status.SUCCESS
    message: str = ""
    dead_units: dict[str, tuple[int, int]] = field(default_factory=dict)
    restarts: int = 1
    restarts_agreed: int = 1
    restart_objectives: tuple[float, ...] = ()


def _matched(S: torch.Tensor, perm: torch.Tensor) -> float:
    return float(S[torch.arange(S.shape[0]), perm.cpu()].double().sum())


def _solve(S: torch.Tensor, group: str) -> torch.Tensor:
    return solve_assignment(S, maximize=True, name=group).perm.cpu()


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# data similarity


@dataclass(frozen=True)
class _DataGroup:
    similarity: torch.Tensor  # K x K, float64, dead rows / columns zero
    correlation: torch.Tensor | None  # tap-averaged correlation, None without a tap
    dead_a: torch.Tensor  # (K,) bool
    dead_b: torch.Tensor  # (K,) bool


def _data_similarity(moments: Mapping[str, list[ActivationMoments]], spec: PermutationSpec, kind: str):
    """Per group: the matrix to maximise, the tap-averaged correlation and the units constant at every tap."""
    out = {}
    for g in spec.groups:
        ms, n = moments.get(g, []), spec.sizes[g]
        if not ms:
            every = torch.ones(n, dtype=torch.bool)
            out[g] = _DataGroup(torch.zeros(n, n, dtype=torch.float64), None, every, every)
            continue
        dead_a, dead_b = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
        for m in ms:
            if m.constant_a is not None:
                dead_a &= m.constant_a
                dead_b &= m.constant_b
            else:
                dead_a[:] = False
                dead_b[:] = False
        c = sum(m.correlation() for m in ms)
        sim = (c if kind == "correlation" else sum(m.cross for m in ms)).clone()
        sim[dead_a] = 0.0
        sim[:, dead_b] = 0.0
        out[g] = _DataGroup(sim, c / len(ms), dead_a, dead_b)
    return out


def _live_mean(corr: torch.Tensor, perm: torch.Tensor, live_a: torch.Tensor, live_b: torch.Tensor) -> float:
    """Mean of ``corr[i, perm[i]]`` over the pairs whose two units are live (NaN if there is none)."""
    perm = perm.cpu()
    both = live_a & live_b[perm]
    if not bool(both.any()):
        return float("nan")
    rows = torch.arange(corr.shape[0])[both]
    return float(corr[rows, perm[both]].mean())


# ---------------------------------------------------------------------------------------------------------------
# weight matching


def _unit_rows(tensor: torch.Tensor, axis: int, offset: int, seg: Segment) -> torch.Tensor:
    """The rows of one group inside one tensor axis, as a ``(units, rest)`` matrix."""
    moved = tensor.movedim(axis, 0)[offset : offset + seg.length]
    return moved.reshape(seg.size, -1)


@dataclass(frozen=True, eq=False)
class _Term:
    """The rows of one group in one axis of one tensor: a summand of the group's weight-matching matrix."""

    key: str
    axis: int
    offset: int
    seg: Segment
    deps: frozenset[str]  # groups acting on the tensor's other axes: the summand is exact once they are known
    width: int  # entries per unit
    informative: bool  # A's rows are not all equal (a freshly initialised batch-norm weight is not)
    rows_a: torch.Tensor  # (units, width) in the problem's dtype
    rows_b: torch.Tensor  # (units, width) in the problem's dtype, B's other axes not yet permuted
    columns: tuple[int, ...]  # the shape of a row: (expand, *the tensor's other axes)
    gathers: tuple[tuple[int, Action], ...]  # (dimension of ``columns``, action) for each other axis with a group


# float32 accumulates the similarities when every permuted tensor's largest entry lies in [2^-40, 2^40] (or is 0):
# then no product of two entries, nor a sum of them, leaves float32's range (2^-126 .. 2^128)
_FLOAT32_RANGE = (2.0**-40, 2.0**40)
# a coordinate step is kept when it gains more than this many units of the dtype's rounding times the
# Cauchy-Schwarz bound of the entries it exchanges (the rounding error of a similarity is far below it)
_ROUNDING_SLACK = 16


def _compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    for t in tensors:
        top = float(t.abs().max()) if t.numel() else 0.0
        if top != 0.0 and not _FLOAT32_RANGE[0] <= top <= _FLOAT32_RANGE[1]:
            return torch.float64
    return torch.float32


class _WeightProblem:
    """Weight matching between two state dicts over the permuted tensors in ``keys`` (CPU).

    Every summand's rows are reshaped once into contiguous matrices of ``dtype`` (default: float32 when no entry
    can overflow or underflow it, else float64), and the summand ``W^A_(g) (Pi W^B)_(g)^T`` is cached together with
    the permutations of the groups it depends on, so a similarity is recomputed only for the summands whose other
    axes changed. Objectives and bounds are computed in float64 from the original tensors.
    """

    def __init__(self, state_a, state_b, spec: PermutationSpec, keys: Iterable[str], dtype=None) -> None:
        self.spec = spec
        keys = set(keys)
        involved = sorted(k for k in spec.axes if k in keys)
        self.a = {k: state_a[k].detach().cpu() for k in involved}
        self.b = {k: state_b[k].detach().cpu() for k in involved}
        if dtype is None:
            dtype = _compute_dtype([*self.a.values(), *self.b.values()])
        self.dtype = dtype
        self.terms: dict[str, list[_Term]] = {g: [] for g in spec.groups}
        for key in involved:
            axes = spec.axes[key]
            a, b = self.a[key].to(dtype), self.b[key].to(dtype)
            for axis, action in axes.items():
                others = [ax for ax in range(a.dim()) if ax != axis]
                deps = frozenset(s.group for ax, act in axes.items() if ax != axis for s in act if s.group is not None)
                permuted = [i for i, ax in enumerate(others) if any(s.group is not None for s in axes.get(ax, ()))]
                gathers = tuple((1 + i, axes[others[i]]) for i in permuted)
                for offset, seg in _segments_for(action):
                    if seg.group is None:
                        continue
                    rows_a = _unit_rows(a, axis, offset, seg).contiguous()
                    rows_b = _unit_rows(b, axis, offset, seg).contiguous()
                    columns = (seg.expand, *(a.shape[ax] for ax in others))
                    informative = rows_a.numel() > 0 and bool((rows_a - rows_a[:1]).abs().amax() > 0)
                    width = rows_a.shape[1]
                    term = _Term(key, axis, offset, seg, deps, width, informative, rows_a, rows_b, columns, gathers)
                    self.terms[seg.group].append(term)
        # per group: the groups its similarity depends on, and the row norms of A and B (permutation invariant)
        self.neighbours = {g: sorted(set().union(*(t.deps for t in ts)) - {g}) for g, ts in self.terms.items()}
        self.norms = {g: self._row_norms(g) for g in spec.groups}
        self._cache: dict[_Term, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def _row_norms(self, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.spec.sizes[group]
        sq_a, sq_b = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for t in self.terms[group]:
            sq_a += torch.linalg.vector_norm(t.rows_a, dim=1).double().square()
            sq_b += torch.linalg.vector_norm(t.rows_b, dim=1).double().square()
        return sq_a.sqrt(), sq_b.sqrt()

    def _summand(self, t: _Term, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:math:`W^A_{(g)} (\\Pi_{-g} W^B)_{(g)}^\\top` for one term, from the cache when its groups are unchanged."""
        group = t.seg.group
        state = tuple(perms[h] for h in sorted(t.deps - {group}))
        hit = self._cache.get(t)
        if hit is not None and all(torch.equal(x, y) for x, y in zip(hit[0], state, strict=True)):
            return hit[1]
        b = t.rows_b
        if t.gathers:
            others = dict(perms)
            others[group] = torch.arange(t.seg.size)  # a group on two axes of one tensor: the other one held
            cols = torch.arange(t.width).reshape(t.columns)  # one gather of whole columns: faster than one per axis
            for dim, action in t.gathers:
                cols = cols.index_select(dim, _axis_index(action, others, cols.device))
            b = b.index_select(1, cols.reshape(-1))
        value = t.rows_a @ b.T
        if t.width > 1:  # an outer product (a bias, a batch-norm vector) is as cheap to redo as to keep
            self._cache[t] = (tuple(p.clone() for p in state), value)
        return value

    def similarity(self, perms: Mapping[str, torch.Tensor], group: str, terms: list[_Term] | None = None):
        """:math:`S_g` (``dtype``) with every other group at ``perms`` (only the given summands when ``terms`` is
        set)."""
        terms = self.terms[group] if terms is None else terms
        n = self.spec.sizes[group]
        S = torch.zeros(n, n, dtype=self.dtype)
        for t in terms:
            S += self._summand(t, perms)
        return S

    def gain(self, sims: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]):
        """How much more of the similarities ``sims`` (group -> ``S_g``) the permutations ``new`` match than ``old``;
        0 unless more than the rounding of the exchanged entries.

        The difference is summed in float64 over the rows that change only; it must exceed
        ``_ROUNDING_SLACK * eps(dtype) * sum_i |a_i| (|b_old(i)| + |b_new(i)|)`` (their Cauchy-Schwarz bounds, summed
        over the groups), so rounding noise between equal assignments is never an improvement and the ascent cannot
        cycle on it.
        """
        delta, bound = 0.0, 0.0
        for g, S in sims.items():
            rows = torch.nonzero(old[g] != new[g]).flatten()
            if not len(rows):
                continue
            o, n = old[g][rows], new[g][rows]
            delta += float((S[rows, n].double() - S[rows, o].double()).sum())
            na, nb = self.norms[g]
            bound += float((na[rows] * (nb[o] + nb[n])).sum())
        return delta if bound > 0 and delta > _ROUNDING_SLACK * torch.finfo(self.dtype).eps * bound else 0.0

    def upper_bound(self) -> float:
        r""":math:`\sum_\ell \|W^A_\ell\| \|W^B_\ell\|` (Cauchy-Schwarz): no permutation scores more, and one
        attains it exactly when it maps B onto A in every permuted tensor (a planted problem)."""
        norm = torch.linalg.vector_norm
        return float(sum(norm(a.double()) * norm(self.b[k].double()) for k, a in self.a.items()))

    def objective(self, perms: Mapping[str, torch.Tensor]) -> float:
        """:math:`\\sum_\\ell \\langle W^A_\\ell, \\Pi(W^B)_\\ell \\rangle` over the permuted tensors (float64)."""
        total = 0.0
        for key, a in self.a.items():
            b = self.b[key]
            for axis, action in self.spec.axes[key].items():
                b = b.index_select(axis, _axis_index(action, perms, b.device))
            total += float((a.double() * b.double()).sum())
        return total


# A group's freedom in a coordinate step: None (any permutation), or (rows, dead_a, dead_b): only ``rows`` of A
# may be reassigned, among the columns of B they hold, and only to pairs with a dead unit on either side.
_Freedom = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _step(S: torch.Tensor, current: torch.Tensor, freedom: _Freedom, group: str) -> torch.Tensor:
    """The best assignment for ``S`` that ``freedom`` allows, starting from ``current``."""
    if freedom is None:
        return _solve(S, group)
    rows, dead_a, dead_b = freedom
    cols = current[rows]
    sub = S[rows][:, cols]
    allowed = dead_a[rows][:, None] | dead_b[cols][None, :]
    if not bool(allowed.all()):
        # any assignment through a forbidden pair scores below every allowed one (the current one is allowed)
        low = sub.min() - (sub.max() - sub.min() + 1.0) * len(rows)
        sub = torch.where(allowed, sub, low)
    new = current.clone()
    new[rows] = cols[_solve(sub, group)]
    return new


_Block = tuple[tuple[str, ...], bool]  # a coordinate of the ascent: its groups, and whether it is head-structured


def _blocks(problem: _WeightProblem, free: Mapping[str, _Freedom], plain: bool) -> list[_Block]:
    """The coordinates of the ascent over the groups in ``free``, in spec order. The groups sharing a head
    permutation (:func:`~neuralign.alignment.heads.head_blocks`) form one structured coordinate when every one of
    them is free without restriction and ``plain``; every other group is an unstructured coordinate of its own."""
    spec = problem.spec
    joint: dict[str, tuple[str, ...]] = {}
    if plain:
        for members in head_blocks(spec).values():
            if all(g in free and free[g] is None for g in members):
                joint.update(dict.fromkeys(members, members))
    out, seen = [], set()
    for g in spec.groups:
        if g in free and g not in seen:
            block = joint.get(g, (g,))
            seen.update(block)
            out.append((block, g in joint))
    return out


def _step_block(problem: _WeightProblem, perms: Permutation, block: _Block, sims, free) -> Permutation:
    """The best permutations of the block's groups for their similarities ``sims`` (every other group held): the
    structured assignment of :func:`match_heads` for a head block (exact when no tensor carries two of its groups),
    else one assignment (:func:`_step`)."""
    groups, structured = block
    if not structured:
        return {groups[0]: _step(sims[groups[0]], perms[groups[0]], free[groups[0]], groups[0])}
    head = next(problem.spec.heads[g].heads for g in groups if g in problem.spec.heads)
    found = match_heads(problem.spec, sims.__getitem__, perms, heads={head})
    return {g: found[g] for g in groups}


def _greedy_start(problem: _WeightProblem, perms: Permutation, free: Mapping[str, _Freedom], step=None) -> None:
    """Set the free groups one at a time (in place), each from the summands that the groups set so far determine.

    The next group is the one with the most informative determined entries per unit (the input layer's group
    first: its summand depends on no other group). On a planted problem (``B`` a permutation of ``A``) every
    determined summand is maximised by the planted permutation, uniquely when the rows differ, so this start is
    the planted optimum; coordinate ascent from the identity instead sees mostly summands whose other axes are
    still wrongly permuted, and stalls far from it. ``step(group, S)`` chooses the group's permutation from its
    weight similarity (default: the best assignment that ``free`` allows).
    """
    spec = problem.spec
    solved = {g for g in spec.groups if g not in free}
    pending = _blocks(problem, free, plain=step is None)
    while pending:
        best = None
        for block in pending:
            known = {g: [t for t in problem.terms[g] if t.informative and g not in t.deps and t.deps <= solved]
                     for g in block[0]}  # fmt: skip
            info = sum(t.width for ts in known.values() for t in ts)
            if best is None or info > best[0]:
                best = (info, block, known)
        info, block, known = best
        groups = block[0]
        sims = {g: problem.similarity(perms, g, known[g] if info > 0 else None) for g in groups}
        if step is not None:
            perms[groups[0]] = step(groups[0], sims[groups[0]])
        else:
            perms.update(_step_block(problem, perms, block, sims, free))
        solved.update(groups)
        pending.remove(block)


def _ascent(
    problem: _WeightProblem,
    perms: Permutation,
    free: Mapping[str, _Freedom],
    *,
    greedy: bool,
    generator: torch.Generator,
    max_iter: int,
    tol: float = 0.0,
) -> tuple[Permutation, int, bool]:
    """Block coordinate ascent of the weight-matching objective over the groups in ``free`` (others fixed).

    Each step solves one coordinate exactly with the others held: one group's assignment, or for the groups that
    share a head permutation (attention; :func:`_blocks`) the structured assignment of :func:`match_heads` on
    their similarities jointly, so every iterate keeps heads whole when the start does. A step is kept only if it
    strictly improves (by more than rounding, see :meth:`_WeightProblem.gain`, so ties cannot make a sweep cycle;
    for a head block with a tensor carrying two of its groups, where the similarities are not additive, by the
    float64 objective itself), so the objective never decreases. A coordinate whose neighbours (the groups on the
    other axes of its tensors) are unchanged since its last step is skipped: its similarities, hence its step,
    would be the same. Stops after a sweep (random group order) without change, or
    (``tol > 0``) one that raised the objective by at most ``tol`` times its absolute value.
    """
    perms = {g: p.clone() for g, p in perms.items()}
    if greedy:
        _greedy_start(problem, perms, free)
    level = problem.objective(perms) if tol > 0 else 0.0
    blocks = _blocks(problem, free, plain=True)
    around_of = {b: sorted(set().union(*(problem.neighbours[g] for g in b[0])) - set(b[0])) for b in blocks}
    # a tensor carrying two groups of one block: the block's similarities are not additive, so its step is judged
    # by the objective itself
    coupled = {b for b in blocks if any(h in b[0] for g in b[0] for h in problem.neighbours[g])}
    stepped_at: dict[_Block, list[torch.Tensor]] = {}  # the neighbours' permutations at each last step
    for sweep in range(1, max_iter + 1):
        changed, rise = False, 0.0
        for i in torch.randperm(len(blocks), generator=generator).tolist():
            block = blocks[i]
            around = [perms[h] for h in around_of[block]]
            last = stepped_at.get(block)
            if last is not None and all(x is y for x, y in zip(last, around, strict=True)):
                continue
            stepped_at[block] = around
            sims = {g: problem.similarity(perms, g) for g in block[0]}
            new = _step_block(problem, perms, block, sims, free)
            if block in coupled:
                step_rise = problem.objective({**perms, **new}) - problem.objective(perms)
                step_rise = step_rise if step_rise > _ROUNDING_SLACK * 2.0**-52 * problem.upper_bound() else 0.0
            else:
                step_rise = problem.gain(sims, perms, new)
            if step_rise > 0:
                perms.update(new)
                changed, rise = True, rise + step_rise
        if not changed or rise <= tol * abs(level):
            return perms, sweep, True
        level += rise
    return perms, max_iter, False


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

    Parameters
    ----------
    state_a, state_b : Mapping[str, Tensor]
        State dicts of the same architecture (any float dtype and device; computed in float64 on the CPU).
    spec : PermutationSpec
    perms : Mapping[str, LongTensor]
        A permutation of every group (``perms[group]`` itself is ignored).
    group : str
    keys : iterable of str, optional
        The tensors to match (default: every tensor the spec permutes), e.g. the parameters only.

    Returns
    -------
    Tensor
        ``(K, K)`` float64 on the CPU, ``K = spec.sizes[group]``.
    """
    problem = _WeightProblem(state_a, state_b, spec, set(spec.axes) if keys is None else keys, dtype=torch.float64)
    return problem.similarity(perms, group)


def _weight_matching(
    problem: _WeightProblem, *, restarts: int, generator: torch.Generator, max_iter: int, tol: float
) -> tuple[int, list[tuple[float, Permutation, int, bool]], int]:
    """Best of ``restarts`` coordinate ascents: the first from the greedy start, the others from random ones."""
    spec = problem.spec
    free: dict[str, _Freedom] = {g: None for g in spec.groups}
    runs = []
    for r in range(restarts):
        if r == 0:
            start = identity_permutation(spec)
        else:
            start = random_permutation(spec, generator=generator)  # structured where the spec has heads
        perms, sweeps, converged = _ascent(
            problem, start, free, greedy=r == 0, generator=generator, max_iter=max_iter, tol=tol
        )
        value = problem.objective(perms)
        logger.debug("weight matching restart %d: objective %.10g after %d sweeps", r, value, sweeps)
        runs.append((value, perms, sweeps, converged))
    best = max(range(len(runs)), key=lambda i: (runs[i][0], -i))
    best_perms = runs[best][1]
    agreed = sum(all(torch.equal(run[1][g], best_perms[g]) for g in spec.groups) for run in runs)
    return best, runs, agreed


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
    tol: float = 1e-4,
    restarts: int = 1,
    generator: torch.Generator | int | None = None,
    example_input: Any = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    inputs: str = "clean",
    adversarial: PGD | None = None,
    heads: bool = True,
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
      :math:`J(\\pi) = \\sum_\\ell \\langle W^A_\\ell, P_\\ell W^B_\\ell P_{\\ell-1}^\\top\\rangle` (over the
      permuted parameters) by block coordinate ascent over groups, one exact assignment per group, until a sweep
      (random group order) changes nothing or raises :math:`J` by at most ``tol`` of :math:`|J|`. The first run
      starts greedily (each group set, input side first, from the summands that the groups set before it
      determine; exact on a planted problem); with ``restarts > 1`` the others start from uniformly random
      permutations and the run with the largest :math:`J` is returned (a non-convex problem with many
      coordinate-wise optima; on torchvision ResNet-18 and MobileNetV2 with independent random weights the
      greedy run ends above the random ones, see ``benchmarks/bench_weight_matching.py``).
      With attention heads (``spec.heads``) the groups sharing a head permutation are one coordinate, set by the
      structured assignment (:func:`~neuralign.alignment.heads.match_heads` on their similarities jointly): every
      iterate keeps heads whole and :math:`J` never decreases; random restarts start structured.
      The similarities are accumulated in float32 (float64 when some weight's magnitude leaves
      :math:`[2^{-40}, 2^{40}]`), each summand cached until a group on its other axes changes; objectives are
      float64.

    A unit that is constant on the alignment data (a "dead" unit, e.g. a ReLU that never fires; or every unit of
    a group without an activation tap, such as a train-only branch) has no correlation with anything, so the
    data cannot tell it apart from another dead unit. The data methods therefore match the live units by the
    data, and reassign the pairs with a dead unit among themselves by weight similarity (the coordinate ascent
    above, restricted to those pairs, other groups held). A warning names the groups with no live unit at all.

    Parameters
    ----------
    model_a, model_b : nn.Module
        The target and the model to permute; same architecture. Neither is modified. With a ``loader`` both
        must hold floating-point tensors of one dtype on one device (the loader's inputs are moved there and
        floating-point inputs cast to that dtype); weight matching alone works on CPU copies of any float dtype.
    loader : iterable, optional
        Batches of inputs (or ``(inputs, targets)``), e.g. the paper's first 10k training images with test-time
        transforms in a fixed order. Required for ``"correlation"`` and ``"l2"``; optional for ``"weight"``
        (then used only to report correlations and dead units).
    method : {"correlation", "l2", "weight"}
    spec : PermutationSpec, optional
        Traced from ``model_a`` when omitted (on the loader's first batch or ``example_input``). A given spec is
        used as given: its taps name nodes of the plain eval-mode torch.fx trace of ``model_a``.
    activations : {"post", "pre"}, optional
        Where activations are read; default ``"post"`` for correlation and ``"pre"`` for l2.
    max_batches : int, optional
        Use at most this many batches of ``loader`` (at least 1).
    max_iter : int
        Sweeps of each weight-matching coordinate ascent (at least 1).
    tol : float
        Weight matching stops after a sweep that raises :math:`J` by at most ``tol`` times :math:`|J|` (in
        [0, 1); 0: only after a sweep without change, a coordinate-wise optimum). On ResNet-50 the default
        1e-4 saves most sweeps for a :math:`J` a fraction of a permille lower (``bench_weight_matching.py``).
    restarts : int
        Runs of weight matching (at least 1); the first starts greedily, the others at random.
    generator : torch.Generator or int, optional
        Group orders and random starts of weight matching.
    example_input : Tensor, optional
        Needed to trace the spec for ``"weight"`` without a loader or spec.
    callback : callable, optional
        Called after each batch with the progress record ``{"stage": "align", "step": batches done}``.
    inputs : {"clean", "adversarial"}
        ``"adversarial"`` (data methods, for robust models): each model's activations are read on its own PGD
        examples of every batch, generated in eval mode (the official GoogLeNet ``--adv_flag``; Tatro et al.
        2020 §4). The loader must yield ``(inputs, targets)`` with inputs in [0, 1].
    adversarial : PGD, optional
        The attack for ``inputs="adversarial"``; default ``PGD()`` (CIFAR's 8/255, 2/255, 5 steps). Its random
        starts come from ``generator``.
    heads : bool
        ``True``: attention heads move as blocks wherever the spec has a head structure (``spec.heads``), so the
        permuted model computes the same function. ``False``: the head structure is ignored, the ablation
        "ignore heads" of Verma & Elbayad (2024, Table 1): every group, attention units included, is
        one flat ``K x K`` assignment. This is **not function-preserving**: units move between heads (and the
        head permutation of the queries and keys is chosen apart from the values'), so the permuted model B
        generally computes another function than B. The result's ``spec`` is the spec without its head
        structure; apply the permutation with it.

    Returns
    -------
    AlignmentResult
        Also reports dead units per group and, for weight matching, every run's objective and how many runs
        ended at the returned permutation (runs that disagree mean several coordinate-wise optima were found; the
        best one found is not proven global).

    Raises
    ------
    ShapeMismatchError
        If the models differ in parameter names or shapes (names the first one).
    TypeError
        If the models' dtypes differ (with a loader), or an option has the wrong type.
    ValueError
        Unknown method, empty loader, a data method without a loader, models on different devices (with a
        loader), ``max_batches``, ``max_iter`` or ``restarts`` below 1, ``tol`` outside [0, 1).
    SpecError
        If the spec has no activation tap at all (data methods) or permutes no parameter (``"weight"``).
    NonFiniteError
        If an activation is NaN or infinite (names the layer). Finite activations of any magnitude are
        accumulated without overflow (float64 after a per-unit power-of-two rescaling), so the scale-invariant
        correlation is right even for activations near float32's largest value.

    Warns
    -----
    UserWarning
        When the data cannot decide a group (every unit dead, or no activation tap); it is matched by weights.
    ConvergenceWarning
        When a weight-matching coordinate ascent hits ``max_iter`` (``status`` 1).

    References
    ----------
    .. [1] Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020, arXiv:2009.02439.
    .. [2] Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, arXiv:2209.04836.
    .. [3] Verma, Elbayad, "Merging Text Transformer Models from Different Initializations", TMLR 2024,
       arXiv:2403.00986.

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
    >>> res = align(a, b, method="weight", spec=spec, generator=0)
    >>> bool(torch.equal(res.perms["0"], invert_permutation(p)["0"])), res.restarts
    (True, 1)
    """
    if method not in ALIGNMENT_METHODS:
        raise ValueError(f"unknown method '{method}'; expected one of {list(ALIGNMENT_METHODS)}")
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError("`model_a` and `model_b` must be nn.Module instances")
    if spec is not None and not isinstance(spec, PermutationSpec):
        raise TypeError(f"`spec` must be a PermutationSpec or None, got {type(spec).__name__}")
    check_batch_budget(max_batches)
    _check_count(max_iter, "max_iter")
    _check_count(restarts, "restarts")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"`tol` must be a float, got {type(tol).__name__}")
    if not 0 <= tol < 1:
        raise ValueError(f"`tol` must be in [0, 1), got {tol}")
    if inputs not in ("clean", "adversarial"):
        raise ValueError(f"unknown inputs {inputs!r}; expected one of ['clean', 'adversarial']")
    if adversarial is not None and not isinstance(adversarial, PGD):
        raise TypeError(f"`adversarial` must be a neuralign.attacks.PGD or None, got {type(adversarial).__name__}")
    if inputs == "clean" and adversarial is not None:
        raise ValueError("`adversarial` is given but inputs='clean'; pass inputs='adversarial' to use it")
    check_bool(heads, "heads")
    attack = (adversarial or PGD()) if inputs == "adversarial" else None
    if attack is not None and loader is None:
        raise ValueError("inputs='adversarial' needs a `loader` of (inputs, targets)")
    gen = as_generator(generator)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible(state_a, state_b)
    if method in ("correlation", "l2") and loader is None:
        raise ValueError(f"method '{method}' needs a `loader` of inputs")
    kind = activations or ("pre" if method == "l2" else "post")
    data = None
    if loader is not None:
        spec, moments = activation_moments(
            model_a,
            model_b,
            loader,
            spec,
            kind=kind,
            max_batches=max_batches,
            callback=callback,
            adversarial=attack,
            generator=gen,
            require_taps=method != "weight",  # weight matching reads the data only to report correlations
        )
        if moments:
            data = _data_similarity(moments, spec, method)
            _warn_few_observations(moments, spec)
        else:
            logger.info("the spec has no '%s' activation tap: weight matching reports no correlations", kind)
    elif spec is None:
        if example_input is None:
            raise ValueError("method 'weight' without a loader needs `spec` or `example_input` to trace the model")
        spec = trace_spec(model_a, example_input)
    if not heads and spec.heads:  # the ablation: flat assignments, units free to leave their heads
        spec = replace(spec, heads={})
    spec.validate(state_a, name="model_a")
    keys = {k for k, _ in model_a.named_parameters()}
    problem = _WeightProblem(state_a, state_b, spec, keys)

    n_iter, converged, status, message = 1, True, Status.SUCCESS, "solved one assignment per group"
    n_runs, agreed, objectives = 1, 1, ()
    if method == "weight":
        if not any(k in keys for k in spec.axes):
            raise SpecError("the spec permutes no parameter; weight matching has nothing to match")
        best, runs, agreed = _weight_matching(problem, restarts=restarts, generator=gen, max_iter=max_iter, tol=tol)
        perms = runs[best][1]
        n_runs, objectives = len(runs), tuple(r[0] for r in runs)
        n_iter = sum(r[2] for r in runs)
        converged = runs[best][3]
        status = Status.SUCCESS if converged else Status.MAX_ITER
        sweeps = runs[best][2]
        message = (
            f"weight matching: best of {n_runs} restarts (objective {runs[best][0]:.10g}, run {best}), reached by "
            f"{agreed} of {n_runs}; it {'converged after' if converged else 'was still changing after max_iter ='} "
            f"{sweeps} sweeps (tol={tol:g})"
        )
        if runs[best][0] >= problem.upper_bound() * (1 - 1e-12):
            message += "; it attains the Cauchy-Schwarz bound, so it is a global optimum"
        elif agreed < n_runs:
            message += "; the runs found different coordinate-wise optima, so the best one is not proven global"
        sim = {g: problem.similarity(perms, g).double() for g in spec.groups}
    else:
        sim = {g: data[g].similarity for g in spec.groups}
        perms = {g: _solve(S, g) for g, S in sim.items()}
        perms, tied = _break_ties(problem, sim, perms, max_iter)
        perms, converged, sweeps = _match_dead_units(problem, spec, data, perms, gen, max_iter)
        status = Status.SUCCESS if converged else Status.MAX_ITER
        n_dead = sum(1 for g in spec.groups if bool(data[g].dead_a.any() | data[g].dead_b.any()))
        message = "solved one assignment per group"
        if tied:
            message += (
                f"; {sum(tied.values())} units in groups {sorted(tied)} had partners the data could not tell apart "
                f"(exchanging them changes the matched similarity by at most {_TIE:g} of its scale) and were "
                "matched by weight similarity"
            )
        if n_dead:
            message += f"; pairs with a dead unit in {n_dead} groups matched by weight similarity " + (
                f"(converged after {sweeps} sweeps)" if converged else f"(still changing after {sweeps} sweeps)"
            )
    if not converged:
        warnings.warn(message + "; raise `max_iter`", ConvergenceWarning, stacklevel=2)
    if spec.heads and method != "weight":  # weight matching's ascent is structured; the data methods' similarities
        # give a head assignment, then one inside each matched pair of heads (alignment/heads.py)
        similar = {g: sim[g] if data is None or data[g].correlation is not None else problem.similarity(perms, g)
                   for g in spec.groups}  # fmt: skip
        perms = match_heads(spec, similar, perms)
    validate_permutation(spec, perms)
    ident = identity_permutation(spec)
    before = {g: _matched(sim[g], ident[g]) for g in spec.groups}
    after = {g: _matched(sim[g], perms[g]) for g in spec.groups}
    corr_before: dict[str, float] = {}
    corr_after: dict[str, float] = {}
    dead: dict[str, tuple[int, int]] = {}
    if data is not None:
        for g in spec.groups:
            d = data[g]
            dead[g] = (int(d.dead_a.sum()), int(d.dead_b.sum()))
            if d.correlation is None:
                corr_before[g] = corr_after[g] = float("nan")
            else:
                corr_before[g] = _live_mean(d.correlation, ident[g], ~d.dead_a, ~d.dead_b)
                corr_after[g] = _live_mean(d.correlation, perms[g], ~d.dead_a, ~d.dead_b)
        _warn_undecided(spec, data, method)
    logger.info("aligned %d groups with method %s: %s", len(spec.groups), method, message)
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
        dead_units=dead,
        restarts=n_runs,
        restarts_agreed=agreed,
        restart_objectives=objectives,
    )


_TIE = 1e-4  # similarities this close (relative to the group's largest) count as ties that weights may break


def _tie_clusters(S: torch.Tensor, perm: torch.Tensor, eps: float) -> list[torch.Tensor]:
    """Groups of A's units that the data cannot tell apart at the assignment ``perm``: units ``i, j`` are tied when
    exchanging their partners changes the matched similarity by at most ``eps``; clusters are the connected
    components of that relation (rows of ``S``, at least two units each)."""
    n = S.shape[0]
    v = S[torch.arange(n), perm]
    M = S[:, perm]  # M[i, j] = S[i, perm[j]]
    tied = (v[:, None] + v[None, :] - M - M.T) <= eps  # exchanging the partners of i and j loses at most eps
    # connected components by label propagation on the dense relation (each unit takes its neighbours' smallest
    # label until nothing changes): no edge list, so a group of thousands of mutually tied units stays cheap
    labels = torch.arange(n, dtype=torch.int32)
    while True:
        new = torch.minimum(labels, torch.where(tied, labels[None, :], n).amin(dim=1).to(torch.int32))
        if torch.equal(new, labels):
            break
        labels = new
    return [idx for c in torch.unique(labels) if len(idx := torch.nonzero(labels == c).flatten()) > 1]


def _break_ties(problem: _WeightProblem, sim: Mapping[str, torch.Tensor], perms: Permutation, max_iter: int):
    """Match by weight similarity the units that the data cannot tell apart.

    Within each cluster of :func:`_tie_clusters` (exchanging partners costs at most ``_TIE`` of the group's largest
    similarity: e.g. two ReLUs that fire on the same single example, correlated 1 with each other up to float32
    rounding of the moments, ~1e-5; or every unit when the data has two examples) the partners are reassigned
    among themselves by the weight similarity, other units keep theirs. A group's weight similarity depends on the
    other groups, so the groups are set in the order of :func:`_greedy_start` and then swept until nothing changes
    (at most ``max_iter`` sweeps). Returns the permutations and, per group, how many units changed partner."""
    if not problem.a:
        return perms, {}
    first = dict(perms)
    clusters = {}
    for g, S in sim.items():
        scale = float(S.abs().max())
        clusters[g] = _tie_clusters(S, first[g], _TIE * scale) if scale > 0 and S.shape[0] > 1 else []
    perms = dict(perms)

    def within(g: str, W: torch.Tensor) -> torch.Tensor:
        new = perms[g].clone()
        for rows in clusters[g]:
            cols = new[rows]
            new[rows] = cols[_solve(W[rows][:, cols], g)]
        return new

    busy = {g: None for g in sim if clusters[g]}
    if not busy:
        return perms, {}
    _greedy_start(problem, perms, busy, step=within)
    for _ in range(max_iter):
        changed = False
        for g in busy:
            new = within(g, problem.similarity(perms, g))
            if not torch.equal(new, perms[g]):
                perms[g], changed = new, True
        if not changed:
            break
    tied = {g: int((perms[g] != first[g]).sum()) for g in busy}
    return perms, {g: k for g, k in tied.items() if k}


def _match_dead_units(problem, spec, data, perms, generator, max_iter) -> tuple[Permutation, bool, int]:
    """Reassign, by weight similarity, the pairs that involve a unit dead on the data (live pairs stay)."""
    free: dict[str, _Freedom] = {}
    for g in spec.groups:
        d = data[g]
        rows = torch.nonzero(d.dead_a | d.dead_b[perms[g]]).flatten()
        if len(rows) > 1:
            free[g] = (rows, d.dead_a, d.dead_b)
    if not free or not problem.a:
        return perms, True, 0
    perms, sweeps, converged = _ascent(problem, perms, free, greedy=True, generator=generator, max_iter=max_iter)
    return perms, converged, sweeps


def _warn_few_observations(moments: Mapping[str, list[ActivationMoments]], spec: PermutationSpec) -> None:
    """Warn about groups read from fewer observations (examples x positions) than they have units: their K x K
    correlation matrix has rank below K, so many assignments fit the data about equally (ties are broken by
    weights, but an underdetermined match can still be wrong)."""
    few = {g: min(m.count for m in ms) for g, ms in moments.items() if ms and min(m.count for m in ms) < spec.sizes[g]}
    if few:
        shown = ", ".join(f"{g} ({n} observations, {spec.sizes[g]} units)" for g, n in list(few.items())[:4])
        more = f" and {len(few) - 4} more" if len(few) > 4 else ""
        warnings.warn(
            f"the data cannot decide the alignment of groups with fewer observations than units: {shown}{more}; "
            "use more alignment data (or larger inputs)",
            UserWarning,
            stacklevel=3,
        )


def _warn_undecided(spec: PermutationSpec, data, method: str) -> None:
    untapped = [g for g in spec.groups if data[g].correlation is None]
    dead = [g for g in spec.groups if data[g].correlation is not None and bool(data[g].dead_a.all())]
    if not untapped and not dead:
        return
    parts = []
    if dead:
        parts.append(f"every unit of groups {dead} is constant on the alignment data")
    if untapped:
        parts.append(f"groups {untapped} have no activation tap in eval mode")
    what = "they were matched by weight similarity" if method != "weight" else "weight matching decided them"
    warnings.warn(f"the data cannot decide an alignment: {'; '.join(parts)}; {what}", UserWarning, stacklevel=3)
