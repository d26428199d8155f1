"""Everything one shard holds (tables, dense blobs, the trainer's meta record, the version counter),
behind one lock, independent of the network.

One lock: a push that touches several tables, its meta record and the version counter must appear
atomically to pulls, deltas and checkpoints. Numpy does the heavy lifting inside the lock, so the
lock is held for microseconds to a few milliseconds per call.

Versions: a global counter, +1 per applied push / assign / blob put. On start it jumps to
max(checkpoint version, current time in microseconds) + 1, so versions issued by an earlier
incarnation (possibly lost in a crash after its last checkpoint) are never issued again, and every
table's delta floor is set there: a reader holding a version from before the restart receives a
full snapshot (reset) instead of a delta that would silently miss the lost updates.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrec.param_server.keys import Keys
from streamrec.param_server.table import Table, TableSpec

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


def fresh_version(previous: int = 0) -> int:
    return max(previous, time.time_ns() // 1000) + 1


@dataclass(frozen=True)
class StoredBlob:
    """A blob as one shard holds it: the bytes and the store version of its last put."""

    data: bytes
    version: int


@dataclass(frozen=True)
class DeltaPlan:
    rows: np.ndarray
    deleted: Keys
    version: int
    reset: bool


class ParamStore:
    def __init__(self, shard: int = 0, num_shards: int = 1, previous_version: int = 0):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        self.shard, self.num_shards = shard, num_shards
        self.lock = threading.Lock()
        self.tables: dict[str, Table] = {}
        self.blobs: dict[str, StoredBlob] = {}
        self.version = self.start_version = fresh_version(previous_version)
        self.meta: Any = None
        self.meta_version = 0
        self.applied_events = 0
        self.pushes = 0
        self._recent_pushes: OrderedDict[int, tuple[int, int]] = OrderedDict()

    # ---- tables -------------------------------------------------------------------------------

    def _table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table named {name!r}") from None

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
            return self.tables.pop(name, None) is not None

    def table_infos(self) -> list[dict[str, Any]]:
        with self.lock:
            return [table.info() for table in self.tables.values()]

    def pull(self, name: str, keys: Keys) -> tuple[np.ndarray, np.ndarray, int]:
        """(values, found, dim)."""
        with self.lock:
            table = self._table(name)
            values, found = table.pull(keys)
            return values, found, table.spec.dim

    def push(
        self,
        updates: list[tuple[str, Keys, np.ndarray]],
        meta: Any = None,
        events: int = 0,
        event_time: float | None = None,
        client: tuple[int, int] | None = None,
    ) -> tuple[int, bool]:
        """Apply all updates, store meta and count events, as one version. (version, duplicate):
        a retried push (same client id and sequence number) is acknowledged, not applied twice."""
        now = time.time() if event_time is None else float(event_time)
        with self.lock:
            if client is not None:
                client_id, seq = client
                seen = self._recent_pushes.get(client_id)
                if seen is not None and seq <= seen[0]:
                    return seen[1], True
            tables = [self._table(name) for name, _, _ in updates]
            for table, (_, keys, grads) in zip(tables, updates):
                table.validate_push(keys, grads)
            self.version += 1
            for table, (_, keys, grads) in zip(tables, updates):
                table.push(keys, grads, self.version, now)
            if meta is not None:
                self.meta, self.meta_version = merge_meta(self.meta, meta), self.version
            self.applied_events += int(events)
            self.pushes += 1
            if client is not None:
                self._recent_pushes[client[0]] = (client[1], self.version)
                self._recent_pushes.move_to_end(client[0])
                if len(self._recent_pushes) > RECENT_PUSHERS:
                    self._recent_pushes.popitem(last=False)
            return self.version, False

    def assign(self, name: str, keys: Keys, values: np.ndarray, event_time: float | None = None) -> int:
        now = time.time() if event_time is None else float(event_time)
        with self.lock:
            table = self._table(name)
            self.version += 1
            table.assign(keys, values, self.version, now)
            return self.version

    def delta_plan(self, name: str, since: int) -> DeltaPlan:
        with self.lock:
            table = self._table(name)
            rows, reset = table.changed_rows(since)
            deleted = Keys.empty(table.spec.key_type) if reset else table.deleted_since(since)
            return DeltaPlan(rows, deleted, self.version, reset)

    def delta_rows(self, name: str, rows: np.ndarray) -> tuple[Keys, np.ndarray, int]:
        """(ids, values, dim) of the planned rows still alive now."""
        with self.lock:
            table = self._table(name)
            keys, values = table.read_rows(rows)
            return keys, values, table.spec.dim

    # ---- blobs and meta -----------------------------------------------------------------------

    def put_blob(self, name: str, data: bytes) -> int:
        with self.lock:
            self.version += 1
            self.blobs[name] = StoredBlob(data, self.version)
            return self.version

    def get_blob(self, name: str) -> StoredBlob | None:
        with self.lock:
            return self.blobs.get(name)

    def blob_versions(self) -> dict[str, int]:
        with self.lock:
            return {name: blob.version for name, blob in self.blobs.items()}

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
                "applied_events": self.applied_events,
                "tables": [table.info() for table in self.tables.values()],
                "blobs": {name: blob.version for name, blob in self.blobs.items()},
            }
