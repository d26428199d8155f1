"""The event schema: every kind of bad record is rejected with its reason; nothing else raises."""

from __future__ import annotations

import json
import math
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.stream.events import EventBatch, EventSchema, InvalidEvent

NOW = 1_700_000_000.0
SCHEMA = EventSchema(custom_event_types=("share",), max_context_keys=4, max_context_bytes=100)


def good(**overrides):
    event = {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": NOW - 5}
    event.update(overrides)
    return event


def test_valid_event_is_normalised():
    event = SCHEMA.validate(good(value=3, context={"device": "ios", "pos": 2}), NOW)
    assert event["value"] == 3.0 and isinstance(event["value"], float)
    assert len(event["event_id"]) == 32  # generated when absent
    assert SCHEMA.validate(good(event_id="e-1"), NOW)["event_id"] == "e-1"
    assert SCHEMA.validate(good(event_type="share"), NOW)["event_type"] == "share"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (orjson.dumps({k: v for k, v in good().items() if k != "user_id"}), "missing_field:user_id"),
        (orjson.dumps(good(item_id=None)), "missing_field:item_id"),
        (orjson.dumps(good(user_id=7)), "bad_type:user_id"),
        (orjson.dumps(good(user_id="")), "bad_length:user_id"),
        (orjson.dumps(good(item_id="x" * 257)), "bad_length:item_id"),
        (orjson.dumps(good(item_id="é" * 129)), "bad_length:item_id"),  # 258 bytes in UTF-8
        (orjson.dumps(good(event_type="teleport")), "unknown_event_type"),
        (orjson.dumps(good(event_type=1)), "bad_type:event_type"),
        (orjson.dumps(good(timestamp="yesterday")), "bad_type:timestamp"),
        (orjson.dumps(good(timestamp=True)), "bad_type:timestamp"),
        (orjson.dumps(good(timestamp=700_000_000)), "timestamp_out_of_range"),
        (orjson.dumps(good(timestamp=NOW + 2 * 86_400)), "timestamp_out_of_range"),
        (b'{"user_id":"u","item_id":"i","event_type":"view","timestamp":NaN}', "not_json"),
        (orjson.dumps(good(value="5")), "bad_type:value"),
        (orjson.dumps(good(context=[1])), "bad_type:context"),
        (orjson.dumps(good(context={"a": {"b": 1}})), "bad_context_value"),
        (orjson.dumps(good(context={str(i): i for i in range(5)})), "context_too_large"),
        (orjson.dumps(good(context={"a": "x" * 200})), "context_too_large"),
        (orjson.dumps(good(colour="red")), "unknown_field"),
    ],
)
def test_bad_records_get_their_reason(record: bytes, reason: str):
    with pytest.raises(InvalidEvent) as info:
        SCHEMA.decode(record, NOW)
    assert info.value.reason == reason


def test_non_finite_numbers_from_python_objects():
    for name in ("value", "timestamp"):
        with pytest.raises(InvalidEvent) as info:
            SCHEMA.validate(good(**{name: math.inf}), NOW)
        assert info.value.reason == f"non_finite:{name}"
    with pytest.raises(InvalidEvent) as info:
        SCHEMA.validate(good(context={"x": math.nan}), NOW)
    assert info.value.reason == "non_finite:context"


def test_id_of_exactly_256_bytes_is_accepted():
    assert SCHEMA.validate(good(item_id="é" * 128), NOW)["item_id"] == "é" * 128


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
near_events = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.text(max_size=5) | st.integers(),
        "user_id": st.text(max_size=300) | st.integers() | st.none(),
        "item_id": st.text(max_size=300) | st.just(""),
        "event_type": st.sampled_from(["view", "click", "rating", "nope", ""]),
        "timestamp": st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=4),
        "value": st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none(),
        "context": st.dictionaries(st.text(max_size=8), json_values, max_size=6) | json_values,
        "extra": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200) | (json_values | near_events).map(lambda v: json.dumps(v).encode()))
def test_fuzzed_records_are_accepted_or_rejected_never_crash(raw: bytes):
    try:
        event = SCHEMA.decode(raw, NOW)
    except InvalidEvent as exc:
        assert exc.reason
        return
    assert SCHEMA.validate(event, NOW) == event  # accepted events are fixed points
    assert SCHEMA.decode(orjson.dumps(event), NOW) == event


@settings(max_examples=300, deadline=None)
@given(near_events)
def test_fuzzed_python_objects_are_accepted_or_rejected_never_crash(obj: dict):
    try:
        event = SCHEMA.validate(obj, NOW)
    except InvalidEvent as exc:
        assert exc.reason
        return
    assert SCHEMA.decode(orjson.dumps(event), NOW) == event


def test_batch_columns():
    events = [SCHEMA.validate(good(value=1.5), NOW), SCHEMA.validate(good(item_id="i2"), NOW)]
    batch = EventBatch.from_events(events)
    assert batch.item_id.tolist() == ["i1", "i2"] and batch.item_id.dtype == object and len(batch) == 2
    assert batch.value[0] == 1.5 and math.isnan(batch.value[1])
    assert batch.timestamp.tolist() == [NOW - 5, NOW - 5]


def test_default_now_rejects_far_future():
    with pytest.raises(InvalidEvent):
        SCHEMA.validate(good(timestamp=time.time() + 3 * 86_400))
