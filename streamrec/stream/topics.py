"""Topic administration: create, list, describe with correct end offsets and consumer-group lag.

Topics are created here, with the partition count of the settings, and never by a client: every
producer and consumer is made with auto-creation off (streamrec.stream.kafka). A broker creating a
topic on a client's first metadata request gives it the broker's default count (Tansu's 4, Apache
Kafka's `num.partitions`, 1 unless set) and the later `create_topics` finds it existing: a serving
worker answering `POST /events` before any trainer started, or any client after a memory-only
broker restarted, fixed the topic's partitions, and so how many trainers can share it, by accident.
A process that produces creates its topics before its first send (`EventPublisher.from_settings`,
the trainer, the catalogue tools), and serving's `POST /events` and impressions again after each
failed send, since a memory-only broker may have come back empty.

End offsets come from a fetch response's high-water mark rather than ListOffsets: the embedded
broker answers ListOffsets with the last batch's base offset + 1, which undercounts; the
high-water mark of a fetch is right on it and on Apache Kafka alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import kafka
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import TopicPartition as KTP

from streamrec.stream.kafka.base import KafkaError


class TopicsNotVisible(KafkaError, TimeoutError):
    """Created topics that the broker's metadata does not list in time: a broker error for the
    callers that retry on one (BROKER_ERRORS), a timeout for those that wait."""


def offset_key(topic: str, partition: int) -> str:
    """A partition's key in the stores' offset maps and watermarks: "topic/partition"."""
    return f"{topic}/{partition}"


def admin_client(bootstrap: str, timeout_s: float = 30.0) -> KafkaAdminClient:
    """An admin client whose bootstrap and requests each wait at most `timeout_s`.

    kafka-python starts the client's network thread before it bootstraps, and a bootstrap that
    fails (broker down) raised out of the constructor with the thread and its sockets left
    running: serving, which creates its topics again after each failed send, gained a thread and
    four descriptors per retry through an outage. The half-built client is stopped here."""
    ms = max(500, int(timeout_s * 1000))
    admin = KafkaAdminClient.__new__(KafkaAdminClient)
    try:
        admin.__init__(bootstrap_servers=bootstrap.split(","), client_id="streamrec-admin",  # type: ignore[misc]
                       request_timeout_ms=ms, bootstrap_timeout_ms=ms)
    except BaseException:
        client, net = getattr(admin, "_client", None), getattr(admin, "_net", None)
        if client is not None:
            client.close()
        if net is not None:
            net.stop()
        raise
    return admin


def create_topics(bootstrap: str, names: Sequence[str], partitions: int, replication: int = -1,
                  timeout_s: float = 30.0) -> dict[str, str]:
    """Create topics that do not exist yet; {name: "created" | "exists"}. `replication` -1: the
    broker's `default.replication.factor` (a cluster's replicas, with auto-creation off, would
    otherwise be one copy, which `min.insync.replicas` > 1 refuses under acks=all). A broker that
    does not answer raises (kafka-python's KafkaError) after about `timeout_s`."""
    admin = admin_client(bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        result = {name: "exists" for name in names if name in existing}
        missing = [NewTopic(n, partitions, replication) for n in names if n not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: that is the state we wanted
            result.update({t.name: "created" for t in missing})
        _wait_for_metadata(admin, names, min(10.0, timeout_s))
        return result
    finally:
        admin.close()


def _wait_for_metadata(admin: KafkaAdminClient, names: Sequence[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if set(names) <= set(admin.list_topics()):
            return
        time.sleep(0.1)
    raise TopicsNotVisible(f"topics {list(names)} not visible after {timeout_s}s")


def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    admin = admin_client(bootstrap)
    try:
        admin.delete_topics(list(names))
    finally:
        admin.close()


def list_topics(bootstrap: str) -> list[str]:
    admin = admin_client(bootstrap)
    try:
        return sorted(t for t in admin.list_topics() if not t.startswith("__"))
    finally:
        admin.close()


def partitions_of(bootstrap: str, topic: str) -> list[int]:
    admin = admin_client(bootstrap)
    try:
        described = admin.describe_topics([topic])
    finally:
        admin.close()
    if not described or described[0].get("error_code"):
        raise KeyError(f"topic {topic!r} does not exist")
    return sorted(p["partition_index"] for p in described[0]["partitions"])


def end_offsets(bootstrap: str, topic: str, partitions: Sequence[int], timeout_s: float = 10.0) -> dict[int, tuple[int, int]]:
    """{partition: (beginning, end)} with `end` from fetch high-water marks."""
    consumer = kafka.KafkaConsumer(
        bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
        max_poll_records=1, fetch_max_bytes=1024, max_partition_fetch_bytes=1024,
    )
    try:
        tps = [KTP(topic, p) for p in partitions]
        consumer.assign(tps)
        begin = consumer.beginning_offsets(tps)
        reported = consumer.end_offsets(tps)
        result = {tp.partition: (begin[tp], reported[tp]) for tp in tps}
        pending = [tp for tp in tps if reported[tp] > begin[tp]]
        for tp in pending:
            consumer.seek(tp, reported[tp] - 1)  # inside the last batch: the fetch reports the mark
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
            for tp in list(pending):
                high = consumer.highwater(tp)
                if high is not None:
                    result[tp.partition] = (begin[tp], max(high, reported[tp]))
                    pending.remove(tp)
        if pending:
            raise TimeoutError(f"no fetch response for {pending} within {timeout_s}s")
        return result
    finally:
        consumer.close(autocommit=False)


def group_committed(admin: KafkaAdminClient, group: str, topic: str) -> dict[int, int]:
    """{partition: committed offset} of one consumer group on `topic` (partitions never committed
    are absent). One round trip on an open admin client: cheap enough to poll in a loop."""
    offsets = admin.list_group_offsets({group: None}).get(group, {})
    return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic and om.offset >= 0}


def _group_offsets(admin: KafkaAdminClient, topic: str) -> dict[str, dict[int, int]]:
    result: dict[str, dict[int, int]] = {}
    for group in [g["group_id"] for g in admin.list_groups()]:
        mine = group_committed(admin, group, topic)
        if mine:
            result[group] = mine
    return result


def describe_topic(bootstrap: str, topic: str) -> dict[str, Any]:
    """Partitions with beginning/end offsets and message counts, and per group committed offsets and lag."""
    partitions = partitions_of(bootstrap, topic)
    offsets = end_offsets(bootstrap, topic, partitions)
    admin = admin_client(bootstrap)
    try:
        groups = _group_offsets(admin, topic)
    finally:
        admin.close()
    rows = [
        {"partition": p, "beginning_offset": b, "end_offset": e, "messages": e - b}
        for p, (b, e) in sorted(offsets.items())
    ]
    group_rows = {}
    for group, committed in sorted(groups.items()):
        lag = {p: offsets[p][1] - committed.get(p, offsets[p][0]) for p in partitions}
        group_rows[group] = {
            "committed": {str(p): committed.get(p) for p in partitions},
            "lag": {str(p): lag[p] for p in partitions},
            "total_lag": sum(lag.values()),
        }
    return {
        "topic": topic,
        "partitions": rows,
        "messages": sum(r["messages"] for r in rows),
        "groups": group_rows,
    }
