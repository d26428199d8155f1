"""The event schema: every kind of bad record is rejected with its reason; nothing else raises."""

from __future__ import annotations

import json
import math
import time

import numpy as np
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


def assert_same_batch(batch: EventBatch, expected: EventBatch) -> None:
    """Column by column; event ids generated for records without one are random: only their form."""
    for name in ("user_id", "item_id", "event_type", "value", "timestamp", "context"):
        got, want = getattr(batch, name), getattr(expected, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.dtype == object:
            assert got.tolist() == want.tolist(), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert len(batch.event_id) == len(expected.event_id)
    for got, want in zip(batch.event_id.tolist(), expected.event_id.tolist()):
        assert got == want or (len(got) == len(want) == 32)


def decode_one_by_one(raws: list[bytes]) -> tuple[EventBatch, list[tuple[int, str, str]]]:
    events, invalid = [], []
    for n, raw in enumerate(raws):
        try:
            events.append(SCHEMA.decode(raw, NOW))
        except InvalidEvent as exc:
            invalid.append((n, exc.reason, exc.detail))
    return EventBatch.from_events(events), invalid


def test_decode_many_keeps_every_reason_and_the_order():
    bad = [orjson.dumps(good(user_id=7)), b"not json", orjson.dumps(good(timestamp=700_000_000)),
           orjson.dumps(good(event_id="x" * 300)), orjson.dumps(good(colour="red")), orjson.dumps(good(value=True))]
    fine = [orjson.dumps(good(event_id="a", value=2.0)), orjson.dumps(good(item_id="é" * 128)),  # 256 bytes: the slow check
            orjson.dumps(good(context={"device": "ios"}, event_id="c")), orjson.dumps(good(timestamp=int(NOW))),
            orjson.dumps(good(value=None, event_id="e", context=None))]
    raws = [fine[0], bad[0], bad[1], fine[1], bad[2], fine[2], bad[3], fine[3], bad[4], bad[5], fine[4]]
    batch, invalid = SCHEMA.decode_many(raws, NOW)
    expected, expected_invalid = decode_one_by_one(raws)
    assert [(n, e.reason, e.detail) for n, e in invalid] == expected_invalid
    assert [n for n, _ in invalid] == [1, 2, 4, 6, 8, 9]
    assert_same_batch(batch, expected)
    assert batch.context.tolist() == [None, None, {"device": "ios"}, None, None]
    assert batch.timestamp[3] == NOW and batch.timestamp.dtype == np.float64
    empty, none = SCHEMA.decode_many([], NOW)
    assert len(empty) == 0 and none == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60) | (json_values | near_events).map(lambda v: json.dumps(v).encode())
                | st.builds(lambda **kw: orjson.dumps(good(**kw)), event_id=st.text(max_size=70),
                            value=st.floats(allow_nan=False) | st.none(), timestamp=st.floats(NOW - 10, NOW + 10)),
                max_size=12))
def test_decode_many_is_decode_per_record(raws: list[bytes]):
    batch, invalid = SCHEMA.decode_many(raws, NOW)
    expected, expected_invalid = decode_one_by_one(raws)
    assert [(n, e.reason, e.detail) for n, e in invalid] == expected_invalid
    assert_same_batch(batch, expected)


@settings(max_examples=50, deadline=None)
@given(st.randoms(use_true_random=False))
def test_event_time_order_does_not_depend_on_how_partitions_interleaved(random) -> None:
    """The same records, their partitions interleaved in any arrival order (each partition's own
    order kept, as a consumer delivers them), come out in one order: event time, then partition,
    then offset. Equal times across partitions are common (a second holds many users' events)."""
    timestamps = {"t/0": [5.0, 5.0, 7.0, 9.0], "t/1": [5.0, 6.0, 7.0], "t/2": [4.0, 5.0, 7.0, 7.0]}
    streams = {key: [(key, offset, ts) for offset, ts in enumerate(times, start=10)]
               for key, times in timestamps.items()}

    def arrived(order: list[str]) -> EventBatch:
        cursors = {key: iter(records) for key, records in streams.items()}
        records = [next(cursors[key]) for key in order]
        batch = EventBatch.from_columns([f"u{offset}" for _, offset, _ in records], [key for key, _, _ in records],
                                        ["view"] * len(records), [ts for _, _, ts in records])
        return batch.with_origin(np.array([key for key, _, _ in records], object),
                                 np.array([offset for _, offset, _ in records]))

    by_partition = [key for key, times in timestamps.items() for _ in times]
    shuffled = list(by_partition)
    random.shuffle(shuffled)
    expected = sorted((ts, key, offset) for key, records in streams.items() for _, offset, ts in records)
    for order in (by_partition, shuffled):
        batch = arrived(order).in_event_time_order()
        assert list(zip(batch.timestamp.tolist(), batch.partition.tolist(), batch.offset.tolist())) == expected
