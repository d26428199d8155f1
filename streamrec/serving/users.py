"""A bounded per-worker cache of user rows, filled on demand from the parameter server.

Serving used to mirror the whole user table in every worker, twice (double buffering), so each
worker's memory grew with the user id space (issue 16's soak: 475 MB -> 1.6 GB for 2 workers at 1M
users). Requests only ever read the row of the user they answer for, so a worker keeps the
`user_cache_size` most recently requested users instead: a miss pulls that one row (one round trip)
and evicts the least recently used entry. About `4 * (dim + scalars)` bytes of values per entry plus
~200 bytes of key and LRU bookkeeping: 100k users at dim 64 are ~45 MB.

The first poll streams the whole table and keeps the first `user_cache_size` users, so a table
that fits (the serving bench's 10k users) is served like the full mirror, without a round trip per
first request of a user (on the event loop, a cold cache raised the bench's p99 from ~15 to 72 ms).
Freshness is the poll's, as with the full mirror: each poll streams the user table's delta (in
chunks, so a reset never holds the whole table) and updates only the users that are cached; every
other changed row is dropped. A user who is active now is fresher than that (`user_pull_on_events`):
a request passes what the feature store says of the user, their count of events and the log
position (partition and offset) of their newest event, and when the count has grown since the row
was last pulled, the row is pulled again (read-your-writes), so the session's row is the one the
trainer has pushed by then, not one a poll up to `poll_interval` old. A pull also returns the
watermarks of the pushes its row has learned (read on the server with the row): the trainer
writes a batch's features while it learns the batch, so the count can run ahead of the pushed row,
and until the watermark of the user's partition passes their newest event, a request pulls again
(at most every `user_pull_interval_s`, for at most `user_pull_lag_s` after the count grew: a
stopped trainer then costs no more pulls, and the poll carries the row when it comes). The first
request of a user the poll brought in only notes the count (one pulled without a count, before the
store knew any event of theirs, is pulled again at their first counted event). A user without new
events costs nothing more.
Users the server has no row for are cached as absent too (a cold-start user asks on every
request), and the delta brings their row in at the first poll after the trainer creates it (or a
pull, when they are active). A pull racing a delta can leave an older value in place; the next delta carries the
newer one, so nothing is staler than one poll.

The parameter server down or slow: pulls time out after `user_pull_timeout_s` and are not tried
again for `user_pull_retry_s`, as Redis is treated (a request on the event loop must not hang).
Cached users are served from their last rows; an uncached user is answered as a cold start and the
request is marked degraded ("param_server"). So is an uncached user while the refit version read
here is gone (two refits within one poll interval); the worker then polls at once, at most every
`EARLY_POLL_MIN_S` (streamrec.serving.sync), and follows the alias to the version that replaced it
(an early poll that finds no other alias is not repeated before the next regular one).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from streamrec.param_server.client import DeltaChunk, ParamClient, ParamServerError
from streamrec.param_server.table_alias import logical_name
from streamrec.serving.config import ServingConfig
from streamrec.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)
MISSING_TABLE = "KeyError"  # the server's error kind for a table it does not have (yet)


class UserLookup(NamedTuple):
    row: np.ndarray | None  # the user's (dim + scalars) values; None: no row, a cold start
    reachable: bool  # False: not cached and the parameter server did not answer


class UserCache:
    """At most `capacity` users' rows, least recently used evicted first. Thread-safe: requests run
    on the event loop and in the thread pool, deltas arrive on the sync thread."""

    def __init__(self, config: ServingConfig, metrics: ServingMetrics, table: str | None = None,
                 version_gone: threading.Event | None = None) -> None:
        """`table`: the user table read, when not the configured one (the version a refit's alias names);
        `version_gone`: the event set when that version is gone (the worker's sync shares one)."""
        self.table, self.capacity = table or config.user_table, config.user_cache_size
        self.timeout, self.retry_s = config.user_pull_timeout_s, config.user_pull_retry_s
        self.dim = 0
        self._slots: OrderedDict[str, int] = OrderedDict()  # user -> row of _values, oldest first
        # allocated once per row width; untouched pages cost no memory and slots are used in order
        self._values = np.empty((0, 0), np.float32)
        self._found = np.zeros(0, bool)
        # the feature store's count of the user's events at the last pull (-1: brought in by the poll)
        self._events = np.zeros(0, np.int64)
        self._grew_at = np.zeros(0)  # monotonic time at which that count last grew
        self._pulled_at = np.zeros(0)  # monotonic time of the last pull
        # the partition of the user's newest event at the last pull (None: not known, a polled row)
        # and the watermark of that partition the pulled row had learned
        self._learned_in: list[str | None] = []
        self._learned_to = np.zeros(0, np.int64)
        self._lock = threading.Lock()  # guards the entries; never held across a round trip
        self._client_lock = threading.Lock()  # one pull at a time on the client's connections
        self._client = ParamClient(config.param_servers, token=config.param_server_token,
                                   timeout=config.user_pull_timeout_s, retries=0)
        self._down_until = 0.0  # monotonic time before which no pull is tried
        self._pulls = {o: metrics.user_pulls.labels(o) for o in ("found", "absent", "failed")}
        self.pull_on_events = config.user_pull_on_events
        # set when the version of a refit's user table read here is gone: a newer alias replaced it
        self.version_gone = version_gone or threading.Event()
        self.interval_s, self.lag_s = config.user_pull_interval_s, config.user_pull_lag_s

    def __len__(self) -> int:
        return len(self._slots)

    def ids(self) -> list[str]:
        """The cached users, least recently used first."""
        with self._lock:
            return list(self._slots)

    def cached_with_row(self, user_id: str) -> bool:
        """Whether the cache holds a row for the user (no pull, no recency update)."""
        with self._lock:
            slot = self._slots.get(user_id)
            return slot is not None and bool(self._found[slot])

    def get(self, user_id: str, events: int | None = None, position: tuple[str, int] | None = None) -> UserLookup:
        """The user's row from the cache, else pulled from the parameter server. `events`: the
        feature store's count of the user's events now, `position`: the log position of their
        newest event (None: not known); a cached user whose row lags them is pulled again
        (`user_pull_on_events`), and keeps the cached row when that pull fails."""
        with self._lock:
            slot = self._slots.get(user_id)
            if slot is not None:
                self._slots.move_to_end(user_id)
                cached = UserLookup(self._values[slot].copy() if self._found[slot] else None, True)
                if events is None or not self.pull_on_events:
                    return cached
                known, now = self._events[slot], time.monotonic()
                if known < 0:  # the poll brought the user in: its row is as fresh as the poll
                    self._events[slot] = events
                    return cached
                if events > known:  # new events: pull now
                    grew_at = now
                elif (not self._behind(slot, position) or now - self._grew_at[slot] >= self.lag_s
                      or now - self._pulled_at[slot] < self.interval_s):
                    return cached
                else:  # the row has not learned the newest event yet: pull again
                    grew_at = float(self._grew_at[slot])
            else:
                cached, grew_at = None, time.monotonic()
        # pulled without a count: 0, not the poll's -1, so the user's first counted event pulls again
        pulled = self._pull(user_id, 0 if events is None else events, grew_at,
                            None if position is None else position[0])
        return cached if cached is not None and not pulled.reachable else pulled

    def _behind(self, slot: int, position: tuple[str, int] | None) -> bool:
        """Whether the slot's row may lack the event at `position` (None: not known, so not waited
        for). Caller holds the lock."""
        if position is None:
            return False
        partition, offset = position
        return self._learned_in[slot] != partition or self._learned_to[slot] <= offset

    def _pull(self, user_id: str, events: int, grew_at: float, partition: str | None) -> UserLookup:
        if time.monotonic() < self._down_until or not self._client_lock.acquire(timeout=self.timeout):
            self._pulls["failed"].inc()
            return UserLookup(None, False)
        try:
            rows = self._client.pull(self.table, [user_id], learned=True)
        except ParamServerError as exc:
            if exc.kind == MISSING_TABLE and logical_name(self.table) == self.table:  # no user has a row yet
                return UserLookup(None, True)
            # a refit's version dropped before this worker's next poll switched away from it (two
            # refits within one poll interval): the users are not known to have no row, so the
            # request is served degraded, not as a cold start
            if exc.kind == MISSING_TABLE:
                self._pulls["failed"].inc()
                self.version_gone.set()  # the sync polls now, not at its interval (a minute by default)
                return UserLookup(None, False)
            return self._failed(exc)
        except OSError as exc:
            return self._failed(exc)
        finally:
            self._client_lock.release()
        found = bool(rows.found[0])
        self._pulls["found" if found else "absent"].inc()
        with self._lock:
            self._fit(rows.values.shape[1], rows.dim)
            learned_to = -1 if partition is None or rows.learned is None else rows.learned.get(partition, 0)
            self._store(user_id, rows.values[0], found, events, grew_at, partition, learned_to)
        return UserLookup(rows.values[0] if found else None, True)

    def _failed(self, exc: Exception) -> UserLookup:
        self._down_until = time.monotonic() + self.retry_s
        self._client.close()  # reconnect on the next try
        self._pulls["failed"].inc()
        log.warning("user pull failed, serving cached users only for %.1f s: %s", self.retry_s, exc)
        return UserLookup(None, False)

    def _fit(self, width: int, dim: int) -> None:
        """Rows of another shape (the table was recreated): start over. Caller holds the lock."""
        if self._values.shape[1] == width and self.dim == dim and len(self._values):
            return
        self._slots.clear()
        self._values = np.empty((self.capacity, width), np.float32)
        self._found = np.zeros(self.capacity, bool)
        self._events = np.full(self.capacity, -1, np.int64)
        self._grew_at = np.zeros(self.capacity)
        self._pulled_at = np.zeros(self.capacity)
        self._learned_in = [None] * self.capacity
        self._learned_to = np.full(self.capacity, -1, np.int64)
        self.dim = dim

    def _store(self, user_id: str, values: np.ndarray, found: bool, events: int, grew_at: float,
               partition: str | None, learned_to: int) -> None:
        """Insert or overwrite one entry, evicting the least recently used when full. Caller holds the lock."""
        slot = self._slots.get(user_id)
        if slot is None:
            # slots are only ever freed by this eviction, so while not full the next one is len()
            slot = self._slots.popitem(last=False)[1] if len(self._slots) >= self.capacity else len(self._slots)
            self._slots[user_id] = slot
        else:
            self._slots.move_to_end(user_id)
        self._values[slot] = values
        self._found[slot] = found
        self._events[slot] = events
        self._grew_at[slot] = grew_at
        self._pulled_at[slot] = time.monotonic()
        self._learned_in[slot] = None if partition is None else sys.intern(partition)  # a few distinct keys
        self._learned_to[slot] = learned_to

    def follow(self, chunks: Iterable[DeltaChunk], shard_of: Callable[[list[str]], np.ndarray],
               fill: bool = False) -> tuple[int, ...]:
        """Apply a streamed delta to the cached users only; returns each shard's version (the next
        `since`). A shard that reset sent a full snapshot: its cached users are absent unless in it.
        With `fill`, users not cached join while there is room (the first poll streams the whole
        table: a table that fits is then served like a full mirror, with no pull per new user)."""
        versions: dict[int, int] = {}
        for chunk in chunks:
            with self._lock:
                first = chunk.shard not in versions
                versions[chunk.shard] = chunk.version
                if first and chunk.reset and self._slots:
                    users, slots = list(self._slots), np.fromiter(self._slots.values(), np.int64, len(self._slots))
                    self._found[slots[shard_of(users) == chunk.shard]] = False
                if first and len(chunk.deleted) and self._slots:
                    self._found[self._cached(chunk.deleted.to_list())[1]] = False
                if not len(chunk.ids) or not (self._slots or fill):
                    continue
                width = chunk.values.shape[1]
                if width != self._values.shape[1] or chunk.dim != self.dim or not len(self._values):
                    self._fit(width, chunk.dim)  # a recreated table drops every entry
                users = chunk.ids.to_list()
                positions, slots = self._cached(users)
                self._values[slots] = chunk.values[positions]
                self._found[slots] = True
                if fill:
                    self._add(users, chunk.values)
        return tuple(versions[shard] for shard in sorted(versions))

    def _add(self, users: list[str], values: np.ndarray) -> None:
        """Users not cached join while there is room, none evicted. Caller holds the lock."""
        start = len(self._slots)
        new = [p for p, user in enumerate(users) if user not in self._slots][: self.capacity - start]
        for slot, position in enumerate(new, start):
            self._slots[users[position]] = slot
        self._values[start : start + len(new)] = values[new]
        self._found[start : start + len(new)] = True
        self._events[start : start + len(new)] = -1
        self._learned_in[start : start + len(new)] = [None] * len(new)

    def _cached(self, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `users`, slots) of the users that are cached. Caller holds the lock."""
        slots = np.fromiter((self._slots.get(user, -1) for user in users), np.int64, len(users))
        positions = np.flatnonzero(slots >= 0)
        return positions, slots[positions]

    def close(self) -> None:
        self._client.close()
