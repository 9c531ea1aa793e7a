"""The moves of the local checks, by coordinate: a group without attention heads moves by transpositions of two
units; the groups sharing one head permutation (:func:`~neuralign.alignment.heads.head_blocks`) move together, by
structured swaps that keep heads whole (as the curve PAM's swap search, :mod:`neuralign.curves.pam`): the exchange
of two whole head blocks in every group of the block, the transposition of two units inside one head block in
every group sharing that inside permutation (``Heads.inner``), or (grouped-query attention) the exchange of two
query heads inside one block in every group sharing that order (``Heads.within``). Every move is a product of
disjoint transpositions per group, so its first-order estimate at the identity is the sum of the member groups'
transposition estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from neuralign.alignment import PermutationSpec
from neuralign.alignment.heads import head_blocks


class Move(NamedTuple):
    """One move from the identity: ``kind`` (``swap``, ``3-cycle``, ``head-swap``, ``inside-swap`` or
    ``query-swap``), ``where`` (the units, the two head blocks, or the head block and the two units or the two heads
    inside it) and ``inner`` (the ``Heads.inner`` key of an inside swap, the ``Heads.within`` key of a query
    swap)."""

    kind: str
    where: tuple[int, ...]
    inner: str | None = None

    def describe(self) -> str:
        return f"{self.kind}{'' if self.inner is None else f'[{self.inner}]'} {self.where}"


@dataclass(frozen=True)
class Coordinate:
    """A group without heads (``structured`` False, ``groups`` holds it) or the groups one structured assignment
    sets together (``structured`` True); ``label`` names it in reports (the group, or the groups joined by ``+``)."""

    label: str
    groups: tuple[str, ...]
    structured: bool


def coordinates(spec: PermutationSpec) -> list[Coordinate]:
    """The coordinates of ``spec`` in spec order (a block where its first group stands)."""
    blocks = head_blocks(spec)
    in_block = {g: head for head, members in blocks.items() for g in members}
    out, seen = [], set()
    for g in spec.sizes:
        if g not in in_block:
            out.append(Coordinate(g, (g,), False))
        elif in_block[g] not in seen:
            seen.add(in_block[g])
            members = blocks[in_block[g]]
            out.append(Coordinate("+".join(members), members, True))
    return out


def structured_moves(spec: PermutationSpec, coordinate: Coordinate) -> list[Move]:
    """Every structured swap of a block: the exchanges of two head blocks ``(p, q)``, ``p < q`` (when its heads
    move), then per inside key the transpositions ``(block, j, k)``, ``j < k``, inside one head block, then per
    ``within`` key the exchanges ``(block, r, s)``, ``r < s``, of two query heads inside one block."""
    flat = [g for g in coordinate.groups if g in spec.heads]
    first = spec.heads[flat[0]]
    out = []
    if first.heads is not None:
        out += [Move("head-swap", (p, q)) for p in range(first.blocks) for q in range(p + 1, first.blocks)]
    sizes = {spec.heads[g].inner: spec.heads[g].size for g in flat if spec.heads[g].inner is not None}
    for key in sorted(sizes):
        d = sizes[key]
        out += [Move("inside-swap", (b, j, k), key) for b in range(first.blocks) for j in range(d)
                for k in range(j + 1, d)]  # fmt: skip
    ties = {spec.heads[g].within: spec.heads[g].tie for g in flat if spec.heads[g].within is not None}
    for key in sorted(ties):
        t = ties[key]
        out += [Move("query-swap", (b, r, s), key) for b in range(first.blocks) for r in range(t)
                for s in range(r + 1, t)]  # fmt: skip
    return out


def transpositions(spec: PermutationSpec, coordinate: Coordinate, move: Move) -> dict[str, list[tuple[int, int]]]:
    """The disjoint transpositions of each group of ``coordinate`` that make ``move`` (a 3-cycle has none: use
    :func:`move_changes`)."""
    if move.kind == "swap":
        return {coordinate.groups[0]: [move.where]}
    out: dict[str, list[tuple[int, int]]] = {}
    for g in coordinate.groups:
        h = spec.heads.get(g)
        if move.kind == "head-swap":
            p, q = move.where
            w = 1 if h is None else h.tie * h.size
            out[g] = [(p * w + u, q * w + u) for u in range(w)]
        elif move.kind == "query-swap":
            if h is not None and h.within == move.inner:
                b, r, s = move.where
                out[g] = [((b * h.tie + r) * h.size + u, (b * h.tie + s) * h.size + u) for u in range(h.size)]
        elif h is not None and h.inner == move.inner:
            b, j, k = move.where
            out[g] = [((b * h.tie + r) * h.size + j, (b * h.tie + r) * h.size + k) for r in range(h.tie)]
    return out


def move_changes(spec: PermutationSpec, coordinate: Coordinate, move: Move) -> dict[str, torch.Tensor]:
    """The permutations (index form, int64) of the groups ``move`` changes, applied to the identity."""
    if move.kind == "3-cycle":
        g = coordinate.groups[0]
        p = torch.arange(spec.sizes[g])
        idx = list(move.where)
        p[idx] = torch.tensor(idx[1:] + idx[:1])
        return {g: p}
    out = {}
    for g, pairs in transpositions(spec, coordinate, move).items():
        p = torch.arange(spec.sizes[g])
        for i, j in pairs:
            p[i], p[j] = j, i
        out[g] = p
    return out


def transposition(n: int, i: int, j: int) -> torch.Tensor:
    """The permutation of ``n`` units exchanging ``i`` and ``j`` (index form, int64)."""
    p = torch.arange(n)
    p[i], p[j] = j, i
    return p


def move_estimate(spec: PermutationSpec, coordinate: Coordinate, move: Move,
                  estimates: dict[str, torch.Tensor]) -> float:
    """First-order estimate of the change under a swap-type ``move``: the sum over its transpositions of the
    groups' transposition estimates ``estimates[g]`` (:func:`~neuralign.verification.swap_estimates`), since
    :math:`\\langle G, T - I\\rangle` is additive over disjoint transpositions."""
    return float(sum(estimates[g][i, j] for g, pairs in transpositions(spec, coordinate, move).items()
                     for i, j in pairs))  # fmt: skip


class MoveSet:
    """The swap-type moves of one coordinate, indexed ``0 .. count - 1``: the transpositions ``(i, j)``, ``i < j``,
    of a plain group in ``triu_indices`` order (never listed: a group may have millions), or
    :func:`structured_moves` of a block."""

    def __init__(self, spec: PermutationSpec, coordinate: Coordinate) -> None:
        self.spec, self.coordinate = spec, coordinate
        if coordinate.structured:
            self._moves = structured_moves(spec, coordinate)
            self.count = len(self._moves)
        else:
            n = spec.sizes[coordinate.groups[0]]
            self._rows, self._cols = torch.triu_indices(n, n, offset=1)
            self.count = int(self._rows.numel())

    @property
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The units ``(i, j)`` of every transposition of a plain group, as two ``(count,)`` int64 tensors."""
        if self.coordinate.structured:
            raise ValueError(f"{self.coordinate.label} moves by structured swaps, not transpositions")
        return self._rows, self._cols

    def __getitem__(self, k: int) -> Move:
        if self.coordinate.structured:
            return self._moves[k]
        return Move("swap", (int(self._rows[k]), int(self._cols[k])))

    def changes(self, k: int) -> dict[str, torch.Tensor]:
        return move_changes(self.spec, self.coordinate, self[k])

    def estimates(self, estimates: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(count,)`` float64: the first-order estimate of every move (:func:`move_estimate`)."""
        if not self.coordinate.structured:
            return estimates[self.coordinate.groups[0]][self._rows, self._cols].double()
        return torch.tensor([move_estimate(self.spec, self.coordinate, m, estimates) for m in self._moves],
                            dtype=torch.float64)  # fmt: skip
