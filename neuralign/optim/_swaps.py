r"""Swap moves of the quadratic assignment problem, compiled with numba: move values, their O(1) updates, 2-opt and
robust tabu search (the kernels behind :mod:`neuralign.optim.qap`; inputs are validated there).

For :math:`F(p) = \sum_{i,j} A_{ij} B_{p(i) p(j)}` the move :math:`(r, s)` exchanges :math:`p(r)` and
:math:`p(s)`; its value is :math:`\Delta_{rs} = F(p \circ (r\,s)) - F(p)`, kept for every pair :math:`r < s` in
the upper triangle of a matrix :math:`D`. A value costs :math:`O(n)` from scratch (:func:`move_value`); after a move
:math:`(u, v)` the value of every move disjoint from it changes by a term computed in :math:`O(1)` (:func:`make_move`,
Taillard 1991 §2), and only the :math:`2n` moves touching :math:`u` or :math:`v` are recomputed: :math:`O(n^2)` per
iteration instead of :math:`O(n^3)`. The kernels keep :math:`Q = B_{p,p}` (and its transpose) up to date with
:math:`p`, so that with ``A`` and its transpose (C-contiguous) every loop reads rows.

Why numba and not numpy: an iteration is a scan over :math:`n^2/2` pairs with a few branches (tabu status,
aspiration). Written as numpy array operations it costs about forty numpy calls per iteration, each paying
numpy's per-call overhead, which dominates for small :math:`n` whatever the batching; a tabu search needs
thousands of iterations. The kernels run on the caller's thread only (no ``parallel=True``, no BLAS, no torch), so
that a machine busy with other work slows them no more than it slows any single-threaded code. They are compiled on
first use and cached on disk (``cache=True``); ``import neuralign`` does not import numba.

Numba cannot read the clock, so the callers run the kernels in chunks of iterations and check their time budget
between chunks; the state of a run lives in arrays that the chunks update in place.

References
----------
.. [1] E. Taillard, "Robust taboo search for the quadratic assignment problem", Parallel Computing 17, 1991.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__: list[str] = []


@njit(cache=True)
def objective(A: np.ndarray, Q: np.ndarray) -> float:
    """:math:`F(p) = \\sum_{ij} A_{ij} Q_{ij}`, :math:`Q = B_{p,p}`."""
    return (A * Q).sum()


@njit(cache=True, fastmath={"reassoc", "nsz"})
def move_value(A: np.ndarray, At: np.ndarray, Q: np.ndarray, Qt: np.ndarray, r: int, s: int) -> float:
    r""":math:`\Delta_{rs}` in :math:`O(n)`. Only the terms of :math:`F` with :math:`i` or :math:`j` in
    :math:`\{r, s\}` change; with :math:`Q = B_{p,p}`,

    .. math::

        \Delta_{rs} = (A_{rr} - A_{ss})(Q_{ss} - Q_{rr}) + (A_{rs} - A_{sr})(Q_{sr} - Q_{rs})
        + \sum_{k \ne r, s} (A_{kr} - A_{ks})(Q_{ks} - Q_{kr}) + (A_{rk} - A_{sk})(Q_{sk} - Q_{rk}).

    The sum runs over every :math:`k` and the terms :math:`k \in \{r, s\}` are taken off after, so that the
    compiler can vectorise it: the sum may be reassociated (``fastmath`` reassoc), which is exact on integer data
    such as QAPLIB's and otherwise can change the last bits of a value from one CPU's vector width to another's
    (results are reproducible on one machine).
    """
    d = 0.0
    for k in range(Q.shape[0]):
        d += (At[r, k] - At[s, k]) * (Qt[s, k] - Qt[r, k]) + (A[r, k] - A[s, k]) * (Q[s, k] - Q[r, k])
    for k in (r, s):
        d -= (At[r, k] - At[s, k]) * (Qt[s, k] - Qt[r, k]) + (A[r, k] - A[s, k]) * (Q[s, k] - Q[r, k])
    return d + (A[r, r] - A[s, s]) * (Q[s, s] - Q[r, r]) + (A[r, s] - A[s, r]) * (Q[s, r] - Q[r, s])


@njit(cache=True)
def all_values(A: np.ndarray, At: np.ndarray, Q: np.ndarray, Qt: np.ndarray, D: np.ndarray) -> None:
    """Fill the upper triangle of ``D`` with every move value from scratch (:math:`O(n^3)`)."""
    n = Q.shape[0]
    for r in range(n):
        for s in range(r + 1, n):
            D[r, s] = move_value(A, At, Q, Qt, r, s)


@njit(cache=True)
def _exchange(M: np.ndarray, u: int, v: int) -> None:
    """Swap rows and columns ``u`` and ``v`` of ``M`` in place."""
    for k in range(M.shape[0]):
        M[u, k], M[v, k] = M[v, k], M[u, k]
    for k in range(M.shape[0]):
        M[k, u], M[k, v] = M[k, v], M[k, u]


@njit(cache=True)
def make_move(A: np.ndarray, At: np.ndarray, p: np.ndarray, Q: np.ndarray, Qt: np.ndarray, D: np.ndarray,
              work: np.ndarray, u: int, v: int) -> None:  # fmt: skip
    r"""Swap ``p[u]`` and ``p[v]`` (and rows and columns :math:`u, v` of ``Q``, ``Qt``) and bring ``D`` up to date
    in :math:`O(n^2)`.

    For a move :math:`(r, s)` disjoint from :math:`(u, v)`, with :math:`Q = B_{p,p}` after the move,

    .. math::

        \Delta'_{rs} = \Delta_{rs} + (A_{ru} - A_{rv} + A_{sv} - A_{su})(Q_{su} - Q_{sv} + Q_{rv} - Q_{ru})
        + (A_{ur} - A_{vr} + A_{vs} - A_{us})(Q_{us} - Q_{vs} + Q_{vr} - Q_{ur}):

    of the terms of :math:`F`, only those pairing :math:`\{r, s\}` with :math:`\{u, v\}` change with both moves
    ([1]_, in the notation :math:`B_{p(i)p(j)} = Q_{ij}`). It is computed as :math:`(\alpha_r - \alpha_s)
    (\beta_r - \beta_s) + (\gamma_r - \gamma_s)(\delta_r - \delta_s)` with :math:`\alpha_k = A_{ku} - A_{kv}`,
    :math:`\beta_k = Q_{kv} - Q_{ku}`, :math:`\gamma_k = A_{uk} - A_{vk}`, :math:`\delta_k = Q_{vk} - Q_{uk}`, read
    once per move into the rows of ``work`` (``(4, n)``, scratch). The :math:`2n` moves touching :math:`u` or
    :math:`v` are recomputed (:func:`move_value`).
    """
    n = p.size
    p[u], p[v] = p[v], p[u]
    _exchange(Q, u, v)
    _exchange(Qt, u, v)
    alpha, beta, gamma, delta = work[0], work[1], work[2], work[3]
    for k in range(n):
        alpha[k] = At[u, k] - At[v, k]
        beta[k] = Qt[v, k] - Qt[u, k]
        gamma[k] = A[u, k] - A[v, k]
        delta[k] = Q[v, k] - Q[u, k]
    for r in range(n):  # every pair, branch-free (the compiler vectorises it): rows u, v are rewritten below
        ar, br, gr, dr = alpha[r], beta[r], gamma[r], delta[r]
        for s in range(r + 1, n):
            D[r, s] += (ar - alpha[s]) * (br - beta[s]) + (gr - gamma[s]) * (dr - delta[s])
    _two_rows(A, At, Q, Qt, D, u, v)


@njit(cache=True, fastmath={"reassoc", "nsz"})
def _two_rows(A: np.ndarray, At: np.ndarray, Q: np.ndarray, Qt: np.ndarray, D: np.ndarray, u: int, v: int) -> None:
    """The values of the :math:`2n - 3` moves touching :math:`u` or :math:`v`, from scratch: :func:`move_value`
    for both rows at once, so that each row :math:`s` of the four matrices is read once for the two (the value is
    symmetric in its two units)."""
    n = Q.shape[0]
    for s in range(n):
        du = 0.0
        dv = 0.0
        for k in range(n):
            a, q, b, c = At[s, k], Qt[s, k], A[s, k], Q[s, k]
            du += (At[u, k] - a) * (q - Qt[u, k]) + (A[u, k] - b) * (c - Q[u, k])
            dv += (At[v, k] - a) * (q - Qt[v, k]) + (A[v, k] - b) * (c - Q[v, k])
        for w, d in ((u, du), (v, dv)):
            if s == w:
                continue
            for k in (w, s):
                d -= (At[w, k] - At[s, k]) * (Qt[s, k] - Qt[w, k]) + (A[w, k] - A[s, k]) * (Q[s, k] - Q[w, k])
            d += (A[w, w] - A[s, s]) * (Q[s, s] - Q[w, w]) + (A[w, s] - A[s, w]) * (Q[s, w] - Q[w, s])
            if s < w:
                D[s, w] = d
            else:
                D[w, s] = d


@njit(cache=True)
def two_opt_chunk(A: np.ndarray, At: np.ndarray, p: np.ndarray, Q: np.ndarray, Qt: np.ndarray, D: np.ndarray,
                  work: np.ndarray, eps: float, steps: int) -> int:  # fmt: skip
    """At most ``steps`` best-improvement swaps on ``p`` (in place, ``D`` its move values, kept up to date); returns
    the number made, fewer than ``steps`` only when no move improves by more than ``eps`` (a 2-opt local minimum).
    Ties go to the first pair in row-major order."""
    n = p.size
    for step in range(steps):
        best, bu, bv = -eps, -1, -1
        for r in range(n):
            for s in range(r + 1, n):
                if D[r, s] < best:
                    best, bu, bv = D[r, s], r, s
        if bu < 0:
            return step
        make_move(A, At, p, Q, Qt, D, work, bu, bv)
    return steps


@njit(cache=True)
def tabu_chunk(
    A: np.ndarray,
    At: np.ndarray,
    p: np.ndarray,
    Q: np.ndarray,
    Qt: np.ndarray,
    D: np.ndarray,
    work: np.ndarray,
    barred: np.ndarray,
    left: np.ndarray,
    best_p: np.ndarray,
    state: np.ndarray,
    lengths: np.ndarray,
    period: int,
    aspiration: float,
    eps: float,
    target: float,
    steps: int,
) -> int:
    r"""At most ``steps`` iterations of robust tabu search on ``p`` (in place); returns the number made, fewer only
    once the best objective is at most ``target``.

    ``state = [iteration, current objective, best objective]`` (updated); ``barred[i, l]``: the iteration until
    which unit :math:`i` may not go back to location :math:`l`; ``left[i, l]``: the last iteration at which :math:`i`
    left :math:`l` (0 at the start); ``lengths[j]``: the tenure of block ``first // period + j``, iteration
    :math:`t` (counted from 0 over the whole run) belonging to block ``t // period``, so that the draws do not
    depend on how the run is cut into chunks. Each iteration makes the best allowed move,
    improving or not:

    - aspiration by objective: the best move overall, if it leads below the best objective so far;
    - else long-term aspiration: the best move that puts both units on locations they have not left for
      ``aspiration`` iterations;
    - else the best move that is not tabu (tabu: it would put *both* units back on locations they are barred from);
    - else (every move tabu) the best move.

    Ties go to the first pair in row-major order. The units that move are barred from their old locations for the
    current tenure. The move values are recomputed from scratch every :math:`4n` iterations, so that rounding
    cannot accumulate on real-valued data.
    """
    n = p.size
    it = first = int(state[0])
    current, best = state[1], state[2]
    made = 0
    while made < steps and best > target:
        length = lengths[it // period - first // period]
        it += 1
        made += 1
        old = it - aspiration
        diversify = old > 0  # before then no location can have been left that long ago
        m_all, u_all, v_all = np.inf, -1, -1
        m_old, u_old, v_old = np.inf, -1, -1
        m_free, u_free, v_free = np.inf, -1, -1
        for r in range(n):
            pr = p[r]
            for s in range(r + 1, n):
                d = D[r, s]
                ps = p[s]
                if d < m_all:
                    m_all, u_all, v_all = d, r, s
                if diversify and d < m_old and left[r, ps] < old and left[s, pr] < old:
                    m_old, u_old, v_old = d, r, s
                if d < m_free and (barred[r, ps] <= it or barred[s, pr] <= it):
                    m_free, u_free, v_free = d, r, s
        if current + m_all < best - eps:
            u, v = u_all, v_all
        elif u_old >= 0:
            u, v = u_old, v_old
        elif u_free >= 0:
            u, v = u_free, v_free
        else:
            u, v = u_all, v_all
        current += D[u, v]
        for w in (u, v):
            barred[w, p[w]] = it + length
            left[w, p[w]] = it
        make_move(A, At, p, Q, Qt, D, work, u, v)
        if it % (4 * n) == 0:
            all_values(A, At, Q, Qt, D)
            current = objective(A, Q)
        if current < best - eps:
            best = current
            best_p[:] = p
    state[0], state[1], state[2] = it, current, best
    return made
