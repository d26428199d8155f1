"""Both client backends against the real broker: round trip, group resume, shared partitions."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from streamrec.core.net import free_port
from streamrec.stream.kafka import Consumer, Record, make_consumer, make_producer
from streamrec.stream.topics import create_topics
from tests.conftest import TEST_HEARTBEAT_MS, TEST_SESSION_MS


def group_consumer(bootstrap: str, client: str, group: str, topic: str, **kw) -> Consumer:
    return make_consumer(bootstrap, client, group_id=group, topics=[topic],
                         session_timeout_ms=TEST_SESSION_MS, heartbeat_interval_ms=TEST_HEARTBEAT_MS, **kw)


def poll_until(consumer: Consumer, count: int, timeout_s: float = 30.0) -> list[Record]:
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        records.extend(consumer.poll(max_records=1000, timeout_s=0.5))
    return records


def produce(bootstrap: str, client: str, topic: str, n: int, start: int = 0, partitions: int | None = None) -> None:
    """n records keyed k0..k6; with `partitions`, spread round-robin over them explicitly."""
    with make_producer(bootstrap, client) as producer:
        for i in range(start, start + n):
            producer.send(topic, f"v{i}".encode(), key=f"k{i % 7}".encode(),
                          timestamp_ms=1_600_000_000_000 + i, headers=[("h", f"{i}".encode())],
                          partition=None if partitions is None else i % partitions)
        producer.flush()


def test_round_trip_keys_timestamps_headers(kafka_bootstrap, kafka_client, topic):
    create_topics(kafka_bootstrap, [topic], 3)
    produce(kafka_bootstrap, kafka_client, topic, 50)
    with group_consumer(kafka_bootstrap, kafka_client, f"g-{topic}", topic) as consumer:
        records = poll_until(consumer, 50)
    assert len(records) == 50
    by_value = {r.value: r for r in records}
    for i in range(50):
        r = by_value[f"v{i}".encode()]
        assert r.key == f"k{i % 7}".encode()
        assert r.timestamp_ms == 1_600_000_000_000 + i
        assert list(r.headers) == [("h", f"{i}".encode())]
    # same key -> same partition, in send order
    for key in {r.key for r in records}:
        same = [r for r in records if r.key == key]
        assert len({r.partition for r in same}) == 1
        assert [r.offset for r in same] == sorted(r.offset for r in same)
        assert [int(r.value[1:]) for r in sorted(same, key=lambda r: r.offset)] == sorted(int(r.value[1:]) for r in same)


def test_group_resumes_from_committed_offsets(kafka_bootstrap, kafka_client, topic):
    create_topics(kafka_bootstrap, [topic], 2)
    produce(kafka_bootstrap, kafka_client, topic, 40)
    group = f"g-{topic}"
    with group_consumer(kafka_bootstrap, kafka_client, group, topic) as consumer:
        first = poll_until(consumer, 40)
        # commit only the first half of each partition: the work for the rest is "not done"
        done: dict[tuple[str, int], int] = {}
        for r in sorted(first, key=lambda r: r.offset):
            if r.offset < 10:
                done[(r.topic, r.partition)] = r.offset + 1
        consumer.commit(done)
        assert consumer.committed(sorted(done)) == done
    produce(kafka_bootstrap, kafka_client, topic, 10, start=40)
    expected = {r.value for r in first if r.offset >= 10} | {f"v{i}".encode() for i in range(40, 50)}
    with group_consumer(kafka_bootstrap, kafka_client, group, topic) as consumer:
        resumed = poll_until(consumer, len(expected))
        resumed += consumer.poll(timeout_s=1.0)  # nothing beyond the uncommitted work arrives
    assert sorted(r.value for r in resumed) == sorted(expected)


def test_two_consumers_share_partitions(kafka_bootstrap, kafka_client, topic):
    create_topics(kafka_bootstrap, [topic], 4)
    group = f"g-{topic}"
    a = group_consumer(kafka_bootstrap, kafka_client, group, topic)
    b = group_consumer(kafka_bootstrap, kafka_client, group, topic)
    try:
        # a rebalance on the embedded broker waits for every member to rejoin (JoinGroup is held
        # for half the session timeout, per round): give it time on a loaded machine
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            a.poll(timeout_s=0.1)
            b.poll(timeout_s=0.1)
            if len(a.assignment()) + len(b.assignment()) == 4 and a.assignment() and b.assignment():
                break
        assert a.assignment() and b.assignment(), "both members must own partitions"
        assert not set(a.assignment()) & set(b.assignment())
        produce(kafka_bootstrap, kafka_client, topic, 200, partitions=4)
        got_a: list[Record] = []
        got_b: list[Record] = []
        deadline = time.monotonic() + 30
        while len(got_a) + len(got_b) < 200 and time.monotonic() < deadline:
            got_a.extend(a.poll(timeout_s=0.2))
            got_b.extend(b.poll(timeout_s=0.2))
    finally:
        a.close()
        b.close()
    assert len(got_a) + len(got_b) == 200
    assert got_a and got_b
    assert {r.partition for r in got_a}.isdisjoint({r.partition for r in got_b})


@pytest.mark.parametrize("partitions", [1, 3])
def test_high_watermark_after_fetch(kafka_bootstrap, kafka_client, topic, partitions):
    """Records are spread evenly over the partitions, so every partition is fetched and its end
    offset after reading it all is exactly the number of records sent to it."""
    create_topics(kafka_bootstrap, [topic], partitions)
    produce(kafka_bootstrap, kafka_client, topic, 30, partitions=partitions)
    consumer = make_consumer(kafka_bootstrap, kafka_client)
    try:
        consumer.assign([(topic, p) for p in range(partitions)])
        records = poll_until(consumer, 30)
        assert len(records) == 30
        per_partition = 30 // partitions
        counts = {p: sum(1 for r in records if r.partition == p) for p in range(partitions)}
        assert counts == {p: per_partition for p in range(partitions)}
        assert {p: consumer.high_watermark((topic, p)) for p in range(partitions)} == counts
    finally:
        consumer.close()


def test_fetch_wait_reaches_the_client(kafka_bootstrap, topic):
    """The broker-side fetch wait is a setting, not the client's 500 ms default: on the embedded
    broker a group member's events otherwise wait ~250 ms each before the trainer sees them."""
    from streamrec.core.config import Settings

    assert Settings(_env_file=None).fetch_wait_ms == 50
    create_topics(kafka_bootstrap, [topic], 1)
    with group_consumer(kafka_bootstrap, "kafka-python", f"g-{topic}", topic, fetch_wait_ms=20) as consumer:
        assert consumer._consumer.config["fetch_max_wait_ms"] == 20
    with group_consumer(kafka_bootstrap, "kafka-python", f"g2-{topic}", topic) as consumer:
        assert consumer._consumer.config["fetch_max_wait_ms"] == 50



def test_a_consumer_waits_for_a_topic_that_does_not_exist_yet(kafka_bootstrap, kafka_client, topic):
    """Clients never create topics (streamrec.stream.topics), so a consumer may start before its
    topic exists. confluent-kafka reported the missing topic as a non-retriable error, and the
    consumer raised it out of `poll`; kafka-python waited. Both wait now, and read the topic once
    it is there."""
    with group_consumer(kafka_bootstrap, kafka_client, f"g-{topic}", topic) as consumer:
        for _ in range(4):
            assert consumer.poll(timeout_s=0.5) == []
        create_topics(kafka_bootstrap, [topic], 2)
        produce(kafka_bootstrap, kafka_client, topic, 10)
        assert sorted(r.value for r in poll_until(consumer, 10)) == sorted(f"v{i}".encode() for i in range(10))


DOWN_BROKER = """
import gc, os, sys, threading
from streamrec.stream.kafka import BROKER_ERRORS
from streamrec.stream.topics import create_topics
threads, descriptors = threading.active_count(), len(os.listdir("/proc/self/fd"))
for _ in range(4):
    try:
        create_topics(sys.argv[1], ["never"], 1, timeout_s=0.5)
    except BROKER_ERRORS:
        pass
gc.collect()  # the stopped clients' sockets sit in reference cycles; a running thread kept them reachable
print(threading.active_count() - threads, len(os.listdir("/proc/self/fd")) - descriptors)
"""


def test_creating_topics_on_a_broker_that_is_down_leaves_no_thread_or_socket_behind():
    """kafka-python's admin client starts its network thread before it bootstraps; a failed
    bootstrap raised out of its constructor and left the thread and its sockets running. Serving
    creates its topics again after every failed send, so an outage added a thread and four
    descriptors per retry until the worker ran out of descriptors. (In a process of its own:
    pytest's captured logs and exceptions keep the clients' sockets reachable.)"""
    done = subprocess.run([sys.executable, "-c", DOWN_BROKER, f"127.0.0.1:{free_port()}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "0"], "threads and descriptors gained over four failed creations"
