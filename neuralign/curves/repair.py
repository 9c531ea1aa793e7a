"""REPAIR: renormalise an interpolated network's channels to the interpolation of its end points' statistics
(Jordan et al., ICLR 2023, arXiv:2211.08403, §4).

Averaging two aligned networks shrinks the variance of their hidden channels ("variance collapse"); REPAIR measures
each channel's mean and standard deviation in both end points and rescales the interpolated network's channel so
that its statistics are the interpolation of the end points'. The corrections are folded into the layers' own
weights (the notebooks' ``fuse_conv_bn`` step), so the result is a state dict of the unchanged architecture.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from neuralign._utils import split_batch
from neuralign._validate import check_real
from neuralign.curves import _weights

__all__ = ["RepairStatistics", "repair", "repair_points", "repair_statistics"]

logger = logging.getLogger(__name__)

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, _BatchNorm)


@dataclass(frozen=True)
class RepairStatistics:
    """Per-channel statistics of one network at its REPAIR points (:func:`repair_points`).

    Attributes
    ----------
    mean, std : dict str -> Tensor
        Per point (a module name), the channel means and population standard deviations, float64 CPU tensors of
        shape ``(C,)``, over every observation (example x spatial position) of the data.
    count : int
        Observations per channel (examples times spatial positions of the first point).
    batches : int
        Batches read.
    """

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    count: int
    batches: int


class _Probe(nn.Module):
    """Identity on a layer's output that accumulates its per-channel mean and variance (Chan et al.'s merge, in
    float64); in correcting mode it also maps each channel to ``(x - m_batch) / sqrt(v_batch + eps) * std + mean``,
    the train-mode batch norm of the REPAIR notebooks' ``ResetLayer``."""

    def __init__(self, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.target: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim % x.ndim
        dims = tuple(d for d in range(x.ndim) if d != dim)
        nb = x.numel() // x.shape[dim]
        xd = x.detach().double()
        mb = xd.mean(dims)
        shape = [1] * x.ndim
        shape[dim] = -1
        m2b = ((xd - mb.view(shape)) ** 2).sum(dims)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
        else:
            total = self.n + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / total)
            self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / total)
            self.n = total
        if self.target is None:
            return x
        mean, std, eps = self.target
        m = x.mean(dims, keepdim=True)
        v = x.var(dims, unbiased=False, keepdim=True)
        return (x - m) / torch.sqrt(v + eps) * std.view(shape) + mean.view(shape)


def _points(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str, nn.Module]]:
    """The REPAIR points of a traced model, in graph order: (node, module name, module)."""
    modules = dict(gm.named_modules())

    def layer(node: torch.fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        m = modules[node.target]
        return m if isinstance(m, _LAYERS) else None

    def reaches_output(node: torch.fx.Node) -> bool:
        # through parameter-free operations only: the layers that compute the network's outputs are not corrected
        seen, todo = set(), list(node.users)
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return True
            if user.op == "call_module" and any(True for _ in modules[user.target].parameters()):
                continue
            todo.extend(user.users)
        return False

    out, calls = [], {}
    for node in gm.graph.nodes:
        m = layer(node)
        if m is None:
            continue
        calls[node.target] = calls.get(node.target, 0) + 1
        users = list(node.users)
        if not isinstance(m, _BatchNorm) and users and all(isinstance(layer(u), _BatchNorm) for u in users):
            continue  # followed by batch norm: the point is after the batch norm
        if reaches_output(node):
            continue
        out.append((node, str(node.target), m))
    shared = sorted(name for name, n in calls.items() if n > 1)
    if shared:
        raise ValueError(f"REPAIR needs every layer to be called once, but `{shared[0]}` is called {calls[shared[0]]} "
                         "times")  # fmt: skip
    return out


def _trace(model: nn.Module) -> tuple[torch.fx.GraphModule, dict[str, _Probe]]:
    """A traced copy of ``model`` with a probe after each REPAIR point; eval mode except its batch norms."""
    work = copy.deepcopy(model).eval()
    try:
        gm = torch.fx.symbolic_trace(work)
    except Exception as exc:
        raise ValueError(f"REPAIR needs a model that torch.fx can trace; tracing {type(model).__name__} failed: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc  # fmt: skip
    probes: dict[str, _Probe] = {}
    for i, (node, name, m) in enumerate(_points(gm)):
        probe = _Probe(-1 if isinstance(m, nn.Linear) else 1)
        gm.add_submodule(f"_repair_probe_{i}", probe)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(f"_repair_probe_{i}", (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        probes[name] = probe
    gm.recompile()
    gm.eval()
    for m in gm.modules():
        if isinstance(m, _BatchNorm):
            m.train()  # batch statistics, as the notebooks' passes in train mode
    return gm, probes


def repair_points(model: nn.Module) -> tuple[str, ...]:
    """The modules whose outputs REPAIR renormalises, in the order of the forward pass.

    Every ``Linear`` and convolution whose output does not feed a batch norm, and every batch norm, except the
    layers that compute the network's outputs (reached from them through parameter-free operations only).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If torch.fx cannot trace ``model`` or a layer is called more than once.

    Examples
    --------
    >>> from torch import nn
    >>> repair_points(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
    ...                             nn.Linear(8, 3)))
    ('1', '3')
    """
    model = _weights.check_model(model)
    return tuple(_trace(model)[1])


def _run(gm: torch.fx.GraphModule, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
         loader: Iterable, max_batches: int | None, label: str) -> int:  # fmt: skip
    keys = set(gm.state_dict())
    p = {k: v for k, v in params.items() if k in keys}
    b = {k: v.clone() for k, v in buffers.items() if k in keys}
    device = next(iter(params.values())).device
    batches = 0
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            x, _ = split_batch(batch, device, label)
            try:
                functional_call(gm, (p, b), (x,), tie_weights=False)
            except RuntimeError as exc:
                raise ValueError(f"`{label}` yielded inputs of shape {tuple(x.shape)} that the model cannot take: "
                                 f"{str(exc).splitlines()[0]}") from exc  # fmt: skip
            batches += 1
    if batches == 0:
        raise ValueError(f"`{label}` yielded no batch")
    return batches


def _state(model: nn.Module, state: Mapping[str, torch.Tensor], label: str):
    params = _weights.parameters_of(model, state, label)
    if not params:
        raise ValueError("`model` has no parameter")
    device = next(iter(params.values())).device
    buffers = _weights.buffer_copies(model, device)
    for name in buffers:
        if name in state:
            buffers[name] = state[name].detach().to(device=device, copy=True)
    return params, buffers


def repair_statistics(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    loader: Iterable,
    *,
    max_batches: int | None = None,
) -> RepairStatistics:
    """Per-channel mean and standard deviation of a network's outputs at its REPAIR points (:func:`repair_points`).

    .. math::

        \\mu_c = \\frac1M \\sum_{m} h_{m,c}, \\qquad
        \\sigma_c = \\Big(\\frac1M \\sum_m (h_{m,c} - \\mu_c)^2\\Big)^{1/2},

    over all :math:`M` observations (examples times spatial positions) of channel :math:`c` of the point's output
    :math:`h`. The network runs in eval mode except its batch norms, which use batch statistics (train mode, as in
    the REPAIR notebooks' statistics passes); the model and ``state`` are not modified.

    Parameters
    ----------
    model : nn.Module
        The architecture (traced with torch.fx; never modified).
    state : dict str -> Tensor
        The network's parameters (a full state dict is accepted; its buffers are used where present).
    loader : iterable
        Input batches or ``(inputs, targets)`` pairs (the REPAIR data: usually training images).
    max_batches : int, optional
        Read only the first ``max_batches`` batches.

    Returns
    -------
    RepairStatistics

    Raises
    ------
    ShapeMismatchError
        If ``state`` does not match ``model``'s parameters (names the parameter).
    ValueError
        If the loader yields no batch or inputs the model cannot take, or torch.fx cannot trace the model.

    References
    ----------
    .. [1] K. Jordan, H. Sedghi, O. Saukh, R. Entezari, B. Neyshabur, "REPAIR: REnormalizing Permuted Activations
       for Interpolation Repair", ICLR 2023, arXiv:2211.08403.
    """
    model = _weights.check_model(model)
    max_batches = _weights.check_max_batches(max_batches, "max_batches")
    params, buffers = _state(model, state, "state")
    gm, probes = _trace(model)
    batches = _run(gm, params, buffers, loader, max_batches, "loader")
    return _collect(probes, batches)


def _collect(probes: Mapping[str, _Probe], batches: int) -> RepairStatistics:
    mean = {k: p.mean.cpu() for k, p in probes.items()}
    std = {k: (p.m2 / p.n).clamp_min(0).sqrt().cpu() for k, p in probes.items()}
    count = next(iter(probes.values())).n if probes else 0
    return RepairStatistics(mean=mean, std=std, count=count, batches=batches)


def repair(
    model: nn.Module,
    point: Mapping[str, torch.Tensor],
    statistics_a: RepairStatistics,
    statistics_b: RepairStatistics,
    loader: Iterable,
    *,
    t: float,
    max_batches: int | None = None,
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """REPAIR the network at ``point``: rescale its channels to the interpolation of the end points' statistics.

    With the end points' per-channel statistics :math:`(\\mu^A, \\sigma^A)`, :math:`(\\mu^B, \\sigma^B)`
    (:func:`repair_statistics`, B already aligned to A) and the target

    .. math::

        \\mu^\\star = (1 - t)\\,\\mu^A + t\\,\\mu^B, \\qquad \\sigma^\\star = (1 - t)\\,\\sigma^A + t\\,\\sigma^B,

    every REPAIR point's output :math:`h` is replaced by :math:`(h - \\mu) / (\\sigma^2 + \\epsilon)^{1/2}\\,
    \\sigma^\\star + \\mu^\\star`, with :math:`(\\mu, \\sigma)` the statistics of :math:`h` in the network at
    ``point`` with all earlier points already corrected (one pass in which each correction normalises by its
    batch's statistics, as the notebooks' ``ResetLayer``). The correction is affine per channel, so it is folded
    into the layer: :math:`W_c \\leftarrow s_c W_c`, :math:`b_c \\leftarrow s_c (b_c - \\mu_c) + \\mu^\\star_c`
    with :math:`s_c = \\sigma^\\star_c / (\\sigma_c^2 + \\epsilon)^{1/2}` (for a batch norm, its :math:`\\gamma`
    and :math:`\\beta`). Batch norms are then re-estimated on ``loader`` (:func:`reestimate_bn`).

    Parameters
    ----------
    model : nn.Module
        The architecture (traced with torch.fx; never modified).
    point : dict str -> Tensor
        The network to correct: a point of the segment :math:`(1 - t)\\,\\theta_A + t\\,P(\\theta_B)` or of any
        curve between them (parameters; a full state dict is accepted).
    statistics_a, statistics_b : RepairStatistics
        The end points' statistics.
    loader : iterable
        Input batches or ``(inputs, targets)`` pairs (the REPAIR data).
    t : float
        The interpolation weight of the target statistics, in [0, 1].
    max_batches : int, optional
        Read only the first ``max_batches`` batches in each pass.
    eps : float
        Added to the variance before the square root (>= 0; default batch norm's 1e-5).

    Returns
    -------
    dict str -> Tensor
        The repaired network's full state dict (parameters, and buffers with re-estimated batch norm), on the
        parameters' device and dtype.

    Raises
    ------
    TypeError
        If the statistics are not :class:`RepairStatistics`.
    ValueError
        For ``t`` outside [0, 1], statistics of other points or channel counts, a convolution or linear layer
        without a bias or a batch norm without affine parameters at a REPAIR point (the shift cannot be folded),
        a loader that yields nothing, or a model torch.fx cannot trace.
    ShapeMismatchError
        If ``point`` does not match ``model``'s parameters.

    Notes
    -----
    Cost: one pass over ``loader`` for the corrections and one for batch norm (none without batch norm), besides
    the end points' statistics (one pass each, reusable for every ``t``). In a network with batch norm the points
    are the batch norms' outputs, so REPAIR sets each batch norm's :math:`\\beta` and :math:`|\\gamma|` to the
    interpolation of the end points' output statistics: what re-estimating batch norm alone gives when the end
    points' :math:`\\gamma` have one sign (up to :math:`\\epsilon`). The two differ at layers without batch norm
    and at channels whose :math:`\\gamma` change sign; residual streams (after additions) are not renormalised.

    References
    ----------
    .. [1] K. Jordan, H. Sedghi, O. Saukh, R. Entezari, B. Neyshabur, "REPAIR: REnormalizing Permuted Activations
       for Interpolation Repair", ICLR 2023, arXiv:2211.08403.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> a = dict(model.named_parameters())
    >>> b = {k: torch.randn_like(v) for k, v in a.items()}
    >>> x = torch.randn(64, 4)
    >>> sa, sb = repair_statistics(model, a, [x]), repair_statistics(model, b, [x])
    >>> mid = {k: (a[k] + b[k]) / 2 for k in a}
    >>> fixed = repair(model, mid, sa, sb, [x], t=0.5, eps=0.0)
    >>> h = x @ fixed["0.weight"].T + fixed["0.bias"]
    >>> torch.allclose(h.std(0, unbiased=False).double(), (sa.std["0"] + sb.std["0"]) / 2, atol=1e-5)
    True
    """
    model = _weights.check_model(model)
    t = check_real(t, "t", low=0.0, high=1.0)
    eps = check_real(eps, "eps", low=0.0)
    max_batches = _weights.check_max_batches(max_batches, "max_batches")
    for label, stats in (("statistics_a", statistics_a), ("statistics_b", statistics_b)):
        if not isinstance(stats, RepairStatistics):
            raise TypeError(f"`{label}` must be RepairStatistics (from repair_statistics), got {type(stats).__name__}")
    params, buffers = _state(model, point, "point")
    gm, probes = _trace(model)
    modules = dict(gm.named_modules())
    targets = {}
    for name, probe in probes.items():
        for label, stats in (("statistics_a", statistics_a), ("statistics_b", statistics_b)):
            if name not in stats.mean:
                raise ValueError(f"`{label}` has no statistics for the REPAIR point `{name}`; compute them with "
                                 "repair_statistics on this model")  # fmt: skip
        mean_a, mean_b = statistics_a.mean[name], statistics_b.mean[name]
        if mean_a.shape != mean_b.shape:
            raise ValueError(f"`statistics_a` and `statistics_b` have {mean_a.numel()} and {mean_b.numel()} channels "
                             f"at `{name}`")  # fmt: skip
        m = modules[name]
        if isinstance(m, _BatchNorm) and not m.affine:
            raise ValueError(f"REPAIR folds its correction into the batch norm `{name}`, which has no affine "
                             "parameters (affine=False)")  # fmt: skip
        if not isinstance(m, _BatchNorm) and m.bias is None:
            raise ValueError(f"REPAIR folds its shift into the bias of `{name}`, which has none (bias=False)")
        weight = params[f"{name}.weight"]
        mean = ((1 - t) * mean_a + t * mean_b).to(weight.device)
        std = ((1 - t) * statistics_a.std[name] + t * statistics_b.std[name]).to(weight.device)
        targets[name] = (mean, std)
        probe.target = (mean.to(weight.dtype), std.to(weight.dtype), eps)
    _run(gm, params, buffers, loader, max_batches, "loader")
    out = dict(params)
    for name, probe in probes.items():
        mean, std = targets[name]
        scale = std / torch.sqrt(probe.m2 / probe.n + eps)
        shift = mean - scale * probe.mean
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        view = [-1] + [1] * (weight.ndim - 1)
        out[f"{name}.weight"] = (weight.double() * scale.view(view)).to(weight.dtype)
        out[f"{name}.bias"] = (bias.double() * scale + shift).to(bias.dtype)
    device = next(iter(params.values())).device
    buffers = _weights.reestimate(model, out, loader, max_batches, device, "loader")
    logger.debug("REPAIR at t=%s corrected %d points", t, len(probes))
    return {**out, **buffers}
