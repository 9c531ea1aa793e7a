r"""Head-structured matching: the permutation of attention heads and the permutations inside heads, from per-unit
similarities (Verma & Elbayad 2024, arXiv:2403.00986, Sec. 3).

For every group of flat units with a head structure (:class:`~neuralign.alignment.spec.Heads`) the similarity
:math:`S_g` between the units of model A (rows) and model B (columns) is cut into ``d x d`` blocks, one per pair of
heads. Groups that share their inside permutations (equal ``inner`` key: the query and key units, or the value units
and the output projection's columns under grouped-query attention) add their blocks; for every pair of head blocks
:math:`(p, q)` the best inside assignment is solved and its value fills a cost

.. math::  C_{pq} = S^{h}_{pq} + \sum_{\text{keys } \kappa} \max_{\sigma \in S_d} \sum_{j}
           M^{\kappa}_{pq}[j, \sigma(j)] + \sum_{g:\ \text{inner} = \text{None}} \sum_{r,j} S_g[(pt+r)d+j, (qt+r)d+j],

with :math:`M^{\kappa}_{pq} = \sum_{g \in \kappa} \sum_{r<t} S_g[(pt+r)d : (pt+r+1)d,\ (qt+r)d : (qt+r+1)d]`,
:math:`t` the heads tied in one block and :math:`S^h` the similarity of the head group's own tensor axes (a per-head
parameter). An outer assignment on :math:`C` matches the heads; the inside assignments of the matched pairs are kept.
The result is the exact maximiser of :math:`\sum_g \langle S_g, P_g \rangle` over structured permutations when the
similarities do not depend on each other (activation correlations) and no group reorders the heads inside its
blocks; for weight matching it is one block-coordinate step.

Under grouped-query attention the query heads of one block may also be reordered (``Heads.within``, a permutation
:math:`\tau` of the :math:`t` heads shared by the groups of one key): head :math:`r` of block :math:`p` is then
matched to head :math:`\tau(r)` of block :math:`q`, and the pair's value maximises over :math:`\tau` and the inside
permutations jointly, a bilinear problem solved by block-coordinate ascent (each of its steps an exact assignment,
from two starts; never below the value with :math:`\tau` the identity), not provably to its maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from neuralign.alignment.permutation import Permutation, heads_permutation
from neuralign.alignment.spec import PermutationSpec
from neuralign.optim import solve_assignment

__all__ = ["match_heads", "head_blocks"]


def match_heads(
    spec: PermutationSpec,
    similarity: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    *,
    heads: Collection[str | None] | None = None,
) -> Permutation:
    """Replace the permutations of every head group and every group with heads by the best structured ones.

    Parameters
    ----------
    spec : PermutationSpec
        Its ``heads`` say which groups have a head structure; other groups are returned unchanged.
    similarity : Mapping[str, Tensor] or callable
        Group -> ``(K, K)`` similarity of model A's units (rows) with model B's units (columns), to maximise; or a
        function of the group name returning it (read only for the head groups and the groups with heads).
    perms : Mapping[str, LongTensor]
        The current permutation of every group (unstructured ones are replaced).
    heads : collection of (str or None), optional
        Match only the groups whose ``Heads.heads`` is in it (with those head groups); default every group with
        heads. One such key is one block of the weight-matching ascent (:func:`head_blocks`).

    Returns
    -------
    dict[str, LongTensor]
        ``perms`` with the head groups and the groups with heads replaced; ``perm[i]`` is the unit of model B
        matched to unit ``i`` of model A.

    Raises
    ------
    ValueError
        A similarity of the wrong shape (names the group).

    Examples
    --------
    >>> import torch
    >>> from neuralign.alignment import Heads, SpecBuilder
    >>> spec = SpecBuilder().group("h", 2).group("v", 4).heads("v", Heads(2, 2, "h", "v")).build()
    >>> S = torch.eye(4)[[3, 2, 0, 1]]  # unit i of A is unit [3, 2, 0, 1][i] of B
    >>> match_heads(spec, {"v": S, "h": torch.zeros(2, 2)}, {"v": torch.arange(4), "h": torch.arange(2)})["v"]
    tensor([3, 2, 0, 1])
    """
    get = similarity if callable(similarity) else similarity.__getitem__
    out = dict(perms)
    by_head: dict[str | None, list[str]] = {}
    for g, h in spec.heads.items():
        by_head.setdefault(h.heads, []).append(g)
    for head, groups in by_head.items():
        if heads is not None and head not in heads:
            continue
        structures = {g: spec.heads[g] for g in groups}
        blocks = next(iter(structures.values())).blocks
        # (p, q, r, j, s, k): dimension j of head r of A's block p against dimension k of head s of B's block q
        sims = {g: _checked(get(g), spec.sizes[g], g).reshape(h.blocks, h.tie, h.size, h.blocks, h.tie, h.size)
                .permute(0, 3, 1, 2, 4, 5) for g, h in structures.items()}  # fmt: skip
        cost = torch.zeros(blocks, blocks, dtype=torch.float64)
        if head is not None and spec.perm_to_axes.get(head):
            cost += _checked(get(head), blocks, head)
        solutions = [[_match_pair(sims, structures, p, q) for q in range(blocks)] for p in range(blocks)]
        cost += torch.tensor([[value for value, _, _ in row] for row in solutions], dtype=torch.float64)
        pi = torch.arange(blocks)
        if head is not None:
            pi = solve_assignment(cost, maximize=True, name=head).perm.cpu()
            out[head] = pi.to(perms[head].device)
        for g, h in structures.items():
            sigma = torch.arange(h.size).repeat(blocks, 1)
            tau = torch.arange(h.tie).repeat(blocks, 1)
            for p in range(blocks):  # sigma and tau are indexed by model B's block
                _, inner, within = solutions[p][int(pi[p])]
                if h.inner is not None:
                    sigma[pi[p]] = inner[h.inner]
                if h.within is not None:
                    tau[pi[p]] = within[h.within]
            out[g] = heads_permutation(h, pi, sigma, tau).to(perms[g].device)
    return out


def _match_pair(sims, structures, p: int, q: int, max_iter: int = 50):
    """The best inside permutations (per ``inner`` key) and head orders (per ``within`` key) for A's block ``p``
    against B's block ``q``: exact without ``within`` keys; with them, a block-coordinate ascent from two starts
    (the assignment of head pairs each scored at its own best inside permutations, and the heads' own order): the
    inside permutations and the head orders alternate, each step exact, until the value stops rising, and the
    better end is kept (never below the best with the heads of each block in their order)."""
    inner_keys = sorted({h.inner for h in structures.values() if h.inner is not None})
    within_keys = sorted({h.within for h in structures.values() if h.within is not None})

    def order(g, tau):  # (t, d, d): head r of A's block against head tau_g(r) of B's block
        h, X = structures[g], sims[g][p, q]
        rows = tau[h.within] if h.within is not None else torch.arange(h.tie)
        return X[torch.arange(h.tie), :, rows, :]

    def inside(tau):
        value, sigma = 0.0, {}
        for key in inner_keys:
            M = sum(order(g, tau).sum(0) for g, h in structures.items() if h.inner == key)
            res = solve_assignment(M, maximize=True, name=key)
            value, sigma[key] = value + float(res.fun), res.perm.cpu()
        fixed = [torch.diagonal(order(g, tau), dim1=1, dim2=2).sum() for g, h in structures.items() if h.inner is None]
        return value + float(sum(fixed)), sigma

    def heads_order(sigma):
        tau = {}
        for key in within_keys:
            W = 0
            for g, h in structures.items():
                if h.within == key:
                    cols = sigma[h.inner] if h.inner is not None else torch.arange(h.size)
                    W = W + sims[g][p, q][:, torch.arange(h.size), :, cols].sum(0)  # (t, t)
            tau[key] = solve_assignment(W, maximize=True, name=key).perm.cpu()
        return tau

    if not within_keys:
        value, sigma = inside({})
        return value, sigma, {}
    start, t_of = {}, {}
    for key in within_keys:  # each pair of heads scored with its own best inside permutations
        members = [g for g, h in structures.items() if h.within == key]
        t = t_of[key] = structures[members[0]].tie
        W = torch.zeros(t, t, dtype=torch.float64)
        for r in range(t):
            for s in range(t):
                for ikey in {structures[g].inner for g in members}:
                    M = sum(sims[g][p, q, r, :, s, :] for g in members if structures[g].inner == ikey)
                    W[r, s] += (float(solve_assignment(M, maximize=True, name=key).fun) if ikey is not None
                                else float(torch.diagonal(M).sum()))  # fmt: skip
        start[key] = solve_assignment(W, maximize=True, name=key).perm.cpu()
    best = None
    for tau in (start, {key: torch.arange(t_of[key]) for key in within_keys}):  # and the blocks' own order
        value, sigma = inside(tau)
        for _ in range(max_iter):
            new_tau = heads_order(sigma)
            new_value, new_sigma = inside(new_tau)
            if new_value <= value:
                break
            value, sigma, tau = new_value, new_sigma, new_tau
        if best is None or value > best[0]:
            best = (value, sigma, tau)
    return best


def _checked(S: torch.Tensor, n: int, group: str) -> torch.Tensor:
    if not isinstance(S, torch.Tensor) or tuple(S.shape) != (n, n):
        shape = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"the similarity of group `{group}` must have shape ({n}, {n}), got {shape}")
    return S.detach().to(torch.float64).cpu()


def head_blocks(spec: PermutationSpec) -> dict[str | None, tuple[str, ...]]:
    """The groups that one structured assignment of :func:`match_heads` sets together, by head key.

    Returns
    -------
    dict[str or None, tuple[str, ...]]
        ``Heads.heads`` (the head group, or None for groups whose heads never move) -> that head group (when it is a
        group of the spec) followed by the groups with heads naming it, in spec order. Groups outside every block
        are matched unstructured.
    """
    out: dict[str | None, list[str]] = {h.heads: [] for h in spec.heads.values()}
    for head, members in out.items():
        members.extend(g for g in spec.groups if g == head or (g in spec.heads and spec.heads[g].heads == head))
    return {head: tuple(members) for head, members in out.items()}
