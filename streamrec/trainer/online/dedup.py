"""Event-id de-duplication in the online trainer: the same `event_id` at two offsets is learned once.

Where duplicates come from: a client re-sending to POST /events after a lost acknowledgement or
while serving's Redis was down, or a producer retrying outside Kafka's idempotence. Serving keys an
event by its user id, so both copies land in the same partition; the window is per partition.

The rule, a pure function of the topic (so every replay, every shard and every restarted trainer
decides alike): the record at offset `o` of partition `p` is a duplicate when the same event id
occurs in `p` at an offset `o'` with `start(o) <= o' < o`, where the window `[start(o), o)` covers
the `slots` spans of SPAN_EVENTS offsets ending with `o`'s own span (about `window_events` offsets).

The state travels with the model: each push's meta record carries, under "event_ids", the spans the
batch touched (`{pkey: {str(span % slots): {"span", "hashes", "offsets"}}}`: base64 of the uint64
hashes and of the uint16 offsets within the span, 10 bytes an event, ~870 KB per partition for the
default window of 65,536 events). The parameter server
deep-merges meta, so every shard holds, per partition, a ring of the last `slots` spans, written in
the same atomic push as the tables and the offset watermarks: exactly-once is untouched. After a
restart or a rewind the window of each partition is read from the shard that stands furthest back
for it: its ring ends exactly where the trainer resumes. Ids are kept as 64-bit hashes (pandas'
fixed-key SipHash; a false duplicate needs a collision among ~65,000 ids: about 1e-10 per event).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import Counter

from streamrec.stream.events import EventBatch

META_KEY = "event_ids"
SPAN_EVENTS = 512  # offsets per span (< 2**16: stored as uint16); a push carries its spans, ~7 KB each
REASON = "duplicate_event_id"
DUPLICATE_EVENTS = Counter("streamrec_trainer_duplicate_events_total",
                           "Records whose event id occurred earlier in the partition (within the window): "
                           "not learned, sent to the dead-letter topic")

Span = tuple[np.ndarray, np.ndarray]  # (uint64 id hashes, int64 offsets)


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _decode(text: str, dtype: type[np.generic]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def hash_ids(event_ids: np.ndarray) -> np.ndarray:
    """Event ids -> uint64, the same in every process (pandas hashes with a fixed key).
    `categorize=False` gives the same hashes: pandas would first factorize the ids to hash each
    distinct one once, which costs five times the hashing itself for ids that are all distinct."""
    return pd.util.hash_array(np.asarray(event_ids, dtype=object), categorize=False)


def _previous_offsets(hashes: np.ndarray, offsets: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of the first `first` (hash, offset) pairs: whether its hash occurs at a smaller
    offset among all the pairs, and the largest such offset (0 where none). One sort of the pairs:
    a repeated (hash, offset) pair (a replayed record) is one occurrence, not its own predecessor."""
    order = np.lexsort((offsets, hashes))
    h, o = hashes[order], offsets[order]
    same_hash = np.zeros(len(h), bool)
    same_hash[1:] = h[1:] == h[:-1]
    same_pair = np.zeros(len(h), bool)
    same_pair[1:] = same_hash[1:] & (o[1:] == o[:-1])
    distinct = np.flatnonzero(~same_pair)  # sorted position of each distinct pair's first copy
    run = np.cumsum(~same_pair) - 1  # sorted position -> its distinct pair
    has = np.zeros(len(distinct), bool)
    has[1:] = same_hash[distinct[1:]]  # the distinct pair before it has the same hash
    prev = np.zeros(len(distinct), np.int64)
    prev[1:] = o[distinct[:-1]]
    mine = np.empty(len(h), np.int64)
    mine[order] = run
    mine = mine[:first]
    return has[mine], np.where(has[mine], prev[mine], 0)


class EventIdWindow:
    """Recent event ids per partition key, for `duplicates` and the meta `record` returns."""

    def __init__(self, window_events: int = 65_536) -> None:
        self.slots = max(1, math.ceil(window_events / SPAN_EVENTS))
        self._spans: dict[str, dict[int, Span]] = {}

    # ---- state ----------------------------------------------------------------------------------
    def restore(self, meta_records: list[dict[str, Any]], keys: Iterable[str]) -> None:
        """Per partition key, the ring of the shard whose recorded offset is smallest (a shard
        without one has learned nothing of it: the window starts empty)."""
        for key in keys:
            metas = [record.get("meta") or {} for record in meta_records]
            furthest_back = min(metas, key=lambda meta: (meta.get("offsets") or {}).get(key, -1), default={})
            ring = (furthest_back.get(META_KEY) or {}).get(key) or {}
            spans = {int(slot["span"]): (_decode(slot["hashes"], np.uint64),
                                         _decode(slot["offsets"], np.uint16).astype(np.int64) + int(slot["span"]) * SPAN_EVENTS)
                     for slot in ring.values()}
            newest = max(spans, default=0)
            self._spans[key] = {span: data for span, data in spans.items() if span > newest - self.slots}

    def _window(self, key: str) -> Span:
        spans = self._spans.get(key) or {}
        if not spans:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return (np.concatenate([h for h, _ in spans.values()]), np.concatenate([o for _, o in spans.values()]))

    # ---- deciding -------------------------------------------------------------------------------
    def window_start(self, offset: np.ndarray | int) -> np.ndarray | int:
        """The first offset of the window of the record at `offset`: the same id at an offset from
        there on makes it a duplicate (what a reader resuming at `offset` must have recorded)."""
        return (offset // SPAN_EVENTS - (self.slots - 1)) * SPAN_EVENTS

    def duplicates(self, batch: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the batch's duplicate rows, the offset of each one's previous copy, -1 elsewhere).
        The batch must carry its origin (`with_origin`); rows may be in any order."""
        n = len(batch)
        duplicate, previous = np.zeros(n, bool), np.full(n, -1, np.int64)
        if not n:
            return duplicate, previous
        hashes = hash_ids(batch.event_id)
        for key in pd.unique(batch.partition):
            rows = np.flatnonzero(batch.partition == key)
            h, o = hashes[rows], batch.offset[rows]
            known_h, known_o = self._window(key)
            near = np.isin(known_h, h)
            has_prev, prev = _previous_offsets(np.concatenate([h, known_h[near]]), np.concatenate([o, known_o[near]]),
                                               len(rows))
            hit = has_prev & (prev >= self.window_start(o))
            duplicate[rows[hit]] = True
            previous[rows[hit]] = prev[hit]
        return duplicate, previous

    def record(self, batch: EventBatch) -> dict[str, dict[str, dict[str, Any]]]:
        """Add the batch's ids (every row, duplicates too) and return the meta of the spans it
        touched, whole: the parameter server replaces each slot with the pushed one."""
        delta: dict[str, dict[str, dict[str, Any]]] = {}
        if not len(batch):
            return delta
        hashes = hash_ids(batch.event_id)
        for key in pd.unique(batch.partition):
            rows = np.flatnonzero(batch.partition == key)
            spans = self._spans.setdefault(key, {})
            slots = delta.setdefault(key, {})
            for span in np.unique(batch.offset[rows] // SPAN_EVENTS).tolist():
                mine = rows[batch.offset[rows] // SPAN_EVENTS == span]
                old_h, old_o = spans.get(span, (np.zeros(0, np.uint64), np.zeros(0, np.int64)))
                keep = ~np.isin(old_o, batch.offset[mine])  # a replayed offset replaces its entry
                span_h = np.concatenate([old_h[keep], hashes[mine]])
                span_o = np.concatenate([old_o[keep], batch.offset[mine].astype(np.int64)])
                spans[span] = (span_h, span_o)
                slots[str(span % self.slots)] = {"span": span, "hashes": _encode(span_h),
                                                 "offsets": _encode((span_o - span * SPAN_EVENTS).astype(np.uint16))}
            newest = max(spans)
            for span in [s for s in spans if s <= newest - self.slots]:
                del spans[span]
        return delta
