"""The one interface every batch model implements.

Models work in index space (dense ints from `Interactions`); this base class owns the id <-> index
mapping, seen-item exclusion, cold-start fallbacks, top-k selection and persistence, so a model
only writes `_fit`, `_user_scores` (and `_pair_scores` when it can do better than gathering).

Index conventions: -1 means "unknown to the model" (a user or item not in its training data).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from streamrec.core.params import ModelParams, SearchSpace, parse_params, space
from streamrec.trainer.interactions import IdIndex, Interactions
from streamrec.trainer.models.export import Export
from streamrec.trainer.models.popularity_blend import (
    blend,
    choose_weight,
    popularity_prior,
)

FORMAT_VERSION = 1
SCORE_CHUNK = 1024  # users scored per dense block: bounds memory at chunk x n_items floats
MIN_VALIDATION_USERS = 20  # fewer validation users than this: no popularity blend (nothing to judge by)
MAX_VALIDATION_USERS = 2000  # a sample bounds the validation scoring at this x n_items floats
STAR_SPAN = 4.0  # 1-5 stars, the rating scale the SGD rating models' defaults were chosen on


def rating_unit(scale: tuple[float, float]) -> float:
    """How many of a log's rating units make one star of the 1-5 scale. The SGD rating models'
    learning rates, regularisation and initial factors are in rating units, so on a 0-1000 scale
    their steps diverged to NaN, and on 0/1 they barely moved: those models fit ratings divided by
    this. 1 for spans within a factor 2 of four stars, so 1-5 and 0.5-5 logs fit exactly as before."""
    span = scale[1] - scale[0]
    if span <= 0 or STAR_SPAN / 2 <= span <= STAR_SPAN * 2:
        return 1.0
    return span / STAR_SPAN


@dataclass(frozen=True)
class Capabilities:
    """What a model can use: explicit ratings (predicts ratings), implicit feedback (ranks from
    interactions alone), timestamps (time-aware predictions), implicit confidence weights
    (`Interactions.strength()`, `evaluate --weights`), and side features (`side_data`: the
    MovieLens users' demographics and items' genres, decades and titles)."""

    explicit: bool = False
    implicit: bool = False
    time_aware: bool = False
    weights: bool = False
    side_features: bool = False


class Recommender(ABC):
    """Base of every batch model: fit / score / recommend / similar_items / save / load.

    Subclasses declare `name`, `capabilities` and `Params` (their typed hyperparameters, with the
    survey's values as defaults); parameters are validated against `Params`, so a typo or a
    mistyped value in `--param` cannot pass silently. `self.params` is the validated plain dict
    (every field, defaults filled in) that the model code reads and `save` writes.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Params: ClassVar[type[ModelParams]]
    search_space: ClassVar[SearchSpace] = space()  # where `streamrec tune` looks; empty: nothing to tune
    fits_in_stars: ClassVar[bool] = False  # hyper-parameters in rating units: ratings fitted per `rating_unit`

    def __init__(self, **params: object) -> None:
        self.params: dict[str, Any] = parse_params(self.Params, params, self.name).model_dump()
        self.users: IdIndex | None = None
        self.items: IdIndex | None = None
        self.seen: sp.csr_matrix | None = None
        self.popularity: np.ndarray | None = None
        self.global_mean = 0.0
        self.rating_scale = (0.0, 1.0)
        self.rating_unit = 1.0  # the model's own scores are in units of this many of the log's rating units
        self.blend_weight = 0.0  # popularity in the ranking (streamrec.trainer.models.popularity_blend)
        self._validated_blend: float | None = None  # set by a `_fit` that validates on its own split

    # ---- training ----------------------------------------------------------------------------
    def fit(self, interactions: Interactions) -> Recommender:
        """Train on `interactions`; keeps the id maps and seen items for recommend()."""
        self.users, self.items = interactions.users, interactions.items
        self.seen = interactions.binary()
        self.popularity = np.asarray(self.seen.sum(axis=0)).ravel()
        self.rating_scale = interactions.rating_scale
        explicit = self.fits_in_stars and interactions.is_explicit
        self.rating_unit = rating_unit(self.rating_scale) if explicit else 1.0
        if self.rating_unit != 1.0:
            interactions = interactions.with_ratings_divided(self.rating_unit)
        self.global_mean = interactions.global_mean
        self.blend_weight, self._validated_blend = 0.0, None
        self._fit(interactions)
        self.blend_weight = self._blend_weight(interactions)
        return self

    def _blend_weight(self, interactions: Interactions) -> float:
        """`popularity_blend`: a number as given; `auto` the weight validated by `_fit` (models
        with their own validation split), else by a second fit without each user's last item.
        On explicit data `auto` is off: a rating fit predicts ratings (the rating protocol, a
        blend member), which the weight does not touch, and choosing it scored every validation
        user against every item (item-knn's fit went from 0.2 s to 38 s on a MovieLens fold)."""
        setting = self.params.get("popularity_blend", 0.0)
        if setting != "auto":
            return float(setting)
        if interactions.is_explicit:
            return 0.0
        if self._validated_blend is not None:
            return self._validated_blend
        from streamrec.trainer.evaluation.splits import leave_last_out

        train_mask, val = leave_last_out(interactions)
        if len(val) < MIN_VALIDATION_USERS:
            return 0.0
        if len(val) > MAX_VALIDATION_USERS:
            val = np.sort(np.random.default_rng(0).choice(val, MAX_VALIDATION_USERS, replace=False))
        clone = type(self)(**{**self.params, "popularity_blend": 0.0}).fit(interactions.subset(train_mask))
        return clone.validated_blend(interactions.user_idx[val], interactions.item_idx[val])

    def validated_blend(self, users: np.ndarray, targets: np.ndarray) -> float:
        """The popularity weight that ranks `targets` best for `users` (validation pairs the model
        was fitted without), by `popularity_blend.choose_weight`."""
        return choose_weight(self.candidate_scores(users, targets), targets, popularity_prior(self.popularity))

    def candidate_scores(self, users: np.ndarray, targets: np.ndarray, blended: bool = True) -> np.ndarray:
        """`user_scores` with each user's training items at -inf, each row's target kept (how
        held-out items are ranked: validation and the topn protocol)."""
        scores = self.user_scores(users, blended=blended)
        target_scores = scores[np.arange(len(users)), targets]
        scores = mask_seen(scores, self.seen, users)
        scores[np.arange(len(users)), targets] = target_scores  # the target stays a candidate
        return scores

    @abstractmethod
    def _fit(self, interactions: Interactions) -> None:
        """Learn the parameters (vectorised: no per-rating Python loops)."""

    # ---- scoring in index space --------------------------------------------------------------
    @abstractmethod
    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) scores for known user indices (all >= 0)."""

    def _cold_user_scores(self, count: int) -> np.ndarray:
        """Scores for users unseen in training: popularity (the only signal there is)."""
        return np.broadcast_to(self.popularity.astype(np.float64), (count, len(self.popularity)))

    def user_scores(self, users: np.ndarray, blended: bool = True) -> np.ndarray:
        """(len(users), n_items) ranking scores; -1 rows get the cold-start fallback. With the
        popularity blend on (`blended`), rows are standardised and blended (a ranking, not the
        model's raw scale: `pair_scores` keeps that)."""
        users = np.asarray(users, dtype=np.int64)
        out = self._unscaled_user_scores(users)
        if self.rating_unit != 1.0:  # the known users' rows in the log's units, as pair_scores
            out[users >= 0] *= self.rating_unit
        if blended and self.blend_weight:
            out = blend(out, popularity_prior(self.popularity), self.blend_weight)
        return out

    def _unscaled_user_scores(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) in the model's own units; -1 rows get the cold-start fallback."""
        out = np.empty((len(users), self.n_items), dtype=np.float64)
        known = users >= 0
        if known.any():
            out[known] = self._user_scores(users[known])
        if (~known).any():
            out[~known] = self._cold_user_scores(int((~known).sum()))
        return out

    def pair_scores(
        self, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        """The model's own score of each (user, item) pair (a rating in the log's units, a logit,
        a similarity sum: never blended with popularity, which only re-ranks)."""
        scores = self._pair_scores(users, items, timestamps)
        return scores * self.rating_unit if self.rating_unit != 1.0 else scores

    def _pair_scores(
        self, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        """`pair_scores` in the model's own units; the default gathers from `_user_scores` per
        chunk. Rating models override this with a direct formula (and the rating-scale fallback
        for unknown users/items); time-aware models use `timestamps`."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        out = np.zeros(len(users), dtype=np.float64)
        unique, inverse = np.unique(users, return_inverse=True)
        for start in range(0, len(unique), SCORE_CHUNK):
            block = unique[start : start + SCORE_CHUNK]
            rows = np.flatnonzero((inverse >= start) & (inverse < start + len(block)))
            ok = rows[items[rows] >= 0]
            out[ok] = self._unscaled_user_scores(block)[inverse[ok] - start, items[ok]]
        return out

    # ---- public API in id space --------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.items) if self.items is not None else 0

    def _require_fitted(self) -> None:
        if self.items is None:
            raise RuntimeError(f"{self.name} is not fitted")

    def score(
        self, user_ids: list[str] | np.ndarray, item_ids: list[str] | np.ndarray,
        timestamps: np.ndarray | None = None,
    ) -> np.ndarray:
        """Predicted score (a rating for explicit models) of each (user, item) pair."""
        self._require_fitted()
        return self.pair_scores(self.users.index(user_ids), self.items.index(item_ids), timestamps)

    def recommend(
        self, user_ids: list[str] | np.ndarray, k: int = 10, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids and scores per user, best first, (n_users, k) each."""
        self._require_fitted()
        idx, scores = self.recommend_indices(self.users.index(user_ids), k, exclude_seen)
        return self.items.ids[idx], scores

    def recommend_indices(
        self, users: np.ndarray, k: int, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores for user indices (-1: cold start)."""
        k = min(k, self.n_items)
        users = np.asarray(users, dtype=np.int64)
        top = np.empty((len(users), k), dtype=np.int64)
        top_scores = np.empty((len(users), k), dtype=np.float64)
        for start in range(0, len(users), SCORE_CHUNK):
            block = users[start : start + SCORE_CHUNK]
            scores = self.user_scores(block)
            if exclude_seen:
                scores = mask_seen(scores, self.seen, block)
            top[start : start + len(block)], top_scores[start : start + len(block)] = top_k(scores, k)
        return top, top_scores

    def similar_items(self, item_ids: list[str] | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k items most similar to each item (itself excluded), (n, k) ids and similarities."""
        self._require_fitted()
        items = self.items.index(item_ids)
        if (items < 0).any():
            raise KeyError(f"unknown items: {list(np.asarray(item_ids)[items < 0][:5])}")
        idx, scores = self.similar_item_indices(items, k)
        return self.items.ids[idx], scores

    def similar_item_indices(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`similar_items` in index space: (len(items), k) item indices and similarities."""
        sims = self._item_similarities(items)
        sims[np.arange(len(items)), items] = -np.inf
        return top_k(sims, min(k, self.n_items - 1))

    def _item_similarities(self, items: np.ndarray) -> np.ndarray:
        """(len(items), n_items) similarities; cosine of item vectors for factor models."""
        vectors = self.item_vectors()
        if vectors is None:
            raise NotImplementedError(f"{self.name} has no notion of item similarity")
        norm = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return norm[items] @ norm.T

    def item_vectors(self) -> np.ndarray | None:
        """(n_items, d) vectors serving can use for retrieval, or None."""
        return None

    def user_vectors(self) -> np.ndarray | None:
        """(n_users, d) vectors matching `item_vectors` (dot product = score), or None."""
        return None

    def export(self) -> Export:
        """What a refit publishes for serving (`_export`), with the popularity blend folded into
        the retrieval vectors so that serving ranks exactly as `recommend` does."""
        self._require_fitted()
        return self._fold_blend(self._export())

    def _export(self) -> Export:
        """The model's serving artefacts: the retrieval vectors, when the model has them. Models
        with other artefacts (an item bias kept apart, neighbour lists, a ranker) override this."""
        return Export(item_vectors=self.item_vectors(), user_vectors=self.user_vectors())

    def _fold_blend(self, export: Export) -> Export:
        """Per user, z(s) + w * prior ranks like s + (w * std_u(s)) * prior (the mean shift and the
        positive scale do not change an order): one more coordinate, w * std_u on the user vector
        and the item's standardised log-popularity on the item vector, keeps the blend a dot
        product that FAISS can search. Weight infinity: popularity alone (user vectors [0, .., 1])."""
        if not self.blend_weight or export.item_vectors is None or export.user_vectors is None:
            return export
        prior = popularity_prior(self.popularity).astype(export.item_vectors.dtype)
        users = export.user_vectors
        if np.isinf(self.blend_weight):
            scale = np.ones(len(users))
            users = np.zeros_like(users)
            biases = None
        else:
            spread = np.concatenate([
                np.nanstd(np.where(np.isfinite(block), block, np.nan), axis=1)
                for block in (self._user_scores(np.arange(s, min(s + SCORE_CHUNK, len(users))))
                              for s in range(0, len(users), SCORE_CHUNK))
            ]) if len(users) else np.zeros(0)
            scale = self.blend_weight * np.maximum(np.nan_to_num(spread), 1e-12)
            biases = export.item_biases
        return replace(export, item_vectors=np.hstack([export.item_vectors, prior[:, None]]),
                       user_vectors=np.hstack([users, scale[:, None].astype(users.dtype)]), item_biases=biases)

    # ---- persistence (numpy + JSON, no pickle) -----------------------------------------------
    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]:
        """The learned arrays."""

    @abstractmethod
    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what `_state` returned."""

    def save(self, path: str | Path) -> Path:
        """Write `<path>/meta.json` and `<path>/arrays.npz`."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION, "model": self.name, "params": self.params,
            "global_mean": self.global_mean, "rating_scale": list(self.rating_scale),
            "rating_unit": self.rating_unit, "capabilities": asdict(self.capabilities), "blend_weight": self.blend_weight,
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        arrays = {f"model.{k}": np.asarray(v) for k, v in self._state().items()}
        arrays.update(self.users.to_arrays("users"))
        arrays.update(self.items.to_arrays("items"))
        arrays.update(seen_indptr=self.seen.indptr, seen_indices=self.seen.indices, popularity=self.popularity)
        np.savez(path / "arrays.npz", **arrays)
        return path

    @classmethod
    def restore(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Recommender:
        """Rebuild a fitted model from `save`'s files (see `streamrec.trainer.models.load`)."""
        model = cls(**meta["params"])
        model.users = IdIndex.from_arrays(arrays, "users")
        model.items = IdIndex.from_arrays(arrays, "items")
        indices = arrays["seen_indices"]
        model.seen = sp.csr_matrix(
            (np.ones(len(indices)), indices, arrays["seen_indptr"]),
            shape=(len(model.users), len(model.items)),
        )
        model.popularity = arrays["popularity"]
        model.global_mean = float(meta["global_mean"])
        model.rating_scale = tuple(meta["rating_scale"])
        model.rating_unit = float(meta.get("rating_unit", 1.0))
        model.blend_weight = float(meta.get("blend_weight", 0.0))
        model._load_state({k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")})
        return model


def mask_seen(scores: np.ndarray, seen: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """Copy of `scores` with each known user's seen items at -inf."""
    scores = np.array(scores, dtype=np.float64)
    known = np.flatnonzero(users >= 0)
    if len(known):
        rows = seen[users[known]]
        scores[known[np.repeat(np.arange(len(known)), np.diff(rows.indptr))], rows.indices] = -np.inf
    return scores


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first (ties: lower index); all of a
    row's scores when it has fewer than k."""
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.empty((len(scores), 0), np.int64), np.empty((len(scores), 0))
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=1) if scores.size else part
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)
