"""Is a permutation (e.g. the correlation alignment) a local optimum of the joint curve objective?

Tatro et al. (2020) support the claim that the correlation alignment is (nearly) locally optimal for
:math:`\\min_{\\theta, P} F(\\theta, P)` by running PAM from it and seeing it stay. :func:`verify_alignment` turns that
into five checks, each with numbers, the thresholds used, and a verdict that can come out either way.

Why one module: the five checks share one context (the fitted curve, the held-out batches, the Bonferroni control)
and one report format; split apart, each would rebuild that context and the verdicts could drift apart.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from neuralign import _json
from neuralign._chain import Chain, curve_rows, squares, to_channels_last
from neuralign._distributed import all_reduce_sum, rank, shard_batch, world_size
from neuralign._options import Options, renamed_keywords, resolve_options
from neuralign._stats import bonferroni_quantile, wilson_interval
from neuralign._utils import as_generator, atomic_write_text, flat_logits, split_batch, split_logits, stable_seed
from neuralign._validate import check_bool, check_int, check_real
from neuralign.alignment import (
    PermutationSpec,
    align,
    apply_permutation,
    identity_permutation,
    permutation_distance,
    random_permutation,
    trace_spec,
    validate_permutation,
)
from neuralign.alignment.heads import match_heads
from neuralign.curves.families import Bezier
from neuralign.curves.fit import fit_curve
from neuralign.curves.pam import CurvePAMOptions, fit_curve_pam
from neuralign.curves.problem import CurvePermutationProblem
from neuralign.errors import ConvergenceWarning, NonFiniteError
from neuralign.optim import LinearizedStep, perm_to_matrix, solve_assignment, solve_assignment_lp
from neuralign.verification._moves import Coordinate, Move, MoveSet, coordinates, move_changes
from neuralign.verification._moves import transposition as _swap  # noqa: F401  (tests and benchmarks build moves)
from neuralign.verification._verdict import VERDICTS, Verdict
from neuralign.verification.gradient import taylor_test

__all__ = [
    "CHECKS",
    "MIN_HELDOUT_EXAMPLES",
    "CheckResult",
    "VerificationOptions",
    "VerificationReport",
    "swap_estimates",
    "verify_alignment",
    "wilson_interval",
]

logger = logging.getLogger(__name__)

CHECKS = ("stability", "certificate", "neighbourhood", "gradient", "alignment")

#: The fewest held-out examples the paired tests accept. A test has (examples - 1) degrees of freedom and a
#: Bonferroni critical value over hundreds of moves: for 500 moves at family-wise level 0.05 Student's quantile is
#: 4.02 at 49 degrees of freedom, within 8% of its normal limit 3.72, but 6.01 at 9 and 3183 at 1, where the
#: count of examples, not the data, would decide every verdict.
MIN_HELDOUT_EXAMPLES = 50


@dataclass(frozen=True)
class CheckResult(Verdict):
    """One check: its verdict (``pass``, ``fail`` or ``inconclusive``), a one-line summary, the thresholds used,
    and JSON-able details (per-group numbers)."""

    name: str
    verdict: str
    summary: str
    thresholds: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:  # a report read from JSON must not carry a verdict nobody checks for
            raise ValueError(f"check {self.name!r}: unknown verdict {self.verdict!r}; expected one of {list(VERDICTS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "summary": self.summary,
            "thresholds": self.thresholds,
            "details": self.details,
        }


def _overall(verdicts: Iterable[str]) -> str:
    verdicts = list(verdicts)
    if "fail" in verdicts:
        return "fail"
    if "inconclusive" in verdicts or not verdicts:
        return "inconclusive"
    return "pass"


@dataclass(frozen=True)
class VerificationReport(Verdict):
    """The outcome of :func:`verify_alignment`: per-check results and an overall verdict.

    The overall verdict is ``fail`` if any check fails, ``inconclusive`` if none fails and one is inconclusive,
    and ``pass`` otherwise: an inconclusive check counts neither as a pass nor as a fail, and it keeps the overall
    verdict from being ``pass``. :attr:`counts` gives the number of checks with each verdict.
    :meth:`to_json` / :meth:`from_json` round-trip it; :meth:`to_markdown` renders a
    short summary; :meth:`save` writes both atomically.
    """

    checks: dict[str, CheckResult]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return _overall(c.verdict for c in self.checks.values())

    @property
    def counts(self) -> dict[str, int]:
        """Number of checks per verdict, ``{"pass": ., "fail": ., "inconclusive": .}``."""
        return {v: sum(c.verdict == v for c in self.checks.values()) for v in VERDICTS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "verification_report",
            "verdict": self.verdict,
            "counts": self.counts,
            "config": self.config,
            "checks": {k: c.to_dict() for k, c in self.checks.items()},
        }

    def to_json(self) -> str:
        return _json.dumps(self.to_dict(), where="report")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VerificationReport:
        if not isinstance(data, Mapping) or data.get("kind") != "verification_report":
            raise ValueError("not a verification report (its 'kind' is not 'verification_report')")
        checks = {}
        for k, c in data["checks"].items():
            if c.get("verdict") not in VERDICTS:
                raise ValueError(f"check `{k}` has verdict {c.get('verdict')!r}; expected one of {list(VERDICTS)}")
            checks[k] = CheckResult(
                c["name"], c["verdict"], c["summary"], c.get("thresholds", {}), c.get("details", {})
            )
        return cls(checks, dict(data.get("config", {})))

    @classmethod
    def from_json(cls, text: str) -> VerificationReport:
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        lines = [
            "# Verification of an alignment",
            "",
            f"Overall verdict: **{self.verdict}** ({self.counts['pass']} pass, {self.counts['fail']} fail, "
            f"{self.counts['inconclusive']} inconclusive; fail if any check fails, else inconclusive if any check "
            "is, else pass)",
            "",
        ]
        # seconds each check took, and (in brackets) what its first step announced; absent from older reports
        taken, announced = self.config.get("seconds", {}), self.config.get("expected_seconds", {})
        columns = ["check", "verdict", "summary", "thresholds"] + (["seconds (announced)"] if taken else [])
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for c in self.checks.values():
            thr = ", ".join(f"{k}={_fmt(v)}" for k, v in c.thresholds.items())
            time_cell = ""
            if taken:
                time_cell = f" {taken[c.name]:.1f}" if c.name in taken else " "
                time_cell += f" ({announced[c.name]:.1f})" if c.name in announced else ""
                time_cell += " |"
            lines.append(f"| {c.name} | **{c.verdict}** | {c.summary} | {thr} |{time_cell}")
        lines.append("")
        for c in self.checks.values():
            table = c.details.get("per_group")
            if not table:
                continue
            cols = list(dict.fromkeys(k for row in table.values() for k in row))  # rows may lack some columns
            lines += [f"## {c.name}", "", "| group | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
            for g, row in table.items():
                lines.append(f"| {g} | " + " | ".join(_fmt(row[k]) if k in row else "" for k in cols) + " |")
            lines.append("")
        return "\n".join(lines)

    def save(self, folder: str | os.PathLike, *, stem: str = "verification") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` atomically into ``folder``; returns both paths."""
        folder = Path(folder)
        return (
            atomic_write_text(folder / f"{stem}.json", self.to_json()),
            atomic_write_text(folder / f"{stem}.md", self.to_markdown()),
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return "[" + ", ".join(_fmt(x) for x in v[:6]) + ", ...]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _span(values: Iterable[float]) -> str:
    """``"a"`` or ``"a to b"``: the range of some changes, for a summary."""
    values = sorted(values)
    return f"{values[0]:.3g}" if values[0] == values[-1] else f"{values[0]:.3g} to {values[-1]:.3g}"


# ---------------------------------------------------------------------------------------------------------------
def _heldout_batches(loader: Iterable, batches: int, examples: int) -> tuple[list[Any], list[Any]]:
    """One pass of ``loader``: its first ``batches`` items (the held-out batches the tests score), and the items
    after them up to ``examples`` examples (the neighbourhood check's screening set; fewer where the pass ends
    first). A fixed-order loader over distinct examples (``heldout_loader``'s contract) gives a screening set
    disjoint from the scored examples."""
    scored: list[Any] = []
    after: list[Any] = []
    count = 0
    for item in loader:
        if len(scored) < batches:
            scored.append(item)
        else:
            after.append(item)
            count += int(split_batch(item, torch.device("cpu"), "heldout_loader")[0].shape[0])
        if len(scored) == batches and count >= examples:
            break
    return scored, after


def _examples(items: Iterable, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of the loader items ``items`` (whole batches, concatenated and cut), on ``device``.

    Raises
    ------
    ValueError
        If ``items`` yields no batch.
    """
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    count = 0
    for item in items:
        if count >= n:
            break
        x, y = split_batch(item, device, "the screening loader")
        if y is None:
            raise TypeError("the screening batches must be (inputs, targets) pairs")
        xs.append(x)
        ys.append(y)
        count += int(x.shape[0])
    if not xs:
        raise ValueError("the screening loader yielded no batches")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


class _Context:
    """Everything the checks share: the problem in the frame of the aligned B (where ``perms`` is the identity).

    Moves are scored by paired differences per held-out example (:meth:`delta`): see :func:`verify_alignment`'s
    Notes for why those differences are independent.
    """

    def __init__(self, problem: CurvePermutationProblem, x_star: list[torch.Tensor], spec: PermutationSpec,
                 after: Sequence[Any] = ()):
        self.problem = problem
        self.after = after  # the held-out loader's items after the scored batches (:func:`_heldout_batches`)
        self.screen_source = ""  # where the neighbourhood check's screening examples came from
        # per group without heads: the transpositions the neighbourhood check scored, best-ranked first (all of a
        # group small enough to score every one); the stability check's PAM tries them first
        self.ranked: dict[str, list[tuple[int, ...]]] = {}
        self.neighbourhood_z = 0.0  # the neighbourhood check's critical value, where it ran
        self._base: torch.Tensor | None = None
        self._scorer: _Screen | None = None  # the held-out batches, scoring a move of one group through its chain
        self._looks: tuple[int, ...] | None = None
        self._examples: int | None = None
        self._kept: dict[tuple, torch.Tensor] = {}  # (held-out batch, move): its data term, scored by move_costs
        self.x = x_star
        self.spec = spec
        self.coordinates = coordinates(spec)  # a group, or the groups sharing one head permutation
        self.identity = {
            g: perm_to_matrix(torch.arange(n), dtype=problem.dtype, device=problem.device)
            for g, n in spec.sizes.items()
        }

    def mats(self, changes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(self.identity)
        for g, p in changes.items():
            out[g] = perm_to_matrix(p, dtype=self.problem.dtype, device=self.problem.device)
        return out

    def losses(self, changes: Mapping[str, torch.Tensor], ts: Sequence[float] | None = None,
               batches: slice = slice(None)) -> tuple[torch.Tensor, float]:  # fmt: skip
        """The held-out objective with ``changes`` applied to the identity, averaged over ``value_ts`` (or ``ts``),
        in its two parts: per held-out example of ``batches`` (this rank's share under a process group; default:
        every held-out batch) the data term, ``(examples,)`` float64, and the weight-decay term (a float), which
        is the same for every example.

        The data term of example :math:`i` at time :math:`t` is its cross-entropy (plus 0.3 times that of each
        auxiliary head, as :func:`~neuralign.curves.fit_curve` trains), the regulariser
        :math:`\\tfrac{\\lambda_{wd}}{2}\\|\\phi(t)\\|^2`; the model runs as the objective defines it (train
        mode: batch norm on the statistics of each held-out batch).

        Raises
        ------
        NonFiniteError
            If an example's objective is NaN or infinite (names the held-out batch).
        """
        prob = self.problem
        chain = self._chain(changes) if ts is None else None
        key = _move_key(changes) if ts is None else None  # kept values are at value_ts
        g = next(iter(changes), "")
        ts = prob.value_ts if ts is None else ts
        out = []
        penalty = 0.0
        with torch.no_grad():
            if chain is not None:
                points = []
                penalty = self._scorer.penalty(chain, g, changes[g]) if prob.weight_decay else 0.0
            else:
                mats = self.mats(changes)
                points = [prob.weights(self.x, mats, t) for t in ts]  # the curve's point at each time, once per call
                if prob.weight_decay:
                    penalty = sum(float(0.5 * prob.weight_decay * squares(w.values())) for w in points)
            for index in range(len(prob.value_set))[batches]:
                batch = prob.value_set[index]
                if (index, key) in self._kept:  # scored by move_costs
                    values = self._kept.pop((index, key))
                elif chain is not None:
                    values = self._scorer._through_chain(chain, g, [dict(changes)], index, batched=False)[0]
                else:
                    total = torch.zeros(batch[0].shape[0], dtype=torch.float64, device=batch[0].device)
                    for w in points:
                        total += _example_loss(functional_call(prob.model, (w, prob.buffers), (batch[0],)), batch[1])
                    values = total / len(ts)
                bad = ~torch.isfinite(values)
                if bad.any() or not math.isfinite(penalty):
                    first_bad = values[bad][0].item() if bad.any() else penalty
                    raise NonFiniteError(f"the curve objective is {first_bad} on value batch {index}")
                out.append(values)
        return torch.cat(out), penalty / len(ts)

    def _chain(self, changes: Mapping[str, torch.Tensor]) -> Chain | None:
        """The chain through which :meth:`losses` scores a move of one group (``None``: the whole network)."""
        if len(changes) != 1:
            return None
        if self._scorer is None:
            self._scorer = _Screen(self, list(self.problem.value_set), self.problem.value_ts)
        return self._scorer._chain(next(iter(changes)), [dict(changes)])

    def move_costs(self, changes: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Milliseconds of scoring a move like ``changes`` on every held-out batch, measured on the first: the
        first move of its group (a move of one group with a chain computes the identity's values up to the chain
        then, :meth:`losses`) and each later one. The group's chain is found before the measurement; the move's
        data term on that batch is kept for :meth:`losses`, so that scoring the move later computes it once."""
        count = len(self.problem.value_set)
        if not count:
            return 0.0, 0.0
        chain = self._chain(changes)  # found before the measurement
        started = time.perf_counter()
        if chain is not None:  # the identity's values up to the chain on the batch: the group's first move's part
            for ti in range(len(self.problem.value_ts)):
                self._scorer._identity_values(chain, next(iter(changes)), 0, ti)
        middle = time.perf_counter()
        self._kept[(0, _move_key(changes))] = self.losses(changes, batches=slice(0, 1))[0]
        later = time.perf_counter() - middle
        return 1000.0 * count * (middle - started + later), 1000.0 * count * later

    def data_term(self, t: float) -> float:
        """The held-out data term of the curve at time ``t`` (the mean over all ranks' examples)."""
        data = self.losses({}, ts=(t,))[0]
        sums = all_reduce_sum(torch.stack([data.sum(), torch.tensor(float(data.numel()), dtype=torch.float64)]))
        return float(sums[0] / sums[1])

    def base_losses(self) -> tuple[torch.Tensor, float]:
        if self._base is None:
            self._base = self.losses({})
        return self._base

    @property
    def examples(self) -> int:
        """Held-out examples scoring every move (over all ranks): the paired tests have one fewer degrees of
        freedom. Counted once (an all-reduce under a process group); the held-out set does not change."""
        if self._examples is None:
            self._examples = int(all_reduce_sum(torch.tensor(float(self.base_losses()[0].numel()))))
        return self._examples

    def margin(self, fraction: float) -> float:
        """``fraction`` of the objective (data term and regulariser) at the candidate: the least improvement of
        the data term a move must show to count."""
        data, penalty = self.base_losses()
        base = all_reduce_sum(torch.stack([data.sum(), torch.tensor(float(data.numel()), dtype=torch.float64)]))
        return fraction * abs(float(base[0] / base[1]) + penalty)

    @property
    def looks(self) -> tuple[int, ...]:
        """The held-out batches scored before each interim look of :meth:`delta`'s sequential test: a quarter and
        a half of them, where each look sees at least ``MIN_HELDOUT_EXAMPLES`` examples; none unless every rank
        holds as many batches (each look all-reduces: the ranks must look together)."""
        if self._looks is None:
            count = len(self.problem.value_set)
            sums = all_reduce_sum(torch.tensor([1.0, count, count * count], dtype=torch.float64))
            equal = float(sums[0] * sums[2]) == float(sums[1]) ** 2
            sizes = [int(b[0].shape[0]) for b in self.problem.value_set]
            at = (count // 4, count // 2)
            seen = all_reduce_sum(torch.tensor([float(sum(sizes[:k])) for k in at], dtype=torch.float64))
            self._looks = tuple(sorted({k for k, n in zip(at, seen.tolist())
                                        if equal and 0 < k < count and n >= MIN_HELDOUT_EXAMPLES}))
        return self._looks

    def delta(self, changes: Mapping[str, torch.Tensor], z: float | None = None, margin: float = 0.0) -> _Change:
        """The change of the held-out objective under ``changes``: the data term's mean change and standard error
        (paired by example) and the regulariser's exact change, and whether the data term is unchanged.

        With ``z`` (the critical value of the test the change faces: :meth:`_Change.significant`) the evaluation
        is sequential: after a quarter and a half of the held-out batches (:attr:`looks`) it stops once the data
        term's change is significantly no better than ``-margin`` (its mean minus ``_FUTILITY_Z`` standard errors
        above ``-margin``: the move cannot become a significant improvement but by a fluke), and the change is
        the one on the examples scored so far (``examples`` says how many). A stop for futility never makes a move
        significant, so the test's family-wise level holds (a non-binding futility bound); it costs power only to
        a move whose interim mean lies ``_FUTILITY_Z`` interim standard errors above its true change
        (probability below 2.3% at one look; below 1e-4 for a move at the test's detection limit, which the
        final test passes with probability 1/2: its true change is ``z`` final standard errors, about ``z/2``
        interim ones at a quarter of the examples, below ``-margin``)."""
        base, base_penalty = self.base_losses()
        eps = float(torch.finfo(self.problem.dtype).eps)
        stops = self.looks if z is not None else ()
        parts, lo, penalty = [], 0, None
        for hi in (*stops, len(self.problem.value_set)):
            data, penalty = self.losses(changes, batches=slice(lo, hi))
            parts.append(data)
            lo = hi
            seen = torch.cat(parts)
            change = _paired_by_example(seen, base[: seen.numel()], penalty - base_penalty, eps=eps)
            if hi < len(self.problem.value_set) and not change.regulariser_only and (
                    change.change - _FUTILITY_Z * change.se > -margin):
                break
        return change


# the identity's values up to a group's chain that a screen keeps for groups other than the last one asked for
# (bytes; float32 TinyTen on the demo's held-out batches needs ~43 MiB per batch of 256 for all eight groups)
_KEPT_VALUES_BYTES = 256 * 2**20

# the sequential test's futility bound: a move whose change is this many standard errors above -margin at an
# interim look stops there (see _Context.delta)
_FUTILITY_Z = 2.0


@dataclass(frozen=True)
class _Change:
    """The change of the held-out curve objective under one move, its data term and its regulariser apart.

    ``change`` and ``se``: mean and standard error of the per-example differences of the data term (the paired
    test's statistic); ``regulariser``: the exact change of the weight-decay term (the same for every example, so
    the data cannot test it); ``regulariser_only``: no example's data term moved beyond the rounding of its float
    loss (:func:`_paired_by_example`), as for a move among units that no held-out example activates.
    """

    change: float
    se: float
    regulariser: float
    regulariser_only: bool
    examples: int = 0

    @property
    def t(self) -> float:
        """The paired t statistic of the data term (0 for a move of the regulariser only)."""
        if self.regulariser_only:
            return 0.0
        return self.change / self.se if self.se > 0 else math.copysign(math.inf, self.change) if self.change else 0.0

    def significant(self, z: float, margin: float) -> bool:
        """Does the data term improve significantly (one-sided, critical value ``z``) by more than ``margin``?"""
        return not self.regulariser_only and self.change + z * self.se < -margin

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "se": self.se, "t": self.t, "regulariser_change": self.regulariser,
                "regulariser_only": self.regulariser_only, "examples": self.examples}  # fmt: skip


def _move_key(changes: Mapping[str, torch.Tensor]) -> tuple:
    """A move (group -> index permutation) as a key of a dict."""
    return tuple(sorted((g, tuple(p.tolist())) for g, p in changes.items()))


def _example_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of the main logits plus 0.3 times that of each auxiliary head (float64): the
    per-example terms of :func:`neuralign._utils.classification_loss`, the curve objective's loss. A language
    model's example is its sequence: ``(B, T, V)`` logits and ``(B, T)`` targets give each sequence's mean over its
    ``T`` tokens (its tokens are not independent; with equal lengths the batch mean is the mean of these)."""
    main, aux = split_logits(output)

    def per_example(logits: torch.Tensor) -> torch.Tensor:  # (B*T,) token losses, or (B,) for a classifier
        tokens = torch.nn.functional.cross_entropy(*flat_logits(logits, target), reduction="none")
        return tokens.double().view(target.shape[0], -1).mean(dim=1)

    loss = per_example(main)
    for a in aux:
        loss = loss + 0.3 * per_example(a)
    return loss


# an example's data term unchanged up to this many units in the last place of its float loss counts as unchanged
_ROUNDING_ULPS = 4


def _paired_by_example(after: torch.Tensor, before: torch.Tensor, regulariser: float = 0.0,
                       eps: float = float(torch.finfo(torch.float32).eps)) -> _Change:
    """The paired change of the per-example data terms ``after - before`` (this rank's, the sums over the ranks of
    a process group): their mean and standard error, ``regulariser`` (its exact change) beside them.

    The data term counts as unchanged when every example's difference is at most ``_ROUNDING_ULPS`` units in the
    last place (``eps``: of the model's float type, float32 by default) of its loss: a move among units that the
    example does not activate leaves its float computation bit for bit the same (those units contribute exact
    zeros to every later sum), and a backend whose reductions are not deterministic changes it by a few units of
    rounding. Either way the mean change is then below :math:`4\\,\\epsilon \\max_i \\ell_i` (float32: 5e-7 of the
    loss), far below any margin the test applies, and a test of it would judge rounding noise.
    """
    d = (after - before).double()
    beyond = (d.abs() > _ROUNDING_ULPS * eps * torch.maximum(after.abs(), before.abs()).double()).sum()
    sums = all_reduce_sum(torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64), d.sum(), d.square().sum(),
                                       beyond.double()]))  # fmt: skip
    n, s1, s2, moved = (float(v) for v in sums)
    mean = s1 / n
    if n < 2:
        return _Change(mean, 0.0, regulariser, moved == 0, int(n))
    var = max(0.0, (s2 - n * mean * mean) / (n - 1))
    return _Change(mean, math.sqrt(var / n), regulariser, moved == 0, int(n))


def _tick(opts: _Run, name: str, done: int, total: int | None, start: bool = False,
          expected: float | None = None) -> None:
    """Report progress inside a check (``done`` of ``total`` units of its work) to the callback; ``expected``:
    the seconds the whole check is expected to take, from a measured first step."""
    if opts.callback is not None:
        record = {"stage": "verify", "check": name, "step": done, "total": total, "start": start}
        if expected is not None:
            record["expected_seconds"] = expected
        opts.callback(record)


def _announcing(callback: Callable[[dict[str, Any]], Any] | None, announced: dict[str, float]
                ) -> Callable[[dict[str, Any]], Any]:  # fmt: skip
    """``callback`` (if any) receiving, in the first record of each check after its start, ``expected_seconds``: the
    time the whole check is expected to take, from its measured first step (the check's own estimate where it gives
    one, as the neighbourhood check does); ``announced`` collects each check's, which the report keeps."""
    began: dict[str, float] = {}

    def announce(record: dict[str, Any]) -> Any:
        name = record["check"]
        if record["start"]:
            began[name] = time.perf_counter()
        elif name in began and record.get("total") and record["step"] > 0:
            elapsed = time.perf_counter() - began.pop(name)
            if "expected_seconds" not in record:
                record = {**record, "expected_seconds": elapsed / record["step"] * record["total"]}
            announced.setdefault(name, float(record["expected_seconds"]))
        return None if callback is None else callback(record)

    return announce


def _check_stability(ctx, model, point_a, point_b, perms, train_loader, curve, spec, opts, gen) -> CheckResult:
    sizes = spec.sizes
    runs: dict[str, dict[str, Any]] = {}
    starts: list[tuple[str, Any, Any]] = [("alignment", perms, curve)]
    if opts.identity_start:
        starts.append(("identity", "identity", None))
    for r in range(opts.random_starts):
        start = random_permutation(spec, generator=stable_seed(opts.seed, "start", r))
        starts.append((f"random{r + 1}", start, None))
    total = len(starts) * opts.stability_iters
    for index, (label, init, start_curve) in enumerate(starts):
        trace: list[dict[str, torch.Tensor]] = []

        def record(rec: dict[str, Any], trace=trace, index=index) -> None:
            if rec["stage"] == "iteration":
                trace.append(rec["perms"])
                _tick(opts, "stability", index * opts.stability_iters + len(trace), total)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            pam_options = CurvePAMOptions(
                step=LinearizedStep(backtrack=opts.backtrack), lam=opts.lam, max_iter=opts.stability_iters,
                x_epochs=opts.stability_x_epochs, gradient_batches=opts.gradient_batches,
                value_batches=opts.value_batches, value_ts=opts.value_ts, swap_trials=opts.swap_trials,
                swap_alpha=opts.alpha, swap_min_improvement=opts.min_improvement,
            )  # fmt: skip
            res = fit_curve_pam(
                model, point_a, point_b, train_loader, init=init, curve=start_curve, spec=spec,
                heldout_loader=opts.heldout_loader, options=pam_options, max_batches=opts.max_batches,
                weight_decay=opts.weight_decay, generator=stable_seed(opts.seed, "stability", label), callback=record,
                swap_proposals=ctx.ranked if label == "alignment" else None,
            )  # fmt: skip
        _tick(opts, "stability", (index + 1) * opts.stability_iters, total)
        if label == "alignment":
            trace_alignment = trace
        start_perm = res.init_perms
        distances = [permutation_distance(start_perm, perms)] + [permutation_distance(p, perms) for p in trace]
        runs[label] = {
            "objective": res.history,
            "reassigned_fraction": {g: [c / sizes[g] for c in res.changed[g]] for g in sizes},
            "distance_to_perms": {g: [d[g] / sizes[g] for d in distances] for g in sizes},
        }
    frac = runs["alignment"]["reassigned_fraction"]
    worst = max((max(v) if v else 0.0) for v in frac.values())
    thr = opts.reassign_threshold
    # a reassignment beyond the threshold counts against stability only if the move it leads to (from the
    # alignment, per group, after that iteration) improves the held-out objective's data term significantly by more
    # than min_improvement, by the neighbourhood check's paired test on the same fixed curve (a move of the
    # regulariser alone, among units no held-out example activates, never counts)
    # per coordinate: the groups sharing one head permutation move together (a move of one of them alone would
    # break heads apart)
    inverse = {g: torch.argsort(p) for g, p in perms.items()}
    beyond = [(i, c) for c in ctx.coordinates for i in range(len(frac[c.groups[0]]))
              if max(frac[g][i] for g in c.groups) > thr]  # fmt: skip
    # at least the neighbourhood check's z where it ran (its family holds every move it scored): a move both
    # checks score is then flagged by both or by neither
    z = max(bonferroni_quantile(opts.alpha, len(beyond), ctx.examples), ctx.neighbourhood_z) if beyond else math.inf
    margin = ctx.margin(opts.min_improvement) if beyond else 0.0
    moves = []
    for i, c in beyond:
        q = {g: inverse[g][trace_alignment[i][g].cpu()] for g in c.groups}
        change = ctx.delta(q, z, margin)
        moved = {g: (q[g] != torch.arange(sizes[g])).nonzero().flatten().tolist() for g in c.groups}
        moved = moved[c.label] if not c.structured else {g: u for g, u in moved.items() if u}
        moves.append({"iteration": i + 1, "group": c.label, "reassigned_fraction": max(frac[g][i] for g in c.groups),
                      "units": moved, **change.to_dict(), "significant": change.significant(z, margin)})  # fmt: skip
    significant = [m for m in moves if m["significant"]]
    verdict = "fail" if significant else "pass"
    toward = {
        label: {g: run["distance_to_perms"][g][-1] <= run["distance_to_perms"][g][0] for g in sizes}
        for label, run in runs.items()
        if label != "alignment"
    }
    obj = runs["alignment"]["objective"]
    proposed = {g: [list(m) for m in ms[: opts.swap_trials]] for g, ms in ctx.ranked.items() if opts.swap_trials}
    summary = (
        f"PAM from the alignment reassigned at most {worst:.1%} of a group's units per iteration "
        f"over {len(obj) - 1} iterations (objective {obj[0]:.4g} -> {obj[-1]:.4g})"
    )
    if any(proposed.values()):
        summary += (f"; its swap search tried the neighbourhood check's best-ranked transpositions first (up to "
                    f"{max(len(m) for m in proposed.values())} per group; it keeps one only if it improves "
                    f"significantly over the {opts.value_batches} held-out batches' means, a weaker test than the "
                    "neighbourhood check's, per example)")  # fmt: skip
    if significant:
        m = min(significant, key=lambda r: r["change"])
        summary += (f"; the move to {m['group']} units {_fmt(m['units'])} (iteration {m['iteration']}, "
                    f"{m['reassigned_fraction']:.1%} reassigned) changes the held-out objective by "
                    f"{m['change']:.3g} ± {m['se']:.2g} (t = {m['t']:.3g}), significantly beyond the margin "
                    f"{margin:.3g} at z = {z:.3g}")  # fmt: skip
    elif moves:
        tested = [m for m in moves if not m["regulariser_only"]]
        summary += (f"; none of the {len(moves)} reassignments beyond {thr:.0%} improves the held-out objective's "
                    f"data term significantly by more than {opts.min_improvement:g} of the objective" + (
                        f" (best change {min(m['change'] for m in tested):.3g}, z = {z:.3g})" if tested else ""))
    reg_only = [m for m in moves if m["regulariser_only"]]
    if reg_only:
        summary += (f"; {len(reg_only)} of them change only the weight-decay term (units no held-out example "
                    f"activates; by {_span(m['regulariser_change'] for m in reg_only)}), not counted")  # fmt: skip
    per_group = {
        g: {
            "max_reassigned": max(frac[g]) if frac[g] else 0.0,
            **{f"{lab}_dist_start": runs[lab]["distance_to_perms"][g][0] for lab in toward},
            **{f"{lab}_dist_end": runs[lab]["distance_to_perms"][g][-1] for lab in toward},
        }
        for g in sizes
    }
    return CheckResult(
        "stability", verdict, summary,
        {"max_reassigned_fraction": thr, "lam": opts.lam, "family_alpha": opts.alpha, "z": z,
         "min_improvement": opts.min_improvement, "margin": margin},
        {"runs": runs, "moves_toward_perms": toward, "per_group": per_group, "moves": moves,
         "swap_proposals": proposed,
         "regulariser_only": {"count": len(reg_only),
                              "changes": [m["regulariser_change"] for m in reg_only]}},
    )  # fmt: skip


def _step_bounds(problem: CurvePermutationProblem, G: Mapping[str, torch.Tensor], coords: Sequence[Coordinate],
                 max_iter: int = 100) -> dict[str, tuple[float, int]]:
    """Per coordinate, :math:`\\lambda^*` and the units its witness moves: the largest step for which the identity
    is the minimiser of the linearised P-step over the problem's feasible permutations (structured with attention
    heads), by Dinkelbach's method as :func:`~neuralign.optim.proximal_step_bound` (which it equals on a group
    without heads), every iteration one :meth:`~neuralign.optim.PermutationProblem.assign` over all groups with
    cost :math:`G_g - r_c I` (the assignment separates by coordinate, so each coordinate has its own ratio
    :math:`r_c`)."""
    eye = {g: torch.eye(G[g].shape[0], dtype=torch.float64) for g in G}
    base = {g: float(torch.diagonal(G[g]).sum()) for g in G}
    scale = {c.label: max(1.0, sum(float(G[g].abs().max()) * G[g].shape[0] for g in c.groups)) for c in coords}
    ratio = {c.label: 0.0 for c in coords}
    moved = {c.label: 0 for c in coords}
    active = {c.label for c in coords}
    for _ in range(max_iter):
        q = problem.assign({g: G[g] - ratio[c.label] * eye[g] for c in coords for g in c.groups})
        for c in coords:
            if c.label not in active:
                continue
            qs = {g: q[g].cpu() for g in c.groups}
            d = sum(int((qs[g] != torch.arange(qs[g].numel())).sum()) for g in c.groups)
            gain = sum(base[g] - float(G[g][torch.arange(qs[g].numel()), qs[g]].sum()) for g in c.groups)
            if d == 0 or gain - ratio[c.label] * d <= 1e-12 * scale[c.label]:
                active.discard(c.label)
            else:
                ratio[c.label], moved[c.label] = gain / d, d
        if not active:
            break
    return {label: (1.0 / r if r > 0 else math.inf, moved[label]) for label, r in ratio.items()}


def _check_certificate(ctx: _Context, opts) -> CheckResult:
    started = time.perf_counter()
    prob = ctx.problem
    G = prob.gradient_at(ctx.x, ctx.identity, *prob.value_pairs())
    G = {g: G[g].detach().double().cpu() for g in ctx.spec.sizes}
    lam = opts.certificate_lam
    coords = ctx.coordinates
    per_group: dict[str, dict[str, Any]] = {}
    candidates: dict[str, list[tuple[float, dict[str, torch.Tensor]]]] = {c.label: [] for c in coords}
    lp_gaps, uncovered = [], []
    bounds = _step_bounds(prob, G, coords)
    # the P-steps a linearised PAM would take from the alignment for steps between lam* and lam, per coordinate:
    # the k-th step of every coordinate's grid in one assignment of the problem (structured with heads), the
    # coordinates already certified held at the identity (cost -I)
    grids = {c.label: torch.logspace(math.log10(bounds[c.label][0] * 1.0001), math.log10(lam),
                                     opts.certificate_steps).tolist()
             for c in coords if bounds[c.label][0] < lam}  # fmt: skip
    eye = {g: torch.eye(n, dtype=torch.float64) for g, n in ctx.spec.sizes.items()}
    seen: dict[str, set] = {c.label: set() for c in coords}
    for k in range(opts.certificate_steps if grids else 0):
        costs = {g: G[g] - eye[g] / grids[c.label][k] if c.label in grids else -eye[g] for c in coords
                 for g in c.groups}  # fmt: skip
        q = prob.assign(costs)
        for c in coords:
            if c.label not in grids:
                continue
            changes = {g: q[g].cpu() for g in c.groups if not torch.equal(q[g].cpu(), torch.arange(eye[g].shape[0]))}
            key = tuple((g, tuple(p.tolist())) for g, p in changes.items())
            if changes and key not in seen[c.label]:
                seen[c.label].add(key)
                candidates[c.label].append((grids[c.label][k], changes))
    for c in coords:
        row = {"lam_star": bounds[c.label][0], "witness_moves": bounds[c.label][1],
               "steps_tested": len(candidates[c.label])}  # fmt: skip
        if c.structured:  # the LP relaxation is over all permutations, not the structured set: no cross-check
            uncovered.extend(c.groups)
        else:
            # cross-check the assignment at the threshold step with its Birkhoff-polytope LP relaxation (cvxpy)
            n = ctx.spec.sizes[c.label]
            cost = G[c.label] - eye[c.label] / lam
            lap = solve_assignment(cost, certificate=True)
            gap = float("nan")
            if n <= opts.lp_max_size:
                lp = solve_assignment_lp(cost)
                gap = abs(lp.fun - lap.fun) / max(1.0, abs(lap.fun))
                lp_gaps.append(gap)
            row.update(lap_duality_gap=lap.duality_gap(), lp_vs_lap_gap=gap)
        per_group[c.label] = row
    z = bonferroni_quantile(opts.alpha, sum(len(m) for m in candidates.values()), ctx.examples)
    margin = ctx.margin(opts.min_improvement)  # as in the neighbourhood check
    # progress in milliseconds of work, measured: everything before the held-out evaluations (gradient, lam*, the
    # P-steps, the LP cross-check), then each coordinate's scored moves at the cost measured on one held-out batch
    # (its first move, which computes the identity's values up to a group's chain, and each later one; a bar's rate
    # then holds from the start; counted in steps, the first step's cost would inflate its estimate 3x)
    jobs = [(label, step, q) for label, moves in candidates.items() for step, q in moves]
    stats_by: dict[str, list[tuple[float, _Change]]] = {label: [] for label in candidates}
    costs = {label: ctx.move_costs(moves[0][1]) for label, moves in candidates.items() if moves}
    left = {label: costs[label][0] + costs[label][1] * (len(moves) - 1) for label, moves in candidates.items()
            if moves}  # fmt: skip
    done = 1000.0 * (time.perf_counter() - started)
    expected = int(done + sum(left.values()))
    _tick(opts, "certificate", int(done), expected, expected=expected / 1000.0)
    for label, step, q in jobs:
        scoring = time.perf_counter()
        stats_by[label].append((step, ctx.delta(q, z, margin)))
        done += 1000.0 * (time.perf_counter() - scoring)
        left[label] -= costs[label][0] if len(stats_by[label]) == 1 else costs[label][1]
        _tick(opts, "certificate", int(done), int(done + sum(max(0.0, v) for v in left.values())))
    if not jobs:
        _tick(opts, "certificate", 1, 1)
    verdicts = []
    for label in candidates:
        row = per_group[label]
        if row["lam_star"] >= lam:
            row.update(best_change=float("nan"), verdict="pass")
            verdicts.append("pass")
            continue
        stats = stats_by[label]
        tested = [r for r in stats if not r[1].regulariser_only]
        improving = [r for r in tested if r[1].significant(z, margin)]
        v = "fail" if improving else "pass"
        if tested:
            best = min(tested, key=lambda r: r[1].change)
            row.update(best_change=best[1].change, best_change_se=best[1].se, best_step=best[0])
        else:
            row.update(best_change=float("nan"))
        row.update(regulariser_only=len(stats) - len(tested), verdict=v)
        verdicts.append(v)
    verdict = _overall(verdicts)
    if lp_gaps and max(lp_gaps) > 1e-6:
        verdict = "fail"
    n_fail = sum(v == "fail" for v in verdicts)
    smallest = min(r["lam_star"] for r in per_group.values())
    summary = (
        f"lam* (largest step keeping the alignment a fixed point of the linearised P-step) >= {lam:g} in "
        f"{sum(r['lam_star'] >= lam for r in per_group.values())}/{len(verdicts)} groups (smallest {smallest:.4g}); "
        f"the steps beyond lam* improve the objective significantly in {n_fail} groups"
    )
    if lp_gaps:
        summary += f"; LP relaxation agrees with the assignment to {max(lp_gaps):.1e}"
    if uncovered:
        summary += (f"; the {len(uncovered)} groups sharing head permutations are not covered by the LP "
                    "cross-check (it relaxes all permutations, not the structured ones)")  # fmt: skip
    return CheckResult(
        "certificate", verdict, summary,
        {"lam": lam, "family_alpha": opts.alpha, "z": z, "min_improvement": opts.min_improvement,
         "margin": margin, "lp_tolerance": 1e-6, "heldout_examples": ctx.examples},
        {"per_group": per_group, "gradient_norm": {g: float(G[g].norm()) for g in G},
         "lp_uncovered_groups": uncovered},
    )  # fmt: skip


def swap_estimates(G: torch.Tensor) -> torch.Tensor:
    """First-order estimate of the change of :math:`F` for every transposition of one group, at :math:`P = I`.

    With :math:`T_{ij}` the permutation matrix that exchanges units :math:`i` and :math:`j`,

    .. math::  F(T_{ij}) - F(I) \\approx \\langle G, T_{ij} - I\\rangle = G_{ij} + G_{ji} - G_{ii} - G_{jj},

    for all pairs at once (the scoring of 2-opt moves in local search for the QAP).

    Parameters
    ----------
    G : Tensor
        ``(n, n)`` gradient :math:`\\nabla_P F` at the identity.

    Returns
    -------
    Tensor
        ``(n, n)`` symmetric, same dtype and device, zero diagonal: entry ``(i, j)`` is the estimate for the swap.

    Raises
    ------
    ValueError
        If ``G`` is not a square matrix.

    Examples
    --------
    >>> G = torch.tensor([[0.0, -2.0], [1.0, 0.5]])
    >>> swap_estimates(G)
    tensor([[ 0.0000, -1.5000],
            [-1.5000,  0.0000]])
    """
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"`G` must be a square matrix, got shape {tuple(G.shape)}")
    d = torch.diagonal(G)
    est = G + G.t() - d[:, None] - d[None, :]
    return est.fill_diagonal_(0.0)


def _as_changes(g: str, perms: Sequence[Mapping[str, torch.Tensor] | torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Moves as group -> permutation maps; a tensor is a permutation of group ``g``."""
    return [{g: p} if isinstance(p, torch.Tensor) else dict(p) for p in perms]


# racing (successive elimination) in the screen: a move leaves the race once its change, minus _RACE_Z standard
# errors, is above the n_swaps-th best change plus _RACE_Z standard errors (it can no longer be among the best).
# A lower z would race fewer candidate-examples at a cost in power (benchmarks/bench_verification.py, power; and
# tests/verification): a transposition planted 3 screen standard errors better among 2,016 neutral ones is ranked
# among the 8 best as often as by the exhaustive screen at z = 3 (130/200 seeded trials, 1.00 of its
# candidate-examples), in 1 trial fewer at 2 (0.83), 6 fewer at 1.5 (0.52); on the demo pair's groups of up to 512
# transpositions, none fewer at 1.5 (0.75-0.93) and power lost at 1 (0.80 -> 0.68 at 4 standard errors)
_RACE_Z = 3.0
# the screening set is raced in slices: _FIRST_SLICE examples, then doubling (32, 32, 64, 128: 32, 64, 128, 256 seen)
_FIRST_SLICE = 32


def _slices(examples: int) -> list[slice]:
    """The slices of a screening set of ``examples`` raced in turn: ``_FIRST_SLICE`` examples, then each as large
    as all before it (the last cut at ``examples``)."""
    out, lo = [], 0
    size = min(_FIRST_SLICE, examples)
    while lo < examples:
        out.append(slice(lo, min(examples, lo + size)))
        lo += size
        size = lo
    return out


class _Screen:
    """The curve objective's data term (its per-example loss without the weight-decay term: the part the
    held-out test scores) on the screening set, for many moves of one coordinate at once, as the change of each
    example's term from the identity's.

    The screening set is evaluated in slices (:func:`_slices`; each slice one batch, so batch norm normalises
    over the slice), in the order of a race (see :func:`_screen_group`).

    A move of a coordinate (a group, or the groups sharing one head permutation) changes only the parameters on
    its groups' axes (the layers that produce and consume them): those are stacked over the candidates and the
    network is evaluated with :func:`torch.func.vmap` over them, so that every layer before the first changed one
    runs once per chunk of candidates, not once per candidate (an unbatched input meets unbatched weights there).
    Batch norm normalises each candidate's batch with its own statistics, as in the objective (the running
    statistics are not tracked).

    A batched layer costs more per candidate than the same layer run alone (on a CPU: a grouped convolution and a
    decomposed batch norm), so vmap pays only where the unchanged layers before the group are a large part of the
    network. The first chunk of each group is therefore computed half one way, half the other, each timed per
    candidate, and the faster way screens the rest of the group (``benchmarks/bench_verification.py`` measures
    both per group).

    Where the group's producer, the channel-wise layers after it (batch norm, activations, pooling) and its
    consumer form a chain in the model's fx graph (:class:`~neuralign._chain.Chain`), both ways
    evaluate a transposition through it: the producer and the consumer on the two moved units only (the consumer's
    output is the identity's plus the moved channels' change), only the layers after the consumer per candidate.
    Every way computes the same values up to float rounding (the same sums in another order; float64 tests:
    ``tests/verification/test_chain.py``). ``chains=False`` evaluates every move without them; with
    ``channels_last`` (the default) the curve's 4-D weights are in channels-last memory format on a CPU
    (:func:`~neuralign._chain.to_channels_last`: faster, the same values up to float rounding).
    """

    def __init__(self, ctx: _Context, batch: tuple[torch.Tensor, torch.Tensor] | list[Sequence[torch.Tensor]],
                 ts: Sequence[float], chains: bool = True, channels_last: bool = True) -> None:  # fmt: skip
        prob = ctx.problem
        # a list: batches of this rank's, one slice each (the held-out batches that score moves), not sharded
        self.given = [(b[0], b[1]) for b in batch] if isinstance(batch, list) else None
        self.ctx, self.batch, self.ts = ctx, batch, list(ts)
        self.chains = chains  # evaluate a move of a group with a chain through it (the problem's, found once)
        # (group, slice, time) -> a chain's identity values and their bytes, least recently used first
        self._values: OrderedDict[tuple[str, int, int], tuple[dict, int]] = OrderedDict()
        self.model = prob.untracked_model
        with torch.no_grad():
            self.base = [prob.weights(ctx.x, ctx.identity, t) for t in self.ts]
            if channels_last:
                self.base = [to_channels_last(w) for w in self.base]
            self.offset = prob.unflatten(ctx.x[0])
        if self.given is None:
            self.examples = int(batch[0].shape[0])
            self.slices = _slices(self.examples)
        else:
            ends = torch.tensor([0] + [int(b[0].shape[0]) for b in self.given]).cumsum(0).tolist()
            self.examples, self.slices = ends[-1], [slice(lo, hi) for lo, hi in zip(ends, ends[1:])]
        self.local = sum(self.share(part) for part in range(len(self.slices)))  # this rank's examples
        self.batched: dict[str, bool] = {}  # per coordinate: is the batched way the faster one?
        # per coordinate: seconds per candidate and example the faster way, measured on its first chunk
        self.seconds: dict[str, float] = {}
        self._cached: dict[tuple[str, int], tuple[list[dict[str, torch.Tensor]], torch.Tensor]] = {}
        self._identity: dict[int, torch.Tensor] = {}
        self._penalty: list[float] | None = None  # per time: the identity's sum of squares of every parameter
        self.hit = False  # did the last call return values computed before (the first chunk, when it was measured)?

    def chunk(self, part: int) -> int:
        """Candidates per vmap call on slice ``part``: about 2048 examples' activations at a time."""
        s = self.slices[part]
        return max(1, 2048 // (s.stop - s.start))

    def _part(self, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice ``part`` of the screening set, or under a process group this rank's share of it (the race
        all-reduces its sums, so that every rank ranks the same candidates on the whole set)."""
        if self.given is not None:
            return self.given[part]
        s = self.slices[part]
        x, y, _ = shard_batch(self.batch[0][s], self.batch[1][s], label="the screening set")
        return x, y

    def share(self, part: int) -> int:
        """This rank's examples of slice ``part``."""
        s = self.slices[part]
        if self.given is not None:
            return s.stop - s.start
        return int(torch.tensor_split(torch.arange(s.stop - s.start), world_size())[rank()].numel())

    def _changed(self, perms: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
        """The parameters that ``perms`` change (those on their groups' axes), and B's on them under each of
        ``perms`` (index permutations: exact)."""
        prob = self.ctx.problem
        groups = {h for p in perms for h in p}
        keys = sorted({k for h in groups for k, _ in prob.spec.perm_to_axes[h]} & set(prob.names))
        sub_spec = prob.spec.restrict(keys)
        ident = identity_permutation(sub_spec)
        return keys, [apply_permutation({k: prob.wb[k] for k in keys}, sub_spec, {**ident, **p}) for p in perms]

    def _point(self, t: float, k: str, pb: torch.Tensor) -> torch.Tensor:
        """Parameter ``k`` of the curve's point at time ``t`` with B's ``pb`` (as the problem's ``weights``)."""
        return (1.0 - t) * self.ctx.problem.wa[k] + t * pb + 2.0 * t * (1.0 - t) * self.offset[k]

    def _chain(self, g: str, perms: Sequence[Mapping[str, torch.Tensor]]) -> Chain | None:
        """Group ``g``'s :class:`~neuralign._chain.Chain`, where every move of ``perms`` moves units
        of ``g`` only (and some) and the model has one."""
        if not self.chains or any(p.keys() != {g} or bool((p[g].cpu() == torch.arange(p[g].numel())).all())
                                  for p in perms):  # fmt: skip
            return None
        return self.ctx.problem.chain(g)

    def _rows(self, t: float, moved: torch.Tensor, source: torch.Tensor) -> Callable[[str, int], torch.Tensor]:
        """A move's parameters at the curve's point at time ``t`` on the ``moved`` units
        (:func:`neuralign._chain.curve_rows`)."""
        return curve_rows(self.ctx.problem.wa, self.ctx.problem.wb, self.offset, t, moved, source)

    def _identity_values(self, chain: Chain, g: str, part: int, ti: int) -> dict:
        """:meth:`~neuralign._chain.Chain.identity_values` of group ``g``'s chain on slice ``part`` at the
        ``ti``-th time, kept: those of the group last asked for always (its moves are evaluated slice after slice),
        those of other groups while all kept values take at most :data:`_KEPT_VALUES_BYTES` (the least recently
        used go first), so that the certificate reuses the neighbourhood check's and a group's scored moves the
        values its cost probe computed (:meth:`_Context.move_costs`)."""
        key = (g, part, ti)
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key][0]
        values = chain.identity_values(self.base[ti], self._part(part)[0])
        self._values[key] = (values, sum(v.numel() * v.element_size() for v in values.values()))
        total = sum(size for _, size in self._values.values())
        for other in [k for k in self._values if k[0] != g]:
            if total <= _KEPT_VALUES_BYTES:
                break
            total -= self._values.pop(other)[1]
        return values

    def _through_chain(self, chain: Chain, g: str, perms: Sequence[Mapping[str, torch.Tensor]], part: int,
                       batched: bool) -> torch.Tensor:  # fmt: skip
        """The data term of each move on slice ``part``, through the layers after ``g``'s consumer only (the
        producer and the consumer on the moved units alone: :mod:`~neuralign._chain`), the moves
        of a chunk in one :func:`torch.func.vmap` call (``batched``) or one at a time."""
        prob, (x, y) = self.ctx.problem, self._part(part)
        n = prob.spec.sizes[g]
        moved = [(p[g].cpu() != torch.arange(n)).nonzero().flatten().to(x.device) for p in perms]
        sources = [p[g].to(x.device).index_select(0, s) for p, s in zip(perms, moved)]
        out = torch.zeros(len(perms), x.shape[0], dtype=torch.float64)
        chunk = self.chunk(part) if batched and len({m.numel() for m in moved}) == 1 else 1
        with torch.no_grad():
            for ti, (t, w0) in enumerate(zip(self.ts, self.base)):
                values = self._identity_values(chain, g, part, ti)
                tail = {k: w0[k] for k in chain.tail_names}

                def loss(parts: dict[str, torch.Tensor], values=values, tail=tail) -> torch.Tensor:
                    return _example_loss(chain.output(values, parts, tail), y)

                for lo in range(0, len(perms), chunk):
                    parts = [chain.parts(values, self._rows(t, s, src), w0, s)
                             for s, src in zip(moved[lo:lo + chunk], sources[lo:lo + chunk])]  # fmt: skip
                    if chunk == 1:
                        out[lo] += loss(parts[0])
                        continue
                    stacked = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
                    # dropout after the consumer, if any: its own mask per candidate, as in one network per candidate
                    out[lo:lo + len(parts)] += _vmap(loss, stacked)
        return out / len(self.ts)

    def linearised(self, moves: MoveSet) -> torch.Tensor | None:
        """``(moves.count,)`` float64: every transposition's mean change of the data term over the screening set
        (all ranks'; mean over ``ts``), to first order in the layers after its group's consumer
        (:meth:`~neuralign._chain.Chain.linearised`: the producer, the channel-wise layers and the
        consumer exact); ``None`` for a coordinate with heads or a group without a chain."""
        c = moves.coordinate
        g = c.groups[0]
        n = self.ctx.spec.sizes[g]
        chain = None if c.structured or n < 2 else self._chain(g, [{g: _swap(n, 0, 1)}])
        if chain is None:
            return None
        prob = self.ctx.problem
        total = torch.zeros(n, n, dtype=torch.float64)
        for part in range(len(self.slices)):
            y = self._part(part)[1]
            for ti, (t, w0) in enumerate(zip(self.ts, self.base)):
                values = self._identity_values(chain, g, part, ti)  # kept for the race that follows
                consumer = values[chain.consumer_node].detach().requires_grad_(True)
                tail = {k: w0[k] for k in chain.tail_names}
                with torch.enable_grad():
                    output = functional_call(chain.tail, tail, (consumer, *(values[m] for m in chain.needs)))
                    (grad,) = torch.autograd.grad(_example_loss(output, y).sum(), consumer)
                total += chain.linearised(values, grad.to(consumer.dtype), w0, prob.wb, t, per_example=False).cpu()
        rows, cols = moves.pairs
        sums = all_reduce_sum(torch.cat([total[rows, cols], torch.tensor([float(self.local)], dtype=torch.float64)]))
        return sums[:-1] / (sums[-1] * len(self.ts))

    def penalty(self, chain: Chain, g: str, perm: torch.Tensor) -> float:
        """The weight-decay term (summed over ``ts``) of the curve's points with group ``g`` permuted by ``perm``
        (one of its chain's moves): the identity's, with the squares of the chain's parameters on the moved units
        replaced by theirs under the move (the only entries it changes)."""
        prob = self.ctx.problem
        if self._penalty is None:
            self._penalty = [squares(w.values()) for w in self.base]
        device = next(iter(prob.wb.values())).device
        moved = (perm.cpu() != torch.arange(perm.numel())).nonzero().flatten().to(device)
        source = perm.to(device).index_select(0, moved)
        total = 0.0
        for t, w0, base in zip(self.ts, self.base, self._penalty):
            total += 0.5 * prob.weight_decay * (base + chain.squares_change(self._rows(t, moved, source), w0, moved))
        return total

    def _one_by_one(self, g: str, perms: Sequence[Mapping[str, torch.Tensor] | torch.Tensor], part: int = 0
                    ) -> torch.Tensor:  # fmt: skip
        prob, (x, y) = self.ctx.problem, self._part(part)
        chain = self._chain(g, _as_changes(g, perms))
        if chain is not None:
            return self._through_chain(chain, g, _as_changes(g, perms), part, batched=False)
        keys, permuted = self._changed(_as_changes(g, perms))

        def data_term(pb: Mapping[str, torch.Tensor]) -> torch.Tensor:
            # the identity's point at each time, the parameters the move changes replaced
            return sum(_example_loss(functional_call(prob.model, ({**w0, **{k: self._point(t, k, pb[k]) for k in keys}},
                                                                  prob.buffers), (x,)), y)
                       for t, w0 in zip(self.ts, self.base)) / len(self.ts)  # fmt: skip

        with torch.no_grad():
            return torch.stack([data_term(pb) for pb in permuted]) if permuted else torch.zeros(0, x.shape[0])

    def identity(self, part: int) -> torch.Tensor:
        """``(examples in slice part,)`` float64: the identity's per-example data term on slice ``part``."""
        if part not in self._identity:
            self._identity[part] = self._one_by_one("", [{}], part)[0]
        return self._identity[part]

    def __call__(self, g: str, perms: Sequence[Mapping[str, torch.Tensor] | torch.Tensor], part: int = 0
                 ) -> torch.Tensor:  # fmt: skip
        """``(len(perms), examples in slice part)`` float64: each example's change of the data term (mean over
        ``ts``) with each of ``perms`` (group -> index permutation, the groups of coordinate ``g``; a tensor: the
        permutation of group ``g``) applied to the identity."""
        perms = _as_changes(g, perms)
        cached = self._cached.get((g, part))
        self.hit = cached is not None and len(cached[0]) == len(perms) and all(
            a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(cached[0], perms))
        if self.hit:
            return cached[1]
        if g not in self.batched:
            # the first chunk: its first half one way, the rest the other, each timed per candidate (every value
            # computed once; the batched way, on half a chunk, is timed at a little more than a full chunk costs)
            half = len(perms) // 2
            start = time.perf_counter()
            try:
                first = self._batched(g, perms[:half], part) if half else None
            except (RuntimeError, NotImplementedError) as error:  # an operation vmap cannot batch
                logger.info("screening group %s one network per candidate: %s", g, error)
                first, half = None, 0
            middle = time.perf_counter()
            rest = self._one_by_one(g, perms[half:], part)
            end = time.perf_counter()
            per_candidate = [(middle - start) / half if half else math.inf, (end - middle) / (len(perms) - half)]
            self.batched[g] = per_candidate[0] <= per_candidate[1]
            self.seconds[g] = min(per_candidate) / rest.shape[1]
            values = (rest if first is None else torch.cat([first, rest])) - self.identity(part)
            self._cached[(g, part)] = (list(perms), values)
            return values
        way = self._batched if self.batched[g] else self._one_by_one
        return way(g, perms, part) - self.identity(part)

    def _batched(self, g: str, perms: Sequence[Mapping[str, torch.Tensor] | torch.Tensor], part: int = 0
                 ) -> torch.Tensor:  # fmt: skip
        chain = self._chain(g, _as_changes(g, perms))
        if chain is not None:
            return self._through_chain(chain, g, _as_changes(g, perms), part, batched=True)
        keys, permuted = self._changed(_as_changes(g, perms))
        x, y = self._part(part)
        chunk = self.chunk(part)
        out = torch.zeros(len(permuted), x.shape[0], dtype=torch.float64)
        with torch.no_grad():
            for t, w0 in zip(self.ts, self.base):
                fixed = {k: v for k, v in w0.items() if k not in keys}

                def loss(changed: dict[str, torch.Tensor], fixed=fixed) -> torch.Tensor:
                    return _example_loss(functional_call(self.model, {**fixed, **changed}, (x,)), y)

                for lo in range(0, len(permuted), chunk):
                    block = permuted[lo:lo + chunk]
                    stacked = {k: torch.stack([self._point(t, k, pb[k]) for pb in block]) for k in keys}
                    # dropout, if any: its own mask per candidate, as in one network per candidate
                    out[lo:lo + len(block)] += _vmap(loss, stacked)
        return out / len(self.ts)


def _vmap(loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], stacked: dict[str, torch.Tensor]) -> torch.Tensor:
    """``torch.func.vmap(loss, randomness="different")(stacked)``, without torch's warning that an operation has no
    batching rule (e.g. the ``as_strided_`` of ``adaptive_avg_pool2d`` on a channels-last input): vmap then loops
    over the candidates for that operation alone, and the screen times the batched way with that loop in it against
    one network per candidate (:meth:`_Screen.__call__`), so the warning tells a user nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule", category=UserWarning)  # fmt: skip
        return torch.func.vmap(loss, randomness="different")(stacked)


class _Meter:
    """Progress of the neighbourhood check in milliseconds of work: the work done is measured, the work left is
    estimated, so that a progress bar's rate (and its estimate of the time left) holds although a candidate of a
    late group costs a fraction of one of an early group (see :class:`_Screen`) and one of a large slice less per
    example than one of a small slice.

    A group's race is estimated before it runs from the cost per candidate and example measured on its first chunk,
    as if no candidate left it before ``screen_pairs`` (on the pairs of ``benchmarks/bench_verification.py`` the
    changes of most transpositions are within noise of each other and few leave early); after each slice the rest
    of the race is estimated again at the cost per candidate and example of that slice, and when the race ends its
    estimate is what it cost. A scored move is estimated at the measured cost of the held-out moves scored so far
    (before the first: one held-out evaluation, measured)."""

    def __init__(self, opts) -> None:
        self.opts, self.done, self.fixed = opts, 0.0, 0.0
        self.estimate: dict[str, float] = {}  # per raced coordinate: its race's milliseconds, estimated
        self.actual: dict[str, float] = {}  # per coordinate whose race ended: its milliseconds

    @property
    def total(self) -> float:
        """The work: done, and left (never below what is done, so that a bar never steps back)."""
        return max(self.done, self.fixed + sum(self.actual.get(g, ms) for g, ms in self.estimate.items()))

    def add(self, ms: float) -> None:
        self.done += ms
        total = self.total
        _tick(self.opts, "neighbourhood", int(min(self.done, total)), int(total))


def _screen_group(label: str, moves: MoveSet, candidates: torch.Tensor, screen: _Screen, opts,
                  gen: torch.Generator, meter: _Meter) -> tuple[list[tuple[Move, str]], list[int]]:
    """Moves of coordinate ``label`` to score (its transpositions, or its structured swaps with attention heads,
    more than ``n_swaps + n_control_swaps``): the ``n_swaps`` with the lowest screening estimate, the mean change
    of the data term over the screening set, and ``n_control_swaps`` drawn uniformly from the others; and the
    candidates in the race on each slice of the screening set.

    The estimates come from a race (successive elimination; Maron & Moore, "Hoeffding races", NIPS 1993): every
    candidate (``candidates``: :func:`_first_stage`) is evaluated on the first slice of the screening set
    (:func:`_slices`), and
    after each slice a candidate whose mean change over the examples seen so far, minus ``_RACE_Z`` standard
    errors, is above the ``n_swaps``-th lowest mean plus ``_RACE_Z`` standard errors leaves the race (no more than
    ``screen_pairs`` go on, those with the lowest means); those left at the end are ranked by their mean change over
    the whole set, as the exhaustive screen ranks them. The meter advances by the measured time of each chunk."""
    n_ranked, n_control = opts.n_swaps, opts.n_control_swaps
    spent = [0.0]
    rate = [1000.0 * screen.seconds.get(label, 0.0)]  # milliseconds per candidate and example, the last slice's

    def values(part: int, candidates: torch.Tensor) -> torch.Tensor:
        out, chunk, ms, evaluated = [], screen.chunk(part), 0.0, 0
        for lo in range(0, candidates.numel(), chunk):
            block = candidates[lo:lo + chunk].tolist()
            started = time.perf_counter()
            out.append(screen(label, [moves.changes(k) for k in block], part))
            took = 1000.0 * (time.perf_counter() - started)
            if not screen.hit:  # a chunk measured (and computed) before the race costs nothing now
                ms, evaluated = ms + took, evaluated + len(block) * out[-1].shape[1]
            spent[0] += took
            meter.add(took)
        if evaluated:
            rate[0] = ms / evaluated
        return torch.cat(out)

    raced = []
    s1 = torch.zeros(candidates.numel(), dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    seen = 0
    local = 0  # examples seen on this rank (under a process group each rank screens its share of every slice)
    for part in range(len(screen.slices)):
        raced.append(candidates.numel())
        d = values(part, candidates)
        sums = all_reduce_sum(torch.cat([d.sum(1), d.square().sum(1), torch.tensor([float(d.shape[1])])]))
        n = candidates.numel()
        s1, s2, seen, local = s1 + sums[:n], s2 + sums[n : 2 * n], seen + int(sums[-1]), local + d.shape[1]
        mean = s1 / seen
        if part == len(screen.slices) - 1:
            break
        se = ((s2 - seen * mean.square()).clamp_min(0.0) / max(1, seen - 1) / seen).sqrt()
        cutoff = (mean + _RACE_Z * se).kthvalue(min(n_ranked, mean.numel())).values
        alive = ((mean - _RACE_Z * se) <= cutoff).nonzero().flatten()
        alive = alive[torch.argsort(mean[alive], stable=True)[: opts.screen_pairs]]
        alive = alive.sort().values  # the candidates' order kept: a tie is broken as the exhaustive screen breaks it
        candidates, s1, s2 = candidates[alive], s1[alive], s2[alive]
        # the rest of the race, as if no more candidates left it, at this slice's cost
        meter.estimate[label] = spent[0] + rate[0] * candidates.numel() * (screen.local - local)
        meter.add(0.0)
    meter.actual[label] = spent[0]
    ranked = candidates[torch.argsort(mean, stable=True)][:n_ranked]
    chosen = torch.zeros(moves.count, dtype=torch.bool)
    chosen[ranked] = True
    rest = (~chosen).nonzero().flatten()
    control = rest[torch.randperm(rest.numel(), generator=gen)[:n_control]]
    moves_out = [(moves[k], "ranked") for k in ranked.tolist()] + [(moves[k], "control") for k in control.tolist()]
    return moves_out, raced


def _first_stage(first_order: torch.Tensor, linearised: torch.Tensor | None, opts) -> torch.Tensor:
    """Indices of the moves a coordinate races, in their order: where its group has a chain (``linearised``: every
    transposition's change linearised after the group's consumer, :meth:`_Screen.linearised`), the
    ``screen_pairs`` with the lowest; otherwise (``first_order``: every move's first-order estimate in the
    permutation, see :class:`~neuralign.verification._moves.MoveSet`) every one, or (more than
    ``16 * screen_pairs``) those with the largest first-order estimate in magnitude (that estimate ranks badly; it
    only bounds the work)."""
    if linearised is not None:
        return torch.argsort(linearised, stable=True)[: opts.screen_pairs].sort().values
    if first_order.numel() > 16 * opts.screen_pairs:
        return torch.argsort(first_order.abs(), descending=True, stable=True)[: 16 * opts.screen_pairs]
    return torch.arange(first_order.numel())


def _screening_set(ctx: _Context, opts, move_sets: Mapping[str, MoveSet]) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbourhood check's ``screen_examples`` screening examples: the held-out loader's after its scored
    batches, which the tests never score; where it has too few and some coordinate is screened, training
    batches, with a warning (they may hold the scored examples' images)."""
    prob = ctx.problem
    held = _examples(ctx.after, opts.screen_examples, prob.device) if ctx.after else None
    if held is not None and held[0].shape[0] >= opts.screen_examples:
        ctx.screen_source = "held-out"
        return held
    held_count = 0 if held is None else int(held[0].shape[0])  # all the examples after the scored batches
    ctx.screen_source = "training"
    if any(m.count > opts.n_swaps + opts.n_control_swaps for m in move_sets.values()):
        warnings.warn(f"the held-out loader has {held_count} examples after its {len(prob.value_set)} scored batches, "
                      f"fewer than screen_examples={opts.screen_examples}: the neighbourhood check screens on "
                      "training batches, which may hold the scored examples' images (a selection on them makes the "
                      "held-out test liberal); give the held-out loader more batches, or lower value_batches or "
                      "screen_examples", stacklevel=4)  # fmt: skip
    return _examples(prob.train_loader, opts.screen_examples, prob.device)


def _check_neighbourhood(ctx: _Context, opts, gen: torch.Generator) -> CheckResult:
    prob = ctx.problem
    # rank on examples the held-out test never scores (a selection on the scored examples, or on augmented views
    # of their images, would carry their noise into the test and make it liberal): the first-order estimate on
    # the ``gradient_batches`` training batches, the exact change on ``screen_examples`` examples of the held-out
    # loader after the scored batches (:func:`_heldout_batches`; training batches where it has too few), at the
    # value times
    move_sets = {c.label: MoveSet(ctx.spec, c) for c in ctx.coordinates}
    batches = prob._train_batches(prob.gradient_batches)
    ts = list(opts.value_ts)
    G = prob.gradient_at(ctx.x, ctx.identity, [b for b in batches for _ in ts], [t for _ in batches for t in ts])
    screen = _Screen(ctx, _screening_set(ctx, opts, move_sets), ts)
    # the work, in milliseconds estimated from a measured first step: each screening group's cost per candidate
    # and example on its first chunk, and each coordinate's scored moves at their cost measured on one held-out
    # batch (:meth:`_Context.move_costs`)
    meter = _Meter(opts)
    started = time.perf_counter()
    # per coordinate (a group, or the groups sharing one head permutation): its moves (transpositions, or the
    # structured swaps that keep heads whole) and their first-order estimates (sums over the member groups')
    estimates = {g: swap_estimates(G[g].double().cpu()) for g in ctx.spec.sizes}
    first_order = {label: m.estimates(estimates) for label, m in move_sets.items()}
    first = screen.share(0)  # this rank's examples of the first slice
    stages: dict[str, torch.Tensor] = {}  # per screened coordinate: the candidates entering its race
    costs: dict[str, tuple[float, float]] = {}  # per coordinate: its first scored move's milliseconds, a later one's
    for c in ctx.coordinates:
        label, moves = c.label, move_sets[c.label]
        if not moves.count:
            continue
        cycles = opts.n_cycles if not c.structured and ctx.spec.sizes[label] >= 3 else 0
        screened = moves.count > opts.n_swaps + opts.n_control_swaps
        if screened:
            stage = stages[label] = _first_stage(first_order[label], screen.linearised(moves), opts)
        # measured on a move the check will likely score (every move of a small group; else the best entrant),
        # whose values on the batch measured are kept for it
        costs[label] = ctx.move_costs(moves.changes(int(stage[0]) if screened else 0))
        meter.fixed += costs[label][0] + costs[label][1] * (min(moves.count, opts.n_swaps + opts.n_control_swaps)
                                                            + cycles - 1)  # fmt: skip
        if not screened:
            continue
        probe = stage[: screen.chunk(0)]
        screen(label, [moves.changes(k) for k in probe.tolist()], 0)  # measured (and cached) here
        examples = stage.numel() * first + min(stage.numel(), opts.screen_pairs) * (screen.local - first)
        meter.estimate[label] = 1000.0 * screen.seconds[label] * examples
    meter.fixed += 1000.0 * (time.perf_counter() - started)  # the probes: done, and part of the work
    meter.done = 1000.0 * (time.perf_counter() - started)
    _tick(opts, "neighbourhood", int(meter.done), int(meter.total), expected=meter.total / 1000.0)

    moves_by_group: dict[str, list[tuple[Move, str]]] = {}
    raced: dict[str, list[int]] = {}  # per screened coordinate: the candidates in the race on each slice
    coordinate = {c.label: c for c in ctx.coordinates}
    for c in ctx.coordinates:
        label, move_set = c.label, move_sets[c.label]
        if not move_set.count:
            continue
        if move_set.count <= opts.n_swaps + opts.n_control_swaps:
            moves = [(move_set[k], "all") for k in range(move_set.count)]
        else:
            moves, raced[label] = _screen_group(label, move_set, stages[label], screen, opts, gen, meter)
        n = ctx.spec.sizes[label] if not c.structured else 0
        if n >= 3:  # 3-cycles of a group without heads
            for _ in range(opts.n_cycles):
                moves.append((Move("3-cycle", tuple(torch.randperm(n, generator=gen)[:3].tolist())), "control"))
        moves_by_group[label] = moves
        if not c.structured:  # for the stability check's PAM: its swap search tries them first
            ctx.ranked[label] = [m.where for m, how in moves if m.kind == "swap" and how != "control"]
    total = sum(len(m) for m in moves_by_group.values())
    z = ctx.neighbourhood_z = bonferroni_quantile(opts.alpha, total, ctx.examples)
    # an improvement counts only if it is significantly larger than min_improvement of the objective: a change of
    # 1e-5 measured with a smaller standard error is real but no evidence against local optimality
    margin = ctx.margin(opts.min_improvement)
    per_group, verdicts, examples, improving_moves = {}, [], {}, {}
    total_sig = 0
    reg_only: list[list[Any]] = []  # moves among units no held-out example activates: reported apart, never counted
    for g, moves in moves_by_group.items():
        sig = {"all": 0, "ranked": 0, "control": 0}
        tested = {"all": 0, "ranked": 0, "control": 0}
        neg = apart = early = 0
        best = (math.inf, None)
        found = []
        for k, (move, how) in enumerate(moves):
            started = time.perf_counter()
            change = ctx.delta(move_changes(ctx.spec, coordinate[g], move), z, margin)
            took = 1000.0 * (time.perf_counter() - started)
            early += change.examples < ctx.examples  # stopped for futility at a look
            meter.fixed += took - costs[g][0 if k == 0 else 1]  # this move's estimate replaced by its cost
            meter.add(took)
            if change.regulariser_only:
                apart += 1
                reg_only.append([g, move.describe().split(" ")[0], list(move.where), change.regulariser, how])
                continue
            tested[how] += 1
            neg += change.change < 0
            if change.significant(z, margin):
                sig[how] += 1
                found.append([move.describe().split(" ")[0], list(move.where), change.change, how, change.se,
                              change.t])  # fmt: skip
            if change.change < best[0]:
                best = (change.change, move)
        n_sig = sum(sig.values())
        lo, hi = wilson_interval(n_sig, sum(tested.values()))
        total_sig += n_sig
        v = "fail" if n_sig else ("pass" if sum(tested.values()) else "inconclusive")
        verdicts.append(v)
        exhaustive = any(how == "all" for _, how in moves)
        row = {"transpositions": move_sets[g].count, "tested": sum(tested.values()), "exhaustive": exhaustive,
               "improving": n_sig, "improving_fraction_ci": [lo, hi], "mean_below_zero": neg,
               "regulariser_only": apart, "stopped_early": early, "best_change": best[0], "verdict": v}  # fmt: skip
        if not exhaustive:
            row.update(raced=raced[g], ranked_tested=tested["ranked"], ranked_improving=sig["ranked"],
                       control_tested=tested["control"], control_improving=sig["control"])  # fmt: skip
        per_group[g] = row
        examples[g] = best[1]
        improving_moves[g] = sorted(found, key=lambda r: r[2])
    if int(min(meter.done, meter.total)) < int(meter.total):  # estimates summed in another order: close the bar
        meter.add(meter.total - meter.done)
    exhaustive = sum(r["exhaustive"] for r in per_group.values())
    summary = (
        f"{total_sig}/{total - len(reg_only)} transpositions improve the curve objective's data term significantly "
        f"by more than {opts.min_improvement:g} of the objective (family-wise alpha {opts.alpha:g}); per group the "
        f"{opts.n_swaps} best of all transpositions on a screening set "
        f"and {opts.n_control_swaps} random others as a control were scored "
        f"({exhaustive}/{len(per_group)} groups small enough to test every transposition)"
    )
    controls = [sum(r.get(k, 0) for r in per_group.values()) for k in ("control_improving", "control_tested")]
    if controls[1]:
        summary += f"; {controls[0]}/{controls[1]} random control swaps improve it significantly"
    if reg_only:
        summary += (f"; {len(reg_only)} moves change only the weight-decay term (units no held-out example "
                    f"activates; by {_span(m[3] for m in reg_only)}): reported apart, not tested")  # fmt: skip
    stopped = sum(r["stopped_early"] for r in per_group.values())
    if stopped:
        summary += (f"; {stopped} moves stopped early, significantly no better than the margin on a part of the "
                    "held-out examples")  # fmt: skip
    data, penalty = ctx.base_losses()
    details = {"per_group": per_group, "best_move": {g: m.describe() for g, m in examples.items() if m is not None},
               "improving_moves": improving_moves, "base_objective": float(data.mean()) + penalty,
               "regulariser_only_moves": reg_only,
               "first_order_best": {g: float(e.min()) for g, e in first_order.items() if e.numel()}}  # fmt: skip
    if total_sig:
        # where moves improve: the fixed curve's held-out data term at the scoring times and at its end points (a
        # curve whose value there is far above the end points' (a barrier, or a poorly fitted curve) can be
        # improved by moves that a longer fit undoes: measured on the demo, see verify_alignment's Notes)
        along = details["curve_data_term"] = {"value_ts": float(data.mean()), "end_a": ctx.data_term(0.0),
                                              "end_b": ctx.data_term(1.0)}  # fmt: skip
        summary += (f"; the fixed curve's held-out data term at value_ts is {along['value_ts']:.3g}, against "
                    f"{along['end_a']:.3g} and {along['end_b']:.3g} at its end points")  # fmt: skip
    if opts.refit_epochs and total_sig:
        details["refit"] = _refit_best(ctx, opts, per_group, {g: (coordinate[g], m) for g, m in examples.items()})
    thresholds = {"family_alpha": opts.alpha, "z": z, "min_improvement": opts.min_improvement,
                  "margin": margin, "ranked_swaps_per_group": opts.n_swaps,
                  "control_swaps_per_group": opts.n_control_swaps, "cycles_per_group": opts.n_cycles,
                  "screen_examples": opts.screen_examples, "screen_pairs": opts.screen_pairs,
                  "screen_source": ctx.screen_source, "screened_examples": screen.examples,
                  "heldout_examples": ctx.examples}  # fmt: skip
    return CheckResult("neighbourhood", _overall(verdicts), summary, thresholds, details)


def _refit_best(ctx: _Context, opts, per_group, examples) -> dict[str, Any]:
    """Re-fit the curve briefly after the best improving move of each failing coordinate (``examples``: label ->
    (coordinate, move)), and after no move."""
    prob = ctx.problem
    out = {}
    model = opts.model

    def refit_value(changes):
        perms = {**identity_permutation(ctx.spec), **changes}
        pb = apply_permutation(prob.wb, prob.spec, perms)
        theta = prob.control_point(ctx.x, perms)
        start = Bezier([prob.wa, theta, pb], trainable=(False, True, False))
        fitted = fit_curve(
            model, prob.wa, pb, opts.train_loader, curve=start, epochs=opts.refit_epochs,
            weight_decay=opts.weight_decay, generator=opts.seed,
            max_batches=opts.max_batches,
        )  # fmt: skip
        x = [prob.offset(fitted.curve.points[1], perms)]
        return prob.value(x, ctx.mats(changes))

    reference = refit_value({})
    for g, row in per_group.items():
        if row["improving"]:
            c, move = examples[g]
            out[g] = {"move": move.describe(), "after_refit": refit_value(move_changes(ctx.spec, c, move)),
                      "reference_after_refit": reference}
    return out


def _check_gradient(ctx: _Context, opts, gen: torch.Generator, scale: float = 1.0) -> CheckResult:
    p64 = ctx.problem.to(torch.float64)
    # A few examples at t = 1/2: the fewer ReLU/max-pool units the data activates, the fewer kinks a step crosses,
    # and the wider the range of steps over which the remainder of a piecewise-smooth network is second order.
    k = opts.gradient_check_examples
    # plain (x, y) pairs: under a process group each rank tests the gradient on its own examples (no reduction)
    batches = [(b[0][:k], b[1][:k]) for b in p64.value_set[:1]]
    ts = [0.5]
    x = [ctx.x[0].double()]
    ident = {g: m.double() for g, m in ctx.identity.items()}
    direction = {}
    for g, n in ctx.spec.sizes.items():
        mix = torch.zeros(n, n, dtype=torch.float64)
        weights = torch.rand(3, generator=gen, dtype=torch.float64)
        weights /= weights.sum()
        for w in weights:
            mix += w * perm_to_matrix(torch.randperm(n, generator=gen), dtype=torch.float64)
        direction[g] = (mix - ident[g]).to(ident[g].device)  # tangent to the Birkhoff polytope at the identity
    G = p64.gradient_at(x, ident, batches, ts)
    deriv = scale * float(sum((G[g] * direction[g]).sum() for g in G))

    def along(eps: float) -> float:
        with torch.no_grad():
            return float(p64.objective(x, {g: ident[g] + eps * direction[g] for g in ident}, batches, ts))

    res = taylor_test(along, deriv, min_slope=opts.min_slope, max_relative_error=opts.max_relative_error)
    _tick(opts, "gradient", 1, 1)
    message = res.message
    # the objective runs in train mode: a dropout still on (the problem switches dropout layers off, not the
    # attention's own) draws new masks at every evaluation, so the remainder is noise
    rates = sorted({float(getattr(m, "p", getattr(m, "dropout", 0.0))) for m in p64.model.modules() if m.training
                    and isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention))} - {0.0})  # fmt: skip
    if res.verdict != "pass" and rates:
        message += (f"; the model has dropout (p = {', '.join(f'{r:g}' for r in rates)}), which draws new masks at "
                    "every evaluation of the objective: the Taylor test cannot be decided under dropout")  # fmt: skip
    return CheckResult(
        "gradient", res.verdict, message,
        {"min_slope": opts.min_slope, "max_relative_error": opts.max_relative_error},
        {"taylor": res.to_dict(), "directional_derivative": deriv},
    )  # fmt: skip


def _length(loader: Iterable) -> int | None:
    """``len(loader)``, or None for a loader that gives none (an iterable without ``__len__``, or whose
    ``__len__`` raises, as a ``DataLoader`` over an ``IterableDataset`` without one does)."""
    try:
        return int(len(loader))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a length is only a progress count here
        return None


def _check_alignment(model, point_a, point_b, perms, spec, opts) -> CheckResult:
    loader = opts.align_loader
    if loader is None:
        return CheckResult("alignment", "inconclusive", "no `align_loader` given: the correlation objective was not "
                           "computed")  # fmt: skip
    missing = [k for k, _ in model.named_buffers() if k not in point_a or k not in point_b]
    if missing:
        return CheckResult("alignment", "inconclusive", f"the end points lack batch-norm statistics (`{missing[0]}`)")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a.load_state_dict(dict(point_a))
    b.load_state_dict(dict(point_b))
    # progress: a step per batch of the correlation's data pass (most of the check's work), one for weight matching
    batches = _length(loader) or 0  # without a length the data pass is one step
    total = max(1, batches) + 1

    def on_batch(record: dict[str, Any]) -> None:
        if batches and record.get("step"):
            _tick(opts, "alignment", min(int(record["step"]), total - 1), total)

    try:
        corr = align(a, b, loader, spec=spec, method="correlation", callback=on_batch)
    except ValueError as error:
        if "yielded no batch" in str(error):  # an empty loader without a length (one with is refused at the start)
            raise ValueError("`align_loader` yielded no batches: the alignment check computes the correlation "
                             "objective on them") from None
        raise
    if not batches:
        _tick(opts, "alignment", 1, total)
    weight = align(a, b, method="weight", spec=spec, generator=opts.seed)
    _tick(opts, "alignment", total, total)
    per_group = {}
    for g in spec.groups:
        C = corr.similarity[g]
        n = C.shape[0]
        rows = torch.arange(n)
        opt = solve_assignment(C, maximize=True, certificate=True)
        ours = float(C[rows, perms[g].cpu()].sum())
        theirs = float(C[rows, weight.perms[g].cpu()].sum())
        gap = (opt.fun - ours) / max(1.0, abs(opt.fun))
        per_group[g] = {
            "objective": ours,
            "optimum": opt.fun,
            "relative_gap": gap,
            "align_objective": float(C[rows, corr.perms[g].cpu()].sum()),
            "dual_gap": opt.duality_gap(),
            "weight_matching_objective": theirs,
            "distance_to_weight_matching": int((perms[g].cpu() != weight.perms[g].cpu()).sum()) / n,
        }
    # the groups sharing a head permutation: against the structured optimum of their summed objective (exact for
    # correlations, match_heads), which no per-group assignment certificate covers
    blocks = [c for c in coordinates(spec) if c.structured]
    if blocks:
        best = match_heads(spec, corr.similarity, {g: p.cpu() for g, p in perms.items()})
        for c in blocks:
            scored = [g for g in c.groups if g in spec.heads or spec.perm_to_axes.get(g)]
            values = {g: float(corr.similarity[g][torch.arange(spec.sizes[g]), best[g]].sum()) for g in scored}
            optimum, ours = sum(values.values()), sum(per_group[g]["objective"] for g in scored)
            gap = (optimum - ours) / max(1.0, abs(optimum))
            for g in c.groups:
                per_group[g].update(optimum=values.get(g, float("nan")), relative_gap=gap, dual_gap=float("nan"),
                                    structured_optimum_of=c.label)  # fmt: skip
    # align() itself leaves the optimum where the data cannot tell units apart (units whose exchange changes the
    # matched similarity by at most 1e-4 of the group's largest, dead units): it matches those by weights. So a
    # group without heads passes at its optimum or at align()'s own correlation alignment on the same data, each
    # within the tolerance (the groups sharing a head permutation: at their structured optimum, which align() finds)
    tol = opts.alignment_tol
    structured = {g for c in blocks for g in c.groups}
    verdicts = {}
    for g, r in per_group.items():
        if g not in structured:
            r["relative_gap_to_align"] = (r["align_objective"] - r["objective"]) / max(1.0, abs(r["optimum"]))
        verdicts[g] = r["relative_gap"] <= tol or r.get("relative_gap_to_align", math.inf) <= tol
    worst = max((r["relative_gap"] for r in per_group.values()), default=0.0)
    verdict = "pass" if all(verdicts.values()) else "fail"
    ours_total = sum(r["objective"] for r in per_group.values())
    weight_total = sum(r["weight_matching_objective"] for r in per_group.values())
    summary = (
        f"correlation objective within {worst:.2e} (relative) of each group's assignment optimum "
        f"(dual certificates{'; groups sharing a head permutation: of their structured optimum' if blocks else ''}); "
        f"weight matching's permutation reaches {weight_total:.4g} vs {ours_total:.4g}"
    )
    by_rule = [g for g, r in per_group.items() if r["relative_gap"] > tol and verdicts[g]]
    if by_rule:
        summary += (f"; {len(by_rule)} groups ({', '.join(by_rule[:3])}{', ...' if len(by_rule) > 3 else ''}) depart "
                    "from the optimum only as align() does, where the data cannot tell units apart (ties, dead "
                    "units matched by weights): they match align()'s own correlation alignment")  # fmt: skip
    failing = [g for g, ok in verdicts.items() if not ok]
    if failing:
        summary += (f"; below both the optimum and align()'s own correlation alignment: "
                    f"{', '.join(failing[:3])}{', ...' if len(failing) > 3 else ''}")  # fmt: skip
    return CheckResult("alignment", verdict, summary, {"relative_gap": tol}, {"per_group": per_group})



@dataclass(frozen=True)
class VerificationOptions(Options):
    """The options of :func:`verify_alignment`, defined and validated once (the study's ``verification``
    settings are this object). Every check has its own group of fields; see :func:`verify_alignment` for what each
    check does with them.

    Attributes
    ----------
    fit_epochs : int
        Epochs of the curve fitted when none is given (>= 0; default 2).
    lam : float
        PAM's proximal step in the stability check and the default certificate threshold (> 0; default 1000).
    backtrack : bool
        PAM's linearised steps are backtracked (default True).
    stability_iters, stability_x_epochs : int
        PAM's outer iterations (>= 1) and curve epochs per x-step (>= 1, as PAM requires) in the stability check
        (defaults 2, 1).
    swap_trials : int
        Transpositions PAM's swap local search tries per group after each P-step in the stability check (with
        attention heads: structured swaps per block of groups sharing a head permutation) (>= 0; default 16).
    identity_start : bool
        PAM also runs from the identity in the stability check (default True): does it move toward the
        alignment? (A study's PAM Unaligned curve is PAM from the identity with the study's own budget.)
    random_starts : int
        PAM runs from random permutations besides the alignment and the identity (>= 0; default 1).
    reassign_threshold : float
        The largest fraction of a group's units PAM from the alignment may reassign per iteration, in (0, 1)
        (default 0.05).
    certificate_lam : float, optional
        Threshold of the certificate check (> 0; default ``lam``).
    certificate_steps : int
        Step sizes tried between the certified step and ``certificate_lam`` (>= 1; default 8).
    n_swaps, n_control_swaps, n_cycles : int
        Neighbourhood check: best-ranked transpositions (>= 1), random control transpositions (>= 0) and random
        3-cycles (>= 0) scored per group (defaults 8, 4, 0); with attention heads, structured swaps per block of
        groups sharing a head permutation, and no 3-cycles there.
    screen_examples, screen_pairs : int
        The screening set's size in examples, and the most transpositions per group in its race: where the group
        has a chain (its producer, channel-wise layers and consumer: :mod:`~neuralign._chain`) those
        with the lowest linearised change over the screening set enter it, otherwise no more go on after its first
        32 examples (those with the lowest changes there) (>= 1; defaults 256, 512).
    refit_epochs : int
        Epochs of the curve re-fitted around the best improving move of a failing group (>= 0; default 0).
    alpha : float
        Family-wise significance level of the certificate and neighbourhood checks, in (0, 1) (default 0.05).
    min_improvement : float
        The smallest improvement, as a fraction of the curve objective, that counts (>= 0; default 1e-3).
    value_batches : int
        Held-out batches scoring every move (>= 2; default 8); the paired tests are per example of them.
    value_ts : tuple of float
        Times in [0, 1] at which every held-out batch is scored (default 0.25, 0.5, 0.75).
    gradient_batches : int
        Training batches of each gradient estimate (>= 1; default 4).
    gradient_check_examples : int
        Examples of the gradient check's Taylor test (>= 1; default 8).
    min_slope : float
        Log-log slope in (1, 2] that the Taylor remainder must reach to pass (default 1.8).
    max_relative_error : float
        Gradient error, relative to the derivative, that fails the gradient check (> 0; default 1e-3).
    alignment_tol : float
        Relative gap to each group's assignment optimum accepted by the alignment check (>= 0; default 1e-9).
    weight_decay : float
        :math:`\\lambda_{wd}` of the curve objective (>= 0; default 5e-4).

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong kind or out of its range (names it).
    """

    fit_epochs: int = 2
    lam: float = 1000.0
    backtrack: bool = True
    stability_iters: int = 2
    stability_x_epochs: int = 1
    swap_trials: int = 16
    identity_start: bool = True
    random_starts: int = 1
    reassign_threshold: float = 0.05
    certificate_lam: float | None = None
    certificate_steps: int = 8
    n_swaps: int = 8
    n_control_swaps: int = 4
    n_cycles: int = 0
    screen_examples: int = 256
    screen_pairs: int = 512
    refit_epochs: int = 0
    alpha: float = 0.05
    min_improvement: float = 1e-3
    value_batches: int = 8
    value_ts: tuple[float, ...] = (0.25, 0.5, 0.75)
    gradient_batches: int = 4
    gradient_check_examples: int = 8
    min_slope: float = 1.8
    max_relative_error: float = 1e-3
    alignment_tol: float = 1e-9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        for name, least in (("fit_epochs", 0), ("stability_iters", 1), ("stability_x_epochs", 1),
                            ("swap_trials", 0), ("random_starts", 0), ("certificate_steps", 1), ("n_swaps", 1),
                            ("n_control_swaps", 0), ("n_cycles", 0), ("screen_examples", 1), ("screen_pairs", 1),
                            ("refit_epochs", 0), ("value_batches", 2), ("gradient_batches", 1),
                            ("gradient_check_examples", 1)):  # fmt: skip
            self._check(name, check_int, minimum=least)
        for name in ("alpha", "reassign_threshold"):
            self._check(name, check_real, low=0.0, high=1.0, low_open=True, high_open=True)
        for name in ("min_improvement", "alignment_tol", "weight_decay"):
            self._check(name, check_real, low=0.0)
        for name in ("lam", "max_relative_error"):
            self._check(name, check_real, low=0.0, low_open=True)
        self._check("certificate_lam", check_real, low=0.0, low_open=True, allow_none=True)
        self._check("backtrack", check_bool)
        self._check("identity_start", check_bool)
        self._check("min_slope", check_real, low=1.0, high=2.0, low_open=True)
        ts = self.value_ts if isinstance(self.value_ts, (tuple, list)) else (self.value_ts,)
        if not ts:
            raise ValueError("`value_ts` must be a non-empty sequence of times in [0, 1], got ()")
        object.__setattr__(self, "value_ts", tuple(check_real(v, "value_ts", low=0.0, high=1.0) for v in ts))


# the options recorded in a report's config, in this order (the scalar ones)
_REPORTED_OPTIONS = (
    "lam", "backtrack", "stability_iters", "stability_x_epochs", "identity_start", "random_starts", "swap_trials",
    "reassign_threshold", "certificate_lam", "n_swaps", "n_control_swaps", "n_cycles", "screen_examples",
    "screen_pairs", "refit_epochs", "alpha", "min_improvement", "certificate_steps", "value_batches",
    "gradient_batches", "gradient_check_examples", "min_slope", "max_relative_error", "alignment_tol", "weight_decay",
)  # fmt: skip


@dataclass(frozen=True)
class _Run:
    """One run of :func:`verify_alignment`: its options (readable as attributes of the run) and what the run
    derived from its inputs."""

    options: VerificationOptions
    seed: int
    certificate_lam: float
    heldout_batches: int
    heldout_loader: Any
    align_loader: Any
    train_loader: Any
    model: nn.Module
    max_batches: int | None
    callback: Callable[[dict[str, Any]], Any] | None
    lp_max_size: int = 256

    def __getattr__(self, name: str) -> Any:
        return getattr(self.options, name)


def verify_alignment(
    model: nn.Module,
    point_a: Mapping[str, torch.Tensor],
    point_b: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    train_loader: Iterable,
    *,
    curve: Bezier | None = None,
    checks: Sequence[str] = CHECKS,
    spec: PermutationSpec | None = None,
    heldout_loader: Iterable | None = None,
    align_loader: Iterable | None = None,
    options: VerificationOptions | None = None,
    max_batches: int | None = None,
    generator: torch.Generator | int | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    **option_overrides: Any,
) -> VerificationReport:
    """Check whether ``perms`` is a local optimum of the joint curve objective, with checks that can fail.

    The joint problem is :math:`\\min_{\\theta, P} F(\\theta, P)` of :func:`~neuralign.curves.fit_curve_pam`. In
    the frame of the aligned end point :math:`w_B' = P_{\\text{perms}} w_B`, the candidate is :math:`P = I` with
    the fitted control point :math:`\\theta^*`. The checks:

    1. ``stability``: PAM started at ``perms`` (from the fitted curve) reassigns at most ``reassign_threshold`` of
       any group's units per outer iteration, or the moves it makes beyond that are no significant improvement:
       PAM with ``backtrack`` keeps a linearised P-step that lowers the objective on the held-out batches at all,
       so a move beyond the threshold (in a group of fewer than ``2 / reassign_threshold`` units one transposition
       is) counts against stability only if it improves the held-out objective significantly by more than
       ``min_improvement`` of it, by check 3's paired test on the same fixed curve (the move from ``perms`` to
       PAM's permutation after that iteration, per group; Bonferroni over those moves, and at least the
       neighbourhood check's critical value where it ran, so that a move both checks score is flagged by both or by
       neither). PAM's swap local search
       (``swap_trials``) tries the transpositions the neighbourhood check ranks best first (that check runs
       first when both run), so that a transposition the neighbourhood check finds is one PAM tries: with random
       trials alone PAM missed the improving moves the neighbourhood check flagged on a CIFAR-10 pair (README).
       Stability and the neighbourhood check therefore cannot disagree on the same move (they can on a pair: PAM
       keeps a move its own test on the held-out batches accepts, which the per-example test may not find
       significant, while the neighbourhood check flags another); a failure names the move
       (group, units, iteration), its change, standard error and t. Also PAM from the identity
       (``identity_start``) and from ``random_starts`` random starts, with the Hamming distance to ``perms`` over
       the iterations (does PAM move toward the alignment?).
    2. ``certificate``: with :math:`G = \\nabla_P F(\\theta^*, I)` on the held-out batches, the largest proximal
       step :math:`\\lambda^*` for which :math:`I` stays the minimiser of the linearised P-step
       :math:`\\min_Q \\langle G, Q\\rangle + \\frac{1}{2\\lambda}\\|Q - I\\|^2`, per group
       (:func:`~neuralign.optim.proximal_step_bound`, exact by Dinkelbach's method). If
       :math:`\\lambda^* \\ge` ``certificate_lam`` the alignment is a fixed point of PAM's P-step: pass.
       Otherwise the P-steps for ``certificate_steps`` step sizes between :math:`\\lambda^*` and
       ``certificate_lam`` are scored on the held-out batches: fail if one improves the objective significantly
       by more than ``min_improvement`` of it, as in check 3 (a linearised P-step finds a better permutation),
       pass otherwise (no first-order move is a significant improvement, so a backtracked PAM stays). The assignment at
       ``certificate_lam`` is cross-checked against its Birkhoff-polytope LP relaxation (cvxpy), whose optimum is a
       vertex: the objectives must agree.
    3. ``neighbourhood``: all transpositions :math:`T_{ij}` of each group are ranked by a cheap estimate of their
       effect, the exact change of the curve objective on a screening set (``screen_examples`` examples of
       ``heldout_loader`` after the scored batches, at ``value_ts``: not the scored examples, nor augmented views
       of their images, so that the selection does not bias the held-out test; training batches, with a warning,
       where the loader has too few; under a process group each rank screens its share and the race sums), found
       by a race (successive elimination; Maron & Moore, "Hoeffding races", NIPS 1993): every transposition on
       the first 32 examples, then on slices that double (32, 64, 128 examples), a transposition leaving the race
       once its mean change minus 3 standard errors is above the ``n_swaps``-th best mean plus 3 standard errors,
       and no more than ``screen_pairs`` going on after the first slice (those with the lowest changes there; at
       most ``16 * screen_pairs`` transpositions start, those with the largest first-order estimate
       :math:`|\\langle G, T_{ij} - I\\rangle|`: :func:`swap_estimates`, ``G`` on ``gradient_batches`` training
       batches). Where the group's producer, channel-wise layers and consumer form a chain, the race's entrants
       are instead the ``screen_pairs`` transpositions with the lowest change over the whole screening set to
       first order in the layers after the consumer only (the producer, the layers between and the consumer
       exact; all transpositions in one pass: :meth:`~neuralign._chain.Chain.linearised`; how
       well it ranks against the exact screen: ``benchmarks/bench_verification.py``). The screen evaluates many
       transpositions per call: only the layers that produce and consume the group differ between them, so they
       are stacked and the network is run under :func:`torch.func.vmap`, the layers before the group once per
       chunk (or one network per transposition where that measures faster on the group's first chunk). The
       ``n_swaps`` best-ranked are scored by the change of
       the curve objective on the held-out examples with the curve fixed, and ``n_control_swaps`` drawn at random
       from the rest as a control of the ranking (a group with no more transpositions than both together is
       tested exhaustively), plus ``n_cycles`` random 3-cycles. A move improves significantly if the mean change
       of the objective's data term (its cross-entropy, see Notes) plus :math:`z` standard errors (paired over the
       held-out examples) is below :math:`-` ``min_improvement`` times the objective (a one-sided test of a
       minimum effect: a real but negligible change is no evidence against local optimality), with :math:`z` the
       one-sided Bonferroni quantile of Student's t (held-out examples minus one degrees of freedom) for
       family-wise level ``alpha`` over all moves scored on the held-out examples. Fail if any move does, pass
       otherwise (the improving moves, split into ranked and control, the smallest change and the 95% Wilson
       interval of the improving fraction are reported). With ``refit_epochs``, the best improving move of each
       failing group is re-scored after a short re-fit of the curve. The first-order estimate alone does not rank
       well: on the 64-16-16-10 MLP of ``tests/verification/test_local.py`` with 4 of 16 units swapped in pairs, its
       correlation with the true change over all 120 transpositions was 0.03 and the two swaps that undo the
       damage ranked 114th and 116th of 120 (a swap crosses a barrier of the relaxation: see Notes). Each move's
       held-out test is sequential: after a quarter and a half of the held-out batches, a move whose change is
       significantly no better than the margin (2 standard errors above it) stops (see :meth:`_Context.delta`;
       the family-wise level holds, ``stopped_early`` counts them per group).
    4. ``gradient``: a Taylor test of :math:`\\nabla_P F` (float64) along a random direction into the Birkhoff
       polytope (:func:`~neuralign.verification.taylor_test`): pass if the remainder decays at second order
       (log-log slope >= ``min_slope``) over the smallest steps where it is above float noise; fail if it does not
       and its first-order part exceeds ``max_relative_error`` of the derivative; inconclusive otherwise (a ReLU or
       max-pool kink within the smallest resolvable step cannot be told from a tiny gradient error).
    5. ``alignment``: the correlation objective of ``perms`` against each group's assignment optimum (with a dual
       certificate; the groups sharing a head permutation together against their structured optimum,
       :func:`~neuralign.alignment.heads.match_heads`, without a certificate) and against weight matching's
       permutation (needs ``align_loader`` and full state dicts). A group passes within ``alignment_tol``
       (relative) of its optimum, or of :func:`~neuralign.alignment.align`'s own correlation alignment on the
       same data: align() matches by weights the units the data cannot tell apart (dead units, and ties: an
       exchange that changes the matched correlation by at most 1e-4 of the group's largest), which can leave the
       optimum by that much (measured: 1.1e-6 relative on a 16-unit group whose 4 units fire on one example).

    Notes
    -----
    First-order evidence (the certificate, and linearised PAM steps without ``swap_trials``) cannot see an
    improvement that lies behind a barrier of the relaxation: on the segment :math:`(1-s)I + sQ` the weights of two
    units are averaged, which is worse than either, so :math:`\\partial_s F` at :math:`s = 0` can be positive although
    :math:`F(Q) < F(I)`. Measured on a 64-16-16-10 MLP on the shipped digits (``tests/verification/test_local.py``):
    with 4 of 16 units of one group swapped in pairs, the certificate still passes (:math:`\\lambda^*` 9.1 against
    13.0 at the planted optimum) while the neighbourhood test finds 12 significantly improving swaps and PAM with a
    swap local search reassigns 12.5% of the group; with 8 of 16 swapped, the certificate fails too
    (:math:`\\lambda^*` 3.8). PAM stability without local search is therefore weak evidence of local optimality.

    With attention heads in ``spec`` (``spec.heads``) the feasible permutations are the structured ones that keep
    heads whole (Verma & Elbayad 2024, arXiv:2402.04051, Sec. 3), and every check moves only among them: the groups
    sharing one head permutation (:func:`~neuralign.alignment.heads.head_blocks`) are one coordinate, reported under
    their names joined by ``+``. PAM (check 1) takes structured P-steps and swaps
    (:meth:`~neuralign.curves.CurvePermutationProblem.assign`), and a reassignment beyond the threshold is scored
    as the move of the whole coordinate. The certificate's :math:`\\lambda^*` and P-steps are over the structured
    set (every assignment is the problem's ``assign``); its LP cross-check relaxes all permutations of a group (the
    Birkhoff polytope), so the groups with heads are not covered by it: they are listed in the check's
    ``lp_uncovered_groups`` and its summary. The neighbourhood check scores structured swaps instead of
    transpositions: the exchange of two whole head blocks in every group of the coordinate, or the transposition
    of two units inside one head block in every group sharing that inside permutation (``Heads.inner``); their
    first-order estimate is the sum of the member groups' (:func:`swap_estimates`), the random control is drawn
    among them, and no 3-cycles are drawn for a head block. The gradient check's direction lies in each flat
    group's Birkhoff polytope (a relaxed point, no permutation is evaluated).

    The paired tests (checks 1-3) are per held-out example, not per batch: the curve objective is a mean over
    examples at the fixed times ``value_ts`` plus the weight-decay term, and the change of its data term under a
    move is, per example, the difference of its loss (averaged over ``value_ts``) with and without the move. The
    weight-decay term is tested apart from the data, because the data cannot test it: its change is exact and the
    same for every example, so added to each example's difference it leaves the standard error unchanged, and a
    move that changes nothing else (units that no held-out example activates, whose exchange leaves every
    example's loss bit for bit the same) had standard error 0 and t = :math:`-\\infty`, a random swap of dead units
    "infinitely significant". Such a move is reported apart (the checks' ``regulariser_only`` counts, the
    neighbourhood's ``regulariser_only_moves`` with each change), never flagged and never counted against
    stability or the control; every other move is reported with its data-term change, standard error and t and
    the regulariser's change beside them. The per-example differences are independent draws when the examples
    are: the times are a fixed grid, not drawn; nothing random is shared between the two evaluations (same
    examples, same curve, no dropout or augmentation in ``heldout_loader``); the held-out examples are a sample
    of the training distribution. The one dependence left
    is batch norm, which the objective runs on each held-out batch's statistics: an example's loss depends on its
    batch, so examples of one batch share a term. Measured on the 32-unit batch-norm MLP of the tests (256-example
    batches, every move scored over 4 generator seeds at the planted permutation), the variance of the per-batch
    means of the differences was 0.85-1.18 (median over the moves) of what independent examples predict: the
    shared term is negligible at these batch sizes; with small held-out batches it is not, and the test would be
    too liberal. With :math:`N` examples the test has :math:`N - 1` degrees of freedom (:math:`z \\approx 2.9` for
    12 moves at 5%, against 5 with 6 batches).

    A pass of the neighbourhood check means that no scored move improves the objective by more than the margin at
    the power the held-out examples give, not that none does. Measured (the slow tests of
    ``tests/verification/test_local.py``, 10 seeds each drawing its own held-out and screening examples from the
    digits' training images, defaults, curve fixed): on a batch-norm MLP 64-32-32-10 with 10 of 32 units
    mis-assigned, 5 swapped pairs and 10 shuffled units are flagged in 10 of 10 seeds (paired per batch: 10
    shuffled units in 5 of 10; paired per example with the screen on augmented training batches, 8 of 10); on a
    64-48 MLP without batch norm the planted permutation passes in 10 of 10, no random control swap is flagged.
    A fail means a move improves the objective of the fixed curve, which is not always a defect of the alignment:
    on the 32-unit MLP of the slow tests, a curve fitted for 2 epochs between a network and a relabelled copy of
    itself, some transpositions of the planted
    permutation improve the held-out objective by 4-5% of it (t = -4 to -6), and the same moves improve the
    objective on the test split, never used for screening or scoring (-0.0155 ± 0.0074 against -0.0168 ±
    0.0042): the planted permutation is not a local optimum of the objective with that curve fixed. Re-fitting
    the curve around the move (``refit_epochs``) tells the two apart. The same holds for random control swaps: in
    one ``neuralign demo`` run (``python benchmarks/bench_verification.py --run FOLDER``) 5 of 32 control swaps
    were flagged; the run's curve had a held-out data term of 0.105 at :math:`t = 0.5` against 0.005-0.009 at
    :math:`t = 0, 0.25, 0.75, 1`, every flagged move (the 5 controls, the best of 4 groups) lowered the test split
    too (by about half as much), the batch-norm coupling did not inflate the test (held-out batch means varied
    0.21-1.08 times as independent examples predict), and after fitting that curve 6 more epochs (data term 0.0053
    at :math:`t = 0.5`) all 9 moves raised the objective. That curve is a noisy last iterate of SGD at a learning
    rate still 0.1 (the preset's schedule halves it every 20 epochs, it fits 6): fitted with the run's seeds and
    Garipov's decaying schedule the curve has 0.0080 at :math:`t = 0.5`, and the same neighbourhood check passes
    (0 of 96 moves, 0 of 32 controls). A failing neighbourhood check therefore reports the curve's held-out data
    term at ``value_ts`` and at its end points (``curve_data_term``, in its details only where it fails).

    Parameters
    ----------
    model : nn.Module
        The architecture (never modified).
    point_a, point_b : dict str -> Tensor
        The two networks' state dicts (B unaligned).
    perms : dict str -> LongTensor
        The permutation to verify (maps B onto A, as :func:`~neuralign.alignment.align` returns).
    train_loader : iterable
        Training batches (curve fitting, PAM).
    curve : Bezier, optional
        A curve already fitted between ``point_a`` and the aligned ``point_b``; fitted for ``fit_epochs`` if absent.
    checks : sequence of str
        Which of ``CHECKS`` to run.
    spec : PermutationSpec, optional
        Traced from ``model`` when absent.
    heldout_loader : iterable, optional
        Fixed-order batches of distinct examples for the objective, held out from the gradient estimates
        (default ``train_loader``): its first ``value_batches`` are scored, and the neighbourhood check screens on
        the next ``screen_examples`` examples of the same pass (give ``value_batches`` + enough batches for them).
        The curve objective is a training objective: give training images without augmentation (e.g.
        ``DataBundle.train_eval``), not the test set, or generalisation effects mix in.
    align_loader : iterable, optional
        Inputs for the correlation objective (check 5).
    options : VerificationOptions, optional
        Every threshold and budget of the checks (the names used above); keyword arguments of the same names
        (``n_swaps=16``) override single ones.
    max_batches : int, optional
        Cut the epochs of curve fitting and PAM short (smoke tests; ``max_batches_per_epoch`` before 0.2).
    generator : torch.Generator or int, optional
        Seeds every random choice (derived seeds per check).
    callback : callable, optional
        Called with progress records ``{"stage": "verify", "check": name, "step": done, "total": total,
        "start": bool}``: once before each check runs (``start`` True, ``step`` 0) and after each unit of its work
        (a PAM iteration of a start, a group; for the neighbourhood check, estimated milliseconds of screening and
        scoring, so that a progress bar's rate holds while the cost per transposition varies between groups). The
        first record of a check after its start also carries ``expected_seconds``, the time the check is
        expected to take from its measured first step.

    Returns
    -------
    VerificationReport
        Its ``config`` holds the options used and, per check, ``seconds`` (wall-clock seconds it took) and
        ``expected_seconds`` (what its first step announced; with or without a ``callback``).

    Raises
    ------
    ValueError
        If ``perms`` does not match the spec or is not a permutation (names the group), ``checks`` names an
        unknown check, ``curve`` was fitted for other end points, or a check with a paired test (stability with
        ``swap_trials``, certificate, neighbourhood) would score moves on fewer than :data:`MIN_HELDOUT_EXAMPLES`
        held-out examples.
    NonFiniteError
        If the curve objective is NaN or infinite.
    """
    checks = checks if isinstance(checks, str) else tuple(checks)  # an iterator is read once, here
    if isinstance(checks, str) or not checks:
        raise ValueError(f"`checks` must be a non-empty sequence of check names from {list(CHECKS)}, got {checks!r}")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; expected a subset of {list(CHECKS)}")
    if "local_search" in option_overrides:  # before 0.2
        option_overrides.update(renamed_keywords({"local_search": option_overrides.pop("local_search")},
                                                 {"local_search": "swap_trials"}, where="verify_alignment"))
    renamed = {k: option_overrides.pop(k) for k in ("max_batches_per_epoch", "progress") if k in option_overrides}
    progress = renamed.pop("progress", None)
    if progress is not None:  # before 0.2: progress(name, done, total) besides callback(name)
        warnings.warn("verify_alignment(): `progress` is deprecated since neuralign 0.2: `callback` receives the "
                      "records {'stage': 'verify', 'check', 'step', 'total', 'start'}", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        named = callback

        def callback(record: dict[str, Any]) -> None:
            if record["start"] and named is not None:
                named(record["check"])
            elif not record["start"]:
                progress(record["check"], record["step"], record["total"])
    opts0 = resolve_options(VerificationOptions, options, option_overrides, where="verify_alignment")
    max_batches = renamed_keywords(renamed, {"max_batches_per_epoch": "max_batches"}, where="verify_alignment").get(
        "max_batches", max_batches)
    max_batches = check_int(max_batches, "max_batches", minimum=1, allow_none=True)
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable, got {type(callback).__name__}")
    announced: dict[str, float] = {}  # each check's expected seconds, as announced from its first step
    callback = _announcing(callback, announced)
    if "alignment" in checks and align_loader is not None and _length(align_loader) == 0:
        raise ValueError("`align_loader` has no batches: the alignment check computes the correlation objective on "
                         "them")  # fmt: skip
    gen = as_generator(generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    if spec is None:
        first = next(iter(train_loader), None)
        if first is None:
            raise ValueError("`train_loader` yielded no batches")
        spec = trace_spec(model, split_batch(first, torch.device("cpu"), "train_loader")[0][:2])
    validate_permutation(spec, perms, name="perms")
    perms = {g: p.detach().long().cpu() for g, p in perms.items()}
    b_aligned = apply_permutation(point_b, spec.restrict(point_b), perms)
    if curve is None:
        fitted = fit_curve(
            model, point_a, b_aligned, train_loader, epochs=opts0.fit_epochs, weight_decay=opts0.weight_decay,
            generator=stable_seed(seed, "fit"), max_batches=max_batches,
        )  # fmt: skip
        curve = fitted.curve
    # the scored held-out batches and, after them in the same pass, the neighbourhood check's screening examples
    scored, after = _heldout_batches(heldout_loader if heldout_loader is not None else train_loader,
                                     opts0.value_batches, opts0.screen_examples if "neighbourhood" in checks else 0)
    problem = CurvePermutationProblem(
        model, point_a, b_aligned, spec, train_loader, weight_decay=opts0.weight_decay, heldout_loader=scored,
        value_batches=opts0.value_batches, value_ts=opts0.value_ts, gradient_batches=opts0.gradient_batches,
        generator=stable_seed(seed, "problem"),
    )  # fmt: skip
    # the checks with paired tests on the held-out batches (the gradient and alignment checks have none)
    paired = [c for c in checks if c in ("certificate", "neighbourhood") or (c == "stability" and opts0.swap_trials)]
    if paired and len(problem.value_set) < 2:
        raise ValueError(f"`heldout_loader` yielded {len(problem.value_set)} batch; the paired tests of the checks "
                         f"{paired} need 2 at least")
    if len(problem.value_set) < opts0.value_batches:  # fewer held-out batches: fewer degrees of freedom, less power
        warnings.warn(f"the held-out loader yielded {len(problem.value_set)} batches, fewer than value_batches="
                      f"{opts0.value_batches}: the checks use {len(problem.value_set)}", stacklevel=2)  # fmt: skip
    x_star = [problem.start_offset(curve)]
    ctx = _Context(problem, x_star, spec, after)
    if paired and ctx.examples < MIN_HELDOUT_EXAMPLES:
        raise ValueError(f"`heldout_loader` gave {ctx.examples} held-out examples in {len(problem.value_set)} batches; "
                         f"the paired tests of the checks {paired} need {MIN_HELDOUT_EXAMPLES} at least")
    opts = _Run(
        opts0, seed=seed, certificate_lam=opts0.certificate_lam or opts0.lam, heldout_batches=len(problem.value_set),
        heldout_loader=scored, align_loader=align_loader, train_loader=train_loader, model=model,
        max_batches=max_batches, callback=callback,
    )  # fmt: skip
    results: dict[str, CheckResult] = {}
    seconds: dict[str, float] = {}
    # the neighbourhood check runs first: the stability check's PAM tries the transpositions it ranks best
    for name in sorted((c for c in CHECKS if c in checks), key=lambda c: c != "neighbourhood"):
        began = time.perf_counter()
        _tick(opts, name, 0, None, start=True)
        logger.info("verification check %s", name)
        sub = as_generator(stable_seed(seed, name))
        if name == "stability":
            results[name] = _check_stability(ctx, model, point_a, point_b, perms, train_loader, curve, spec, opts, sub)
        elif name == "certificate":
            results[name] = _check_certificate(ctx, opts)
        elif name == "neighbourhood":
            results[name] = _check_neighbourhood(ctx, opts, sub)
        elif name == "gradient":
            results[name] = _check_gradient(ctx, opts, sub)
        else:
            results[name] = _check_alignment(model, point_a, point_b, perms, spec, opts)
        seconds[name] = round(time.perf_counter() - began, 3)
    results = {name: results[name] for name in CHECKS if name in results}  # reported in the order of CHECKS
    config: dict[str, Any] = {"seed": seed}
    for name in _REPORTED_OPTIONS:
        config[name] = getattr(opts, name)
    config.update(heldout_batches=opts.heldout_batches, max_batches=max_batches, lp_max_size=opts.lp_max_size,
                  checks=list(checks), groups=dict(spec.sizes),
                  seconds={n: seconds[n] for n in CHECKS if n in seconds},
                  expected_seconds={n: round(announced[n], 3) for n in CHECKS if n in announced})  # fmt: skip
    return VerificationReport(results, config)
