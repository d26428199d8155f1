"""One named embedding table: collisionless rows created on first (admitted) use, evicted by TTL.

Layout (one row per live id):
  block       (rows, W * (1 + state)) float32, W = dim + scalars, split into two views:
    values    the vector, then the scalar side values (biases)
    state     the Adagrad accumulator (absent for SGD), next to the values so an update gathers and
              scatters one contiguous span per row
  row_key     uint64   the integer id, or the string's 64-bit hash
  row_version int64    last global version that changed the row (delta = rows with version > since)
  row_time    float64  event time of the last update (TTL expiry)
  row_slot    int32    the row's slot in the key index, -1 for a free row
  string ids only: row_key_start int64 / row_key_len int32 into `arena`, the exact key bytes.

Every per-row array is a view of address space reserved up front for `max_rows` rows
(`streamrec.param_server.memory.reserve`): the kernel commits a page only when a row on it is first
written, so growing the table never copies or blocks, and freed rows are reused (free list).
Not thread-safe: the store serialises calls.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from streamrec.param_server.admission import DEFAULT_WIDTH, CountMinSketch
from streamrec.param_server.keyindex import KeyIndex
from streamrec.param_server.keys import (
    Keys,
    KeyType,
    gather_padded,
    mix64,
    padded_width,
)
from streamrec.param_server.memory import reserve
from streamrec.param_server.optimizers import OptimizerSpec, RowOptimizer

DEFAULT_MAX_ROWS = 1 << 24
MAX_RETAINED_DELETIONS = 1 << 20  # evicted ids kept for delta readers; older readers get a reset
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class TableFullError(RuntimeError):
    """The table reached max_rows; raise max_rows or set a ttl."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    dim: int
    scalars: int = 0
    key_type: KeyType = "str"
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    init_std: float = 0.01  # new rows: vector part uniform with this std, deterministic per id
    seed: int = 0
    min_count: int = 1  # admission: sightings before an id gets a row
    ttl: float | None = None  # seconds of event time without update before eviction; None: never
    max_rows: int = DEFAULT_MAX_ROWS
    admission_width: int = DEFAULT_WIDTH

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"table name {self.name!r} must be 1-128 of [A-Za-z0-9_.-]")
        if self.dim < 1 or self.scalars < 0:
            raise ValueError("dim must be >= 1 and scalars >= 0")
        if self.key_type not in ("int", "str"):
            raise ValueError("key_type must be 'int' or 'str'")
        if self.min_count < 1 or (self.ttl is not None and self.ttl <= 0):
            raise ValueError("min_count must be >= 1 and ttl positive (or None)")
        if not 1 <= self.max_rows < 2**31:
            raise ValueError("max_rows must be in [1, 2**31)")

    @property
    def width(self) -> int:
        return self.dim + self.scalars

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TableSpec:
        data = dict(data)
        data["optimizer"] = OptimizerSpec(**data.get("optimizer", {}))
        return TableSpec(**data)


def initial_values(spec: TableSpec, key64: np.ndarray) -> np.ndarray:
    """Deterministic per id and seed: uniform(-a, a) with std init_std; scalars start at 0.
    A pure function of the spec and the 64-bit key, so a trainer can compute the value a row will
    be created with before the server has created it."""
    out = np.zeros((key64.size, spec.width), np.float32)
    cols = np.arange(spec.dim, dtype=np.uint64) * _GOLDEN
    seed = mix64(np.array([spec.seed], np.uint64))[0]
    bits = mix64((key64 ^ seed)[:, None] + cols)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    out[:, : spec.dim] = (2.0 * uniform - 1.0) * (spec.init_std * np.sqrt(3.0))
    return out


def sum_duplicates(rows: np.ndarray, grads: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows with the gradients of repeated rows added up.

    The usual batch has no repeats, and detecting that by sorting costs more than the update, so
    first an O(n) test: write each position into `scratch` (one int32 per table row) at its row and
    read back; only if some position was overwritten by a later repeat do we sort + reduceat.
    """
    positions = np.arange(rows.size, dtype=np.int32)
    scratch[rows] = positions
    if (scratch[rows] == positions).all():
        return rows, grads
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    if starts.size == rows.size:
        return rows, grads
    return ordered[starts], np.add.reduceat(grads[order], starts, axis=0)


class Table:
    def __init__(self, spec: TableSpec, start_version: int = 0):
        self.spec = spec
        self.optimizer = RowOptimizer(spec.optimizer, spec.dim, spec.scalars)
        n, width = spec.max_rows, spec.width
        # values and optimiser state side by side in one row: an update touches one span of memory
        self.block = reserve((n, width * (1 + spec.optimizer.state_per_value)), np.float32)
        self.values = self.block[:, :width]
        self.state = self.block[:, width:] if spec.optimizer.state_per_value else None
        self.row_key = reserve((n,), np.uint64)
        self.row_version = reserve((n,), np.int64)
        self.row_time = reserve((n,), np.float64)
        self.row_slot = reserve((n,), np.int32)
        self._scratch = reserve((n,), np.int32)  # duplicate detection in push
        if spec.key_type == "str":
            self.row_key_start = reserve((n,), np.int64)
            self.row_key_len = reserve((n,), np.int32)
            self.arena = np.empty(1 << 16, np.uint8)
            self.arena_used = 0
            self.arena_garbage = 0
        self.size = 0  # rows ever handed out (high-water mark); live rows = index.live
        self.free_rows = np.empty(0, np.int64)
        self.index = KeyIndex(self.row_key, self.row_slot)
        self.sketch = CountMinSketch(spec.admission_width) if spec.min_count > 1 else None
        self.admitted = self.evicted = self.rejected = 0
        self.last_version = start_version  # newest version stamped on a row or an eviction
        self.floor = start_version  # readers with since < floor must start from a full snapshot
        self.clock = 0.0  # newest event time seen
        self.last_sweep = 0.0
        self.deletions: deque[tuple[int, Keys]] = deque()
        self.retained_deletions = 0

    # ---- keys ---------------------------------------------------------------------------------

    @property
    def live_rows(self) -> int:
        return self.index.live

    def _check(self, keys: Keys) -> None:
        if len(keys) and keys.kind != self.spec.key_type:
            raise TypeError(f"table {self.spec.name!r} has {self.spec.key_type} ids, got {keys.kind} ids")

    def _same_bytes(self, keys: Keys):
        """Exact comparison of string ids with stored keys: what makes string keys collisionless."""

        def same(positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
            lens = keys.lengths[positions]
            stored_lens = self.row_key_len[rows].astype(np.int64)
            width = padded_width(lens)
            incoming = gather_padded(keys.blob, keys.offsets[positions], lens, width)
            stored = gather_padded(self.arena[: self.arena_used], self.row_key_start[rows], stored_lens, width)
            return (lens == stored_lens) & (incoming == stored).all(axis=1)

        return same

    def _locate(self, keys: Keys) -> tuple[np.ndarray, np.ndarray]:
        """(row per key or -1, the keys' 64-bit form)."""
        self._check(keys)
        key64 = keys.hash64()
        same = self._same_bytes(keys) if self.spec.key_type == "str" else None
        return self.index.find(key64, same), key64

    def lookup(self, keys: Keys) -> np.ndarray:
        return self._locate(keys)[0]

    def keys_of(self, rows: np.ndarray) -> Keys:
        if self.spec.key_type == "int":
            return Keys(ints=self.row_key[rows].view(np.int64))
        return Keys.from_spans(self.arena, self.row_key_start[rows], self.row_key_len[rows])

    # ---- row lifecycle ------------------------------------------------------------------------

    def _allocate(self, count: int) -> np.ndarray:
        if count > self.free_rows.size + self.spec.max_rows - self.size:
            raise TableFullError(f"table {self.spec.name!r} is full ({self.spec.max_rows} rows)")
        reused = self.free_rows[-count:] if count else self.free_rows[:0]
        self.free_rows = self.free_rows[: self.free_rows.size - reused.size]
        fresh = np.arange(self.size, self.size + count - reused.size, dtype=np.int64)
        self.size += fresh.size
        return np.concatenate([reused, fresh])

    def _store_key_bytes(self, rows: np.ndarray, keys: Keys) -> None:
        need = self.arena_used + keys.blob.size
        if need > self.arena.size:
            grown = np.empty(max(need, 2 * self.arena.size), np.uint8)
            grown[: self.arena_used] = self.arena[: self.arena_used]
            self.arena = grown
        self.arena[self.arena_used : need] = keys.blob
        self.row_key_start[rows] = self.arena_used + keys.offsets[:-1]
        self.row_key_len[rows] = keys.lengths
        self.arena_used = need

    def initial_values(self, key64: np.ndarray) -> np.ndarray:
        return initial_values(self.spec, key64)

    def _create(self, keys: Keys, key64: np.ndarray, version: int, now: float) -> None:
        """Give rows to ids not in the table; repeated ids get one row.

        Distinct ids are picked by 64-bit key; two different strings with the same hash are told
        apart by the re-lookup below and get their own rows on the next pass.
        """
        while len(keys):
            _, first = np.unique(key64, return_index=True)
            new_keys, new64 = keys.take(first), key64[first]
            rows = self._allocate(first.size)
            self.row_key[rows] = new64
            if self.spec.key_type == "str":
                self._store_key_bytes(rows, new_keys)
            self.row_slot[rows] = -1
            self.index.insert(new64, rows, self.size)
            self.values[rows] = self.initial_values(new64)
            if self.state is not None:
                self.state[rows] = self.spec.optimizer.initial_accumulator
            self._stamp(rows, version, now)
            self.admitted += rows.size
            rest = np.ones(len(keys), bool)
            rest[first] = False
            keys, key64 = keys.take(rest), key64[rest]
            unseen = self._locate(keys)[0] < 0
            keys, key64 = keys.take(unseen), key64[unseen]

    def _stamp(self, rows: np.ndarray, version: int, now: float) -> None:
        self.row_version[rows] = version
        self.row_time[rows] = now
        self.last_version = version

    def evict(self, rows: np.ndarray, version: int) -> None:
        """Free rows, remember their ids for delta readers, reuse the memory for new ids."""
        if not rows.size:
            return
        self.deletions.append((version, self.keys_of(rows)))
        self.retained_deletions += rows.size
        while self.retained_deletions > MAX_RETAINED_DELETIONS and len(self.deletions) > 1:
            dropped_version, dropped = self.deletions.popleft()
            self.retained_deletions -= len(dropped)
            self.floor = max(self.floor, dropped_version)
        if self.spec.key_type == "str":
            self.arena_garbage += int(self.row_key_len[rows].sum())
        self.index.remove(rows)
        self.free_rows = np.concatenate([self.free_rows, rows])
        self.evicted += rows.size
        self.last_version = version
        if self.spec.key_type == "str" and self.arena_garbage > max(1 << 20, self.arena_used // 2):
            self._compact_arena()

    def _compact_arena(self) -> None:
        live = self.alive_rows()
        packed = self.keys_of(live)
        self.arena = packed.blob.copy()
        self.row_key_start[live] = packed.offsets[:-1]
        self.arena_used = packed.blob.size
        self.arena_garbage = 0

    def alive_rows(self) -> np.ndarray:
        return np.flatnonzero(self.row_slot[: self.size] >= 0)

    def expire(self, version: int) -> int:
        """Evict rows whose last update is older than ttl (event time); returns how many."""
        if self.spec.ttl is None:
            return 0
        self.last_sweep = self.clock
        cutoff = self.clock - self.spec.ttl
        used = slice(0, self.size)
        dead = np.flatnonzero((self.row_slot[used] >= 0) & (self.row_time[used] < cutoff))
        self.evict(dead, version)
        return int(dead.size)

    # ---- operations ---------------------------------------------------------------------------

    def pull(self, keys: Keys) -> tuple[np.ndarray, np.ndarray]:
        """(values, found): the table's default (zeros) where an id has no row yet."""
        rows = self.lookup(keys)
        found = rows >= 0
        out = self.gather(np.where(found, rows, 0))
        if not found.all():
            out[~found] = 0.0
        return out, found

    def _check_matrix(self, keys: Keys, matrix: np.ndarray, what: str) -> None:
        if matrix.shape != (len(keys), self.spec.width):
            raise ValueError(f"{what} must have shape ({len(keys)}, {self.spec.width}), got {matrix.shape}")

    def validate_push(self, keys: Keys, grads: np.ndarray) -> None:
        self._check(keys)
        self._check_matrix(keys, grads, "gradients")

    def push(self, keys: Keys, grads: np.ndarray, version: int, now: float) -> int:
        """Apply gradients (repeated ids summed) to admitted ids; count sightings of the others.
        Returns how many distinct rows were updated."""
        rows, key64 = self._locate(keys)
        self.clock = max(self.clock, now)
        missing = np.flatnonzero(rows < 0)
        if missing.size and self.sketch is not None:
            admitted = self.sketch.add(key64[missing]) >= self.spec.min_count
            self.rejected += int(np.count_nonzero(~admitted))
            missing = missing[admitted]
        if missing.size:
            new_keys = keys.take(missing)
            self._create(new_keys, key64[missing], version, now)
            rows[missing] = self.lookup(new_keys)
        valid = rows >= 0
        if not valid.all():
            rows, grads = rows[valid], grads[valid]
        rows, grads = sum_duplicates(rows, grads, self._scratch)
        self.optimizer.apply(self.block, rows, grads)
        self._stamp(rows, version, now)
        if self.spec.ttl is not None and self.clock - self.last_sweep >= self.spec.ttl / 8:
            self.expire(version)
        return int(rows.size)

    def assign(self, keys: Keys, values: np.ndarray, version: int, now: float) -> None:
        """Replace values (bulk loads, refits), bypassing optimiser and admission; state is kept."""
        self._check(keys)
        self._check_matrix(keys, values, "values")
        rows, key64 = self._locate(keys)
        self.clock = max(self.clock, now)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            new_keys = keys.take(missing)
            self._create(new_keys, key64[missing], version, now)
            rows[missing] = self.lookup(new_keys)
        self.values[rows] = values
        self._stamp(rows, version, now)

    def changed_rows(self, since: int) -> tuple[np.ndarray, bool]:
        """(rows changed after `since`, reset): reset means a full snapshot (reader too old)."""
        if since < self.floor or since <= 0:
            return self.alive_rows(), True
        if since >= self.last_version:
            return np.empty(0, np.int64), False
        used = slice(0, self.size)
        return np.flatnonzero((self.row_version[used] > since) & (self.row_slot[used] >= 0)), False

    def deleted_since(self, since: int) -> Keys:
        parts = [keys for version, keys in self.deletions if version > since]
        return Keys.concat(parts, self.spec.key_type)

    def read_rows(self, rows: np.ndarray) -> tuple[Keys, np.ndarray]:
        """Ids and values of the rows still alive among `rows` (some may have been evicted since)."""
        rows = rows[self.row_slot[rows] >= 0]
        return self.keys_of(rows), self.gather(rows)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Values of rows, contiguous. Taking whole block rows then slicing is faster than fancy
        indexing the strided `values` view (and `take` on that view would copy the whole table)."""
        return np.ascontiguousarray(self.block.take(rows, axis=0)[:, : self.spec.width])

    def info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "rows": self.live_rows,
            "admitted": self.admitted,
            "evicted": self.evicted,
            "rejected": self.rejected,
            "version": self.last_version,
            "spec": self.spec.to_dict(),
        }

    # ---- checkpoint support -------------------------------------------------------------------

    def export(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A consistent copy of everything needed to rebuild the table (caller holds the lock)."""
        used = slice(0, self.size)
        arrays = {
            "values": self.values[used].copy(),
            "row_key": self.row_key[used].copy(),
            "row_version": self.row_version[used].copy(),
            "row_time": self.row_time[used].copy(),
            "alive": self.row_slot[used] >= 0,
            "free_rows": self.free_rows.copy(),
        }
        if self.state is not None:
            arrays["state"] = self.state[used].copy()
        if self.sketch is not None:
            arrays["sketch"] = self.sketch.counts.copy()
        if self.spec.key_type == "str":
            arrays["row_key_start"] = self.row_key_start[used].copy()
            arrays["row_key_len"] = self.row_key_len[used].copy()
            arrays["arena"] = self.arena[: self.arena_used].copy()
        header = {
            "spec": self.spec.to_dict(),
            "size": self.size,
            "admitted": self.admitted,
            "evicted": self.evicted,
            "rejected": self.rejected,
            "last_version": self.last_version,
            "clock": self.clock,
            "last_sweep": self.last_sweep,
            "arena_garbage": getattr(self, "arena_garbage", 0),
        }
        return header, arrays

    @staticmethod
    def restore(header: dict[str, Any], arrays: dict[str, np.ndarray], start_version: int) -> Table:
        """Rebuild from `export` output. Readers older than `start_version` get a full snapshot."""
        table = Table(TableSpec.from_dict(header["spec"]), start_version)
        size = table.size = int(header["size"])
        for name in ("values", "state", "row_key", "row_version", "row_time", "row_key_start", "row_key_len"):
            if name in arrays:
                getattr(table, name)[:size] = arrays[name]
        table.free_rows = arrays["free_rows"].astype(np.int64)
        if "sketch" in arrays:
            table.sketch = CountMinSketch(table.spec.admission_width, counts=arrays["sketch"].copy())
        if "arena" in arrays:
            table.arena = arrays["arena"].copy()
            table.arena_used = table.arena.size
            table.arena_garbage = int(header["arena_garbage"])
        table.row_slot[:size] = -1
        table.index.rebuild(np.flatnonzero(arrays["alive"]))
        table.admitted, table.evicted, table.rejected = header["admitted"], header["evicted"], header["rejected"]
        table.last_version = int(header["last_version"])
        table.clock, table.last_sweep = float(header["clock"]), float(header["last_sweep"])
        return table

    def matches(self, spec: TableSpec) -> bool:
        """Whether an idempotent create_table with `spec` matches this table (max_rows may differ)."""
        return replace(spec, max_rows=self.spec.max_rows) == self.spec
