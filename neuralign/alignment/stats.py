"""Streaming activation statistics of two networks on the same inputs (one pass, bounded memory)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn
from torch.func import functional_call

from neuralign._distributed import all_reduce_, check_same_batch, is_distributed, shard_batch
from neuralign._utils import check_compatible
from neuralign.alignment.spec import PermutationSpec, Tap
from neuralign.alignment.trace import _tap_graph, _trace_graph
from neuralign.attacks import PGD
from neuralign.errors import NonFiniteError, SpecError

__all__ = ["ActivationMoments", "activation_moments"]

logger = logging.getLogger(__name__)

_EPS_STD = 1e-5  # added to the standard deviation, as in the official code's z-scores


@dataclass(frozen=True)
class ActivationMoments:
    """First and second moments of one tap's activations in models A and B (float64, CPU).

    Every sample (example x spatial position) is one observation of the ``K`` units.

    Attributes
    ----------
    count : int
        Number of observations ``M``.
    mean_a, mean_b : Tensor (K,)
    var_a, var_b : Tensor (K,)
        Population variances (ddof = 0).
    cross : Tensor (K, K)
        Uncentred cross moment :math:`E[a b^\\top]`.
    constant_a, constant_b : BoolTensor (K,), optional
        Units that took one single value on every observation ("dead" units, e.g. a ReLU that never fires): the
        data carries no information about which unit they are. ``None`` when unknown (moments built by hand).
    """

    count: int
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    var_a: torch.Tensor
    var_b: torch.Tensor
    cross: torch.Tensor
    constant_a: torch.Tensor | None = None
    constant_b: torch.Tensor | None = None

    def correlation(self) -> torch.Tensor:
        """Pearson correlation matrix, with the official code's :math:`\\epsilon = 10^{-5}` on the deviations.

        .. math::  C_{ij} = \\frac{\\mathrm{cov}(a_i, b_j)}{(\\sigma_{a,i} + \\epsilon)(\\sigma_{b,j} + \\epsilon)}

        Rows of constant units of A and columns of constant units of B are exactly 0.
        """
        cov = self.cross - torch.outer(self.mean_a, self.mean_b)
        sa = self.var_a.clamp_min(0).sqrt() + _EPS_STD
        sb = self.var_b.clamp_min(0).sqrt() + _EPS_STD
        corr = cov / torch.outer(sa, sb)
        if self.constant_a is not None:
            corr[self.constant_a] = 0.0
        if self.constant_b is not None:
            corr[:, self.constant_b] = 0.0
        return corr


def _units_view(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, bool]:
    """A view of ``t`` as ``(N, K, P)`` (units on axis 1, positions last) or ``(M, K)``, copying only if needed."""
    if axis == t.ndim - 1:
        return t.reshape(-1, t.shape[-1]), False
    if axis == 1:
        view = t.reshape(t.shape[0], t.shape[1], -1)
        return (view[..., 0], False) if view.shape[-1] == 1 else (view, True)
    return t.movedim(axis, -1).reshape(-1, t.shape[axis]), False


def _standardise(v: torch.Tensor, dims: tuple[int, ...], spatial: bool):
    """``(z, centre, scale, low, high)`` with ``z = (v - centre) / scale`` per unit, ``|z| <= 4``.

    ``centre`` is the batch mean (the mid-range if that sum overflows), or the unit's value when the unit is
    constant over the batch, so that such a unit gets ``z = 0`` exactly and a unit whose mean dwarfs
    its spread loses nothing to cancellation. ``scale`` is the power of two just below the half range (dividing by
    it is exact), which keeps every product and sum of ``z`` far from float32 overflow whatever the activations'
    magnitude. Returns Nones when an activation is NaN or infinite.
    """
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    v = v.to(work)
    low, high = v.amin(dims), v.amax(dims)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        return None, None, None, None, None
    mid = high / 2 + low / 2  # halves first: high + low can overflow
    mean = v.mean(dims)
    centre = torch.where((low == high) | ~torch.isfinite(mean), mid, mean)  # a float32 sum can overflow: then mid
    half = high / 2 - low / 2
    inverse = torch.where(half > 0, torch.exp2(-torch.floor(torch.log2(half))), torch.ones_like(half))
    shape = (1, -1, 1) if spatial else (1, -1)
    inverse = inverse.reshape(shape)
    # (v - centre) * inverse in one pass: multiplying by a power of two is exact, so only the difference rounds
    z = torch.addcmul(-centre.reshape(shape) * inverse, v, inverse)
    return z, centre.double(), 1.0 / inverse.flatten().double(), low.double(), high.double()


class _Accumulator:
    """Streaming moments of paired activations: per-batch standardised float32 sums merged in float64 (Chan et al.).

    Each batch is centred at its per-unit mean and divided by a power of two near its half range (``|z| <= 4``),
    so that the float32 sums can neither overflow (activations up to float32's largest value) nor lose a small
    spread under a large mean; the batch's centred moments are rescaled in float64 and merged with the pairwise
    update of Chan, Golub & LeVeque (1983). The per-unit extremes are kept to find units that are constant on all
    the data.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_a = self.mean_b = self.m2_a = self.m2_b = self.c_ab = None
        self.low_a = self.high_a = self.low_b = self.high_b = None

    def update(self, a: torch.Tensor, b: torch.Tensor, axis: int) -> str | None:
        """Add one batch; returns ``"model_a"`` or ``"model_b"`` if that model's activations are not finite."""
        va, spatial = _units_view(a, axis)
        vb, _ = _units_view(b, axis)
        dims = (0, 2) if spatial else (0,)
        za, ca, ha, lo_a, hi_a = _standardise(va, dims, spatial)
        if za is None:
            return "model_a"
        zb, cb, hb, lo_b, hi_b = _standardise(vb, dims, spatial)
        if zb is None:
            return "model_b"
        n = za.numel() // za.shape[1]
        sa, sb = za.sum(dims).double() * ha, zb.sum(dims).double() * hb
        qa = torch.linalg.vector_norm(za, dim=dims).double() ** 2 * (ha * ha)
        qb = torch.linalg.vector_norm(zb, dim=dims).double() ** 2 * (hb * hb)
        cross = (torch.bmm(za, zb.transpose(1, 2)).sum(0) if spatial else za.T @ zb).double() * torch.outer(ha, hb)
        # centred moments of this batch (sums relative to the centre, then about the batch mean)
        ma, mb = ca + sa / n, cb + sb / n
        m2a, m2b = (qa - sa * sa / n).clamp_min(0), (qb - sb * sb / n).clamp_min(0)
        cab = cross - torch.outer(sa, sb) / n
        if self.mean_a is None:
            self.n, self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.c_ab = n, ma, mb, m2a, m2b, cab
            self.low_a, self.high_a, self.low_b, self.high_b = lo_a, hi_a, lo_b, hi_b
            return None
        total = self.n + n
        da, db = ma - self.mean_a, mb - self.mean_b
        w = self.n * n / total
        self.mean_a = self.mean_a + da * (n / total)
        self.mean_b = self.mean_b + db * (n / total)
        self.m2_a = self.m2_a + m2a + da * da * w
        self.m2_b = self.m2_b + m2b + db * db * w
        self.c_ab = self.c_ab + cab + torch.outer(da, db) * w
        self.low_a, self.high_a = torch.minimum(self.low_a, lo_a), torch.maximum(self.high_a, hi_a)
        self.low_b, self.high_b = torch.minimum(self.low_b, lo_b), torch.maximum(self.high_b, hi_b)
        self.n = total
        return None

    def all_reduce(self) -> None:
        """Merge every rank's moments into those of all the ranks' data, alike on every rank (float64 sums).

        The multi-way form of the pairwise update: with the global mean :math:`\\bar a`,
        :math:`M_2 = \\sum_r M_{2,r} + n_r (\\bar a_r - \\bar a)^2` and likewise for the cross moments, so that only
        deviations from the global mean are summed (no cancellation).
        """
        n = float(self.n)
        units_a = self.mean_a.numel()
        first = all_reduce_(torch.cat([self.mean_a * n, self.mean_b * n, self.mean_a.new_tensor([n])]))
        total = float(first[-1])
        mean_a, mean_b = first[:units_a] / total, first[units_a:-1] / total
        da, db = self.mean_a - mean_a, self.mean_b - mean_b
        cross = self.c_ab + n * torch.outer(da, db)
        second = all_reduce_(torch.cat([self.m2_a + n * da * da, self.m2_b + n * db * db, cross.flatten()]))
        units_b = mean_b.numel()
        self.m2_a, self.m2_b = second[:units_a], second[units_a : units_a + units_b]
        self.c_ab = second[units_a + units_b :].view(units_a, units_b)
        self.mean_a, self.mean_b, self.n = mean_a, mean_b, int(round(total))
        for low in (self.low_a, self.low_b):
            all_reduce_(low, dist.ReduceOp.MIN)
        for high in (self.high_a, self.high_b):
            all_reduce_(high, dist.ReduceOp.MAX)

    def moments(self) -> ActivationMoments:
        n = self.n
        const_a = (self.low_a == self.high_a).cpu()
        const_b = (self.low_b == self.high_b).cpu()
        # a constant unit has no spread and no covariance, exactly (not a rounding residue)
        m2_a = self.m2_a.masked_fill(const_a.to(self.m2_a.device), 0.0)
        m2_b = self.m2_b.masked_fill(const_b.to(self.m2_b.device), 0.0)
        c_ab = self.c_ab.masked_fill(const_a.to(self.c_ab.device)[:, None], 0.0)
        c_ab = c_ab.masked_fill(const_b.to(self.c_ab.device)[None, :], 0.0)
        cross = c_ab / n + torch.outer(self.mean_a, self.mean_b)
        return ActivationMoments(
            n,
            self.mean_a.cpu(),
            self.mean_b.cpu(),
            (m2_a / n).cpu(),
            (m2_b / n).cpu(),
            cross.cpu(),
            const_a,
            const_b,
        )


def _capture_module(gm: torch.fx.GraphModule, nodes: list[str]) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose output is the tuple of the named nodes' values (the rest is dead-code eliminated)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    missing = [n for n in nodes if n not in by_name]
    if missing:
        raise SpecError(f"the spec's taps name fx nodes {missing} that the traced model does not have")
    graph.output(tuple(by_name[n] for n in nodes))
    cap = torch.fx.GraphModule(gm, graph)
    cap.graph.eliminate_dead_code()
    cap.recompile()
    cap.eval()
    return cap


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        raise TypeError("loaders yielding dicts are not supported; yield (inputs, targets) or inputs")
    return batch


def _float_tensor(model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """The first floating-point parameter or buffer of ``model`` (name and tensor), or None."""
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            return name, t
    return None


def check_same_dtype_and_device(model_a: nn.Module, model_b: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """Check that two models hold floating-point tensors of one dtype on one device; return that pair.

    Both models are evaluated on the same input batches, so they must agree; the inputs are then moved (and
    floating-point inputs cast) to this device and dtype. Returns None for models without floating-point tensors.

    Raises
    ------
    TypeError
        If the models' floating-point dtypes differ (names the first tensor of each).
    ValueError
        If the models are on different devices.
    """
    fa, fb = _float_tensor(model_a), _float_tensor(model_b)
    if fa is None or fb is None:
        return None
    (ka, ta), (kb, tb) = fa, fb
    if ta.dtype != tb.dtype:
        raise TypeError(
            f"`model_a` has dtype {ta.dtype} (`{ka}`) but `model_b` has {tb.dtype} (`{kb}`); both models run on "
            "the same inputs, convert one with .to(dtype)"
        )
    if ta.device != tb.device:
        raise ValueError(
            f"`model_a` is on device {ta.device} (`{ka}`) but `model_b` is on {tb.device} (`{kb}`); move one "
            "with .to(device)"
        )
    return ta.dtype, ta.device


def check_batch_budget(max_batches: int | None) -> None:
    """Raise a one-line TypeError / ValueError unless ``max_batches`` is None or an int >= 1."""
    if max_batches is None:
        return
    if isinstance(max_batches, bool) or not isinstance(max_batches, int):
        raise TypeError(f"`max_batches` must be an int or None, got {type(max_batches).__name__}")
    if max_batches < 1:
        raise ValueError(f"`max_batches` must be at least 1, got {max_batches}")


def activation_moments(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    spec: PermutationSpec | None = None,
    *,
    kind: str = "post",
    max_batches: int | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    adversarial: PGD | None = None,
    generator: torch.Generator | None = None,
    require_taps: bool = True,
) -> tuple[PermutationSpec, dict[str, list[ActivationMoments]]]:
    """Moments of every group's activations in both models, in one pass over ``loader``.

    Parameters
    ----------
    model_a, model_b : nn.Module
        Two networks of the same architecture, dtype and device (run in eval mode on copies; the models are
        untouched).
    loader : iterable
        Yields input batches or ``(inputs, targets)`` pairs; both models see the same inputs. Inputs are moved to
        the models' device, and floating-point inputs cast to the models' dtype (a debug log line says so).
    spec : PermutationSpec, optional
        Traced from ``model_a`` on the first batch when omitted. A given spec is used as given: its taps name
        nodes of the plain eval-mode torch.fx trace of ``model_a`` (no tracing rule is run, so operations the
        tracer refuses do not matter); taps on nodes that exist only in train mode are ignored.
    kind : {"post", "pre"}
        Read activations after the activation function (the paper's choice for correlation) or before it.
        Groups without an activation function are read at the output of their producing layer.
    max_batches : int, optional
        Stop after this many batches (at least 1).
    callback : callable, optional
        Called after each batch with the progress record ``{"stage": "align", "step": batches done}``.
    adversarial : PGD, optional
        Read each model's activations on its own PGD examples of the batch (generated in eval mode against that
        model; the loader must yield ``(inputs, targets)`` with inputs in [0, 1]) instead of the clean inputs.
    generator : torch.Generator, optional
        Source of the attacks' random starts.
    require_taps : bool
        Whether a spec without any tap of ``kind`` is an error (default) or gives empty moments without a pass.

    Returns
    -------
    spec, moments
        The spec used and, per group, one :class:`ActivationMoments` per tap (several for groups tied by
        residual additions; none for a group without a tap of this ``kind``, e.g. units that exist only in
        train-mode branches).

    Raises
    ------
    ValueError
        If ``loader`` yields no batch, ``kind`` is unknown, ``max_batches < 1``, or the models are on different
        devices.
    TypeError
        If the models' dtypes differ or ``max_batches`` is not an int.
    ShapeMismatchError
        If the models' state dicts differ.
    SpecError
        If the spec has groups but no tap of this ``kind`` at all (unless ``require_taps=False``: then the moments
        are empty and no pass is made), taps fx nodes that the model's graph has in
        neither mode, or torch.fx cannot trace the model.
    NonFiniteError
        If an activation is NaN or infinite (names the fx node and the model). Finite activations of any size
        are accumulated without overflow.
    """
    if kind not in ("post", "pre"):
        raise ValueError(f"unknown activation kind '{kind}'; expected one of ['post', 'pre']")
    check_batch_budget(max_batches)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible(state_a, state_b)
    kind_of = check_same_dtype_and_device(model_a, model_b)
    iterator = iter(loader)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("`loader` yielded no batches") from None
    dtype, device = kind_of if kind_of is not None else (None, None)

    def prepare(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or device is None:
            return x
        if x.is_floating_point() and x.dtype != dtype:
            logger.debug("casting the loader's %s inputs to the models' dtype %s", x.dtype, dtype)
            return x.to(device=device, dtype=dtype)
        return x.to(device)

    if spec is None:
        spec, gm = _trace_graph(model_a, prepare(_first_input(first)))
    else:  # the graph the spec was traced on: torch.fx's, or torch.export's on the first batch
        gm = _tap_graph(model_a, prepare(_first_input(first)), {t.node for ts in spec.taps.values() for t in ts})
    present = {n.name for n in gm.graph.nodes}
    absent = {t.node for ts in spec.taps.values() for t in ts if t.node not in present}
    if absent:
        # taps on train-only branches (e.g. auxiliary heads) do not exist in eval mode: those units do not affect
        # the eval-mode function, and their groups are matched by weights; any other unknown node is an error
        train_graph = _tap_graph(model_a, prepare(_first_input(first)), absent, train=True)
        train_only = {n.name for n in train_graph.graph.nodes} & absent
        if absent - train_only:
            raise SpecError(f"the spec's taps name fx nodes {sorted(absent - train_only)} that the model does not have")
        logger.debug("ignoring taps on train-only fx nodes %s", sorted(train_only))
    taps: dict[str, list[Tap]] = {}
    for g in spec.groups:
        chosen = [t for t in spec.taps.get(g, ()) if t.kind in (kind, "out") and t.node in present]
        if chosen:
            taps[g] = chosen
    if spec.groups and not taps and not require_taps:
        return spec, {}
    if spec.groups and not taps:
        raise SpecError(
            f"the spec has no '{kind}' or 'out' activation tap for any group; add taps with SpecBuilder.tap or use "
            "method='weight'"
        )
    nodes = list(dict.fromkeys(t.node for ts in taps.values() for t in ts))
    cap = _capture_module(gm, nodes)
    params_b = {k: v for k, v in state_b.items() if k in cap.state_dict()}
    accs = {(g, t): _Accumulator() for g, ts in taps.items() for t in ts}
    n_batches = 0
    distributed = is_distributed()  # each rank accumulates its slice of every batch; merged after the pass

    def batches():
        yield first
        yield from iterator

    with torch.no_grad():
        for batch in batches():
            if max_batches is not None and n_batches >= max_batches:
                break
            x = x_b = prepare(_first_input(batch))
            y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
            if distributed:
                if n_batches == 0:
                    check_same_batch(x, y if isinstance(y, torch.Tensor) else None, label="loader")
                x, y, _ = shard_batch(x, y if isinstance(y, torch.Tensor) else None, label="loader")
                x_b = x
            if adversarial is not None:
                if not isinstance(y, torch.Tensor):
                    raise TypeError("`loader` must yield (inputs, targets) pairs to align on adversarial inputs")
                y = y.to(x.device)
                x, x_b = (adversarial.attack(m, x, y, train=False, generator=generator) for m in (model_a, model_b))
            out_a = dict(zip(nodes, cap(x)))
            out_b = dict(zip(nodes, functional_call(cap, params_b, (x_b,), tie_weights=False)))
            for (_, t), acc in accs.items():
                bad = acc.update(out_a[t.node], out_b[t.node], t.axis)
                if bad is not None:
                    raise NonFiniteError(f"activations of layer `{t.node}` in `{bad}` contain NaN or inf")
            n_batches += 1
            if callback is not None:
                callback({"stage": "align", "step": n_batches})
    moments: dict[str, list[ActivationMoments]] = {g: [] for g in spec.groups}
    for (g, _), acc in accs.items():
        if distributed:
            acc.all_reduce()
        moments[g].append(acc.moments())
    logger.debug("activation moments over %d batches for %d groups", n_batches, len(taps))
    return spec, moments
