"""The neighbourhood kernels against their rules written densely. `knn_pairs`: for each
pair, the similarity-weighted mean of the values of the k most similar candidates with positive
similarity, found only when at least min_k of them contributed; `truncate_top_k`: each row's k
best positive similarities; `neighbour_residuals`: each pair's rated neighbours' residuals."""

import numpy as np
import pytest
import scipy.sparse as sp

from streamrec.trainer.models import neighbors
from streamrec.trainer.models.neighbors import (
    knn_pairs,
    neighbour_residuals,
    truncate_top_k,
)


def dense_rule(sim: np.ndarray, lists: sp.csr_matrix, values: sp.csr_matrix, targets, rows, k, min_k):
    estimate, found = np.zeros(len(targets)), np.zeros(len(targets), bool)
    for p, (a, b) in enumerate(zip(targets, rows)):
        available = lists[b].toarray().ravel() != 0
        s = np.where(available, sim[a], -np.inf)
        top = np.argsort(-s, kind="stable")[:k]
        top = top[s[top] > 0]
        if len(top) and s[top].sum() > 0:
            estimate[p] = (s[top] * values[b].toarray().ravel()[top]).sum() / s[top].sum()
            found[p] = len(top) >= min_k
    return estimate, found


@pytest.mark.parametrize("k,min_k", [(1, 1), (3, 1), (3, 2), (50, 1)])
def test_the_pairwise_estimate_is_the_dense_rule(k, min_k):
    rng = np.random.default_rng(k * 10 + min_k)
    n_targets, n_lists, width = 30, 25, 40
    sim = np.where(rng.random((n_targets, width)) < 0.5, rng.normal(size=(n_targets, width)), 0.0)  # negatives too
    lists = sp.csr_matrix(np.where(rng.random((n_lists, width)) < 0.3, rng.integers(1, 6, (n_lists, width)), 0))
    lists.data[::7] = 0  # a stored zero rating is not a neighbour
    values = lists.copy().astype(np.float64)
    values.data = rng.normal(size=len(values.data))
    targets, rows = rng.integers(0, n_targets, 400), rng.integers(0, n_lists, 400)
    sim_csr = sp.csr_matrix(sim)
    got = knn_pairs(targets, rows, sim_csr.indptr.astype(np.int64), sim_csr.indices.astype(np.int64), sim_csr.data,
                    width, lists.indptr.astype(np.int64), lists.indices.astype(np.int64),
                    lists.data.astype(np.float64), values.data, k, min_k)
    expected = dense_rule(sim, lists, values, targets, rows, k, min_k)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[1].any() and not got[1].all()


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "compiled"])
def test_truncation_keeps_each_rows_k_best_positive_similarities_first_of_ties_first(compiled, monkeypatch):
    monkeypatch.setattr(neighbors, "COMPILED_TOP_K_FROM", 0 if compiled else 10**12)
    sim = sp.csr_matrix(np.array([
        [0.0, 0.5, 0.5, 0.9, 0.5, -1.0],  # ties at the k-th value: the first of them stay
        [0.2, -0.3, 0.0, 0.0, 0.0, 0.0],  # fewer than k positives: every positive, no negative
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # an empty row stays empty
        [-0.1, -0.2, -0.3, 0.0, 0.0, 0.0],
    ]))
    kept = truncate_top_k(sim, 3).toarray()
    np.testing.assert_array_equal(kept, [[0, 0.5, 0.5, 0.9, 0, 0], [0.2, 0, 0, 0, 0, 0], [0] * 6, [0] * 6])


def test_the_integrated_models_neighbour_inputs_are_each_pairs_rated_neighbours_residuals():
    rng = np.random.default_rng(5)
    n_users, n_items, k = 12, 15, 4
    rated = rng.random((n_users, n_items)) < 0.4
    residual = np.where(rated, rng.normal(size=(n_users, n_items)), 0.0)
    neighbours = np.array([rng.permutation(n_items)[:k] for _ in range(n_items)])
    neighbours[::3, -1] = -1  # an item with fewer than k neighbours
    by_user = sp.csr_matrix(residual * rated)
    by_user.data[by_user.data == 0] = 1e-3  # keep every rated pair stored
    users = np.concatenate([rng.integers(0, n_users, 200), [-1, 3]])  # an unknown user, an unknown item
    items = np.concatenate([rng.integers(0, n_items, 200), [2, -1]])
    res, has, norm = neighbour_residuals(users, items, neighbours, by_user.indptr.astype(np.int64),
                                         by_user.indices.astype(np.int64), by_user.data, n_items)
    dense = by_user.toarray()
    for p, (u, i) in enumerate(zip(users, items)):
        if u < 0 or i < 0:
            assert not has[p].any() and norm[p] == 0
            continue
        expect_has = np.array([j >= 0 and rated[u, j] for j in neighbours[i]], float)
        np.testing.assert_array_equal(has[p], expect_has)
        np.testing.assert_array_equal(res[p], np.where(expect_has > 0, dense[u, np.maximum(neighbours[i], 0)], 0.0))
        assert norm[p] == (1 / np.sqrt(expect_has.sum()) if expect_has.any() else 0.0)
