"""Prequential (test-then-train) evaluation on live traffic, with the protocol's computation.

Every `every`-th event is ranked against all items the model knows minus the user's earlier items
BEFORE the model learns it (expected hit@10 / ndcg@10 under random order of tied scores, the
functions `streamrec evaluate` uses); rating events also give a predict-then-learn squared error.
Results are kept cumulatively, over sliding windows (Prometheus gauges), and as a series for plots.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

import numpy as np
import pandas as pd

from trainer.evaluation.metrics import expected_hit, expected_ndcg, rank_counts
from trainer.online.batch import TrainBatch
from trainer.online.learner import OnlineLearner
from trainer.online.metrics import PREQUENTIAL

K = 10


class LivePrequential:
    def __init__(self, every: int = 10, windows: tuple[int, ...] = (1000, 10000), max_users: int = 500_000,
                 series_every: int = 500) -> None:
        self.every, self.windows, self.max_users, self.series_every = every, windows, max_users, series_every
        self.position = 0  # events seen so far
        self.history: OrderedDict[str, set[str]] = OrderedDict()  # user -> earlier items (LRU-bounded)
        self.hits: deque[float] = deque(maxlen=max(windows))
        self.ndcgs: deque[float] = deque(maxlen=max(windows))
        self.sq_errors: deque[tuple[float, int]] = deque(maxlen=max(windows))  # (sum, count) per batch
        self.total = {"evaluated": 0, "hits": 0.0, "ndcg": 0.0, "ratings": 0, "sq_error": 0.0}
        self.series: list[dict[str, float]] = []

    def sampled(self, n: int) -> np.ndarray:
        """Positions (within the next n events) that are evaluated: every `every`-th of the stream."""
        first = (-self.position) % self.every
        return np.arange(first, n, self.every)

    def evaluate(self, learner: OnlineLearner, batch: TrainBatch, positives: np.ndarray) -> None:
        """Score the sampled positive events of `batch` with the model as it is now."""
        picks = self.sampled(len(batch))
        picks = picks[positives[picks]]
        if len(picks):
            users, targets = batch.user_id[picks], batch.item_id[picks]
            scores, item_ids = learner.item_scores(users)
            position = pd.Index(item_ids, dtype=object)
            target_pos = position.get_indexer(targets)
            for row, user in enumerate(users):  # exclude each user's earlier items (not the target)
                earlier = self.history.get(user)
                if earlier:
                    drop = position.get_indexer(list(earlier))
                    scores[row, drop[(drop >= 0) & (drop != target_pos[row])]] = -np.inf
            known = target_pos >= 0
            greater = np.empty(len(picks), np.int64)
            ties = np.zeros(len(picks), np.int64)
            if known.any():
                greater[known], ties[known] = rank_counts(scores[known], target_pos[known])
            # an item the model has never seen ranks below every known candidate
            greater[~known] = np.isfinite(scores[~known]).sum(axis=1)
            self._record(expected_hit(greater, ties, K), expected_ndcg(greater, ties, K), batch.timestamp[picks])

    def record_ratings(self, squared_errors: float, count: int) -> None:
        if count:
            self.total["ratings"] += count
            self.total["sq_error"] += squared_errors
            self.sq_errors.append((squared_errors, count))

    def observe(self, batch: TrainBatch) -> None:
        """After learning: the batch's items become the users' earlier items."""
        codes, users = pd.factorize(batch.user_id)
        order = np.argsort(codes, kind="stable")
        groups = np.split(batch.item_id[order], np.cumsum(np.bincount(codes))[:-1])
        for user, items in zip(users, groups):
            earlier = self.history.get(user)
            if earlier is None:
                earlier = self.history[user] = set()
                if len(self.history) > self.max_users:
                    self.history.popitem(last=False)
            else:
                self.history.move_to_end(user)
            earlier.update(items.tolist())
        self.position += len(batch)

    def _record(self, hits: np.ndarray, ndcgs: np.ndarray, times: np.ndarray) -> None:
        before = self.total["evaluated"]
        self.hits.extend(hits.tolist())
        self.ndcgs.extend(ndcgs.tolist())
        self.total["evaluated"] += len(hits)
        self.total["hits"] += float(hits.sum())
        self.total["ndcg"] += float(ndcgs.sum())
        if self.total["evaluated"] // self.series_every > before // self.series_every:
            window = min(len(self.hits), self.series_every)
            self.series.append({
                "events": self.position, "event_time": float(times.max()), "evaluated": self.total["evaluated"],
                "hr@10": float(np.mean(list(self.hits)[-window:])), "ndcg@10": float(np.mean(list(self.ndcgs)[-window:])),
            })
        for window in self.windows:
            if self.hits:
                PREQUENTIAL.labels("hr@10", str(window)).set(np.mean(list(self.hits)[-window:]))
                PREQUENTIAL.labels("ndcg@10", str(window)).set(np.mean(list(self.ndcgs)[-window:]))
            if self.sq_errors:
                PREQUENTIAL.labels("rmse", str(window)).set(self._windowed_rmse(window))

    def _windowed_rmse(self, window: int) -> float:
        """RMSE over (about) the last `window` rated events, whole batches at a time."""
        total, count = 0.0, 0
        for squared, n in reversed(self.sq_errors):
            total, count = total + squared, count + n
            if count >= window:
                break
        return float(np.sqrt(total / count))

    def report(self) -> dict[str, Any]:
        t = self.total
        windows = {}
        for window in self.windows:
            hits, ndcgs = list(self.hits)[-window:], list(self.ndcgs)[-window:]
            windows[str(window)] = {"hr@10": float(np.mean(hits)) if hits else None,
                                    "ndcg@10": float(np.mean(ndcgs)) if ndcgs else None}
        return {
            "evaluated": t["evaluated"],
            "hr@10": t["hits"] / t["evaluated"] if t["evaluated"] else None,
            "ndcg@10": t["ndcg"] / t["evaluated"] if t["evaluated"] else None,
            "rmse": float(np.sqrt(t["sq_error"] / t["ratings"])) if t["ratings"] else None,
            "windows": windows,
            "series": self.series,
        }
