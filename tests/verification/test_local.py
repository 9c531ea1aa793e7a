import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuralign.alignment import apply_permutation, invert_permutation, random_permutation, trace_spec
from neuralign.curves import Bezier
from neuralign.errors import NonFiniteError
from neuralign.experiments.data import load_data
from neuralign.experiments.models import build_model
from neuralign.experiments.training import train_model
from neuralign.verification import VerificationReport, taylor_test, verify_alignment, wilson_interval
from neuralign.verification.local import CheckResult, _Change, _check_gradient, _Context

GROUP = "hidden.0.fc"


def _planted_mlp(hidden, perm_seed, **train):
    """A batch-norm MLP A trained on the shipped digits, B = A with every group permuted at random (``perm_seed``):
    ``(data, model, spec, b_state, perms)`` with perms the inverse permutation."""
    data = load_data("digits", batch_size=64, generator=0)
    model = build_model("mlp", 10, in_features=64, hidden=hidden, batch_norm=True, generator=1)
    model.load_state_dict(train_model(model, data.train, **train).state_dict)
    model.eval()
    spec = trace_spec(model, next(iter(data.train))[0])
    p = random_permutation(spec, generator=perm_seed)
    b_state = apply_permutation(model.state_dict(), spec, p)
    return data, model, spec, b_state, invert_permutation(p)


@pytest.fixture(scope="module")
def planted():
    """A trained MLP A on the shipped digits, B = A with every group permuted at random: perms = the inverse."""
    return _planted_mlp((16, 16), 3, epochs=40, lr=0.1)


def _damaged(perms, fraction, seed=5):
    """``fraction`` of GROUP's units swapped in random pairs."""
    n = perms[GROUP].numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: 2 * round(fraction * n / 2)]
    out = {g: p.clone() for g, p in perms.items()}
    for i in range(0, len(idx), 2):
        u, v = idx[i], idx[i + 1]
        out[GROUP][u], out[GROUP][v] = perms[GROUP][v], perms[GROUP][u]
    return out


def _verify(planted, perms, **kw):
    data, model, spec, b_state, _ = planted
    options = dict(heldout_loader=data.train_eval, value_batches=4, align_loader=data.align, n_swaps=8, generator=0,
                   fit_epochs=1,
                   max_batches=8, stability_iters=1, spec=spec)  # fmt: skip
    options.update(kw)
    return verify_alignment(model, model.state_dict(), b_state, perms, data.train, **options)


@pytest.fixture(scope="module")
def planted_report(planted):
    return _verify(planted, planted[4])


@pytest.fixture(scope="module")
def damaged_report(planted):
    return _verify(planted, _damaged(planted[4], 0.3), checks=("stability", "neighbourhood", "alignment"))


def test_the_report_keeps_each_checks_announced_and_measured_seconds_without_a_callback(damaged_report):
    """A run without progress (a study's job) still records each check's expected time from its first step and the
    time it took, so the cost model can be compared with the time taken afterwards."""
    config = damaged_report.config
    assert list(config["seconds"]) == list(config["expected_seconds"]) == ["stability", "neighbourhood", "alignment"]
    assert all(v > 0 for v in [*config["seconds"].values(), *config["expected_seconds"].values()])
    assert json.loads(damaged_report.to_json())["config"]["seconds"] == config["seconds"]
    row = next(line for line in damaged_report.to_markdown().splitlines() if line.startswith("| stability |"))
    assert row.endswith(f"| {config['seconds']['stability']:.1f} ({config['expected_seconds']['stability']:.1f}) |")


def test_every_check_passes_at_the_planted_optimum(planted_report):
    for name, check in planted_report.checks.items():
        assert check.verdict == "pass", (name, check.summary)
    assert planted_report.verdict == "pass"
    stab = planted_report.checks["stability"].details["runs"]["alignment"]
    assert all(max(f) == 0.0 for f in stab["reassigned_fraction"].values())


def test_damaged_permutation_fails_stability_neighbourhood_and_alignment(damaged_report):
    checks = damaged_report.checks
    assert checks["stability"].verdict == "fail"
    frac = checks["stability"].details["runs"]["alignment"]["reassigned_fraction"][GROUP]
    assert max(frac) > 0.05
    assert checks["neighbourhood"].verdict == "fail"
    assert checks["neighbourhood"].details["per_group"][GROUP]["improving"] > 0
    assert checks["alignment"].verdict == "fail"
    assert checks["alignment"].details["per_group"][GROUP]["relative_gap"] > 0.1
    assert damaged_report.verdict == "fail"


def test_certificate_fails_when_half_the_group_is_swapped(planted, planted_report):
    report = _verify(planted, _damaged(planted[4], 0.5), checks=("certificate",))
    cert = report.checks["certificate"]
    assert cert.verdict == "fail"
    row = cert.details["per_group"][GROUP]
    assert row["verdict"] == "fail" and row["best_change"] < 0
    planted_lam = planted_report.checks["certificate"].details["per_group"][GROUP]["lam_star"]
    assert row["lam_star"] < planted_lam  # the damaged permutation is a fixed point only of smaller steps
    # the assignment at the threshold step agrees with its LP relaxation (cvxpy)
    assert all(r["lp_vs_lap_gap"] < 1e-6 for r in cert.details["per_group"].values())


def test_gradient_check_passes_on_the_true_gradient_and_fails_when_scaled(planted, planted_report):
    data, model, spec, b_state, perms = planted
    assert planted_report.checks["gradient"].verdict == "pass"
    assert planted_report.checks["gradient"].details["taylor"]["slope"] > 1.9
    from neuralign.curves.pam import CurvePermutationProblem

    aligned = apply_permutation(b_state, spec, perms)
    prob = CurvePermutationProblem(model, model.state_dict(), aligned, spec, data.train,
                                   heldout_loader=data.train_eval, value_batches=2)  # fmt: skip
    ctx = _Context(prob, [torch.randn(sum(prob.numels), generator=torch.Generator().manual_seed(0)) * 0.01], spec)
    opts = SimpleNamespace(gradient_check_examples=8, min_slope=1.8, max_relative_error=1e-3, callback=None)
    good = _check_gradient(ctx, opts, torch.Generator().manual_seed(0))
    bad = _check_gradient(ctx, opts, torch.Generator().manual_seed(0), scale=1.1)
    assert good.verdict == "pass"
    assert bad.verdict == "fail"
    assert bad.details["taylor"]["slope"] < 1.3


def test_taylor_test_on_known_functions():
    assert taylor_test(lambda e: math.sin(0.3 + e), math.cos(0.3)).verdict == "pass"
    res = taylor_test(lambda e: math.sin(0.3 + e), 1.1 * math.cos(0.3))
    assert res.verdict == "fail" and res.slope == pytest.approx(1.0, abs=0.1)
    assert res.relative_error == pytest.approx(0.1 / 1.1, rel=0.05)  # |d - g'| / |d|
    flat = taylor_test(lambda e: 1.0 + 2.0 * e, 2.0)  # linear: the remainder is rounding noise only
    assert flat.verdict == "inconclusive" and "cannot judge" in flat.message
    # a kink at 1e-7 (slope change 1e-5 of |d|): first order beyond it, but far below the tolerance
    kinked = taylor_test(lambda e: 1.0 + e + 0.5 * e * e + 1e-5 * max(0.0, e - 1e-7), 1.0)
    assert kinked.verdict in ("pass", "inconclusive")
    tiny = taylor_test(lambda e: 1.0 + e + 1e-5 * e, 1.0, steps=[1e-3, 1e-2, 1e-1])  # smooth, error 1e-5 of d
    assert tiny.verdict == "inconclusive" and tiny.relative_error == pytest.approx(1e-5, rel=1e-3)
    with pytest.raises(ValueError, match="at least 3 positive finite step sizes"):
        taylor_test(lambda e: e, 1.0, steps=[1e-3, 1e-2])
    for kwargs, match in (({"steps": [1e-3, 1e-3, 1e-2]}, "distinct"), ({"max_relative_error": -1e-3}, "positive"),
                          ({"max_relative_error": 0.0}, "positive"), ({"min_slope": 0.5}, r"\(1, 2\]"),
                          ({"noise_floor": -1.0}, ">= 0"), ({"steps": [1e-3, 1e-2, math.inf]}, "finite")):
        with pytest.raises(ValueError, match=match):
            taylor_test(lambda e: math.sin(e), 1.0, **kwargs)


def _tanh_sum(seed: int, dtype):
    """g(e) = sum_i w_i tanh(a_i + e v_i) computed in ``dtype``, and its exact derivative at 0 (float64)."""
    rng = np.random.default_rng(seed)
    a, v, w = rng.normal(size=200), rng.normal(size=200), rng.normal(size=200) / 200
    return ((lambda e: float(np.sum(np.tanh((a + e * v).astype(dtype)) * w.astype(dtype), dtype=dtype))),
            float(np.sum(w * (1 - np.tanh(a) ** 2) * v)))  # fmt: skip


def test_taylor_test_floor_follows_the_precision_of_f():
    """A reviewer found 29 of 30 correct float32 gradients failed against a fixed float64 floor, then (after a first
    fix) a correct float32 gradient failing with f(0) = 0 and 5 % wrong float32 gradients passing. In float64 a
    correct gradient passes and a 5 % error fails on every seed; in float32, whose rounding hides the steps where a
    1e-3 error would show, the test never fails a correct gradient and never passes a wrong one (inconclusive)."""
    for seed in range(30):
        f, d = _tanh_sum(seed, np.float64)
        assert taylor_test(f, d).verdict == "pass", seed
        assert taylor_test(f, 1.05 * d).verdict == "fail", seed
        f, d = _tanh_sum(seed, np.float32)
        assert taylor_test(f, d).verdict != "fail", seed
        assert taylor_test(f, 1.05 * d).verdict != "pass", seed
        g0 = f(0.0)
        assert taylor_test(lambda e, f=f, g0=g0: float(np.float32(f(e)) - np.float32(g0)), d).verdict != "fail"
    # a large |g(0)|: only steps where curvature dominates are above its rounding, so a 5 % error cannot show
    big = taylor_test(lambda e: 1e12 + math.exp(1.0 + e), 1.05 * math.e)
    assert big.verdict == "inconclusive" and "could hide a gradient error" in big.message
    assert taylor_test(lambda e: 1e6 + math.exp(1.0 + e), 1.05 * math.e).verdict == "fail"


def test_taylor_test_does_not_pass_an_error_that_curvature_cancels_at_one_step():
    """A reviewer's case: g = 1 + e + 5e5 e^2 with d = 1.01. The remainder |5e5 e^2 - 0.01 e| dips to zero at
    e = 2e-8, inside the fitted window, which steepened the slope and made the smallest e/eps tiny: "pass". A pass
    now needs e/eps small at every fitted step."""
    def f(e: float) -> float:
        return 1.0 + e + 5e5 * e * e

    for wrong in (1.01, 0.99, 1.05):
        assert taylor_test(f, wrong).verdict != "pass", wrong
    assert taylor_test(f, 1.0).verdict != "fail"
    assert taylor_test(f, 1.02).verdict == "fail"


def test_taylor_test_rounding_noise_and_kinks_do_not_fail_a_correct_gradient():
    """Deterministic noise of 1e-10 (far above float64 rounding) is measured, not fitted; ReLU-like kinks beyond the
    smallest resolvable steps give a mixed slope, reported as pass or inconclusive, never as a wrong gradient."""
    def noisy(e: float, amplitude: float = 1e-10) -> float:
        return math.exp(0.3 + e) + amplitude * math.sin(1e12 * e + 1.0)

    assert taylor_test(noisy, math.exp(0.3)).verdict == "pass"
    assert taylor_test(noisy, 1.01 * math.exp(0.3)).verdict == "fail"
    # at 1e-9 the resolvable steps start where curvature alone is 1e-3 of |d|: a pass could not bound the error
    louder = taylor_test(lambda e: noisy(e, 1e-9), math.exp(0.3))
    assert louder.verdict == "inconclusive" and "could hide" in louder.message
    rng = np.random.default_rng(0)
    kinks = rng.uniform(1e-5, 1.0, size=50)  # 50 ReLUs switching on along the direction, none below 1e-5
    weights = rng.normal(size=50) * 0.02

    def relu_net(e: float) -> float:
        return math.exp(0.3 + e) + float(np.sum(weights * np.maximum(0.0, e - kinks)))

    res = taylor_test(relu_net, math.exp(0.3))
    assert res.verdict == "pass" and res.used[-1] < 12  # fitted below the first kink


def test_taylor_test_fits_below_a_kink_that_comes_in_at_the_last_step_of_its_window():
    """The demo with two threads: the remainder was second order over three steps and jumped 2,000-fold at the fourth
    (a ReLU switching on), whose e/eps then exceeded the tolerance: inconclusive. The window now stops before such a
    jump: a correct gradient passes, a wrong one still fails, and a jump within the first three steps is kept."""
    def kinked(e: float, at: float = 1.5e-6, size: float = 0.1) -> float:
        return math.exp(1.0 + e) + size * max(0.0, e - at)

    res = taylor_test(kinked, math.e)
    assert res.verdict == "pass" and len(res.used) == 3 and res.slope == pytest.approx(2.0, abs=0.05), res.message
    assert res.errors[res.used[-1] + 1] > 100 * res.errors[res.used[-1]]  # the jump it stopped before
    assert taylor_test(kinked, 1.01 * math.e).verdict == "fail"
    early = taylor_test(lambda e: kinked(e, at=7e-7), math.e)  # the jump at the window's third step: kept
    assert len(early.used) == 4 and early.verdict == "inconclusive", early.message
    # a reviewer's case: a kink inside the third step makes the remainder dip there and rise steeply after; cut
    # before that rise, the first three steps looked first order and the correct derivative failed: no cut where
    # the steps before a jump are not second order
    dip = taylor_test(lambda e: 1 - 1e-7 * e - 700 * e * e + 2e-4 * max(0.0, e - 4e-8), -1e-7)
    assert dip.verdict == "inconclusive" and dip.used == [0, 1, 2, 3], dip.message


def test_report_round_trips_through_json_and_renders_markdown(planted_report, tmp_path):
    again = VerificationReport.from_json(planted_report.to_json())
    assert again.verdict == planted_report.verdict
    assert set(again.checks) == set(planted_report.checks)
    md = planted_report.to_markdown()
    assert "| stability | **pass** |" in md and "## neighbourhood" in md
    json_path, md_path = planted_report.save(tmp_path)
    assert json.loads(json_path.read_text())["kind"] == "verification_report"
    assert md_path.read_text() == md
    with pytest.raises(ValueError, match="not a verification report"):
        VerificationReport.from_dict({"kind": "other"})


def test_wilson_interval():
    lo, hi = wilson_interval(5, 50)
    assert lo < 0.1 < hi
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0


def test_bad_input_is_named(planted):
    data, model, spec, b_state, perms = planted
    sd = model.state_dict()
    bad = {**perms, GROUP: torch.zeros(16, dtype=torch.long)}
    with pytest.raises(ValueError, match=f"`perms` group `{GROUP}` is not a permutation"):
        verify_alignment(model, sd, b_state, bad, data.train, spec=spec)
    with pytest.raises(ValueError, match=r"`perms` lacks the groups \['hidden.1.fc'\]"):
        verify_alignment(model, sd, b_state, {GROUP: perms[GROUP]}, data.train, spec=spec)
    with pytest.raises(ValueError, match=r"unknown checks \['speed'\]"):
        verify_alignment(model, sd, b_state, perms, data.train, checks=("speed",), spec=spec)
    # a reviewer found these accepted: alpha 0 (z infinite, nothing can fail), one held-out batch (no standard
    # error), no screened transposition
    with pytest.raises(TypeError, match=r"^`n_swaps` must be a positive int, got float 2.5$"):
        verify_alignment(model, sd, b_state, perms, data.train, spec=spec, n_swaps=2.5)
    for kwargs, match in (({"alpha": 0.0}, r"`alpha` must be a finite number in \(0, 1\), got 0.0"),
                          ({"alpha": 1.5}, "`alpha`"),
                          ({"value_batches": 1}, "`value_batches` must be an int >= 2"),
                          ({"screen_pairs": 0}, "`screen_pairs` must be a positive int"),
                          ({"stability_x_epochs": 0}, "`stability_x_epochs` must be a positive int"),  # PAM's minimum
                          ({"min_improvement": -1e-3}, "`min_improvement` must be a finite number >= 0"),
                          ({"lam": 0}, "`lam` must be a finite number > 0"),
                          ({"lam": math.inf}, "`lam` must be a finite"), ({"min_improvement": math.inf}, "`min_impr"),
                          ({"checks": ()}, "non-empty sequence"),
                          ({"value_ts": (0.5, 2.0)}, r"`value_ts` must be a finite number in \[0, 1\], got 2.0")):
        with pytest.raises(ValueError, match=match):
            verify_alignment(model, sd, b_state, perms, data.train, spec=spec, **kwargs)
    with pytest.raises(ValueError, match="unknown verdict 'maybe'"):
        CheckResult("gradient", "maybe", "")
    # an iterator of checks is read once (it ran nothing before); NumPy integers are ints
    report = verify_alignment(model, sd, b_state, perms, data.train, spec=spec, checks=iter(["alignment"]),
                              align_loader=data.align, value_batches=np.int64(6), fit_epochs=np.int64(1),
                              heldout_loader=data.train_eval, max_batches=np.int64(2))  # fmt: skip
    assert list(report.checks) == ["alignment"]
    params = {k: v for k, v in sd.items() if k in dict(model.named_parameters())}
    wrong = Bezier.between(params, {k: v + 1.0 for k, v in params.items()})
    with pytest.raises(ValueError, match="`curve` was fitted for other end points"):
        verify_alignment(model, sd, b_state, perms, data.train, spec=spec, curve=wrong, checks=("gradient",))
    broken = {k: v.clone() for k, v in sd.items()}
    broken["hidden.1.fc.weight"][0, 0] = float("nan")
    curve = Bezier.between(params, {k: broken[k] for k in params})
    with pytest.raises(NonFiniteError, match="the curve objective is nan on value batch 0"):
        verify_alignment(model, sd, apply_permutation(broken, spec, invert_permutation(perms)), perms, data.train,
                         spec=spec, curve=curve, checks=("neighbourhood",))  # fmt: skip


def test_first_order_certificate_is_blind_to_a_small_swap_damage(planted, planted_report):
    # documented limitation (verify_alignment Notes): with 4 of 16 units swapped in pairs, no linearised P-step is
    # an improvement (averaging two units is worse than either), although single swaps are (test above)
    report = _verify(planted, _damaged(planted[4], 0.3), checks=("certificate",))
    row = report.checks["certificate"].details["per_group"][GROUP]
    assert row["verdict"] == "pass"
    planted_lam = planted_report.checks["certificate"].details["per_group"][GROUP]["lam_star"]
    assert row["lam_star"] < planted_lam


def test_markdown_renders_groups_whose_rows_have_different_columns():
    """The certificate's row of a group that passes outright has no step statistics; rendering must not fail."""
    from neuralign.verification.local import CheckResult, VerificationReport

    rows = {"g1": {"lam_star": 2000.0, "verdict": "pass"},
            "g2": {"lam_star": 10.0, "best_change_se": 0.5, "verdict": "fail"}}  # fmt: skip
    report = VerificationReport({"certificate": CheckResult("certificate", "fail", "s", {}, {"per_group": rows})})
    md = report.to_markdown().splitlines()
    head = md.index("| group | lam_star | verdict | best_change_se |")
    assert md[head + 2].startswith("| g1 | 2000 | pass |  |") and md[head + 3].startswith("| g2 | 10 | fail | 0.5 |")


@pytest.fixture(scope="module")
def relu_pool_problem():
    """A small ReLU + max-pool conv net trained on the shipped digits, B a random relabelling of it (aligned back)."""
    from torch import nn

    from neuralign.curves.pam import CurvePermutationProblem

    data = load_data("digits", batch_size=64, generator=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))  # fmt: skip
    loader = [(x.view(-1, 1, 8, 8), y) for x, y in data.train]
    model.load_state_dict(train_model(model, loader, epochs=15, lr=0.05).state_dict)
    model.eval()
    spec = trace_spec(model, loader[0][0])
    other = apply_permutation(model.state_dict(), spec, random_permutation(spec, generator=1))
    held = [(x.view(-1, 1, 8, 8), y) for x, y in data.train_eval]
    prob = CurvePermutationProblem(model, model.state_dict(), other, spec, loader, heldout_loader=held, value_batches=2)
    return prob, spec


def test_gradient_check_never_fails_a_correct_gradient_of_a_trained_relu_max_pool_net(relu_pool_problem):
    prob, spec = relu_pool_problem
    opts = SimpleNamespace(gradient_check_examples=8, min_slope=1.8, max_relative_error=1e-3, callback=None)
    verdicts = []
    for seed in range(10):
        x = [torch.randn(sum(prob.numels), generator=torch.Generator().manual_seed(seed)) * 0.01]
        ctx = _Context(prob, x, spec)
        good = _check_gradient(ctx, opts, torch.Generator().manual_seed(seed))
        bad = _check_gradient(ctx, opts, torch.Generator().manual_seed(seed), scale=1.01)  # 1% off
        verdicts.append(good.verdict)
        assert good.verdict != "fail", good.summary
        assert bad.verdict == "fail", bad.summary
        assert bad.details["taylor"]["relative_error"] == pytest.approx(0.01 / 1.01, rel=0.2)
    assert verdicts.count("pass") >= 5  # inconclusive only where a kink sits within the smallest step


def _ranked_report(planted, perms, seed):
    return _verify(planted, perms, checks=("neighbourhood",), n_swaps=8, n_control_swaps=4, generator=seed)


def test_neighbourhood_ranking_finds_the_swaps_that_undo_the_damage(planted):
    """4 of 16 units swapped in two pairs; 8 ranked + 4 random of 120 transpositions scored per group, 10 seeds:
    the damaged group is flagged in every seed (the other group and the planted optimum pass in every seed), every
    significantly improving swap moves a damaged unit, and an exact undoing swap is among them in >= 9 seeds."""
    perms = planted[4]
    damaged = _damaged(perms, 0.3)
    moved = (perms[GROUP] != damaged[GROUP]).nonzero().flatten().tolist()
    undo = {tuple(sorted((u, int((perms[GROUP] == damaged[GROUP][u]).nonzero())))) for u in moved}
    assert len(undo) == 2  # the fixture's damage: two transpositions
    undone = 0
    for seed in range(10):
        check = _ranked_report(planted, damaged, seed).checks["neighbourhood"]
        assert check.verdict == "fail", seed
        rows = check.details["per_group"]
        assert rows[GROUP]["verdict"] == "fail" and rows["hidden.1.fc"]["verdict"] == "pass", seed
        assert rows[GROUP]["ranked_improving"] > 0 and not rows[GROUP]["exhaustive"]
        found = {tuple(m[1]) for m in check.details["improving_moves"][GROUP]}
        assert all(set(f) & set(moved) for f in found), (seed, found, moved)
        undone += bool(found & undo)
        planted_check = _ranked_report(planted, perms, seed).checks["neighbourhood"]
        assert planted_check.verdict == "pass", (seed, planted_check.summary)
    assert undone >= 9


def test_race_capped_by_screen_pairs_keeps_the_swaps_that_undo_the_damage(planted):
    """With fewer ``screen_pairs`` (16) than the group's 120 transpositions, the 16 best by the linearised screen
    (the group has a chain) enter the race and no more go on: a swap that undoes a damaged pair is still among the
    ranked moves and flagged, and every flagged ranked move moves a damaged unit."""
    perms = planted[4]
    damaged = _damaged(perms, 0.3)
    moved = (perms[GROUP] != damaged[GROUP]).nonzero().flatten().tolist()
    undo = {tuple(sorted((u, int((perms[GROUP] == damaged[GROUP][u]).nonzero())))) for u in moved}
    check = _verify(planted, damaged, checks=("neighbourhood",), n_swaps=8, n_control_swaps=4,
                    screen_pairs=16).checks["neighbourhood"]  # fmt: skip
    row = check.details["per_group"][GROUP]
    assert check.thresholds["screen_pairs"] == 16 and row["verdict"] == "fail"
    assert row["raced"][0] == 16 and all(n <= 16 for n in row["raced"][1:]), row["raced"]
    ranked = {tuple(m[1]) for m in check.details["improving_moves"][GROUP] if m[3] == "ranked"}
    assert undo & ranked and all(set(f) & set(moved) for f in ranked), (undo, ranked, moved)


class _FakeScreen:
    """A screen of ``count`` candidates whose change on example ``e`` is ``means[k] + noise[k, e]``, with the
    interface :func:`_screen_group` uses; it counts the candidate-examples it evaluates."""

    def __init__(self, means, noise):
        from neuralign.verification.local import _slices

        self.means, self.noise, self.slices, self.seconds, self.evaluated = means, noise, _slices(noise.shape[1]), {}, 0
        self.hit, self.examples, self.local = False, noise.shape[1], noise.shape[1]

    def chunk(self, part):
        return 64

    def __call__(self, label, ks, part):
        s = self.slices[part]
        self.seconds[label] = 1e-6
        self.evaluated += len(ks) * (s.stop - s.start)
        k = torch.tensor(ks)
        return self.means[k, None] + self.noise[k, s]


class _FakeMoves:
    def __init__(self, count):
        self.count = count

    def changes(self, k):
        return k

    def __getitem__(self, k):
        from neuralign.verification._moves import Move

        return Move("swap", (k, k + 1))


def test_race_ranks_the_exhaustive_screens_best_at_a_fraction_of_its_cost():
    """On 2,016 candidates (a 64-unit group) whose mean changes are spread evenly over [-0.05, 1.95], with
    per-example noise of standard deviation 0.5 (about 30 noise standard errors of the first slice over the
    spread: the race can separate them), the race ranks exactly the 8 best of the exhaustive screen's means over
    all 256 examples, in the same order, and evaluates under a third of the candidate-examples the exhaustive
    screen does (about 0.27 expected from the elimination rule). Seeded; over 20 seeds. Where the changes are
    within noise of each other the race eliminates little (benchmarks/bench_verification.py measures it)."""
    from neuralign.verification.local import _Meter, _screen_group

    count, examples = 2016, 256
    options = SimpleNamespace(n_swaps=8, n_control_swaps=4, screen_pairs=512, callback=None)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        means = torch.rand(count, generator=gen, dtype=torch.float64) * 2.0 - 0.05
        noise = 0.5 * torch.randn(count, examples, generator=gen, dtype=torch.float64)
        screen = _FakeScreen(means, noise)
        chosen, raced = _screen_group("g", _FakeMoves(count), torch.arange(count), screen, options,
                                      torch.Generator().manual_seed(0), _Meter(options))  # fmt: skip
        exhaustive = torch.argsort((means[:, None] + noise).mean(1), stable=True)[:8].tolist()
        ranked = [m.where[0] for m, how in chosen if how == "ranked"]
        assert ranked == exhaustive, (seed, ranked, exhaustive)
        assert raced[0] == count and raced == sorted(raced, reverse=True) and raced[-1] >= 8
        assert screen.evaluated < count * examples / 3, (seed, raced)
        controls = [m.where[0] for m, how in chosen if how == "control"]
        assert len(controls) == 4 and not set(controls) & set(ranked)


def test_race_keeps_a_planted_better_transposition_wherever_the_exhaustive_screen_ranks_it():
    """The race's power: among 512 neutral candidates (mean change 0, per-example noise 0.5), one made better by 3
    standard errors of the screen's mean over its 256 examples is ranked among the 8 best by the race (at its
    elimination threshold ``_RACE_Z``) in every one of 100 seeded trials in which the exhaustive screen ranks it
    there (79 of them: the screen's own power at that effect). A lower threshold loses trials (1 loses 10 here:
    the test can fail); benchmarks/bench_verification.py measures the same on a real pair's screen values."""
    from neuralign.verification.local import _Meter, _screen_group

    count, examples, effect = 512, 256, 3 * 0.5 / 16
    options = SimpleNamespace(n_swaps=8, n_control_swaps=0, screen_pairs=count, callback=None)
    found = {"exhaustive": 0, "both": 0}
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        planted = int(torch.randint(count, (1,), generator=gen))
        means = torch.zeros(count, dtype=torch.float64)
        means[planted] = -effect
        noise = 0.5 * torch.randn(count, examples, generator=gen, dtype=torch.float64)
        chosen, _ = _screen_group("g", _FakeMoves(count), torch.arange(count), _FakeScreen(means, noise), options,
                                  torch.Generator().manual_seed(0), _Meter(options))  # fmt: skip
        exhaustive = planted in torch.argsort((means[:, None] + noise).mean(1), stable=True)[:8].tolist()
        raced = planted in [m.where[0] for m, _ in chosen]
        found["exhaustive"] += exhaustive
        found["both"] += exhaustive and raced
    assert 60 <= found["exhaustive"] <= 95, found  # the effect is near the screen's detection limit
    assert found["both"] == found["exhaustive"], found


def test_sequential_scoring_stops_clear_non_improvements_and_keeps_every_significant_one(planted):
    """The held-out test of a move is sequential: a random transposition at the planted optimum (it worsens the
    objective) stops at an interim look, on part of the held-out examples, and is not significant; at a damaged
    permutation the swaps that undo the damage go on to every example and are significant, and every move's verdict
    (significant or not) is the same as the full test's."""
    from neuralign._stats import bonferroni_quantile
    from neuralign.verification.local import _swap

    data, model, spec, b_state, perms = planted
    ctx = _context(planted, value_batches=8)
    count = len(ctx.problem.value_set)  # the shipped digits' held-out loader has fewer than 8 batches
    assert count >= 4 and ctx.looks == (count // 4, count // 2)
    z = bonferroni_quantile(0.05, 20, ctx.examples)
    margin = ctx.margin(1e-3)
    worse = ctx.delta({GROUP: _swap(16, 0, 5)}, z, margin)
    assert 0 < worse.examples < ctx.examples and worse.change > 0 and not worse.significant(z, margin)
    damaged = _damaged(perms, 0.3)
    prob = ctx.problem
    hurt = _Context(type(prob)(model, model.state_dict(), apply_permutation(b_state, spec, damaged), spec,
                               data.train, heldout_loader=data.train_eval, value_batches=8), ctx.x, spec)  # fmt: skip
    moved = (perms[GROUP] != damaged[GROUP]).nonzero().flatten().tolist()
    undo = {tuple(sorted((u, int((perms[GROUP] == damaged[GROUP][u]).nonzero())))) for u in moved}
    stops = 0
    for i, j in sorted(undo) + [(0, 1), (2, 3), (4, 7), (8, 15)]:
        q = {GROUP: _swap(16, i, j)}
        seq, full = hurt.delta(q, z, margin), hurt.delta(q)
        assert full.examples == hurt.examples and seq.significant(z, margin) == full.significant(z, margin)
        if (i, j) in undo:
            assert seq.examples == hurt.examples and seq.significant(z, margin), (i, j, seq)
        stops += seq.examples < hurt.examples
    assert stops >= 1


def test_swap_estimates_is_the_first_order_change_of_every_transposition():
    from neuralign.verification import swap_estimates
    from neuralign.verification.local import _swap

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    est = swap_estimates(G)
    eye = torch.eye(5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            if i != j:
                T = eye[_swap(5, i, j)]
                torch.testing.assert_close(est[i, j], (G * (T - eye)).sum(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="`G` must be a square matrix"):
        swap_estimates(torch.zeros(2, 3))


def _wider_pair(case):
    """The slow tests' wider fixture: a batch-norm MLP 64-32-32-10 trained 20 epochs on the digits, B a relabelled
    copy, 30% of GROUP's 32 units mis-assigned (``"pairs"``: 5 disjoint swaps; ``"shuffled"``: 10 units shuffled
    at random; ``"planted"``: none), the curve fitted for 2 epochs and fixed."""
    from neuralign.curves import fit_curve

    data, model, spec, b_state, perms = _planted_mlp((32, 32), 123, epochs=20, generator=0)
    idx = torch.randperm(32, generator=torch.Generator().manual_seed(7))[:10]
    use = {g: q.clone() for g, q in perms.items()}
    if case == "pairs":
        for u, v in idx.view(-1, 2).tolist():
            use[GROUP][u], use[GROUP][v] = perms[GROUP][v].clone(), perms[GROUP][u].clone()
    elif case == "shuffled":
        use[GROUP][idx] = perms[GROUP][idx[torch.randperm(10, generator=torch.Generator().manual_seed(8))]]
    aligned = apply_permutation(b_state, spec, use)
    curve = fit_curve(model, model.state_dict(), aligned, data.train, epochs=2, generator=0).curve
    return data, model, spec, b_state, use, curve


def _heldout(data, seed, size=256):
    """The digits' 1,437 training images without augmentation (``train_eval``) in an order drawn from ``seed``,
    in batches of ``size``: each seed scores other examples (its first 4 batches) and screens on others (the
    rest), as another draw of the data would."""
    x, y = (torch.cat(parts) for parts in zip(*data.train_eval))
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    return list(zip(x[order].split(size), y[order].split(size)))


def _neighbourhood(data, model, spec, b_state, perms, curve, seed):
    """The neighbourhood check of ``perms`` on the fixed ``curve``: 4 held-out batches of 256 scored, the screen on
    the next 256 examples (:func:`_heldout`, seed ``seed``)."""
    return verify_alignment(model, model.state_dict(), b_state, perms, data.train, checks=("neighbourhood",),
                            heldout_loader=_heldout(data, seed), value_batches=4, curve=curve, spec=spec,
                            generator=seed).checks["neighbourhood"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", ["pairs", "shuffled"])
def test_neighbourhood_flags_a_mis_assigned_third_of_a_wider_group(case, least=9):
    """The power of the per-example paired test on the wider fixture (curve fixed, 10 seeds, each its own draw of
    the held-out and screening examples, defaults): 5 swapped pairs of 32 units and 10 shuffled units flagged in
    >= 9 of 10 seeds (measured: 10 and 10). With the test paired per held-out batch (6 batches: t with 5 degrees
    of freedom, z ~ 5 after Bonferroni) the shuffled units were flagged in 5 of 10; paired per example, with the
    screen on augmented training batches, in 8 of 10."""
    fixture = _wider_pair(case)
    verdicts = [_neighbourhood(*fixture, seed).verdict for seed in range(10)]
    print(f"{case}: flagged in {verdicts.count('fail')} of 10 seeds")
    assert verdicts.count("fail") >= least, (case, verdicts)


@pytest.mark.slow
def test_moves_flagged_at_the_planted_permutation_improve_the_test_split_too():
    """At the planted permutation of the wider fixture some seeds flag a transposition (measured: 16 moves over the
    10 seeds): the curve, fitted for 2 epochs and fixed, is not at its optimum, and a swap lowers its objective by
    4-5%. Such a move is no false alarm: scored on the test split, never used for screening or scoring, it lowers the
    objective there too (a false alarm would do so about half of the time, and every flagged move must)."""
    from neuralign.curves.pam import CurvePermutationProblem
    from neuralign.verification.local import _swap

    data, model, spec, b_state, perms, curve = _wider_pair("planted")
    test = CurvePermutationProblem(model, model.state_dict(), apply_permutation(b_state, spec, perms), spec,
                                   data.train, heldout_loader=data.test, value_batches=6)  # fmt: skip
    ctx = _Context(test, [test.start_offset(curve)], spec)
    flagged = []
    for seed in range(10):
        check = _neighbourhood(data, model, spec, b_state, perms, curve, seed)
        flagged += [(g, tuple(m[1])) for g, found in check.details["improving_moves"].items() for m in found]
    # measured in this file's slow run: 7 moves over the 10 seeds with the screen on augmented training batches;
    # 16 with the screen on held-out examples the test does not score (each seed its own draw of the examples,
    # :func:`_heldout`): it ranks the same few real improving moves in more seeds, and each lowers the test split
    print(f"{len(flagged)} flagged over 10 seeds, {len(set(flagged))} distinct: {sorted(set(flagged))}")
    assert len(flagged) <= 20, flagged
    for g, (i, j) in set(flagged):
        change = ctx.delta({g: _swap(spec.sizes[g], i, j)})
        assert change.change < 0, (g, i, j, change)


@pytest.fixture(scope="module")
def unnormalised_pair():
    """A 64-48 MLP without batch norm (64 inputs, 10 classes) trained 20 epochs on the digits, B a relabelled copy."""
    data = load_data("digits", batch_size=64, generator=0)
    model = build_model("mlp", 10, in_features=64, hidden=(64, 48), batch_norm=False, generator=1)
    model.load_state_dict(train_model(model, data.train, epochs=20, generator=0).state_dict)
    model.eval()
    spec = trace_spec(model, next(iter(data.train))[0])
    p = random_permutation(spec, generator=3)
    return data, model, spec, apply_permutation(model.state_dict(), spec, p), invert_permutation(p)


@pytest.mark.slow
def test_neighbourhood_on_an_mlp_without_batch_norm(unnormalised_pair):
    """The 64-48 MLP without batch norm (curve fitted for 2 epochs and fixed, 4 held-out batches and the screen on
    the rest, each seed its own draw, defaults, 10 seeds): the planted permutation passes in >= 9 of 10 and its
    random control swaps are flagged in <= 1 of 10 (measured: 10 of 10, 0 of 10).
    One swapped pair of the 64-unit group (units 3 and 40) is not flagged, rightly: the curve fitted around the
    damaged permutation compensates for it, and the swap that undoes it raises the held-out objective of that
    curve (measured +0.0072 +- 0.0020, against a margin of 0.00016), so no improving move exists to find. (The
    issue's ">= 8 of 10 flagged" assumed the damage survives the curve fit; on this fixture it does not.)"""
    from neuralign.curves import fit_curve
    from neuralign.curves.pam import CurvePermutationProblem
    from neuralign.verification.local import _swap

    data, model, spec, b_state, perms = unnormalised_pair
    group = "hidden.0.fc"
    swapped = {g: q.clone() for g, q in perms.items()}
    swapped[group][[3, 40]] = perms[group][[40, 3]]
    curves = {}
    for case, use in (("planted", perms), ("swapped", swapped)):
        aligned = apply_permutation(b_state, spec, use)
        curves[case] = fit_curve(model, model.state_dict(), aligned, data.train, epochs=2, generator=0).curve
    damaged = CurvePermutationProblem(model, model.state_dict(), apply_permutation(b_state, spec, swapped), spec,
                                      data.train, heldout_loader=data.train_eval, value_batches=6)  # fmt: skip
    ctx = _Context(damaged, [damaged.start_offset(curves["swapped"])], spec)
    change = ctx.delta({group: _swap(64, 3, 40)})
    assert change.change - 3 * change.se > 0, change  # undoing the damage makes the fitted curve worse
    counts = {"planted": 0, "control": 0, "swapped": 0}
    for seed in range(10):
        planted = _neighbourhood(data, model, spec, b_state, perms, curves["planted"], seed)
        counts["planted"] += planted.verdict == "pass"
        counts["control"] += any(r.get("control_improving", 0) for r in planted.details["per_group"].values())
        counts["swapped"] += _neighbourhood(data, model, spec, b_state, swapped, curves["swapped"], seed).passed
    print(counts)
    assert counts["planted"] >= 9 and counts["control"] <= 1 and counts["swapped"] >= 9, counts


def test_swap_search_counts_only_improvements_beyond_the_margin(planted):
    """PAM's swap local search (used by the stability check) applies a swap only if it lowers the objective
    significantly by more than ``min_improvement`` of it, as the neighbourhood check counts moves."""
    from neuralign.curves.pam import CurvePermutationProblem, _swap_search

    data, model, spec, b_state, perms = planted
    damaged = _damaged(perms, 0.3)
    prob = CurvePermutationProblem(model, model.state_dict(), apply_permutation(b_state, spec, damaged), spec,
                                   data.train, heldout_loader=data.train_eval, value_batches=6)  # fmt: skip
    x = [torch.zeros(sum(prob.numels), dtype=prob.dtype)]  # the straight line
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    moved = {}
    for margin in (0.0, 1.0):  # 1.0: an improvement of the whole objective, never reached
        found = _swap_search(prob, 200, 0.05, torch.Generator().manual_seed(0), margin)(x, dict(ident))
        moved[margin] = sum(int((found[g] != ident[g]).sum()) for g in ident)
    assert moved[0.0] >= 2 and moved[1.0] == 0, moved


def test_swap_search_tries_the_proposed_transpositions_first(planted):
    """With one trial per group PAM's swap local search finds the transposition that undoes a swapped pair when it
    is proposed, and not by its random draw (seeded); a bad proposal is refused in one line."""
    from neuralign.curves.pam import CurvePermutationProblem, _check_proposals, _swap_search

    data, model, spec, b_state, perms = planted
    damaged = _damaged(perms, 2 / 16)
    u, v = (damaged[GROUP] != perms[GROUP]).nonzero().flatten().tolist()
    prob = CurvePermutationProblem(model, model.state_dict(), apply_permutation(b_state, spec, damaged), spec,
                                   data.train, heldout_loader=data.train_eval, value_batches=4)  # fmt: skip
    x = [torch.zeros(sum(prob.numels), dtype=prob.dtype)]
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    undo = ident[GROUP].clone()
    undo[[u, v]] = undo[[v, u]]
    for proposals, fixed in (({GROUP: [(u, v)]}, True), (None, False)):
        found = _swap_search(prob, 1, 0.05, torch.Generator().manual_seed(0), 0.0, proposals)(x, dict(ident))
        assert torch.equal(found[GROUP], undo) == fixed, (proposals, found[GROUP])
    for bad, match in (({"nope": [(0, 1)]}, "not a group"), ({GROUP: [(2, 2)]}, "two distinct positions"),
                       ({GROUP: [(0, 16)]}, r"\[0, 16\)"), ({GROUP: [(0.5, 1)]}, "pair of integer positions"),
                       ({GROUP: [(0, 1, 2)]}, "pair of integer positions"), ({GROUP: [3]}, "pair of integer"),
                       ({GROUP: [(True, False)]}, "pair of integer positions")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _check_proposals(bad, spec)
    with pytest.raises(TypeError, match="must be a dict"):
        _check_proposals([(0, 1)], spec)
    assert _check_proposals({GROUP: torch.tensor([[0, 1]])}, spec) == {GROUP: [(0, 1)]}


def _context(planted, value_batches=3):
    from neuralign.curves.pam import CurvePermutationProblem

    data, model, spec, b_state, perms = planted
    aligned = apply_permutation(b_state, spec, perms)
    prob = CurvePermutationProblem(model, model.state_dict(), aligned, spec, data.train,
                                   heldout_loader=data.train_eval, value_batches=value_batches)  # fmt: skip
    x = [torch.randn(sum(prob.numels), generator=torch.Generator().manual_seed(0)) * 0.01]
    return _Context(prob, x, spec)


def test_per_example_losses_average_to_the_batch_objective_and_pair_by_example(planted):
    """Two computations of the held-out objective agree: the mean of the per-example data terms of each batch (the
    paired tests' unit) plus the weight-decay term, and the problem's batch value (float32 means of 256 terms: 1e-5
    relative). The paired change is the mean and standard error of the per-example differences of the data term,
    with examples - 1 degrees of freedom, and the regulariser's change beside it."""
    from neuralign.verification.local import _swap

    ctx = _context(planted)
    change = {GROUP: _swap(16, 2, 5)}
    per_example, penalty = ctx.losses(change)
    sizes = [b[0].shape[0] for b in ctx.problem.value_set]
    means = torch.stack([v.mean() for v in per_example.split(sizes)]) + penalty
    torch.testing.assert_close(means, ctx.problem.batch_values(ctx.x, ctx.mats(change)), rtol=1e-5, atol=0)
    base, base_penalty = ctx.base_losses()
    d = per_example - base
    result = ctx.delta(change)
    assert result.change == pytest.approx(float(d.mean()), rel=1e-9)
    assert result.se == pytest.approx(float(d.std(correction=1)) / len(d) ** 0.5, rel=1e-9)
    assert result.regulariser == pytest.approx(penalty - base_penalty, rel=1e-12) and result.regulariser != 0
    assert not result.regulariser_only and result.t == pytest.approx(result.change / result.se, rel=1e-12)
    assert ctx.examples == len(d) == sum(sizes) > 3 * 64


def test_batched_screen_equals_one_network_per_candidate(planted):
    """The screen's batched evaluation (vmap over the stacked layers of the permuted group) computes what one
    network per transposition computes, per example of each slice of the screening set, for every group, batch
    norm on each candidate's slice statistics (float32 per-example losses: 1e-5 relative, 1e-6 absolute); so do
    both ways through the group's chain (the producer and consumer on the moved units: the same sums in another
    order). Its first call for a group measures both ways and keeps the batched values, less the identity's (the
    change per example)."""
    from torch.func import functional_call

    from neuralign.verification.local import _example_loss, _Screen, _swap

    ctx = _context(planted)
    data = planted[0]
    x, y = next(iter(data.train))
    screen = _Screen(ctx, (x, y), (0.25, 0.5))
    dense = _Screen(ctx, (x, y), (0.25, 0.5), chains=False)
    assert [(s.start, s.stop) for s in screen.slices] == [(0, 32), (32, 64)] and x.shape[0] == 64
    for g, n in ctx.spec.sizes.items():
        cands = [_swap(n, i, j) for i, j in ((0, 1), (2, 9), (n - 1, 3))]
        for part in (0, 1):
            one = dense._one_by_one(g, cands, part)
            assert one.shape == (3, 32) and one.dtype == torch.float64
            # the curve's point as the objective computes it (dense permutation matrices on every parameter):
            # the same values, exactly (a permutation matrix's product only moves entries)
            prob, s = ctx.problem, screen.slices[part]
            with torch.no_grad():
                full = sum(_example_loss(functional_call(prob.model, (prob.weights(ctx.x, ctx.mats({g: cands[1]}), t),
                                                                      prob.buffers), (x[s],)), y[s])
                           for t in (0.25, 0.5)) / 2  # fmt: skip
            torch.testing.assert_close(one[1], full, rtol=0, atol=0)
            # float32 losses from 1e-3 to 10: rounding of 1e-5 relative, and 1e-7 absolute on the smallest
            for way in (dense._batched, screen._batched, screen._one_by_one):
                torch.testing.assert_close(way(g, cands, part), one, rtol=1e-5, atol=1e-6)
        assert ctx.problem.chain(g) is not None and dense._chain(g, cands) is None
        assert g not in screen.batched
        change = screen(g, cands, 1)  # the first chunk: its first half batched, the rest one at a time
        halves = torch.cat([screen._batched(g, cands[:1], 1), screen._one_by_one(g, cands[1:], 1)])
        torch.testing.assert_close(change, halves - screen.identity(1), rtol=0, atol=0)
        assert g in screen.batched and screen.seconds[g] > 0
        assert len(set(one.mean(1).tolist())) == 3  # the swaps change the objective: the comparison is not vacuous
    # the identity's own change is 0 for every example, up to the two ways' float32 rounding of losses below 10
    assert float(screen(GROUP, [torch.arange(16)], 0).abs().max()) < 1e-5


def test_slices_double():
    """The race's slices: 32 examples, then each as large as all before it, the last cut at the set's end."""
    from neuralign.verification.local import _slices

    assert [(s.start, s.stop) for s in _slices(256)] == [(0, 32), (32, 64), (64, 128), (128, 256)]
    assert [(s.start, s.stop) for s in _slices(100)] == [(0, 32), (32, 64), (64, 100)]
    assert [(s.start, s.stop) for s in _slices(20)] == [(0, 20)]


def test_stability_tests_at_least_at_the_neighbourhood_checks_z_and_reads_the_held_out_batches_once(planted,
                                                                                                   damaged_report):
    """Where both checks run, stability's critical value is at least the neighbourhood check's (a move both score
    is flagged by both or by neither; its own family, the moves PAM kept, is smaller). The held-out loader is read
    in one pass, no further than the scored batches and the screening examples need: PAM in the stability check
    takes the same scored batches (a loader that can be iterated once works)."""
    stability, neighbourhood = (damaged_report.checks[c] for c in ("stability", "neighbourhood"))
    assert stability.details["moves"] and stability.thresholds["z"] >= neighbourhood.thresholds["z"]
    data = planted[0]
    batches = list(data.train_eval)
    read = []

    def once():
        for i, b in enumerate(batches):
            read.append(i)
            yield b

    report = _verify(planted, planted[4], checks=("stability", "certificate"), heldout_loader=once())
    assert read == [0, 1, 2, 3] and report.checks["stability"].verdict == "pass"
    read.clear()
    _verify(planted, planted[4], checks=("stability", "neighbourhood"), heldout_loader=once())
    assert read == [0, 1, 2, 3, 4]  # the fifth: the 256 screening examples


def test_stability_counts_only_significant_moves(planted, damaged_report, monkeypatch):
    """With 4 of 16 units swapped in pairs, PAM from the damaged permutation reassigns more than 5% of the group and
    the move improves the held-out objective significantly: the failure names the group, the units, the change
    and its t. The same run, with every move's held-out change made 0 +- 1 (no evidence), passes although PAM
    reassigns as many units."""
    stab = damaged_report.checks["stability"]
    assert stab.verdict == "fail"
    moves = [m for m in stab.details["moves"] if m["significant"]]
    assert moves and all(m["change"] + stab.thresholds["z"] * m["se"] < -stab.thresholds["margin"] for m in moves)
    m = moves[0]
    assert m["group"] == GROUP and m["reassigned_fraction"] > 0.05 and m["t"] < -stab.thresholds["z"]
    assert set(m["units"]) <= set(range(16)) and len(m["units"]) >= 2
    assert f"{GROUP} units" in stab.summary and "t = " in stab.summary
    monkeypatch.setattr(_Context, "delta", lambda self, changes, *test: _Change(0.0, 1.0, 0.0, False, self.examples))
    lenient = _verify(planted, _damaged(planted[4], 0.3), checks=("stability", "neighbourhood"))
    check = lenient.checks["stability"]
    frac = check.details["runs"]["alignment"]["reassigned_fraction"][GROUP]
    assert max(frac) > 0.05 and check.verdict == "pass", check.summary
    assert check.details["moves"] and not any(m["significant"] for m in check.details["moves"])


def test_neighbourhood_progress_announces_its_time_and_ends_at_its_total(planted):
    """The neighbourhood check's progress: after a measured first step, a record with the expected seconds; then
    steps (milliseconds of work, measured as it is done, the rest estimated) that never decrease and end at the
    total, revised as the work goes. (How close the announced time comes to the time taken is a measurement, not
    a test: benchmarks/bench_verification.py.) Every other check announces its expected time with its first step;
    the alignment check's steps are the batches of its data pass and weight matching."""
    records = []
    report = _verify(planted, _damaged(planted[4], 0.5), checks=("neighbourhood", "gradient", "certificate",
                     "alignment"), n_swaps=2, n_control_swaps=1, screen_pairs=16, callback=records.append)  # fmt: skip
    # the report keeps each check's announced time and the time it took (in the order of CHECKS)
    first = {}
    for r in records:
        if "expected_seconds" in r:
            first.setdefault(r["check"], round(r["expected_seconds"], 3))
    assert report.config["expected_seconds"] == first  # the neighbourhood check ran first
    assert list(report.config["seconds"]) == list(report.config["expected_seconds"]) == ["certificate",
                                                                                       "neighbourhood", "gradient",
                                                                                       "alignment"]  # fmt: skip
    assert all(v > 0 for v in report.config["seconds"].values())
    gradient = [r for r in records if r["check"] == "gradient"]
    assert gradient[0]["start"] and gradient[1]["expected_seconds"] > 0  # every check: from its first step
    # the certificate counts milliseconds of work: everything before the held-out evaluations, then its scored moves
    # at their coordinate's cost measured on one held-out batch, each replaced by its own as it is scored; it
    # announces the whole before its first move and ends at its last total
    certificate = [r for r in records if r["check"] == "certificate" and not r["start"]]
    assert len(certificate) > 2 and certificate[0]["expected_seconds"] == certificate[0]["total"] / 1000.0
    steps = [r["step"] for r in certificate]
    assert steps == sorted(steps) and steps[-1] == certificate[-1]["total"] and 0 < steps[0] < steps[-1]
    mine = [r for r in records if r["check"] == "neighbourhood" and not r["start"]]
    announced = [r for r in mine if "expected_seconds" in r]
    assert len(announced) == 1 and announced[0]["expected_seconds"] > 0 and mine[0] is announced[0]
    steps = [r["step"] for r in mine]
    assert steps == sorted(steps) and steps[-1] == mine[-1]["total"]
    assert len({r["total"] for r in mine}) > 2  # revised as the races end and as moves are scored
    alignment = [r for r in records if r["check"] == "alignment" and not r["start"]]
    batches = len(planted[0].align)
    assert batches > 1 and [r["step"] for r in alignment] == list(range(1, batches + 2)), alignment
    assert {r["total"] for r in alignment} == {batches + 1} and alignment[0]["expected_seconds"] > 0


def test_alignment_check_refuses_an_empty_align_loader_first_and_counts_a_loader_without_a_length(planted):
    """An empty ``align_loader`` is refused in one line before any check runs (it failed when the alignment check,
    the last, ran); a loader whose ``__len__`` raises (not only TypeError) has its data pass counted as one step."""
    data = planted[0]

    class Lying:
        def __iter__(self):
            return iter(data.align)

        def __len__(self):
            raise NotImplementedError("no length")

    records = []
    with pytest.raises(ValueError, match="`align_loader` has no batches"):
        _verify(planted, planted[4], checks=("stability", "alignment"), align_loader=[], callback=records.append)
    assert records == []
    with pytest.raises(ValueError, match="`align_loader` yielded no batches"):  # no length: refused when it runs
        _verify(planted, planted[4], checks=("alignment",), align_loader=iter(()))
    _verify(planted, planted[4], checks=("alignment",), align_loader=Lying(), callback=records.append)
    assert [r["step"] for r in records if not r["start"]] == [1, 2] and records[-1]["total"] == 2


def test_batched_screen_runs_networks_with_dropout():
    """Dropout in the objective's train mode: the batched screen draws a mask per candidate (vmap's
    randomness="different") instead of refusing; the values are losses of the right shape."""
    from neuralign.curves.pam import CurvePermutationProblem
    from neuralign.verification.local import _Screen, _swap

    data = load_data("digits", batch_size=64, generator=0)
    model = build_model("mlp", 10, in_features=64, hidden=(16, 16), batch_norm=True, dropout=0.2, generator=1)
    x, y = next(iter(data.train))
    spec = trace_spec(model, x)
    prob = CurvePermutationProblem(model, model.state_dict(), model.state_dict(), spec, data.train,
                                   heldout_loader=data.train_eval, value_batches=2)  # fmt: skip
    screen = _Screen(_Context(prob, [torch.zeros(sum(prob.numels))], spec), (x, y), (0.5,))
    torch.manual_seed(0)
    values = screen._batched("hidden.0.fc", [_swap(16, 0, 1), _swap(16, 2, 3), _swap(16, 4, 5)])
    assert values.shape == (3, 32) and bool(torch.isfinite(values).all()) and bool((values > 0).all())


@pytest.fixture(scope="module")
def dead_units():
    """A 64-32-32-10 MLP without batch norm trained 30 epochs on the digits, the first 16 units of GROUP made dead
    (their bias lowered below every pre-activation on the shipped data, so that no example activates them) and
    trained 10 epochs more (the live units adapt, the dead stay dead), B a relabelled copy:
    ``(data, model, state, spec, b_state, perms)``."""
    data = load_data("digits", batch_size=64, generator=0)
    model = build_model("mlp", 10, in_features=64, hidden=(32, 32), batch_norm=False, generator=1)
    xs = torch.cat([b[0] for loader in (data.train_eval, data.test, data.align) for b in loader]).flatten(1)
    def kill(state):  # the first 16 units' largest pre-activation on the shipped data lowered to -0.5
        state = {k: v.clone() for k, v in state.items()}
        pre = xs @ state[f"{GROUP}.weight"].T + state[f"{GROUP}.bias"]
        state[f"{GROUP}.bias"][:16] -= pre.max(0).values[:16] + 0.5
        return state

    model.load_state_dict(kill(train_model(model, data.train, epochs=30, generator=0).state_dict))
    # the training batches are augmented: a dead unit that one of them activates is killed again after
    state = kill(train_model(model, data.train, epochs=10, generator=1).state_dict)
    pre = xs @ state[f"{GROUP}.weight"].T + state[f"{GROUP}.bias"]
    assert bool((pre[:, :16] < 0).all()) and bool((pre[:, 16:] > 0).any(0).all())  # 16 dead units, the others live
    model.load_state_dict(state)
    model.eval()
    spec = trace_spec(model, next(iter(data.train))[0])
    p = random_permutation(spec, generator=3)
    return data, model, state, spec, apply_permutation(state, spec, p), invert_permutation(p)


def _verify_dead(dead_units, perms, **kw):
    """The checks on the straight line from A to B aligned by ``perms`` (at the planted ``perms``: A itself, the
    curve objective's optimum over curves). 4 of the 6 held-out batches are scored, the neighbourhood check
    screens on the others."""
    data, model, state, spec, b_state, _ = dead_units
    aligned = apply_permutation(b_state, spec, perms)
    line = Bezier.between(*({k: sd[k] for k, _ in model.named_parameters()} for sd in (state, aligned)))
    options = dict(heldout_loader=data.train_eval, value_batches=4, align_loader=data.align, n_swaps=8,
                   n_control_swaps=16, generator=0, curve=line, max_batches=8, stability_iters=2, spec=spec)
    options.update(kw)
    return verify_alignment(model, state, b_state, perms, data.train, **options)


def test_moves_of_dead_units_change_only_the_regulariser_and_are_not_flagged(dead_units):
    """Exchanging two units that no held-out example activates leaves every example's data term bit for bit the
    same and changes only the weight-decay term, by the same amount for every example (the paired test of the total
    had standard error 0 and t = -inf, so such moves, random controls included, were flagged). They are reported
    apart and never flagged: at the planted optimum the certificate passes and no move of a dead unit is flagged,
    while a damaged pair of live units is flagged.

    (The neighbourhood check at the planted optimum flags 2 moves of live units of the second layer, t = -3.6
    against z = 3.1, screened on held-out examples the test does not score: mixing two units' weights at the
    line's midpoint can lower the objective of that fixed line. It passed when the screen used training batches,
    by the draw of those batches. Stability's PAM keeps other moves, which its own test over the held-out batches
    accepts and the per-example test at the neighbourhood check's z does not find significant: on this fixed line
    the two checks disagree, stability passing.)"""
    from neuralign.curves.pam import CurvePermutationProblem
    from neuralign.verification.local import _swap

    data, model, state, spec, b_state, perms = dead_units
    prob = CurvePermutationProblem(model, state, apply_permutation(b_state, spec, perms), spec, data.train,
                                   heldout_loader=data.train_eval, value_batches=4)  # fmt: skip
    ctx = _Context(prob, [torch.randn(sum(prob.numels), generator=torch.Generator().manual_seed(0)) * 0.01], spec)
    dead = ctx.delta({GROUP: _swap(32, 2, 13)})
    assert dead.regulariser_only and dead.change == 0.0 and dead.se == 0.0 and dead.regulariser < 0
    assert not dead.significant(1.0, 0.0)
    live = ctx.delta({GROUP: _swap(32, 20, 21)})
    assert not live.regulariser_only and live.se > 0
    report = _verify_dead(dead_units, perms, checks=("stability", "certificate", "neighbourhood"))
    assert report.checks["certificate"].verdict == "pass", report.checks["certificate"].summary
    neigh, stability = report.checks["neighbourhood"], report.checks["stability"]
    assert neigh.thresholds["screen_source"] == "held-out"
    assert not any(u < 16 for m in neigh.details["improving_moves"][GROUP] for u in m[1])
    # stability tests at the neighbourhood check's z at least; a move counted against it changes the data term: in
    # GROUP it moves a live unit (>= 16)
    assert stability.thresholds["z"] >= neigh.thresholds["z"]
    assert all(max(m["units"]) >= 16 for m in stability.details["moves"] if m["significant"] and m["group"] == GROUP)
    apart = neigh.details["regulariser_only_moves"]
    assert all(m[0] == GROUP and m[3] < 0 for m in apart), apart
    # control swaps among dead units whose regulariser change alone is beyond the margin (with standard error 0 the
    # test of the whole objective flagged them)
    assert any(m[4] == "control" and m[3] < -neigh.thresholds["margin"] for m in apart), apart
    assert neigh.details["per_group"][GROUP]["regulariser_only"] == len(apart)
    assert "change only the weight-decay term" in neigh.summary
    # the curve's data term along it is computed where moves improve only
    assert ("curve_data_term" in neigh.details) == any(neigh.details["improving_moves"].values())
    damaged = {g: q.clone() for g, q in perms.items()}
    damaged[GROUP][[20, 21]] = perms[GROUP][[21, 20]]
    flagged = _verify_dead(dead_units, damaged, checks=("neighbourhood",)).checks["neighbourhood"]
    assert flagged.verdict == "fail", flagged.summary
    assert [20, 21] in [m[1] for m in flagged.details["improving_moves"][GROUP]]
    # a failing neighbourhood check reports the fixed curve's held-out data term at value_ts and at its end points
    # (the line's start is A: its held-out cross-entropy, float32 means: 1e-6 relative)
    along = flagged.details["curve_data_term"]
    with torch.no_grad():
        a_loss = torch.cat([torch.nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in
                            prob.value_set]).double().mean()  # fmt: skip
    assert along["end_a"] == pytest.approx(float(a_loss), rel=1e-6)
    assert along["value_ts"] > along["end_a"] and "at its end points" in flagged.summary


def test_too_few_heldout_examples_are_refused(planted):
    """The paired tests need MIN_HELDOUT_EXAMPLES examples (a Bonferroni t-test at 1 or 2 degrees of freedom would
    decide nothing): 2 batches of 8 examples are refused with a line naming the argument and the count."""
    from neuralign.verification import MIN_HELDOUT_EXAMPLES

    data, model, spec, b_state, perms = planted
    few = [(x[:8], y[:8]) for x, y in list(data.train_eval)[:2]]
    with pytest.raises(ValueError, match=rf"^`heldout_loader` gave 16 held-out examples in 2 batches; the paired "
                                         rf"tests of the checks \['neighbourhood'\] need {MIN_HELDOUT_EXAMPLES} "
                                         r"at least$"):  # fmt: skip
        verify_alignment(model, model.state_dict(), b_state, perms, data.train, spec=spec, heldout_loader=few,
                         value_batches=2, checks=("neighbourhood",), fit_epochs=1, max_batches=2)  # fmt: skip
    report = verify_alignment(model, model.state_dict(), b_state, perms, data.train, spec=spec, heldout_loader=few,
                              value_batches=2, checks=("gradient",), fit_epochs=1, max_batches=2)  # fmt: skip
    assert list(report.checks) == ["gradient"]  # a check without a paired test runs


def test_alignment_check_accepts_aligns_own_tie_breaking_and_fails_a_damaged_pair():
    """align() matches by weights the units the data cannot tell apart: here 4 units of each of two random MLPs fire
    on one alignment example only, so their correlations tie up to float rounding and the weight-matched assignment
    leaves the correlation optimum (by about 1e-6 relative, above the 1e-9 tolerance). The check passes align()'s
    own output (it matches align()'s rule) and fails it with two live units swapped."""
    from neuralign.alignment import align
    from neuralign.optim import solve_assignment

    data = load_data("digits", batch_size=64, generator=0)
    xs = torch.cat([b[0] for b in data.align]).flatten(1)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=gen)
    u /= u.norm()
    top = (xs @ u).sort(descending=True).values
    threshold = float(top[:2].mean())  # between the largest projection on u and the second largest
    models = []
    for seed in (1, 2):
        m = build_model("mlp", 10, in_features=64, hidden=(16, 16), batch_norm=False, generator=seed)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        scale = torch.rand(4, generator=gen) + 0.5
        state[f"{GROUP}.weight"][:4] = scale[:, None] * u
        state[f"{GROUP}.bias"][:4] = -scale * threshold
        m.load_state_dict(state)
        models.append(m.eval())
    a, b = models
    spec = trace_spec(a, xs[:2])
    found = align(a, b, data.align, spec=spec, method="correlation")
    assert "could not tell apart" in found.message
    C = found.similarity[GROUP]
    optimum = solve_assignment(C, maximize=True).fun
    assert (optimum - float(C[torch.arange(16), found.perms[GROUP]].sum())) / optimum > 1e-7  # not the optimum

    def check(perms):
        return verify_alignment(a, a.state_dict(), b.state_dict(), perms, data.train, spec=spec,
                                checks=("alignment",), align_loader=data.align).checks["alignment"]  # fmt: skip

    own = check(found.perms)
    assert own.verdict == "pass", own.summary
    assert own.details["per_group"][GROUP]["relative_gap"] > own.thresholds["relative_gap"]
    assert own.details["per_group"][GROUP]["relative_gap_to_align"] == 0.0
    damaged = {g: p.clone() for g, p in found.perms.items()}
    damaged[GROUP][[8, 9]] = found.perms[GROUP][[9, 8]]
    bad = check(damaged)
    assert bad.verdict == "fail" and bad.details["per_group"][GROUP]["relative_gap_to_align"] > 1e-3, bad.summary
    assert f"below both the optimum and align()'s own correlation alignment: {GROUP}" in bad.summary


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_check_passes_with_dropout_layers_switched_off(dropout):
    """The curve problem switches its model's dropout layers off (the objective is deterministic), so the Taylor
    test decides with or without them, and the summary does not mention dropout."""
    from neuralign.curves.pam import CurvePermutationProblem

    data = load_data("digits", batch_size=64, generator=0)
    model = build_model("mlp", 10, in_features=64, hidden=(16, 16), dropout=dropout, generator=1)
    spec = trace_spec(model, next(iter(data.train))[0])
    prob = CurvePermutationProblem(model, model.state_dict(), model.state_dict(), spec, data.train,
                                   heldout_loader=data.train_eval, value_batches=2)  # fmt: skip
    ctx = _Context(prob, [torch.randn(sum(prob.numels), generator=torch.Generator().manual_seed(0)) * 0.01], spec)
    opts = SimpleNamespace(gradient_check_examples=8, min_slope=1.8, max_relative_error=1e-3, callback=None)
    torch.manual_seed(0)
    res = _check_gradient(ctx, opts, torch.Generator().manual_seed(0))
    assert res.verdict == "pass" and "dropout" not in res.summary, res.summary


class _DroppedAttention(nn.Module):
    """Tokens through a multi-head attention whose attention weights are dropped (its own dropout, on in train
    mode), pooled over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0]).mean(1)


def test_gradient_check_names_attention_dropout_when_it_cannot_decide():
    """Attention's own dropout stays on (it is no dropout layer the problem can switch off): it draws new masks at
    every evaluation, so the Taylor remainder is noise and the check cannot pass; its summary says that dropout is
    why."""
    from neuralign.curves.pam import CurvePermutationProblem

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(1)
    model = _DroppedAttention()
    spec = trace_spec(model.eval(), x[:2])
    prob = CurvePermutationProblem(model, model.state_dict(), model.state_dict(), spec, loader, value_batches=2)
    ctx = _Context(prob, [torch.randn(sum(prob.numels), generator=gen) * 0.01], spec)
    opts = SimpleNamespace(gradient_check_examples=8, min_slope=1.8, max_relative_error=1e-3, callback=None)
    torch.manual_seed(0)
    res = _check_gradient(ctx, opts, torch.Generator().manual_seed(0))
    assert res.verdict != "pass" and "dropout (p = 0.5)" in res.summary, res.summary


def test_the_screen_draws_held_out_examples_after_the_scored_batches_in_one_pass():
    """The scored held-out batches are the loader's first ``value_batches``; the screening examples the next ones
    of the same pass (disjoint from the scored examples of a fixed-order loader), and the loader is read no further
    than they need."""
    from neuralign.verification.local import _examples, _heldout_batches

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, generator=g), torch.randint(0, 2, (32,), generator=g)) for _ in range(10)]
    read = []

    def loader():
        for i, b in enumerate(batches):
            read.append(i)
            yield b

    scored, after = _heldout_batches(loader(), 4, 70)
    assert [b[0] for b in scored] == [b[0] for b in batches[:4]]
    assert [b[0] for b in after] == [b[0] for b in batches[4:7]] and read == list(range(7))
    x, y = _examples(after, 70, torch.device("cpu"))
    assert torch.equal(x, torch.cat([b[0] for b in batches[4:7]])[:70]) and y.shape == (70,)
    read.clear()
    assert len(_heldout_batches(loader(), 4, 0)[1]) == 0 and read == list(range(4))
    assert len(_heldout_batches(batches[:5], 4, 70)[1]) == 1  # the pass ends first


def test_the_neighbourhood_check_screens_on_held_out_examples_it_does_not_score(planted):
    """With room in the held-out loader after the scored batches the screen uses it (``screen_source``); without,
    training batches, with a warning that they may hold the scored examples' images."""
    data = planted[0]
    report = _verify(planted, planted[4], checks=("neighbourhood",), value_batches=4)
    assert report.checks["neighbourhood"].thresholds["screen_source"] == "held-out"
    assert report.checks["neighbourhood"].thresholds["heldout_examples"] == 4 * len(next(iter(data.train_eval))[0])
    with pytest.warns(UserWarning, match="screens on training batches"):
        report = _verify(planted, planted[4], checks=("neighbourhood",), value_batches=6)
    assert report.checks["neighbourhood"].thresholds["screen_source"] == "training"
