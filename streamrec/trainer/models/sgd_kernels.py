"""The compiled epoch (numba) of the SGD-trained rating models: biased MF, SVD++, timeSVD++ and the
integrated neighbourhood model.

Why compiled: the torch version of a mini-batch step computed every user's implicit sum
(N Y, a sparse product over the whole rating matrix) and a dense gradient of every table at every
step, so an epoch cost (ratings / batch) x ratings: SVD++ took 0.85 s on MovieLens 100K and 87 s
on a log ten times larger. Here a step touches the rows of its own ratings only, and a rating
costs O(|I_u| k).

Semantics are those of the survey's per-sample updates applied together over a mini-batch (the
exact gradient of the batch's summed loss, `tests/trainer/test_gradients.py` checks it against
autograd): every gradient of a step is computed from the parameters as they were when the step
began, the gradients of rows that occur twice in a step add up, then each table moves by its rate
times its gradient. Per rating (u, i, r), with e = r - prediction:

    b_u, b_i:  -e + reg_bias b                    P_u:  -e q_i + reg p_u
    q_i:       -e (p_u + z_u) + reg q_i           y_j (j in I_u):  -e |I_u|^-1/2 q_i + reg y_j
    timeSVD++: alpha_u: -e dev + reg_alpha alpha_u; A_u: -e q_i dev + reg_alpha A_u;
               b_u,bin and b_i,bin: -e + reg_bin b
    integrated: w_ij: -e n_ui res_uj + reg_w w_ij; c_ij: -e n_ui + reg_w c_ij (j in R^k(i; u))

Optional parts are off when their arrays are empty (no y: biased MF; no dev: no time terms; no
neighbour residuals: no neighbour terms). `rates` and `regs` hold, in order, the bias, factor,
drift (alpha), time-bin and neighbour-weight values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from numba import njit

from streamrec.trainer.interactions import Interactions


@njit(cache=True, nogil=True, fastmath=True)
def _prediction(x, u, i, d, b, mu, bu, bi, Q, user, timed, au, but, bit, neighbours, nb_res, nb_has, nb_norm, W, C):
    """Rating x's prediction: mu + b_u + b_i (+ the time terms at drift d and bin b, + the
    neighbour terms) + q_i . user, where `user` already holds p_u (+ z_u, + the drift of p_u).
    `timed` and `neighbours` switch the optional parts on (see the module doc)."""
    pred = mu + bu[u] + bi[i]
    if timed:
        pred += au[u] * d + but[u, b] + bit[i, b]
    if neighbours:
        acc = 0.0
        for m in range(nb_res.shape[1]):
            acc += nb_res[x, m] * W[i, m] + nb_has[x, m] * C[i, m]
        pred += nb_norm[x] * acc
    for f in range(user.shape[0]):
        pred += Q[i, f] * user[f]
    return pred


@njit(cache=True, nogil=True, fastmath=True)
def factor_epoch(order, batch_size, users, items, ratings, mu, bu, bi, P, Q, Y, indptr, indices, scale,
                 dev, bins, au, Ap, but, bit, nb_res, nb_has, nb_norm, W, C, rates, regs):
    """One epoch of mini-batch steps over the ratings in `order` (see the module doc); updates
    the parameter arrays in place. A user's implicit sum z_u and the y gradient are computed once
    per step for each user in it (their ratings' -e q_i summed first)."""
    k = P.shape[1]
    implicit, timed, neighbours = Y.shape[0] > 0, dev.shape[0] > 0, nb_res.shape[0] > 0
    n_users = P.shape[0]
    g_bu, g_bi, g_Q = np.zeros_like(bu), np.zeros_like(bi), np.zeros_like(Q)
    ratings_of = np.zeros(Y.shape[0])  # per y row: the step's ratings by users of that item
    move = np.empty(k, dtype=Y.dtype)
    g_au, g_Ap, g_but, g_bit = np.zeros_like(au), np.zeros_like(Ap), np.zeros_like(but), np.zeros_like(bit)
    g_W, g_C = np.zeros_like(W), np.zeros_like(C)
    Z = np.zeros((n_users if implicit else 0, k), dtype=Y.dtype)  # z_u of the step's users
    G = np.zeros((n_users, k), dtype=P.dtype)  # per user of the step: sum of -e q_i over its ratings
    count = np.zeros(n_users)
    stamp = np.full(n_users, -1, dtype=np.int64)
    step_users = np.empty(batch_size, dtype=np.int64)
    user = np.empty(k, dtype=P.dtype)
    n = order.shape[0]
    for step, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        n_step_users = 0
        for s in range(start, stop):  # the step's users, and their implicit sums
            u = users[order[s]]
            if stamp[u] == step:
                continue
            stamp[u] = step
            step_users[n_step_users] = u
            n_step_users += 1
            if implicit:
                for f in range(k):
                    Z[u, f] = 0.0
                for p in range(indptr[u], indptr[u + 1]):
                    j = indices[p]
                    for f in range(k):
                        Z[u, f] += Y[j, f]
                for f in range(k):
                    Z[u, f] *= scale[u]
        for s in range(start, stop):  # gradients, from the parameters as the step found them
            x = order[s]
            u, i = users[x], items[x]
            d = dev[x] if timed else 0.0
            b = bins[x] if timed else 0
            for f in range(k):
                user[f] = P[u, f]
            if timed:
                for f in range(k):
                    user[f] += Ap[u, f] * d
            if implicit:
                for f in range(k):
                    user[f] += Z[u, f]
            e = ratings[x] - _prediction(x, u, i, d, b, mu, bu, bi, Q, user, timed, au, but, bit, neighbours, nb_res,
                                         nb_has, nb_norm, W, C)
            g_bu[u] += -e + regs[0] * bu[u]
            g_bi[i] += -e + regs[0] * bi[i]
            count[u] += 1.0
            for f in range(k):
                G[u, f] -= e * Q[i, f]
                g_Q[i, f] += -e * user[f] + regs[1] * Q[i, f]
            if timed:
                g_au[u] += -e * d + regs[2] * au[u]
                for f in range(k):
                    g_Ap[u, f] += -e * Q[i, f] * d + regs[2] * Ap[u, f]
                g_but[u, b] += -e + regs[3] * but[u, b]
                g_bit[i, b] += -e + regs[3] * bit[i, b]
            if neighbours:
                grad = -e * nb_norm[x]
                for m in range(nb_res.shape[1]):
                    has = nb_has[x, m]
                    g_W[i, m] += grad * nb_res[x, m] + regs[4] * W[i, m] * has
                    g_C[i, m] += grad * has + regs[4] * C[i, m] * has
        for a in range(n_step_users):  # p_u; then y_j: its decay by reg over the step's ratings, then
            u = step_users[a]  # the sum of their -e |I_u|^-1/2 q_i (the gradient at the step's y)
            for f in range(k):
                P[u, f] -= rates[1] * (G[u, f] + regs[1] * count[u] * P[u, f])
            if implicit:
                for p in range(indptr[u], indptr[u + 1]):
                    ratings_of[indices[p]] += count[u]
        if implicit:
            for a in range(n_step_users):
                u = step_users[a]
                for p in range(indptr[u], indptr[u + 1]):
                    j = indices[p]
                    if ratings_of[j] != 0.0:
                        decay = 1.0 - rates[1] * regs[1] * ratings_of[j]
                        ratings_of[j] = 0.0
                        for f in range(k):
                            Y[j, f] *= decay
            for a in range(n_step_users):
                u = step_users[a]
                for f in range(k):
                    move[f] = rates[1] * scale[u] * G[u, f]
                for p in range(indptr[u], indptr[u + 1]):
                    j = indices[p]
                    for f in range(k):
                        Y[j, f] -= move[f]
        for a in range(n_step_users):
            u = step_users[a]
            count[u] = 0.0
            for f in range(k):
                G[u, f] = 0.0
        for s in range(start, stop):  # the other tables; a row met again has a zero gradient left
            x = order[s]
            u, i = users[x], items[x]
            bu[u] -= rates[0] * g_bu[u]
            g_bu[u] = 0.0
            bi[i] -= rates[0] * g_bi[i]
            g_bi[i] = 0.0
            for f in range(k):
                Q[i, f] -= rates[1] * g_Q[i, f]
                g_Q[i, f] = 0.0
            if timed:
                b = bins[x]
                au[u] -= rates[2] * g_au[u]
                g_au[u] = 0.0
                for f in range(k):
                    Ap[u, f] -= rates[2] * g_Ap[u, f]
                    g_Ap[u, f] = 0.0
                but[u, b] -= rates[3] * g_but[u, b]
                g_but[u, b] = 0.0
                bit[i, b] -= rates[3] * g_bit[i, b]
                g_bit[i, b] = 0.0
            if neighbours:
                for m in range(nb_res.shape[1]):
                    W[i, m] -= rates[4] * g_W[i, m]
                    g_W[i, m] = 0.0
                    C[i, m] -= rates[4] * g_C[i, m]
                    g_C[i, m] = 0.0


@njit(cache=True, nogil=True, fastmath=True)
def user_epoch(order, users, items, ratings, mu, bu, bi, P, Q, Y, indptr, indices, scale, dev, bins, au, Ap,
               but, bit, nb_res, nb_has, nb_norm, W, C, rates, regs):
    """One epoch of Koren's user-wise SGD over `order` (each user's ratings adjacent): z_u is
    summed once when a user's ratings begin, every rating then moves its own rows at once
    (per-sample updates), and the user's y_j move once at the end by the summed gradient
    e |I_u|^-1/2 q_i of its ratings after their decay by reg over those ratings. A rating costs
    O(k + neighbours) and a user O(|I_u| k) once per epoch, so an epoch is linear in the log."""
    k = P.shape[1]
    implicit, timed, neighbours = Y.shape[0] > 0, dev.shape[0] > 0, nb_res.shape[0] > 0
    z = np.zeros(k, dtype=P.dtype)
    gy = np.zeros(k, dtype=P.dtype)
    user = np.empty(k, dtype=P.dtype)
    n = order.shape[0]
    start = 0
    while start < n:
        u = users[order[start]]
        stop = start
        while stop < n and users[order[stop]] == u:
            stop += 1
        if implicit:
            for f in range(k):
                z[f] = 0.0
                gy[f] = 0.0
            for p in range(indptr[u], indptr[u + 1]):
                j = indices[p]
                for f in range(k):
                    z[f] += Y[j, f]
            for f in range(k):
                z[f] *= scale[u]
        for s in range(start, stop):
            x = order[s]
            i = items[x]
            d = dev[x] if timed else 0.0
            b = bins[x] if timed else 0
            for f in range(k):
                user[f] = P[u, f] + z[f]
            if timed:
                for f in range(k):
                    user[f] += Ap[u, f] * d
            e = ratings[x] - _prediction(x, u, i, d, b, mu, bu, bi, Q, user, timed, au, but, bit, neighbours, nb_res,
                                         nb_has, nb_norm, W, C)
            bu[u] += rates[0] * (e - regs[0] * bu[u])
            bi[i] += rates[0] * (e - regs[0] * bi[i])
            for f in range(k):
                q = Q[i, f]
                Q[i, f] += rates[1] * (e * user[f] - regs[1] * q)
                P[u, f] += rates[1] * (e * q - regs[1] * P[u, f])
                gy[f] += e * q
                if timed:
                    Ap[u, f] += rates[2] * (e * q * d - regs[2] * Ap[u, f])
            if timed:
                au[u] += rates[2] * (e * d - regs[2] * au[u])
                but[u, b] += rates[3] * (e - regs[3] * but[u, b])
                bit[i, b] += rates[3] * (e - regs[3] * bit[i, b])
            if neighbours:
                g = e * nb_norm[x]
                for m in range(nb_res.shape[1]):
                    has = nb_has[x, m]
                    W[i, m] += rates[4] * (g * nb_res[x, m] - regs[4] * W[i, m] * has)
                    C[i, m] += rates[4] * (g * has - regs[4] * C[i, m] * has)
        if implicit:
            decay = (1.0 - rates[1] * regs[1]) ** (stop - start)
            for f in range(k):
                gy[f] *= rates[1] * scale[u]
            for p in range(indptr[u], indptr[u + 1]):
                j = indices[p]
                for f in range(k):
                    Y[j, f] = Y[j, f] * decay + gy[f]
        start = stop


@dataclass(frozen=True)
class RatingRows:
    """Per-rating inputs of `factor_epoch`: (user, item, rating) rows, and for the optional parts
    each rating's drift and time bin (timeSVD++) or neighbour residuals, memberships and
    normalisation (integrated model)."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    dev: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    bins: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    nb_res: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    nb_has: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    nb_norm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.ratings)

    @classmethod
    def of(cls, data: Interactions) -> RatingRows:
        """One row per distinct (user, item) pair, its latest rating (`Interactions.pair_view`)."""
        users, items, ratings, _ = data.pair_view()
        return cls(users.astype(np.int64), items.astype(np.int64), ratings.astype(np.float32))


def implicit_rows(binary: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, |I_u|^-1/2) of the user x item matrix of rated pairs: SVD++'s N(u)."""
    sizes = np.diff(binary.indptr)
    scale = (1.0 / np.sqrt(np.maximum(sizes, 1))).astype(np.float32)
    return binary.indptr.astype(np.int64), binary.indices.astype(np.int64), scale


def user_grouped_order(users: np.ndarray, n_users: int, gen: torch.Generator) -> np.ndarray:
    """A random order of the ratings with each user's ratings adjacent (users in random order,
    then each user's ratings in random order): `user_epoch`'s input."""
    user_rank = torch.randperm(n_users, generator=gen).numpy()
    within = torch.rand(len(users), generator=gen).numpy()
    return _grouped_order(users, user_rank, within)


@njit(cache=True, nogil=True)
def _grouped_order(users, user_rank, within):
    """Ratings by their user's rank, then by `within`: a counting sort on the rank and a stable
    sort of each user's few ratings (the same order as np.lexsort((within, user_rank[users])),
    which sorts the whole log twice per epoch and cost as much as the epoch itself)."""
    n_users = user_rank.shape[0]
    starts = np.zeros(n_users + 1, dtype=np.int64)
    for x in range(users.shape[0]):
        starts[user_rank[users[x]] + 1] += 1
    for r in range(n_users):
        starts[r + 1] += starts[r]
    fill = starts[:-1].copy()
    order = np.empty(users.shape[0], dtype=np.int64)
    for x in range(users.shape[0]):
        r = user_rank[users[x]]
        order[fill[r]] = x
        fill[r] += 1
    for r in range(n_users):
        if starts[r + 1] - starts[r] > 1:
            segment = order[starts[r]:starts[r + 1]].copy()
            order[starts[r]:starts[r + 1]] = segment[np.argsort(within[segment], kind="mergesort")]
    return order


def _tables(rows: RatingRows, mu: float, theta: dict[str, np.ndarray],
            implicit: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> tuple:
    """The kernels' arguments after `order` (and the batch size): rows, then every table, with
    empty arrays for the parts a model does not have."""
    k = theta["P"].shape[1]
    none_1d, none_2d = np.zeros(0, np.float32), np.zeros((0, k), np.float32)
    indptr, indices, scale = implicit if implicit is not None else (
        np.zeros(1, np.int64), np.zeros(0, np.int64), none_1d)
    return (
        rows.users, rows.items, rows.ratings, float(mu),
        theta["bu"], theta["bi"], theta["P"], theta["Q"], theta["Y"] if implicit is not None else none_2d, indptr, indices, scale,
        rows.dev, rows.bins, theta.get("au", none_1d), theta.get("Ap", none_2d), theta.get("but", none_2d), theta.get("bit", none_2d),
        rows.nb_res, rows.nb_has, rows.nb_norm, theta.get("W", none_2d), theta.get("C", none_2d),
    )


def run_epoch(order: np.ndarray, batch_size: int, rows: RatingRows, mu: float, theta: dict[str, np.ndarray],
              implicit: tuple[np.ndarray, np.ndarray, np.ndarray] | None, rates: np.ndarray,
              regs: np.ndarray) -> None:
    """`factor_epoch` over `theta`'s tables (float32; `bu bi P Q` always, `Y` with `implicit`,
    `au Ap but bit` for time terms, `W C` for neighbour terms), updated in place."""
    factor_epoch(order.astype(np.int64), int(batch_size), *_tables(rows, mu, theta, implicit),
                 np.asarray(rates, np.float64), np.asarray(regs, np.float64))


def run_user_epoch(order: np.ndarray, rows: RatingRows, mu: float, theta: dict[str, np.ndarray],
                   implicit: tuple[np.ndarray, np.ndarray, np.ndarray] | None, rates: np.ndarray,
                   regs: np.ndarray) -> None:
    """`user_epoch` over `theta`'s tables (as `run_epoch`); `order` from `user_grouped_order`."""
    user_epoch(order, *_tables(rows, mu, theta, implicit), np.asarray(rates, np.float64),
               np.asarray(regs, np.float64))
