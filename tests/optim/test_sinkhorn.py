"""The Sinkhorn operator: marginals, closed forms, the low-temperature limit and a Taylor test of its gradient."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from neuralign.errors import NonFiniteError
from neuralign.optim import perm_to_matrix, sinkhorn, solve_assignment


def test_columns_sum_to_one_and_rows_converge():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    x = sinkhorn(scores, n_iter=1)
    # the last half-sweep normalises the columns: exact up to float64 rounding of a sum of 6 terms
    torch.testing.assert_close(x.sum(-2), torch.ones(3, 6, dtype=torch.float64), rtol=0, atol=1e-14)
    assert float((x.sum(-1) - 1).abs().max()) > 1e-6  # one sweep leaves the rows off
    x = sinkhorn(scores, n_iter=500)
    torch.testing.assert_close(x.sum(-1), torch.ones(3, 6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((x >= 0).all())


def test_closed_form_of_a_symmetric_two_by_two():
    # exp([[2, 0], [0, 2]]) has equal row and column sums, so one normalisation is the fixed point:
    # diagonal e^2 / (e^2 + 1), off-diagonal 1 / (e^2 + 1); the temperature divides the scores
    expected = math.exp(2) / (math.exp(2) + 1)
    x = sinkhorn(torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=torch.float64), tau=2.0, n_iter=3)
    torch.testing.assert_close(x, torch.tensor([[expected, 1 - expected], [1 - expected, expected]],
                                               dtype=torch.float64), rtol=0, atol=1e-15)  # fmt: skip


def test_batch_equals_each_matrix_alone():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 5, 5, generator=g)
    batched = sinkhorn(scores, tau=0.5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], sinkhorn(scores[i, j], tau=0.5), rtol=0, atol=0)


def test_low_temperature_gives_the_linear_assignment():
    g = torch.Generator().manual_seed(2)
    n = 7
    scores = torch.randn(n, n, generator=g, dtype=torch.float64)
    best = solve_assignment(scores, maximize=True).perm
    values = sorted((float(scores[torch.arange(n), torch.tensor(p)].sum()) for p in itertools.permutations(range(n))),
                    reverse=True)  # fmt: skip
    gap = values[0] - values[1]
    tau = 0.01
    x = sinkhorn(scores, tau=tau, n_iter=300)
    # The limit maximises <S, X> + tau H(X), so <S, P*> - <S, X> <= tau (H(X) - H(P*)) <= tau n log n; writing X
    # as a mixture of permutations, that loss is at least gap (1 - weight of P*), which bounds every entry's
    # distance to P*: max |X - P*| <= tau n log n / gap (0.11 here)
    bound = tau * n * math.log(n) / gap
    assert float((x - perm_to_matrix(best, dtype=torch.float64)).abs().max()) <= bound
    assert torch.equal(x.argmax(dim=1), best)


def test_gradient_taylor_test():
    """f(S + hV) - f(S) - h <grad f, V> = O(h^2): the remainder falls 4x when h halves (a wrong gradient leaves an
    O(h) remainder, which halves)."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    direction = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)

    def f(s: torch.Tensor) -> torch.Tensor:
        return (weights * sinkhorn(s, tau=0.7, n_iter=20)).sum()

    value = f(scores)
    (grad,) = torch.autograd.grad(value, scores)
    slope = float((grad * direction).sum())
    hs = [1e-2 / 2**k for k in range(5)]
    with torch.no_grad():
        rem = [abs(float(f(scores + h * direction) - value) - h * slope) for h in hs]
    orders = [math.log2(rem[k] / rem[k + 1]) for k in range(len(hs) - 1)]
    # the smallest remainder (~1e-9) is far above float64 rounding of f (~1e-15), so the order is measured cleanly
    assert min(rem) > 1e-12
    assert all(1.9 < o < 2.1 for o in orders), orders
    # and the first-order term is not negligible: the test would see a wrong slope
    assert abs(slope) * hs[-1] > 100 * rem[-1]


def test_numpy_in_numpy_out():
    x = sinkhorn(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert isinstance(x, np.ndarray) and x.dtype == np.float64
    np.testing.assert_allclose(x.sum(0), [1.0, 1.0], atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scores": torch.zeros(3, 2)}, ValueError, r"`scores` must be \(\.\.\., n, n\) with n >= 1, got shape \(3, 2"),
        ({"scores": torch.zeros(3)}, ValueError, r"`scores` must be \(\.\.\., n, n\)"),
        ({"scores": torch.zeros(2, 2, dtype=torch.int64)}, TypeError, r"`scores` must be a real floating-point"),
        ({"scores": torch.zeros(2, 2), "tau": 0.0}, ValueError, r"`tau` must be"),
        ({"scores": torch.zeros(2, 2), "n_iter": 0}, ValueError, r"`n_iter` must be"),
        ({"scores": torch.tensor([[0.0, float("nan")], [0.0, 0.0]])}, NonFiniteError, r"NaN or infinite"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        sinkhorn(**kwargs)
