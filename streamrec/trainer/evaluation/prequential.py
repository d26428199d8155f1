"""prequential protocol: test-then-train over the time-ordered stream (EVALUATION.md).

Learner protocol (River-style, vectorised). An online model is any object with

    learn_many(batch: StreamBatch) -> None
        learn the events of `batch`, in their order (the harness passes at most 256 events);
    score_users(users: np.ndarray) -> np.ndarray
        (len(users), catalogue.n_items) scores, higher is better, from the model's current state.
        Items the model has not seen yet may get any score below the others (e.g. -inf).

and is built by a factory `(catalogue: Catalogue, params: dict) -> learner` registered with
`@register_online_model("name")`. Indices are dense over the whole data set (`Catalogue`), raw
ids ride along in each batch for learners that keep their own id maps. The online trainer's live
metrics reuse `PrequentialScorer`, so a replay reproduces `streamrec evaluate` exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.evaluation.metrics import expected_hit, expected_ndcg, rank_counts
from streamrec.trainer.interactions import IdIndex, Interactions
from streamrec.core.progress import track

EVAL_EVERY = 10
MAX_BATCH = 256
K = 10


@dataclass(frozen=True)
class Catalogue:
    """Every user and item of the stream: dense index spaces fixed before the first event."""

    users: IdIndex
    items: IdIndex

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class StreamBatch:
    """Consecutive events of the stream, in order."""

    user_idx: np.ndarray
    item_idx: np.ndarray
    rating: np.ndarray  # NaN = implicit
    timestamp: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray

    def __len__(self) -> int:
        return len(self.user_idx)


class OnlineLearner(Protocol):
    def learn_many(self, batch: StreamBatch) -> None: ...

    def score_users(self, users: np.ndarray) -> np.ndarray: ...


OnlineFactory = Callable[[Catalogue, dict[str, Any]], OnlineLearner]
ONLINE_MODELS: dict[str, OnlineFactory] = {}


def register_online_model(name: str) -> Callable[[OnlineFactory], OnlineFactory]:
    """Make an online model available to `streamrec evaluate --protocol prequential --model`."""

    def add(factory: OnlineFactory) -> OnlineFactory:
        ONLINE_MODELS[name] = factory
        return factory

    return add


class PrequentialScorer:
    """Scores one event against a learner before it is learned; accumulates hit@10 / ndcg@10.

    Keeps each user's earlier items (the excluded candidates) as the stream goes by.
    """

    def __init__(self, n_items: int, n_events: int) -> None:
        self.n_items = n_items
        self.half = n_events / 2
        self.history: dict[int, list[int]] = {}
        self.hits: list[float] = []
        self.ndcgs: list[float] = []
        self.second_half: list[bool] = []

    def observe(self, users: np.ndarray, items: np.ndarray) -> None:
        """Record events as the user's earlier items (after they were learned)."""
        for u, i in zip(users.tolist(), items.tolist()):
            self.history.setdefault(u, []).append(i)

    def score(self, learner: OnlineLearner, position: int, user: int, item: int) -> None:
        """Rank `item` for `user` among all items the user has not had before."""
        scores = np.array(learner.score_users(np.array([user])), dtype=np.float64).reshape(1, -1)
        target = scores[0, item]
        scores[0, self.history.get(user, [])] = -np.inf
        scores[0, item] = target
        greater, ties = rank_counts(scores, np.array([item]))
        self.hits.append(float(expected_hit(greater, ties, K)[0]))
        self.ndcgs.append(float(expected_ndcg(greater, ties, K)[0]))
        self.second_half.append(position >= self.half)

    def metrics(self) -> dict[str, float]:
        hits, ndcgs, late = np.array(self.hits), np.array(self.ndcgs), np.array(self.second_half)
        mean = lambda v: float(v.mean()) if len(v) else 0.0  # noqa: E731
        return {
            "hr@10_second_half": mean(hits[late]), "ndcg@10_second_half": mean(ndcgs[late]),
            "hr@10_all": mean(hits), "ndcg@10_all": mean(ndcgs),
            "evaluated_events": len(hits), "evaluated_second_half": int(late.sum()),
        }


def run_prequential(
    factory: OnlineFactory, params: dict[str, Any], log: InteractionLog
) -> dict[str, Any]:
    """Feed the stream in order: score every 10th event first, then learn it (batches <= 256)."""
    data = Interactions.from_log(log)  # load_log already sorted by (timestamp, user, item)
    catalogue = Catalogue(data.users, data.items)
    learner = factory(catalogue, params)
    scorer = PrequentialScorer(catalogue.n_items, len(data))
    learn_seconds, eval_seconds = 0.0, 0.0
    n = len(data)
    for start in track(range(0, n, EVAL_EVERY), "prequential", total=-(-n // EVAL_EVERY)):
        t0 = time.perf_counter()
        scorer.score(learner, start, int(data.user_idx[start]), int(data.item_idx[start]))
        eval_seconds += time.perf_counter() - t0
        stop = min(start + min(EVAL_EVERY, MAX_BATCH), n)
        batch = StreamBatch(
            data.user_idx[start:stop], data.item_idx[start:stop], data.ratings[start:stop],
            data.timestamps[start:stop], log.user_id[start:stop], log.item_id[start:stop],
        )
        t0 = time.perf_counter()
        learner.learn_many(batch)
        learn_seconds += time.perf_counter() - t0
        scorer.observe(batch.user_idx, batch.item_idx)
    return {
        "metrics": scorer.metrics(),
        "fit_seconds": learn_seconds,
        "eval_seconds": eval_seconds,
        "events_per_second": n / learn_seconds if learn_seconds > 0 else None,
    }


class OnlinePopularity:
    """Counts of events per item so far; every user gets the same scores."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.counts = np.zeros(catalogue.n_items, dtype=np.float64)

    def learn_many(self, batch: StreamBatch) -> None:
        self.counts += np.bincount(batch.item_idx, minlength=len(self.counts))

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))


@register_online_model("popularity")
def _online_popularity(catalogue: Catalogue, params: dict[str, Any]) -> OnlinePopularity:
    if params:
        raise ValueError(f"online popularity takes no parameters, got {sorted(params)}")
    return OnlinePopularity(catalogue)
