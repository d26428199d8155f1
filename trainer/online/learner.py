"""Runs the online models over micro-batches: one atomic push per batch for all models, carrying the
trainer's meta record (Kafka offsets, model state), and ranks items for prequential evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.online.batch import TrainBatch
from param_server.replica import TableMirror
from trainer.online.models import OnlineModel, StepStats


class OnlineLearner:
    def __init__(self, store: Any, models: list[OnlineModel]) -> None:
        if not models:
            raise ValueError("at least one online model is needed")
        self.store, self.models = store, models
        for model in models:
            model.create_tables(store)
        self.mirrors = {model.name: TableMirror(store, model.item_table) for model in models}

    @property
    def ranker(self) -> OnlineModel:
        """The model whose scores rank items (the first: BPR when both run)."""
        return self.models[0]

    def meta(self, offsets: dict[str, int] | None = None) -> dict[str, Any]:
        return {"offsets": offsets or {}, "models": {m.name: m.state() for m in self.models}}

    def restore(self, meta: dict[str, Any] | None) -> None:
        for model in self.models:
            model.restore(((meta or {}).get("models") or {}).get(model.name, {}))

    def learn(self, batch: TrainBatch, offsets: dict[str, int] | None = None) -> dict[str, StepStats]:
        """Gradients of every model, then one push: the update, the offsets and the applied-event
        count land together, so a checkpoint never holds one without the others."""
        updates: dict[str, tuple[list, np.ndarray]] = {}
        stats = {}
        for model in self.models:
            model_updates, stats[model.name] = model.gradients(self.store, batch)
            updates.update(model_updates)
        self.store.push(updates, meta=self.meta(offsets), events=len(batch),
                        event_time=float(batch.timestamp.max()) if len(batch) else None)
        return stats

    def item_scores(self, user_ids: np.ndarray, model: OnlineModel | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (users, known items), item ids) from the current state; users without a row
        get zero vectors, i.e. the items' biases: a learned popularity prior for cold users."""
        model = model or self.ranker
        mirror = self.mirrors[model.name]
        mirror.sync()
        users = self.store.pull(model.user_table, list(user_ids))
        scores = model.score(users.values.astype(np.float64), mirror.values.astype(np.float64))
        scores[:, ~mirror.alive] = -np.inf
        return scores, mirror.index.to_numpy()
