"""Everything one shard holds (tables, dense blobs, the trainer's meta record, the version counter,
the partitions' dedup watermarks and fencing epochs, per-item event counts), behind one lock,
independent of the network.

One lock: a push that touches several tables, its meta record, watermarks and counts and the
version counter must appear atomically to pulls, deltas and checkpoints. Numpy does the heavy
lifting inside the lock, so the lock is held for microseconds to a few milliseconds per call.

A push is all-or-nothing: it is decided (dedup rule and fencing, `PartitionLedger`) and validated
(every table's ids, shapes, finite values and room; item counts) before anything changes.

Incarnation: a fresh uuid per store object, i.e. per server process; `empty` says whether it
started without a checkpoint. Every reply carries both, so clients notice restarts.

Versions: a global counter, +1 per applied push / assign / blob put. On start it jumps to
max(checkpoint version, current time in microseconds) + 1, so versions issued by an earlier
incarnation (possibly lost in a crash after its last checkpoint) are never issued again, and every
table's delta floor is set there: a reader holding a version from before the restart receives a
full snapshot (reset) instead of a delta that would silently miss the lost updates.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streamrec.param_server.defaults import (
    DEFAULT_MAX_ROWS,
    MAX_CLOCK_SKEW,
    MAX_EVENTS_PER_PUSH,
)
from streamrec.param_server.item_counts import ItemEventCounts, checked_counts
from streamrec.param_server.keys import MAX_KEY_BYTES, Keys
from streamrec.param_server.ledger import (
    OffsetConflict,
    PartitionLedger,
    checked_epochs,
    checked_ranges,
)
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.table import Table

MAX_META_DEPTH = 64  # levels of nesting in a push's meta (the trainers' records use 3)


def checked_meta(meta: object) -> None:
    """A ValueError for meta the checkpoint could not write. orjson reads JSON nested 1,024 levels
    deep but writes 255 at most, and the checkpoint and the `meta` reply nest meta one and two
    levels further: a push with meta 300 levels deep was stored, every later `meta` call failed,
    and the next checkpoint raised and stopped the server, losing what it held. So the depth is
    capped well below (MAX_META_DEPTH), and what orjson cannot write (integers past 64 bits) is
    refused too."""
    pending = [(meta, 1)] if isinstance(meta, (dict, list)) else []
    while pending:  # containers only: a list of scalars costs one pass in C
        value, level = pending.pop()
        if level > MAX_META_DEPTH:
            raise ValueError(f"meta cannot be stored: nested more than {MAX_META_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value
        pending.extend((item, level + 1) for item in children if isinstance(item, (dict, list)))
    try:
        orjson.dumps(meta)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"meta cannot be stored: {exc}") from None


RECENT_PUSHERS = 4096  # clients whose last push sequence number is remembered (retry dedup)


def merge_meta(old: Any, new: Any) -> Any:
    """Deep-merge JSON objects (other values: the new one wins). Several trainers of one consumer
    group each push the offsets of their own partitions; merging keeps every partition's latest."""
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = merge_meta(old.get(key), value)
        return merged
    return new


def checked_event_time(event_time: object) -> float:
    """The event time a write is stamped with (default: now). A time far in the future would move a
    table's TTL clock forward for good and expire every row, so more than MAX_CLOCK_SKEW ahead is refused."""
    now = time.time()
    if event_time is None:
        return now
    if not isinstance(event_time, (int, float)) or isinstance(event_time, bool) or not math.isfinite(event_time):
        raise ValueError(f"event_time must be a finite number of seconds, got {event_time!r}")
    if not 0 <= event_time <= now + MAX_CLOCK_SKEW:
        raise ValueError(f"event_time {event_time} is negative or more than {MAX_CLOCK_SKEW:.0f} s in the future")
    return float(event_time)


def fresh_version(previous: int = 0) -> int:
    return max(previous, time.time_ns() // 1000) + 1


class BlobConflict(ValueError):
    """A conditional blob put whose expected version is not the stored one (nothing was stored)."""


@dataclass(frozen=True)
class StoredBlob:
    """A blob as one shard holds it: the bytes and the store version of its last put."""

    data: bytes
    version: int


@dataclass(frozen=True)
class PushResult:
    """`applied` False: nothing changed, the push was applied before (its ranges are at or below
    the watermarks, or it is a retry of an applied sequence number)."""

    version: int
    applied: bool


@dataclass(frozen=True)
class ClaimResult:
    """The new epochs of the claimed partition keys and their watermarks (missing: none yet)."""

    epochs: dict[str, int]
    next_offsets: dict[str, int]


@dataclass(frozen=True)
class DeltaPlan:
    rows: np.ndarray
    deleted: Keys
    version: int
    reset: bool
    row_bytes: int  # the most one row of the reply can take: its values and its id


class ParamStore:
    def __init__(
        self,
        shard: int = 0,
        num_shards: int = 1,
        previous_version: int = 0,
        *,
        empty: bool = True,
        default_max_rows: int = DEFAULT_MAX_ROWS,
    ):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        self.shard, self.num_shards = shard, num_shards
        self.incarnation = uuid.uuid4().hex
        self.empty = empty  # started without a checkpoint
        self.default_max_rows = default_max_rows  # for tables created without max_rows
        self.lock = threading.Lock()
        self.tables: dict[str, Table] = {}
        self.blobs: dict[str, StoredBlob] = {}
        self.version = self.start_version = fresh_version(previous_version)
        self.meta: Any = None
        self.meta_version = 0
        self.applied_events = 0
        self.pushes = 0
        self.skipped_pushes = 0
        self.ledger = PartitionLedger()
        self.item_counts = ItemEventCounts()
        self._recent_pushes: OrderedDict[int, tuple[int, int]] = OrderedDict()

    # ---- tables -------------------------------------------------------------------------------

    def _table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table named {name!r}") from None

    def spec_from(self, data: dict[str, Any]) -> TableSpec:
        """A TableSpec from its JSON form; no (or null) max_rows: this store's default."""
        if not isinstance(data, dict):
            raise TypeError(f"a table spec is a JSON object, got {str(data)[:100]!r}")
        if data.get("max_rows") is None:
            data = {**data, "max_rows": self.default_max_rows}
        return TableSpec.from_dict(data)

    def create_table(self, spec: TableSpec) -> dict[str, Any]:
        """Idempotent: an existing table with the same spec is kept as is."""
        with self.lock:
            existing = self.tables.get(spec.name)
            if existing is not None:
                if not existing.matches(spec):
                    raise ValueError(f"table {spec.name!r} exists with a different spec: {existing.spec}")
                return existing.info()
            self.version += 1
            table = self.tables[spec.name] = Table(spec, start_version=self.version)
            return table.info()

    def drop_table(self, name: str) -> bool:
        with self.lock:
            dropped = self.tables.pop(name, None) is not None
            if dropped:
                self.version += 1  # a change a checkpoint must record: the table came back after a restart
            return dropped

    def table_infos(self) -> list[dict[str, Any]]:
        with self.lock:
            return [table.info() for table in self.tables.values()]

    def pull(self, name: str, keys: Keys, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(values, found, dim); ValueError before allocating a reply over `max_bytes`."""
        with self.lock:
            return self._pull_locked(name, keys, max_bytes)

    def pull_learned(self, name: str, keys: Keys, max_bytes: int | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, int, dict[str, int]]:
        """`pull`, and the watermarks of the pushes the rows have learned (the next offset per
        partition key), read under the same lock as the rows: every event below a watermark is in
        them. Serving compares them with the position of a user's newest event (read-your-writes)."""
        with self.lock:
            return *self._pull_locked(name, keys, max_bytes), dict(self.ledger.next_offsets)

    def _pull_locked(self, name: str, keys: Keys, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        table = self._table(name)
        if max_bytes is not None and len(keys) * table.spec.width * 4 > max_bytes:
            raise ValueError(f"pulling {len(keys)} rows of width {table.spec.width} is over the {max_bytes}-byte reply limit: split it")
        values, found = table.pull(keys)
        return values, found, table.spec.dim

    def push(
        self,
        updates: list[tuple[str, Keys, np.ndarray]],
        meta: Any = None,
        events: int = 0,
        event_time: float | None = None,
        client: tuple[int, int] | None = None,
        *,
        ranges: Mapping[str, Sequence[int]] | None = None,
        epochs: Mapping[str, int] | None = None,
        item_counts: tuple[Sequence[str], np.ndarray] | None = None,
        incarnation: str | None = None,
    ) -> PushResult:
        """Apply all updates, store meta, count events and items and advance the watermarks, as one
        version, or nothing at all. With `ranges` ({pkey: (a, b)}) the dedup rule and fencing decide
        first (skip, or raise OffsetConflict / StaleEpoch); a retried push (same client id and
        sequence number) is acknowledged, not applied twice. Bad input raises before any change.

        `incarnation`: the one the pusher knew when it cut the batch. A ranged push built for an
        earlier process is refused: an empty shard would otherwise accept it as its first range and
        then skip the earlier offsets the pusher rewinds to."""
        now = checked_event_time(event_time)
        if not isinstance(events, int) or isinstance(events, bool) or not 0 <= events <= MAX_EVENTS_PER_PUSH:
            raise ValueError(f"events must be an integer in [0, {MAX_EVENTS_PER_PUSH}], got {events!r}")
        if meta is not None:
            checked_meta(meta)
        ranged = None if ranges is None else checked_ranges(ranges)
        claimed = checked_epochs(epochs or {})
        counted = None if item_counts is None else checked_counts(*item_counts)
        names = [name for name, _, _ in updates]
        if len(set(names)) != len(names):
            raise ValueError(f"a push names a table more than once: {names}")
        with self.lock:
            if client is not None:
                client_id, seq = client
                seen = self._recent_pushes.get(client_id)
                if seen is not None and seq <= seen[0]:
                    return PushResult(seen[1], True)
            if ranged is not None:
                self.ledger.fence(ranged, claimed)
                if incarnation is not None and incarnation != self.incarnation:
                    raise OffsetConflict(
                        f"shard restarted (incarnation {self.incarnation}, push cut for {incarnation}); "
                        "cut the batch again from the shard's watermarks",
                        self.ledger.watermarks(ranged),
                    )
                if not self.ledger.decide(ranged):
                    self.skipped_pushes += 1
                    return PushResult(self.version, False)
            plans = [(self._table(name), self._table(name).prepare_push(keys, grads)) for name, keys, grads in updates]
            self.version += 1
            for table, plan in plans:
                table.apply_push(plan, self.version, now)
            if meta is not None:
                self.meta, self.meta_version = merge_meta(self.meta, meta), self.version
            self.applied_events += int(events)
            if counted is not None:
                self.item_counts.add(*counted)
            if ranged is not None:
                self.ledger.advance(ranged, claimed)
            self.pushes += 1
            if client is not None:
                self._recent_pushes[client[0]] = (client[1], self.version)
                self._recent_pushes.move_to_end(client[0])
                if len(self._recent_pushes) > RECENT_PUSHERS:
                    self._recent_pushes.popitem(last=False)
            return PushResult(self.version, True)

    def claim(self, pkeys: Sequence[str]) -> ClaimResult:
        """New fencing epochs for `pkeys`: pushes carrying older ones are refused from now on."""
        if not all(isinstance(pkey, str) and pkey for pkey in pkeys):
            raise ValueError(f"partition keys must be non-empty strings, got {list(pkeys)!r}")
        with self.lock:
            self.version += 1  # a change a checkpoint must record
            return ClaimResult(self.ledger.claim(pkeys), self.ledger.watermarks(pkeys))

    def watermarks(self) -> dict[str, int]:
        with self.lock:
            return dict(self.ledger.next_offsets)

    def item_event_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.item_counts.counts)

    def assign(self, name: str, keys: Keys, values: np.ndarray, event_time: float | None = None,
               only_new: bool = False) -> int:
        """Replace rows' values; `only_new`: give rows only to the ids without one and leave existing
        rows alone (checked and written under the lock, so a row a push creates meanwhile is kept)."""
        now = checked_event_time(event_time)
        with self.lock:
            table = self._table(name)
            plan = table.prepare_assign(keys, values, only_new)
            self.version += 1
            table.apply_assign(plan, self.version, now)
            return self.version

    def delta_start(self, name: str, since: int, chunk_rows: int,
                    max_bytes: int = 0) -> tuple[DeltaPlan, int, tuple[Keys, np.ndarray, int, bool]]:
        """(plan, rows per chunk, first chunk): the plan and its first chunk's rows are read under one
        lock, so a delta that fits in one chunk holds exactly the rows as of `plan.version`. Rows per
        chunk: `chunk_rows`, fewer where a chunk would pass `max_bytes` (0: no cap)."""
        with self.lock:
            table = self._table(name)
            rows, reset = table.changed_rows(since)
            deleted = Keys.empty(table.spec.key_type) if reset else table.deleted_since(since)
            id_bytes = 8 if table.spec.key_type == "int" else MAX_KEY_BYTES + 8  # a string id and its offset
            plan = DeltaPlan(rows, deleted, self.version, reset, table.spec.width * 4 + id_bytes)
            chunk = max(1, chunk_rows if not max_bytes else min(chunk_rows, max_bytes // plan.row_bytes))
            keys, values = table.read_rows(rows[:chunk])
            return plan, chunk, (keys, values, table.spec.dim, False)

    def delta_chunk(self, name: str, rows: np.ndarray, planned_at: int) -> tuple[Keys, np.ndarray, int, bool]:
        """(ids, values, dim, torn) of planned rows read after the plan: torn when a change after
        `planned_at` reached one of them (rewritten, evicted or its row reused), so the chunk holds
        values newer than the plan's version and the delta is not the table as of that version."""
        with self.lock:
            table = self._table(name)
            alive = rows[table.row_slot[rows] >= 0]
            torn = alive.size < rows.size or bool((table.row_version[alive] > planned_at).any())
            keys, values = table.read_rows(alive)
            return keys, values, table.spec.dim, torn

    # ---- blobs and meta -----------------------------------------------------------------------

    def put_blob(self, name: str, data: bytes, expect: int | None = None) -> int:
        """Store `data` under `name`; with `expect`, only if the blob's version is that (0: only if
        there is no such blob), else BlobConflict: a writer that read, changed and writes back a
        blob cannot overwrite a put made in between."""
        with self.lock:
            if expect is not None:
                current = self.blobs[name].version if name in self.blobs else 0
                if current != expect:
                    raise BlobConflict(f"blob {name!r} is at version {current}, not {expect}")
            self.version += 1
            self.blobs[name] = StoredBlob(data, self.version)
            return self.version

    def get_blob(self, name: str) -> StoredBlob | None:
        with self.lock:
            return self.blobs.get(name)

    def blob_versions(self) -> dict[str, int]:
        with self.lock:
            return {name: blob.version for name, blob in self.blobs.items()}

    def identity(self) -> dict[str, Any]:
        """What every reply carries, so a client notices a restarted shard."""
        return {"incarnation": self.incarnation, "empty": self.empty}

    def meta_record(self) -> dict[str, Any]:
        with self.lock:
            return {
                "shard": self.shard,
                "meta": self.meta,
                "meta_version": self.meta_version,
                "applied_events": self.applied_events,
                "version": self.version,
            }

    def info(self) -> dict[str, Any]:
        with self.lock:
            return {
                "shard": self.shard,
                "num_shards": self.num_shards,
                "version": self.version,
                "start_version": self.start_version,
                "pushes": self.pushes,
                "skipped_pushes": self.skipped_pushes,
                "applied_events": self.applied_events,
                "incarnation": self.incarnation,
                "empty": self.empty,
                "tables": [table.info() for table in self.tables.values()],
                "blobs": {name: blob.version for name, blob in self.blobs.items()},
            }
