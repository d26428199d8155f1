"""The live trainer's prequential metrics: `PrequentialScorer` (the protocol's one computation,
`streamrec.trainer.evaluation.prequential`) run inside each batch, plus what live traffic needs on
top: cumulative totals, sliding windows (Prometheus gauges), a series for plots, and the
predict-then-learn squared error of rating events.

The ranker scores each due event before the step that learns it (the model's step hook), so a
replay of a log through Kafka reproduces `streamrec evaluate --protocol prequential`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from streamrec.stream.events import EventBatch
from streamrec.trainer.evaluation.prequential import (
    PrequentialScorer,
    Row,
    evaluated_rows,
)
from streamrec.trainer.online.base import OnlineRecommender
from streamrec.trainer.online.metrics import PREQUENTIAL


class LivePrequential:
    def __init__(self, ranker: OnlineRecommender, every: int = 10, windows: tuple[int, ...] = (1000, 10000),
                 max_users: int = 100_000, series_every: int = 500, series_points: int = 2000) -> None:
        """Memory is bounded for a trainer that runs for months: the scorer keeps the histories of
        the `max_users` most recently active users (a user forgotten scores as new), and the plot
        series keeps its newest `series_points` points (1M scored events at the defaults)."""
        self.ranker, self.windows, self.series_every = ranker, windows, series_every
        self.scorer = PrequentialScorer(every, ranker.roles, max_users)
        self.hits: deque[float] = deque(maxlen=max(windows))
        self.ndcgs: deque[float] = deque(maxlen=max(windows))
        self.sq_errors: deque[tuple[float, int]] = deque(maxlen=max(windows))  # (sum, count) per batch
        self.total = {"evaluated": 0, "hits": 0.0, "ndcg": 0.0, "ratings": 0, "sq_error": 0.0}
        self.series: deque[dict[str, float]] = deque(maxlen=series_points)
        self._pending: list[Row] = []  # this batch's scored events
        self._reached = 0  # events of this batch the scorer has passed

    def before_step(self, batch: EventBatch, step: slice) -> None:
        """The ranker's step hook: score the due events of `batch[step]` before it learns them
        (the batch is not sliced: most steps score nothing)."""
        self.scorer.evaluate_span(batch, step.start, step.stop, {self.ranker.name: self.ranker},
                                  {self.ranker.name: self._pending})
        self._reached = step.stop

    def end_batch(self, batch: EventBatch) -> None:
        """After learning: events no step reached still become history; record the batch's scores."""
        if self._reached < len(batch):
            self.scorer.pass_unscored(batch, self._reached, len(batch))
        self._reached = 0
        if self._pending:
            evaluated = evaluated_rows(self._pending)
            self._pending.clear()
            self._record(evaluated.hit, evaluated.ndcg, evaluated.timestamp)

    def observe(self, batch: EventBatch) -> None:
        """Events nobody scores join the users' histories: events learned before, by some shards
        only or before a restart (the trainer's warm-up)."""
        self.scorer.pass_unscored(batch, 0, len(batch))

    def record_ratings(self, squared_errors: float, count: int) -> None:
        if count:
            self.total["ratings"] += count
            self.total["sq_error"] += squared_errors
            self.sq_errors.append((squared_errors, count))

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
                "events": self.scorer.position, "event_time": float(times.max()), "evaluated": self.total["evaluated"],
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
            "series": list(self.series),
        }
