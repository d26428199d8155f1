"""Recommendation metrics as plain library functions (the survey's definitions).

List-based functions take recommended ids (best first) and the relevant ids; the `expected_*`
functions compute ranking metrics from rank counts, as the expected value under a uniformly random
order of items tied with the target (EVALUATION.md), vectorised over many targets at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np


def precision_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Share of the top k that is relevant (divides by k even if fewer were recommended)."""
    return len(set(recommended[:k]) & relevant) / k


def recall_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Share of the relevant items found in the top k (0 when nothing is relevant)."""
    return len(set(recommended[:k]) & relevant) / len(relevant) if relevant else 0.0


def hit_rate_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """1 if any relevant item is in the top k."""
    return float(bool(set(recommended[:k]) & relevant))


def ndcg_at_k(
    recommended: Sequence[Hashable], relevant: set | Mapping[Hashable, float], k: int
) -> float:
    """DCG/IDCG with gain 2^rel - 1: binary when `relevant` is a set, graded for {item: rel}."""
    gains = {item: 1.0 for item in relevant} if isinstance(relevant, set) else dict(relevant)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = sum((2.0 ** gains.get(item, 0.0) - 1.0) * d for item, d in zip(recommended[:k], discounts))
    ideal = np.sort(np.asarray([2.0**g - 1.0 for g in gains.values()]))[::-1][:k]
    idcg = float((ideal * discounts[: len(ideal)]).sum())
    return float(dcg / idcg) if idcg > 0 else 0.0


def reciprocal_rank(recommended: Sequence[Hashable], relevant: set) -> float:
    """1/rank of the first relevant item (0 if none)."""
    for rank, item in enumerate(recommended, 1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def mrr(recommended_lists: Sequence[Sequence[Hashable]], relevant_sets: Sequence[set]) -> float:
    """Mean reciprocal rank over users."""
    return float(np.mean([reciprocal_rank(r, s) for r, s in zip(recommended_lists, relevant_sets)]))


def average_precision_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Mean of precision@i over the positions i <= k that hold a relevant item (the survey's AP)."""
    hits, precisions = 0, []
    for i, item in enumerate(recommended[:k], 1):
        if item in relevant:
            hits += 1
            precisions.append(hits / i)
    return float(np.mean(precisions)) if precisions else 0.0


def map_at_k(
    recommended_lists: Sequence[Sequence[Hashable]], relevant_sets: Sequence[set], k: int
) -> float:
    """Mean average precision@k over users."""
    return float(
        np.mean([average_precision_at_k(r, s, k) for r, s in zip(recommended_lists, relevant_sets)])
    )


def _scaled_errors(predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, float]:
    """(|errors| / scale, scale), the scale being the largest finite error: squared, the errors of
    ratings near 1e200 overflowed, and RMSE printed as null under exit status 0. A NaN or
    infinite error stays one."""
    with np.errstate(over="ignore"):  # a difference beyond float64 is an infinite error, refused by its caller
        errors = np.abs(np.asarray(predicted, dtype=np.float64) - np.asarray(actual, dtype=np.float64))
    largest = float(errors.max(initial=0.0, where=np.isfinite(errors)))
    scale = largest if largest > 0.0 else 1.0
    return errors / scale, scale


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    errors, scale = _scaled_errors(predicted, actual)
    return scale * float(np.sqrt(np.mean(errors**2)))


def mae(predicted: np.ndarray, actual: np.ndarray) -> float:
    errors, scale = _scaled_errors(predicted, actual)
    return scale * float(np.mean(errors))


def catalogue_coverage(recommended: np.ndarray, n_items: int) -> float:
    """Share of the catalogue recommended to at least one user; `recommended` is (users, k)."""
    return len(np.unique(np.asarray(recommended).ravel())) / n_items if n_items else 0.0


def intra_list_diversity(recommended: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean over lists of 1/(L(L-1)) sum_{i != j} (1 - cos(i, j)); `recommended` is (users, L)."""
    recommended = np.asarray(recommended)
    length = recommended.shape[1]
    if length < 2:
        return 0.0
    unit = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
    lists = unit[recommended]  # (users, L, d)
    sims = np.einsum("uld,umd->ulm", lists, lists)
    off_diagonal = (1.0 - sims).sum(axis=(1, 2)) - (1.0 - np.einsum("ull->ul", sims)).sum(axis=1)
    return float(np.mean(off_diagonal / (length * (length - 1))))


def novelty(recommended: np.ndarray, item_popularity: np.ndarray, n_users: int) -> float:
    """Mean self-information -log2(share of users who interacted with the item) of recommendations."""
    share = np.maximum(np.asarray(item_popularity, dtype=np.float64), 1.0) / max(n_users, 1)
    return float(np.mean(-np.log2(share[np.asarray(recommended)])))


# ---- tie-aware metrics from rank counts ----------------------------------------------------------
def rank_counts(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many candidates score strictly above the target, and how many others tie it.

    Non-candidates must already be -inf in `scores`; NaN scores count as -inf.
    """
    scores = np.where(np.isnan(scores), -np.inf, scores)
    target = scores[np.arange(len(scores)), targets][:, None]
    greater = (scores > target).sum(axis=1)
    ties = (scores == target).sum(axis=1) - 1
    return greater, ties


def _uniform_rank_mean(table: np.ndarray, greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """E[f(rank)] for rank uniform on greater+1 .. greater+ties+1, given table[r] = sum_{j<=r} f(j)."""
    n = ties + 1
    return (table[greater + n] - table[greater]) / n


def expected_hit(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """P(rank <= k) with ties in random order."""
    return np.clip(k - greater, 0, ties + 1) / (ties + 1)


def expected_ndcg(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """E[1/log2(rank+1) if rank <= k else 0] for a single relevant item."""
    size = int((greater + ties).max(initial=0)) + 2
    ranks = np.arange(1, size)
    gains = np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0)
    return _uniform_rank_mean(np.r_[0.0, np.cumsum(gains)], greater, ties)


def expected_reciprocal_rank(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """E[1/rank] over the full ranking."""
    size = int((greater + ties).max(initial=0)) + 2
    return _uniform_rank_mean(np.r_[0.0, np.cumsum(1.0 / np.arange(1, size))], greater, ties)
