"""Compiled steps of the online factor models (numba): the step-wise SGD of `OnlineBPR._learn`
and `OnlineMF._learn` without numpy's per-call overhead.

A step learns ~10 events, so numpy spends its time dispatching small operations (gathers, einsums,
`np.add.at`), 11-25 us per event here; the same arithmetic in one compiled loop costs 1-2 us per
event (BPR, 10 negatives, dim 32). The semantics of `bpr_steps` are those of the numpy step, to
float32 rounding:

- every gradient of a step is computed from the rows as they were when the step began, and the
  updates of rows that occur twice in a step add up (`np.add.at`);
- positives: x = [p_u, 1] . (q_i - q_j) over the k negatives j (the constant 1 carries the item
  bias), g = w sigma(-x); the item updates use the step's initial p_u, then `iterations` passes
  update the users, each recomputing g from the users as the previous pass left them;
- explicit negatives (skips), after the step's positives: s = [p_u, 1] . q_j, g = w_skip sigma(s).

The margins each example had before its step are written out for the loss. `mf_steps` is
`OnlineMF`'s predict-then-learn step in float64, the same to rounding. Both compile on import
(explicit signatures) and are cached in __pycache__ (`cache=True`): the first import after a change
takes a few seconds, later ones load the machine code, and no batch ever waits for compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Types of `bpr_steps`' arguments: rows float32 (C order), row positions int64.
_F2, _F1, _I2, _I1 = "float32[:, ::1]", "float32[::1]", "int64[:, ::1]", "int64[::1]"
_BPR_SIGNATURE = (f"void({_F2}, {_F2}, {_I1}, {_I1}, {_I2}, {_F1}, {_I1}, {_I1}, {_I1}, {_I1}, int64, int64, "
                  f"float32, float32, float32, float32, int64, float32, {_F2}, {_F1})")


@njit(cache=True, nogil=True)
def _sigmoid(x: np.float32) -> np.float32:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


@njit(cache=True, nogil=True)
def _within(row: np.ndarray, width: int, max_norm: float) -> None:
    """Scale row[:width] back onto the ball of radius `max_norm` when it left it (max-norm
    regularisation). A burst of one user's events sums that user's updates within a step, all
    computed from the step's initial rows: 5,000 purchases by one user grew rows to 1e12 and
    then NaN, which the parameter server refused, and the trainer stopped on that batch at every
    restart. Learned rows stay far inside the ball (MovieLens 100K's largest is 4.2)."""
    total = 0.0
    for d in range(width):
        total += float(row[d]) * float(row[d])
    if total > max_norm * max_norm:
        scale = max_norm / np.sqrt(total)
        for d in range(width):
            row[d] = row[d] * scale


@njit(cache=True, nogil=True)
def _positives(P: np.ndarray, Q: np.ndarray, u: np.ndarray, i: np.ndarray, j: np.ndarray, w: np.ndarray,
               lr: np.float32, reg: np.float32, reg_k: np.float32, iterations: int, max_norm: np.float32,
               margins: np.ndarray) -> None:
    m, k, width = len(u), j.shape[1], P.shape[1]
    dim = width - 1  # the last user column is the constant 1
    diff = np.empty((m, k, width), np.float32)
    g = np.empty((m, k), np.float32)
    item_i = np.empty((m, width), np.float32)
    item_j = np.empty((m, k, width), np.float32)
    for r in range(m):
        pu, qi = P[u[r]], Q[i[r]]
        g_sum = np.float32(0.0)
        for c in range(k):
            qj = Q[j[r, c]]
            x = np.float32(0.0)
            for d in range(width):
                diff[r, c, d] = qi[d] - qj[d]
                x += pu[d] * diff[r, c, d]
            margins[r, c] = x
            g[r, c] = w[r] * _sigmoid(-x)
            g_sum += g[r, c]
            for d in range(width):
                item_j[r, c, d] = -(g[r, c] * pu[d]) - reg * qj[d]
        for d in range(width):
            item_i[r, d] = g_sum * pu[d] - reg_k * qi[d]
    user_step = np.empty((m, width), np.float32)
    for iteration in range(iterations):  # extra passes move new users faster
        for r in range(m):
            pu = P[u[r]]
            if iteration:
                for c in range(k):
                    x = np.float32(0.0)
                    for d in range(width):
                        x += pu[d] * diff[r, c, d]
                    g[r, c] = w[r] * _sigmoid(-x)
            for d in range(dim):
                total = np.float32(0.0)
                for c in range(k):
                    total += g[r, c] * diff[r, c, d]
                user_step[r, d] = total - reg_k * pu[d]
            user_step[r, dim] = 0.0  # the constant stays 1
        for r in range(m):
            for d in range(width):
                P[u[r], d] += lr * user_step[r, d]
    for r in range(m):
        for d in range(width):
            Q[i[r], d] += lr * item_i[r, d]
        for c in range(k):
            for d in range(width):
                Q[j[r, c], d] += lr * item_j[r, c, d]
    for r in range(m):
        _within(P[u[r]], dim, max_norm)  # the constant 1 is no part of the user's vector
        _within(Q[i[r]], width, max_norm)
        for c in range(k):
            _within(Q[j[r, c]], width, max_norm)


@njit(cache=True, nogil=True)
def _skips(P: np.ndarray, Q: np.ndarray, u: np.ndarray, j: np.ndarray, weight: np.float32, lr: np.float32,
           reg: np.float32, max_norm: np.float32, margins: np.ndarray) -> None:
    m, width = len(u), P.shape[1]
    dim = width - 1
    pu = np.empty((m, width), np.float32)
    qj = np.empty((m, width), np.float32)
    g = np.empty(m, np.float32)
    for r in range(m):
        s = np.float32(0.0)
        for d in range(width):
            pu[r, d], qj[r, d] = P[u[r], d], Q[j[r], d]
            s += pu[r, d] * qj[r, d]
        margins[r] = -s
        g[r] = weight * _sigmoid(s)  # derivative of -log sigma(-s)
    for r in range(m):
        for d in range(dim):  # the constant stays 1
            P[u[r], d] += lr * -(g[r] * qj[r, d] + reg * pu[r, d])
    for r in range(m):
        for d in range(width):
            Q[j[r], d] += -lr * (g[r] * pu[r, d] + reg * qj[r, d])
    for r in range(m):
        _within(P[u[r]], dim, max_norm)
        _within(Q[j[r]], width, max_norm)


@njit(_BPR_SIGNATURE, cache=True, nogil=True)
def bpr_steps(P: np.ndarray, Q: np.ndarray, U: np.ndarray, I: np.ndarray, J: np.ndarray, W: np.ndarray,
              bounds: np.ndarray, skip_u: np.ndarray, skip_j: np.ndarray, skip_bounds: np.ndarray,
              first: int, last: int, lr: np.float32, reg: np.float32, reg_k: np.float32, skip_weight: np.float32,
              iterations: int, max_norm: np.float32, margins: np.ndarray, skip_margins: np.ndarray) -> None:
    """Learn steps first..last-1 in place on the user rows `P` ([p_u, 1]) and item rows `Q`.

    Step n's positives are rows bounds[n]:bounds[n+1] of (U, I, J, W): user and item positions,
    the (positives, k) negative positions and the weights; its skips are rows
    skip_bounds[n]:skip_bounds[n+1] of (skip_u, skip_j). Each example's margin before its step
    goes to the same rows of `margins` (positives, k) and `skip_margins` (the skip's -s). After
    each step, every row it touched is kept within `max_norm` (`_within`)."""
    k = J.shape[1]
    for n in range(first, last):
        a, b = bounds[n], bounds[n + 1]
        if b > a and k:
            _positives(P, Q, U[a:b], I[a:b], J[a:b], W[a:b], lr, reg, reg_k, iterations, max_norm, margins[a:b])
        a, b = skip_bounds[n], skip_bounds[n + 1]
        if b > a:
            _skips(P, Q, skip_u[a:b], skip_j[a:b], skip_weight, lr, reg, max_norm, skip_margins[a:b])


_D2, _D1 = "float64[:, ::1]", "float64[::1]"
_MF_SIGNATURE = (f"Tuple((float64, int64, float64))({_D2}, {_D2}, {_I1}, {_I1}, {_D1}, {_I1}, int64, int64, float64, "
                 "float64, float64, float64, float64, int64, float64, float64)")


@njit(_MF_SIGNATURE, cache=True, nogil=True)
def mf_steps(P: np.ndarray, Q: np.ndarray, u: np.ndarray, i: np.ndarray, rating: np.ndarray, bounds: np.ndarray,
             first: int, last: int, lr: float, reg: float, bias_lr: float, bias_reg: float,
             rating_sum: float, rating_count: int, max_error: float, max_norm: float) -> tuple[float, int, float]:
    """`OnlineMF`'s steps first..last-1 in place on the rows [p, b] (float64): step n's ratings are
    rows bounds[n]:bounds[n+1] of (u, i, rating). Each rating is predicted with the mean of the
    ratings before its step (mu), then learned; both rows' updates use the step's initial rows.
    The update's error is clipped to `max_error` (gradient clipping), and a rating enters the mean
    at most `max_error` from mu: one event valued 1e30 made every update non-finite, the parameter
    server refused the push, and the trainer retried that batch forever. Clipping alone does not
    bound a run of such ratings (the error stays at max_error, and the user's and items' vectors
    grow each other geometrically), so every row a step touched is kept within `max_norm`.
    Returns the new (rating_sum, rating_count) and the summed squared prediction error."""
    dim = P.shape[1] - 1
    squared_error = 0.0
    for n in range(first, last):
        a, b = bounds[n], bounds[n + 1]
        if b <= a:
            continue
        mu = rating_sum / rating_count if rating_count else 0.0
        pu = np.empty((b - a, dim + 1))
        qi = np.empty((b - a, dim + 1))
        error = np.empty(b - a)
        for r in range(b - a):
            pu[r], qi[r] = P[u[a + r]], Q[i[a + r]]
            dot = 0.0
            for d in range(dim):
                dot += pu[r, d] * qi[r, d]
            error[r] = rating[a + r] - (mu + pu[r, dim] + qi[r, dim] + dot)
            rating_sum += mu + min(max(rating[a + r] - mu, -max_error), max_error)
            error[r] = min(max(error[r], -max_error), max_error)
            squared_error += error[r] * error[r]
        rating_count += b - a
        for r in range(b - a):
            for d in range(dim):
                P[u[a + r], d] += lr * (error[r] * qi[r, d] - reg * pu[r, d])
            P[u[a + r], dim] += bias_lr * (error[r] - bias_reg * pu[r, dim])
        for r in range(b - a):
            for d in range(dim):
                Q[i[a + r], d] += lr * (error[r] * pu[r, d] - reg * qi[r, d])
            Q[i[a + r], dim] += bias_lr * (error[r] - bias_reg * qi[r, dim])
        for r in range(b - a):
            _within(P[u[a + r]], dim + 1, max_norm)
            _within(Q[i[a + r]], dim + 1, max_norm)
    return rating_sum, rating_count, squared_error


UNSERVABLE = -1  # `rank_count`'s ties for a target the model cannot put in a list
_RANK_SIGNATURES = [f"UniTuple(int64, 2)({row}, int64[::1], int64)" for row in ("float32[::1]", "float64[::1]")]


@njit(_RANK_SIGNATURES, cache=True, nogil=True)
def rank_count(scores: np.ndarray, excluded: np.ndarray, target: int) -> tuple[int, int]:
    """One scored event of the prequential protocol in one pass over a row of scores: (how many
    candidates score above column `target`, how many others tie it). Candidates are the columns
    not in `excluded` (the user's earlier items); NaN counts as -inf. A target that is negative
    (not held), excluded or not finite ranks below every finite candidate and cannot be served:
    (their number, `UNSERVABLE`), which the scorer counts as a miss (prequential.py)."""
    n = len(scores)
    out = np.zeros(n, np.bool_)
    for c in excluded:
        out[c] = True
    value = -np.inf
    if 0 <= target and not out[target] and not np.isnan(scores[target]):
        value = np.float64(scores[target])
    known = np.isfinite(value)
    greater, ties, finite = 0, 0, 0
    for c in range(n):
        if out[c]:
            continue
        s = scores[c]
        if np.isnan(s):
            continue  # -inf: never above, equal to or finite like a known target
        if np.isfinite(s):
            finite += 1
        if s > value:
            greater += 1
        elif s == value:
            ties += 1
    if not known:
        return finite, UNSERVABLE
    return greater, ties - 1


@njit(f"UniTuple(int64, 2)({_F1}, {_F2}, boolean[::1], boolean[::1], int64[::1], int64)",
      cache=True, nogil=True, fastmath={"reassoc", "contract"})
def rank_linear(user: np.ndarray, items: np.ndarray, alive: np.ndarray, hidden: np.ndarray,
                excluded: np.ndarray, target: int) -> tuple[int, int]:
    """`rank_count` of a linear model's scores, fused: column c scores user . items[c] (over
    `user`'s length: a constant 1 in the user's last slot carries an item bias column), and -inf
    where `alive[c]` is false or `hidden[c]` is true (`hidden` empty: nothing hidden). One pass
    computes the row and a second counts, where the numpy form took a matrix product, a bias sum,
    a float64 copy, two masks and the count: a dozen calls per scored event. fastmath lets the dot
    products use vector registers (reassociation only: NaN and infinities keep their meaning, a
    diverged row still counts as -inf); their sums may differ from BLAS's in the last bit of
    float32, which moves a rank only between two scores that equal each other to that bit."""
    n, width = len(alive), len(user)
    scores = np.empty(n, np.float32)
    masked = len(hidden) == n
    for c in range(n):
        if not alive[c] or (masked and hidden[c]):
            scores[c] = -np.inf
            continue
        s = np.float32(0.0)
        for d in range(width):
            s += user[d] * items[c, d]
        scores[c] = s
    return rank_count(scores, excluded, target)


@njit(f"float32[::1](float64[::1], {_F2}, {_I1}, float64)", cache=True, nogil=True)
def scoring_vector(row: np.ndarray, items: np.ndarray, rows: np.ndarray, weight: float) -> np.ndarray:
    """`rank_linear`'s user vector [p_u + weight * mean(q_s over the session's item rows), 1] in
    one call, to the bit of the one-user numpy form it replaced (`OnlineBPR._user_vector`) wherever
    dim >= 2 and the session weight fades (`session_fade` > 0; numpy summed a single column of 8
    or more rows pairwise, and multiplied an unfaded weight in float64, either of which can move
    the last bit): the session's rows (those >= 0: an evicted item drops out) summed in float32 in their order,
    the mean and its weighting in float32, added to the float64 row, then rounded to float32. The
    numpy form took six calls (a gather, a sum, a division, a product, a sum, a cast) per scored
    event, 4-10% of the live trainer. No fastmath: each column's sum keeps its order."""
    dim = len(row)
    total = np.zeros(dim, np.float32)
    count = 0
    for r in rows:
        if r >= 0:
            count += 1
            for d in range(dim):
                total[d] += items[r, d]
    vector = np.empty(dim + 1, np.float32)
    for d in range(dim):
        if count:
            vector[d] = np.float32(row[d] + np.float32(np.float32(weight) * (total[d] / np.float32(count))))
        else:
            vector[d] = np.float32(row[d])
    vector[dim] = np.float32(1.0)
    return vector
