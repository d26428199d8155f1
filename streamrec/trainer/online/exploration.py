"""Cold-start statistics (issue 17): exploration's and the context slices'. Per item, when it was
first seen, how often serving showed it and how often a shown item was clicked. Serving's Thompson sampling draws each
fresh item's click-through rate from the Beta posterior these counts give
(`streamrec.serving.explore`). Per context slice (daypart, device), the decayed popularity serving
ranks a new user's list by (`streamrec.trainer.online.context_slices`).

An item is **fresh** while it was first seen less than `max_age_s` of event time ago (default
48 h) or shown fewer than `min_impressions` times (default 100). First seen is the event time of
its first event, or the trainer's clock when the content tower gave it a row before any event
(`seed`). Age is measured in event time, against the newest event time counted (`clock`), so a
replayed log explores as live traffic would.

Redis layout (prefix `sr`, the feature store's; the `{x}` hash tag keeps every key on one Cluster
slot, so one script updates them atomically on a Redis or a Redis Cluster; the script names a
slice's sorted set itself, from the declared prefix and the slice name, on that same slot):

| key | type | content |
|---|---|---|
| `sr:{x}:shown` | hash | item -> impressions counted |
| `sr:{x}:clicks` | hash | item -> clicks counted (an event carrying an answer's `request_id` whose impression showed the item to the event's user) |
| `sr:{x}:credited` | sorted set | `<len(request id)>:<request id><item>` -> clock when credited: each (answer, item) is credited one click at most; the newest `max_credited` kept |
| `sr:{x}:first` | hash | item -> first-seen event time |
| `sr:{x}:fresh` | sorted set | item -> first-seen time: exploration's candidates, the newest `max_fresh` kept; items leave when no longer fresh |
| `sr:{x}:marks` | hash | "topic/partition" -> the next offset counted |
| `sr:{x}:clock` | string | the newest event time counted |
| `sr:{x}:slices` | set | the context slices' names (`streamrec.trainer.online.context_slices`), at most `max_slices` |
| `sr:{x}:slice:<name>` | sorted set | item -> decayed popularity in the slice, the `slice_items` most popular kept |
| `sr:{x}:slice_landmark` | string | the event time the slice weights are relative to |
| `sr:{x}:slice_events` / `sr:{x}:slice_mass` | hash | slice -> events counted / sum of their decayed weights |
| `sr:{x}:slice_merit` | hash | `<kind>:events|hits|reference_hits`: the prequential merit of each kind of slice |

Exactly once. Each count covers a contiguous range of one partition of the events or the
impressions topic and names the offset it starts at; the script applies it only when that is the
partition's mark (a partition's first count may start anywhere: retention may have removed the
topic's beginning), and moves the mark past the range in the same atomic call. A reader that died
between its read and its write reads from the mark again; a reader whose range does not start at
the mark (another reader counted it) is told the mark and seeks there. A Redis that lost its data
loses the counts with it; counting goes on from where the reader stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import redis
from redis.commands.core import Script

from streamrec.trainer.online.context_slices import Merit, SliceConfig, SliceCounts, SliceTops
from streamrec.trainer.online.feature_store import RENORMALISE_AFTER_HALF_LIVES, connect_on_first_use

log = logging.getLogger(__name__)
TAG = "{x}"
NO_CLOCK = -1e300  # a count that does not move the clock (impressions carry serving's time, not event time)
_COUNT = """
-- a counter edited by hand into a non-integer made HINCRBY fail mid-script, after earlier writes
-- (a script is not rolled back): the range was retried for ever and its first counts applied
-- again at every retry. Such a field restarts from this increment, as the reader takes it for 0.
local function incr(key, field, by)
  local done = redis.pcall('HINCRBY', key, field, by)
  if type(done) == 'table' and done.err then
    redis.call('HSET', key, field, by)
    return tonumber(by)
  end
  return done
end
local function incrfloat(key, field, by)
  local done = redis.pcall('HINCRBYFLOAT', key, field, by)
  if type(done) == 'table' and done.err then redis.call('HSET', key, field, string.format('%.17g', by)) end
end
-- likewise a key of another type (written by hand, or by another program under this prefix)
-- failed the script half-way: every declared key is checked before the first write, and one that
-- holds another type is deleted; a number that does not read as one counts as absent
local KEY_TYPES = {'hash', 'hash', 'hash', 'zset', 'hash', 'string', 'set', 'string', 'hash', 'hash', 'hash', 'zset'}
for i, want in ipairs(KEY_TYPES) do
  local have = redis.call('TYPE', KEYS[i]).ok
  if have ~= 'none' and have ~= want then redis.call('DEL', KEYS[i]) end
end
local function number(value, absent)  -- a Redis nil arrives as false
  local n = value and tonumber(value) or nil
  if n == nil or n ~= n then return absent end
  return n
end
local function zincr(key, by, member)  -- a slice key of another type restarts as a sorted set
  local done = redis.pcall('ZINCRBY', key, by, member)
  if type(done) == 'table' and done.err then
    redis.call('DEL', key)
    redis.call('ZINCRBY', key, by, member)
  end
end
local shown_key, clicks_key, first_key, fresh_key, marks_key, clock_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mark = redis.call('HGET', marks_key, ARGV[1])
if ARGV[2] ~= '' and mark and mark ~= ARGV[2] then return mark end
local clock = number(redis.call('GET', clock_key), -1e300)
local now = tonumber(ARGV[4])
if now > clock then
  clock = now
  redis.call('SET', clock_key, ARGV[4])
end
local max_age, min_shown, max_fresh, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local slice_prefix = ARGV[9]
local base = 9
for i = 1, n do
  local item = ARGV[base + i]
  local shows, seen = tonumber(ARGV[base + n + i]), ARGV[base + 2 * n + i]
  local first
  if seen ~= '' then
    local known = redis.call('HGET', first_key, item)
    if not known or tonumber(seen) < number(known, math.huge) then
      redis.call('HSET', first_key, item, seen)
      if not known or redis.call('ZSCORE', fresh_key, item) then redis.call('ZADD', fresh_key, seen, item) end
      first = tonumber(seen)
    end
  end
  if shows > 0 then
    local total = incr(shown_key, item, shows)
    first = first or number(redis.call('HGET', first_key, item), -1e300)
    if total >= min_shown and clock - first >= max_age then redis.call('ZREM', fresh_key, item) end
  end
end
local size = redis.call('ZCARD', fresh_key)
if size > max_fresh then redis.call('ZREMRANGEBYRANK', fresh_key, 0, size - max_fresh - 1) end
-- context slices: per (slice, item) events and decayed weights relative to a hint time
local slices_key, landmark_key, events_key, mass_key, merit_key = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local at = base + 3 * n + 1
local s, first = tonumber(ARGV[at]), at + 4
if s > 0 then
  local hint, half_life, max_slices, keep = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  redis.call('SETNX', landmark_key, ARGV[at + 1])
  -- the hint is the count's newest time, so its weights are at most 1 each; as in the feature
  -- store's popularity, 2^x overflows from x = 1,024, so a landmark RENORMALISE_AFTER half-lives behind moves up
  -- to the hint and every slice's weights and mass are scaled down by what they decayed meanwhile
  local landmark = number(redis.call('GET', landmark_key), nil)
  if landmark == nil then
    redis.call('SET', landmark_key, ARGV[at + 1])
    landmark = hint
  end
  if (hint - landmark) / half_life > RENORMALISE_AFTER then
    local decayed = math.pow(2, (landmark - hint) / half_life)
    for _, name in ipairs(redis.call('SMEMBERS', slices_key)) do
      local scaled = redis.pcall('ZUNIONSTORE', slice_prefix .. name, 1, slice_prefix .. name, 'WEIGHTS',
                                 string.format('%.17g', decayed))
      if type(scaled) == 'table' and scaled.err then redis.call('DEL', slice_prefix .. name) end
      local mass = number(redis.call('HGET', mass_key, name), 0)
      redis.call('HSET', mass_key, name, string.format('%.17g', mass * decayed))
    end
    redis.call('SET', landmark_key, ARGV[at + 1])
    landmark = hint
  end
  local shift = math.pow(2, (hint - landmark) / half_life)
  local touched, order = {}, {}
  for j = 1, s do
    local name, item = ARGV[first + j], ARGV[first + s + j]
    local events, weight = tonumber(ARGV[first + 2 * s + j]), tonumber(ARGV[first + 3 * s + j]) * shift
    if name ~= 'all' and redis.call('SISMEMBER', slices_key, name) == 0 then
      if redis.call('SCARD', slices_key) >= max_slices then name = string.match(name, '^[^=]*') .. '=other' end
    end
    redis.call('SADD', slices_key, name)
    zincr(slice_prefix .. name, weight, item)
    incr(events_key, name, events)
    incrfloat(mass_key, name, weight)
    if not touched[name] then touched[name] = true; order[#order + 1] = name end
  end
  for _, name in ipairs(order) do
    local count = redis.call('ZCARD', slice_prefix .. name)
    if count > keep then redis.call('ZREMRANGEBYRANK', slice_prefix .. name, 0, count - keep - 1) end
  end
end
at = first + 4 * s
local r = tonumber(ARGV[at + 1])
for j = 1, r do
  local kind = ARGV[at + 1 + j]
  incr(merit_key, kind .. ':events', ARGV[at + 1 + r + j])
  incr(merit_key, kind .. ':hits', ARGV[at + 1 + 2 * r + j])
  incr(merit_key, kind .. ':reference_hits', ARGV[at + 1 + 3 * r + j])
end
-- clicks credited per (request, item): one each, the oldest credits (by the clock) forgotten first
local credited_key = KEYS[12]
at = at + 2 + 4 * r
local m, max_credited, credited = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), 0
for j = 1, m do
  if redis.call('ZADD', credited_key, 'NX', clock, ARGV[at + 1 + j]) == 1 then
    incr(clicks_key, ARGV[at + 1 + m + j], 1)
    credited = credited + 1
  end
end
local remembered = redis.call('ZCARD', credited_key)
if remembered > max_credited then redis.call('ZREMRANGEBYRANK', credited_key, 0, remembered - max_credited - 1) end
if ARGV[1] ~= '' then redis.call('HSET', marks_key, ARGV[1], ARGV[3]) end
return {'ok', credited}
""".replace("RENORMALISE_AFTER", repr(RENORMALISE_AFTER_HALF_LIVES))


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
    # (answer, item) pairs remembered as credited, so a repeated click (a producer retry, a second
    # POST) is not credited again; twice the follower's join window of 200,000 answers
    max_credited: int = 400_000


@dataclass(frozen=True)
class ExplorationKeys:
    prefix: str = "sr"

    def key(self, name: str) -> str:
        return f"{self.prefix}:{TAG}:{name}"

    @property
    def all(self) -> list[str]:
        return [self.key(name) for name in ("shown", "clicks", "first", "fresh", "marks", "clock", "slices",
                                            "slice_landmark", "slice_events", "slice_mass", "slice_merit",
                                            "credited")]

    def slice(self, name: str) -> str:
        """The sorted set of one context slice (item -> decayed popularity)."""
        return self.key(f"slice:{name}")


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
    def __init__(self, connect: Callable[[], redis.Redis | redis.RedisCluster], prefix: str = "sr",
                 config: ExplorationConfig | None = None, slices: SliceConfig | None = None) -> None:
        """`connect` makes the client on first use: a Redis Cluster client connects as it is built,
        so a serving worker (its context slices and exploration pool) or `content-tower fit --every`
        that built it at start died while the cluster was unreachable, instead of degrading."""
        self._connect, self._client = connect, None
        self.keys, self.config = ExplorationKeys(prefix), config or ExplorationConfig()
        self.slice_config = slices or SliceConfig()
        self._count_script: Script | None = None

    @classmethod
    def from_url(cls, url: str, prefix: str = "sr", cluster: bool = False, timeout_s: float = 2.0,
                 config: ExplorationConfig | None = None, slices: SliceConfig | None = None) -> ExplorationStore:
        kind = redis.RedisCluster if cluster else redis.Redis
        return cls(lambda: kind.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s), prefix,
                   config, slices)

    @property
    def redis(self) -> redis.Redis | redis.RedisCluster:
        """The client, made on first use; a cluster that cannot be reached raises redis.ConnectionError
        (what every caller handles: redis-py's RedisClusterException is no RedisError), and is asked
        again at the next use."""
        if self._client is None:
            self._client = connect_on_first_use(self._connect)
        return self._client

    @property
    def _count(self) -> Script:
        if self._count_script is None:
            self._count_script = self.redis.register_script(_COUNT)
        return self._count_script

    def marks(self) -> dict[str, int]:
        """The next offset counted, per partition key ("topic/partition")."""
        return {key.decode(): int(value) for key, value in self.redis.hgetall(self.keys.key("marks")).items()}

    def clock(self) -> float:
        """The newest event time counted (NO_CLOCK before any)."""
        value = self.redis.get(self.keys.key("clock"))
        return float(value) if value is not None else NO_CLOCK

    def count(self, items: np.ndarray, shown: np.ndarray, first_seen: np.ndarray,
              clock: float, partition: str = "", start: int = 0, end: int = 0,
              slices: SliceCounts | None = None, credits: Sequence[tuple[str, str]] = ()) -> int:
        """Add `shown` impressions per distinct item; lower each item's first-seen
        time to `first_seen` (event time; NaN: no sighting) where it is earlier; advance the clock;
        add `slices` to the context slices; credit one click to the item of each (request id, item)
        of `credits` not credited before (a click repeated, in this range or another, counts once).
        With a `partition`, the range [start, end) of it: applied only when `start` is its mark
        (else MarkMoved, nothing written), and the mark moves to `end`. Returns the clicks credited."""
        c, sc = self.config, self.slice_config
        seen = [repr(t) if np.isfinite(t) else "" for t in np.asarray(first_seen, np.float64).tolist()]
        # never past the wall clock: one event dated up to a day ahead (the schema's allowance for
        # skewed clients) aged every fresh item by that much, and the next impression dropped it
        clock = min(clock, time.time()) if np.isfinite(clock) else NO_CLOCK
        sliced: list[object] = [0, "0", repr(sc.half_life_s), sc.max_slices, sc.slice_items, 0]
        if slices is not None:
            sliced = [len(slices), repr(slices.hint), repr(sc.half_life_s), sc.max_slices, sc.slice_items,
                      *slices.names.tolist(), *slices.items.tolist(), *slices.events.tolist(),
                      *[repr(w) for w in slices.weights.tolist()], len(slices.merit_kinds),
                      *slices.merit_kinds.tolist(), *slices.merit_events.tolist(), *slices.merit_hits.tolist(),
                      *slices.merit_reference_hits.tolist()]
        pairs = list(dict.fromkeys(credits))
        reply = self._count(keys=self.keys.all, args=[
            partition, str(start) if partition else "", str(end), repr(float(clock)), repr(c.max_age_s),
            c.min_impressions, c.max_fresh, len(items), self.keys.slice(""), *items.tolist(),
            *np.asarray(shown, np.int64).tolist(), *seen, *sliced,
            len(pairs), c.max_credited, *[f"{len(request)}:{request}{item}" for request, item in pairs],
            *[item for _, item in pairs]])
        if not isinstance(reply, list):
            raise MarkMoved(partition, start, int(reply))
        return int(reply[1])

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
        shown = _counters(shown_raw, names, "shown")
        clicks = np.clip(_counters(clicks_raw, names, "clicks"), 0, shown)
        now = float(clock) if clock is not None else float(first.max())
        keep = (now - first < self.config.max_age_s) | (shown < self.config.min_impressions)
        return FreshItems(ids[keep], shown[keep], clicks[keep], first[keep], now)

    def slice_tops(self, limit: int) -> SliceTops:
        """Every context slice's `limit` most popular items with its totals and each kind's merit,
        in two round trips."""
        pipe = self.redis.pipeline(transaction=False)
        for name in ("slices", "slice_events", "slice_mass", "slice_merit"):
            (pipe.smembers if name == "slices" else pipe.hgetall)(self.keys.key(name))
        pipe.get(self.keys.key("clock"))
        names_raw, events_raw, mass_raw, merit_raw, clock = pipe.execute()
        names = sorted(name.decode() for name in names_raw)
        if not names:
            return SliceTops.empty()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zrevrange(self.keys.slice(name), 0, limit - 1, withscores=True)
        lists = {name: (np.array([member.decode(errors="surrogateescape") for member, _ in ranked], object),
                        np.array([score for _, score in ranked], np.float64))
                 for name, ranked in zip(names, pipe.execute())}
        merit_fields = {key.decode(): int(value) for key, value in merit_raw.items()}
        kinds = {field.rsplit(":", 1)[0] for field in merit_fields}
        merit = {kind: Merit(merit_fields.get(f"{kind}:events", 0), merit_fields.get(f"{kind}:hits", 0),
                             merit_fields.get(f"{kind}:reference_hits", 0)) for kind in kinds}
        return SliceTops(lists, {key.decode(): int(value) for key, value in events_raw.items()},
                         {key.decode(): float(value) for key, value in mass_raw.items()}, merit,
                         float(clock) if clock is not None else float("-inf"))


def _counters(raw: list[bytes | None], names: list[bytes], kind: str) -> np.ndarray:
    """Counters as read from Redis, never negative; a missing one is 0. One that is not an integer
    (written by hand: the script only increments) is read as 0 and logged, so serving's draws,
    which need counts >= 0, never see it and one bad field does not hide the rest of the pool."""
    counts = np.zeros(len(raw), np.int64)
    for n, value in enumerate(raw):
        if value is None:
            continue
        try:
            counts[n] = max(int(value), 0)
        except (ValueError, OverflowError):
            log.warning("exploration counter %s of %r is not an integer (%r): read as 0", kind,
                        names[n].decode(errors="replace"), value[:40])
    return counts
