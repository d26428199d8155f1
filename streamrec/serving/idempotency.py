"""Which event ids POST /events has already put on the topic: a reserve -> produce -> confirm
protocol in Redis, so that a client may re-send a batch (after a timeout or a 503) without its
events being produced twice.

Key: `<feature prefix>:eid:<encoded id>` (ids encoded as in the feature store), value `done` for
`retention_s` after the broker acknowledged the event, or the reserving request's token for
`pending_ms` while it is being produced. Per request:

1. `reserve` (one Lua call for the whole batch): each id is reserved (`SET NX PX`), or found
   `done` (a duplicate: acknowledged, not produced again), or found pending under another token
   (another request is producing it right now).
2. The caller produces the reserved events and waits for the broker's acknowledgement.
3. `confirm` marks them `done` (acknowledged ids only), or `release` deletes the reservations of
   a failed produce, so that the retry can produce them at once.

A crash between 2 and 3 leaves a reservation that expires after `pending_ms`; until then the
retry is answered 503 (never acknowledged without being produced), afterwards it produces the
events again. If the first attempt had reached the broker, the topic then holds them twice and the
trainer's own event-id de-duplication (streamrec.trainer.online.dedup) drops the second copy.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamrec.trainer.online.feature_cluster import CLUSTER_BUCKETS
from streamrec.trainer.online.feature_store import bucket_of, connect_on_first_use, encode_id

DONE = b"done"

_RESERVE = """
local out = {}
for n, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[n] = 0
  elseif redis.call('GET', key) == 'done' then
    out[n] = 1
  else
    out[n] = 2
  end
end
return out
"""

_RELEASE = """
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    released = released + redis.call('DEL', key)
  end
end
return released
"""


class IdState(enum.IntEnum):
    """What `reserve` found for one id (the script's codes)."""

    RESERVED = 0  # new: this request produces it
    DONE = 1  # produced and acknowledged within the retention window: a duplicate
    PENDING = 2  # reserved by another request that is producing it now


class EventIdLedger:
    """Event ids produced through the HTTP API, in the feature store's Redis or Redis Cluster.

    On a cluster a script may only touch keys of one slot, so each id's key carries the hash tag of
    its bucket (`bucket_of`, as the feature store's keys) and a request's ids are reserved and
    released one bucket at a time; on one Redis the keys (and so a running ledger) are unchanged."""

    def __init__(self, connect: Callable[[], redis.Redis | redis.RedisCluster], prefix: str, retention_s: int,
                 pending_ms: int, buckets: int = 0) -> None:
        """`connect` makes the client on first use: a cluster client connects as it is built, and a
        worker must start while the cluster is down (its requests then go without the check)."""
        self._connect: Callable[[], redis.Redis | redis.RedisCluster] = connect
        self._client: redis.Redis | redis.RedisCluster | None = None
        self._client_lock = threading.Lock()  # request threads: one client made, none left open
        self.prefix, self.buckets = prefix, buckets
        self.retention_s, self.pending_ms = retention_s, pending_ms

    @classmethod
    def from_url(cls, url: str, prefix: str, retention_s: int, pending_ms: int, timeout_s: float,
                 cluster: bool = False) -> EventIdLedger:
        if cluster:  # one retry, at once: a request answers without the check rather than wait (history.py)
            return cls(lambda: redis.RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                           retry=Retry(NoBackoff(), 1)),
                       prefix, retention_s, pending_ms, CLUSTER_BUCKETS)
        return cls(lambda: redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s),
                   prefix, retention_s, pending_ms)

    def _connected(self) -> redis.Redis | redis.RedisCluster:
        """The client, made on first use; an unreachable cluster raises redis.ConnectionError, and
        is asked again next time. Scripts go as EVAL, not as cached scripts: on a cluster a script
        not yet loaded (a new worker, a master just promoted) is loaded on every master, so one
        master down failed every request, not only those with ids on it."""
        with self._client_lock:
            if self._client is None:
                self._client = connect_on_first_use(self._connect)
            return self._client

    def keys(self, event_ids: Sequence[str]) -> list[str]:
        return self._keys_and_buckets(event_ids)[0]

    def _keys_and_buckets(self, event_ids: Sequence[str]) -> tuple[list[str], np.ndarray | None]:
        """Each id's key, and on a cluster its bucket (the hash tag in the key)."""
        if not self.buckets:
            return [f"{self.prefix}:eid:{encode_id(e)}" for e in event_ids], None
        buckets = bucket_of(list(event_ids), self.buckets)
        return [f"{self.prefix}:eid:{{b{b}}}:{encode_id(e)}" for e, b in zip(event_ids, buckets.tolist())], buckets

    def _by_slot(self, event_ids: Sequence[str]) -> list[tuple[np.ndarray, list[str]]]:
        """(positions, keys) of the ids' groups that one script call may touch: all of them on one
        Redis, one group per bucket (in order of first appearance) on a cluster."""
        keys, buckets = self._keys_and_buckets(event_ids)
        if buckets is None:
            return [(np.arange(len(keys)), keys)]
        codes, _ = pd.factorize(buckets)
        order = np.argsort(codes, kind="stable")
        cuts = np.flatnonzero(np.diff(codes[order])) + 1
        return [(group, [keys[n] for n in group.tolist()]) for group in np.split(order, cuts)]

    def reserve(self, event_ids: Sequence[str], token: str) -> np.ndarray:
        """`IdState` code per id (ids distinct); raises redis.RedisError (or RedisClusterException)
        when Redis fails. On a cluster a failure part-way releases the buckets reserved before it
        (the request is produced unchecked: reservations left would answer its re-send 503)."""
        if not event_ids:
            return np.zeros(0, np.int8)
        client = self._connected()
        codes = np.empty(len(event_ids), np.int8)
        reserved: list[list[str]] = []  # per bucket, the keys this call reserved
        try:
            for positions, keys in self._by_slot(event_ids):
                codes[positions] = client.eval(_RESERVE, len(keys), *keys, token, self.pending_ms)
                reserved.append([key for key, code in zip(keys, codes[positions]) if code == IdState.RESERVED])
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            for keys in filter(None, reserved):
                try:
                    self._release(client, keys, token)
                except redis.TimeoutError:
                    break  # a node that does not answer would cost a timeout each: the rest expire
                except (redis.RedisError, redis.exceptions.RedisClusterException):
                    continue  # a refused connection costs nothing; this bucket's expire after pending_ms
            raise
        return codes

    def confirm(self, event_ids: Sequence[str]) -> None:
        """The broker acknowledged these: remember them as produced for `retention_s`."""
        if not event_ids:
            return
        pipe = self._connected().pipeline(transaction=False)
        for key in self.keys(event_ids):
            pipe.set(key, DONE, ex=self.retention_s)
        pipe.execute()

    def release(self, event_ids: Sequence[str], token: str) -> None:
        """Drop this request's reservations (its produce failed): a retry may produce them now."""
        if not event_ids:
            return
        client = self._connected()
        for _, keys in self._by_slot(event_ids):
            self._release(client, keys, token)

    @staticmethod
    def _release(client: redis.Redis | redis.RedisCluster, keys: list[str], token: str) -> None:
        client.eval(_RELEASE, len(keys), *keys, token)

    def close(self) -> None:
        """Close the client's connections, if it was made; the next use connects again."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
