"""The compiled steps (streamrec.trainer.online.kernels) learn what the numpy steps they replaced
learned: BPR's rows and margins on random data to float32 rounding, including rows that occur
several times in one step, weighted positives, skips and several user passes; MF's rows, running
mean and squared errors to float64 rounding. Steps run one at a time or many per call alike."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from streamrec.trainer.online.kernels import UNSERVABLE, bpr_steps, mf_steps, rank_count, rank_linear

NO_BOUND = 1e30  # max_norm that never binds: the compiled steps compared with numpy's, which have none


def numpy_steps(P: np.ndarray, Q: np.ndarray, U: np.ndarray, I: np.ndarray, J: np.ndarray, W: np.ndarray,
                bounds: np.ndarray, skip_u: np.ndarray, skip_j: np.ndarray, skip_bounds: np.ndarray,
                lr: float, reg: float, skip_weight: float, iterations: int) -> tuple[list, list]:
    """The step loop of OnlineBPR._learn as it was in numpy (the reference), in place on P and Q;
    returns the positives' and the skips' margins per step."""
    dim, k = P.shape[1] - 1, J.shape[1]
    lr32, reg_k, reg32 = np.float32(lr), np.float32(reg * k), np.float32(reg)
    margins, skip_margins = [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        if b > a and k:
            u, i, j, w = U[a:b], I[a:b], J[a:b], W[a:b]
            pu, qi, qj = P[u], Q[i], Q[j]
            diff = qi[:, None, :] - qj
            x = np.einsum("nd,nkd->nk", pu, diff)
            margins.append(x)
            g = w[:, None] * expit(-x)
            item_steps = np.concatenate([g.sum(axis=1)[:, None] * pu - reg_k * qi,
                                         (-(g[..., None] * pu[:, None, :]) - reg32 * qj).reshape(-1, dim + 1)])
            for iteration in range(iterations):
                if iteration:
                    pu = P[u]
                    g = w[:, None] * expit(-np.einsum("nd,nkd->nk", pu, diff))
                user_step = np.einsum("nk,nkd->nd", g, diff) - reg_k * pu
                user_step[:, dim] = 0.0
                np.add.at(P, u, lr32 * user_step)
            np.add.at(Q, np.concatenate([i, j.ravel()]), lr32 * item_steps)
        a, b = skip_bounds[n], skip_bounds[n + 1]
        if b > a:
            u, j = skip_u[a:b], skip_j[a:b]
            pu, qj = P[u], Q[j]
            s = np.einsum("nd,nd->n", pu, qj)
            skip_margins.append(-s)
            g = skip_weight * expit(s)
            user_step = -(g[:, None] * qj + reg32 * pu)
            user_step[:, dim] = 0.0
            np.add.at(P, u, lr32 * user_step)
            np.add.at(Q, j, -lr32 * (g[:, None] * pu + reg32 * qj))
    return margins, skip_margins


def random_batch(seed: int, events: int, users: int, items: int, k: int, dim: int, step: int = 10) -> dict:
    """Rows and a batch with few users and items, so that rows repeat within a step."""
    rng = np.random.default_rng(seed)
    P = np.hstack([rng.normal(0, 0.3, (users, dim)), np.ones((users, 1))]).astype(np.float32)
    Q = rng.normal(0, 0.3, (items, dim + 1)).astype(np.float32)
    skip = rng.random(events) < 0.2
    positive_pos, skip_pos = np.flatnonzero(~skip), np.flatnonzero(skip)
    starts = list(range(0, events, step)) + [events]
    return {
        "P": P, "Q": Q,
        "U": rng.integers(0, users, len(positive_pos)), "I": rng.integers(0, items, len(positive_pos)),
        "J": rng.integers(0, items, (len(positive_pos), k)),
        "W": rng.choice([1.0, 0.5, 2.0], len(positive_pos)).astype(np.float32),
        "bounds": np.searchsorted(positive_pos, starts), "skip_u": rng.integers(0, users, len(skip_pos)),
        "skip_j": rng.integers(0, items, len(skip_pos)), "skip_bounds": np.searchsorted(skip_pos, starts),
    }


@pytest.mark.parametrize(("seed", "k", "iterations", "users", "items"),
                         [(0, 10, 3, 5, 12), (1, 1, 1, 40, 300), (2, 5, 2, 4, 10), (3, 0, 3, 6, 20)])
def test_compiled_steps_match_numpy_steps(seed: int, k: int, iterations: int, users: int, items: int) -> None:
    data = random_batch(seed, events=400, users=users, items=items, k=k, dim=16)
    lr, reg, skip_weight = 0.05, 0.01, 1.5
    P, Q = data["P"].copy(), data["Q"].copy()
    margins, skip_margins = numpy_steps(P, Q, data["U"], data["I"], data["J"], data["W"], data["bounds"],
                                        data["skip_u"], data["skip_j"], data["skip_bounds"], lr, reg, skip_weight,
                                        iterations)
    P2, Q2 = data["P"].copy(), data["Q"].copy()
    out = np.zeros((len(data["U"]), k), np.float32)
    skip_out = np.zeros(len(data["skip_u"]), np.float32)
    steps = len(data["bounds"]) - 1
    for first, last in [(0, 7), (7, 8), (8, steps)]:  # step by step (the trainer's hook) or many at once
        bpr_steps(P2, Q2, data["U"], data["I"], data["J"], data["W"], data["bounds"], data["skip_u"], data["skip_j"],
                  data["skip_bounds"], first, last, np.float32(lr), np.float32(reg), np.float32(reg * k),
                  np.float32(skip_weight), iterations, np.float32(NO_BOUND), out, skip_out)
    assert not np.allclose(P2, data["P"]) and not np.allclose(Q2, data["Q"])  # it learned something
    assert np.abs(P).max() < 10 and np.abs(Q).max() < 10  # and did not diverge (rounding would then grow)
    np.testing.assert_allclose(P2, P, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Q2, Q, rtol=1e-4, atol=1e-5)
    assert np.all(P2[:, -1] == 1.0)  # the users' constant column stays exactly 1
    if k:
        np.testing.assert_allclose(out, np.concatenate(margins), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(skip_out, np.concatenate(skip_margins), rtol=1e-4, atol=1e-5)


def numpy_mf_steps(P: np.ndarray, Q: np.ndarray, u: np.ndarray, i: np.ndarray, rating: np.ndarray,
                   bounds: np.ndarray, lr: float, reg: float, blr: float, breg: float) -> tuple[float, int, float]:
    """The step loop of OnlineMF._learn as it was in numpy (the reference), in place on P and Q."""
    dim = P.shape[1] - 1
    rating_sum, rating_count, squared = 0.0, 0, 0.0
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        if b <= a:
            continue
        r, uu, ii = rating[a:b], u[a:b], i[a:b]
        pu, qi = P[uu], Q[ii]
        mu = rating_sum / rating_count if rating_count else 0.0
        error = r - (mu + pu[:, dim] + qi[:, dim] + np.einsum("nd,nd->n", pu[:, :dim], qi[:, :dim]))
        rating_sum += float(r.sum())
        rating_count += len(r)
        squared += float((error**2).sum())
        np.add.at(P, uu, np.hstack([lr * (error[:, None] * qi[:, :dim] - reg * pu[:, :dim]),
                                    (blr * (error - breg * pu[:, dim]))[:, None]]))
        np.add.at(Q, ii, np.hstack([lr * (error[:, None] * pu[:, :dim] - reg * qi[:, :dim]),
                                    (blr * (error - breg * qi[:, dim]))[:, None]]))
    return rating_sum, rating_count, squared


@pytest.mark.parametrize(("seed", "users", "items"), [(0, 4, 9), (1, 50, 400)])
def test_compiled_mf_steps_match_numpy_steps(seed: int, users: int, items: int) -> None:
    rng = np.random.default_rng(seed)
    dim, events = 8, 300
    P0, Q0 = rng.normal(0, 0.1, (users, dim + 1)), rng.normal(0, 0.1, (items, dim + 1))
    rated = np.flatnonzero(rng.random(events) < 0.7)  # the other events are no ratings
    u, i = rng.integers(0, users, len(rated)), rng.integers(0, items, len(rated))
    rating = rng.integers(1, 6, len(rated)).astype(np.float64)
    bounds = np.searchsorted(rated, list(range(0, events, 10)) + [events])
    P, Q = P0.copy(), Q0.copy()
    expected = numpy_mf_steps(P, Q, u, i, rating, bounds, 0.007, 0.015, 0.005, 0.005)
    P2, Q2 = P0.copy(), Q0.copy()
    total, count, squared = 0.0, 0, 0.0
    for first, last in [(0, 11), (11, 12), (12, len(bounds) - 1)]:
        total, count, step_squared = mf_steps(P2, Q2, u, i, rating, bounds, first, last, 0.007, 0.015, 0.005, 0.005,
                                              total, count, 10.0, NO_BOUND)
        squared += step_squared
    assert not np.allclose(P2, P0)
    np.testing.assert_allclose(P2, P, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Q2, Q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((total, count, squared), expected, rtol=1e-10)


def numpy_rank(scores: np.ndarray, excluded: np.ndarray, target: int) -> tuple[int, int]:
    """The prequential rank counts as numpy computed them (the reference): NaN and the excluded
    columns become -inf; a target not held or not finite ranks below every finite candidate and
    cannot be served."""
    row = np.where(np.isnan(scores), -np.inf, scores)
    row[excluded] = -np.inf
    value = row[target] if target >= 0 else -np.inf
    if not np.isfinite(value):
        return int(np.isfinite(row).sum()), UNSERVABLE
    return int((row > value).sum()), int((row == value).sum()) - 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_count_matches_numpy_with_ties_nan_infinities_and_exclusions(dtype):
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        scores = rng.integers(-3, 4, n).astype(dtype)  # few values: many ties
        scores[rng.random(n) < 0.1] = np.nan
        scores[rng.random(n) < 0.05] = -np.inf
        scores[rng.random(n) < 0.05] = np.inf
        excluded = rng.choice(n, int(rng.integers(0, n)), replace=False).astype(np.int64)
        target = int(rng.integers(-1, n))
        assert rank_count(scores, excluded, target) == numpy_rank(scores.astype(np.float64), excluded, target)


def test_rank_linear_counts_as_rank_count_over_the_same_scores_with_dead_hidden_and_nan_rows():
    """The fused pass scores [p_u, 1] . [q_j, b_j] itself. Small integers keep every dot product
    exact in float32 (whatever the summation order), so the counts, ties included, must equal
    `rank_count` over the numpy scores with dead and hidden rows at -inf."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        n, dim = int(rng.integers(1, 80)), int(rng.integers(1, 40))
        items = rng.integers(-2, 3, (n, dim + 1)).astype(np.float32)
        items[rng.random(n) < 0.05, 0] = np.nan  # a diverged row counts as -inf
        user = np.ones(dim + 1, np.float32)
        user[:-1] = rng.integers(-2, 3, dim)
        alive = rng.random(n) > 0.1
        hidden = rng.random(n) < 0.1 if rng.random() < 0.7 else np.zeros(0, bool)  # empty: none hidden
        excluded = rng.choice(n, int(rng.integers(0, n)), replace=False).astype(np.int64)
        target = int(rng.integers(-1, n))
        scores = (items[:, :dim] @ user[:-1] + items[:, dim]).astype(np.float64)
        scores[~alive] = -np.inf
        if len(hidden):
            scores[hidden] = -np.inf
        expected = numpy_rank(scores, excluded, target)
        assert rank_linear(user, items, alive, hidden, excluded, target) == expected


def test_a_rating_far_off_the_scale_moves_the_rows_by_a_bounded_step() -> None:
    """One rating of 1e30 made every update non-finite: the parameter server refused the push and
    the trainer retried the batch for ever. The error is clipped to `max_error`, in the update and
    in the running mean, so the step is what a rating max_error above its prediction gives."""
    rng = np.random.default_rng(0)
    P0, Q0 = rng.normal(0, 0.1, (3, 5)), rng.normal(0, 0.1, (3, 5))
    u, i, bounds = np.array([0, 1]), np.array([0, 1]), np.array([0, 1, 2])
    steps = {}
    for name, poison in (("poison", 1e30), ("huge", 1e300), ("at the bound", None)):
        P, Q = P0.copy(), Q0.copy()
        first = mf_steps(P, Q, u, i, np.array([4.0, 4.0]), bounds, 0, 1, 0.007, 0.015, 0.005, 0.005, 0.0, 0, 10.0, NO_BOUND)
        predicted = first[0] / first[1] + P[1, 4] + Q[1, 4] + P[1, :4] @ Q[1, :4]
        rating = np.array([4.0, predicted + 10.0 if poison is None else poison])
        total, count, squared = mf_steps(P, Q, u, i, rating, bounds, 1, 2, 0.007, 0.015, 0.005, 0.005, *first[:2], 10.0, NO_BOUND)
        assert np.isfinite(P).all() and np.isfinite(Q).all() and np.isfinite(total) and squared == pytest.approx(100.0)
        steps[name] = (P, Q)
        if poison is not None:  # the mean moves as by a rating max_error above it
            assert (total, count) == (4.0 + 4.0 + 10.0, 2)
    for name in ("poison", "huge"):
        for got, expected in zip(steps[name], steps["at the bound"]):
            np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_burst_of_one_users_events_keeps_every_row_within_max_norm() -> None:
    """5,000 purchases by one user over 50 items (the updates of a user within a step add up,
    each from the step's initial rows) grew rows to 1e12 and then NaN: the parameter server
    refused the push and the trainer stopped on that batch at every restart. A run of ratings
    of 1e308 did the same to OnlineMF (its error is clipped, but never shrinks). Rows that
    leave the ball of radius max_norm are scaled back onto it, the users' constant 1 untouched."""
    rng = np.random.default_rng(0)
    dim, k, events, max_norm = 16, 10, 5000, 32.0
    P = np.hstack([rng.normal(0, 0.1, (1, dim)), np.ones((1, 1))]).astype(np.float32)
    Q = rng.normal(0, 0.1, (50, dim + 1)).astype(np.float32)
    U, I = np.zeros(events, np.int64), rng.integers(0, 50, events)
    J, W = rng.integers(0, 50, (events, k)), np.full(events, 5.0, np.float32)
    bounds = np.arange(0, events + 1, 10)
    margins, none = np.zeros((events, k), np.float32), np.zeros(0, np.int64)
    for bound, finite in ((NO_BOUND, False), (max_norm, True)):
        P1, Q1 = P.copy(), Q.copy()
        with np.errstate(all="ignore"):
            bpr_steps(P1, Q1, U, I, J, W, bounds, none, none, np.zeros(len(bounds), np.int64), 0, len(bounds) - 1,
                      np.float32(0.05), np.float32(0.01), np.float32(0.1), np.float32(1.0), 3, np.float32(bound),
                      margins, np.zeros(0, np.float32))
        assert np.isfinite(P1).all() and np.isfinite(Q1).all() if finite else not (
            np.isfinite(P1).all() and np.abs(Q1).max() < 1e6)  # without the bound it diverges
        if finite:
            assert np.linalg.norm(P1[:, :dim], axis=1).max() <= max_norm * (1 + 1e-5) and np.all(P1[:, -1] == 1.0)
            assert np.linalg.norm(Q1, axis=1).max() <= max_norm * (1 + 1e-5)
    P, Q = rng.normal(0, 0.1, (1, 9)), rng.normal(0, 0.1, (50, 9))
    u, i = np.zeros(12_000, np.int64), rng.integers(0, 50, 12_000)
    bounds = np.arange(0, 12_001, 10)
    mf_steps(P, Q, u, i, np.full(12_000, 1e308), bounds, 0, len(bounds) - 1, 0.007, 0.015, 0.005, 0.005, 0.0, 0,
             10.0, max_norm)
    assert np.isfinite(P).all() and np.isfinite(Q).all()
    assert max(np.linalg.norm(P, axis=1).max(), np.linalg.norm(Q, axis=1).max()) <= max_norm * (1 + 1e-9)
