"""The dead-letter topic: every rejected record is kept with its raw bytes and the reason.

A dead letter is a JSON object: `reason` (short code, see `streamrec.stream.events.InvalidEvent`),
`detail`, `source` (where the record came from: topic/partition/offset or file/line),
`component` (which process rejected it), `time` (epoch seconds of rejection) and `raw_base64`
(the exact bytes). The record key is the original key; header `streamrec-reason` repeats the reason.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from streamrec.stream.kafka import Producer
from streamrec.stream.metrics import EVENTS_DEAD_LETTERED

REASON_HEADER = "streamrec-reason"


def dead_letter_record(raw: bytes, reason: str, detail: str, source: dict[str, Any], component: str) -> bytes:
    return orjson.dumps(
        {
            "reason": reason,
            "detail": detail,
            "source": source,
            "component": component,
            "time": time.time(),
            "raw_base64": base64.b64encode(raw).decode("ascii"),
        }
    )


def read_dead_letter(value: bytes) -> dict[str, Any]:
    """A dead-letter record with its raw bytes restored under `raw`."""
    letter = orjson.loads(value)
    letter["raw"] = base64.b64decode(letter["raw_base64"])
    return letter


class DeadLetterSink:
    """Sends rejected records to `<topic>.dlq` through an existing producer and counts them."""

    def __init__(self, producer: Producer, topic: str, component: str) -> None:
        self.producer, self.topic, self.component = producer, topic, component
        self.count = 0

    def send(
        self, raw: bytes, reason: str, source: dict[str, Any], detail: str = "", key: bytes | None = None
    ) -> None:
        self.producer.send(
            self.topic,
            dead_letter_record(raw, reason, detail, source, self.component),
            key=key,
            headers=[(REASON_HEADER, reason.encode())],
        )
        EVENTS_DEAD_LETTERED.labels(self.component, reason).inc()
        self.count += 1
