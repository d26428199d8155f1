"""The work behind POST /events: validate with the trainer's schema, skip ids already produced,
produce the rest and the dead letters, wait for the broker's acknowledgement, then remember the
ids. A request is acknowledged (202) only when every one of its events is on the topic (or was
already), and answered 503 otherwise; it is never half-accepted from the client's point of view.

Why one produce at a time per worker: the producer interface reports delivery failures per
`flush`, not per record, so two requests flushing one producer together could not tell whose
records failed. A lock makes each request's send + flush its own; one flush of a batch costs a few
milliseconds, and a worker's throughput in events stays high because clients batch.

Broker outage: the producer's delivery timeout is the request's (`produce_timeout_s`), so a
record that could not be acknowledged in time expires in the client instead of reaching the topic
later; after a failure the worker answers 503 at once for `retry_after_s` (one timeout per outage,
not one per request) and starts a fresh producer. A batch whose acknowledgement was lost (the
broker stored 40 of 100 events, then died) is answered 503 and its reservations are released, so
the client's retry produces the whole batch again: the topic then holds those 40 twice, and the
trainer's event-id de-duplication applies them once (docs/serving.md, "Feedback").
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
import pandas as pd
import redis
from prometheus_client import Counter

from streamrec.serving.config import MAX_EVENTS_PER_REQUEST, ServingConfig
from streamrec.serving.idempotency import EventIdLedger, IdState
from streamrec.serving.metrics import ServingMetrics
from streamrec.stream.deadletter import DeadLetterSink
from streamrec.stream.events import EventSchema, InvalidEvent, encode
from streamrec.stream.kafka import BROKER_ERRORS, Producer, make_producer
from streamrec.stream.metrics import EVENTS_ACCEPTED, EVENTS_PRODUCED
from streamrec.stream.topics import create_topics

log = logging.getLogger("streamrec.serving.feedback")
COMPONENT = "serving"
# redis-py's Redis Cluster client raises RedisClusterException (no RedisError) when no node answers
REDIS_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException)
LEDGER_TIMEOUT_S = 2.0  # one script over up to 10,000 keys: far above a single-key read's budget


@lru_cache(maxsize=1)
def feedback_events() -> Counter:
    """Events offered to POST /events by outcome (one set per process: metrics register globally)."""
    return Counter("streamrec_serving_feedback_events_total",
                   "events offered to POST /events by outcome: produced (acknowledged by the broker), "
                   "duplicate (event id produced before, not produced again), dead_lettered (invalid), "
                   "unavailable (answered 503: broker or a concurrent request)", ["outcome"])


class BadRequest(ValueError):
    """The body is not an event or an array of events (400 / 413 / 422 by `status`)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Unavailable(RuntimeError):
    """Nothing of the request is acknowledged; retry the whole request after `retry_after` seconds."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


@dataclass
class Outcome:
    accepted: int = 0
    produced: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    event_ids: list[str | None] = field(default_factory=list)
    deduplicated: bool = True

    def body(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "produced": self.produced, "duplicates": self.duplicates,
                "dead_lettered": self.dead_lettered, "rejected": self.rejected, "event_ids": self.event_ids,
                "deduplicated": self.deduplicated}


def parse_body(raw: bytes) -> list[object]:
    """One event object or an array of up to MAX_EVENTS_PER_REQUEST of them."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        payload = _with_numbers_beyond_double(raw, exc)
    if type(payload) is dict:
        return [payload]
    if type(payload) is not list:
        raise BadRequest(422, "expected an event object or an array of event objects")
    if len(payload) > MAX_EVENTS_PER_REQUEST:
        raise BadRequest(413, f"{len(payload)} events: at most {MAX_EVENTS_PER_REQUEST} per request")
    return payload


def _with_numbers_beyond_double(raw: bytes, error: orjson.JSONDecodeError) -> object:
    """The body when orjson refused it only for a number beyond a double (1e400: valid JSON), read
    by the standard parser, which makes it infinite, so that the event holding it alone is
    rejected (`non_finite:...`) and dead-lettered, as the schema does with any other bad value;
    refusing the body dropped every good event beside it. Anything else stays a 400: the NaN and
    Infinity literals (not JSON), and what orjson alone refuses (lone surrogates, depth), which the
    re-encoding check catches."""
    refusal = BadRequest(400, f"the body is not JSON: {str(error)[:200]}")
    if "infinity" not in str(error):
        raise refusal from None
    try:
        payload = json.loads(raw, parse_constant=_no_constant, parse_int=_as_orjson_reads)
        orjson.dumps(payload)  # what orjson would not have parsed, it does not write either
    except (ValueError, RecursionError, orjson.JSONEncodeError):
        raise refusal from None
    return payload


def _as_orjson_reads(literal: str) -> int | float:
    """An integer literal as orjson reads it: an int within 64 bits, else a double (infinite from
    309 digits on). The standard parser's own big ints were refused when the body was written
    again, so one event valued 10**400 dropped the good events beside it; and beyond 4,300 digits
    `int()` itself raises."""
    if len(literal.lstrip("-")) <= 20:
        value = int(literal)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(literal)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class EventIngest:
    """One per worker process: its own producer (created on first use, closed at shutdown) and the
    Redis ledger of produced ids."""

    def __init__(self, config: ServingConfig, metrics: ServingMetrics) -> None:
        self.config = config
        self.schema = EventSchema(tuple(config.custom_event_types), config.max_context_keys, config.max_context_bytes)
        self.topic, self.dlq_topic = config.topic, config.topic + config.dlq_suffix
        self.retry_after = max(1, math.ceil(config.produce_retry_after_s))
        # outlives a produce that is still waiting: the lock, the topics' creation (`open_producer`)
        # and the send each wait at most produce_timeout_s
        pending_ms = int(3000 * config.produce_timeout_s) + 5000
        self.ledger = EventIdLedger.from_url(config.redis_url, config.feature_prefix, config.event_id_retention_s,
                                             pending_ms, LEDGER_TIMEOUT_S, config.redis_cluster)
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._sink: DeadLetterSink | None = None
        self._broker_down_until = 0.0
        self._redis_down_until = 0.0
        self._redis_degraded = metrics.degraded.labels("idempotency")
        counter = feedback_events()
        self._counted = {name: counter.labels(name) for name in ("produced", "duplicate", "dead_lettered",
                                                                   "unavailable")}
        self._accepted_metric = EVENTS_ACCEPTED.labels(COMPONENT)
        self._produced_metric = EVENTS_PRODUCED.labels(COMPONENT)

    # ---- the request ---------------------------------------------------------------------------
    def ingest(self, items: Sequence[object]) -> Outcome:
        now = time.time()
        outcome = Outcome(event_ids=[None] * len(items))
        valid: list[dict[str, Any]] = []
        positions: list[int] = []
        bad: list[tuple[int, bytes, InvalidEvent]] = []
        for n, item in enumerate(items):
            try:
                event = self.schema.validate(_received_at(item, now), now)
            except InvalidEvent as exc:
                bad.append((n, _raw(item), exc))
                outcome.rejected.append({"index": n, "reason": exc.reason, "detail": exc.detail})
                continue
            valid.append(event)
            positions.append(n)
            outcome.event_ids[n] = event["event_id"]
        ids = pd.Index([e["event_id"] for e in valid], dtype=object)
        repeated = ids.duplicated()  # the same id twice in one request: the later copies are duplicates
        unique_ids = ids[~repeated].tolist()
        token = uuid.uuid4().hex
        states = self._reserve(unique_ids, token)
        outcome.deduplicated = states is not None
        if states is not None and (states == IdState.PENDING).any():
            self._release([i for i, s in zip(unique_ids, states) if s == IdState.RESERVED], token)
            self._counted["unavailable"].inc(len(items))
            raise Unavailable("some of these event ids are being produced by another request right now; "
                              "retry the whole request", self.retry_after)
        fresh = np.ones(len(unique_ids), bool) if states is None else states == IdState.RESERVED
        new_ids = set(np.asarray(unique_ids, dtype=object)[fresh].tolist())
        first = ~repeated
        to_send = [e for e, keep in zip(valid, first) if keep and e["event_id"] in new_ids]
        reserved = [i for i, keep in zip(unique_ids, fresh) if keep] if states is not None else []
        try:
            self._produce(to_send, bad)
        except Unavailable:
            self._release(reserved, token)
            self._counted["unavailable"].inc(len(items))
            raise
        self._confirm(reserved)
        outcome.produced = len(to_send)
        outcome.duplicates = len(valid) - len(to_send)
        outcome.accepted = len(valid)
        outcome.dead_lettered = len(bad)
        self._counted["produced"].inc(outcome.produced)
        self._counted["duplicate"].inc(outcome.duplicates)
        self._counted["dead_lettered"].inc(outcome.dead_lettered)
        return outcome

    # ---- Kafka ---------------------------------------------------------------------------------
    def _produce(self, events: list[dict[str, Any]], bad: list[tuple[int, bytes, InvalidEvent]]) -> None:
        """Send the events and the dead letters, and wait until the broker has every one of them."""
        if not events and not bad:
            return
        if time.monotonic() < self._broker_down_until:
            raise Unavailable("the event broker is unreachable", self.retry_after)
        if not self._lock.acquire(timeout=self.config.produce_timeout_s):
            raise Unavailable("the event broker is slow: produces are queued", self.retry_after)
        try:
            producer, sink = self._open()
            for event in events:
                producer.send(self.topic, encode(event), event["user_id"].encode(), int(event["timestamp"] * 1000))
            for index, raw, exc in bad:
                sink.send(raw, exc.reason, {"http": "POST /events", "index": index}, exc.detail)
            producer.flush(self.config.produce_timeout_s)
        except BROKER_ERRORS as exc:
            log.warning("POST /events: the broker did not acknowledge %d events: %s", len(events) + len(bad), exc)
            self._broker_down_until = time.monotonic() + self.retry_after
            self._discard()
            raise Unavailable("the event broker did not acknowledge the events; nothing of this request is "
                              "acknowledged, retry the whole request (event ids make the retry safe)",
                              self.retry_after) from exc
        finally:
            self._lock.release()
        self._accepted_metric.inc(len(events))
        self._produced_metric.inc(len(events))

    def _open(self) -> tuple[Producer, DeadLetterSink]:
        """The worker's producer (under the lock): created on first use, after uvicorn forked, and
        after a failure; the topics are created first where they do not exist (stream.topics)."""
        if self._producer is None or self._sink is None:
            self._producer = open_producer(self.config, [self.topic, self.dlq_topic])
            self._sink = DeadLetterSink(self._producer, self.dlq_topic, COMPONENT)
        return self._producer, self._sink

    def _discard(self) -> None:
        """Drop a producer that failed (under the lock): its late delivery reports must not fail the
        next request. It is closed on a thread of its own; its records expire within the timeout."""
        producer, self._producer, self._sink = self._producer, None, None
        if producer is not None:
            threading.Thread(target=_close_quietly, args=(producer,), name="feedback-producer-close",
                             daemon=True).start()

    def close(self) -> None:
        with self._lock:
            producer, self._producer, self._sink = self._producer, None, None
        if producer is not None:
            _close_quietly(producer)
        try:
            self.ledger.close()
        except REDIS_FAILURES as exc:  # the worker is stopping: nothing is lost with the connections
            log.warning("POST /events: closing the event-id ledger's Redis connections failed (%s)", exc)

    # ---- Redis (degrades to producing without the check) ---------------------------------------
    def _reserve(self, ids: list[str], token: str) -> np.ndarray | None:
        if time.monotonic() < self._redis_down_until:
            self._redis_degraded.inc()
            return None
        try:
            return self.ledger.reserve(ids, token)
        except REDIS_FAILURES as exc:
            log.warning("POST /events: Redis unreachable (%s): producing without the event-id check", exc)
            self._redis_down_until = time.monotonic() + self.config.redis_retry_s
            self._redis_degraded.inc()
            return None

    def _confirm(self, ids: list[str]) -> None:
        """After the acknowledgement. If Redis fails now, the reservations expire and a re-send of
        these ids is produced again (the trainer drops the copy): the events themselves are safe."""
        try:
            self.ledger.confirm(ids)
        except REDIS_FAILURES as exc:
            log.warning("POST /events: could not mark %d produced event ids (%s)", len(ids), exc)
            self._redis_degraded.inc()

    def _release(self, ids: list[str], token: str) -> None:
        try:
            self.ledger.release(ids, token)
        except REDIS_FAILURES as exc:  # the reservations expire by themselves
            log.warning("POST /events: could not release %d reservations (%s)", len(ids), exc)


def _received_at(item: object, now: float) -> object:
    """An event without a timestamp happened when the server received it (a click from a browser
    has no better clock); everything else goes to the schema unchanged."""
    if type(item) is dict and item.get("timestamp") is None:
        return {**item, "timestamp": now}
    return item


def _raw(item: object) -> bytes:
    try:
        return orjson.dumps(item)
    except TypeError:
        return repr(item).encode("utf-8", "replace")


def open_producer(config: ServingConfig, topics: Sequence[str]) -> Producer:
    """A producer whose waits are bounded by `produce_timeout_s`, for `topics`, which are created
    first where they do not exist (clients never create topics: streamrec.stream.topics). The
    creation's four steps (bootstrap, listing, creating, waiting for the metadata) get a quarter
    of the timeout each: together no longer than one send."""
    create_topics(config.kafka_bootstrap, topics, config.topic_partitions, timeout_s=config.produce_timeout_s / 4)
    return make_producer(config.kafka_bootstrap, config.kafka_client, config.producer_acks, config.producer_linger_ms,
                         **producer_timeouts(config.kafka_client, config.produce_timeout_s))


def producer_timeouts(client: str, timeout_s: float) -> dict[str, Any]:
    """Backend settings that bound every wait of a produce by the request's timeout."""
    ms = max(1000, int(timeout_s * 1000))
    if client == "confluent":
        return {"message.timeout.ms": ms, "socket.timeout.ms": ms}
    return {"max_block_ms": ms, "delivery_timeout_ms": ms, "request_timeout_ms": max(500, ms // 2),
            "bootstrap_timeout_ms": ms}


def _close_quietly(producer: Producer) -> None:
    try:
        producer.close()
    except BROKER_ERRORS as exc:
        log.info("closing a failed feedback producer: %s", exc)
