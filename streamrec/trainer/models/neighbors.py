"""Sparse similarity matrices, baselines and the k-nearest-neighbour estimate shared by the
neighbourhood models (user-knn, item-knn, amazon-i2i, neighborhood-factor).

Similarities are between the ROWS of an entity x feature matrix (items x users for item-based),
computed with sparse products, so only co-occurring pairs are ever materialised.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp
from numba import njit

Similarity = Literal["cosine", "adjusted-cosine", "pearson", "pearson-baseline", "jaccard", "cooccurrence"]
SIMILARITIES: tuple[str, ...] = get_args(Similarity)


def baselines(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int, n_items: int,
    reg_items: float = 10.0, reg_users: float = 15.0, epochs: int = 10,
) -> tuple[float, np.ndarray, np.ndarray]:
    """mu, b_u, b_i by alternating least squares on r - mu (Koren's baseline predictors)."""
    mu = float(ratings.mean()) if len(ratings) else 0.0
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    n_u = np.bincount(users, minlength=n_users)
    n_i = np.bincount(items, minlength=n_items)
    for _ in range(epochs):
        bi = np.bincount(items, ratings - mu - bu[users], n_items) / (reg_items + n_i)
        bu = np.bincount(users, ratings - mu - bi[items], n_users) / (reg_users + n_u)
    return mu, bu, bi


def _row_normalise(X: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ X


def _common_support_correlation(centred: sp.csr_matrix, binary: sp.csr_matrix) -> sp.csr_matrix:
    """sum_f x_af x_bf / sqrt(sum_f x_af^2 * sum_f x_bf^2), sums over features both rows have."""
    numerator = (centred @ centred.T).tocsr()
    squares = (centred.multiply(centred) @ binary.T).tocsr()  # [a, b] = sum over common f of x_af^2
    denominator = squares.multiply(squares.T).tocsr()
    denominator.data = 1.0 / np.sqrt(np.maximum(denominator.data, 1e-24))
    return numerator.multiply(denominator).tocsr()


def similarity(
    values: sp.csr_matrix, kind: str, shrinkage: float = 100.0, damping: float = 0.5,
    residuals: sp.csr_matrix | None = None,
) -> sp.csr_matrix:
    """Row x row similarity of `values` (entities x features), diagonal removed.

    cosine: over full rows; adjusted-cosine: features centred by feature (user) mean; pearson:
    rows centred by row mean, sums over common support; pearson-baseline: `residuals` (r - b_ui)
    over common support, shrunk by (n - 1) / (n - 1 + shrinkage); jaccard: |A & B| / |A | B|;
    cooccurrence (Amazon): |A & B| / (|A| |B|)^damping.
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")
    values = values.tocsr().astype(np.float64)
    binary = values.copy()
    binary.data[:] = 1.0
    if kind == "cosine":
        normed = _row_normalise(values)
        sim = (normed @ normed.T).tocsr()
    elif kind in ("jaccard", "cooccurrence"):
        common = (binary @ binary.T).tocsr()
        sizes = np.asarray(binary.sum(axis=1)).ravel()
        rows = np.repeat(np.arange(common.shape[0]), np.diff(common.indptr))
        a, b = sizes[rows], sizes[common.indices]
        denom = a + b - common.data if kind == "jaccard" else (a * b) ** damping
        sim = sp.csr_matrix((common.data / denom, common.indices, common.indptr), shape=common.shape)
    else:
        if kind == "pearson-baseline":
            if residuals is None:
                raise ValueError("pearson-baseline needs residuals")
            centred = residuals.tocsr()
        elif kind == "pearson":
            counts = np.maximum(np.diff(values.indptr), 1)
            means = np.asarray(values.sum(axis=1)).ravel() / counts
            centred = values.copy()
            centred.data -= np.repeat(means, np.diff(values.indptr))
        else:  # adjusted-cosine: subtract each feature's (user's) mean
            col_counts = np.maximum(np.bincount(values.indices, minlength=values.shape[1]), 1)
            col_means = np.bincount(values.indices, values.data, values.shape[1]) / col_counts
            centred = values.copy()
            centred.data -= col_means[values.indices]
        sim = _common_support_correlation(centred, binary)
        if kind == "pearson-baseline":
            support = (binary @ binary.T).tocsr()
            shrink = support.copy()
            shrink.data = np.maximum(support.data - 1.0, 0.0) / (np.maximum(support.data - 1.0, 0.0) + shrinkage)
            sim = sim.multiply(shrink).tocsr()
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    return sim


COMPILED_TOP_K_FROM = 1_000_000  # stored similarities from which `truncate_top_k` partitions rows


def truncate_top_k(sim: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep each row's k largest positive entries (the stored neighbour lists); of entries tied
    at the k-th value, the first ones in the row. Large matrices partition each row (compiled:
    15.3 s -> 0.84 s on 5,046 x 5,046); small ones sort in numpy, because the first compiled call
    of a process costs about 2 s of numba start-up, which a refit of a small catalogue would pay
    every time it starts (the demo's live refits)."""
    sim = sim.tocsr()
    if sim.nnz >= COMPILED_TOP_K_FROM:
        keep = _top_k_mask(sim.indptr.astype(np.int64), sim.data.astype(np.float64), int(k))
    else:
        rows = np.repeat(np.arange(sim.shape[0]), np.diff(sim.indptr))
        order = np.lexsort((np.arange(sim.nnz), -sim.data, rows))  # by row, best first, ties by position
        rank = np.arange(sim.nnz) - sim.indptr[rows[order]]
        keep = np.zeros(sim.nnz, dtype=bool)
        keep[order[(rank < k) & (sim.data[order] > 0)]] = True
    indptr = np.concatenate([[0], np.cumsum(keep)])[sim.indptr]  # kept entries before each row
    out = sp.csr_matrix((sim.data[keep], sim.indices[keep], indptr), shape=sim.shape)
    out.sort_indices()
    return out


@njit(cache=True, nogil=True)
def _k_best(values, k):
    """The k largest of `values` as a mask, found by a partition (no sort); of values tied at the
    k-th, the first ones. Every value when there are at most k."""
    chosen = np.ones(values.shape[0], dtype=np.bool_)
    if values.shape[0] <= k:
        return chosen
    threshold = -np.partition(-values, k - 1)[k - 1]
    ties = k
    for value in values:
        if value > threshold:
            ties -= 1
    for at in range(values.shape[0]):
        if values[at] == threshold and ties > 0:
            ties -= 1
        else:
            chosen[at] = values[at] > threshold
    return chosen


@njit(cache=True, nogil=True)
def _top_k_mask(indptr, data, k):
    """Per row, the k best entries (`_k_best`) that are positive: a partition per row instead of
    sorting every stored similarity."""
    keep = np.zeros(data.shape[0], dtype=np.bool_)
    for row in range(indptr.shape[0] - 1):
        lo, hi = indptr[row], indptr[row + 1]
        keep[lo:hi] = _k_best(data[lo:hi], k) & (data[lo:hi] > 0)
    return keep


@njit(cache=True, nogil=True)
def neighbour_residuals(users, items, neighbours, indptr, indices, residuals, n_items):
    """The integrated model's neighbour inputs per pair (u, i): for each of i's stored neighbours
    j, the residual r_uj - b_uj and 1 where u rated j (else 0, 0), and |R^k(i; u)|^-1/2 (0 when
    empty). Pairs are visited by user, whose residuals (`indptr`/`indices`/`residuals`, rows by
    user) are spread once into a dense buffer, so a neighbour costs one lookup."""
    n, k = users.shape[0], neighbours.shape[1]
    res = np.zeros((n, k))
    has = np.zeros((n, k))
    norm = np.zeros(n)
    dense = np.zeros(n_items)
    rated = np.zeros(n_items, dtype=np.bool_)
    current = -1
    for p in np.argsort(users, kind="mergesort"):
        u, i = users[p], items[p]
        if u < 0 or i < 0 or u >= indptr.shape[0] - 1:
            continue
        if u != current:
            if current >= 0:
                for at in range(indptr[current], indptr[current + 1]):
                    rated[indices[at]] = False
            for at in range(indptr[u], indptr[u + 1]):
                dense[indices[at]] = residuals[at]
                rated[indices[at]] = True
            current = u
        count = 0
        for m in range(k):
            j = neighbours[i, m]
            if j >= 0 and rated[j]:
                res[p, m] = dense[j]
                has[p, m] = 1.0
                count += 1
        if count > 0:
            norm[p] = 1.0 / np.sqrt(count)
    return res, has, norm


@njit(cache=True, nogil=True)
def knn_pairs(targets, lists, sim_indptr, sim_indices, sim_data, n_columns, list_indptr, list_indices,
              list_ratings, list_values, k, min_k):
    """KNNBaseline's estimate for each pair: the similarity-weighted mean of `list_values` over
    the k most similar entries of its candidate list with positive similarity to its target.

    Pair p's candidates are row `lists[p]` of the list matrix (item-knn: the items its user rated,
    valued by residual; user-knn: the users who rated its item, valued by rating), entries with a
    zero rating excluded; their similarity is row `targets[p]` of the similarity matrix
    (`n_columns` wide). Pairs are visited by target, whose row is spread once into a dense
    buffer, so a pair costs its candidates, not a dense row of the catalogue. Returns (estimate,
    found); found is False where fewer than `min_k` neighbours contributed (the caller falls back)."""
    n = targets.shape[0]
    estimate = np.zeros(n)
    found = np.zeros(n, dtype=np.bool_)
    longest = 0
    for row in range(list_indptr.shape[0] - 1):
        longest = max(longest, list_indptr[row + 1] - list_indptr[row])
    sims = np.empty(longest)
    values = np.empty(longest)
    dense = np.zeros(n_columns)
    current = -1
    for p in np.argsort(targets, kind="mergesort"):
        a, b = targets[p], lists[p]
        if a != current:
            if current >= 0:
                for at in range(sim_indptr[current], sim_indptr[current + 1]):
                    dense[sim_indices[at]] = 0.0
            for at in range(sim_indptr[a], sim_indptr[a + 1]):
                dense[sim_indices[at]] = sim_data[at]
            current = a
        count = 0
        for q in range(list_indptr[b], list_indptr[b + 1]):
            c = list_indices[q]
            if list_ratings[q] != 0 and dense[c] > 0:
                sims[count] = dense[c]
                values[count] = list_values[q]
                count += 1
        if count == 0:
            continue
        chosen = _k_best(sims[:count], k)  # a partition: popular items have thousands of raters
        total, weighted = 0.0, 0.0
        for c in range(count):
            if chosen[c]:
                total += sims[c]
                weighted += sims[c] * values[c]
        if total > 0:
            estimate[p] = weighted / total
            found[p] = min(count, k) >= min_k
    return estimate, found
