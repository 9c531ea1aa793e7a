"""Permutations of a spec's groups: make, check, combine, and apply them to state dicts.

A permutation is ``dict[str, torch.LongTensor]``: group -> ``perm`` with ``B_new[i] = B_old[perm[i]]``
(dense form ``P[i, perm[i]] = 1``, ``B_new = P B_old``). Groups with an attention-head structure
(:class:`~neuralign.alignment.spec.Heads`) take only permutations that keep heads whole, move them with their head
group and share the permutations inside heads with the groups of the same ``inner`` key; the functions here draw and
check exactly those.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch

from neuralign._utils import as_generator
from neuralign.alignment.spec import Action, Heads, PermutationSpec, _segments_for

__all__ = [
    "Permutation",
    "identity_permutation",
    "random_permutation",
    "invert_permutation",
    "compose_permutations",
    "validate_permutation",
    "heads_permutation",
    "split_heads_permutation",
    "apply_permutation",
    "apply_permutation_matrices",
    "permutation_distance",
]

Permutation = dict[str, torch.Tensor]


def identity_permutation(spec: PermutationSpec, *, device: torch.device | str | None = None) -> Permutation:
    """The permutation that changes nothing.

    >>> from neuralign.alignment import SpecBuilder
    >>> identity_permutation(SpecBuilder().group("h", 3).build())
    {'h': tensor([0, 1, 2])}
    """
    return {g: torch.arange(n, device=device) for g, n in spec.sizes.items()}


def random_permutation(
    spec: PermutationSpec, *, generator: torch.Generator | int | None = None, device: torch.device | str | None = None
) -> Permutation:
    """A uniformly random permutation of every group, drawn from ``generator`` (a seed or torch.Generator).

    Groups with a head structure (``spec.heads``) get a uniformly random structured permutation: their head group's
    permutation and, per ``inner`` key, one uniformly random permutation inside each head block, and per ``within``
    key one uniformly random order of the heads inside each block.
    """
    gen = as_generator(generator)
    out = {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}
    inner: dict[str, torch.Tensor] = {}
    within: dict[str, torch.Tensor] = {}
    for g, h in spec.heads.items():
        if h.inner is not None and h.inner not in inner:
            inner[h.inner] = torch.stack([torch.randperm(h.size, generator=gen) for _ in range(h.blocks)])
        if h.within is not None and h.within not in within:
            within[h.within] = torch.stack([torch.randperm(h.tie, generator=gen) for _ in range(h.blocks)])
        out[g] = heads_permutation(
            h, out[h.heads] if h.heads is not None else None, inner.get(h.inner), within.get(h.within)
        )
    return {g: p.to(device) for g, p in out.items()}


def heads_permutation(
    heads: Heads, block_perm: torch.Tensor | None, inner: torch.Tensor | None, within: torch.Tensor | None = None
) -> torch.Tensor:
    """The flat permutation of a group with head structure ``heads`` (see :class:`~neuralign.alignment.Heads`).

    Parameters
    ----------
    heads : Heads
    block_perm : LongTensor of shape (heads.blocks,) or None
        :math:`\\pi`, the permutation of the head blocks (None: the identity).
    inner : LongTensor of shape (heads.blocks, heads.size) or None
        Row ``p`` is :math:`\\sigma_p`, the permutation inside the heads of (old) block ``p`` (None: the identity).
    within : LongTensor of shape (heads.blocks, heads.tie) or None
        Row ``p`` is :math:`\\tau_p`, the order of the heads inside (old) block ``p`` (None: the identity).

    Returns
    -------
    LongTensor of shape (heads.count * heads.size,)

    Examples
    --------
    >>> import torch
    >>> from neuralign.alignment import Heads
    >>> heads_permutation(Heads(2, 2, "h", "qk"), torch.tensor([1, 0]), torch.tensor([[0, 1], [1, 0]])).tolist()
    [3, 2, 0, 1]
    >>> heads_permutation(Heads(2, 1, None, None, 2, "q"), None, None, torch.tensor([[1, 0]])).tolist()
    [1, 0]
    """
    b, t, d = heads.blocks, heads.tie, heads.size
    pi = torch.arange(b) if block_perm is None else block_perm.cpu().long()
    sigma = torch.arange(d).expand(b, d) if inner is None else inner.cpu().long()
    tau = torch.arange(t).expand(b, t) if within is None else within.cpu().long()
    old = (pi[:, None, None] * t + tau[pi][:, :, None]) * d
    return (old + sigma[pi][:, None, :]).reshape(-1)


def split_heads_permutation(
    heads: Heads, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Read :math:`(\\pi, \\sigma, \\tau)` back from a flat permutation (the inverse of :func:`heads_permutation`), or
    None if ``perm`` moves a unit out of its head, a head out of its block, or treats the heads of a block
    unlike (different permutations inside them)."""
    b, t, d = heads.blocks, heads.tie, heads.size
    p = perm.cpu().long().reshape(b, t, d)
    pi = torch.div(p[:, 0, 0], t * d, rounding_mode="floor")
    if not torch.equal(torch.sort(pi).values, torch.arange(b)):
        return None
    head = torch.div(p[:, :, 0], d, rounding_mode="floor") - pi[:, None] * t  # (b, t): old head inside old block
    unit = p[:, 0, :] - torch.div(p[:, 0, :], d, rounding_mode="floor") * d  # (b, d): old unit inside old head
    sigma = torch.empty(b, d, dtype=torch.long)
    tau = torch.empty(b, t, dtype=torch.long)
    sigma[pi], tau[pi] = unit, head
    in_range = bool(((tau >= 0) & (tau < t)).all())
    if not in_range or not torch.equal(heads_permutation(heads, pi, sigma, tau), p.flatten()):
        return None
    return pi, sigma, tau


def invert_permutation(perms: Mapping[str, torch.Tensor]) -> Permutation:
    """The inverse: ``apply(apply(sd, p), invert(p)) == sd``."""
    out = {}
    for g, p in perms.items():
        inv = torch.empty_like(p)
        inv[p] = torch.arange(p.numel(), device=p.device, dtype=p.dtype)
        out[g] = inv
    return out


def compose_permutations(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> Permutation:
    """The permutation that applies ``first`` and then ``second``: ``first[g][second[g]]``.

    ``apply(apply(sd, first), second) == apply(sd, compose(first, second))``. This is how PAM's result on an
    aligned model is combined with the alignment (``match_og[match_pam]`` in the official code).
    """
    if set(first) != set(second):
        raise ValueError(f"cannot compose permutations over different groups: {sorted(first)} vs {sorted(second)}")
    return {g: first[g][second[g]] for g in first}


def validate_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], *, name: str = "perms") -> None:
    """Raise ``ValueError`` naming the group if ``perms`` is not a permutation of every group of ``spec``."""
    if not isinstance(perms, Mapping):
        raise TypeError(f"`{name}` must be a dict group -> index tensor, got {type(perms).__name__}")
    missing = [g for g in spec.sizes if g not in perms]
    if missing:
        raise ValueError(f"`{name}` lacks the groups {missing}")
    extra = [g for g in perms if g not in spec.sizes]
    if extra:
        raise ValueError(f"`{name}` has groups {extra} that the spec does not have")
    for g, n in spec.sizes.items():
        p = perms[g]
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"`{name}` group `{g}`: expected an int64 tensor, got {type(p).__name__}")
        if p.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"`{name}` group `{g}`: expected an integer tensor, got dtype {p.dtype}")
        if p.ndim != 1 or p.numel() != n:
            raise ValueError(f"`{name}` group `{g}` has length {tuple(p.shape)}, expected ({n},)")
        seen = torch.zeros(n, dtype=torch.bool, device=p.device)
        in_range = bool(((p >= 0) & (p < n)).all())
        if in_range:
            seen[p.long()] = True
        if not in_range or not bool(seen.all()):
            raise ValueError(f"`{name}` group `{g}` is not a permutation of 0..{n - 1}")
    inner: dict[str, torch.Tensor] = {}
    within: dict[str, torch.Tensor] = {}
    for g, h in spec.heads.items():
        parts = split_heads_permutation(h, perms[g])
        if parts is None:
            raise ValueError(
                f"`{name}` group `{g}` moves units between its {h.count} attention heads of {h.size} units"
                + (f" or heads between its blocks of {h.tie} tied heads" if h.tie > 1 else "")
            )
        pi, sigma, tau = parts
        expected = perms[h.heads].cpu().long() if h.heads is not None else torch.arange(h.blocks)
        if not torch.equal(pi, expected):
            which = f"its head group `{h.heads}`" if h.heads is not None else "the identity (its heads are fixed)"
            raise ValueError(f"`{name}` group `{g}` moves its heads unlike {which}")
        for part, key, shared, fixed, unlike in (
            (sigma, h.inner, inner, "permutes units inside heads, which must stay in place",
             "permutes the units inside its heads"),
            (tau, h.within, within, f"reorders the {h.tie} tied heads of a block, which move whole",
             "reorders the heads inside its blocks"),
        ):  # fmt: skip
            # without a key the part is the identity; with one, the same in every group sharing the key
            if key is None and not torch.equal(part, torch.arange(part.shape[-1]).expand_as(part)):
                raise ValueError(f"`{name}` group `{g}` {fixed}")
            if key is not None and not torch.equal(shared.setdefault(key, part), part):
                raise ValueError(f"`{name}` group `{g}` {unlike} unlike the other groups of key `{key}`")


def _axis_index(action: Action, perms: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The gather index of one axis: segment by segment, ``offset + perm[unit] * expand + (0..expand-1)``."""
    parts = []
    for offset, seg in _segments_for(action):
        if seg.group is None:
            parts.append(torch.arange(offset, offset + seg.length, device=device))
        else:
            p = perms[seg.group].to(device=device, dtype=torch.int64)
            idx = p[:, None] * seg.expand + torch.arange(seg.expand, device=device)[None, :]
            parts.append(offset + idx.reshape(-1))
    return torch.cat(parts)


def apply_permutation(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict in which every axis the spec names is permuted; the input is untouched.

    The result is an ``OrderedDict`` in the input's key order and keeps its ``_metadata`` (module versions), so
    that ``model.load_state_dict`` reads it as it reads ``model.state_dict()``.

    .. math::  W' = P_{\\text{out}} \\, W \\, P_{\\text{in}}^\\top, \\qquad b' = P_{\\text{out}} b

    for every layer, with ``P_g[i, perm_g[i]] = 1``; batch-norm weights, biases and running statistics follow
    their channel's group. Keys the spec does not name are copied (cloned) unchanged.

    Parameters
    ----------
    state_dict : Mapping[str, Tensor]
        Parameters and buffers (e.g. ``model.state_dict()``).
    spec : PermutationSpec
    perms : Mapping[str, LongTensor]
        One index tensor per group (see :func:`validate_permutation`).

    Raises
    ------
    SpecError, ShapeMismatchError
        If the spec does not fit ``state_dict``.
    ValueError
        If ``perms`` is not a permutation of every group.

    Examples
    --------
    >>> import torch
    >>> from neuralign.alignment import SpecBuilder
    >>> spec = SpecBuilder().group("h", 2).add("w1", 0, "h").add("w2", 1, "h").build()
    >>> sd = {"w1": torch.tensor([[1.0], [2.0]]), "w2": torch.tensor([[3.0, 4.0]])}
    >>> new = apply_permutation(sd, spec, {"h": torch.tensor([1, 0])})
    >>> new["w1"].flatten().tolist(), new["w2"].flatten().tolist()
    ([2.0, 1.0], [4.0, 3.0])
    """
    spec.validate(state_dict)
    validate_permutation(spec, perms)
    out: dict[str, torch.Tensor] = OrderedDict()
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions, read by load_state_dict (e.g. torchvision's MNASNet)
        out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    for key, value in state_dict.items():
        per_axis = spec.axes.get(key)
        if not per_axis:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        new = value
        for axis, action in per_axis.items():
            new = new.index_select(axis, _axis_index(action, perms, value.device))
        out[key] = new
    return out


def apply_permutation_matrices(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, matrices: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply dense (possibly relaxed, e.g. doubly stochastic) matrices instead of index permutations.

    Differentiable in ``matrices`` and in ``state_dict``: each permuted axis block of ``group`` is multiplied by
    ``matrices[group]`` (``n x n``), i.e. ``W' = P_out W P_in^T`` over the channel axes. For permutation matrices
    this equals :func:`apply_permutation` exactly; it is what gives ``dF/dP`` for PAM. Keys the spec does not
    name are passed through (the same tensor objects, not copies).
    """
    out: dict[str, torch.Tensor] = dict(state_dict)
    for key, per_axis in spec.axes.items():
        if key not in state_dict:
            continue
        new = state_dict[key]
        for axis, action in per_axis.items():
            moved = new.movedim(axis, 0)
            rest = moved.shape[1:]
            blocks = []
            for offset, seg in _segments_for(action):
                block = moved[offset : offset + seg.length]
                if seg.group is not None:
                    mat = matrices[seg.group].to(dtype=block.dtype)
                    block = (mat @ block.reshape(seg.size, -1)).reshape(seg.length, *rest)
                blocks.append(block)
            new = torch.cat(blocks, 0).movedim(0, axis)
        out[key] = new
    return out


def permutation_distance(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per group, the Hamming distance: the number of units ``i`` with ``first[g][i] != second[g][i]``."""
    return {g: int((first[g].cpu() != second[g].cpu()).sum()) for g in first}
