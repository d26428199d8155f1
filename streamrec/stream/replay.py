"""Replay a historical log into the interaction topic in event-time order, optionally paced.

`speed` compresses event time: 3600 sends one hour of events per wall-clock second; 0 sends as
fast as possible. Event ids are deterministic (see `InteractionLog.event_ids`), so a consumer can
de-duplicate a repeated replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamrec.stream.events import iter_events
from streamrec.stream.loaders import InteractionLog
from streamrec.stream.publish import EventPublisher

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class ReplayResult:
    produced: int
    dead_lettered: int
    seconds: float
    first_timestamp: float | None
    last_timestamp: float | None

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "produced": self.produced,
            "dead_lettered": self.dead_lettered,
            "events_per_second": round((self.produced + self.dead_lettered) / self.seconds, 1) if self.seconds else None,
            "seconds": round(self.seconds, 3),
            "first_timestamp": self.first_timestamp,
            "last_timestamp": self.last_timestamp,
        }


def replay(
    log: InteractionLog,
    publisher: EventPublisher,
    speed: float = 0.0,
    limit: int | None = None,
    progress: ProgressCallback | None = None,
    chunk: int = 2000,
) -> ReplayResult:
    """Publish `log` (already time-ordered) through `publisher`; returns counts and timing."""
    if limit is not None:
        log = log.take(slice(0, limit))
    n = len(log)
    ids = log.event_ids()
    events = iter_events(log.user_id, log.item_id, log.event_types(), log.rating, log.timestamp, ids)
    source_name = log.source
    # Wall-clock second at which each event is due (all zero when unpaced).
    due = (log.timestamp - log.timestamp[0]) / speed if speed > 0 and n else np.zeros(n)
    start = time.monotonic()
    sent = 0
    while sent < n:
        if speed > 0:
            elapsed = time.monotonic() - start
            ready = int(np.searchsorted(due, elapsed, side="right"))
            if ready <= sent:
                time.sleep(min(due[sent] - elapsed, 0.1))
                continue
            stop = min(ready, sent + chunk)
        else:
            stop = min(n, sent + chunk)
        for row in range(sent, stop):
            publisher.publish(next(events), {"file": source_name, "row": row})
        if progress:
            progress(stop - sent)
        sent = stop
    publisher.flush()
    seconds = time.monotonic() - start
    return ReplayResult(
        publisher.accepted, publisher.dead_lettered, seconds,
        float(log.timestamp[0]) if n else None, float(log.timestamp[-1]) if n else None,
    )
