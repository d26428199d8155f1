"""Neighbourhood models: item-based CF (with baselines on ratings, as KNNBaseline), user-based CF
and Amazon's item-to-item recommendations from a history.

On explicit data a pair is predicted from its k most similar neighbours among those the user
(item-knn) or the item (user-knn) has ratings for; on implicit data scores are a sparse product
with the neighbour lists truncated to the top k per entity: score(u, c) = sum_{j in history} W[j, c].
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from streamrec.core.params import Choice, FloatRange, IntRange, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.export import Export, NeighbourLists
from streamrec.trainer.models.neighbors import (
    Similarity,
    baselines,
    knn_pairs,
    similarity,
    truncate_top_k,
)
from streamrec.trainer.models.popularity_blend import RankingParams
from streamrec.trainer.models.sgd import gather_or_zero

NEIGHBOURS = 100  # neighbours per item a refit publishes


def _csr_state(prefix: str, m: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {f"{prefix}_data": m.data, f"{prefix}_indices": m.indices, f"{prefix}_indptr": m.indptr,
            f"{prefix}_shape": np.array(m.shape)}


def _csr_load(prefix: str, arrays: dict[str, np.ndarray]) -> sp.csr_matrix:
    return sp.csr_matrix(
        (arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]),
        shape=tuple(arrays[f"{prefix}_shape"]),
    )


class NeighbourParams(RankingParams):
    """Similarity ('auto': pearson-baseline for item-knn on ratings, else cosine), k neighbours
    (0: 40 on ratings, 20 / 50 item / user lists on implicit data), the fewest neighbours a
    rating estimate needs, Pearson shrinkage and Amazon's popularity damping. The implicit list
    lengths come from `streamrec study-defaults` (docs/models.md): item lists of 20 have the best
    mean rank over 8 validation logs (1.50, first on 6) against 50, 100 (the former default) and
    200; for user lists 50 (2.25) edges out 200 (2.38) and beats 20 (3.12)."""

    similarity: Literal["auto"] | Similarity = "auto"
    k: int = Field(0, ge=0)
    min_k: int = Field(1, ge=0)
    shrinkage: float = 100.0
    damping: float = 0.5


class AmazonI2IParams(NeighbourParams):
    """Co-occurrence damped by popularity, top 20 neighbours per item (chosen like item-knn's)."""

    similarity: Literal["auto"] | Similarity = "cooccurrence"
    k: int = Field(20, ge=0)


class _NeighbourModel(Recommender):
    """Shared fit/predict of user- and item-based CF; subclasses say which side is the entity."""

    Params = NeighbourParams
    search_space = space(k=IntRange(10, 500, log=True), shrinkage=FloatRange(0.0, 200.0),
                    similarity=Choice(("auto", "cosine", "jaccard")))

    @property
    @abstractmethod
    def item_based(self) -> bool:
        """True when neighbours are items (item-based CF), False when they are users."""

    def _resolved(self, explicit: bool) -> tuple[str, int]:
        """'auto' picks the survey's rating setup on ratings and cosine top-k on implicit data."""
        sim, k = self.params["similarity"], int(self.params["k"])
        if sim == "auto":
            sim = ("pearson-baseline" if self.item_based else "cosine") if explicit else "cosine"
        return sim, (k or (40 if explicit else (20 if self.item_based else 50)))

    def _fit(self, data: Interactions) -> None:
        self.explicit = data.is_explicit
        sim_kind, self.k = self._resolved(self.explicit)
        users, items, ratings, _ = data.pair_view()
        self.mu, self.bu, self.bi = baselines(users, items, ratings, data.n_users, data.n_items)
        self.ratings = data.matrix() if self.explicit else data.strength()
        residual = self.ratings.copy()
        rows = np.repeat(np.arange(data.n_users), np.diff(residual.indptr))
        residual.data = residual.data - (self.mu + self.bu[rows] + self.bi[residual.indices])
        self.residual = residual
        entities = self.ratings.T.tocsr() if self.item_based else self.ratings
        res_entities = residual.T.tocsr() if self.item_based else residual
        sim = self._similarity(entities, sim_kind, res_entities)
        # explicit: keep every co-rated pair (the k are chosen per prediction among rated ones)
        self.sim = sim if self.explicit else truncate_top_k(sim, self.k)

    def _similarity(self, entities: sp.csr_matrix, kind: str, residuals: sp.csr_matrix) -> sp.csr_matrix:
        """Entity x entity similarity of `kind` (an engine may compute it elsewhere: Spark)."""
        return similarity(entities, kind, self.params["shrinkage"], self.params["damping"], residuals)

    # ---- explicit: KNN estimate per pair ------------------------------------------------------
    def _baseline(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.mu + gather_or_zero(self.bu, users) + gather_or_zero(self.bi, items)

    def _neighbour_terms(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(estimate, found) for known pairs (`neighbors.knn_pairs`). Item-based: neighbours are
        the items the user rated, valued by residual r_uj - b_uj; user-based: the users who rated
        the item, valued by their rating."""
        sim = self.sim
        if self.item_based:
            targets, lists, matrix, values = items, users, self.ratings, self.residual.data
        else:
            matrix = self.ratings.T.tocsr()
            targets, lists, values = users, items, matrix.data
        return knn_pairs(
            targets.astype(np.int64), lists.astype(np.int64), sim.indptr.astype(np.int64),
            sim.indices.astype(np.int64), sim.data.astype(np.float64), sim.shape[1], matrix.indptr.astype(np.int64),
            matrix.indices.astype(np.int64), matrix.data.astype(np.float64), values.astype(np.float64),
            self.k, self.params["min_k"],
        )

    def _pair_scores(self, users, items, timestamps=None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        if not self.explicit:
            return super()._pair_scores(users, items, timestamps)
        base = self._baseline(users, items)
        known = np.flatnonzero((users >= 0) & (items >= 0))
        est, found = self._neighbour_terms(users[known], items[known])
        out = base.copy()
        if self.item_based:  # b_ui + weighted residuals
            out[known] = base[known] + np.where(found, est, 0.0)
        else:  # weighted mean of neighbours' ratings, baseline when none
            out[known] = np.where(found, est, base[known])
        return out

    # ---- implicit: sparse product with neighbour lists ---------------------------------------
    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        if self.explicit:
            grid_u = np.repeat(users, self.n_items)
            grid_i = np.tile(np.arange(self.n_items), len(users))
            return self._pair_scores(grid_u, grid_i).reshape(len(users), self.n_items)
        if self.item_based:
            return np.asarray((self.ratings[users] @ self.sim).todense())
        return np.asarray((self.sim[users] @ self.ratings).todense())

    def _item_similarities(self, items: np.ndarray) -> np.ndarray:
        if not self.item_based:
            return super()._item_similarities(items)
        return self.sim[items].toarray()

    def _export(self) -> Export:
        """Item-based models publish each item's top neighbours (serving's similar items and
        candidates); user-based ones have no item neighbourhood to publish."""
        if not self.item_based:
            return super()._export()
        self._require_fitted()
        index, scores = self.similar_item_indices(np.arange(self.n_items), NEIGHBOURS)
        index[~np.isfinite(scores) | (scores <= 0)] = -1
        return Export(neighbours=NeighbourLists(index, np.where(index >= 0, scores, 0.0)))

    def _state(self) -> dict[str, np.ndarray]:
        return {
            **_csr_state("sim", self.sim), **_csr_state("ratings", self.ratings),
            **_csr_state("residual", self.residual), "bu": self.bu, "bi": self.bi,
            "scalars": np.array([self.mu, self.k, float(self.explicit)]),
        }

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.sim, self.ratings = _csr_load("sim", arrays), _csr_load("ratings", arrays)
        self.residual = _csr_load("residual", arrays)
        self.bu, self.bi = arrays["bu"], arrays["bi"]
        mu, k, explicit = arrays["scalars"]
        self.mu, self.k, self.explicit = float(mu), int(k), bool(explicit)


class ItemKNN(_NeighbourModel):
    """Item-based CF. Ratings: b_ui + sum sim (r_uj - b_uj) / sum sim over the k most similar
    items the user rated (KNNBaseline; pearson-baseline, k 40, shrinkage 100). Implicit: cosine,
    neighbour lists truncated to the top 100 per item."""

    name = "item-knn"
    capabilities = Capabilities(explicit=True, implicit=True, weights=True)
    item_based = True


class UserKNN(_NeighbourModel):
    """User-based CF: cosine similarity, k neighbours, similarity-weighted average (survey)."""

    name = "user-knn"
    capabilities = Capabilities(explicit=True, implicit=True, weights=True)
    item_based = False


class AmazonI2I(_NeighbourModel):
    """Amazon's item-to-item CF: co-occurrence similarity damped by popularity,
    |U_i & U_j| / (|U_i| |U_j|)^damping, top-k lists per item, scores summed over the history."""

    name = "amazon-i2i"
    capabilities = Capabilities(implicit=True)
    item_based = True
    Params = AmazonI2IParams

    def _fit(self, data: Interactions) -> None:
        """Co-occurrence counts users, so every pair counts once whatever the weighting."""
        super()._fit(replace(data, implicit=True, weighting="binary"))

    def because(self, user_id: str, item_ids: list[str] | np.ndarray) -> list[str | None]:
        """For each recommended item, the history item that contributed most ("because you
        watched X"), or None when nothing in the history points to it."""
        self._require_fitted()
        user = int(self.users.index([user_id])[0])
        items = self.items.index(item_ids)
        history = self.ratings[user].indices if user >= 0 else np.empty(0, dtype=np.int64)
        if not len(history):
            return [None] * len(items)
        contributions = self.sim[history][:, np.maximum(items, 0)].toarray()  # (history, items)
        best = contributions.argmax(axis=0)
        strongest = contributions[best, np.arange(len(items))]
        return [
            str(self.items.ids[history[b]]) if item >= 0 and weight > 0 else None
            for item, b, weight in zip(items, best, strongest)
        ]
