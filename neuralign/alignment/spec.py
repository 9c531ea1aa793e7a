"""Permutation specs: which tensor axes each permutation group acts on.

A network has hidden units (neurons, channels) whose order is arbitrary. A *permutation group* is a set of units
that must be relabelled together; relabelling them permutes one axis of several tensors (the rows of the layer that
produces them, the columns of the layers that consume them, the batch-norm vectors in between). A
:class:`PermutationSpec` records, for every parameter and buffer, which group acts on which axis.

Most axes are acted on by a single group. Two structures need more: channel concatenation (the axis is a
block-diagonal product of the branches' groups) and flattening (each channel covers ``H*W`` consecutive
entries). Both are expressed as a sequence of :class:`Segment` objects per axis.

Attention adds a third: the ``H * d`` output units of a query, key or value projection form ``H`` heads of ``d``
units. Heads may be permuted as blocks, and the units inside each head by a permutation of its own, but a unit may
not leave its head. Design: such a projection's units stay one ordinary flat group (so that
:func:`~neuralign.alignment.apply_permutation`, the statistics and the alignment code work unchanged on it), and the
spec records its structure in :attr:`PermutationSpec.heads` (a :class:`Heads` per flat group). The head permutation
is itself a group of the spec (``Heads.heads``, one unit per block of heads), shared by the query/key group and the
value/output group of one attention and by any tensor indexed by head (a per-head scale); the permutations inside
heads are shared by the groups with equal ``Heads.inner`` key (the query and key units, whose dot product is
invariant; under grouped-query attention the value units and the output projection's input columns of every query
head of the group). A flat permutation that does not keep this structure changes the network's function, so
:func:`~neuralign.alignment.random_permutation` draws structured permutations and
:func:`~neuralign.alignment.validate_permutation` refuses unstructured ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from neuralign.errors import ShapeMismatchError, SpecError

__all__ = ["Segment", "Tap", "Heads", "PermutationSpec", "SpecBuilder", "spec_from_axes"]


@dataclass(frozen=True)
class Segment:
    """A contiguous block of one tensor axis.

    Parameters
    ----------
    group : str or None
        The permutation group acting on this block; ``None`` marks a block that is never permuted.
    size : int
        Number of units in the block (the group's size when ``group`` is not None).
    expand : int
        Entries per unit: unit ``i`` covers entries ``[i * expand, (i + 1) * expand)`` of the block. A channel
        flattened with its ``H x W`` positions (channel-major) has ``expand = H * W``.
    """

    group: str | None
    size: int
    expand: int = 1

    @property
    def length(self) -> int:
        """Number of axis entries covered by the block."""
        return self.size * self.expand


Action = tuple[Segment, ...]


@dataclass(frozen=True)
class Heads:
    """The attention-head structure of a flat group of ``count * size`` units (Vaswani et al. 2017,
    arXiv:1706.03762; the symmetry as in Verma & Elbayad 2024, arXiv:2403.00986, and Imfeld et al. 2024,
    arXiv:2310.05719).

    Unit ``h * size + j`` is dimension ``j`` of head ``h``. A permutation of the flat group keeps heads whole:

    .. math::  \\text{perm}[(b\\,t + r)\\,d + j] = (\\pi[b]\\,t + \\tau_{\\pi[b]}[r])\\,d + \\sigma_{\\pi[b]}[j],
               \\quad 0 \\le r < t,\\ 0 \\le j < d,

    with :math:`d` = ``size``, :math:`t` = ``tie``, :math:`\\pi` the permutation of the ``count / tie`` head blocks
    (the group named ``heads``; the identity when ``heads`` is None), :math:`\\tau_p` the permutation of the
    ``tie`` heads inside block ``p`` (the identity when ``within`` is None) and :math:`\\sigma_p` the permutation
    inside the heads of block ``p``, one for all its heads (the identity for every block when ``inner`` is None,
    e.g. under rotary position embeddings, whose rotated pairs of dimensions have distinct frequencies).

    Under grouped-query attention this is the head structure one level up: the key/value heads are the blocks
    (moved by :math:`\\pi`, their insides by :math:`\\sigma`), and the query heads of one block may be reordered
    among themselves (:math:`\\tau`, shared by the query projection's rows and the output projection's columns)
    but never leave it.

    Parameters
    ----------
    count : int
        Number of heads ``H`` on the flat axis.
    size : int
        Units per head ``d``.
    heads : str or None
        The spec group (``count // tie`` units) whose permutation moves the head blocks; groups naming the same one
        move their heads alike (queries, keys and values of one attention).
    inner : str or None
        Key of the permutations inside heads: flat groups with equal keys share them (block by block).
    tie : int
        Consecutive heads that move as one block and share one permutation inside (the query heads of one
        key/value head under grouped-query attention, Ainslie et al. 2023, arXiv:2305.13245); 1 otherwise.
    within : str or None
        Key of the permutations of the ``tie`` heads inside each block: flat groups with equal keys share them (the
        query projection's rows and the output projection's columns of one grouped-query attention). None: the
        heads of a block keep their order (the block moves whole).
    """

    count: int
    size: int
    heads: str | None
    inner: str | None
    tie: int = 1
    within: str | None = None

    @property
    def blocks(self) -> int:
        """Number of head blocks (``count // tie``)."""
        return self.count // self.tie


@dataclass(frozen=True)
class Tap:
    """A place in the traced graph where a group's units can be observed.

    ``node`` is the torch.fx node name, ``axis`` the axis of its output that carries the group, ``kind`` is
    ``"post"`` (the output of an activation function), ``"pre"`` (the input of that activation function) or
    ``"out"`` (the output of the producing layer, used when a group has no activation function).
    """

    node: str
    axis: int
    kind: str


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Permutation groups and the tensor axes they act on.

    Parameters
    ----------
    sizes : Mapping[str, int]
        Group name -> number of units.
    axes : Mapping[str, Mapping[int, tuple[Segment, ...]]]
        State-dict key (parameter or buffer) -> axis -> the segments covering that axis, in order. Keys absent
        from ``axes`` are never permuted.
    taps : Mapping[str, tuple[Tap, ...]]
        Group -> where its activations can be read in the traced graph (empty for hand-built specs without taps).
    heads : Mapping[str, Heads]
        Flat group -> its attention-head structure (see :class:`Heads`); groups absent from it have none.

    Notes
    -----
    A permutation of a group is an ``int64`` tensor ``perm`` of length ``sizes[group]``; it relabels unit
    ``perm[i]`` as unit ``i`` (``B_new[i] = B_old[perm[i]]``, the dense matrix ``P[i, perm[i]] = 1``).
    This is the two-map representation of git-re-basin (group -> axes, axis -> group), extended with block
    structure for concatenation and flattening.

    Examples
    --------
    >>> spec = (SpecBuilder().group("h", 4)
    ...         .add("fc1.weight", 0, "h").add("fc1.bias", 0, "h").add("fc2.weight", 1, "h").build())
    >>> spec.sizes
    {'h': 4}
    >>> sorted(spec.perm_to_axes["h"])
    [('fc1.bias', 0), ('fc1.weight', 0), ('fc2.weight', 1)]
    """

    sizes: Mapping[str, int]
    axes: Mapping[str, Mapping[int, Action]]
    taps: Mapping[str, tuple[Tap, ...]] = field(default_factory=dict)
    heads: Mapping[str, Heads] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {str(g): int(n) for g, n in self.sizes.items()}
        for g, n in sizes.items():
            if n < 1:
                raise SpecError(f"group `{g}` has size {n}; sizes must be positive")
        axes: dict[str, dict[int, Action]] = {}
        for name, per_axis in self.axes.items():
            clean: dict[int, Action] = {}
            for axis, action in per_axis.items():
                action = tuple(action)
                for seg in action:
                    if seg.group is not None:
                        if seg.group not in sizes:
                            raise SpecError(f"`{name}` axis {axis} refers to unknown group `{seg.group}`")
                        if sizes[seg.group] != seg.size:
                            raise SpecError(
                                f"`{name}` axis {axis}: segment of group `{seg.group}` has {seg.size} units "
                                f"but the group has {sizes[seg.group]}"
                            )
                    if seg.size < 1 or seg.expand < 1:
                        raise SpecError(f"`{name}` axis {axis}: segments need positive size and expand")
                if any(seg.group is not None for seg in action):
                    clean[int(axis)] = action
            if clean:
                axes[str(name)] = dict(sorted(clean.items()))
        taps = {str(g): tuple(t) for g, t in self.taps.items() if g in sizes}
        heads = {str(g): h for g, h in self.heads.items()}
        _check_heads(sizes, heads)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "taps", taps)
        object.__setattr__(self, "heads", heads)

    # ------------------------------------------------------------------ views
    @property
    def groups(self) -> list[str]:
        """Group names, in the order they were created."""
        return list(self.sizes)

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Group -> the ``(state-dict key, axis)`` pairs it acts on (in whole or as one block)."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for name, per_axis in self.axes.items():
            for axis, action in per_axis.items():
                for g in dict.fromkeys(seg.group for seg in action if seg.group is not None):
                    out[g].append((name, axis))
        return out

    def axis_length(self, name: str, axis: int) -> int:
        """Length the spec expects for ``name`` along ``axis``."""
        return sum(seg.length for seg in self.axes[name][axis])

    def partition(self) -> frozenset[frozenset[tuple[str, int, int, int]]]:
        """The grouping without group names: per group the set of ``(key, axis, offset, expand)`` it acts on.

        Two specs with equal partitions permute every tensor in the same way up to renaming the groups.
        """
        blocks: dict[str, set[tuple[str, int, int, int]]] = {g: set() for g in self.sizes}
        for name, per_axis in self.axes.items():
            for axis, action in per_axis.items():
                offset = 0
                for seg in action:
                    if seg.group is not None:
                        blocks[seg.group].add((name, axis, offset, seg.expand))
                    offset += seg.length
        return frozenset(frozenset(b) for b in blocks.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return self.sizes == other.sizes and self.axes == other.axes and self.heads == other.heads

    def __hash__(self) -> int:  # specs are compared by content; hashing by identity is enough for dict use
        return id(self)

    def __repr__(self) -> str:
        n_axes = sum(len(a) for a in self.axes.values())
        return f"PermutationSpec({len(self.sizes)} groups, {n_axes} permuted axes over {len(self.axes)} tensors)"

    def summary(self) -> str:
        """One line per group: name, size, and the tensor axes it acts on."""
        lines = []
        for g, pairs in self.perm_to_axes.items():
            where = ", ".join(f"{k}[{a}]" for k, a in pairs)
            lines.append(f"{g} ({self.sizes[g]}): {where}")
        return "\n".join(lines)

    # ------------------------------------------------------------- validation
    def validate(self, state_dict: Mapping[str, torch.Tensor], *, name: str = "state_dict") -> None:
        """Check that every key and axis the spec names exists in ``state_dict`` with the expected length.

        Raises
        ------
        SpecError
            If a key is missing from ``state_dict`` or an axis does not exist.
        ShapeMismatchError
            If an axis has a different length than the spec's segments cover.
        """
        for key, per_axis in self.axes.items():
            if key not in state_dict:
                raise SpecError(f"the spec permutes `{key}`, which `{name}` does not have")
            shape = tuple(state_dict[key].shape)
            for axis, _ in per_axis.items():
                if axis >= len(shape):
                    raise SpecError(f"the spec permutes axis {axis} of `{key}`, which has shape {shape}")
                expected = self.axis_length(key, axis)
                if shape[axis] != expected:
                    raise ShapeMismatchError(
                        f"`{name}` has `{key}` of shape {shape}; the spec expects length {expected} on axis {axis}"
                    )

    def restrict(self, keys: Iterable[str]) -> PermutationSpec:
        """The same groups acting only on ``keys`` (e.g. the parameters, leaving out batch-norm buffers)."""
        keys = set(keys)
        return PermutationSpec(self.sizes, {k: v for k, v in self.axes.items() if k in keys}, self.taps, self.heads)

    def unpermuted(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys of ``state_dict`` the spec leaves untouched (``num_batches_tracked`` counters excluded)."""
        return [k for k in state_dict if k not in self.axes and not k.endswith("num_batches_tracked")]

    # -------------------------------------------------------------- exports
    def to_graph(self):
        """A networkx graph: group nodes and tensor nodes, an edge for each (group, tensor axis) it acts on.

        Group nodes carry ``kind="group"`` and ``size``; tensor nodes ``kind="tensor"``; edges carry ``axis``,
        ``offset`` and ``expand``. Connected components of group nodes linked through tensors show which
        layers a relabelling touches.
        """
        import networkx as nx

        graph = nx.MultiGraph()
        for g, n in self.sizes.items():
            graph.add_node(("group", g), kind="group", name=g, size=n)
        for key, per_axis in self.axes.items():
            graph.add_node(("tensor", key), kind="tensor", name=key)
            for axis, action in per_axis.items():
                offset = 0
                for seg in action:
                    if seg.group is not None:
                        graph.add_edge(
                            ("group", seg.group), ("tensor", key), axis=axis, offset=offset, expand=seg.expand
                        )
                    offset += seg.length
        return graph

    def to_dict(self) -> dict:
        """A JSON-able description (the inverse of :meth:`from_dict`)."""
        return {
            "sizes": dict(self.sizes),
            "axes": {
                k: {str(a): [[s.group, s.size, s.expand] for s in act] for a, act in per.items()}
                for k, per in self.axes.items()
            },
            "taps": {g: [[t.node, t.axis, t.kind] for t in ts] for g, ts in self.taps.items()},
            "heads": {g: [h.count, h.size, h.heads, h.inner, h.tie, h.within] for g, h in self.heads.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        """Rebuild a spec from :meth:`to_dict` output (e.g. read from JSON)."""
        try:
            axes = {
                k: {int(a): tuple(Segment(g, int(n), int(e)) for g, n, e in act) for a, act in per.items()}
                for k, per in data["axes"].items()
            }
            taps = {g: tuple(Tap(str(n), int(a), str(kd)) for n, a, kd in ts) for g, ts in data.get("taps", {}).items()}
            heads = {  # specs written before ``within`` have five fields
                g: Heads(int(c), int(d), hd, inn, int(t), *w)
                for g, (c, d, hd, inn, t, *w) in data.get("heads", {}).items()
            }
            return cls(dict(data["sizes"]), axes, taps, heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"not a valid spec description: {exc}") from exc

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


class SpecBuilder:
    """Build a :class:`PermutationSpec` by hand, for models torch.fx cannot trace or for custom groupings.

    Examples
    --------
    A two-layer MLP whose hidden layer is flattened from conv channels (4 channels x 9 positions):

    >>> b = SpecBuilder().group("c", 4).group("h", 8)
    >>> _ = b.add("conv.weight", 0, "c").add("conv.bias", 0, "c")
    >>> _ = b.add("fc1.weight", 1, [Segment("c", 4, expand=9)])
    >>> _ = b.add("fc1.weight", 0, "h").add("fc2.weight", 1, "h")
    >>> b.build().sizes
    {'c': 4, 'h': 8}
    """

    def __init__(self) -> None:
        self._sizes: dict[str, int] = {}
        self._axes: dict[str, dict[int, Action]] = {}
        self._taps: dict[str, list[Tap]] = {}
        self._heads: dict[str, Heads] = {}

    def group(self, name: str, size: int) -> SpecBuilder:
        """Declare group ``name`` with ``size`` units."""
        if name in self._sizes:
            raise SpecError(f"group `{name}` is declared twice")
        if not isinstance(size, int) or size < 1:
            raise SpecError(f"group `{name}` needs a positive integer size, got {size!r}")
        self._sizes[name] = size
        return self

    def add(self, key: str, axis: int, action: str | Sequence[Segment]) -> SpecBuilder:
        """Let group ``action`` (a name) or a sequence of segments act on ``key`` along ``axis``."""
        if isinstance(action, str):
            if action not in self._sizes:
                raise SpecError(f"group `{action}` is used before it is declared with .group()")
            segs: Action = (Segment(action, self._sizes[action]),)
        else:
            segs = tuple(action)
        if axis in self._axes.setdefault(key, {}):
            raise SpecError(f"axis {axis} of `{key}` is assigned twice")
        self._axes[key][axis] = segs
        return self

    def heads(self, group: str, heads: Heads) -> SpecBuilder:
        """Declare the attention-head structure of ``group`` (see :class:`Heads`)."""
        self._heads[group] = heads
        return self

    def tap(self, group: str, node: str, axis: int = 1, kind: str = "post") -> SpecBuilder:
        """Declare where ``group``'s activations are read (a torch.fx node name of the traced model)."""
        self._taps.setdefault(group, []).append(Tap(node, axis, kind))
        return self

    def build(self) -> PermutationSpec:
        """The spec (validated for internal consistency)."""
        taps = {g: tuple(t) for g, t in self._taps.items()}
        return PermutationSpec(dict(self._sizes), self._axes, taps, dict(self._heads))


def spec_from_axes(
    axes_to_perm: Mapping[str, Sequence[str | None]], state_dict: Mapping[str, torch.Tensor]
) -> PermutationSpec:
    """Build a spec from git-re-basin style ``key -> (group or None per axis)`` and infer group sizes.

    Raises
    ------
    SpecError
        If a key is missing from ``state_dict``, the tuple length differs from the tensor's ndim, or a group is
        used on axes of different lengths.
    """
    sizes: dict[str, int] = {}
    axes: dict[str, dict[int, Action]] = {}
    for key, groups in axes_to_perm.items():
        if key not in state_dict:
            raise SpecError(f"`{key}` is not in the state dict")
        shape = tuple(state_dict[key].shape)
        if len(groups) != len(shape):
            raise SpecError(f"`{key}` has {len(shape)} axes but {len(groups)} entries were given")
        for axis, g in enumerate(groups):
            if g is None:
                continue
            n = shape[axis]
            if sizes.setdefault(g, n) != n:
                raise SpecError(f"group `{g}` acts on axes of lengths {sizes[g]} and {n} (`{key}` axis {axis})")
            axes.setdefault(key, {})[axis] = (Segment(g, n),)
    return PermutationSpec(sizes, axes)


def _check_heads(sizes: Mapping[str, int], heads: Mapping[str, Heads]) -> None:
    """Refuse head structures that do not fit their groups or contradict each other."""
    inner: dict[str, tuple] = {}
    within: dict[str, tuple] = {}
    for g, h in heads.items():
        if not isinstance(h, Heads):
            raise SpecError(f"heads of group `{g}`: expected a Heads, got {type(h).__name__}")
        if g not in sizes:
            raise SpecError(f"heads are given for unknown group `{g}`")
        if h.count < 1 or h.size < 1 or h.tie < 1 or h.count % h.tie:
            raise SpecError(f"group `{g}`: {h.count} heads of {h.size} units tied by {h.tie} is not a head structure")
        if h.count * h.size != sizes[g]:
            raise SpecError(f"group `{g}` has {sizes[g]} units, not {h.count} heads of {h.size}")
        if h.heads is not None and sizes.get(h.heads) != h.blocks:
            raise SpecError(
                f"group `{g}`: its head group `{h.heads}` must have {h.blocks} units, has {sizes.get(h.heads)}"
            )
        if h.inner is not None and inner.setdefault(h.inner, (h.heads, h.blocks, h.size)) != (h.heads, h.blocks,
                                                                                             h.size):
            raise SpecError(f"group `{g}`: the groups sharing inner key `{h.inner}` differ in heads or head size")
        if h.within is not None and within.setdefault(h.within, (h.heads, h.blocks, h.tie)) != (h.heads, h.blocks,
                                                                                               h.tie):
            raise SpecError(f"group `{g}`: the groups sharing within key `{h.within}` differ in heads or blocks")


def _segments_for(action: Iterable[Segment]) -> list[tuple[int, Segment]]:
    """``(offset, segment)`` pairs of an action."""
    out, offset = [], 0
    for seg in action:
        out.append((offset, seg))
        offset += seg.length
    return out
