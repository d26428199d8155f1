"""Validate-then-produce: the one path by which events enter the interaction topic.

Used by `streamrec produce`, `streamrec replay` and the probes, so every entry point applies the
same schema and sends every rejected record to the dead-letter topic with its reason.
"""

from __future__ import annotations

from typing import Any

import orjson

from streamrec.core.config import Settings
from streamrec.stream.deadletter import DeadLetterSink
from streamrec.stream.events import EventSchema, InvalidEvent, encode
from streamrec.stream.kafka import Producer, producer_from
from streamrec.stream.metrics import EVENTS_ACCEPTED, EVENTS_PRODUCED
from streamrec.stream.topics import create_topics


class EventPublisher:
    """Produces valid events to `topic` (key = user id, timestamp = event time) and dead-letters
    the rest; `accepted + dead_lettered` always equals the records offered."""

    def __init__(self, producer: Producer, schema: EventSchema, topic: str, dlq_topic: str, component: str) -> None:
        self.producer, self.schema, self.topic, self.component = producer, schema, topic, component
        self.dead_letters = DeadLetterSink(producer, dlq_topic, component)
        self.accepted = 0
        self._counted = 0  # accepted events already added to the metrics
        self._accepted_metric = EVENTS_ACCEPTED.labels(component)
        self._produced_metric = EVENTS_PRODUCED.labels(component)

    @classmethod
    def from_settings(cls, settings: Settings, component: str, topic: str | None = None) -> EventPublisher:
        """A publisher to `topic` (default: the settings'), which it creates with its dead-letter
        topic where they do not exist: clients never create topics (streamrec.stream.topics)."""
        topic = topic or settings.topic
        create_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix], settings.topic_partitions)
        return cls(producer_from(settings), EventSchema.from_settings(settings), topic,
                   topic + settings.dlq_suffix, component)

    @property
    def dead_lettered(self) -> int:
        return self.dead_letters.count

    def _send(self, event: dict[str, Any]) -> None:
        self.producer.send(self.topic, encode(event), event["user_id"].encode(), int(event["timestamp"] * 1000))
        self.accepted += 1

    def publish_raw(self, raw: bytes, source: dict[str, Any], now: float | None = None) -> bool:
        """One wire record (e.g. a JSON line); True when accepted."""
        try:
            event = self.schema.decode(raw, now)
        except InvalidEvent as exc:
            self.dead_letters.send(raw, exc.reason, source, exc.detail)
            return False
        self._send(event)
        return True

    def publish(self, obj: object, source: dict[str, Any], now: float | None = None) -> bool:
        """One already-decoded record; True when accepted."""
        try:
            event = self.schema.validate(obj, now)
        except InvalidEvent as exc:
            self.dead_letters.send(_to_bytes(obj), exc.reason, source, exc.detail)
            return False
        self._send(event)
        return True

    def flush(self) -> None:
        """Wait for delivery, then count: metrics never run ahead of the broker."""
        self.producer.flush()
        delivered = self.accepted - self._counted
        self._accepted_metric.inc(delivered)
        self._produced_metric.inc(delivered)
        self._counted = self.accepted

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()

    def summary(self) -> dict[str, int]:
        return {"accepted": self.accepted, "dead_lettered": self.dead_lettered}


def _to_bytes(obj: object) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:
        return repr(obj).encode("utf-8", "replace")

