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
from collections.abc import Sequence

import numpy as np
import redis

from streamrec.trainer.online.feature_store import encode_id

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
    """Event ids produced through the HTTP API, in the feature store's Redis."""

    def __init__(self, client: redis.Redis, prefix: str, retention_s: int, pending_ms: int) -> None:
        self.redis, self.prefix = client, prefix
        self.retention_s, self.pending_ms = retention_s, pending_ms
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, prefix: str, retention_s: int, pending_ms: int, timeout_s: float) -> EventIdLedger:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, prefix, retention_s, pending_ms)

    def key(self, event_id: str) -> str:
        return f"{self.prefix}:eid:{encode_id(event_id)}"

    def reserve(self, event_ids: Sequence[str], token: str) -> np.ndarray:
        """`IdState` code per id (ids distinct); raises redis.RedisError when Redis fails."""
        if not event_ids:
            return np.zeros(0, np.int8)
        codes = self._reserve(keys=[self.key(e) for e in event_ids], args=[token, self.pending_ms])
        return np.asarray(codes, np.int8)

    def confirm(self, event_ids: Sequence[str]) -> None:
        """The broker acknowledged these: remember them as produced for `retention_s`."""
        if not event_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.set(self.key(event_id), DONE, ex=self.retention_s)
        pipe.execute()

    def release(self, event_ids: Sequence[str], token: str) -> None:
        """Drop this request's reservations (its produce failed): a retry may produce them now."""
        if event_ids:
            self._release(keys=[self.key(e) for e in event_ids], args=[token])
