"""Open-addressing hash index from 64-bit keys to row numbers, vectorised over whole batches.

Why not a dict: a Python dict of 1M keys costs ~100 bytes per entry and a Python call per lookup.
Here the index is one int32 slot array (about 12-16 bytes per live key at our load factors); the
key of each row lives beside the row (`row_key`), so a probe compares `row_key[slot]` with the
wanted key. Lookups and inserts probe linearly in one compiled pass over the batch
(`kernels.find_keys`, `kernels.place_keys`).

The caller may pass `same(batch_positions, rows)` to confirm a 64-bit match exactly (string ids
compare their bytes), which is what makes string keys collisionless.

A key's home slot is mix64(home ^ salt), the salt drawn from the OS for each index and kept in
memory only (slots are rebuilt from the rows on load, never stored). Unsalted, mix64 being an
invertible function, anyone who can choose ids could compute thousands that share a home: every
probe then walked the whole cluster (80,000 chosen integer ids took a push 4.9 s and stalled the
shard's other clients behind the store lock, against 0.05 s for as many random ids). The home
value is the key itself for integer ids. For string ids it is a hash of the id's bytes under a
secret of the table (`homes` / `homes_of`): their public 64-bit hash can be inverted too, and ids
made to share it shared a home whatever the salt (400 such ids took one push 5 s).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import numpy as np

from streamrec.param_server.kernels import find_keys, kernel_input, place_keys
from streamrec.param_server.keys import mix64
from streamrec.param_server.memory import reserve

EMPTY = -1
TOMBSTONE = -2  # a deleted slot: probing continues past it, inserts may reuse it
MIN_CAPACITY = 1024
MAX_LOAD = 0.5  # live + tombstones; above it the index is rebuilt
SameFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
HomesFn = Callable[[np.ndarray], np.ndarray]  # rows -> the home values of their ids


def _empty_slots(capacity: int) -> np.ndarray:
    slots = reserve((capacity,), np.int32)  # huge pages where possible: probes are random
    slots.fill(EMPTY)
    return slots


class KeyIndex:
    """Slots hold row numbers; `row_key[row]` and `row_slot[row]` are shared with the row store."""

    def __init__(self, row_key: np.ndarray, row_slot: np.ndarray, capacity: int = MIN_CAPACITY,
                 homes_of: HomesFn | None = None):
        """`homes_of`: the home values of stored rows, for rebuilds; None: the row's key is its home.
        A method of the table that owns the index, held weakly: a strong one made a cycle, and a
        dropped table's memory waited for the garbage collector."""
        self.row_key = row_key
        self.row_slot = row_slot
        self._homes_of = None if homes_of is None else weakref.WeakMethod(homes_of)
        self.slots = _empty_slots(capacity)
        self.salt = np.uint64(int.from_bytes(os.urandom(8), "little"))
        self.live = 0
        self.tombstones = 0

    @property
    def capacity(self) -> int:
        return int(self.slots.size)

    def _home(self, homes: np.ndarray) -> np.ndarray:
        return (mix64(homes ^ self.salt, in_place=True) & np.uint64(self.capacity - 1)).astype(np.int64)

    def find(self, keys: np.ndarray, same: SameFn | None = None, homes: np.ndarray | None = None) -> np.ndarray:
        """Row of each key, -1 where absent. `same` (optional) confirms each 64-bit match exactly;
        without it, the first row with the same 64-bit key is the answer. `homes`: where each
        key's probe starts (None: the key itself)."""
        keys = kernel_input(keys, np.uint64)
        homes = keys if homes is None else kernel_input(homes, np.uint64)
        if same is None:  # every lookup: one compiled probe per key
            out = np.empty(keys.size, np.int64)
            find_keys(self.slots, self.row_key, keys, homes, self.salt, out)
            return out
        # a string id whose 64-bit match was another id (a true collision): exact, in rounds
        pos = self._home(homes)
        mask = self.capacity - 1
        out = np.full(keys.size, -1, np.int64)
        pending, wanted = np.arange(keys.size), keys
        while pending.size:
            seen = self.slots[pos]
            hit = (seen >= 0) & (self.row_key.take(np.maximum(seen, 0)) == wanted)
            if same is not None and hit.any():
                where = np.flatnonzero(hit)
                hit[where] = same(pending[where], seen[where])
            out[pending[hit]] = seen[hit]
            go_on = ~hit & (seen != EMPTY)
            pending, wanted = pending[go_on], wanted[go_on]
            pos = (pos[go_on] + 1) & mask
        return out

    def insert(self, homes: np.ndarray, rows: np.ndarray, row_count: int) -> None:
        """Add rows whose keys are absent and distinct (their row_slot must be -1), each at the home
        of its `homes` value (the key, or the secret hash `homes_of` gives). Grows first if the
        load would pass MAX_LOAD; `row_count` bounds the rows in use, for that rebuild."""
        if self.live + self.tombstones + homes.size > MAX_LOAD * self.capacity:
            self.rebuild(np.flatnonzero(self.row_slot[:row_count] >= 0), extra=homes.size)
        self._place(homes, rows)
        self.live += homes.size

    def _place(self, homes: np.ndarray, rows: np.ndarray) -> None:
        """Claim a free slot for every row (compiled linear probing)."""
        self.tombstones -= place_keys(self.slots, self.row_slot, kernel_input(homes, np.uint64), self.salt,
                                      kernel_input(rows, np.int64))

    def remove(self, rows: np.ndarray) -> None:
        self.slots[self.row_slot[rows]] = TOMBSTONE
        self.row_slot[rows] = -1
        self.live -= rows.size
        self.tombstones += rows.size

    def rebuild(self, live_rows: np.ndarray, extra: int = 0) -> None:
        """Re-insert every live row into a fresh slot array sized for ~3x the live keys (load <= 0.375),
        so rebuilds happen once per doubling of the table; this is the one pause that grows with size."""
        wanted = max(MIN_CAPACITY, 3 * (live_rows.size + extra))
        self.slots = _empty_slots(1 << (wanted - 1).bit_length())
        self.tombstones = 0
        self.live = int(live_rows.size)
        homes_of = None if self._homes_of is None else self._homes_of()
        self._place(self.row_key[live_rows] if homes_of is None else homes_of(live_rows), live_rows)

    @property
    def nbytes(self) -> int:
        return int(self.slots.nbytes)
