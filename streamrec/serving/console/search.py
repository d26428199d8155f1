"""Id-prefix search over the users and items a serving worker holds.

The item ids are sorted once per state (a new object on every swap) and then searched by bisection,
so each keystroke of the page's pickers costs O(log n) instead of a scan of every id; the sort runs
lazily, only for a state somebody searches in (states are swapped on every poll that brings changes).
Users are the worker's cached users (streamrec.serving.users), which change with every request: they
are scanned (~10 ms for 100k), a cost only the console's picker pays.
"""

from __future__ import annotations

import threading

import numpy as np

from streamrec.param_server.replica import TableMirror
from streamrec.serving.state import ServingState


class PrefixSearch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sorted: dict[str, tuple[ServingState, np.ndarray]] = {}  # "items" -> (state, sorted ids)

    def _ids(self, state: ServingState, kind: str) -> np.ndarray:
        with self._lock:
            cached = self._sorted.get(kind)
            if cached is not None and cached[0] is state:
                return cached[1]
        table: TableMirror = state.items
        ids = np.sort(np.asarray(table.index, dtype=object)[table.alive[: len(table.index)]])
        with self._lock:
            self._sorted[kind] = (state, ids)
        return ids

    def find(self, state: ServingState, kind: str, prefix: str, limit: int) -> tuple[list[str], int]:
        """(up to `limit` live ids of `kind` starting with `prefix` in lexical order, how many live ids there are)."""
        if kind == "users":
            cached = state.users.ids()
            return sorted(user for user in cached if user.startswith(prefix))[:limit], len(cached)
        ids = self._ids(state, kind)
        start = int(np.searchsorted(ids, prefix, side="left"))
        window = ids[start : start + limit].tolist()
        return [i for i in window if i.startswith(prefix)], len(ids)
