"""The one interaction-event schema: validation, normalisation, wire encoding and batching.

Wire format: a UTF-8 JSON object per Kafka record, key = user id (per-user order within a
partition), record timestamp = the event timestamp in milliseconds. Validation is strict: a
record that fails any check raises `InvalidEvent` with a short machine-readable reason, and the
caller sends it to the dead-letter topic (see `streamrec.stream.deadletter`) - nothing is dropped silently.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
import pandas as pd

from streamrec.core.config import Settings
from streamrec.stream.loaders import InteractionLog

BUILTIN_EVENT_TYPES: tuple[str, ...] = ("view", "click", "like", "rating", "purchase", "watch", "skip")
FIELDS = frozenset({"event_id", "user_id", "item_id", "event_type", "value", "timestamp", "context"})
REQUIRED = ("user_id", "item_id", "event_type", "timestamp")
_PLAIN_FIELDS = FIELDS - {"context"}  # `decode_many`'s fast path: a record with a context is validated in full
MIN_TIMESTAMP = 788_918_400.0  # 1995-01-01T00:00:00Z: nothing older is a plausible interaction
MAX_FUTURE_SECONDS = 86_400.0
MAX_ID_BYTES = 256
SHORT_ID_CHARS = MAX_ID_BYTES // 4  # UTF-8 takes at most 4 bytes a character: ids this short always fit
_NUMBER = (int, float)
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1  # what JSON encoders and decoders here accept


class InvalidEvent(ValueError):
    """A record that breaks the schema; `reason` is a short code such as `bad_type:user_id`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# a Kafka tombstone on the interaction topic: no event, and no bytes to keep beyond the fact
NULL_VALUE = InvalidEvent("null_value", "a record without a value (a tombstone)")


@dataclass(frozen=True)
class EventSchema:
    """The accepted event types and context bounds; one instance per process."""

    custom_event_types: tuple[str, ...] = ()
    max_context_keys: int = 32
    max_context_bytes: int = 2048
    event_types: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "event_types", frozenset(BUILTIN_EVENT_TYPES) | frozenset(self.custom_event_types)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> EventSchema:
        return cls(
            tuple(settings.custom_event_types), settings.max_context_keys, settings.max_context_bytes
        )

    def validate(self, obj: Any, now: float | None = None) -> dict[str, Any]:
        """Check one decoded record and return it normalised (event_id filled, value a float).

        The returned dict is a new object holding only schema fields, so it can be re-encoded as is.
        """
        if type(obj) is not dict:
            raise InvalidEvent("not_object", f"expected a JSON object, got {type(obj).__name__}")
        extra = obj.keys() - FIELDS
        if extra:
            raise InvalidEvent("unknown_field", ",".join(sorted(map(str, extra)))[:200])
        for name in REQUIRED:
            if name not in obj or obj[name] is None:
                raise InvalidEvent(f"missing_field:{name}")
        event_id = obj.get("event_id")
        if event_id is None:
            event_id = uuid.uuid4().hex
        else:
            _check_id("event_id", event_id)
        user_id, item_id = obj["user_id"], obj["item_id"]
        _check_id("user_id", user_id)
        _check_id("item_id", item_id)
        event_type = obj["event_type"]
        if type(event_type) is not str:
            raise InvalidEvent("bad_type:event_type", type(event_type).__name__)
        if event_type not in self.event_types:
            raise InvalidEvent("unknown_event_type", event_type[:64])
        timestamp = _finite_number("timestamp", obj["timestamp"])
        now = time.time() if now is None else now
        if timestamp < MIN_TIMESTAMP or timestamp > now + MAX_FUTURE_SECONDS:
            raise InvalidEvent("timestamp_out_of_range", repr(timestamp))
        event: dict[str, Any] = {
            "event_id": event_id,
            "user_id": user_id,
            "item_id": item_id,
            "event_type": event_type,
            "timestamp": timestamp,
        }
        value = obj.get("value")
        if value is not None:
            event["value"] = _finite_number("value", value)
        context = obj.get("context")
        if context is not None:
            event["context"] = self._check_context(context)
        return event

    def _check_context(self, context: Any) -> dict[str, Any]:
        if type(context) is not dict:
            raise InvalidEvent("bad_type:context", type(context).__name__)
        if len(context) > self.max_context_keys:
            raise InvalidEvent("context_too_large", f"{len(context)} keys > {self.max_context_keys}")
        for key, value in context.items():
            kind = type(value)
            if kind is str:
                continue
            if kind not in _NUMBER:
                raise InvalidEvent("bad_context_value", f"{str(key)[:64]}: {kind.__name__}")
            if kind is float and not math.isfinite(value):
                raise InvalidEvent("non_finite:context", str(key)[:64])
            if kind is int and not _INT64_MIN <= value <= _UINT64_MAX:
                raise InvalidEvent("bad_context_value", f"{str(key)[:64]}: integer out of 64-bit range")
        size = len(orjson.dumps(context))
        if size > self.max_context_bytes:
            raise InvalidEvent("context_too_large", f"{size} bytes > {self.max_context_bytes}")
        return context

    def decode(self, raw: bytes | None, now: float | None = None) -> dict[str, Any]:
        """Wire bytes -> validated event."""
        if raw is None:
            raise NULL_VALUE
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent("not_json", str(exc)[:200]) from None
        return self.validate(obj, now)

    def decode_many(self, raws: Sequence[bytes | None], now: float | None = None,
                    ) -> tuple[EventBatch, list[tuple[int, InvalidEvent]]]:
        """Wire records -> the batch of the valid ones (in order) and (position, error) of the others.

        The same events and errors as `decode` per record, without a normalised dict per event:
        a plain record (string ids of at most 64 characters, an event id, a float timestamp in
        range, a float value or none, no context) goes straight into the columns; anything else
        takes `validate`, which decides and explains exactly as it does for one record."""
        now = time.time() if now is None else now
        latest, event_types, plain_fields = now + MAX_FUTURE_SECONDS, self.event_types, _PLAIN_FIELDS
        short = SHORT_ID_CHARS
        users, items, kinds, values, times, event_ids, contexts = [], [], [], [], [], [], []
        invalid: list[tuple[int, InvalidEvent]] = []
        nan, loads, isfinite = math.nan, orjson.loads, math.isfinite
        for n, raw in enumerate(raws):
            if raw is None:
                invalid.append((n, NULL_VALUE))
                continue
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError as exc:
                invalid.append((n, InvalidEvent("not_json", str(exc)[:200])))
                continue
            plain = type(obj) is dict and obj.keys() <= plain_fields
            if plain:
                user, item, kind = obj.get("user_id"), obj.get("item_id"), obj.get("event_type")
                timestamp, event_id, value, context = obj.get("timestamp"), obj.get("event_id"), obj.get("value"), None
                plain = (type(user) is str and type(item) is str and type(event_id) is str and type(kind) is str
                         and 0 < len(user) <= short and 0 < len(item) <= short and 0 < len(event_id) <= short
                         and kind in event_types and type(timestamp) is float and MIN_TIMESTAMP <= timestamp <= latest
                         and (value is None or (type(value) is float and isfinite(value))))
            if not plain:
                try:
                    event = self.validate(obj, now)
                except InvalidEvent as exc:
                    invalid.append((n, exc))
                    continue
                user, item, kind = event["user_id"], event["item_id"], event["event_type"]
                timestamp, event_id, value, context = (event["timestamp"], event["event_id"], event.get("value"),
                                                       event.get("context"))
            users.append(user)
            items.append(item)
            kinds.append(kind)
            values.append(nan if value is None else value)
            times.append(timestamp)
            event_ids.append(event_id)
            contexts.append(context)
        return EventBatch(_objects(users), _objects(items), _objects(kinds), np.array(values, np.float64),
                          np.array(times, np.float64), _objects(event_ids), _objects(contexts)), invalid


def _objects(values: list[Any]) -> np.ndarray:
    """A list as a 1-d object array (np.array would make a 2-d array of a list of lists)."""
    out = np.empty(len(values), object)
    out[:] = values
    return out


def _check_id(name: str, value: Any) -> None:
    if type(value) is not str:
        raise InvalidEvent(f"bad_type:{name}", type(value).__name__)
    if not value or (len(value) > SHORT_ID_CHARS and not id_fits(value)):  # encode only the rare long ones
        raise InvalidEvent(f"bad_length:{name}", f"{len(value)} chars")


def id_fits(value: str) -> bool:
    """Whether an id is at most `MAX_ID_BYTES` of UTF-8 (lone surrogates counted as encoded)."""
    return len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES


def _finite_number(name: str, value: Any) -> float:
    kind = type(value)
    if kind not in _NUMBER:  # bool is excluded: type(True) is bool
        raise InvalidEvent(f"bad_type:{name}", kind.__name__)
    try:
        number = float(value)
    except OverflowError:
        raise InvalidEvent(f"non_finite:{name}", "integer too large") from None
    if not math.isfinite(number):
        raise InvalidEvent(f"non_finite:{name}", repr(value))
    return number


def encode(event: dict[str, Any]) -> bytes:
    """Validated event -> wire bytes."""
    return orjson.dumps(event)


@dataclass(frozen=True)
class EventBatch:
    """Columns of validated events in stream order: what the trainer and the online models learn from.

    numpy columns, so models index and mask them without conversion: ids, event types, event ids
    and contexts are object arrays (event id and context None where the source has none), `value`
    and `timestamp` float64 (value NaN where the event has none). A historical log becomes the
    same columns with `from_log`, so offline evaluation feeds models exactly what Kafka does.
    Events read from Kafka also say where they came from: `partition` ("topic/partition" keys,
    object) and `offset` (int64), so the stores can apply each event exactly once; elsewhere
    these are None and -1.
    """

    user_id: np.ndarray
    item_id: np.ndarray
    event_type: np.ndarray
    value: np.ndarray
    timestamp: np.ndarray
    event_id: np.ndarray
    context: np.ndarray
    partition: np.ndarray | None = None
    offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.user_id)
        if self.partition is None:
            object.__setattr__(self, "partition", np.full(n, None, object))
        if self.offset is None:
            object.__setattr__(self, "offset", np.full(n, -1, np.int64))

    def with_origin(self, partition: np.ndarray, offset: np.ndarray) -> EventBatch:
        """The same events, tagged with the partition key and offset each was read from."""
        return replace(self, partition=np.asarray(partition, dtype=object), offset=np.asarray(offset, np.int64))

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def from_events(cls, events: Sequence[dict[str, Any]]) -> EventBatch:
        """Validated event dicts -> columns (one pass per column, no intermediate lists)."""
        n = len(events)

        def column(name: str) -> np.ndarray:
            return np.fromiter((e[name] for e in events), object, n)

        return cls(
            column("user_id"), column("item_id"), column("event_type"),
            np.fromiter((e.get("value", math.nan) for e in events), np.float64, n),
            np.fromiter((e["timestamp"] for e in events), np.float64, n),
            column("event_id"), np.fromiter((e.get("context") for e in events), object, n),
        )

    @classmethod
    def from_columns(
        cls, user_id: np.ndarray, item_id: np.ndarray, event_type: np.ndarray, timestamp: np.ndarray,
        value: np.ndarray | None = None,
    ) -> EventBatch:
        """Events given as columns (benchmarks, tests, a log): no event ids or contexts."""
        n = len(user_id)
        return cls(
            np.asarray(user_id, dtype=object), np.asarray(item_id, dtype=object), np.asarray(event_type, dtype=object),
            np.full(n, math.nan) if value is None else np.asarray(value, dtype=np.float64),
            np.asarray(timestamp, dtype=np.float64), np.full(n, None, object), np.full(n, None, object),
        )

    @classmethod
    def from_log(cls, log: InteractionLog) -> EventBatch:
        """The whole log as one batch, in its (time) order; slice it with `take`. Event types as
        the log gives them (`rating` where rated, else `view`, for logs without types)."""
        return cls.from_columns(log.user_id, log.item_id, log.event_types(), log.timestamp, log.rating)

    def in_event_time_order(self) -> EventBatch:
        """The events by event time; ties by partition, then offset. A consumer interleaves its
        partitions' fetches as they arrive, so arrival order among equal times (different users
        in one second, different partitions) would make the order in which a batch is learned,
        and the negatives each event draws, depend on timing. Within a partition it is the
        stream's order."""
        partition = pd.factorize(self.partition, sort=True)[0]
        return self.take(np.lexsort((self.offset, partition, self.timestamp)))

    def take(self, index: np.ndarray | slice) -> EventBatch:
        """Rows at `index` (a slice, mask or integer array)."""
        return EventBatch(self.user_id[index], self.item_id[index], self.event_type[index], self.value[index],
                          self.timestamp[index], self.event_id[index], self.context[index],
                          self.partition[index], self.offset[index])


def iter_events(
    user_id: Iterable[str],
    item_id: Iterable[str],
    event_type: Iterable[str],
    value: Iterable[float],
    timestamp: Iterable[float],
    event_id: Iterable[str],
) -> Iterable[dict[str, Any]]:
    """Columns (e.g. of a historical log) -> raw event dicts, value omitted where NaN."""
    for e_id, user, item, kind, val, ts in zip(event_id, user_id, item_id, event_type, value, timestamp):
        event = {"event_id": e_id, "user_id": user, "item_id": item, "event_type": kind,
                 "timestamp": float(ts)}
        if val == val:  # not NaN
            event["value"] = float(val)
        yield event
