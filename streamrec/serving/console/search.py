"""Id-prefix search over the users and items a serving worker holds.

Items: the item ids are kept sorted, and each keystroke of the page's item picker costs a bisection
(O(log n)) plus a liveness check per hit in the request's own state. The sorting never happens in a
request: `refresh` runs on the sync thread between polls (a `Syncer` upkeep step). It used to run
lazily in the first search after each swap (a new state on every poll that brings changes) and
stalled the worker: sorting 300k ids took ~450 ms, 1M ~3 s, holding the GIL.
A refresh costs little: the sorted ids cover item tables (`TableMirror.index`, a new object
whenever ids are added, compacted or replaced), so a swap that only changed vectors costs an
identity check, one that appended ids sorts and inserts those only, and only a table that is not an
extension of a covered one (the first, a full snapshot, a compaction) sorts every id again, in
chunks merged by `heapq.merge` so the GIL is released between chunks. Ids that left the table stay
until they outnumber the table's (then a full sort); hits are checked against the request's state.
A search between a swap and the next refresh uses the ids sorted so far (the items added by that
poll appear after the refresh) and says it is incomplete; before the first refresh a scan of the
first FALLBACK_ROWS rows answers, also marked incomplete.
Users are the worker's cached users (streamrec.serving.users), which change with every request: they
are scanned (~10 ms for 100k), a cost only the console's picker pays.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import pandas as pd

from streamrec.param_server.replica import TableMirror
from streamrec.serving.state import ServingState, StateHolder

SORT_CHUNK = 32_768  # ids per sorted() call of a full sort: ~10 ms of GIL each
FALLBACK_ROWS = 50_000  # rows a search scans before the first refresh (~5 ms)
DEAD_SCAN = 10_000  # ids no longer served a search steps over before it answers what it found


@dataclass(frozen=True)
class SortedIds:
    """Item ids in lexical order (an object array), and the item tables' indexes whose every id is in it."""

    ids: np.ndarray
    covers: tuple[pd.Index, ...]  # at most two: the two buffers' tables (streamrec.serving.sync)


@dataclass(frozen=True)
class Matches:
    ids: list[str]  # up to `limit` live ids with the prefix, in lexical order
    total: int  # live items in the state searched
    complete: bool  # False: ids added since the last refresh (or rows past FALLBACK_ROWS) were not searched


def sorted_gently(ids: list[str]) -> list[str]:
    """`ids` sorted, chunk by chunk, the chunks merged in Python (heapq.merge): no single call
    holds the GIL for long, so requests go on while the sync thread sorts 1M ids."""
    runs = [sorted(ids[start : start + SORT_CHUNK]) for start in range(0, len(ids), SORT_CHUNK)]
    return list(heapq.merge(*runs)) if len(runs) > 1 else (runs[0] if runs else [])


def _appended_to(index: pd.Index, covered: pd.Index) -> bool:
    """Whether `index` is `covered` with ids appended (TableMirror adds new ids at the end)."""
    if len(index) < len(covered):
        return False
    head = index.to_numpy(dtype=object)[: len(covered)]
    return bool((head == covered.to_numpy(dtype=object)).all())


def _inserted(ids: np.ndarray, new: list[str]) -> np.ndarray:
    """`ids` with those of `new` it lacks, in order (a bisection per new id, one copy)."""
    fresh = np.asarray(sorted_gently(new), dtype=object)
    at = np.searchsorted(ids, fresh)
    present, inside = np.zeros(len(fresh), bool), at < len(ids)
    present[inside] = ids[at[inside]] == fresh[inside]
    return np.insert(ids, at[~present], fresh[~present])


class PrefixSearch:
    def __init__(self, holder: StateHolder) -> None:
        self.holder = holder
        self._sorted: SortedIds | None = None  # replaced whole by `refresh`; requests read it without a lock
        self.full_sorts = 0  # sorts of every id, the first included (the other refreshes insert only new ids)

    def refresh(self) -> None:
        """Upkeep between polls, on the sync thread (the only writer of the state's tables): bring
        the sorted ids up to the current state's item table."""
        state = self.holder.current
        if state is not None:
            self._sorted = self._covering(state.items.index, self._sorted)

    def _covering(self, index: pd.Index, known: SortedIds | None) -> SortedIds:
        if known is not None and any(index is covered for covered in known.covers):
            return known
        base = None if known is None or len(known.ids) > 2 * len(index) else next(
            (c for c in reversed(known.covers) if _appended_to(index, c)), None)
        if known is None or base is None:
            self.full_sorts += 1
            ids = np.asarray(sorted_gently(index.tolist()), dtype=object)
            return SortedIds(ids, (index,))
        new = index[len(base):].tolist()
        return SortedIds(_inserted(known.ids, new) if new else known.ids, (known.covers[-1], index))

    def items(self, state: ServingState, prefix: str, limit: int) -> Matches:
        """Up to `limit` live item ids of `state` starting with `prefix`, in lexical order."""
        table: TableMirror = state.items
        known = self._sorted
        if known is None:
            return _scanned(state, prefix, limit)
        found, whole = _prefixed(known.ids, prefix, limit, table)
        covered = any(table.index is c for c in known.covers)
        return Matches(found, len(table), whole and covered)

    def users(self, state: ServingState, prefix: str, limit: int) -> tuple[list[str], int]:
        """(up to `limit` cached users starting with `prefix` in lexical order, how many are cached)."""
        cached = state.users.ids()
        return sorted(user for user in cached if user.startswith(prefix))[:limit], len(cached)


def _prefixed(ids: np.ndarray, prefix: str, limit: int, table: TableMirror) -> tuple[list[str], bool]:
    """(up to `limit` ids with `prefix` from the sorted `ids` that are live in `table`, whether the
    search was whole): it stops after DEAD_SCAN ids that are not, so ids that left the table cannot
    make a search long."""
    found: list[str] = []
    start, dead = int(np.searchsorted(ids, prefix, side="left")), 0
    while start < len(ids):
        for item in ids[start : start + limit].tolist():
            if not item.startswith(prefix) or len(found) == limit:
                return found, True
            if table.position(item) >= 0:
                found.append(item)
            else:
                dead += 1
                if dead > DEAD_SCAN:
                    return found, False
        start += limit
    return found, True


def _scanned(state: ServingState, prefix: str, limit: int) -> Matches:
    """Before the first refresh: the live ids with `prefix` among the first FALLBACK_ROWS rows."""
    table = state.items
    rows = np.flatnonzero(table.alive[:FALLBACK_ROWS])
    found = sorted(item for item in state.item_ids[rows].tolist() if item.startswith(prefix))[:limit]
    return Matches(found, len(table), len(table.index) <= FALLBACK_ROWS)
