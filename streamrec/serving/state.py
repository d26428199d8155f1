"""The state a request reads, and the holder that swaps it atomically.

A request takes the current `ServingState` once (`StateHolder.use`) and computes its whole answer
from it, so it never sees a half-applied update or two model versions of the items. (The user's row
comes from the worker's one `UserCache`, read once per request.) The sync thread builds the
next state in a standby buffer, swaps the reference, then waits until no request still uses the
old state before it touches the old buffers again (`wait_unused`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from streamrec.param_server.replica import TableMirror
from streamrec.serving.artifacts import Artifacts
from streamrec.serving.filters import ItemFilter
from streamrec.serving.index import ItemIndex
from streamrec.serving.users import UserCache

MASK_CACHE = 64  # filters whose allowed rows a state keeps
PRIOR_ITEMS = 1000  # cold-start fallback without Redis: the items with the largest learned bias


@dataclass(eq=False)
class ServingState:
    users: UserCache  # one per worker, shared by every state: users change between swaps too
    items: TableMirror
    index: ItemIndex
    artifacts: Artifacts
    version: int  # the parameter server's version (summed over shards) at the last applied change
    loaded_at: float  # wall time this state was swapped in
    item_ids: np.ndarray  # object ids by item row
    prior: np.ndarray  # item rows by decreasing bias (alive only)
    knn_item_row: np.ndarray  # item row -> row of the kNN artifact (-1: none)
    knn_neighbor_row: np.ndarray  # kNN artifact row -> item row (-1: no live vector)
    catalogue_rows: np.ndarray  # catalogue position -> item row (-1: no live vector); empty without a catalogue
    refs: int = 0  # requests using this state; guarded by the holder's lock
    # allowed rows per filter, with the time until which they hold (inf: untimed); bounded
    filter_masks: dict[ItemFilter, tuple[np.ndarray, float]] = field(default_factory=dict)

    def allowed_rows(self, item_filter: ItemFilter, now: float) -> np.ndarray:
        """The rows `item_filter` allows among the live items at `now` (epoch seconds), computed
        once per state and filter (the filters a service sees repeat: its rules, a few categories),
        and again only when a timed filter's mask has passed its `valid_until`; the cache keeps at
        most MASK_CACHE filters, so arbitrary requests cannot grow it."""
        cached = self.filter_masks.get(item_filter)
        if cached is not None and now < cached[1]:
            return cached[0]
        catalogue = self.artifacts.catalogue
        if catalogue is None:
            raise RuntimeError("a filter reached a state without a catalogue: check it first (ItemFilter.check)")
        mask = item_filter.mask(catalogue, self.catalogue_rows, len(self.items.index), now) & self.items.alive
        until = item_filter.valid_until(catalogue, now) if item_filter.timed else math.inf
        if cached is None and len(self.filter_masks) >= MASK_CACHE:
            self.filter_masks.pop(next(iter(self.filter_masks)), None)
        self.filter_masks[item_filter] = (mask, until)
        return mask

    @classmethod
    def build(cls, users: UserCache, items: TableMirror, index: ItemIndex, artifacts: Artifacts,
              version: int) -> ServingState:
        alive = np.flatnonzero(items.alive)
        bias = items.values[alive, items.dim] if items.scalars else np.zeros(len(alive), np.float32)
        top = alive[np.argsort(-bias, kind="stable")[:PRIOR_ITEMS]]
        # the kNN lists mapped onto item rows once per state, so a request does no id lookups for them
        neighbor_row = items.positions(artifacts.knn.ids) if artifacts.knn is not None else np.zeros(0, np.int64)
        item_row = np.full(len(items.index), -1, np.int64)
        known = neighbor_row >= 0
        item_row[neighbor_row[known]] = np.flatnonzero(known)
        # a numpy object array: pandas' string array costs ~10 us per fancy index, a request does several
        item_ids = items.index.to_numpy(dtype=object)
        catalogue = artifacts.catalogue
        catalogue_rows = items.positions(catalogue.ids) if catalogue is not None else np.zeros(0, np.int64)
        return cls(users, items, index, artifacts, version, time.time(), item_ids, top, item_row, neighbor_row,
                   catalogue_rows)


class StateHolder:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._current: ServingState | None = None
        self.confirmed_at = 0.0  # wall time of the last successful poll (the state was current then)
        self.last_error: str | None = None
        # published blobs this worker could not decode, by name: why (the version before stays in use)
        self.refused_artifacts: dict[str, str] = {}
        self.inert_rules: list[str] = []  # configured item rules the catalogue in use cannot apply, with why
        self.user_rows = 0  # rows of the user table at the last poll (the worker caches only some)
        # the parameter server's version (summed over shards) the last successful poll reached, whether
        # or not the item table changed: everything pushed up to it is served (`streamrec simulate` waits on it)
        self.synced_version = 0

    @property
    def current(self) -> ServingState | None:
        return self._current

    def staleness(self) -> float | None:
        """Seconds since the parameter server last confirmed this worker's state; None before any."""
        return None if not self.confirmed_at else max(0.0, time.time() - self.confirmed_at)

    @contextmanager
    def use(self) -> Iterator[ServingState | None]:
        with self._cond:
            state = self._current
            if state is not None:
                state.refs += 1
        try:
            yield state
        finally:
            if state is not None:
                with self._cond:
                    state.refs -= 1
                    if not state.refs:
                        self._cond.notify_all()

    def swap(self, state: ServingState) -> ServingState | None:
        with self._cond:
            old, self._current = self._current, state
        return old

    def wait_unused(self, state: ServingState) -> None:
        with self._cond:
            self._cond.wait_for(lambda: state.refs == 0)
