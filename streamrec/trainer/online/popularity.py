"""`online-popularity`: the baseline every online model must beat. An item's score is the number of
positive events it had so far in the stream, the same for every user; the counts live in the
store's `popularity_items` table like any online model's rows, so the baseline also runs in the
live trainer and survives a restart."""

from __future__ import annotations

import numpy as np

from streamrec.param_server.client import Rows
from streamrec.param_server.specs import OptimizerSpec, TableSpec
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.base import (
    OnlineParams,
    OnlineRecommender,
    StepHook,
    StepStats,
    Updates,
)


class OnlinePopularity(OnlineRecommender):
    name = "online-popularity"
    Params = OnlineParams

    def table_specs(self) -> dict[str, TableSpec]:
        """One count per item (SGD at lr 1: a pushed -n adds n; new rows start at 0)."""
        return {"items": TableSpec(name=f"{self.table_prefix}_items", dim=1, optimizer=OptimizerSpec("sgd", 1.0),
                                   init_std=0.0)}

    def _learn(self, batch: EventBatch, rows: dict[str, Rows], before_step: StepHook | None,
               ) -> tuple[Updates, StepStats]:
        stats = StepStats(events=len(batch))
        if not len(batch):
            return {}, stats
        self.items.sync()
        counted = self.roles.positive_weight(batch.event_type, batch.value) > 0
        new_rows = self._add_new_items(batch.item_id[counted])
        self.hidden = np.zeros(len(self.items.index), bool)
        self.hidden[new_rows] = True
        item_rows = self.items.positions(batch.item_id)
        touched = np.unique(item_rows[counted])
        counts = self.items.values[:, 0]  # the mirror's storage: counted in place, so scores stay current
        start = counts[touched].astype(np.float64)
        for step in self.steps(len(batch)):
            if before_step is not None:
                before_step(step)
            rows_of_step = item_rows[step][counted[step]]
            self.hidden[rows_of_step] = False
            np.add.at(counts, rows_of_step, 1.0)
        self.hidden[:] = False
        stats.examples = int(counted.sum())
        delta = counts[touched].astype(np.float64) - start
        return {self.items.table: (list(self.items.index[touched]), (-delta[:, None]).astype(np.float32))}, stats

    def _scores(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(item_rows[:, 0], (len(user_ids), len(item_rows)))
