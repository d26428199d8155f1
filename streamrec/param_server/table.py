"""One named embedding table: collisionless rows created on first (admitted) use, evicted by TTL
and, when the table is at its row bound, least recently updated first (by event time).

Layout (one row per live id):
  block       (rows, W * (1 + state)) float32, W = dim + scalars, split into two views:
    values    the vector, then the scalar side values (biases)
    state     the Adagrad accumulator (absent for SGD), next to the values so an update gathers and
              scatters one contiguous span per row
  row_key     uint64   the integer id, or the string's 64-bit hash
  row_version int64    last global version that changed the row (delta = rows with version > since)
  row_time    float64  event time of the last update (TTL expiry)
  row_slot    int32    the row's slot in the key index, -1 for a free row
  string ids only: row_key_start int64 / row_key_len int32 into `arena`, the exact key bytes, kept
              as zero-padded 8-byte words (`KeyWords`; row_key_start is a byte offset, a multiple
              of 8), so checking a 64-bit match is a compare of a word or two per id.

Every per-row array is a view of address space reserved up front for `max_rows` rows
(`streamrec.param_server.memory.reserve`): the kernel commits a page only when a row on it is first
written, so growing the table never copies or blocks, and freed rows are reused (free list).

A push or assign is planned first (`prepare_push` / `prepare_assign`: shapes, finite values,
admission and the room it needs, nothing changed) and then applied, so a store can validate every
table of a multi-table push before it changes any: a push is all-or-nothing.
Not thread-safe: the store serialises calls.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from streamrec.param_server.admission import CountMinSketch, Sightings
from streamrec.param_server.defaults import MAX_UPDATE
from streamrec.param_server.kernels import (
    draw_initial,
    gather_rows,
    hash_words,
    kernel_input,
    stored_homes,
    write_new_rows,
)
from streamrec.param_server.keyindex import KeyIndex
from streamrec.param_server.keys import STRING_SEED, Keys, KeyWords, mix64
from streamrec.param_server.memory import COMMITTER, commit_rows, reserve
from streamrec.param_server.optimizers import RowOptimizer
from streamrec.param_server.snapshot import BlockSnapshot
from streamrec.param_server.specs import TableSpec

ROOM_HEADROOM = 100  # making room evicts 1/100 of max_rows beyond the need, so full tables rarely rescan
MAX_RETAINED_DELETIONS = 1 << 20  # evicted ids kept for delta readers; older readers get a reset
COMMIT_AHEAD_BYTES = 32 << 20  # most block memory committed ahead of the rows in use (`Table._ahead`)
MIN_COMMIT_ROWS = 1024


class TableFullError(RuntimeError):
    """One push needs more new rows than the table can hold even after evicting every row it does
    not update; raise max_rows or push smaller batches."""


def initial_values(spec: TableSpec, key64: np.ndarray) -> np.ndarray:
    """Deterministic per id and seed: uniform(-a, a) with std init_std; scalars start at 0.
    A pure function of the spec and the 64-bit key, so a trainer can compute the value a row will
    be created with before the server has created it (`kernels.draw_initial`, which the table's
    own row creation shares)."""
    out = np.empty((key64.size, spec.width), np.float32)
    draw_initial(out, kernel_input(key64, np.uint64), _init_seed(spec), _init_scale(spec), spec.dim)
    return out


def _init_seed(spec: TableSpec) -> np.uint64:
    return mix64(np.array([spec.seed], np.uint64))[0]


def _init_scale(spec: TableSpec) -> float:
    return float(spec.init_std * np.sqrt(3.0))


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


@dataclass(frozen=True)
class PlannedRows:
    """A push or assign checked against the table, before anything changed: the ids' rows (-1:
    none yet), the ids that get a row, the admission sightings to count and the rows to evict."""

    keys: Keys
    matrix: np.ndarray
    rows: np.ndarray
    key64: np.ndarray
    homes: np.ndarray  # where each id's probe starts in the key index (`Table._hashes`)
    words: KeyWords | None  # string ids as words (None for integer ids)
    create: np.ndarray  # positions in keys
    sightings: Sightings | None
    rejected: int  # ids without a row that admission keeps out
    evict: int


class Table:
    def __init__(self, spec: TableSpec, start_version: int = 0):
        self.spec = spec
        self.optimizer = RowOptimizer(spec.optimizer, spec.dim, spec.scalars)
        self._init_seed, self._init_scale = _init_seed(spec), _init_scale(spec)
        self._no_grads = np.empty((0, spec.width), np.float32)  # `_write_new` without an update
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
            self.arena = np.zeros(1 << 13, np.uint64)  # key words; used and garbage count words
            self.arena_used = 0
            self.arena_garbage = 0
        self.size = 0  # rows ever handed out (high-water mark); live rows = index.live
        self.committed_rows = 0  # rows whose memory is committed or being committed (`_commit_ahead`)
        self._commit_step = max(1, COMMIT_AHEAD_BYTES // self.block.strides[0])
        self.free_rows = np.empty(0, np.int64)
        self._secret = np.uint64(int.from_bytes(os.urandom(8), "little"))  # string ids' homes (`_hashes`)
        self.index = KeyIndex(self.row_key, self.row_slot,
                              homes_of=self._stored_homes if spec.key_type == "str" else None)
        self.sketch = CountMinSketch(spec.admission_width) if spec.min_count > 1 else None
        self.admitted = self.evicted = self.rejected = 0  # evicted: by TTL
        self.evicted_for_room = 0  # least recently updated rows evicted at max_rows
        self.snapshot: BlockSnapshot | None = None  # a checkpoint reading the block right now
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

    def _find(self, key64: np.ndarray, homes: np.ndarray, words: KeyWords | None) -> np.ndarray:
        """Row of each id, -1 where absent. String ids: the index finds the first row with the same
        64-bit hash, probing from the id's secret home, then one vectorised compare of the ids'
        words confirms it; ids whose match is another id (a true 64-bit collision: by chance
        practically never, but ids can be made to collide on purpose) probe on with the exact
        compare in every step. That exactness is what makes string keys collisionless, and the
        secret homes keep ids made to collide from piling up in one probe run."""
        rows = self.index.find(key64, homes=homes)
        if words is None:
            return rows
        hits = np.flatnonzero(rows >= 0)
        wrong = hits[~self._same(words, hits, rows[hits])]
        if wrong.size:
            rows[wrong] = self.index.find(key64[wrong], lambda pos, found: self._same(words, wrong[pos], found),
                                          homes[wrong])
        return rows

    def _same(self, words: KeyWords, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return words.equal(positions, self.arena, self.row_key_start[rows] >> 3, self.row_key_len[rows].astype(np.int64))

    def _hashes(self, words: KeyWords) -> tuple[np.ndarray, np.ndarray]:
        """String ids' public 64-bit hash (`KeyWords.hash64`) and their homes, a hash of the same
        bytes under this table's secret, in one compiled pass (`kernels.hash_words`)."""
        key64, homes = np.empty(len(words), np.uint64), np.empty(len(words), np.uint64)
        hash_words(kernel_input(words.words, np.uint64), kernel_input(words.starts, np.int64),
                   kernel_input(words.counts, np.int64), kernel_input(words.lengths, np.int64), STRING_SEED,
                   self._secret, key64, homes)
        return key64, homes

    def _stored_homes(self, rows: np.ndarray) -> np.ndarray:
        """The homes of stored rows' ids, for the key index's rebuilds (read from the arena in place)."""
        homes = np.empty(rows.size, np.uint64)
        stored_homes(self.arena, self.row_key_start, self.row_key_len, kernel_input(rows, np.int64), self._secret, homes)
        return homes

    def _locate(self, keys: Keys) -> tuple[np.ndarray, np.ndarray, np.ndarray, KeyWords | None]:
        """(row per key or -1, the keys' 64-bit form, their homes, string ids' words)."""
        self._check(keys)
        if self.spec.key_type == "int":
            key64, words = keys.ints.view(np.uint64), None
            homes = key64
        else:
            words = keys.words()
            key64, homes = self._hashes(words)
        return self._find(key64, homes, words), key64, homes, words

    def lookup(self, keys: Keys) -> np.ndarray:
        return self._locate(keys)[0]

    def keys_of(self, rows: np.ndarray) -> Keys:
        if self.spec.key_type == "int":
            return Keys(ints=self.row_key[rows].view(np.int64))
        return Keys.from_spans(self.arena.view(np.uint8), self.row_key_start[rows], self.row_key_len[rows])

    def _stored_words(self, rows: np.ndarray) -> KeyWords:
        """The stored ids of rows as compact words."""
        lengths = self.row_key_len[rows].astype(np.int64)
        counts = (lengths + 7) >> 3
        return KeyWords(self.arena, self.row_key_start[rows] >> 3, counts, lengths).take(np.arange(rows.size))

    # ---- row lifecycle ------------------------------------------------------------------------

    def _allocate(self, count: int) -> np.ndarray:
        if count > self.free_rows.size + self.spec.max_rows - self.size:
            raise TableFullError(f"table {self.spec.name!r} is full ({self.spec.max_rows} rows)")
        reused = self.free_rows[-count:] if count else self.free_rows[:0]
        self.free_rows = self.free_rows[: self.free_rows.size - reused.size]
        fresh = np.arange(self.size, self.size + count - reused.size, dtype=np.int64)
        self.size += fresh.size
        if self.size + self._ahead() // 2 > self.committed_rows:
            self._commit_ahead()
        return np.concatenate([reused, fresh])

    def _ahead(self) -> int:
        """Rows to commit ahead: as many as are in use (at least MIN_COMMIT_ROWS, at most
        COMMIT_AHEAD_BYTES of block), so a small table never holds much memory it does not use
        (a client creating many tables cannot multiply it) and a large one grows in big steps."""
        return min(self._commit_step, max(MIN_COMMIT_ROWS, self.size))

    def _commit_ahead(self, wait: bool = False) -> None:
        """Have the memory of the next `_ahead()` rows past the high-water mark committed on the
        background thread (`memory.COMMITTER`), half a step before the rows are reached, so new
        rows are written to committed pages instead of faulting page by page under the GIL;
        `wait`: commit here and now."""
        start = max(self.committed_rows, self.size)
        stop = min(self.spec.max_rows, self.size + self._ahead())
        if wait:
            for array in self._row_arrays():
                commit_rows(array, start, stop)
        else:
            COMMITTER.submit(self._row_arrays(), start, stop)
        self.committed_rows = stop

    def _row_arrays(self) -> list[np.ndarray]:
        """Every array with one entry per row (all reserved for max_rows)."""
        arrays = [self.block, self.row_key, self.row_version, self.row_time, self.row_slot, self._scratch]
        if self.spec.key_type == "str":
            arrays += [self.row_key_start, self.row_key_len]
        return arrays

    def _store_key_words(self, rows: np.ndarray, words: KeyWords) -> None:
        """Append compact `words` to the arena (doubling it when full) and point rows at them."""
        need = self.arena_used + words.words.size
        if need > self.arena.size:
            grown = np.zeros(max(need, 2 * self.arena.size), np.uint64)
            grown[: self.arena_used] = self.arena[: self.arena_used]
            self.arena = grown
        self.arena[self.arena_used : need] = words.words
        self.row_key_start[rows] = 8 * (self.arena_used + words.starts)
        self.row_key_len[rows] = words.lengths
        self.arena_used = need

    def initial_values(self, key64: np.ndarray) -> np.ndarray:
        return initial_values(self.spec, key64)

    def _write_new(self, rows: np.ndarray, grads: np.ndarray | None = None) -> None:
        """Write new rows whole: initial values and accumulators, with their first update already
        applied when `grads` is given, so a new row is written once (not written, then gathered and
        written again by the optimiser); one compiled pass (`kernels.write_new_rows`)."""
        self._before_write(rows)
        rows = kernel_input(rows, np.int64)
        grads = self._no_grads if grads is None else kernel_input(grads, np.float32)
        write_new_rows(self.block, rows, self.row_key[rows], self._init_seed, self._init_scale,
                       self.spec.dim, np.float32(self.spec.optimizer.initial_accumulator), grads,
                       self.optimizer.lr, self.optimizer.eps, self.optimizer.adagrad)

    def _create(self, key64: np.ndarray, homes: np.ndarray, words: KeyWords | None, initialise: bool) -> np.ndarray:
        """Give rows to ids not in the table; repeated ids get one row. Returns the row of each id.
        `initialise`: write the rows' initial values now (else the caller writes them, see
        `_write_new`); the caller stamps version and time.

        Distinct ids are picked by their homes (the key for integer ids, a secret hash for string
        ids: ids made to share the public hash do not share it); two different strings with the
        same home are told apart by the exact re-lookup below and get their own rows on the next
        pass. The first pass asks for every distinct id's row at once, so a push that does not fit
        fails in `_allocate` before any row is taken (counting by the public hash, ids made to share
        it looked like one new row: the push was given room for one, then failed halfway, with
        rows taken and the store's version already raised).
        """
        out = np.full(key64.size, -1, np.int64)
        pending = np.arange(key64.size)
        while pending.size:
            _, first = np.unique(homes[pending], return_index=True)
            chosen = pending[np.sort(first)]  # in order: all distinct (common) is every position
            rows = self._allocate(chosen.size)
            new64 = key64[chosen]
            self.row_key[rows] = new64
            if words is not None:
                self._store_key_words(rows, words if chosen.size == len(words) else words.take(chosen))
            self.row_slot[rows] = -1
            self.index.insert(homes[chosen], rows, self.size)
            if initialise:
                self._write_new(rows)
            self.admitted += rows.size
            out[chosen] = rows
            if chosen.size == pending.size:
                break
            rest = np.ones(pending.size, bool)
            rest[first] = False
            pending = pending[rest]
            found = self._find(key64[pending], homes[pending], None if words is None else words.take(pending))
            out[pending] = found
            pending = pending[found < 0]
        return out

    def _before_write(self, rows: np.ndarray) -> None:
        """Every write to `block` goes through here first: a running checkpoint keeps the old bytes."""
        if self.snapshot is not None:
            self.snapshot.preserve(rows)

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
            self.arena_garbage += int(((self.row_key_len[rows].astype(np.int64) + 7) >> 3).sum())
        self.index.remove(rows)
        self.free_rows = np.concatenate([self.free_rows, rows])
        self.last_version = version
        if self.spec.key_type == "str" and self.arena_garbage > max(1 << 17, self.arena_used // 2):
            self._compact_arena()

    def _compact_arena(self) -> None:
        """Rewrite the live rows' ids end to end in a fresh arena (evicted ids leave garbage)."""
        live = self.alive_rows()
        packed = self._stored_words(live)
        self.arena = np.zeros(max(1 << 13, 2 * packed.words.size), np.uint64)
        self.arena_used = 0
        self._store_key_words(live, packed)
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
        self.evicted += dead.size
        return int(dead.size)

    def _room_for(self, create: np.ndarray, homes: np.ndarray, rows: np.ndarray) -> int:
        """Rows to evict so that the distinct ids at `create` fit, keeping the rows this push
        updates; a bit more than needed (ROOM_HEADROOM) so the next pushes find room without
        another scan. Distinct ids are only counted (a sort) when the ids might not fit."""
        free = self.spec.max_rows - self.live_rows
        if create.size <= free:
            return 0
        new_rows = np.unique(homes[create]).size  # homes, not the public hash: ids made to share it count apart
        if new_rows <= free:
            return 0
        kept = np.unique(rows[rows >= 0]).size
        if new_rows > self.spec.max_rows - kept:
            raise TableFullError(
                f"table {self.spec.name!r}: one push needs {new_rows} new rows beside the {kept} it updates, "
                f"more than max_rows={self.spec.max_rows}; raise max_rows or push smaller batches"
            )
        return min(self.live_rows - kept, new_rows - free + self.spec.max_rows // ROOM_HEADROOM)

    def _evict_least_recent(self, count: int, keep: np.ndarray, version: int) -> None:
        """Evict the `count` live rows with the oldest event time, except the rows in `keep`."""
        alive = self.alive_rows()
        kept = np.zeros(self.size, bool)
        kept[keep] = True
        candidates = alive[~kept[alive]]
        if count < candidates.size:
            candidates = candidates[np.argpartition(self.row_time[candidates], count - 1)[:count]]
        self.evict(candidates, version)
        self.evicted_for_room += candidates.size

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
        if not np.isfinite(matrix).all():
            raise ValueError(f"{what} for table {self.spec.name!r} contain NaN or infinite values")

    def _prepare(self, keys: Keys, matrix: np.ndarray, what: str, admit: bool, only_new: bool = False) -> PlannedRows:
        self._check(keys)
        # float32, C-ordered, writable before the checks: applying the plan cannot then fail on the
        # matrix's form, and a float64 value that overflows float32 is refused as infinite
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            matrix = kernel_input(matrix, np.float32)
        self._check_matrix(keys, matrix, what)
        rows, key64, homes, words = self._locate(keys)
        if only_new:  # the plan covers only the ids without a row, so the rows that exist are never written
            new = np.flatnonzero(rows < 0)
            if new.size < len(keys):
                keys, matrix, rows, key64, homes = keys.take(new), matrix[new], rows[new], key64[new], homes[new]
                words = None if words is None else words.take(new)
        create = np.flatnonzero(rows < 0)
        sightings, rejected = None, 0
        if admit and create.size and self.sketch is not None:
            sightings = self.sketch.plan(key64[create])
            admitted = sightings.estimates >= self.spec.min_count
            rejected = int(np.count_nonzero(~admitted))
            create = create[admitted]
        evict = self._room_for(create, homes, rows)
        return PlannedRows(keys, matrix, rows, key64, homes, words, create, sightings, rejected, evict)

    def prepare_push(self, keys: Keys, grads: np.ndarray) -> PlannedRows:
        """Check a push (ids, gradient shape, finite values, admission, room) without changing anything."""
        plan = self._prepare(keys, grads, "gradients", admit=True)
        self._check_update_size(plan)
        return plan

    def _check_update_size(self, plan: PlannedRows) -> None:
        """A ValueError when a row's summed update exceeds MAX_UPDATE in some value. The sums are
        bounded from above by summing magnitudes per key hash (colliding ids only add to the
        bound); a push whose largest value times its length stays under it needs no grouping."""
        matrix = plan.matrix
        if not matrix.size or float(np.abs(matrix).max()) * len(matrix) <= MAX_UPDATE:
            return
        _, owner = np.unique(plan.key64, return_inverse=True)
        bound = np.zeros((int(owner.max()) + 1, matrix.shape[1]))
        np.add.at(bound, owner, np.abs(matrix))
        if bound.max() > MAX_UPDATE:
            raise ValueError(f"gradients for table {self.spec.name!r}: a row's update in one push exceeds "
                             f"{MAX_UPDATE:g} in magnitude (repeats of an id add up)")

    def prepare_assign(self, keys: Keys, values: np.ndarray, only_new: bool = False) -> PlannedRows:
        """Check an assign without changing anything. `only_new`: plan rows for the ids that have
        none yet and drop the others (with their values), so applying the plan never overwrites a
        row that exists; the store plans and applies under one lock, which makes that atomic."""
        return self._prepare(keys, values, "values", admit=False, only_new=only_new)

    def _give_rows(self, plan: PlannedRows, version: int, now: float, initialise: bool) -> np.ndarray:
        """Carry out the plan's evictions, sightings and row creations; the row of every id (-1 for
        ids admission keeps out). `initialise`: write the new rows' initial values (see `_create`)."""
        self.clock = max(self.clock, now)
        if plan.evict:
            self._evict_least_recent(plan.evict, plan.rows[plan.rows >= 0], version)
        if plan.sightings is not None:
            self.sketch.commit(plan.sightings)
            self.rejected += plan.rejected
        rows = plan.rows.copy()
        if plan.create.size:
            words = plan.words
            if words is not None and plan.create.size < len(words):  # all new (common): no copy
                words = words.take(plan.create)
            rows[plan.create] = self._create(plan.key64[plan.create], plan.homes[plan.create], words, initialise)
        return rows

    def apply_push(self, plan: PlannedRows, version: int, now: float) -> int:
        """Apply gradients (repeated ids summed) to admitted ids; count sightings of the others.
        Returns how many distinct rows were updated."""
        rows = self._give_rows(plan, version, now, initialise=False)
        grads = plan.matrix
        new = np.zeros(rows.size, bool)
        new[plan.create] = True
        valid = rows >= 0
        if not valid.all():
            rows, grads, new = rows[valid], grads[valid], new[valid]
        distinct, summed = sum_duplicates(rows, grads, self._scratch)
        if plan.create.size and distinct is rows:  # no repeated ids: each new row is written once
            self._write_new(rows[new], grads[new])
            rows, grads = rows[~new], grads[~new]
        else:
            if plan.create.size:  # a new id repeated in this push: initial values, then the summed update
                self._write_new(np.unique(rows[new]))
            rows, grads = distinct, summed
        if rows.size:
            self._before_write(rows)
            self.optimizer.apply(self.block, rows, grads)
        self._stamp(distinct, version, now)
        if self.spec.ttl is not None and self.clock - self.last_sweep >= self.spec.ttl / 8:
            self.expire(version)
        return int(distinct.size)

    def apply_assign(self, plan: PlannedRows, version: int, now: float) -> None:
        """Replace values (bulk loads, refits), bypassing optimiser and admission; state is kept."""
        rows = self._give_rows(plan, version, now, initialise=True)
        self._before_write(rows)
        self.values[rows] = plan.matrix
        self._stamp(rows, version, now)

    def push(self, keys: Keys, grads: np.ndarray, version: int, now: float) -> int:
        """`prepare_push` then `apply_push`, for callers holding one table."""
        return self.apply_push(self.prepare_push(keys, grads), version, now)

    def assign(self, keys: Keys, values: np.ndarray, version: int, now: float) -> None:
        self.apply_assign(self.prepare_assign(keys, values), version, now)

    def adopt(self, keys: Keys, block: np.ndarray, versions: np.ndarray, times: np.ndarray) -> None:
        """Take rows whole from another table of the same spec (resharding moves them between
        shards): values and optimiser state as they were, with their versions and event times, so
        training and TTL expiry go on as if nothing moved. The ids must be new to this table;
        TableFullError past max_rows."""
        rows, key64, homes, words = self._locate(keys)
        if (rows >= 0).any():
            raise ValueError(f"table {self.spec.name!r}: {int((rows >= 0).sum())} adopted ids are already here")
        if block.shape != (len(keys), self.block.shape[1]):
            raise ValueError(f"table {self.spec.name!r}: adopted block is {block.shape}, rows here are {self.block.shape[1]} wide")
        rows = self._create(key64, homes, words, initialise=False)
        if np.unique(rows).size != rows.size:
            raise ValueError(f"table {self.spec.name!r}: some adopted ids come more than once")
        self._before_write(rows)
        self.block[rows] = block
        self.row_version[rows] = versions
        self.row_time[rows] = times
        if versions.size:
            self.last_version = max(self.last_version, int(versions.max()))

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
        """Values of rows, contiguous, copied straight out of the block (`kernels.gather_rows`): no
        whole-block-row temporary, and no fancy indexing of the strided `values` view."""
        out = np.empty((rows.size, self.spec.width), np.float32)
        gather_rows(self.block, kernel_input(rows, np.int64), out)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "rows": self.live_rows,
            "admitted": self.admitted,
            "evicted": self.evicted,
            "evicted_for_room": self.evicted_for_room,
            "rejected": self.rejected,
            "version": self.last_version,
            "spec": self.spec.to_dict(),
        }

    # ---- checkpoint support -------------------------------------------------------------------

    def checkpoint_view(self, lock: threading.Lock) -> tuple[dict[str, Any], dict[str, np.ndarray | BlockSnapshot]]:
        """Header and arrays of the table as it is now (the caller holds `lock`, the store's lock).
        The per-row bookkeeping (~30 bytes a row) is copied now; the block is read later, in chunks,
        by the returned `BlockSnapshot`, which this table keeps consistent until `end_checkpoint`."""
        used = slice(0, self.size)
        self.snapshot = BlockSnapshot(self.block, self.size, lock)
        arrays: dict[str, np.ndarray | BlockSnapshot] = {
            "block": self.snapshot,
            "row_key": self.row_key[used].copy(),
            "row_version": self.row_version[used].copy(),
            "row_time": self.row_time[used].copy(),
            "alive": self.row_slot[used] >= 0,
            "free_rows": self.free_rows.copy(),
        }
        if self.sketch is not None:
            arrays["sketch"] = self.sketch.counts.copy()
        if self.spec.key_type == "str":
            arrays["row_key_start"] = self.row_key_start[used].copy()
            arrays["row_key_len"] = self.row_key_len[used].copy()
            arrays["arena"] = self.arena[: self.arena_used].view(np.uint8).copy()
        header = {
            "spec": self.spec.to_dict(),
            "size": self.size,
            "admitted": self.admitted,
            "evicted": self.evicted,
            "evicted_for_room": self.evicted_for_room,
            "rejected": self.rejected,
            "last_version": self.last_version,
            "clock": self.clock,
            "last_sweep": self.last_sweep,
            "arena_garbage": getattr(self, "arena_garbage", 0),
        }
        return header, arrays

    def end_checkpoint(self) -> None:
        """The checkpoint has read the block (or gave up): stop keeping pre-images (caller holds the lock)."""
        self.snapshot = None

    @staticmethod
    def restore(header: dict[str, Any], arrays: dict[str, np.ndarray], start_version: int) -> Table:
        """Rebuild from a checkpoint. Readers older than `start_version` get a full snapshot.
        ValueError (or KeyError/TypeError) when the contents do not fit together."""
        spec = TableSpec.from_dict(header["spec"])
        size = int(header["size"])
        if not 0 <= size <= spec.max_rows:
            raise ValueError(f"table {spec.name!r}: {size} rows do not fit max_rows={spec.max_rows}")
        table = Table(spec, start_version)
        table.size = size
        table._commit_ahead(wait=True)  # the copies below then write to committed pages
        expected = {"block": (size, table.block.shape[1])} | {
            name: (size,) for name in ("row_key", "row_version", "row_time", "row_key_start", "row_key_len") if hasattr(table, name)
        }
        for name, shape in expected.items():
            stored, target = arrays[name], getattr(table, name)
            if stored.shape != shape or stored.dtype != target.dtype:
                raise ValueError(f"table {spec.name!r}: {name} is {stored.dtype} {stored.shape}, expected {target.dtype} {shape}")
            target[:size] = stored
        alive, free = arrays["alive"], arrays["free_rows"].astype(np.int64)
        if alive.shape != (size,) or alive.dtype != bool:
            raise ValueError(f"table {spec.name!r}: alive is {alive.dtype} {alive.shape}, expected bool ({size},)")
        if (free.size and (free.min() < 0 or free.max() >= size)) or alive[free].any() or int(alive.sum()) + free.size != size:
            raise ValueError(f"table {spec.name!r}: free rows and live rows do not add up to {size}")
        table.free_rows = free
        if table.sketch is not None:
            if arrays["sketch"].shape != table.sketch.counts.shape:
                raise ValueError(f"table {spec.name!r}: admission sketch has shape {arrays['sketch'].shape}")
            table.sketch = CountMinSketch(spec.admission_width, counts=arrays["sketch"].astype(np.uint32))
        if spec.key_type == "str":
            stored = arrays["arena"].astype(np.uint8)
            live = np.flatnonzero(alive)
            starts, lengths = table.row_key_start[live], table.row_key_len[live].astype(np.int64)
            if live.size and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > stored.size):
                raise ValueError(f"table {spec.name!r}: key bytes point outside the key arena")
            words = Keys.from_spans(stored, starts, lengths).words()
            arena = stored.view(np.uint64) if stored.size % 8 == 0 and not (starts % 8).any() else None
            if arena is not None and words.equal(np.arange(live.size), arena, starts >> 3, lengths).all():
                table.arena = arena.copy()  # this layout (zero-padded words): kept as it was
                table.arena_used = table.arena.size
                table.arena_garbage = int(header["arena_garbage"])
            else:  # an older byte-packed arena: laid out afresh as words
                table._store_key_words(live, words)
        table.row_slot[:size] = -1
        table.index.rebuild(np.flatnonzero(alive))
        table.admitted, table.evicted, table.rejected = int(header["admitted"]), int(header["evicted"]), int(header["rejected"])
        table.evicted_for_room = int(header["evicted_for_room"])
        table.last_version = int(header["last_version"])
        table.clock, table.last_sweep = float(header["clock"]), float(header["last_sweep"])
        return table

    def matches(self, spec: TableSpec) -> bool:
        """Whether an idempotent create_table with `spec` matches this table (max_rows may differ)."""
        return replace(spec, max_rows=self.spec.max_rows) == self.spec
