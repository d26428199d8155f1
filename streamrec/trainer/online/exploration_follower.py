"""The trainer's counter of exploration statistics (`streamrec.trainer.online.exploration`).

A thread follows every partition of the events topic and of serving's impressions topic, outside
any consumer group, from the marks the store keeps (exactly once; a partition without a mark from
its beginning), and counts per item:
- impressions: every item an impression showed;
- clicks: a positive event whose `context.request_id` names an impression that showed the event's
  item to the event's user (the join window: the newest `join_requests` impressions read, also
  those re-read on start), one at most per (impression, item): a producer's retry of the click or
  a second click on the same shown item is not a second click through. The store remembers which
  pairs it credited in the same atomic call that moves the partition's mark, so a click re-read
  after a restart is neither credited twice nor lost;
- first seen: the event time of an item's first event;
and per context slice (`streamrec.trainer.online.context_slices`), every positive event's decayed
weight and the slices' prequential merit.
A range of events holding a click whose answer's impression has not been read yet waits for it,
at most `click_grace_s` (2 s) after it was read, while impressions go on being read: serving sends
its impressions in batches (every 0.2 s), so a click made right after its answer often reached
the broker before the answer's impression, and was never credited (7 of 20 such clicks counted).
Ranges behind a waiting one wait with it, so each partition is still counted in order from its
mark; waiting ranges are in memory only, their marks unmoved, so a restart re-reads them; past
`MAX_HELD_EVENTS` the oldest are counted at once. A click whose impression is still not in the
window then is not counted (it cannot be credited to what was never seen shown). A broker or Redis outage never stops training: the thread logs it, waits
`RETRY_S` and reopens from the store's marks.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import pandas as pd
import redis

from streamrec.core.config import Settings
from streamrec.stream.events import EventBatch, EventSchema
from streamrec.stream.impressions import decode_record
from streamrec.stream.kafka import BROKER_ERRORS, Consumer, Record, make_consumer
from streamrec.stream.topics import create_topics, end_offsets, offset_key, partitions_of
from streamrec.trainer.online.context_slices import MERIT_TOP, SliceCounts, event_slices, slice_counts
from streamrec.trainer.online.exploration import NO_CLOCK, ExplorationStore, MarkMoved
from streamrec.trainer.online.follower import FollowerThread
from streamrec.trainer.online.metrics import EXPLORATION_COUNTED

log = logging.getLogger(__name__)
RETRY_S = 2.0
JOIN_REQUESTS = 200_000  # impressions a click can be joined to
REWIND_RECORDS = 1000  # impression records per partition re-read on start, for the join only
CLICK_GRACE_S = 2.0  # how long an event read waits for its answer's impression before it is counted
MAX_HELD_EVENTS = 200_000  # events held for the grace at most (memory); past it the oldest are counted
Shown = tuple[str | None, frozenset[str]]  # an answer's user and the items it showed


@dataclass
class HeldRange:
    """Events of one partition read but not counted yet: `carried` are its positive events that
    name their answer, (request id as sent, user, item); `waiting` the request ids among them
    whose impressions were not read yet."""

    read_at: float  # time.monotonic()
    key: str
    records: list[Record]
    batch: EventBatch
    carried: list[tuple[object, str, str]]
    waiting: set[str]


class ExplorationFollower(FollowerThread):
    def __init__(self, settings: Settings, store: ExplorationStore, positive_types: Iterable[str],
                 join_requests: int = JOIN_REQUESTS, click_grace_s: float = CLICK_GRACE_S) -> None:
        super().__init__("trainer-exploration")
        self.settings, self.store, self.join_requests = settings, store, join_requests
        self.click_grace_s = click_grace_s
        self._held: deque[HeldRange] = deque()  # ranges read, not yet counted, in the order read
        self._held_records = 0
        self.positive_types = list(positive_types)
        self.schema = EventSchema.from_settings(settings)
        self._shown: OrderedDict[str, Shown] = OrderedDict()  # request id -> (its user, the items it showed)
        self._next: dict[str, int] = {}  # per partition key: the next offset to count
        self._counted = {kind: EXPLORATION_COUNTED.labels(kind) for kind in ("impressions", "shown", "clicks", "first_seen",
                                                                             "sliced")}

    # ---- reading ------------------------------------------------------------------------------
    def _open(self, topic: str, rewind: int) -> Consumer:
        """A consumer on every partition of `topic` at the store's marks (`rewind` records
        earlier for the join memory, not counted)."""
        s = self.settings
        create_topics(s.kafka_bootstrap, [topic], s.topic_partitions)
        bounds = end_offsets(s.kafka_bootstrap, topic, partitions_of(s.kafka_bootstrap, topic))
        marks = self.store.marks()
        consumer = make_consumer(s.kafka_bootstrap, s.kafka_client, fetch_wait_ms=s.fetch_wait_ms)
        consumer.assign([(topic, p) for p in bounds])
        for partition, (begin, _) in bounds.items():
            key = offset_key(topic, partition)
            self._next[key] = max(marks.get(key, begin), begin)
            consumer.seek((topic, partition), max(begin, self._next[key] - rewind))
        return consumer

    def _run(self) -> None:
        s = self.settings
        impressions: Consumer | None = None
        events: Consumer | None = None
        while not self._stop.is_set():
            try:
                impressions = impressions or self._open(s.impressions_topic, self.join_requests and REWIND_RECORDS)
                events = events or self._open(s.topic, 0)
                self._impressions(impressions.poll(max_records=500, timeout_s=0.05))
                self._hold(events.poll(max_records=5000, timeout_s=0.2))
                self._events(self._due())
            # a Redis Cluster with no node answering raises RedisClusterException, no RedisError:
            # uncaught, it ended this thread for good (counting stopped until the trainer restarted)
            except (*BROKER_ERRORS, KeyError, TimeoutError, redis.RedisError, redis.exceptions.RedisClusterException,
                    MarkMoved) as exc:
                log.warning("exploration statistics paused for %.0f s (%s); resuming from the store's marks",
                            RETRY_S, exc)
                self._held.clear()  # re-read from the marks with everything else
                self._held_records = 0
                for consumer in (impressions, events):
                    if consumer is not None:
                        consumer.close()
                impressions = events = None
                self._stop.wait(RETRY_S)
        for consumer in (impressions, events):
            if consumer is not None:
                consumer.close()

    def _ranges(self, records: list[Record]) -> Iterable[tuple[str, list[Record]]]:
        """Per partition, its records from the next offset to count (earlier ones were re-read
        for the join memory, or counted before)."""
        by_partition: dict[str, list[Record]] = {}
        for record in records:
            key = offset_key(record.topic, record.partition)
            if record.offset >= self._next.get(key, 0):
                by_partition.setdefault(key, []).append(record)
        return by_partition.items()

    # ---- impressions --------------------------------------------------------------------------
    def _impressions(self, records: list[Record]) -> None:
        parsed = {(record.partition, record.offset): _shown_by_request(record.value) for record in records}
        for answers in parsed.values():  # every record read feeds the join memory, counted or not
            for request_id, user, items in answers:
                self._shown[request_id] = user, items
                self._shown.move_to_end(request_id)
        while len(self._shown) > self.join_requests:
            self._shown.popitem(last=False)
        for key, mine in self._ranges(records):
            answers = [items for record in mine for _, _, items in parsed[record.partition, record.offset]]
            shown = [item for items in answers for item in items]
            ids, counts = np.unique(np.array(shown, object), return_counts=True) if shown else (np.empty(0, object), np.zeros(0))
            self._count(key, mine, ids, counts, np.full(len(ids), np.nan), NO_CLOCK)
            self._counted["shown"].inc(int(np.sum(counts)))
            self._counted["impressions"].inc(len(answers))

    # ---- events -------------------------------------------------------------------------------
    def _hold(self, records: list[Record]) -> None:
        """Decode what was read, per partition, and queue it for counting."""
        now = time.monotonic()
        for key, mine in self._ranges(records):
            batch, _ = self.schema.decode_many([record.value for record in mine])
            carried = self._carried(batch) if len(batch) else []
            waiting = {request for request, _, _ in carried if isinstance(request, str) and request not in self._shown}
            self._held.append(HeldRange(now, key, mine, batch, carried, waiting))
            self._held_records += len(mine)

    def _due(self) -> list[HeldRange]:
        """The held ranges to count now, oldest first: every one until the first that still waits
        for an impression (within the grace and the bound), so each partition stays in order."""
        due: list[HeldRange] = []
        ripe = time.monotonic() - self.click_grace_s
        while self._held:
            first = self._held[0]
            if first.waiting and first.read_at > ripe and self._held_records <= MAX_HELD_EVENTS:
                first.waiting = {request for request in first.waiting if request not in self._shown}
                if first.waiting:
                    break
            self._held.popleft()
            self._held_records -= len(first.records)
            due.append(first)
        return due

    def _carried(self, batch: EventBatch) -> list[tuple[object, str, str]]:
        """(request id as sent, user, item) of the batch's positive events that name their answer."""
        carried = np.flatnonzero(~pd.isna(batch.context) & np.isin(batch.event_type, self.positive_types))
        return list(zip([context.get("request_id") for context in batch.context[carried].tolist()],
                        batch.user_id[carried].tolist(), batch.item_id[carried].tolist()))

    def _events(self, ranges: list[HeldRange]) -> None:
        tops = {name: ids[:MERIT_TOP] for name, (ids, _) in self.store.slice_tops(MERIT_TOP).lists.items()} \
            if ranges else {}
        for held in ranges:
            key, mine, batch = held.key, held.records, held.batch
            if not len(batch):
                self._count(key, mine, np.empty(0, object), np.zeros(0), np.zeros(0), NO_CLOCK)
                continue
            positive = np.isin(batch.event_type, self.positive_types)
            slices = slice_counts(event_slices(batch, positive), self.store.slice_config.half_life_s, tops)
            credits = [(request, item) for request, user, item in held.carried if self._clicked(request, user, item)]
            first = pd.Series(batch.timestamp).groupby(batch.item_id, sort=False).min()
            ids = first.index.to_numpy(object)
            credited = self._count(key, mine, ids, np.zeros(len(ids), np.int64), first.to_numpy(np.float64),
                                   float(batch.timestamp.max()), slices, credits)
            self._counted["clicks"].inc(credited)
            self._counted["first_seen"].inc(len(ids))
            self._counted["sliced"].inc(int(slices.events.sum()))

    def _count(self, key: str, mine: list[Record], ids: np.ndarray, shown: np.ndarray, first: np.ndarray,
               clock: float, slices: SliceCounts | None = None, credits: Sequence[tuple[str, str]] = ()) -> int:
        """Count one partition's range `mine` from its mark; clicks only as `credits` (request id,
        item), which the store credits once per pair. Returns the clicks credited."""
        end = mine[-1].offset + 1
        credited = self.store.count(ids, shown, first, clock, key, self._next[key], end, slices, credits)
        self._next[key] = end
        return credited

    def _clicked(self, request: object, user: str, item: str) -> bool:
        """Whether a positive event of `user` on `item` naming answer `request` is a click through:
        that answer (in the join window) showed the item to that same user; another user's event
        naming someone else's answer credits nothing."""
        shown = self._shown.get(request) if isinstance(request, str) else None
        return shown is not None and shown[0] == user and item in shown[1]


def _shown_by_request(value: bytes) -> list[tuple[str, str | None, frozenset[str]]]:
    """(request id, user id, shown items) of each well-formed impression of one record; anything
    else (not JSON, no string request id, items not a list of strings) is skipped: the trainer's
    impressions reader counts such records as invalid. A user id that is not a string is None: its
    items count as shown, but no event's user matches it, so no click is credited to them."""
    try:
        impressions = decode_record(value)
    except orjson.JSONDecodeError:
        return []
    out = []
    for impression in impressions:
        if not isinstance(impression, dict):
            continue
        request, user, items = impression.get("request_id"), impression.get("user_id"), impression.get("items")
        if isinstance(request, str) and isinstance(items, list) and all(isinstance(i, str) for i in items):
            out.append((request, user if isinstance(user, str) else None, frozenset(items)))
    return out
