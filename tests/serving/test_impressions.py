"""Impressions: every /recommend answer of a real serving worker reaches the impressions topic of a
real broker with its request id, shown items and arm; a broker that is down fails no request, the
bounded queue drops (and counts) only its oldest records, and everything queued is delivered once
the broker is back."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from streamrec.param_server.client import ParamClient
from streamrec.serving.impressions import RETRY_S, ImpressionLog
from streamrec.serving.ingest import producer_timeouts
from streamrec.stream.impressions import MAX_RECORD_BYTES, decode_record, encode_records
from streamrec.stream.kafka import make_producer
from streamrec.stream.topics import create_topics
from tests.serving.conftest import StartServing, free_port, load_model
from tests.serving.test_feedback import read_topic

EXPERIMENTS = "experiments: [{name: e, arms: [{name: a}, {name: b, diversity: 0.5}]}]\n"


def test_every_answer_is_logged_with_what_it_showed(start_serving: StartServing, ps: ParamClient, param_server,
                                                    kafka_bootstrap: str, redis_url: str, prefix: str,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = f"test.impressions.{uuid.uuid4().hex[:10]}"
    create_topics(kafka_bootstrap, [topic + ".impressions"], 3)
    rng = np.random.default_rng(2)
    load_model(ps, {f"u{u}": rng.normal(size=4).astype(np.float32) for u in range(10)},
               {f"i{j}": rng.normal(size=4).astype(np.float32) for j in range(20)})
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("STREAMREC_TOPIC", topic)
    serving = start_serving(param_server.address, redis_url, prefix, args=("--experiments", str(experiments)))
    answers = [serving.get("/recommend", user_id=f"u{n % 10}", k=5).json() for n in range(30)]
    logged: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while len(logged) < 30 and time.monotonic() < deadline:  # records hold several impressions each
        records = read_topic(kafka_bootstrap, topic + ".impressions", 1)
        logged = {i["request_id"]: i for record in records for i in decode_record(record.value)}
    assert len(logged) == 30
    for answer in answers:
        record = logged[answer["request_id"]]
        assert record["items"] == [item["item_id"] for item in answer["items"]]  # in the order shown
        assert (record["user_id"], record["experiment"], record["arm"]) == (answer["user_id"], "e", answer["arm"])
        assert record["experiments"] == {"e": answer["arm"]} and record["model_version"] == answer["model_version"]


def dropped() -> float:
    return REGISTRY.get_sample_value("streamrec_serving_impressions_total", {"outcome": "dropped"}) or 0.0


def test_a_broker_outage_fails_nothing_and_the_queue_catches_up(kafka_bootstrap: str) -> None:
    topic = f"test.impressions.{uuid.uuid4().hex[:10]}"
    create_topics(kafka_bootstrap, [topic], 1)
    bootstrap = {"now": f"127.0.0.1:{free_port()}"}  # nothing listens there: the broker is down
    log = ImpressionLog(topic, lambda: make_producer(bootstrap["now"], "kafka-python",
                                                     **producer_timeouts("kafka-python", 1.0)),
                        max_pending=30, ack_timeout_s=1.0)
    before = dropped()
    started = time.perf_counter()
    for n in range(50):
        log.record({"request_id": f"r{n}", "user_id": f"u{n}", "items": [], "timestamp": time.time()})
    assert time.perf_counter() - started < 0.05  # the request path only queues
    assert dropped() - before == 20 and len(log.pending) == 30  # the 20 oldest, counted
    stop = threading.Event()
    thread = threading.Thread(target=log.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while log.last_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.last_error is not None and len(log.pending) == 30  # failed, kept, nothing lost
        bootstrap["now"] = kafka_bootstrap  # the broker is back
        records = read_topic(kafka_bootstrap, topic, 1, partitions=1)
        assert [i["request_id"] for r in records for i in decode_record(r.value)] == [f"r{n}" for n in range(20, 50)]
        assert not log.pending and dropped() - before == 20
    finally:
        stop.set()
        thread.join(timeout=RETRY_S + 10)


def test_records_stay_under_the_brokers_cap_and_read_back_in_order() -> None:
    impressions = [{"request_id": f"r{n}", "items": ["x" * 200] * 50} for n in range(200)]  # ~10 kB each
    huge = {"request_id": "big", "items": ["y" * 256] * 3000}  # one answer over the cap travels alone
    values = encode_records([*impressions, huge])
    assert all(len(v) <= MAX_RECORD_BYTES for v in values[:-1]) and len(values) > 2
    assert [i["request_id"] for v in values for i in decode_record(v)] == [f"r{n}" for n in range(200)] + ["big"]
    assert decode_record(values[-1]) == [huge]
