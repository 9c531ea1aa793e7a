import warnings

import pytest
import torch
import torch.nn.functional as F

from neuralign.alignment import (
    apply_permutation,
    identity_permutation,
    invert_permutation,
    random_permutation,
    trace_spec,
)
from neuralign.curves.pam import CurvePermutationProblem, fit_curve_pam
from neuralign.errors import ConvergenceWarning
from neuralign.experiments.models import build_model
from neuralign.optim import perm_to_matrix


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    w = torch.randn(16, 3, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]


def _trained(seed, batches, hidden=(12, 10)):
    model = build_model("mlp", 3, in_features=16, hidden=hidden, batch_norm=True, generator=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(15):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def planted():
    batches = _data()
    a = _trained(1, batches)
    spec = trace_spec(a, batches[0][0])
    p = random_permutation(spec, generator=3)
    b_state = apply_permutation(a.state_dict(), spec, p)
    return a, spec, p, b_state, batches


def test_pam_started_at_a_planted_alignment_stays_there(planted):
    a, spec, p, b_state, batches = planted
    inverse = invert_permutation(p)
    res = fit_curve_pam(a, a.state_dict(), b_state, batches, init=inverse, spec=spec, max_iter=3, x_epochs=1,
                        lam=1e6, generator=0)  # fmt: skip
    assert res.converged and res.status == 0 and "stable" in res.message
    for g in spec.groups:
        assert torch.equal(res.perms[g], inverse[g]), g
        assert res.changed[g] == [0] * res.n_iter
    assert res.history[-1] <= res.history[0] + 1e-6
    end = res.curve(1.0)
    for k, v in end.items():
        torch.testing.assert_close(v, a.state_dict()[k])


def test_pam_from_identity_never_increases_the_objective_in_the_p_step(planted):
    a, spec, p, b_state, batches = planted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit_curve_pam(a, a.state_dict(), b_state, batches, init="identity", spec=spec, max_iter=2, x_epochs=1,
                            lam=1e6, generator=0)  # fmt: skip
    still_moving = sum(c[-1] for c in res.changed.values()) > 0
    assert res.status == (1 if still_moving else 0)
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught) == still_moving
    assert res.n_iter == 2 and len(res.backtracks) == 2
    assert sum(sum(c) for c in res.changed.values()) > 0  # identity is far from optimal: PAM moves
    assert res.history[1] < res.history[0]


def test_alignment_init_composes_and_matches(planted):
    a, spec, p, b_state, batches = planted
    res = fit_curve_pam(a, a.state_dict(), b_state, batches, init="alignment", align_loader=batches[:2], spec=spec,
                        max_iter=1, x_epochs=1, generator=0)  # fmt: skip
    inverse = invert_permutation(p)
    for g in spec.groups:
        assert torch.equal(res.init_perms[g], inverse[g])
        assert torch.equal(res.perms[g], inverse[g])


def test_gradient_in_p_matches_finite_differences(planted):
    a, spec, _, b_state, batches = planted
    prob = CurvePermutationProblem(a, a.state_dict(), b_state, spec, batches, value_batches=2)
    x = [torch.randn(sum(prob.numels), generator=torch.Generator().manual_seed(0)) * 0.01]
    P = {g: perm_to_matrix(v, dtype=torch.float32).double().float() for g, v in identity_permutation(spec).items()}
    ts = [0.3, 0.7]
    G = prob.gradient_at(x, P, batches[:2], ts)
    direction = {g: torch.randn(n, n, generator=torch.Generator().manual_seed(1)) for g, n in spec.sizes.items()}
    eps = 1e-3
    plus = {g: P[g] + eps * direction[g] for g in P}
    minus = {g: P[g] - eps * direction[g] for g in P}
    with torch.no_grad():
        fd = (prob.objective(x, plus, batches[:2], ts) - prob.objective(x, minus, batches[:2], ts)) / (2 * eps)
    analytic = sum((G[g] * direction[g]).sum() for g in G)
    assert float(fd) == pytest.approx(float(analytic), rel=2e-2)


def test_resume_after_interrupt_equals_uninterrupted(planted, tmp_path):
    a, spec, _, b_state, batches = planted
    kw = dict(init="identity", spec=spec, max_iter=2, x_epochs=2, lam=1e6, generator=5)
    reference = fit_curve_pam(a, a.state_dict(), b_state, batches, **kw)
    seen = []

    def interrupt(record):
        seen.append(record)
        if record["stage"] == "x-epoch" and record["iteration"] == 2 and record["epoch"] == 1:
            raise KeyboardInterrupt

    path = tmp_path / "pam.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_curve_pam(a, a.state_dict(), b_state, batches, checkpoint=path, callback=interrupt, **kw)
    assert path.exists()
    resumed = fit_curve_pam(a, a.state_dict(), b_state, batches, checkpoint=path, **kw)
    assert resumed.history == reference.history
    assert resumed.changed == reference.changed
    for g in spec.groups:
        assert torch.equal(resumed.perms[g], reference.perms[g])
    torch.testing.assert_close(resumed.curve.points[1], reference.curve.points[1], rtol=0, atol=0)


def test_bad_input(planted):
    a, spec, p, b_state, batches = planted
    sd = a.state_dict()
    with pytest.raises(ValueError, match=r"unknown CurvePAMOptions.step 'exact'; expected one of \['birkhoff', "
                                         r"'linearized'\]"):  # fmt: skip
        fit_curve_pam(a, sd, b_state, batches, step="exact", spec=spec)
    with pytest.warns(DeprecationWarning, match="`method` is deprecated since neuralign 0.2; use `step`"), \
            pytest.raises(ValueError, match=r"unknown CurvePAMOptions.step 'exact'"):  # fmt: skip
        fit_curve_pam(a, sd, b_state, batches, method="exact", spec=spec)
    with pytest.raises(ValueError, match="`x_epochs` must be a positive int, got 0"):
        fit_curve_pam(a, sd, b_state, batches, x_epochs=0, spec=spec)
    with pytest.raises(ValueError, match="init='alignment' needs `align_loader`"):
        fit_curve_pam(a, sd, b_state, batches, init="alignment", spec=spec)
    with pytest.raises(ValueError, match="`init` group"):
        bad = {g: torch.zeros(n, dtype=torch.long) for g, n in spec.sizes.items()}
        fit_curve_pam(a, sd, b_state, batches, init=bad, spec=spec)
    with pytest.raises(ValueError, match="unknown init 'random'"):
        fit_curve_pam(a, sd, b_state, batches, init="random", spec=spec)
    with pytest.raises(ValueError, match="lam"):
        fit_curve_pam(a, sd, b_state, batches, lam=0.0, spec=spec)
