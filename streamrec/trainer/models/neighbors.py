"""Sparse similarity matrices, baselines and the k-nearest-neighbour estimate shared by the
neighbourhood models (user-knn, item-knn, amazon-i2i, neighborhood-factor).

Similarities are between the ROWS of an entity x feature matrix (items x users for item-based),
computed with sparse products, so only co-occurring pairs are ever materialised.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp

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


def truncate_top_k(sim: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep each row's k largest positive entries (the stored neighbour lists)."""
    sim = sim.tocsr()
    counts = np.diff(sim.indptr)
    rows = np.repeat(np.arange(sim.shape[0]), counts)
    order = np.lexsort((-sim.data, rows))  # by row, best first
    rank = np.arange(len(order)) - np.repeat(sim.indptr[:-1], counts)
    keep = order[(rank < k) & (sim.data[order] > 0)]
    out = sp.csr_matrix((sim.data[keep], (rows[keep], sim.indices[keep])), shape=sim.shape)
    out.sort_indices()
    return out


def knn_estimate(
    sims: np.ndarray, values: np.ndarray, available: np.ndarray, k: int, min_k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted mean of `values` over each row's k most similar available neighbours
    with positive similarity (KNNBaseline's rule). Returns (estimate, found); found is False where
    fewer than `min_k` neighbours contributed (the caller falls back)."""
    sims = np.where(available, sims, -np.inf)
    k = min(k, sims.shape[1])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    top_values = np.take_along_axis(values, top, axis=1)
    positive = top_sims > 0
    weights = np.where(positive, top_sims, 0.0)
    total = weights.sum(axis=1)
    found = positive.sum(axis=1) >= min_k
    estimate = np.divide((weights * top_values).sum(axis=1), total, out=np.zeros(len(total)), where=total > 0)
    return estimate, found & (total > 0)
