"""The dead-letter topic: every rejected record is kept with its raw bytes and the reason.

A dead letter is a JSON object: `reason` (short code, see `streamrec.stream.events.InvalidEvent`),
`detail`, `source` (where the record came from: topic/partition/offset or file/line),
`component` (which process rejected it), `time` (epoch seconds of rejection) and `raw_base64`
(the exact bytes; empty with `raw_null` for a tombstone, a record whose value is null). The
record key is the original key; header `streamrec-reason` repeats the reason.

A record is kept whole up to MAX_RAW_BYTES. Past that the letter keeps its first MAX_RAW_BYTES with
`raw_truncated`, `raw_size` and `raw_sha256`: an 800 kB record of junk made a letter over the
producer's 1 MiB cap, the send raised, and the trainer died on that record at every restart (a
3 MB body on `POST /events` failed the same way, as a 503 that tripped the broker-down state).
Details and keys are bounded too.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import orjson

from streamrec.stream.kafka import Producer
from streamrec.stream.metrics import EVENTS_DEAD_LETTERED

REASON_HEADER = "streamrec-reason"
MAX_RAW_BYTES = 256 * 1024  # base64 makes it 342 kB, well inside the brokers' default 1 MiB per record
MAX_DETAIL_CHARS = 1024
MAX_KEY_BYTES = 1024


def dead_letter_record(raw: bytes | None, reason: str, detail: str, source: dict[str, Any], component: str) -> bytes:
    """`raw` None: the record was a tombstone (`raw_null`); slicing it killed the trainer on that
    record at every restart."""
    data = b"" if raw is None else raw
    letter: dict[str, Any] = {
        "reason": reason[:MAX_DETAIL_CHARS],
        "detail": detail[:MAX_DETAIL_CHARS],
        "source": source,
        "component": component,
        "time": time.time(),
        "raw_base64": base64.b64encode(data[:MAX_RAW_BYTES]).decode("ascii"),
    }
    if raw is None:
        letter["raw_null"] = True
    if len(data) > MAX_RAW_BYTES:
        letter.update(raw_truncated=True, raw_size=len(data), raw_sha256=hashlib.sha256(data).hexdigest())
    return orjson.dumps(letter)


def read_dead_letter(value: bytes) -> dict[str, Any]:
    """A dead-letter record with its raw bytes restored under `raw` (the first MAX_RAW_BYTES of them
    where `raw_truncated`)."""
    letter = orjson.loads(value)
    letter["raw"] = base64.b64decode(letter["raw_base64"])
    return letter


class DeadLetterSink:
    """Sends rejected records to `<topic>.dlq` through an existing producer and counts them."""

    def __init__(self, producer: Producer, topic: str, component: str) -> None:
        self.producer, self.topic, self.component = producer, topic, component
        self.count = 0

    def send(
        self, raw: bytes | None, reason: str, source: dict[str, Any], detail: str = "", key: bytes | None = None
    ) -> None:
        self.producer.send(
            self.topic,
            dead_letter_record(raw, reason, detail, source, self.component),
            key=None if key is None else key[:MAX_KEY_BYTES],
            headers=[(REASON_HEADER, reason[:MAX_DETAIL_CHARS].encode())],
        )
        EVENTS_DEAD_LETTERED.labels(self.component, reason).inc()
        self.count += 1
