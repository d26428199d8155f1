"""Impressions (issue 17): what each `/recommend` answer showed, logged to the impressions topic.

One impression per answer: `request_id`, `user_id`, the shown `items` in order (position = index),
`experiment` / `arm` / `experiments`, `model_version`, `cold_start` and the server's `timestamp`.
Clicks that carry the `request_id` in their event `context` can then be joined to what was shown,
and shown-but-not-clicked items become negatives.

Logging must never cost a request its latency or its answer. A request only appends the impression
to a bounded in-memory queue (`record`: no I/O, no serialisation); a thread per worker drains it
every `flush_s` (`FLUSH_S` by default), and sends the impressions as JSON lines, many to a Kafka record
(`streamrec.stream.impressions`, which readers use too). The thread waits for the broker's
acknowledgement off the request path. When the broker is down, the batch goes back to the queue
and the thread retries after `RETRY_S`; when the queue is full (`max_pending` records), the oldest record is dropped and
counted (`streamrec_serving_impressions_total{outcome="dropped"}`), never silently. Delivery is
at least once: a batch that failed after part of it was acknowledged is sent again, so consumers
de-duplicate by `request_id`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from prometheus_client import Counter

from streamrec.stream.impressions import encode_records
from streamrec.stream.kafka import BROKER_ERRORS, Producer

log = logging.getLogger(__name__)
FLUSH_S = 0.2
RETRY_S = 2.0
MAX_BATCH = 5000  # impressions taken from the queue at a time


@lru_cache(maxsize=1)
def impression_records() -> Counter:
    """Impression records by outcome (one set per process: metrics register globally)."""
    return Counter("streamrec_serving_impressions_total",
                   "impression records by outcome: produced (acknowledged by the broker), dropped (the "
                   "queue was full while the broker was unreachable)", ["outcome"])


class ImpressionLog:
    def __init__(self, topic: str, open_producer: Callable[[], Producer], max_pending: int = 100_000,
                 ack_timeout_s: float = 10.0, flush_s: float = FLUSH_S) -> None:
        self.topic, self.open_producer, self.ack_timeout_s, self.flush_s = topic, open_producer, ack_timeout_s, flush_s
        self.pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self._producer: Producer | None = None
        self._retry_at = 0.0
        counter = impression_records()
        self._produced, self._dropped = counter.labels("produced"), counter.labels("dropped")
        self.last_error: str | None = None

    def record(self, impression: dict[str, Any]) -> None:
        """Queue one answer's impression (called on the request path: an append, nothing else)."""
        if len(self.pending) == self.pending.maxlen:
            self._dropped.inc()  # the deque drops its oldest record to take this one
        self.pending.append(impression)

    def run(self, stop: threading.Event) -> None:
        """Drain the queue until `stop`, then once more within `ack_timeout_s`; never raises."""
        while not stop.wait(self.flush_s):
            if time.monotonic() >= self._retry_at:
                self.flush()
        self.flush()
        self._discard()

    def flush(self) -> int:
        """Produce what is queued, in batches of MAX_BATCH; returns the records acknowledged."""
        sent = 0
        while self.pending:
            batch = [self.pending.popleft() for _ in range(min(MAX_BATCH, len(self.pending)))]
            try:
                producer = self._open()
                for value in encode_records(batch):
                    producer.send(self.topic, value)
                producer.flush(self.ack_timeout_s)
            except BROKER_ERRORS as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("impressions: the broker did not acknowledge %d records, retrying in %.0f s: %s",
                            len(batch), RETRY_S, self.last_error)
                self._requeue(batch)
                self._discard()
                self._retry_at = time.monotonic() + RETRY_S
                return sent
            sent += len(batch)
            self._produced.inc(len(batch))
            self.last_error = None
        return sent

    def _requeue(self, batch: list[dict[str, Any]]) -> None:
        """Put a failed batch back in front, oldest first; what no longer fits is dropped, counted."""
        room = (self.pending.maxlen or 0) - len(self.pending)
        keep = batch[len(batch) - room:] if room < len(batch) else batch
        if len(keep) < len(batch):
            self._dropped.inc(len(batch) - len(keep))
        self.pending.extendleft(reversed(keep))

    def _open(self) -> Producer:
        if self._producer is None:
            self._producer = self.open_producer()
        return self._producer

    def _discard(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close()
            except BROKER_ERRORS as exc:
                log.info("closing a failed impressions producer: %s", exc)
