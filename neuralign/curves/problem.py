"""The curve objective of PAM on curves as a :class:`~neuralign.optim.PermutationProblem`.

:class:`CurvePermutationProblem` is :math:`F(\\theta_{\\text{off}}, P)` of :mod:`neuralign.curves.pam` for the
general solver :class:`~neuralign.optim.PAM`: the loss on training batches at random :math:`t`, the deterministic
monitored value on held-out batches at fixed times, and :math:`\\nabla_P F` with every :math:`P` applied as a dense
(possibly relaxed) matrix. The verification checks (:mod:`neuralign.verification`) evaluate moves with it too.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from neuralign._chain import Chain, curve_rows, squares, to_channels_last
from neuralign._chain import trace as trace_graph
from neuralign._distributed import all_reduce_, check_same_batch, is_distributed, shard_batch, world_size
from neuralign._options import renamed_keywords
from neuralign._utils import as_generator, classification_loss, split_batch
from neuralign.alignment import (
    PermutationSpec,
    apply_permutation,
    apply_permutation_matrices,
    identity_permutation,
    validate_permutation,
)
from neuralign.alignment.heads import match_heads
from neuralign.curves._weights import parameters_of
from neuralign.curves.families import Bezier
from neuralign.errors import NonFiniteError
from neuralign.optim import PermutationProblem, perm_to_matrix

__all__ = ["CurvePermutationProblem"]


def _shard(x: torch.Tensor, y: torch.Tensor, label: str) -> tuple:
    """``(x, y)``, or under a process group this rank's ``(x_r, y_r, share)`` (see :meth:`batch_loss`)."""
    if not is_distributed():
        return x, y
    return shard_batch(x, y, label=label)


def _fixed_batches(loader: Iterable, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out: list = []
    for batch in loader:
        x, y = split_batch(batch, device, "heldout_loader")
        if y is None:
            raise TypeError("`heldout_loader` must yield (inputs, targets) pairs")
        if not out:
            check_same_batch(x, y, label="heldout_loader")
        out.append(_shard(x, y, "heldout_loader"))
        if len(out) >= n:  # read no further than needed
            break
    if not out:
        raise ValueError("`heldout_loader` yielded no batches")
    return out


class CurvePermutationProblem(PermutationProblem):
    """The curve objective :math:`F(\\theta_{\\text{off}}, P)` as a :class:`~neuralign.optim.PermutationProblem`.

    Parameters
    ----------
    model : nn.Module
        The architecture (copied; run in train mode, batch norm on batch statistics, with private buffers; its
        dropout layers, the modules of :mod:`torch.nn`'s dropout kinds, are switched off, so that the objective
        is deterministic: the same ``x`` and ``P`` give the same values. A dropout called as a function,
        ``F.dropout(..., training=self.training)``, stays on).
    point_a, point_b : dict str -> Tensor
        End points (parameter dicts or full state dicts; only parameters are used).
    spec : PermutationSpec
        The groups acting on ``point_b``.
    train_loader : iterable
        ``(inputs, targets)`` batches for :meth:`loss` and :meth:`gradient_p`.
    weight_decay : float
        :math:`\\lambda_{wd}` of the penalty on :math:`\\phi(t)`.
    loss_fn : callable, optional
        Default cross-entropy (with GoogLeNet's auxiliary heads).
    heldout_loader : iterable, optional
        Fixed-order batches (default ``train_loader``): the first ``value_batches`` of them, each evaluated at every
        time in ``value_ts``, define the deterministic monitored value (the official code scores permutations on a
        full training pass with :math:`t` swept across batches; a fixed time grid per batch makes per-batch
        differences between two permutations comparable).
    value_batches : int
    value_ts : sequence of float
        Times at which every value batch is evaluated (the end points, where :math:`P` has no effect on the
        cross-entropy, are left out by default).
    gradient_batches : int
        Mini-batches (each with its own :math:`t \\sim U[0,1]`) averaged in :meth:`gradient_p`.
    generator : torch.Generator or int, optional
        Source of the :math:`t` draws; share it with :class:`~neuralign.optim.PAM` for exact resumes.

    Notes
    -----
    :math:`x` is a list holding one flat tensor :math:`\\theta_{\\text{off}}` over all parameters. With attention
    heads in ``spec`` the feasible permutations are the structured ones (:meth:`assign`), so every P-step of
    :class:`~neuralign.optim.PAM` keeps heads whole.
    """

    def __init__(
        self,
        model: nn.Module,
        point_a: Mapping[str, torch.Tensor],
        point_b: Mapping[str, torch.Tensor],
        spec: PermutationSpec,
        train_loader: Iterable,
        *,
        weight_decay: float = 5e-4,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        heldout_loader: Iterable | None = None,
        value_batches: int = 8,
        value_ts: Sequence[float] = (0.25, 0.5, 0.75),
        gradient_batches: int = 8,
        generator: torch.Generator | int | None = None,
        **renamed: Any,
    ) -> None:
        heldout_loader = renamed_keywords(renamed, {"value_loader": "heldout_loader"},
                                          where="CurvePermutationProblem").get("heldout_loader", heldout_loader)
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
        for name, value in (("value_batches", value_batches), ("gradient_batches", gradient_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        self.model = copy.deepcopy(model).train()
        for module in self.model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
        self.wa = {k: v.detach() for k, v in parameters_of(model, point_a, "point_a").items()}
        self.wb = {k: v.detach() for k, v in parameters_of(model, point_b, "point_b").items()}
        self.names = list(self.wa)
        self.shapes = [self.wa[k].shape for k in self.names]
        self.numels = [self.wa[k].numel() for k in self.names]
        first = self.wa[self.names[0]]
        self.device, self.dtype = first.device, first.dtype
        self.spec = spec.restrict(self.wb)
        self.spec.validate(self.wb, name="point_b")
        self.sizes = dict(spec.sizes)
        self.ties = {}
        self.weight_decay = float(weight_decay)
        self.loss_fn = loss_fn or classification_loss
        self.train_loader = train_loader
        self.gradient_batches = gradient_batches
        self.generator = as_generator(generator)
        self.buffers = {k: b.detach().to(self.device, copy=True) for k, b in self.model.named_buffers()}
        self.value_set = _fixed_batches(heldout_loader if heldout_loader is not None else train_loader,
                                        value_batches, self.device)  # fmt: skip
        self.value_ts = tuple(float(t) for t in value_ts)
        if not self.value_ts or any(not 0.0 <= t <= 1.0 for t in self.value_ts):
            raise ValueError(f"`value_ts` must be a non-empty sequence of times in [0, 1], got {value_ts!r}")
        self._chains: dict[str, Chain | None] = {}  # per group, found once (:meth:`chain`)
        self._graph: Any = False  # the fx graph of the model without running statistics (None: fx cannot trace it)

    def to(self, dtype: torch.dtype) -> CurvePermutationProblem:
        """A copy computing in ``dtype`` (e.g. float64 for a Taylor test); the data batches are converted too."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model).to(dtype)
        other.wa = {k: v.to(dtype) for k, v in self.wa.items()}
        other.wb = {k: v.to(dtype) for k, v in self.wb.items()}
        other.buffers = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.buffers.items()}
        other.value_set = [(x.to(dtype) if x.is_floating_point() else x, *rest) for x, *rest in self.value_set]
        other.dtype = dtype
        other._chains, other._graph = {}, False
        other.__dict__.pop("untracked_model", None)
        return other

    # ------------------------------------------------------------------ the curve
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat parameter vector into named views."""
        return {k: t.view(s) for k, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named parameters into one flat vector (the inverse of :meth:`unflatten`)."""
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def permuted_b(self, P: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`P w_B` with dense (possibly relaxed) matrices, differentiable in ``P``."""
        return apply_permutation_matrices(self.wb, self.spec, P)

    def weights(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
        """:math:`\\phi(t) = (1-t) w_A + t P w_B + 2t(1-t)\\theta_{\\text{off}}`."""
        pb = self.permuted_b(P)
        off = self.unflatten(x[0])
        c = 2.0 * t * (1.0 - t)
        return {k: (1.0 - t) * self.wa[k] + t * pb[k] + c * off[k] for k in self.names}

    def control_point(self, x: Sequence[torch.Tensor], perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Bezier control point :math:`\\theta = \\tfrac12 w_A + \\tfrac12 P w_B + \\theta_{\\text{off}}`."""
        pb = apply_permutation(self.wb, self.spec, perms)
        off = self.unflatten(x[0].detach())
        return {k: 0.5 * (self.wa[k] + pb[k]) + off[k] for k in self.names}

    def offset(self, theta: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:math:`\\theta_{\\text{off}} = \\theta - \\tfrac12 w_A - \\tfrac12 P w_B` as a flat vector."""
        pb = apply_permutation(self.wb, self.spec, perms)
        return self.flatten({k: theta[k].detach() - 0.5 * (self.wa[k] + pb[k]) for k in self.names})

    def start_offset(self, curve: Bezier) -> torch.Tensor:
        """:math:`\\theta_{\\text{off}}` (flat) of a quadratic Bezier curve whose end points are the problem's.

        Raises
        ------
        ValueError
            If ``curve`` is not a quadratic Bezier curve or was fitted for other end points (names the parameter).
        """
        if not isinstance(curve, Bezier) or curve.num_points != 3:
            raise ValueError("`curve` must be a quadratic Bezier curve (3 points)")
        a, theta, b = curve.points
        for name, given, expected in (("point_a", a, self.wa), ("the permuted point_b", b, self.wb)):
            for k in self.names:
                if k not in given or not torch.allclose(given[k].to(expected[k]), expected[k], rtol=1e-6, atol=1e-7,
                                                        equal_nan=True):
                    raise ValueError(f"`curve` was fitted for other end points: its end differs from {name} at `{k}`")
        return self.offset({k: theta[k].to(self.wa[k]) for k in self.names}, identity_permutation(self.spec))

    # ------------------------------------------------------------------ objective
    def batch_loss(
        self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor],
        t: float,
    ) -> torch.Tensor:  # fmt: skip
        """:math:`\\ell(\\phi(t)) + \\tfrac{\\lambda_{wd}}{2}\\|\\phi(t)\\|^2` on one batch (differentiable).

        Under a process group ``batch`` is ``(x_r, y_r, share)``, this rank's slice: the result is this rank's term
        ``share * loss_r + penalty / W`` of a sum over the ranks that equals the global batch's value.
        """
        w = self.weights(x, P, t)
        out = functional_call(self.model, (w, self.buffers), (batch[0],))
        loss = self.loss_fn(out, batch[1])
        share, penalty_share = (batch[2], 1.0 / world_size()) if len(batch) > 2 else (1.0, 1.0)
        if share != 1.0:
            loss = loss * share
        if self.weight_decay:
            loss = loss + (0.5 * self.weight_decay * penalty_share) * sum(v.square().sum() for v in w.values())
        return loss

    def objective(
        self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batches: Sequence, ts: Sequence[float]
    ) -> torch.Tensor:
        """The mean of :meth:`batch_loss` over given batches and times (deterministic, differentiable)."""
        return sum(self.batch_loss(x, P, b, t) for b, t in zip(batches, ts)) / len(batches)

    def batch_value(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batch) -> torch.Tensor:
        """The objective on one batch averaged over ``value_ts``."""
        return sum(self.batch_loss(x, P, batch, t) for t in self.value_ts) / len(self.value_ts)

    def batch_values(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per value batch, the objective averaged over ``value_ts`` (float64, no gradient)."""
        with torch.no_grad():
            values = torch.tensor([float(self.batch_value(x, P, b)) for b in self.value_set], dtype=torch.float64)
        values = all_reduce_(values)  # the ranks' terms of each value batch, summed (float64)
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(f"the curve objective is {values[bad[0]].item()} on value batch {bad[0]}")
        return values

    @functools.cached_property
    def untracked_model(self) -> nn.Module:
        """A copy of the model whose batch norms keep no running statistics (the objective normalises on batch
        statistics: the same outputs), for evaluations with other parameters (:meth:`chain`, the verification's
        screen)."""
        model = copy.deepcopy(self.model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
                module.running_mean = module.running_var = module.num_batches_tracked = None
        return model

    def chain(self, group: str) -> Chain | None:
        """The layers that produce and consume ``group`` where they form a chain in the model's fx graph
        (:class:`neuralign._chain.Chain`: a move of the group is then evaluated on its moved units and the layers
        after its consumer only), found once; ``None`` for a group with attention heads, or where the model has
        no chain for it or :func:`torch.fx.symbolic_trace` cannot trace it. The chain's layers are a copy of the
        model's whose batch norms keep no running statistics (the objective normalises on batch statistics)."""
        if group in self.spec.heads or group not in self.sizes:
            return None
        if group not in self._chains:
            if self._graph is False:
                self._graph = trace_graph(self.untracked_model)
            found = self._graph is not None
            self._chains[group] = (Chain.find(self.untracked_model, self.spec, group, self.names, self._graph)
                                   if found else None)  # fmt: skip
        return self._chains[group]

    def move_values(self, x: Sequence[torch.Tensor], perms: Mapping[str, torch.Tensor],
                    moves: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:  # fmt: skip
        """:meth:`batch_values` at ``perms`` with each of ``moves`` applied: per move, the objective on every value
        batch averaged over ``value_ts`` (``(value_batches,)`` float64, no gradient).

        ``perms`` maps every group to its index permutation (int64, relative to ``point_b``); a move maps some
        groups to new ones. A move of one group that has a :meth:`chain` is evaluated through it: per value batch
        and time, the forward pass up to the chain once for all of that group's moves given, then per move its
        producer and consumer on the moved units only and the layers after the consumer (the same values as
        :meth:`batch_values` up to float rounding: the same sums in another order); any other move on the whole
        network. Under a process group the values are summed over the ranks as :meth:`batch_values` does (one
        all-reduce per group of moves).

        Raises
        ------
        TypeError, ValueError
            If ``perms`` is not a permutation of every group, or a move is not a dict of the spec's groups to
            permutations (names the move and the group).
        NonFiniteError
            If a move's objective is NaN or infinite on a value batch (names the batch).
        """
        validate_permutation(self.spec, perms, name="perms")
        if isinstance(moves, Mapping) or not isinstance(moves, Sequence):
            raise TypeError(f"`moves` must be a sequence of dicts group -> index tensor, got {type(moves).__name__}")
        for i, move in enumerate(moves):
            if not isinstance(move, Mapping):
                raise TypeError(f"`moves[{i}]` must be a dict group -> index tensor, got {type(move).__name__}")
            validate_permutation(self.spec, {**perms, **move}, name=f"moves[{i}]")
        out: list[torch.Tensor | None] = [None] * len(moves)
        through: dict[str, list[int]] = {}
        for i, move in enumerate(moves):
            changed = [g for g, p in move.items() if not torch.equal(p.cpu(), perms[g].cpu())]
            if len(changed) == 1 and self.chain(changed[0]) is not None:
                through.setdefault(changed[0], []).append(i)
            else:
                out[i] = self.batch_values(x, {g: perm_to_matrix(p, dtype=self.dtype, device=self.device)
                                               for g, p in {**perms, **move}.items()})  # fmt: skip
        if through:
            with torch.no_grad():
                pb = apply_permutation(self.wb, self.spec, perms)
                offset = self.unflatten(x[0])
                # the curve's points at perms, as :meth:`weights`, in the faster memory format (to_channels_last)
                points = [to_channels_last({k: (1.0 - t) * self.wa[k] + t * pb[k] + 2.0 * t * (1.0 - t) * offset[k]
                                         for k in self.names}) for t in self.value_ts]  # fmt: skip
                for g, indices in through.items():
                    values = self._through_chain(self.chain(g), points, pb, offset, perms[g],
                                                 [moves[i][g] for i in indices])  # fmt: skip
                    for i, v in zip(indices, values):
                        out[i] = v
        return out  # type: ignore[return-value]

    def _through_chain(self, chain: Chain, points: Sequence[Mapping[str, torch.Tensor]],
                       pb: Mapping[str, torch.Tensor], offset: Mapping[str, torch.Tensor], current: torch.Tensor,
                       moved_to: Sequence[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """``(len(moved_to), value_batches)`` float64: the objective with the chain's group permuted by each of
        ``moved_to`` instead of ``current`` (``pb``: B permuted by the current permutations; ``points``: the
        curve's points at ``value_ts`` with them)."""
        ts = self.value_ts
        current = current.to(self.device)
        moved = [(p.to(self.device) != current).nonzero().flatten() for p in moved_to]
        # B's units the moved positions take, as positions of pb (whose other axes are permuted as they stay)
        inverse = torch.argsort(current)
        sources = [inverse.index_select(0, p.to(self.device).index_select(0, m)) for p, m in zip(moved_to, moved)]
        decayed = self.weight_decay > 0
        identity_squares = [squares(w.values()) for w in points] if decayed else []
        rows = [[curve_rows(self.wa, pb, offset, t, m, s) for t in ts] for m, s in zip(moved, sources)]
        # per move and time: the weight-decay term, the identity's sum of squares with the moved entries' changed
        decay = [[0.5 * self.weight_decay * (base + chain.squares_change(r, w, m)) for r, w, base in
                  zip(rs, points, identity_squares)] for rs, m in zip(rows, moved)] if decayed else []  # fmt: skip
        out = torch.zeros(len(moved_to), len(self.value_set), dtype=torch.float64)
        for b, batch in enumerate(self.value_set):
            share, penalty_share = (batch[2], 1.0 / world_size()) if len(batch) > 2 else (1.0, 1.0)
            for ti, w in enumerate(points):
                values = chain.identity_values(w, batch[0])
                tail = {k: w[k] for k in chain.tail_names}
                for i, m in enumerate(moved):
                    output = chain.output(values, chain.parts(values, rows[i][ti], w, m), tail)
                    out[i, b] += float(self.loss_fn(output, batch[1])) * share
                    if decayed:
                        out[i, b] += decay[i][ti] * penalty_share
        out = all_reduce_(out / len(ts))
        bad = (~torch.isfinite(out)).nonzero().tolist()
        if bad:
            raise NonFiniteError(f"the curve objective is {out[bad[0][0], bad[0][1]].item()} on value batch "
                                 f"{bad[0][1]}")  # fmt: skip
        return out

    def value_pairs(self, n_batches: int | None = None) -> tuple[list, list[float]]:
        """``(batches, ts)`` listing every (value batch, value time) pair, for :meth:`objective`."""
        batches = self.value_set[:n_batches] if n_batches else self.value_set
        return [b for b in batches for _ in self.value_ts], [t for _ in batches for t in self.value_ts]

    def _train_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for batch in self.train_loader:
            if len(out) >= n:
                break
            x, y = split_batch(batch, self.device, "train_loader")
            if y is None:
                raise TypeError("`train_loader` must yield (inputs, targets) pairs")
            out.append(_shard(x, y, "train_loader"))
        if not out:
            raise ValueError("`train_loader` yielded no batches")
        return out

    def _draw_t(self, n: int) -> list[float]:
        return torch.rand(n, generator=self.generator, dtype=torch.float64).tolist()

    def loss(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A stochastic estimate of :math:`F` on one training batch at one random :math:`t`.

        Raises
        ------
        RuntimeError
            Under a process group: this estimate is not data-parallel (:func:`fit_curve_pam`'s x-step is
            :func:`fit_curve`, which is).
        """
        if is_distributed():
            raise RuntimeError(
                "CurvePermutationProblem.loss is not data-parallel; under a process group use fit_curve_pam, whose "
                "x-step (fit_curve) is"
            )
        (batch,) = self._train_batches(1)
        return self.batch_loss(x, P, batch, self._draw_t(1)[0])

    def value(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> float:
        """Deterministic :math:`F`: the mean of :meth:`batch_values` (raises :class:`NonFiniteError` on NaN/inf)."""
        with torch.no_grad():
            return float(self.batch_values(x, P).mean())

    def gradient_at(
        self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor], batches: Sequence, ts: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        """:math:`\\nabla_P` of :meth:`objective` on given batches and times.

        Under a process group, batches ``(x_r, y_r, share)`` (this class's own) give the gradient of the global
        objective (summed over the ranks); plain ``(x, y)`` batches give this rank's own, without communication.
        """
        leaves = {g: m.detach().clone().requires_grad_(True) for g, m in P.items()}
        with torch.enable_grad():
            f = self.objective([t.detach() for t in x], leaves, batches, ts)
            grads = torch.autograd.grad(f, list(leaves.values()), allow_unused=True)
        out = {g: torch.zeros_like(leaves[g]) if gr is None else gr for g, gr in zip(leaves, grads)}
        if is_distributed() and any(len(b) > 2 for b in batches):
            # batches that carry this rank's share (its slices of global batches): each rank's gradient is of its
            # terms of the objective, and their sum is the global one; plain (x, y) batches stay this rank's own
            sizes = [v.numel() for v in out.values()]
            flat = all_reduce_(torch.cat([v.reshape(-1) for v in out.values()]))
            out = {g: part.view_as(out[g]) for g, part in zip(out, flat.split(sizes))}
        return out

    def assign(self, costs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The permutations minimising :math:`\\sum_g \\langle C_g, P_g\\rangle` that keep attention heads whole:
        one linear assignment per group, then for the groups with heads (``spec.heads``) and their head groups the
        structured assignment of :func:`~neuralign.alignment.heads.match_heads` on :math:`-C_g`: exact for this
        objective (a sum over groups) where no head group reorders its query heads (``Heads.within``, grouped-query
        attention); with such groups each pair of blocks is matched by a block-coordinate ascent (see
        ``match_heads``), which may stop below the minimum. ``costs`` has every group; the result's index tensors
        are on the costs' device."""
        perms = super().assign(costs)
        if not self.spec.heads:
            return perms
        return match_heads(self.spec, {g: -c for g, c in costs.items()}, perms)

    def gradient_p(self, x: Sequence[torch.Tensor], P: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:math:`\\nabla_P F` averaged over ``gradient_batches`` training batches, each at its own random t."""
        batches = self._train_batches(self.gradient_batches)
        return self.gradient_at(x, P, batches, self._draw_t(len(batches)))
