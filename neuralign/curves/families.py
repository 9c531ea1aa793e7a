"""Parametric curves between two networks: :class:`Line`, :class:`Bezier` and :class:`PolyChain`.

A curve holds its points (end points and control points), each a ``dict[str, Tensor]`` over a model's
parameters, and evaluates the weights

.. math::

    w(t) = \\sum_{j=0}^{n-1} c_j(t)\\, p_j, \\qquad t \\in [0, 1],

for family-specific coefficients :math:`c_j(t)`. Internally the points live in one contiguous buffer of shape
``(n, D)`` (one row per point, :math:`D` = number of parameter entries); the named tensors are views of its rows,
so :math:`w(t)` is a single matrix-vector product over that buffer. Nothing here edits a model: a model is
evaluated at :math:`w(t)` with :func:`torch.func.functional_call`.

References
----------
.. [1] T. Garipov, P. Izmailov, D. Podoprikhin, D. Vetrov, A. G. Wilson, "Loss Surfaces, Mode Connectivity, and
   Fast Ensembling of DNNs", NeurIPS 2018, arXiv:1802.10026.
.. [2] N. J. Tatro, P.-Y. Chen, P. Das, I. Melnyk, P. Sattigeri, R. Lai, "Optimizing Mode Connectivity via Neuron
   Alignment", NeurIPS 2020, arXiv:2009.02439.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from neuralign._utils import atomic_save, check_compatible, load_checkpoint
from neuralign.errors import CheckpointError

__all__ = ["Curve", "Line", "Bezier", "PolyChain", "CURVE_FAMILIES"]

_INITS = ("linear",)


def _check_t(t: Any) -> float:
    """``t`` as a Python float in [0, 1]; TypeError for a non-number, ValueError outside [0, 1] or NaN."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise TypeError(f"`t` must be a real number, got a tensor of shape {tuple(t.shape)}")
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"`t` must be a real number, got {type(t).__name__}")
    value = float(t)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"`t` must lie in [0, 1], got {value!r}")
    return value


def _flatten_points(
    points: Sequence[Mapping[str, torch.Tensor]], label: str = "points"
) -> tuple[torch.Tensor, tuple[str, ...], tuple[torch.Size, ...]]:
    """Validate points and copy them into one contiguous ``(n, D)`` buffer (the inputs are never aliased)."""
    if isinstance(points, Mapping) or not isinstance(points, Sequence):
        raise TypeError(f"`{label}` must be a sequence of dicts name -> Tensor, got {type(points).__name__}")
    if len(points) < 2:
        raise ValueError(f"`{label}` must hold at least 2 points (the two end points), got {len(points)}")
    for j, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise TypeError(f"`{label}[{j}]` must be a dict name -> Tensor, got {type(point).__name__}")
        for key, value in point.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"`{label}[{j}]` entry `{key}` must be a Tensor, got {type(value).__name__}")
    first = points[0]
    if not first:
        raise ValueError(f"`{label}[0]` holds no parameter")
    for j in range(1, len(points)):
        check_compatible(first, points[j], (f"{label}[0]", f"{label}[{j}]"))
    names = tuple(first)
    reference = first[names[0]]
    dtype, device = reference.dtype, reference.device
    if not dtype.is_floating_point:
        raise TypeError(f"curve points must be floating point, but `{names[0]}` has dtype {dtype}")
    for j, point in enumerate(points):
        for key in names:
            value = point[key]
            if value.dtype != dtype:
                raise TypeError(
                    f"all curve points must share one dtype: `{label}[{j}]` has `{key}` of dtype {value.dtype}, "
                    f"expected {dtype}"
                )
            if value.device != device:
                raise ValueError(
                    f"all curve points must lie on one device: `{label}[{j}]` has `{key}` on {value.device}, "
                    f"expected {device}"
                )
    shapes = tuple(first[k].shape for k in names)
    numel = sum(s.numel() for s in shapes)
    flat = torch.empty(len(points), numel, dtype=dtype, device=device)
    for j, point in enumerate(points):
        torch.cat([point[k].detach().reshape(-1) for k in names], out=flat[j])
    return flat, names, shapes


class Curve:
    """Base class of the curve families: points in one flat buffer, coefficients :math:`c_j(t)` per family.

    Parameters
    ----------
    points : sequence of dict str -> Tensor
        The ``n >= 2`` points :math:`p_0, \\dots, p_{n-1}` (:math:`p_0` and :math:`p_{n-1}` are the end points),
        each mapping the same parameter names to tensors of the same shapes, one floating dtype, one device.
        They are copied.
    trainable : sequence of bool, optional
        Which points a fit may move. Default: the interior points (the end points are fixed).

    Raises
    ------
    ShapeMismatchError
        If two points differ in keys or shapes (names the parameter).
    TypeError, ValueError
        For a wrong kind of input, mixed dtypes or devices, or a number of points the family does not allow.
    """

    family: ClassVar[str] = ""

    def __init__(
        self, points: Sequence[Mapping[str, torch.Tensor]], *, trainable: Sequence[bool] | None = None
    ) -> None:
        if type(self) is Curve:
            raise TypeError("Curve is the base class; build a Line, Bezier or PolyChain")
        flat, names, shapes = _flatten_points(points)
        self._setup(flat, names, shapes, trainable)

    # ----------------------------------------------------------------------------------------------------------
    # construction helpers
    @classmethod
    def _from_flat(
        cls,
        flat: torch.Tensor,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        trainable: Sequence[bool] | None = None,
    ) -> Curve:
        """Wrap an ``(n, D)`` buffer without copying it (internal)."""
        obj = cls.__new__(cls)
        obj._setup(flat, tuple(names), tuple(torch.Size(s) for s in shapes), trainable)
        return obj

    def _setup(
        self,
        flat: torch.Tensor,
        names: tuple[str, ...],
        shapes: tuple[torch.Size, ...],
        trainable: Sequence[bool] | None,
    ) -> None:
        n = flat.shape[0]
        self._check_num_points(n)
        if trainable is None:
            trainable = [0 < j < n - 1 for j in range(n)]
        if isinstance(trainable, (str, bytes)) or not isinstance(trainable, Sequence):
            raise TypeError(f"`trainable` must be a sequence of {n} bools, got {type(trainable).__name__}")
        if len(trainable) != n:
            raise ValueError(f"`trainable` must hold one bool per point ({n}), got {len(trainable)}")
        self._flat = flat
        self._names = names
        self._shapes = shapes
        self._numels = tuple(s.numel() for s in shapes)
        self._trainable = tuple(bool(x) for x in trainable)

    def _check_num_points(self, n: int) -> None:
        if n < 2:
            raise ValueError(f"a {type(self).__name__} needs at least 2 points, got {n}")

    @staticmethod
    def _line_points(
        point_a: Mapping[str, torch.Tensor], point_b: Mapping[str, torch.Tensor], num_points: int, init: str
    ) -> tuple[torch.Tensor, tuple[str, ...], tuple[torch.Size, ...]]:
        """``num_points`` points evenly spaced on the segment from ``point_a`` to ``point_b``, as one buffer."""
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {list(_INITS)}")
        if not isinstance(point_a, Mapping) or not isinstance(point_b, Mapping):
            raise TypeError("`point_a` and `point_b` must be dicts name -> Tensor")
        check_compatible(point_a, point_b, ("point_a", "point_b"))
        ends, names, shapes = _flatten_points([point_a, point_b], label="end points")
        flat = torch.empty(num_points, ends.shape[1], dtype=ends.dtype, device=ends.device)
        flat[0] = ends[0]
        flat[-1] = ends[1]
        for j in range(1, num_points - 1):
            torch.lerp(ends[0], ends[1], j / (num_points - 1), out=flat[j])
        return flat, names, shapes

    # ----------------------------------------------------------------------------------------------------------
    # properties
    @property
    def num_points(self) -> int:
        """Number of points :math:`n` (end points included)."""
        return int(self._flat.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in the order of the flat buffer."""
        return self._names

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        """Parameter shapes, in the order of :attr:`names`."""
        return self._shapes

    @property
    def numel(self) -> int:
        """Number of scalar parameters :math:`D` of one point."""
        return int(self._flat.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self._flat.dtype

    @property
    def device(self) -> torch.device:
        return self._flat.device

    @property
    def trainable(self) -> tuple[bool, ...]:
        """One bool per point: which points a fit may move (end points fixed by default)."""
        return self._trainable

    @property
    def points(self) -> list[dict[str, torch.Tensor]]:
        """The points as dicts name -> Tensor (views of the internal buffer: read them, do not modify them)."""
        return [self._unflatten(self._flat[j]) for j in range(self.num_points)]

    # ----------------------------------------------------------------------------------------------------------
    # evaluation
    def _coefficient_list(self, t: float) -> list[float]:
        """The coefficients :math:`c_j(t)` of the family, one per point (each family defines them)."""
        raise TypeError("Curve is the base class; build a Line, Bezier or PolyChain")

    def coefficients(self, t: float) -> torch.Tensor:
        """The coefficients :math:`c_j(t)`, a float64 CPU tensor of shape ``(n,)``.

        Raises
        ------
        ValueError
            If ``t`` lies outside [0, 1].
        """
        return torch.tensor(self._coefficient_list(_check_t(t)), dtype=torch.float64)

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: part.view(shape)
            for name, part, shape in zip(self._names, flat.split(self._numels), self._shapes)
        }

    def _flat_at(self, t: float) -> torch.Tensor:
        """:math:`w(t)` as one flat vector of length D (no autograd)."""
        coeffs = torch.tensor(self._coefficient_list(_check_t(t)), dtype=self._flat.dtype, device=self.device)
        with torch.no_grad():
            return torch.mv(self._flat.t(), coeffs)

    def __call__(self, t: float) -> dict[str, torch.Tensor]:
        """The weights :math:`w(t) = \\sum_j c_j(t) p_j` as a new dict name -> Tensor.

        Raises
        ------
        ValueError
            If ``t`` lies outside [0, 1].
        """
        return self._unflatten(self._flat_at(t))

    # ----------------------------------------------------------------------------------------------------------
    # conversion and files
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Curve:
        """A copy of the curve on ``device`` and/or with ``dtype`` (the same object when nothing changes)."""
        flat = self._flat.to(device=device, dtype=dtype)
        if flat is self._flat:
            return self
        return type(self)._from_flat(flat, self._names, self._shapes, self._trainable)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the curve: family, size (``num_points``; ``degree`` or ``bends``), points
        (one ``(n, D)`` tensor ``flat``), parameter names and shapes, trainable mask.

        The dict holds only tensors, strings, ints, bools and lists, so it loads with ``weights_only=True``.
        """
        return {
            "kind": "curve",
            "family": self.family,
            "num_points": self.num_points,
            "names": list(self._names),
            "shapes": [list(s) for s in self._shapes],
            "trainable": list(self._trainable),
            "flat": self._flat,
            **self._shape_entries(),
        }

    def _shape_entries(self) -> dict[str, int]:
        """Family-specific size entries of :meth:`state_dict` (Bezier: ``degree``; PolyChain: ``bends``)."""
        return {}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Curve:
        """Rebuild a curve from :meth:`state_dict` (called on :class:`Curve`, dispatches on the family).

        Raises
        ------
        CheckpointError
            If an entry is missing or inconsistent, or the family is unknown or not ``cls``'s.
        """
        missing = [k for k in ("family", "num_points", "names", "shapes", "trainable", "flat") if k not in state]
        if missing:
            raise CheckpointError(f"a curve state dict lacks the entries {missing}")
        family = state["family"]
        if family not in CURVE_FAMILIES:
            raise CheckpointError(f"unknown curve family {family!r}; expected one of {sorted(CURVE_FAMILIES)}")
        target = CURVE_FAMILIES[family]
        if cls is not Curve and target is not cls:
            raise CheckpointError(f"the state dict holds a {target.__name__}, not a {cls.__name__}")
        flat = state["flat"]
        names = list(state["names"])
        shapes = [torch.Size(s) for s in state["shapes"]]
        if not isinstance(flat, torch.Tensor) or flat.ndim != 2 or flat.shape[0] != state["num_points"]:
            raise CheckpointError(f"the curve state dict's `flat` is not a ({state['num_points']}, D) tensor")
        if len(names) != len(shapes) or sum(s.numel() for s in shapes) != flat.shape[1]:
            raise CheckpointError("the curve state dict's names and shapes do not match its `flat` tensor")
        try:
            curve = target._from_flat(flat, names, shapes, list(state["trainable"]))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid curve state dict: {exc}") from exc
        for key, value in curve._shape_entries().items():
            if key in state and state[key] != value:
                raise CheckpointError(
                    f"the curve state dict says {key}={state[key]} but holds {curve.num_points} points"
                )
        return curve

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically to ``path`` (a reader never sees half a file)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> Curve:
        """Read a curve written by :meth:`save` (``torch.load(weights_only=True)`` + validation)."""
        state = load_checkpoint(
            path,
            kind="curve",
            required=("family", "num_points", "names", "shapes", "trainable", "flat"),
            map_location=map_location,
        )
        return cls.from_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_points={self.num_points}, parameters={len(self._names)} tensors / "
            f"{self.numel} values, trainable={self._trainable}, dtype={self.dtype}, device={self.device})"
        )


class Line(Curve):
    """The segment :math:`w(t) = (1 - t)\\, p_0 + t\\, p_1` (nothing to train: the baseline of [1]_, [2]_).

    Examples
    --------
    >>> import torch
    >>> line = Line.between({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    >>> line(0.25)["w"]
    tensor([0.2500, 0.2500])
    """

    family: ClassVar[str] = "line"

    def _check_num_points(self, n: int) -> None:
        if n != 2:
            raise ValueError(f"a Line has exactly 2 points, got {n}")

    @classmethod
    def between(cls, point_a: Mapping[str, torch.Tensor], point_b: Mapping[str, torch.Tensor]) -> Line:
        """The segment from ``point_a`` (t = 0) to ``point_b`` (t = 1).

        Raises
        ------
        ShapeMismatchError
            If the two points differ in keys or shapes (names the parameter).
        """
        flat, names, shapes = cls._line_points(point_a, point_b, 2, "linear")
        return cls._from_flat(flat, names, shapes, [False, False])

    def _coefficient_list(self, t: float) -> list[float]:
        return [1.0 - t, t]


class Bezier(Curve):
    """A Bezier curve of degree :math:`n - 1` through its end points ([1]_, the curve of all results in [2]_).

    .. math::

        w(t) = \\sum_{j=0}^{n-1} \\binom{n-1}{j} t^j (1 - t)^{n-1-j} p_j .

    The quadratic case (``degree=2``) is :math:`(1-t)^2 w_A + 2t(1-t)\\theta + t^2 w_B`, with one trainable
    control point :math:`\\theta`.

    Examples
    --------
    >>> import torch
    >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    >>> curve = Bezier.between(a, b)              # theta = (a + b) / 2: the initial curve is the line
    >>> curve.trainable
    (False, True, False)
    >>> curve(0.25)["w"]
    tensor([0.2500, 0.2500])
    >>> curve.coefficients(0.5)
    tensor([0.2500, 0.5000, 0.2500], dtype=torch.float64)
    """

    family: ClassVar[str] = "bezier"

    @property
    def degree(self) -> int:
        """Polynomial degree :math:`n - 1`."""
        return self.num_points - 1

    def _shape_entries(self) -> dict[str, int]:
        return {"degree": self.degree}

    @classmethod
    def between(
        cls,
        point_a: Mapping[str, torch.Tensor],
        point_b: Mapping[str, torch.Tensor],
        *,
        degree: int = 2,
        init: str = "linear",
        free_ends: bool = False,
    ) -> Bezier:
        """A Bezier curve of ``degree`` from ``point_a`` to ``point_b``.

        Parameters
        ----------
        point_a, point_b : dict str -> Tensor
            End points (parameters of the same model), same keys and shapes.
        degree : int
            Polynomial degree, at least 1 (``degree - 1`` control points).
        init : {"linear"}
            ``"linear"`` puts control point :math:`j` at :math:`(1 - j/n) w_A + (j/n) w_B`, so that the curve is
            exactly the straight line (Bernstein polynomials reproduce linear functions); for ``degree=2`` this is
            the midpoint initialisation of [1]_, [2]_.
        free_ends : bool
            Let a fit move the end points too (default: fixed).

        Raises
        ------
        ShapeMismatchError
            If the two points differ in keys or shapes (names the parameter).
        ValueError
            For ``degree < 1`` or an unknown ``init``.
        """
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"`degree` must be an int >= 1, got {degree!r}")
        flat, names, shapes = cls._line_points(point_a, point_b, degree + 1, init)
        trainable = [free_ends or 0 < j < degree for j in range(degree + 1)]
        return cls._from_flat(flat, names, shapes, trainable)

    def _coefficient_list(self, t: float) -> list[float]:
        n = self.num_points - 1
        return [math.comb(n, j) * t**j * (1.0 - t) ** (n - j) for j in range(n + 1)]


class PolyChain(Curve):
    """A polygonal chain through its points at evenly spaced :math:`t` ([1]_).

    .. math::

        w(t) = \\sum_{i=0}^{n-1} \\max\\bigl(0,\\, 1 - |t (n - 1) - i|\\bigr)\\, p_i ,

    i.e. point :math:`p_i` sits at :math:`t = i/(n-1)` and the chain is linear between them. With one bend
    :math:`\\theta`: :math:`w(t) = 2(t\\theta + (1/2 - t) w_A)` for :math:`t \\le 1/2` and
    :math:`2((t - 1/2) w_B + (1 - t)\\theta)` otherwise.

    Examples
    --------
    >>> import torch
    >>> chain = PolyChain.between({"w": torch.zeros(1)}, {"w": torch.ones(1)}, bends=3)
    >>> chain.coefficients(0.3)
    tensor([0.0000, 0.8000, 0.2000, 0.0000, 0.0000], dtype=torch.float64)
    """

    family: ClassVar[str] = "polychain"

    @property
    def bends(self) -> int:
        """Number of interior points :math:`n - 2`."""
        return self.num_points - 2

    def _shape_entries(self) -> dict[str, int]:
        return {"bends": self.bends}

    @classmethod
    def between(
        cls,
        point_a: Mapping[str, torch.Tensor],
        point_b: Mapping[str, torch.Tensor],
        *,
        bends: int = 1,
        init: str = "linear",
        free_ends: bool = False,
    ) -> PolyChain:
        """A chain with ``bends`` interior points from ``point_a`` to ``point_b``.

        Parameters
        ----------
        point_a, point_b : dict str -> Tensor
            End points, same keys and shapes.
        bends : int
            Number of interior (trainable) points, at least 0.
        init : {"linear"}
            ``"linear"`` puts bend :math:`i` at :math:`(1 - s_i) w_A + s_i w_B`, :math:`s_i = i/(n-1)`: the
            initial chain is exactly the straight line.
        free_ends : bool
            Let a fit move the end points too (default: fixed).

        Raises
        ------
        ShapeMismatchError
            If the two points differ in keys or shapes (names the parameter).
        ValueError
            For ``bends < 0`` or an unknown ``init``.
        """
        if isinstance(bends, bool) or not isinstance(bends, int) or bends < 0:
            raise ValueError(f"`bends` must be an int >= 0, got {bends!r}")
        n = bends + 2
        flat, names, shapes = cls._line_points(point_a, point_b, n, init)
        trainable = [free_ends or 0 < j < n - 1 for j in range(n)]
        return cls._from_flat(flat, names, shapes, trainable)

    def _coefficient_list(self, t: float) -> list[float]:
        n = self.num_points
        return [max(0.0, 1.0 - abs(t * (n - 1) - i)) for i in range(n)]


CURVE_FAMILIES: dict[str, type[Curve]] = {"line": Line, "bezier": Bezier, "polychain": PolyChain}
