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
similarities do not depend on each other (activation correlations); for weight matching it is one block-coordinate
step.
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
        sims = {g: _checked(get(g), spec.sizes[g], g) for g in groups}
        structures = {g: spec.heads[g] for g in groups}
        blocks = next(iter(structures.values())).blocks
        cost = torch.zeros(blocks, blocks, dtype=torch.float64)
        if head is not None and spec.perm_to_axes.get(head):
            cost += _checked(get(head), blocks, head)
        pair_blocks: dict[str, torch.Tensor] = {}  # inner key -> (blocks, blocks, d, d) summed blocks
        for g, h in structures.items():
            S = sims[g].reshape(h.blocks, h.tie, h.size, h.blocks, h.tie, h.size)
            tied = torch.diagonal(S, dim1=1, dim2=4).sum(-1)  # (p, j, q, k): head r of block p with head r of q
            tied = tied.permute(0, 2, 1, 3)  # (p, q, j, k)
            if h.inner is None:
                cost += torch.diagonal(tied, dim1=2, dim2=3).sum(-1)
            else:
                pair_blocks[h.inner] = pair_blocks.get(h.inner, 0) + tied
        inner_solutions: dict[str, list[list[torch.Tensor]]] = {}
        for key, M in pair_blocks.items():
            rows = []
            for p in range(blocks):
                row = []
                for q in range(blocks):
                    res = solve_assignment(M[p, q], maximize=True, name=key)
                    cost[p, q] += res.fun
                    row.append(res.perm.cpu())
                rows.append(row)
            inner_solutions[key] = rows
        pi = torch.arange(blocks)
        if head is not None:
            pi = solve_assignment(cost, maximize=True, name=head).perm.cpu()
            out[head] = pi.to(perms[head].device)
        for g, h in structures.items():
            sigma = None
            if h.inner is not None:
                sigma = torch.empty(blocks, h.size, dtype=torch.long)
                for p in range(blocks):  # sigma is indexed by model B's block
                    sigma[pi[p]] = inner_solutions[h.inner][p][int(pi[p])]
            out[g] = heads_permutation(h, pi, sigma).to(perms[g].device)
    return out


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
