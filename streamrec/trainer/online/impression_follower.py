"""The trainer's reader of serving's impressions topic: what each user was shown, for BPR negatives.

A thread follows every partition of the impressions topic outside any consumer group (the topic
is read, never committed) and hands each impression to the models' `ShownItems`. On start it
rewinds `rewind_records` records per partition, so a restarted trainer knows what serving showed
lately. A broker outage never stops training: the thread logs it, waits `RETRY_S` and reopens,
and meanwhile the models keep their sampled negatives. A record that is not JSON lines is counted
as invalid (`streamrec_trainer_impressions_total{outcome="invalid"}`), never fatal.

Partitions added to the topic after the follower opened it are read after its next reopen.
"""

from __future__ import annotations

import logging

import orjson

from streamrec.core.config import Settings
from streamrec.stream.impressions import decode_record
from streamrec.stream.kafka import BROKER_ERRORS, Consumer, make_consumer
from streamrec.stream.topics import create_topics, end_offsets, partitions_of
from streamrec.trainer.online.follower import FollowerThread
from streamrec.trainer.online.metrics import IMPRESSIONS_READ
from streamrec.trainer.online.shown import ShownItems

log = logging.getLogger(__name__)
RETRY_S = 2.0
REWIND_RECORDS = 1000  # per partition; a record holds up to 512 KiB of impressions


class ImpressionFollower(FollowerThread):
    def __init__(self, settings: Settings, sinks: list[ShownItems], rewind_records: int = REWIND_RECORDS) -> None:
        super().__init__("trainer-impressions")
        self.settings, self.sinks, self.rewind_records = settings, sinks, rewind_records
        self.records = 0  # impression records read since start
        self._invalid = IMPRESSIONS_READ.labels("invalid")

    def _open(self) -> Consumer:
        s = self.settings
        topic = s.impressions_topic
        create_topics(s.kafka_bootstrap, [topic], s.topic_partitions)
        bounds = end_offsets(s.kafka_bootstrap, topic, partitions_of(s.kafka_bootstrap, topic))
        consumer = make_consumer(s.kafka_bootstrap, s.kafka_client, fetch_wait_ms=s.fetch_wait_ms)
        consumer.assign([(topic, p) for p in bounds])
        for partition, (begin, end) in bounds.items():
            consumer.seek((topic, partition), max(begin, end - self.rewind_records))
        return consumer

    def _run(self) -> None:
        consumer: Consumer | None = None
        while not self._stop.is_set():
            try:
                consumer = consumer or self._open()
                records = consumer.poll(max_records=500, timeout_s=0.2)
            except (*BROKER_ERRORS, KeyError, TimeoutError) as exc:
                log.warning("impressions: cannot read %s, retrying in %.0f s (sampled negatives meanwhile): %s",
                            self.settings.impressions_topic, RETRY_S, exc)
                if consumer is not None:
                    consumer.close()
                consumer = None
                self._stop.wait(RETRY_S)
                continue
            impressions: list[object] = []
            for record in records:
                try:
                    impressions.extend(decode_record(record.value))
                except orjson.JSONDecodeError:
                    self._invalid.inc()
            for sink in self.sinks:
                sink.add(impressions)
            self.records += len(records)
        if consumer is not None:
            consumer.close()
