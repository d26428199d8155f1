"""`streamrec catalogue follow`: the items topic kept as the catalogue blob, exactly once.

The follower reads every partition of `<topic>.items` (streamrec.stream.catalogue_topic) outside
any consumer group, folds the changes into the catalogue it holds, and at most every `interval_s`
publishes a new version of `CATALOGUE_BLOB`, which serving workers sync like any artefact. The
blob's header carries the offsets its content covers (`marks`), so catalogue and position are one
atomic put: after a SIGKILL the follower starts from the published blob and re-reads exactly the
records after its marks; nothing is lost and nothing is folded in twice. Kafka commits are not
used at all.

Every put is conditional on the version the follower built on (`expect`), so it never overwrites
a version someone else put in between:
- a file published with `streamrec catalogue publish` replaces the catalogue; it carries the
  marks of the version it replaced, so the follower takes it as its base and re-reads the records
  after those marks on top of it;
- a shard that lost the follower's latest version (a restart from an older checkpoint, or
  empty) is noticed by a version check every `check_every_s`, and the version is put again.

A record that cannot be applied goes to `<topic>.items.dlq` with its reason; dead letters are
flushed before the marks that pass them are published (a crash in between sends them again:
at least once). A broker or parameter-server outage pauses the follower, which retries every
`RETRY_S` with its changes kept; SIGTERM publishes what is pending before it exits.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from streamrec.core.config import Settings
from streamrec.param_server.artifacts import CATALOGUE_BLOB, decode_catalogue_marks, encode_catalogue
from streamrec.param_server.client import FetchedBlob, ParamClient, ParamServerError
from streamrec.stream.catalogue import CatalogueError, ItemCatalogue
from streamrec.stream.catalogue_topic import (
    ItemRecordError,
    PendingChanges,
    apply_changes,
    check_change,
    decode_item_record,
)
from streamrec.stream.deadletter import DeadLetterSink
from streamrec.stream.kafka import BROKER_ERRORS, Consumer, Producer, Record, make_consumer, make_producer
from streamrec.stream.topics import create_topics, end_offsets, offset_key, partitions_of

log = logging.getLogger(__name__)
RETRY_S = 2.0
COMPONENT = "catalogue"

RECORDS = Counter("streamrec_stream_catalogue_records", "Items-topic records read, by outcome", ["outcome"])
PUBLISHES = Counter("streamrec_stream_catalogue_publishes", "Catalogue versions put by the follower, by cause",
                    ["cause"])
ADOPTED = Counter("streamrec_stream_catalogue_adopted", "Catalogue versions another writer put that the follower "
                  "took as its base")
ITEMS = Gauge("streamrec_stream_catalogue_items", "Items in the catalogue the follower last published")
PENDING = Gauge("streamrec_stream_catalogue_pending_changes", "Item changes read but not published yet")
LAG = Gauge("streamrec_stream_catalogue_lag_records", "Items-topic records not read yet, all partitions")
PUBLISH_SECONDS = Histogram("streamrec_stream_catalogue_publish_seconds",
                            "Apply, encode and put of one catalogue version")
for _outcome in ("applied", "dead_lettered"):
    RECORDS.labels(_outcome)
for _cause in ("changes", "restore"):
    PUBLISHES.labels(_cause)


def partition_marks(marks: dict[str, int] | None, topic: str) -> dict[str, int]:
    """The marks of `topic`'s partitions ("topic/partition" keys; a topic name may hold '/')."""
    return {key: offset for key, offset in (marks or {}).items() if key.rpartition("/")[0] == topic}


class CatalogueFollower:
    def __init__(self, settings: Settings, client: ParamClient, interval_s: float = 1.0,
                 check_every_s: float = 5.0) -> None:
        self.settings, self.client = settings, client
        self.topic = settings.items_topic
        self.interval_s, self.check_every_s = interval_s, check_every_s
        self.stop = threading.Event()
        self.catalogue = ItemCatalogue.empty()
        self.version = 0  # the stored version the catalogue is (0: none stored)
        self.marks: dict[str, int] = {}  # per partition key: the next offset to read
        self.published_marks: dict[str, int] = {}  # the marks of the version the follower holds
        self.pending = PendingChanges({})
        self.dirty = False  # changes or marks not published yet
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._dead_letters: DeadLetterSink | None = None
        self._published_at = self._checked_at = time.monotonic()

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """Follow until `stop` is set, then publish what is pending."""
        while not self.stop.is_set():
            try:
                if self._consumer is None:
                    self._load()
                    self._open()
                self._round()
            except (*BROKER_ERRORS, KeyError, TimeoutError) as exc:
                log.warning("items topic %s unreachable (%s); retrying in %.0f s from the published marks",
                            self.topic, exc, RETRY_S)
                self._rewind()
                self.stop.wait(RETRY_S)
            except (OSError, ParamServerError) as exc:
                log.warning("parameter server: %s; retrying in %.0f s with %d changes kept", exc, RETRY_S,
                            len(self.pending))
                self.stop.wait(RETRY_S)
        try:
            if self.dirty and self._producer is not None:
                self._publish("changes")
        except (*BROKER_ERRORS, OSError, ParamServerError) as exc:
            log.error("stopped with %d changes unpublished (%s); the next start reads them again", len(self.pending), exc)
        self._close()

    def _round(self) -> None:
        assert self._consumer is not None
        self._read(self._consumer.poll(max_records=5000, timeout_s=0.2))
        if self._consumer is not None:
            self._notice_rewound()
        now = time.monotonic()
        if self.dirty and now - self._published_at >= self.interval_s:
            self._publish("changes")
        elif now - self._checked_at >= self.check_every_s:
            self._check()

    # ---- state --------------------------------------------------------------------------------
    def _load(self) -> None:
        """Start from the published catalogue and its marks (once; later opens keep the state)."""
        if self.version or self.marks:
            return
        blob = self.client.find_blob(CATALOGUE_BLOB)
        if blob is not None:
            self._take(blob)

    def _take(self, blob: FetchedBlob) -> None:
        """Make a stored version the base. Its marks say which records it holds; without marks (a
        file published before any follower ran) every record of the topic applies on top of it."""
        try:
            catalogue, marks = decode_catalogue_marks(blob.data)
        except CatalogueError as exc:
            log.error("catalogue version %d does not decode (%s): it is replaced by the catalogue rebuilt from %s",
                      blob.version, exc, self.topic)
            catalogue, marks = ItemCatalogue.empty(), {}
        mine = partition_marks(marks, self.topic)
        self.catalogue, self.version = catalogue, blob.version
        if marks is None and self.marks:  # a file publish while following: what was read applies on top
            kept = PendingChanges(catalogue.attributes)
            for change in self.pending:
                try:
                    kept.add(check_change(change, kept.kinds))
                except ItemRecordError as exc:
                    self._dead_letter(change.record(), exc, {"pending": True, "catalogue_version": blob.version},
                                      change.item_id.encode())
            self.pending, self.dirty = kept, True
        else:  # re-read every record after the version's marks (dropping what was read past them)
            self.marks, self.pending, self.dirty = dict(mine), PendingChanges(catalogue.attributes), False
            self.published_marks = mine
            self._close_consumer()
        ITEMS.set(len(catalogue))
        PENDING.set(len(self.pending))

    def _rewind(self) -> None:
        """Back to the version held: a dead letter the broker may not have taken must not be
        passed by published marks, so the records after them are read again."""
        self._close_consumer()
        self.marks, self.pending = dict(self.published_marks), PendingChanges(self.catalogue.attributes)
        self.dirty = False
        PENDING.set(0)

    def _publish(self, cause: str) -> None:
        assert self._producer is not None
        started = time.monotonic()
        catalogue, refused = apply_changes(self.catalogue, self.pending, self.pending.kinds)
        for change, exc in refused:  # a patch whose merged row breaks a rule: the item keeps its row
            self._dead_letter(change.record(), ItemRecordError("bad_item", str(exc)),
                              {"item_id": change.item_id[:256], "merged": True}, change.item_id.encode())
        self._producer.flush()  # dead letters are kept before the marks that pass them
        try:
            version = self.client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue, dict(self.marks)), self.version)
        except ParamServerError as exc:
            if exc.kind != "BlobConflict":
                raise
            log.warning("catalogue: another writer put a version since %d (%s); taking it as the base", self.version,
                        exc.reason)
            self._adopt()
            return
        PUBLISHES.labels(cause).inc()
        PUBLISH_SECONDS.observe(time.monotonic() - started)
        log.info("published catalogue version %d: %d items, %d changes", version, len(catalogue), len(self.pending))
        self.catalogue, self.version, self.published_marks = catalogue, version, dict(self.marks)
        self.pending, self.dirty = PendingChanges(catalogue.attributes), False
        self._published_at = self._checked_at = time.monotonic()
        ITEMS.set(len(catalogue))
        PENDING.set(0)

    def _adopt(self) -> None:
        blob = self.client.find_blob(CATALOGUE_BLOB)
        if blob is None:  # deleted in between: publish ours
            self.version, self.dirty = 0, True
            return
        ADOPTED.inc()
        self._take(blob)

    def _check(self) -> None:
        """Put the version again where the shard lost it; take a version someone else put."""
        self._checked_at = time.monotonic()
        stored = self.client.blob_version(CATALOGUE_BLOB)
        if stored == self.version or (stored is None and self.version == 0):
            return
        if stored is None or stored < self.version:
            log.warning("the parameter server holds catalogue version %s, not %d (a restart lost it): putting it again",
                        stored, self.version)
            self.version, self.dirty = stored or 0, True
            self._publish("restore")
        else:
            self._adopt()

    # ---- Kafka --------------------------------------------------------------------------------
    def _open(self) -> None:
        s = self.settings
        create_topics(s.kafka_bootstrap, [self.topic, self.topic + s.dlq_suffix], s.topic_partitions)
        bounds = end_offsets(s.kafka_bootstrap, self.topic, partitions_of(s.kafka_bootstrap, self.topic))
        if self._producer is None:
            self._producer = make_producer(s.kafka_bootstrap, s.kafka_client)
            self._dead_letters = DeadLetterSink(self._producer, self.topic + s.dlq_suffix, COMPONENT)
        consumer = make_consumer(s.kafka_bootstrap, s.kafka_client, fetch_wait_ms=s.fetch_wait_ms)
        consumer.assign([(self.topic, p) for p in bounds])
        for partition, (begin, end) in bounds.items():
            key = offset_key(self.topic, partition)
            mark = self.marks.get(key, begin)
            if mark < begin:
                log.error("%s: records %d..%d were deleted by retention before the catalogue took them", key, mark,
                          begin - 1)
            elif mark > end:
                log.error("%s: the catalogue holds records up to %d but the partition ends at %d (the topic was "
                          "recreated?): reading it from its beginning", key, mark, end)
            start = begin if mark < begin or mark > end else mark
            self.marks[key] = start
            consumer.seek((self.topic, partition), start)
        self._consumer = consumer

    def _read(self, records: list[Record]) -> None:
        applied = 0
        for record in records:
            key = offset_key(record.topic, record.partition)
            if record.offset < self.marks.get(key, 0):  # the consumer was placed at the marks
                self._rewound(key, f"a record at offset {record.offset}")
                break
            try:
                self.pending.add(decode_item_record(record.key, record.value, self.pending.kinds))
                applied += 1
            except ItemRecordError as exc:
                self._dead_letter(record.value, exc, {"topic": record.topic, "partition": record.partition,
                                                      "offset": record.offset}, record.key)
            self.marks[key] = record.offset + 1
            self.dirty = True
        RECORDS.labels("applied").inc(applied)
        PENDING.set(len(self.pending))
        if records and self._consumer is not None:
            ends = {key: self._consumer.high_watermark((key.rpartition("/")[0], int(key.rpartition("/")[2])))
                    for key in self.marks}
            LAG.set(sum(max(0, end - self.marks[key]) for key, end in ends.items() if end is not None))

    def _notice_rewound(self) -> None:
        """A partition whose end fell below its mark was recreated (a broker that keeps nothing
        restarted, or the topic was deleted): its new records start at 0 and would all be skipped."""
        assert self._consumer is not None
        for key, mark in list(self.marks.items()):
            topic, _, partition = key.rpartition("/")
            end = self._consumer.high_watermark((topic, int(partition)))
            if end is not None and end < mark:
                self._rewound(key, f"the partition now ends at {end}")
                return

    def _rewound(self, key: str, seen: str) -> None:
        log.error("%s: %s, below the %d records the catalogue holds: the partition was recreated; reading it from "
                  "its beginning on top of the catalogue", key, seen, self.marks[key])
        self.marks[key], self.dirty = 0, True
        self._close_consumer()

    def _dead_letter(self, raw: bytes | None, exc: ItemRecordError, source: dict[str, object],
                     key: bytes | None) -> None:
        assert self._dead_letters is not None
        self._dead_letters.send(raw, exc.reason, source, exc.detail, key)
        RECORDS.labels("dead_lettered").inc()
        log.warning("items-topic record %s dead-lettered: %s", source, exc)

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _close(self) -> None:
        self._close_consumer()
        if self._producer is not None:
            try:
                self._producer.close()
            except BROKER_ERRORS as exc:
                log.warning("closing the dead-letter producer: %s", exc)
            self._producer = self._dead_letters = None
