"""Runs the online models over micro-batches: one atomic push per batch for all models, carrying the
trainer's meta record (Kafka offsets, model state), and ranks items for prequential evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamrec.trainer.online.batch import TrainBatch
from streamrec.trainer.online.models import OnlineModel, StepHook, StepStats


class OnlineLearner:
    def __init__(self, store: Any, models: list[OnlineModel]) -> None:
        if not models:
            raise ValueError("at least one online model is needed")
        self.store, self.models = store, models
        for model in models:
            model.create_tables(store)
            model.attach(store)

    @property
    def ranker(self) -> OnlineModel:
        """The model whose scores rank items (the first: BPR when both run)."""
        return self.models[0]

    def meta(self, offsets: dict[str, int] | None = None) -> dict[str, Any]:
        return {"offsets": offsets or {}, "models": {m.name: m.state() for m in self.models}}

    def restore(self, meta: dict[str, Any] | None) -> None:
        for model in self.models:
            model.restore(((meta or {}).get("models") or {}).get(model.name, {}))

    def learn(self, batch: TrainBatch, offsets: dict[str, int] | None = None,
              before_step: StepHook | None = None) -> dict[str, StepStats]:
        """Pull every model's rows in one round trip, let each walk the batch in steps (the ranker
        calls `before_step` before each step: prequential scoring), then ONE push: the deltas, the
        offsets and the applied-event count land together, so a checkpoint never holds one
        without the others."""
        needs = {table: ids for model in self.models for table, ids in model.needs(batch).items()}
        rows = self.store.pull_many(needs) if needs else {}
        updates: dict[str, tuple[list, np.ndarray]] = {}
        stats = {}
        for model in self.models:
            model_updates, stats[model.name] = model.learn(batch, rows, before_step if model is self.ranker else None)
            updates.update(model_updates)
        self.store.push(updates, meta=self.meta(offsets), events=len(batch),
                        event_time=float(batch.timestamp.max()) if len(batch) else None)
        return stats

    def item_scores(self, user_ids: np.ndarray, sync: bool = True) -> np.ndarray:
        """(users, rows of `ranker.items`) scores. `sync=False` inside a batch (its local state is
        the newest); users without a row get zero vectors, i.e. the items' biases: a learned
        popularity prior for cold users. Items not (yet) in the stream score -inf."""
        model = self.ranker
        if sync:
            model.items.sync()
        scores = model.score(model.user_rows(user_ids, self.store), model.items.values)
        scores[:, ~model.items.alive] = -np.inf
        if len(model.hidden) == scores.shape[1] and model.hidden.any():
            scores[:, model.hidden] = -np.inf
        return scores
