"""topn protocol: temporal leave-last-out, full ranking over all items minus training items."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.evaluation.metrics import (
    catalogue_coverage,
    expected_hit,
    expected_ndcg,
    expected_reciprocal_rank,
    rank_counts,
)
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.interactions import Interactions, Weighting, weight_values
from streamrec.trainer.models.base import SCORE_CHUNK, Recommender, top_k
from streamrec.trainer.models.popularity_blend import (
    GRID,
    blend,
    popularity_prior,
    significant,
)


def ranking_metrics(model: Recommender, users: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """hr@10, ndcg@10, mrr, recall@20 (tie-aware) and coverage@10 over test users (items a top 10
    holds as a candidate: a training item at -inf fills a short list but is never recommended)."""
    greater, ties, top10 = [], [], []
    for start in range(0, len(users), SCORE_CHUNK):
        block, block_targets = users[start : start + SCORE_CHUNK], targets[start : start + SCORE_CHUNK]
        scores = model.candidate_scores(block, block_targets)
        g, t = rank_counts(scores, block_targets)
        greater.append(g)
        ties.append(t)
        listed, listed_scores = top_k(scores, 10)
        top10.append(listed[np.isfinite(listed_scores)])  # a user with fewer candidates lists fewer
    g, t = np.concatenate(greater), np.concatenate(ties)
    return {
        "hr@10": float(expected_hit(g, t, 10).mean()),
        "ndcg@10": float(expected_ndcg(g, t, 10).mean()),
        "mrr": float(expected_reciprocal_rank(g, t).mean()),
        "recall@20": float(expected_hit(g, t, 20).mean()),
        "coverage@10": catalogue_coverage(np.concatenate(top10), model.n_items),
    }


@dataclass(frozen=True)
class ValidationNdcg:
    """A fit's validation ndcg@10, raw and as the popularity blend can deliver it."""

    raw: float  # the model's own ranking
    blended: float  # under the best weight of the blend's grid
    beats_popularity: bool  # `blended` above popularity alone by two standard errors (per user)


def validation_ndcg(model: Recommender, users: np.ndarray, targets: np.ndarray) -> ValidationNdcg:
    """ndcg@10 of `model`'s raw scores, alone and blended with popularity under each weight of
    the blend's grid (one scoring). A neural fit judges its epochs by the blend, which is what
    `popularity_blend=auto` will serve: on sparse sessions the raw scores lose their popularity
    component while the blend keeps gaining. `beats_popularity` (`popularity_blend.significant`)
    tells whether the model has yet learned anything beyond the floor it falls back to."""
    prior = popularity_prior(model.popularity)
    per_user = np.zeros((len(GRID), len(users)))
    for start in range(0, len(users), SCORE_CHUNK):
        block, block_targets = users[start : start + SCORE_CHUNK], targets[start : start + SCORE_CHUNK]
        scores = model.candidate_scores(block, block_targets, blended=False)
        for n, weight in enumerate(GRID):
            greater, ties = rank_counts(blend(scores, prior, weight), block_targets)
            per_user[n, start : start + len(block)] = expected_ndcg(greater, ties, 10)
    best = int(per_user.mean(axis=1).argmax())
    return ValidationNdcg(float(per_user[GRID.index(0.0)].mean()), float(per_user[best].mean()),
                          significant(per_user[best] - per_user[GRID.index(np.inf)]))


def run_topn(make_model: Callable[[], Recommender], log: InteractionLog, weighting: Weighting = "binary",
             ) -> dict[str, Any]:
    """Fit on everything but each user's last interaction; rank that one among all items. Repeated
    (user, item) pairs count once, at their latest time; `weighting` gives models their summed values."""
    weight_values(log.rating, weighting)
    data = Interactions.from_log(distinct_pairs(log), implicit=True, weighting=weighting)
    train_mask, test = leave_last_out(data)
    if not len(test):
        raise ValueError("no user (or session) has two distinct items, so none has a test item (topn leaves "
                         "each user's last item out; EVALUATION.md): the log is too short or holds one item per user")
    model = make_model()
    start = time.perf_counter()
    model.fit(data.subset(train_mask))
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = ranking_metrics(model, data.user_idx[test], data.item_idx[test])
    eval_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.recommend_indices(np.arange(data.n_users), 10)
    metrics["recommend_ms_per_user"] = 1000 * (time.perf_counter() - start) / data.n_users
    metrics["test_users"] = len(test)
    return {"metrics": metrics, "fit_seconds": fit_seconds, "eval_seconds": eval_seconds}
