"""POST /events against a real `streamrec serve`, the session's broker and Redis: what the answer says
is what the topic and the dead-letter topic hold, re-sends are not produced twice, and a broker
outage is a 503 with Retry-After under which nothing is acknowledged."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from streamrec.app import infra
from streamrec.core.net import free_port
from streamrec.serving import schemas
from streamrec.stream.deadletter import read_dead_letter
from streamrec.stream.kafka import Record, make_consumer
from streamrec.stream.topics import create_topics, partitions_of
from tests.serving.conftest import Serving, StartServing

TOKEN = "feedback-" + uuid.uuid4().hex
NOW = time.time()


def event(n: int, **fields: object) -> dict[str, object]:
    return {"event_id": f"ev-{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 11}", "event_type": "click",
            "timestamp": NOW, **fields}


def read_topic(bootstrap: str, topic: str, at_least: int, partitions: int = 3) -> list[Record]:
    """Every record of `topic`: read until `at_least` arrived, then to each partition's end offset, so
    the count is exact (the server answered after the broker acknowledged them: they are there)."""
    consumer = make_consumer(bootstrap)
    try:
        consumer.assign([(topic, p) for p in range(partitions)])
        records: list[Record] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            records.extend(consumer.poll(timeout_s=0.5))
            ends = [consumer.high_watermark((topic, p)) for p in range(partitions)]
            if len(records) >= at_least and None not in ends and sum(ends) == len(records):
                return records
        raise AssertionError(f"{topic}: {len(records)} records read, expected at least {at_least}")
    finally:
        consumer.close()


def values(records: list[Record]) -> list[dict]:
    return [orjson.loads(r.value) for r in records]


@pytest.fixture
def topic_pair(kafka_bootstrap: str) -> tuple[str, str]:
    name = f"test.feedback.{uuid.uuid4().hex[:10]}"
    create_topics(kafka_bootstrap, [name, name + ".dlq"], 3)
    return name, name + ".dlq"


def start_feedback(start_serving: StartServing, monkeypatch: pytest.MonkeyPatch, bootstrap: str, topic: str,
                   redis_url: str, prefix: str, *, client: str = "kafka-python", token: str | None = None,
                   cluster: bool = False) -> Serving:
    """A serving worker for POST /events (no model loaded: /events does not need one); with
    `cluster`, `redis_url` is a node of a Redis Cluster."""
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("STREAMREC_KAFKA_CLIENT", client)
    monkeypatch.setenv("STREAMREC_TOPIC", topic)
    serving = start_serving(f"127.0.0.1:{free_port()}", redis_url, prefix, ready=False, api_token=token,
                            args=("--first-poll-wait", "0"),  # no parameter server: nothing to wait for
                            extra_env={"STREAMREC_REDIS_CLUSTER": "true"} if cluster else None)
    deadline = time.monotonic() + 60
    while True:
        try:
            if serving.fresh_get("/healthz").status_code == 200:
                return serving
        except httpx.TransportError:
            pass
        if serving.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serving did not start: {serving.log.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_cleanly(serving: Serving) -> None:
    """SIGTERM: the worker closes its producer and its Redis clients and exits, nothing raised
    (a close that raised skipped the rest of the shutdown: the impressions' last flush among it)."""
    serving.proc.send_signal(signal.SIGTERM)
    assert serving.proc.wait(30) in (0, 128 + signal.SIGTERM)  # the supervisor exits as it was signalled
    log = serving.log.read_text()
    assert "Traceback" not in log and "shutdown failed" not in log, log[-3000:]


def post(serving: Serving, body: object, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return serving.http.post("/events", content=orjson.dumps(body), headers={**headers,
                             "Content-Type": "application/json"}, timeout=60)


def test_single_event_and_array_reach_the_topic(start_serving, monkeypatch, kafka_bootstrap, kafka_client,
                                                 topic_pair, redis_url, prefix):
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix,
                             client=kafka_client)
    one = post(serving, event(0))
    assert one.status_code == 202, one.text
    assert schemas.EventsAccepted.model_validate(one.json()).model_dump() == {
        "accepted": 1, "produced": 1, "duplicates": 0, "dead_lettered": 0, "rejected": [], "event_ids": ["ev-0"],
        "deduplicated": True}
    many = post(serving, [event(n) for n in range(1, 301)])
    assert many.status_code == 202, many.text
    assert (many.json()["produced"], many.json()["event_ids"]) == (300, [f"ev-{n}" for n in range(1, 301)])
    records = read_topic(kafka_bootstrap, topic, 301)
    assert sorted(v["event_id"] for v in values(records)) == sorted(f"ev-{n}" for n in range(301))
    by_id = {r.value and orjson.loads(r.value)["event_id"]: r for r in records}
    assert by_id["ev-5"].key == b"u5" and by_id["ev-5"].timestamp_ms == int(NOW * 1000)  # the trainer's wire format


def test_the_console_click_shape_gets_an_id_and_a_timestamp(start_serving, monkeypatch, kafka_bootstrap, topic_pair,
                                                            redis_url, prefix):
    """{"user_id", "item_id", "event_type"} only: the server assigns the id and the receive time."""
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    before = time.time()
    reply = post(serving, {"user_id": "u1", "item_id": "i2", "event_type": "click"})
    assert reply.status_code == 202, reply.text
    [assigned] = reply.json()["event_ids"]
    [record] = values(read_topic(kafka_bootstrap, topic, 1))
    assert record["event_id"] == assigned and before - 1 <= record["timestamp"] <= time.time() + 1
    again = post(serving, {"event_id": assigned, "user_id": "u1", "item_id": "i2", "event_type": "click"})
    assert (again.json()["produced"], again.json()["duplicates"]) == (0, 1)  # the returned id makes a retry safe


def test_bad_events_are_dead_lettered_with_their_reason(start_serving, monkeypatch, kafka_bootstrap, topic_pair,
                                                        redis_url, prefix):
    topic, dlq = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    body = [event(0), event(1, event_type="teleport"), "not an object", event(3, user_id=""), event(4)]
    reply = post(serving, body)
    assert reply.status_code == 202, reply.text
    answer = reply.json()
    assert (answer["accepted"], answer["dead_lettered"]) == (2, 3)
    assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [
        (1, "unknown_event_type"), (2, "not_object"), (3, "bad_length:user_id")]
    assert answer["event_ids"] == ["ev-0", None, None, None, "ev-4"]
    assert sorted(v["event_id"] for v in values(read_topic(kafka_bootstrap, topic, 2))) == ["ev-0", "ev-4"]
    letters = [read_dead_letter(r.value) for r in read_topic(kafka_bootstrap, dlq, 3)]
    assert sorted((letter["source"]["index"], letter["reason"]) for letter in letters) == [
        (1, "unknown_event_type"), (2, "not_object"), (3, "bad_length:user_id")]
    assert {letter["component"] for letter in letters} == {"serving"}
    assert orjson.loads(next(x for x in letters if x["source"]["index"] == 1)["raw"])["event_type"] == "teleport"


def test_an_event_too_large_to_dead_letter_whole_is_refused_alone(start_serving, monkeypatch, kafka_bootstrap,
                                                                 topic_pair, redis_url, prefix):
    """A 3 MB event (an unknown field) made a dead letter over the producer's 1 MiB cap: the whole
    request got a 503 that tripped the broker-down state, and other clients' events got 503s too."""
    topic, dlq = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    reply = post(serving, [{**event(0), "junk": "x" * 3_000_000}, event(1)])
    assert reply.status_code == 202, reply.text
    assert (reply.json()["produced"], reply.json()["dead_lettered"]) == (1, 1)
    assert post(serving, event(2)).status_code == 202  # the next request is not refused
    [letter] = [read_dead_letter(r.value) for r in read_topic(kafka_bootstrap, dlq, 1)]
    assert letter["reason"] == "unknown_field" and letter["raw_truncated"] and letter["raw_size"] > 3_000_000


def test_a_number_beyond_a_double_rejects_its_event_alone(start_serving, monkeypatch, kafka_bootstrap, topic_pair,
                                                          redis_url, prefix):
    """1e400 is valid JSON that orjson refuses: the whole batch used to get a 400 and none of its
    good events was produced. Now that event alone is rejected as non-finite and dead-lettered;
    the NaN and Infinity literals, which are not JSON, still refuse the body."""
    topic, dlq = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    good = [orjson.dumps(event(n)) for n in range(3)]
    # and integer literals beyond a double: the standard parser kept them as ints, which the body's
    # re-encoding refused (a 400 again), and int() refuses more than 4,300 digits
    bad = [b'{"event_id": "ev-%d", "user_id": "g1", "item_id": "i2", "event_type": "rating", "value": %s}'
           % (n, literal) for n, literal in ((7, b"1e400"), (8, b"1" + b"0" * 400), (9, b"-" + b"9" * 5000))]
    body = b"[" + b",".join([*good, *bad]) + b"]"
    reply = serving.http.post("/events", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 202, reply.text
    assert (reply.json()["produced"], reply.json()["dead_lettered"]) == (3, 3)
    assert [r["reason"] for r in reply.json()["rejected"]] == ["non_finite:value"] * 3
    assert sorted(v["event_id"] for v in values(read_topic(kafka_bootstrap, topic, 3))) == ["ev-0", "ev-1", "ev-2"]
    letters = [read_dead_letter(r.value)["reason"] for r in read_topic(kafka_bootstrap, dlq, 3)]
    assert letters == ["non_finite:value"] * 3
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        assert serving.http.post("/events", content=b'[{"value": ' + literal + b"}]").status_code == 400


def test_a_client_gone_mid_body_is_not_a_server_error(start_serving, monkeypatch, kafka_bootstrap, topic_pair,
                                                      redis_url, prefix):
    """A client that closes the connection halfway through its body: a traceback in the log and a
    500 in the error counter (which alerts watch) before; 499, client closed request, now."""
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    host, port = serving.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b'Content-Length: 100\r\n\r\n{"user_id"')
    deadline = time.monotonic() + 10
    while 'status="499"' not in (exposed := serving.fresh_get("/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 'streamrec_serving_errors_total{endpoint="/events",status="499"}' in exposed
    assert 'endpoint="/events",status="500"' not in exposed
    assert "ClientDisconnect" not in serving.log.read_text()


def test_malformed_and_oversized_requests_are_refused(start_serving, monkeypatch, kafka_bootstrap, topic_pair,
                                                      redis_url, prefix):
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    assert serving.http.post("/events", content=b"{nope").status_code == 400
    assert post(serving, 42).status_code == 422
    too_many = post(serving, [event(n) for n in range(10_001)])
    assert too_many.status_code == 413 and "10000" in too_many.json()["detail"]
    huge = serving.http.post("/events", content=b"[" + b" " * (17 * 1024 * 1024) + b"]")
    assert huge.status_code == 413  # the byte cap, before the body is read
    full = post(serving, [event(n) for n in range(10_000)])
    assert full.status_code == 202 and full.json()["produced"] == 10_000
    assert len(read_topic(kafka_bootstrap, topic, 10_000)) == 10_000  # the refused requests produced nothing


def test_a_resent_event_id_is_produced_once(start_serving, monkeypatch, kafka_bootstrap, topic_pair, redis_url,
                                            prefix):
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix)
    first = post(serving, [event(n) for n in range(50)])
    assert first.json()["produced"] == 50
    retry = post(serving, [event(n) for n in range(40, 60)] + [event(60), event(60)])  # overlap + a repeat within
    assert (retry.json()["accepted"], retry.json()["produced"], retry.json()["duplicates"]) == (22, 11, 11)
    ids = [v["event_id"] for v in values(read_topic(kafka_bootstrap, topic, 61))]
    assert sorted(ids) == sorted(f"ev-{n}" for n in range(61))  # each once
    stop_cleanly(serving)


def test_a_resent_event_id_is_produced_once_on_a_redis_cluster(start_serving, monkeypatch, kafka_bootstrap,
                                                               topic_pair, redis_cluster, prefix):
    """On a cluster a request's ids fall in many slots, and one script may touch one slot only: the
    ledger answered every request "not de-duplicated" (CROSSSLOT, or MOVED for a single id), so a
    re-send was produced twice. Now each id's key carries its bucket's tag, reserved bucket by bucket."""
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_cluster.url, prefix,
                             cluster=True)
    first = post(serving, [event(n) for n in range(50)]).json()
    assert (first["deduplicated"], first["produced"]) == (True, 50)
    retry = post(serving, [event(n) for n in range(40, 60)] + [event(60), event(60)]).json()
    assert (retry["deduplicated"], retry["accepted"], retry["produced"], retry["duplicates"]) == (True, 22, 11, 11)
    single = post(serving, event(7)).json()  # one id, whichever master holds it
    assert (single["deduplicated"], single["produced"], single["duplicates"]) == (True, 0, 1)
    ids = [v["event_id"] for v in values(read_topic(kafka_bootstrap, topic, 61))]
    assert sorted(ids) == sorted(f"ev-{n}" for n in range(61))  # each once
    assert 'streamrec_serving_degraded_total{reason="idempotency"} 0.0' in serving.get("/metrics").text
    stop_cleanly(serving)


def test_the_api_token_guards_events(start_serving, monkeypatch, kafka_bootstrap, topic_pair, redis_url, prefix):
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix, token=TOKEN)
    assert post(serving, event(0)).status_code == 401
    assert post(serving, event(0), token="wrong").status_code == 401
    assert post(serving, event(0), token=TOKEN).status_code == 202
    assert [v["event_id"] for v in values(read_topic(kafka_bootstrap, topic, 1))] == ["ev-0"]


def test_an_unreachable_broker_is_503_with_retry_after(start_serving, monkeypatch, topic_pair, redis_url, prefix):
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, f"127.0.0.1:{free_port()}", topic, redis_url, prefix)
    for _ in range(2):  # the first waits for the broker; the next is answered at once
        reply = post(serving, [event(n) for n in range(5)])
        assert reply.status_code == 503, reply.text
        assert int(reply.headers["Retry-After"]) >= 1


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[dict]:
    """A Tansu broker of this test alone, so that it can be stopped and started again."""
    started = infra.start_broker(tmp_path / "broker").to_json()
    yield started
    infra.stop(started)


def test_nothing_is_acknowledged_while_the_broker_is_down_and_the_retry_is_exact(
        start_serving, monkeypatch, own_broker, redis_url, prefix, tmp_path):
    bootstrap = f"{own_broker['host']}:{own_broker['port']}"
    topic = f"test.feedback.{uuid.uuid4().hex[:10]}"
    create_topics(bootstrap, [topic, topic + ".dlq"], 3)
    serving = start_feedback(start_serving, monkeypatch, bootstrap, topic, redis_url, prefix)
    assert post(serving, [event(n) for n in range(10)]).status_code == 202
    infra.stop(own_broker)
    batch = [event(n) for n in range(5, 25)]
    down = post(serving, batch)
    assert down.status_code == 503 and down.headers["Retry-After"]
    restarted = infra.start_broker(tmp_path / "broker2", port=own_broker["port"]).to_json()
    try:  # Tansu keeps nothing in memory across restarts: serving creates the topics again
        deadline = time.monotonic() + 120
        while (reply := post(serving, batch)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(float(reply.headers["Retry-After"]))
        assert reply.status_code == 202, reply.text
        # ev-5..ev-9 were acknowledged before the outage, the 503 marked nothing: 15 produced now
        assert (reply.json()["produced"], reply.json()["duplicates"]) == (15, 5)
        ids = [v["event_id"] for v in values(read_topic(bootstrap, topic, 15))]
        assert sorted(ids) == sorted(f"ev-{n}" for n in range(10, 25))
        # with the settings' 3 partitions, not the 4 of the broker's auto-creation
        assert (partitions_of(bootstrap, topic), partitions_of(bootstrap, topic + ".dlq")) == ([0, 1, 2], [0, 1, 2])
    finally:
        infra.stop(restarted)


def test_the_first_event_creates_the_topics_with_the_configured_partitions(start_serving, monkeypatch,
                                                                           kafka_bootstrap, kafka_client, redis_url,
                                                                           prefix):
    """A worker answering POST /events before any trainer created the topic: the producer's first
    metadata request made the broker create it with its own default (4 on Tansu, `num.partitions`
    on Apache Kafka), and the trainer's `create_topics` then found it existing: the topic's
    partitions, and so how many trainers can share it, were fixed by accident."""
    topic = f"test.feedback.{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("STREAMREC_TOPIC_PARTITIONS", "2")
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, redis_url, prefix,
                             client=kafka_client)
    reply = post(serving, [event(n) for n in range(20)] + [{"user_id": "u1"}])  # one bad: the dead-letter topic
    assert reply.status_code == 202 and reply.json()["dead_lettered"] == 1, reply.text
    assert partitions_of(kafka_bootstrap, topic) == [0, 1]
    assert partitions_of(kafka_bootstrap, topic + ".dlq") == [0, 1]
    assert len(read_topic(kafka_bootstrap, topic, 20, partitions=2)) == 20


def test_without_redis_events_are_produced_unchecked(start_serving, monkeypatch, kafka_bootstrap, topic_pair):
    """Redis down: availability wins, the answer says the ids were not checked, the trainer de-duplicates."""
    topic, _ = topic_pair
    serving = start_feedback(start_serving, monkeypatch, kafka_bootstrap, topic, f"redis://127.0.0.1:{free_port()}/0",
                             "unused")
    reply = post(serving, [event(0), event(1)])
    assert reply.status_code == 202 and reply.json()["deduplicated"] is False and reply.json()["produced"] == 2
    metrics = serving.get("/metrics").text
    assert 'streamrec_serving_degraded_total{reason="idempotency"}' in metrics
    assert 'streamrec_serving_feedback_events_total{outcome="produced"} 2.0' in metrics
