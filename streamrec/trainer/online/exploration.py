"""Exploration statistics (issue 17, cold start): per item, when it was first seen, how often
serving showed it and how often a shown item was clicked. Serving's Thompson sampling draws each
fresh item's click-through rate from the Beta posterior these counts give
(`streamrec.serving.explore`).

An item is **fresh** while it was first seen less than `max_age_s` of event time ago (default
48 h) or shown fewer than `min_impressions` times (default 100). First seen is the event time of
its first event, or the trainer's clock when the content tower gave it a row before any event
(`seed`). Age is measured in event time, against the newest event time counted (`clock`), so a
replayed log explores as live traffic would.

Redis layout (prefix `sr`, the feature store's; the `{x}` hash tag keeps every key on one Cluster
slot, so one script updates them atomically on a Redis or a Redis Cluster):

| key | type | content |
|---|---|---|
| `sr:{x}:shown` | hash | item -> impressions counted |
| `sr:{x}:clicks` | hash | item -> clicks counted (an event carrying an answer's `request_id` whose impression showed the item) |
| `sr:{x}:first` | hash | item -> first-seen event time |
| `sr:{x}:fresh` | sorted set | item -> first-seen time: exploration's candidates, the newest `max_fresh` kept; items leave when no longer fresh |
| `sr:{x}:marks` | hash | "topic/partition" -> the next offset counted |
| `sr:{x}:clock` | string | the newest event time counted |

Exactly once. Each count covers a contiguous range of one partition of the events or the
impressions topic and names the offset it starts at; the script applies it only when that is the
partition's mark (a partition's first count may start anywhere: retention may have removed the
topic's beginning), and moves the mark past the range in the same atomic call. A reader that died
between its read and its write reads from the mark again; a reader whose range does not start at
the mark (another reader counted it) is told the mark and seeks there. A Redis that lost its data
loses the counts with it; counting goes on from where the reader stands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

TAG = "{x}"
NO_CLOCK = -1e300  # a count that does not move the clock (impressions carry serving's time, not event time)
_COUNT = """
local shown_key, clicks_key, first_key, fresh_key, marks_key, clock_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mark = redis.call('HGET', marks_key, ARGV[1])
if ARGV[2] ~= '' and mark and mark ~= ARGV[2] then return mark end
local clock = tonumber(redis.call('GET', clock_key) or '-1e300')
local now = tonumber(ARGV[4])
if now > clock then
  clock = now
  redis.call('SET', clock_key, ARGV[4])
end
local max_age, min_shown, max_fresh, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local base = 8
for i = 1, n do
  local item = ARGV[base + i]
  local shows, clicks, seen = tonumber(ARGV[base + n + i]), tonumber(ARGV[base + 2 * n + i]), ARGV[base + 3 * n + i]
  local first
  if seen ~= '' then
    local known = redis.call('HGET', first_key, item)
    if not known or tonumber(seen) < tonumber(known) then
      redis.call('HSET', first_key, item, seen)
      if not known or redis.call('ZSCORE', fresh_key, item) then redis.call('ZADD', fresh_key, seen, item) end
      first = tonumber(seen)
    end
  end
  if clicks > 0 then redis.call('HINCRBY', clicks_key, item, clicks) end
  if shows > 0 then
    local total = redis.call('HINCRBY', shown_key, item, shows)
    first = first or tonumber(redis.call('HGET', first_key, item) or '-1e300')
    if total >= min_shown and clock - first >= max_age then redis.call('ZREM', fresh_key, item) end
  end
end
local size = redis.call('ZCARD', fresh_key)
if size > max_fresh then redis.call('ZREMRANGEBYRANK', fresh_key, 0, size - max_fresh - 1) end
if ARGV[1] ~= '' then redis.call('HSET', marks_key, ARGV[1], ARGV[3]) end
return 'ok'
"""


class MarkMoved(RuntimeError):
    """A count did not start at its partition's mark: nothing was written; read from `mark`."""

    def __init__(self, partition: str, expected: int, mark: int) -> None:
        super().__init__(f"{partition}: the count starts at offset {expected}, the store's mark is {mark}")
        self.partition, self.mark = partition, mark


@dataclass(frozen=True)
class ExplorationConfig:
    max_age_s: float = 48 * 3600.0  # event time since first seen during which an item is fresh
    min_impressions: int = 100  # an item shown fewer times is fresh whatever its age
    max_fresh: int = 100_000  # candidates kept in `fresh`; the oldest first seen leave first


@dataclass(frozen=True)
class ExplorationKeys:
    prefix: str = "sr"

    def key(self, name: str) -> str:
        return f"{self.prefix}:{TAG}:{name}"

    @property
    def all(self) -> list[str]:
        return [self.key(name) for name in ("shown", "clicks", "first", "fresh", "marks", "clock")]


@dataclass(frozen=True)
class FreshItems:
    """What serving draws from: fresh items (newest first seen first) with their counts."""

    ids: np.ndarray  # object
    shown: np.ndarray  # int64
    clicks: np.ndarray  # int64
    first_seen: np.ndarray  # float64 event time
    clock: float

    @classmethod
    def empty(cls) -> FreshItems:
        return cls(np.empty(0, object), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), float("-inf"))

    def __len__(self) -> int:
        return len(self.ids)


class ExplorationStore:
    def __init__(self, client: redis.Redis | redis.RedisCluster, prefix: str = "sr",
                 config: ExplorationConfig | None = None) -> None:
        self.redis, self.keys, self.config = client, ExplorationKeys(prefix), config or ExplorationConfig()
        self._count = client.register_script(_COUNT)

    @classmethod
    def from_url(cls, url: str, prefix: str = "sr", cluster: bool = False, timeout_s: float = 2.0,
                 config: ExplorationConfig | None = None) -> ExplorationStore:
        kind = redis.RedisCluster if cluster else redis.Redis
        return cls(kind.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s), prefix, config)

    def marks(self) -> dict[str, int]:
        """The next offset counted, per partition key ("topic/partition")."""
        return {key.decode(): int(value) for key, value in self.redis.hgetall(self.keys.key("marks")).items()}

    def clock(self) -> float:
        """The newest event time counted (NO_CLOCK before any)."""
        value = self.redis.get(self.keys.key("clock"))
        return float(value) if value is not None else NO_CLOCK

    def count(self, items: np.ndarray, shown: np.ndarray, clicks: np.ndarray, first_seen: np.ndarray,
              clock: float, partition: str = "", start: int = 0, end: int = 0) -> None:
        """Add `shown` impressions and `clicks` per distinct item; lower each item's first-seen
        time to `first_seen` (event time; NaN: no sighting) where it is earlier; advance the clock. With a
        `partition`, the range [start, end) of it: applied only when `start` is its mark (else
        MarkMoved, nothing written), and the mark moves to `end`."""
        c = self.config
        seen = [repr(t) if np.isfinite(t) else "" for t in np.asarray(first_seen, np.float64).tolist()]
        clock = clock if np.isfinite(clock) else NO_CLOCK
        reply = self._count(keys=self.keys.all, args=[
            partition, str(start) if partition else "", str(end), repr(float(clock)), repr(c.max_age_s),
            c.min_impressions, c.max_fresh, len(items), *items.tolist(), *np.asarray(shown, np.int64).tolist(),
            *np.asarray(clicks, np.int64).tolist(), *seen])
        if reply != b"ok":
            raise MarkMoved(partition, start, int(reply))

    def fresh(self, limit: int) -> FreshItems:
        """The `limit` newest fresh candidates with their counts, in one round trip. An item no
        longer fresh by the rule is left out here too (it leaves the sorted set when next shown)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrange(self.keys.key("fresh"), 0, limit - 1, withscores=True)
        pipe.get(self.keys.key("clock"))
        ranked, clock = pipe.execute()
        if not ranked:
            return FreshItems.empty()
        ids = np.array([member.decode(errors="surrogateescape") for member, _ in ranked], object)
        first = np.array([score for _, score in ranked])
        pipe = self.redis.pipeline(transaction=False)
        names = [member for member, _ in ranked]
        pipe.hmget(self.keys.key("shown"), names)
        pipe.hmget(self.keys.key("clicks"), names)
        shown_raw, clicks_raw = pipe.execute()
        shown = np.array([int(v) if v is not None else 0 for v in shown_raw], np.int64)
        clicks = np.minimum(np.array([int(v) if v is not None else 0 for v in clicks_raw], np.int64), shown)
        now = float(clock) if clock is not None else float(first.max())
        keep = (now - first < self.config.max_age_s) | (shown < self.config.min_impressions)
        return FreshItems(ids[keep], shown[keep], clicks[keep], first[keep], now)
