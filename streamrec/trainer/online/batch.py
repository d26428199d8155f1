"""The columns an online model learns from, whatever the source (Kafka micro-batch or a file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.stream.events import EventBatch


@dataclass(frozen=True)
class TrainBatch:
    user_id: np.ndarray  # object (str)
    item_id: np.ndarray  # object (str)
    event_type: np.ndarray  # object (str)
    value: np.ndarray  # float64, NaN = none
    timestamp: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def from_events(cls, batch: EventBatch) -> TrainBatch:
        return cls(
            np.array(batch.user_id, dtype=object), np.array(batch.item_id, dtype=object),
            np.array(batch.event_type, dtype=object), batch.value, batch.timestamp,
        )

    def take(self, index: np.ndarray | slice) -> TrainBatch:
        return TrainBatch(self.user_id[index], self.item_id[index], self.event_type[index],
                          self.value[index], self.timestamp[index])

