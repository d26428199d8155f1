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

from streamrec.trainer.evaluation.metrics import expected_hit, expected_ndcg
from streamrec.trainer.online.batch import TrainBatch
from streamrec.trainer.online.learner import OnlineLearner
from streamrec.trainer.online.metrics import PREQUENTIAL

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
        self._pending: list[tuple[int, int, int]] = []  # (greater, ties, position) of this batch

    def start_batch(self, learner: OnlineLearner) -> None:
        """Per batch: id -> row lookups for the ranker's items and this batch's users (dicts:
        a handful of lookups per step would cost more through pandas than the scoring itself)."""
        ranker = learner.ranker
        self._item_row = dict(zip(ranker.items.index, range(len(ranker.items.index))))
        self._user_row = dict(zip(ranker.users.ids, range(len(ranker.users.ids)))) if ranker.users else {}

    def evaluate_step(self, learner: OnlineLearner, batch: TrainBatch, positives: np.ndarray, step: slice) -> None:
        """Before the model learns events[step] of `batch`: rank the sampled positive ones (stream
        positions divisible by `every`) against every known item minus the user's earlier items
        (earlier batches, and earlier events of this batch)."""
        first = step.start + (-(self.position + step.start)) % self.every
        picks = [q for q in range(first, step.stop, self.every) if positives[q]]
        if not picks:
            return
        if step.start == 0:
            self.start_batch(learner)
        ranker, item_row = learner.ranker, self._item_row
        users = batch.user_id[picks]
        user_rows = ranker.users.values[[self._user_row[u] for u in users]]
        scores = ranker.score(user_rows, ranker.items.values)
        scores[:, ~ranker.items.alive] = -np.inf
        if ranker.hidden.any():
            scores[:, ranker.hidden] = -np.inf
        for row, (pick, user) in enumerate(zip(picks, users)):
            target = item_row.get(batch.item_id[pick], -1)
            earlier = [*self.history.get(user, ()), *batch.item_id[:pick][batch.user_id[:pick] == user]]
            drop = [r for r in map(item_row.get, earlier) if r is not None and r != target]
            line = scores[row]
            line[drop] = -np.inf
            if target >= 0:
                self._pending.append((int((line > line[target]).sum()), int((line == line[target]).sum()) - 1, pick))
            else:  # an item the model has never seen ranks below every known candidate
                self._pending.append((int(np.isfinite(line).sum()), 0, pick))

    def end_batch(self, batch: TrainBatch) -> None:
        """Turn the batch's rank counts into expected hit@10 / ndcg@10 (vectorised, once)."""
        if self._pending:
            greater, ties, picks = (np.array(v) for v in zip(*self._pending))
            self._pending.clear()
            self._record(expected_hit(greater, ties, K), expected_ndcg(greater, ties, K), batch.timestamp[picks])

    def record_ratings(self, squared_errors: float, count: int) -> None:
        if count:
            self.total["ratings"] += count
            self.total["sq_error"] += squared_errors
            self.sq_errors.append((squared_errors, count))

    def observe(self, batch: TrainBatch) -> None:
        """After learning: the batch's items become the users' earlier items."""
        self.end_batch(batch)
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

    def publish(self) -> None:
        """Set the Prometheus gauges (once per batch: the windows are recomputed)."""
        for window, values in self.report()["windows"].items():
            for metric, value in values.items():
                if value is not None:
                    PREQUENTIAL.labels(metric, window).set(value)

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
                                    "ndcg@10": float(np.mean(ndcgs)) if ndcgs else None,
                                    "rmse": self._windowed_rmse(window) if self.sq_errors else None}
        return {
            "evaluated": t["evaluated"],
            "hr@10": t["hits"] / t["evaluated"] if t["evaluated"] else None,
            "ndcg@10": t["ndcg"] / t["evaluated"] if t["evaluated"] else None,
            "rmse": float(np.sqrt(t["sq_error"] / t["ratings"])) if t["ratings"] else None,
            "windows": windows,
            "series": self.series,
        }
