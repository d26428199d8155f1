"""Batch reads of the interaction topic (refits, `streamrec export`) against the real broker."""

from __future__ import annotations

import logging

import orjson
import pytest

from streamrec.stream.events import EventSchema
from streamrec.stream.kafka import make_producer
from streamrec.stream.reader import read_event_log, read_log
from streamrec.stream.topics import create_topics


def test_a_replay_run_twice_is_read_once_by_event_id(settings, caplog: pytest.LogCaptureFixture) -> None:
    """A replay killed and run again (the documented recovery) writes its first events twice, as
    does a producer's retry. The online trainer drops the repeats by event id; a refit from the
    topic learned them twice."""
    create_topics(settings.kafka_bootstrap, [settings.topic], 2)
    events = [{"event_id": f"e{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 5}", "event_type": "click",
               "timestamp": 1_700_000_000 + n} for n in range(40)]
    producer = make_producer(settings.kafka_bootstrap)
    for event in events + events[:15]:  # the rerun repeats the first 15
        producer.send(settings.topic, orjson.dumps(event))
    producer.send(settings.topic, orjson.dumps({**events[0], "event_id": "e-new"}))  # same content, new id: an event
    producer.flush()
    log, invalid, repeated = read_log(settings.kafka_bootstrap, settings.topic, EventSchema.from_settings(settings))
    assert (len(log), invalid, repeated) == (41, 0, 15)
    with caplog.at_level(logging.WARNING, logger="streamrec.stream.reader"):
        assert len(read_event_log(settings, "topic", "auto")) == 41
    assert "15 records" in caplog.text


def test_a_topic_that_does_not_exist_yet_is_a_value_error(settings) -> None:
    """A KeyError ended a refit loop started before anything was produced, with a traceback; a
    ValueError is a clear error for a one-off refit and is tried again next period by a loop."""
    with pytest.raises(ValueError, match="does not exist yet"):
        read_event_log(settings, f"topic:{settings.topic}-never-made", "auto")
