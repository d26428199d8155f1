"""Every bad record reaches the dead-letter topic with its reason; nothing is lost or crashes."""

from __future__ import annotations

import json
import uuid

import orjson
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streamrec.stream.deadletter import REASON_HEADER, read_dead_letter
from streamrec.stream.events import EventSchema, InvalidEvent
from streamrec.stream.kafka import make_producer
from streamrec.stream.publish import EventPublisher
from streamrec.stream.reader import read_records
from streamrec.stream.topics import create_topics

NOW_VALID = {"user_id": "u", "item_id": "i", "event_type": "view", "timestamp": 1_700_000_000.0}
BAD_LINES = {
    b"{oops": "not_json",
    b'"a string"': "not_object",
    orjson.dumps({**NOW_VALID, "user_id": ""}): "bad_length:user_id",
    orjson.dumps({**NOW_VALID, "event_type": "teleport"}): "unknown_event_type",
    orjson.dumps({**NOW_VALID, "timestamp": 5}): "timestamp_out_of_range",
    orjson.dumps({k: v for k, v in NOW_VALID.items() if k != "item_id"}): "missing_field:item_id",
    b'{"user_id":"u","item_id":"i","event_type":"view","timestamp":1.7e9,"value":Infinity}': "not_json",
    orjson.dumps({**NOW_VALID, "context": {"n": [1]}}): "bad_context_value",
    b"": "not_json",
}


def publish_lines(settings, lines: list[bytes], client: str = "kafka-python") -> EventPublisher:
    producer = make_producer(settings.kafka_bootstrap, client)
    publisher = EventPublisher(producer, EventSchema(), settings.topic, settings.dlq_topic, "test")
    for n, line in enumerate(lines, start=1):
        publisher.publish_raw(line, {"file": "lines", "line": n})
    publisher.close()
    return publisher


def test_each_kind_of_bad_record_with_its_reason(settings, kafka_client):
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 2)
    lines = [orjson.dumps(NOW_VALID), *BAD_LINES]
    publisher = publish_lines(settings, lines, kafka_client)
    assert publisher.summary() == {"accepted": 1, "dead_lettered": len(BAD_LINES)}
    letters = read_records(settings.kafka_bootstrap, settings.dlq_topic, kafka_client)
    assert len(letters) == len(BAD_LINES)
    for record in letters:
        letter = read_dead_letter(record.value)
        assert letter["reason"] == BAD_LINES[letter["raw"]]
        assert dict(record.headers)[REASON_HEADER] == letter["reason"].encode()
        assert letter["source"] == {"file": "lines", "line": lines.index(letter["raw"]) + 1}
        assert letter["component"] == "test" and letter["time"] > 1.7e9


def test_a_record_too_large_to_dead_letter_whole_is_kept_in_part_and_the_next_one_goes_on(settings, kafka_client):
    """A 3 MB line made a dead letter over the producer's 1 MiB cap: the send raised, `produce`
    died there and the good line after it was never produced."""
    import hashlib

    from streamrec.stream.deadletter import MAX_RAW_BYTES

    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 2)
    huge = orjson.dumps({**NOW_VALID, "junk": "x" * 3_000_000})
    publisher = publish_lines(settings, [huge, orjson.dumps(NOW_VALID)], kafka_client)
    assert publisher.summary() == {"accepted": 1, "dead_lettered": 1}
    [record] = read_records(settings.kafka_bootstrap, settings.dlq_topic, kafka_client)
    letter = read_dead_letter(record.value)
    assert letter["reason"] == "unknown_field" and letter["raw"] == huge[:MAX_RAW_BYTES]
    assert (letter["raw_truncated"], letter["raw_size"], letter["raw_sha256"]) == (
        True, len(huge), hashlib.sha256(huge).hexdigest())
    assert len(record.value) < 1024 * 1024


lines_strategy = st.lists(
    st.one_of(
        st.sampled_from(list(BAD_LINES)),
        st.binary(max_size=40),
        st.builds(lambda u, i, t: orjson.dumps({**NOW_VALID, "user_id": u, "item_id": i, "timestamp": t}),
                  st.text(max_size=8), st.text(min_size=1, max_size=8),
                  st.floats(min_value=7e8, max_value=1.8e9)),
    ),
    min_size=1, max_size=30,
)


@hsettings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines_strategy)
def test_fuzzed_input_nothing_lost(settings, lines):
    settings = settings.model_copy(update={"topic": f"fuzz.{uuid.uuid4().hex[:10]}"})
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 1)
    publisher = publish_lines(settings, lines)
    schema = EventSchema()
    verdicts = []
    for line in lines:
        try:
            schema.decode(line)
            verdicts.append(None)
        except InvalidEvent as exc:
            verdicts.append(exc.reason)
    accepted = read_records(settings.kafka_bootstrap, settings.topic)
    letters = [read_dead_letter(r.value) for r in read_records(settings.kafka_bootstrap, settings.dlq_topic)]
    assert publisher.accepted + publisher.dead_lettered == len(lines)
    assert len(accepted) == verdicts.count(None)
    assert sorted((l["source"]["line"], l["reason"]) for l in letters) == [
        (n, reason) for n, reason in enumerate(verdicts, start=1) if reason is not None
    ]
    assert all(l["raw"] == lines[l["source"]["line"] - 1] for l in letters)
    assert [json.loads(r.value)["user_id"] for r in accepted] == [
        json.loads(line)["user_id"] for line, v in zip(lines, verdicts) if v is None
    ]
