"""Functional equivalence of permuted networks: the property every permutation spec must satisfy."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from neuralign._utils import as_generator
from neuralign.alignment.permutation import apply_permutation, random_permutation
from neuralign.alignment.spec import PermutationSpec
from neuralign.verification._verdict import Verdict

__all__ = ["EquivalenceResult", "check_equivalence"]

# Random operations and what they are replaced by during the check: their expectation, which is the same in both
# runs and follows a relabelling of the units (a random mask drawn per position cannot follow one).
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "rrelu"}  # fmt: skip
_RANDOM_LIKE = {"rand_like": 0.5, "randn_like": 0.0}
_ATTENTION_DROPOUT = {"scaled_dot_product_attention": 4, "multi_head_attention_forward": 10}  # position of dropout_p
_NUDGE = 1e-13  # relative perturbation of the weights that measures the model's own conditioning
_RANDOM_FILL = {"bernoulli_", "uniform_", "normal_", "exponential_", "geometric_", "log_normal_", "cauchy_",
                "random_"}  # fmt: skip
_RANDOM_OTHER = {"bernoulli", "rand", "randn", "randint", "randint_like", "randperm", "normal", "multinomial",
                 "poisson"}  # fmt: skip


class _Expectations(TorchFunctionMode):
    """Replaces every random operation by its expectation and records which ones the model used."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _DROPOUTS:
            self.seen.add(name)
            x = args[0] if args else kwargs["input"]
            if name == "rrelu":
                lower, upper = (list(args[1:3]) + [1.0 / 8, 1.0 / 3])[:2] if len(args) > 1 else (1.0 / 8, 1.0 / 3)
                lower, upper = kwargs.get("lower", lower), kwargs.get("upper", upper)
                return torch.where(x >= 0, x, x * (lower + upper) / 2)
            return x
        if name in _ATTENTION_DROPOUT:  # attention weights dropped with probability dropout_p; the composite
            # multi_head_attention_forward runs its inner calls without this mode, so its dropout is zeroed here
            at = _ATTENTION_DROPOUT[name]
            dropout_p = args[at] if len(args) > at else kwargs.get("dropout_p", 0.0)
            if dropout_p:
                self.seen.add("attention dropout")
                if len(args) > at:
                    args = (*args[:at], 0.0, *args[at + 1 :])
                else:
                    kwargs = {**kwargs, "dropout_p": 0.0}
            return func(*args, **kwargs)
        if name in _RANDOM_LIKE:
            self.seen.add(name)
            return torch.full_like(args[0], _RANDOM_LIKE[name])
        if name in _RANDOM_FILL:
            self.seen.add(name)
            t = args[0]
            rest = list(args[1:])
            if name == "bernoulli_":
                p = rest[0] if rest else kwargs.get("p", 0.5)
                return t.copy_(p.expand_as(t) if isinstance(p, torch.Tensor) else torch.full_like(t, p))
            if name == "uniform_":
                a, b = (rest + [0.0, 1.0][len(rest):])[:2]
                return t.fill_((kwargs.get("from", a) + kwargs.get("to", b)) / 2)
            if name == "normal_":
                return t.fill_(rest[0] if rest else kwargs.get("mean", 0.0))
            return func(*args, **kwargs)  # other fills: no simple expectation; identical seeds below
        if name == "bernoulli" and (args or "input" in kwargs):
            self.seen.add(name)
            p = args[0] if args else kwargs["input"]
            return p.clone() if len(args) < 2 and "p" not in kwargs else torch.full_like(p, kwargs.get("p", args[-1]))
        if name in _RANDOM_OTHER:
            self.seen.add(name)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class EquivalenceResult(Verdict):
    """Outcome of :func:`check_equivalence`.

    Attributes
    ----------
    verdict : str
        ``"pass"`` when every trial matched within ``tol`` in every mode, ``"fail"`` when one did not,
        ``"inconclusive"`` when rounding cannot be told from a wrong spec (see ``sensitivity``); ``passed`` is
        ``verdict == "pass"``.
    max_diff_eval, max_diff_train : float
        Largest output difference over the trials in eval mode (running statistics) and train mode (batch
        statistics), elementwise relative to each output entry (at least 1e-3 of its tensor's largest entry).
    unpermuted : list of str
        Parameters and buffers the spec never permutes (``num_batches_tracked`` excluded). For a network whose
        every hidden layer is permuted, these are only tensors on the input side or the output side.
    trials : int
    tol : float
    message : str
    dtype : torch.dtype
        The precision the check ran in.
    stochastic : list of str
        Random operations the model called (dropout, stochastic depth, ``rand_like``...); during the check they
        were replaced by their expectation (or, for draws without one, run from identical seeds).
    sensitivity : float
        That largest change (relative, as the differences).
    """

    verdict: str
    max_diff_eval: float
    max_diff_train: float
    unpermuted: list[str]
    trials: int
    tol: float
    message: str
    dtype: torch.dtype = torch.float64
    stochastic: list[str] = ()
    sensitivity: float = 0.0

    @property
    def conclusive(self) -> bool:
        """False when the model's own outputs move by more than ``tol`` under a perturbation of its weights by
        1e-13 (relative): then rounding cannot be told from a wrong spec (typically train-mode batch statistics
        over a batch of 2 at 1x1 resolution) and the verdict is ``"inconclusive"``."""
        return self.verdict != "inconclusive"


def _outputs(model: nn.Module, state: dict[str, torch.Tensor], x: tuple, mode: _Expectations) -> list[torch.Tensor]:
    with mode, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # draws without an expectation come out alike in both runs
        out = functional_call(model, state, x, tie_weights=False)
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def check_equivalence(
    model: nn.Module,
    spec: PermutationSpec,
    example_input: Any,
    *,
    trials: int = 3,
    generator: torch.Generator | int | None = None,
    tol: float | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> EquivalenceResult:
    """Check that random permutations of ``spec`` leave the function of ``model`` unchanged.

    For each trial a permutation :math:`P` is drawn uniformly, the state dict is permuted with
    :func:`~neuralign.alignment.apply_permutation`, and the outputs :math:`f(x; P\\theta)` and
    :math:`f(x; \\theta)` are compared in eval mode (batch norm with its running statistics, which must have been
    permuted consistently) and in train mode (batch statistics). The check runs on a copy of the model in float64
    by default, so that float error (~1e-13 relative) and a wrong spec (an O(1) change of the function) are
    decades apart; every random operation (dropout of any kind, also the attention dropout ``dropout_p`` of
    ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``, stochastic depth, ``rand_like``, ``bernoulli``)
    is replaced by its expectation in both runs, and the ones found are reported. Outputs may be tensors or any
    nesting of tuples, lists, dicts and named tuples of tensors.

    Parameters
    ----------
    model : nn.Module
        The network; it is copied, never modified.
    spec : PermutationSpec
        The spec to check, e.g. from :func:`~neuralign.alignment.trace_spec`.
    example_input : Tensor or tuple of Tensor
        A batch (of at least 2 examples when the model has batch norm).
    trials : int
        Number of random permutations.
    generator : torch.Generator or int, optional
        Source of the permutations.
    tol : float, optional
        Largest difference accepted as float error, relative to :math:`\\max|f(x)|` (the outputs' own
        magnitude, however small): default 1e-6 in float64, 1e-3 in float32 and 1e-1 in half precision. A
        correct spec differs by rounding only (~1e-14 in float64), but batch statistics of a channel that is
        nearly constant over a small batch amplify rounding by up to :math:`1/\\sqrt{\\epsilon}` per batch-norm
        layer in train mode (measured: 9e-7 for efficientnet_b0 on two 32x32 images); a wrong spec changes the
        outputs by a sizeable fraction of their magnitude (the fuzz family's smallest: see the tests).
    dtype : torch.dtype or None
        Precision of the check (floating parameters, buffers and inputs are cast on the copy); ``None`` keeps
        the model's own.

    Returns
    -------
    EquivalenceResult

    Raises
    ------
    ValueError
        If ``trials < 1`` or ``tol`` is not positive.
    SpecError, ShapeMismatchError
        If the spec does not fit the model's state dict.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from neuralign.alignment import trace_spec
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    >>> x = torch.randn(5, 4)
    >>> res = check_equivalence(net, trace_spec(net, x), x, generator=0)
    >>> res.passed, res.stochastic
    (True, ['dropout'])
    """
    if trials < 1:
        raise ValueError(f"`trials` must be at least 1, got {trials}")
    if tol is not None and not tol > 0:
        raise ValueError(f"`tol` must be positive, got {tol}")
    note = ""
    if dtype is not None:
        try:
            return _check(model, spec, example_input, trials, generator, tol, dtype, note)
        except RuntimeError as exc:  # e.g. a float32 constant made inside forward meets float64 weights
            note = f"; ran in the model's own precision: it does not run in {_name(dtype)} ({_first_line(exc)})"
    return _check(model, spec, example_input, trials, generator, tol, None, note)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _difference(base: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """Largest elementwise difference, relative to each entry's magnitude but at least 1e-3 of the largest entry
    of its output tensor (so that a large output, e.g. an offset, cannot hide a change of a small one)."""
    worst = 0.0
    for b, o in zip(base, out):
        if not b.numel():
            continue
        b, o = b.double(), o.double()
        floor = max(float(b.abs().max()) * 1e-3, torch.finfo(torch.float64).tiny)
        worst = max(worst, float(((b - o).abs() / b.abs().clamp_min(floor)).max()))
    return worst


def _check(model, spec, example_input, trials, generator, tol, dtype, note) -> EquivalenceResult:
    gen = as_generator(generator)
    work = copy.deepcopy(model)
    if dtype is not None:
        work = work.to(dtype)
    if tol is None:
        precision = dtype or next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32)
        tol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(precision, 1e-1)
    state = {k: v.detach() for k, v in work.state_dict().items()}
    spec.validate(state, name="model")
    device = next(iter(state.values())).device if state else torch.device("cpu")

    def prepare(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    x = tuple(prepare(t) for t in (example_input if isinstance(example_input, (tuple, list)) else (example_input,)))
    mode = _Expectations()
    diffs = {"eval": 0.0, "train": 0.0}
    sensitivity = {"eval": 0.0, "train": 0.0}
    nudge_gen = torch.Generator().manual_seed(0)
    nudged = {  # every floating entry moved by 1e-13 of itself, about a hundred float64 roundings
        k: v * (1 + _NUDGE * (2 * torch.randint(0, 2, v.shape, generator=nudge_gen).to(v) - 1))
        if v.is_floating_point() else v
        for k, v in state.items()
    }  # fmt: skip
    with torch.no_grad():
        for which in diffs:
            work.train(which == "train")
            base = _outputs(work, {k: v.clone() for k, v in state.items()}, x, mode)
            sensitivity[which] = _difference(base, _outputs(work, {k: v.clone() for k, v in nudged.items()}, x, mode))
            for _ in range(trials):
                perms = random_permutation(spec, generator=gen, device=device)
                out = _outputs(work, apply_permutation(state, spec, perms), x, mode)
                diffs[which] = max(diffs[which], _difference(base, out))
    # A permutation reorders sums, a rounding-sized change; if the model's own outputs move by more than tol when
    # its weights move by 1e-13 (relative), rounding cannot be told apart from a wrong spec: inconclusive.
    unclear = [w for w, v in sensitivity.items() if v > tol]
    verdict = "inconclusive" if unclear else ("pass" if diffs["eval"] <= tol and diffs["train"] <= tol else "fail")
    found = sorted(mode.seen)
    precision = _name(dtype) if dtype is not None else _name(next(iter(state.values())).dtype)
    message = (
        f"max relative difference {max(diffs.values()):.3g} over {trials} random permutations in {precision} "
        f"({'within' if max(diffs.values()) <= tol else 'ABOVE'} tol {tol:g})"
    )
    if unclear:
        message = (
            f"INCONCLUSIVE in {' and '.join(unclear)} mode: the model's own outputs change by "
            f"{max(sensitivity[w] for w in unclear):.3g} when its weights move by {_NUDGE:g} (relative), so rounding "
            "cannot be told from a wrong spec (batch statistics over too few values?); use a larger batch or "
            "larger inputs. " + message
        )
    if found:
        message += f"; random operations replaced by their expectation: {', '.join(found)}"
    return EquivalenceResult(
        verdict, diffs["eval"], diffs["train"], spec.unpermuted(state), trials, tol, message + note,
        dtype or next(iter(state.values())).dtype, found, max(sensitivity.values()),
    )  # fmt: skip
