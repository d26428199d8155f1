"""The Redis feature store: recent history, decayed popularity, sliding-window counts, last-seen.

Everything is written from event time, so replaying a log builds the same state as live traffic,
and one batch is written with ONE round trip: its columns go as a JSON argument to a Lua script
that aggregates them per user, item and window bucket and performs the Redis commands inside the
server (a client-side pipeline of ~10 commands per user capped ingest near 10k events/s here, and
the aggregation runs on the Redis core instead of the trainer's). The client builds each distinct
key once and declares every key the script may touch (KEYS; the JSON says which are each
event's): the script builds no key, so a Redis Cluster routes and checks it like any command.

Exactly once. Events read from Kafka carry their partition key ("topic/partition") and offset.
The script keeps a watermark per partition (the next offset to write) and reads and advances it
in the same atomic execution as the batch's keys: an event below its partition's watermark was
written before and is skipped, so a replayed or partly overlapping batch (trainer crash between
write and commit, rewind, `streamrec features rebuild`) never counts anything twice. Events
without an origin (a file, a benchmark) are written unconditionally, as before. A partition with
no watermark although the topic holds earlier events (the store was wiped: Redis here keeps
nothing on disk) is held back and reported, so that the caller rebuilds it from the topic
(`feature_rebuild`) before writing on: a watermark only moves forward, so earlier events could
not be added after later ones. The same holds for a watermark below the offset the batch was read
from (the trainer names it, `ranges`): a store back with an older state than it acknowledged (an
RDB/AOF restore, a lagging replica promoted) lacks what lies between.

A failed script is not rolled back: one failing half-way kept its first writes, and its retries
counted them again. So the script repairs what a key holds that a command cannot take (a key of
another type is deleted, a counter that is no integer restarts from 0), reports it, and writes the
batch in full; only watermarks it cannot read make it refuse the batch before any write
(`FeatureStoreCorrupt`).

Key schema (`KeySchema`; prefix `sr`, configurable). Ids are encoded by `encode_id`: `%`, `:`,
`{` and `}` become `%25`, `%3A`, `%7B`, `%7D`, so an id can neither end its key early (`:`), nor
move a key to another Cluster slot (`{`, `}`), nor forge another id's encoding (`%`); every other
byte (spaces, newlines, long junk) is binary-safe in a Redis key and stays as it is. Keys written
by versions before this encoding (`sr:u:<id>:...`) are not migrated: they are ignored and expire
after their TTL; rebuild the store from the topic (`streamrec features rebuild`) after upgrading.

| key | type | content |
|---|---|---|
| `sr:{u:<user>}:recent` | list | the user's most recent item ids, newest first, capped (`recent_cap`) |
| `sr:{u:<user>}:seen` | set | every item the user interacted with (the serving seen-filter) |
| `sr:{u:<user>}` / `sr:{i:<item>}` | hash | `last_seen` (event time), `events` (total count); a user's also `session_events`, the events of their current session (a gap of more than `session_gap` seconds of event time starts a new one): the newest that many of `recent` are the session serving adds to the user's row; and `log_partition` / `log_offset`, the log position of their newest event (serving pulls their row again until it has learned that offset) |
| `sr:{u or i:<id>}:w<window>:<bucket>` | string | events of one bucket of a sliding window (windows 300 s in 60 s buckets and 3600 s in 300 s buckets); a window's count is the sum of its buckets up to the clock |
| `sr:{g}:clock` | string | the largest event time written, never past the writer's wall clock (the feature store's "now") |
| `sr:{g}:pop` | sorted set | item -> sum of weight * 2^((t - landmark) / half_life): popularity with exponential time decay (forward decay: ranking needs no rescaling) |
| `sr:{g}:pop:landmark` | string | the landmark time of `sr:{g}:pop` (first event time; moved up, the scores rescaled, once it falls 256 half-lives behind) |
| `sr:{g}:item_events` | hash | item -> exact number of events written (never expires: the chaos suite's count) |
| `sr:{g}:wm` | hash | partition key ("topic/partition") -> its watermark, the next offset to write (never expires) |

(`<user>` and `<item>` are encoded; values - list items, set members, hash fields - are the raw
ids.) User and item keys expire `ttl` seconds (wall clock) after their last write (default 30
days), window buckets after their window has passed.


Redis Cluster. The braces are hash tags: every key of one user hashes to that user's slot, every
key of one item to that item's slot, and the shared keys to the slot of their group tag `{g}`, so
one script per batch runs on one Redis (or one Cluster node holding every slot). On a Redis
Cluster (`FeatureStoreConfig.cluster`, `STREAMREC_REDIS_CLUSTER`) the same script writes the same
keys grouped into buckets instead, each bucket's keys under its own tag `{b<k>}` with its own
watermarks and its own fragment of the shared keys: streamrec.trainer.online.feature_cluster.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeVar

import hiredis
import numpy as np
import orjson
import pandas as pd
import redis
from prometheus_client import Counter

from streamrec.core.config import Settings
from streamrec.param_server.keys import as_keys, mix64
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.roles import EventRoles
from streamrec.trainer.online.session import SESSION_GAP

log = logging.getLogger(__name__)
C = TypeVar("C")  # a Redis client
FEATURE_REPAIRS = Counter("streamrec_trainer_feature_store_repairs_total",
                          "Feature-store keys (or hash fields) that held what the write script cannot use (another "
                          "type, a counter that is no integer): deleted or reset to 0, and the batch written in full")
WINDOWS: dict[int, int] = {300: 60, 3600: 300}  # window seconds -> bucket seconds
EntityKind = Literal["u", "i"]  # user, item
RECENT, SEEN = "recent", "seen"  # suffixes of a user's keys
SHARED_TAG = "g"  # the hash tag of the shared keys (one group: see "Redis Cluster" above)

# The characters that mean something in a key: the separator, Cluster hash-tag braces, and the
# escape character itself (so that the encoding is injective).
_ESCAPES: dict[str, str] = {c: f"%{ord(c):02X}" for c in "%:{}"}
_ESCAPE_TABLE = str.maketrans(_ESCAPES)
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def encode_id(value: str) -> str:
    """An id as it appears inside a key: no id reaches another id's or another kind's key."""
    return value.translate(_ESCAPE_TABLE)


_BUCKET_SALT = np.uint64(0x9E3779B97F4A7C15)


def bucket_of(ids: np.ndarray | list[str], buckets: int) -> np.ndarray:
    """The bucket of each id, int64 in [0, buckets): a 64-bit hash of the id's bytes, the same in
    every process and release (the Cluster layout depends on it), vectorised over the ids."""
    if not len(ids):
        return np.zeros(0, np.int64)
    return (mix64(as_keys(ids).hash64() ^ _BUCKET_SALT, in_place=True) % np.uint64(buckets)).astype(np.int64)


def _window_part(window: int) -> str:
    return f"w{window}"


@dataclass(frozen=True)
class KeySchema:
    """Every key of the store (see the module docstring), the one definition of the layout: the
    write script touches only the keys built here and declared to it (`DeclaredKeys`). With `buckets` (Redis
    Cluster, streamrec.trainer.online.feature_cluster) the hash tag of a user's or item's keys is its
    bucket's, `{b<k>}`, and every bucket holds its own shared keys."""

    prefix: str
    buckets: int = 0  # 0: one Redis (a tag per entity, shared keys under {g}); n: n bucket tags

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"feature-store prefix {self.prefix!r}: braces would break the keys' hash tags")

    def _head(self, kind: EntityKind, bucket: int | None = None) -> str:
        if kind not in ("u", "i"):
            raise ValueError(f"entity kind {kind!r}: expected 'u' (user) or 'i' (item)")
        if self.buckets:
            return f"{self.prefix}:{{b{bucket}}}:{kind}:"
        return f"{self.prefix}:{{{kind}:"

    def entity(self, kind: EntityKind, entity_id: str, *suffix: str) -> str:
        """The hash of a user or item, or (with `suffix`) another key in its slot."""
        if self.buckets:
            head, close = self._head(kind, int(bucket_of([entity_id], self.buckets)[0])), ""
        else:
            head, close = self._head(kind), "}"
        return "".join((head, encode_id(entity_id), close, *(":" + part for part in suffix)))

    def window(self, kind: EntityKind, entity_id: str, window: int, bucket_start: int) -> str:
        return self.entity(kind, entity_id, _window_part(window), str(bucket_start))

    def shared(self, *name: str, bucket: int | None = None) -> str:
        """A shared key: the one under {g}, or with `buckets` the given bucket's fragment of it."""
        if self.buckets and bucket is None:
            raise ValueError("a bucketed store keeps a fragment of each shared key per bucket: name the bucket")
        tag = SHARED_TAG if bucket is None else f"b{bucket}"
        return ":".join((f"{self.prefix}:{{{tag}}}", *name))

    def pattern(self) -> str:
        """SCAN pattern matching every key of this store."""
        return _GLOB_SPECIAL.sub(r"\\\1", self.prefix) + ":*"

    def shared_keys(self, bucket: int | None = None) -> list[str]:
        """The shared keys (or a bucket's fragments of them) in the order the write script
        declares them first: watermarks, clock, popularity landmark, popularity, exact counts."""
        return [self.shared(*name, bucket=bucket) for name in SHARED_KEYS]

    def entity_keys(self, kind: EntityKind, ids: np.ndarray, buckets: np.ndarray | None = None) -> np.ndarray:
        """`entity(kind, id)` for every id of an object array (with `buckets`, each id's bucket),
        as an object array: numpy adds the strings in C (exact for any id, unlike numpy's fixed-
        width str arrays, which drop trailing NULs), and ids are escaped only when one needs it."""
        encoded = _encoded(ids)
        if not self.buckets:
            return self._head(kind) + encoded + "}"
        heads = np.array([self._head(kind, b) for b in range(self.buckets)], object)
        return heads[buckets] + encoded


SHARED_KEYS: tuple[tuple[str, ...], ...] = (("wm",), ("clock",), ("pop", "landmark"), ("pop",), ("item_events",))
_encode_each = np.frompyfunc(encode_id, 1, 1)


def _encoded(ids: np.ndarray) -> np.ndarray:
    """encode_id over an object array of ids; one scan of the joined ids spares the common case
    (no id holds a character to escape) a call per id."""
    joined = "".join(ids.tolist())
    if any(c in joined for c in _ESCAPES):
        return _encode_each(ids)
    return ids


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each value's code, the distinct values in first-seen order): a hash table, not a sort."""
    codes, distinct = pd.factorize(values)
    return codes.astype(np.int64), np.asarray(distinct)


@dataclass(frozen=True)
class DeclaredKeys:
    """Every user, item and window-bucket key a batch's write may touch, which the write script
    declares (KEYS) rather than builds, as Redis requires of scripts (a Redis Cluster routes and
    checks a script by its declared keys). The keys come grouped by bucket (one group on one
    Redis); `user`, `item`, `user_windows` and `item_windows` give, per event, the KEYS index of
    each of its keys in its bucket's call (after the shared keys): a user's hash is followed by
    its recent list and its seen set. Only distinct keys are built, each once per batch."""

    keys: np.ndarray  # object: the keys, bucket after bucket
    bounds: np.ndarray  # bucket b's keys are keys[bounds[b]:bounds[b + 1]]
    user: np.ndarray  # per event
    item: np.ndarray  # per event
    user_windows: np.ndarray  # [events, windows]
    item_windows: np.ndarray  # [events, windows]
    user_bucket: np.ndarray  # per event: the bucket of its user (0 on one Redis)
    item_bucket: np.ndarray  # per event: the bucket of its item

    @classmethod
    def of(cls, schema: KeySchema, users: np.ndarray, items: np.ndarray, times: np.ndarray) -> DeclaredKeys:
        """The keys of events given in time order (`times` nondecreasing)."""
        if len(times) > 1 and not np.all(times[1:] >= times[:-1]):
            raise ValueError("DeclaredKeys.of takes events in time order")
        if not len(times):
            none, no_windows = np.zeros(0, np.int64), np.zeros((0, len(WINDOWS)), np.int64)
            return cls(np.zeros(0, object), np.zeros(max(schema.buckets, 1) + 1, np.int64), none, none,
                       no_windows, no_windows, none, none)
        groups = max(schema.buckets, 1)
        user_code, distinct_users = _factorize(users)
        item_code, distinct_items = _factorize(items)
        user_home = bucket_of(distinct_users, groups) if schema.buckets else np.zeros(len(distinct_users), np.int64)
        item_home = bucket_of(distinct_items, groups) if schema.buckets else np.zeros(len(distinct_items), np.int64)
        user_hash = schema.entity_keys("u", distinct_users, user_home)
        item_hash = schema.entity_keys("i", distinct_items, item_home)
        pieces = [np.stack([user_hash, user_hash + (":" + RECENT), user_hash + (":" + SEEN)], axis=1).ravel(), item_hash]
        homes = [np.repeat(user_home, 3), item_home]
        offset = 3 * len(distinct_users) + len(distinct_items)
        windows: list[tuple[np.ndarray, np.ndarray]] = []  # per window: (user key id, item key id) per event
        for window, size in WINDOWS.items():
            slot = (times // size).astype(np.int64)  # nondecreasing: the events are in time order
            first = np.concatenate(([True], slot[1:] != slot[:-1]))
            start_code, starts = np.cumsum(first) - 1, slot[first] * size
            suffixes = f":{_window_part(window)}:" + starts.astype(str).astype(object)
            ids = []
            for code, hashes, home in ((user_code, user_hash, user_home), (item_code, item_hash, item_home)):
                pair_code, pairs = _factorize(code * len(starts) + start_code)
                entity, start = np.divmod(pairs, len(starts))
                pieces.append(hashes[entity] + suffixes[start])
                homes.append(home[entity])
                ids.append(offset + pair_code)
                offset += len(pairs)
            windows.append((ids[0], ids[1]))
        keys, home = np.concatenate(pieces), np.concatenate(homes)
        index = np.arange(len(keys)) + len(SHARED_KEYS) + 1  # 1-based KEYS index in its bucket's call
        bounds = np.array([0, len(keys)])
        if schema.buckets:  # group the keys by bucket
            order = np.argsort(home, kind="stable")
            bounds = np.searchsorted(home[order], np.arange(groups + 1))
            index[order] = np.arange(len(keys)) - bounds[home[order]] + len(SHARED_KEYS) + 1
            keys = keys[order]
        return cls(keys, bounds, index[3 * user_code], index[3 * len(distinct_users) + item_code],
                   np.stack([index[u] for u, _ in windows], axis=1), np.stack([index[i] for _, i in windows], axis=1),
                   user_home[user_code], item_home[item_code])

    def of_bucket(self, bucket: int) -> list[str]:
        return self.keys[self.bounds[bucket] : self.bounds[bucket + 1]].tolist()


WRITE_SCRIPT = """
-- KEYS: the watermarks, clock, popularity landmark, popularity and exact item counts (of one
-- bucket of a Cluster store, or the store's), then every user, item and window-bucket key the
-- batch may touch (DeclaredKeys): per event, p.uk and p.ik are the KEYS index of its user's hash
-- (its recent list and seen set follow) and its item's hash, p.uw[k][w] and p.iw[k][w] of its
-- window buckets. An index of 0: that side of the event belongs to another bucket's call (one
-- Redis gets both sides of every event). Nothing outside KEYS is touched.
local p = cjson.decode(ARGV[1])
local WM, CLOCK, LANDMARK, POP, ITEM_EVENTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ttl, cap, half_life, gap = p.ttl, p.cap, p.half_life, p.gap
local I, T, W, PI, O, PK, HOLD = p.i, p.t, p.w, p.pi, p.o, p.pk or {}, p.hold
local UK, IK, UW, IW, WTTL = p.uk, p.ik, p.uw, p.iw, p.wttl
-- with the caller's consumed ranges (or, in a bucket of a Cluster store, always): every
-- partition's last offset read, so its watermark moves past records that wrote nothing (invalid,
-- duplicates, another bucket's), and (ranges only) the first offset read, right after the range
-- the caller wrote before
local PLAST, START = p.plast, p.start
-- Redis does not roll a failed script back: a command that fails half-way through left the
-- writes before it, and the retried batch counted them again. So nothing below fails on what a
-- key holds: the watermarks are checked before the first write (the batch is refused, nothing
-- written, when they cannot be read: no write could be placed safely), and every other key is
-- repaired where a command cannot take it (a key of another type deleted, a counter that is not
-- an integer restarted from 0), reported in the reply, and the command made again.
local repaired = {}
local function is_offset(v)
  return string.len(v) <= 18 and string.match(v, '^-?%d+$') ~= nil
end
local function failed(reply) return type(reply) == 'table' and reply.err ~= nil end
local function repairable(reply) -- a reply that says what the key holds, not why Redis refused (OOM, READONLY)
  local e = reply.err
  return string.find(e, 'WRONGTYPE', 1, true) or string.find(e, 'not an integer', 1, true)
    or string.find(e, 'overflow', 1, true)
end
local function on_key(command, key, ...)  -- a key of another type is deleted first
  local done = redis.pcall(command, key, ...)
  if not failed(done) then return done end
  if not string.find(done.err, 'WRONGTYPE', 1, true) then error(done) end
  redis.call('DEL', key); repaired[#repaired + 1] = key
  return redis.call(command, key, ...)
end
local function incr(key, by)  -- INCRBY; a key that is no integer restarts from 0
  local done = redis.pcall('INCRBY', key, by)
  if not failed(done) then return done end
  if not repairable(done) then error(done) end
  redis.call('DEL', key); repaired[#repaired + 1] = key
  return redis.call('INCRBY', key, by)
end
local function hincr(key, field, by)  -- HINCRBY; a field that is no integer restarts from 0
  local done = redis.pcall('HINCRBY', key, field, by)
  if not failed(done) then return done end
  if not repairable(done) then error(done) end
  if string.find(done.err, 'WRONGTYPE', 1, true) then
    redis.call('DEL', key); repaired[#repaired + 1] = key
  else
    redis.call('HDEL', key, field); repaired[#repaired + 1] = key .. ' ' .. field
  end
  return redis.call('HINCRBY', key, field, by)
end
local function number_at(key)  -- a string key's number; one that holds none is deleted (nil)
  local v = on_key('GET', key)
  local n = v and tonumber(v)
  if v and (n == nil or n ~= n or n == math.huge or n == -math.huge) then
    redis.call('DEL', key); repaired[#repaired + 1] = key
    return nil
  end
  return n
end
-- the batch's partitions: an event below its partition's watermark was written before; a
-- partition without one is reported, and so is one whose watermark lies below the offset the
-- caller read this batch from (the store lost writes: restored from an older snapshot, or a
-- lagging replica promoted); either is held back entirely (nothing written, no watermark set)
-- when the caller knows the topic holds the missing events, so that they are rebuilt first
local marks, unmarked, behind, last = {}, {}, {}, {}
local stored = #PK > 0 and redis.pcall('HMGET', WM, unpack(PK)) or {}
if failed(stored) then
  return redis.error_reply('CORRUPT ' .. WM .. ' is not a hash of watermarks: nothing written (' .. stored.err .. ')')
end
for k, pkey in ipairs(PK) do
  local v = stored[k]
  if v and not is_offset(v) then
    return redis.error_reply('CORRUPT watermark ' .. WM .. ' ' .. pkey .. ' = ' .. string.format('%q', v)
                             .. ' is not an offset: nothing written')
  end
  marks[k] = v and tonumber(v) or -1
  if not v then
    unmarked[#unmarked + 1] = k
    if HOLD[k] then marks[k] = math.huge end
  elseif START and START[k] > marks[k] then
    behind[#behind + 1] = k
    if HOLD[k] then marks[k] = math.huge end
  end
end
-- aggregate the batch's new events (they arrive in time order) per declared key
local users, user_order, items, item_order, counts, count_order = {}, {}, {}, {}, {}, {}
local applied, skipped, max_t, min_t = 0, 0, nil, nil
-- a command on many values in chunks: Lua's unpack stops near 8,000 values (one user's events in a
-- large batch: a bot), which would fail the whole batch, and again at every retry
local function chunked(command, key, values, first)
  for s = first, #values, 4096 do on_key(command, key, unpack(values, s, math.min(s + 4095, #values))) end
end
local function bump(key, ttl_seconds)
  local c = counts[key]
  if c then c[1] = c[1] + 1 else counts[key] = {1, ttl_seconds}; count_order[#count_order + 1] = key end
end
for k = 1, #T do
  local pk, fresh, uk, ik = PI and PI[k] or 0, true, UK[k], IK[k]
  if pk > 0 then
    local o = O[k]
    if last[pk] == nil or o > last[pk] then last[pk] = o end
    fresh = o >= marks[pk]
  end
  -- events are counted on their user side: one per event in a Cluster store too
  if not fresh then
    if uk > 0 then skipped = skipped + 1 end
  else
    local i, t = I[k], T[k]
    if max_t == nil or t > max_t then max_t = t end
    if min_t == nil or t < min_t then min_t = t end
    if uk > 0 then
      applied = applied + 1
      local e = users[uk]
      if not e then e = {items = {}, times = {}, n = 0}; users[uk] = e; user_order[#user_order + 1] = uk end
      e.items[#e.items + 1] = i; e.times[#e.times + 1] = t; e.n = e.n + 1
      -- the log position of the user's newest event: the highest offset in the partition of their
      -- latest event (a user's events share a partition: the topic is keyed by user)
      if pk > 0 then
        if e.pk ~= pk then e.pk = pk; e.o = O[k] elseif O[k] > e.o then e.o = O[k] end
      end
      for w = 1, #WTTL do bump(UW[k][w], WTTL[w]) end
    end
    if ik > 0 then
      local f = items[ik]
      if not f then f = {id = i, last = t, n = 0, pop = 0}; items[ik] = f; item_order[#item_order + 1] = ik end
      f.n = f.n + 1; if t > f.last then f.last = t end
      f.pop = f.pop + W[k] * math.pow(2, (t - p.landmark_hint) / half_life)
      for w = 1, #WTTL do bump(IW[k][w], WTTL[w]) end
    end
  end
end
if max_t ~= nil then
  -- the clock never runs past the writer's wall clock: one event dated up to a day ahead (the
  -- schema's allowance for skewed clients) ended every session and emptied every window count
  local clock, newest = number_at(CLOCK) or 0, math.min(max_t, p.now)
  if newest > clock then redis.call('SET', CLOCK, string.format('%.6f', newest)) end
  -- a landmark that is no number is replaced by this batch's: the stored scores keep their order
  number_at(LANDMARK)
  redis.call('SETNX', LANDMARK, string.format('%.6f', min_t))
  -- popularity was accumulated relative to landmark_hint, the batch's newest time (so each event's
  -- 2^((t - hint) / half_life) is at most 1); convert to the stored landmark. 2^x overflows a
  -- double from x = 1024 (20 years at a week's half-life: a MovieLens replay, then live traffic),
  -- and inf * 0 made the script fail on every retry after writing part of the batch; so once the
  -- hint is RENORMALISE_AFTER half-lives past the landmark, the landmark moves to the hint and the
  -- stored scores are scaled down by what they decayed meanwhile
  local landmark = tonumber(redis.call('GET', LANDMARK))
  if (p.landmark_hint - landmark) / half_life > p.renormalise_after then
    local decayed = math.pow(2, (landmark - p.landmark_hint) / half_life)
    on_key('ZUNIONSTORE', POP, 1, POP, 'WEIGHTS', string.format('%.17g', decayed))
    redis.call('SET', LANDMARK, string.format('%.6f', p.landmark_hint))
    landmark = p.landmark_hint
  end
  local shift = math.pow(2, (p.landmark_hint - landmark) / half_life)
  for _, uk in ipairs(user_order) do
    local e, key, recent, seen = users[uk], KEYS[uk], KEYS[uk + 1], KEYS[uk + 2]
    chunked('LPUSH', recent, e.items, math.max(1, #e.items - cap + 1))  -- the newest `cap`: the rest is trimmed
    redis.call('LTRIM', recent, 0, cap - 1)
    redis.call('EXPIRE', recent, ttl)
    chunked('SADD', seen, e.items, 1)
    redis.call('EXPIRE', seen, ttl)
    -- the current session: its events so far, a gap of more than `gap` seconds starting a new one
    local held = on_key('HMGET', key, 'last_seen', 'session_events')
    local previous, session = tonumber(held[1]), tonumber(held[2]) or 0
    for _, t in ipairs(e.times) do
      if previous == nil or t - previous > gap then session = 0 end
      session = session + 1
      if previous == nil or t > previous then previous = t end
    end
    local fields = {'last_seen', string.format('%.6f', previous), 'session_events', session}
    if e.pk then  -- the newest event's log position (events without an origin leave it alone)
      table.insert(fields, 'log_partition'); table.insert(fields, PK[e.pk])
      table.insert(fields, 'log_offset'); table.insert(fields, string.format('%.0f', e.o))
    end
    redis.call('HSET', key, unpack(fields))
    hincr(key, 'events', e.n)
    redis.call('EXPIRE', key, ttl)
  end
  for _, ik in ipairs(item_order) do
    local f, key = items[ik], KEYS[ik]
    local last_seen = tonumber(on_key('HGET', key, 'last_seen')) or 0
    if f.last > last_seen then redis.call('HSET', key, 'last_seen', string.format('%.6f', f.last)) end
    hincr(key, 'events', f.n)
    redis.call('EXPIRE', key, ttl)
    hincr(ITEM_EVENTS, f.id, f.n)
    on_key('ZINCRBY', POP, f.pop * shift, f.id)
  end
  for _, key in ipairs(count_order) do
    local c = counts[key]
    if incr(KEYS[key], c[1]) == c[1] then redis.call('EXPIRE', KEYS[key], c[2]) end
  end
end
for k, pkey in ipairs(PK) do
  local l = PLAST and PLAST[k] or last[k]
  if l + 1 > marks[k] then redis.call('HSET', WM, pkey, string.format('%d', l + 1)) end
end
return {applied, skipped, unmarked, behind, repaired}
"""
RENORMALISE_AFTER_HALF_LIVES = 256.0  # popularity's landmark moves up once this far behind (2^256: far from overflow)
WAIT_TIMEOUT_MS = 1000  # WAIT for replicas (Cluster): below the socket timeout, so a missing confirmation is an answer
WINDOW_TTLS = [window + size for window, size in WINDOWS.items()]  # a bucket outlives its window by one bucket


WRITE_SHA = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()
ScriptCall = tuple[list[str], bytes]  # one write-script call: its declared keys and its argument


class FeatureStoreCorrupt(redis.ResponseError):
    """The write script refused a batch, writing nothing: a key it cannot repair (the partitions'
    watermarks) holds something else. Writing the batch again cannot help, unlike a refusal for
    the moment (OOM, READONLY during a failover): the key must be fixed by hand."""


CORRUPT = "CORRUPT "  # the script's error reply when it refuses a batch


def _reply(connection: redis.Connection) -> object:
    """The next reply on `connection`, an error reply as its exception (the replies after it must
    still be read); the script's refusal as FeatureStoreCorrupt."""
    try:
        return connection.read_response()
    except redis.ResponseError as error:
        return FeatureStoreCorrupt(str(error)) if str(error).startswith(CORRUPT) else error


def _exchange(sends: list[tuple[redis.Redis, list[ScriptCall], int]]) -> list[list[object]]:
    """Send each Redis (its client, its write-script calls, the replicas to WAIT for after them)
    its commands, then read every reply: several Redis (a Cluster's masters) run their scripts at
    the same time. Commands are packed by hiredis itself: redis-py's packer looks at each of a
    batch's thousands of keys in Python first. A Redis whose connection fails gets the error as
    its last reply, its connection dropped; the replies read before it, and the other Redis's,
    stand (a Cluster counts what its other masters wrote)."""
    packed = []  # every send packed before anything is sent: a bad argument sends nothing
    for _, calls, wanted in sends:
        commands: list[tuple[str | int | bytes, ...]] = [
            ("EVALSHA", WRITE_SHA, len(keys), *keys, argument) for keys, argument in calls]
        if wanted:
            commands.append(("WAIT", wanted, WAIT_TIMEOUT_MS))
        packed.append(b"".join(map(hiredis.pack_command, commands)))
    results: list[list[object]] = [[] for _ in sends]
    connections: list[redis.Connection | None] = [None] * len(sends)
    try:
        for k, ((client, _, _), payload) in enumerate(zip(sends, packed)):
            try:
                connections[k] = client.connection_pool.get_connection()
                connections[k].send_packed_command([payload])
            except (redis.ConnectionError, redis.TimeoutError) as error:
                results[k].append(error)
        for k, (connection, (_, calls, wanted)) in enumerate(zip(connections, sends)):
            if results[k]:
                continue  # not sent
            try:
                for _ in range(len(calls) + bool(wanted)):
                    results[k].append(_reply(connection))
            except (redis.ConnectionError, redis.TimeoutError) as error:
                connection.disconnect()  # replies may be left unread on it
                results[k].append(error)
        return results
    except BaseException:
        for connection in connections:
            if connection is not None:
                connection.disconnect()
        raise
    finally:
        for (client, _, _), connection in zip(sends, connections):
            if connection is not None:
                client.connection_pool.release(connection)


def run_write_script(sends: list[tuple[redis.Redis, list[ScriptCall], int]]) -> list[list[object]]:
    """`_exchange`, with the script loaded again where a Redis lacks it (a restarted node, a
    promoted replica) and those calls made again; each send's replies, errors as exceptions."""
    results = _exchange(sends)
    lacking = [k for k, got in enumerate(results) if any(isinstance(r, redis.exceptions.NoScriptError) for r in got)]
    for k in lacking:
        sends[k][0].script_load(WRITE_SCRIPT)
    if lacking:
        for k, got in zip(lacking, _exchange([sends[k] for k in lacking])):
            results[k] = got
    return results


@dataclass(frozen=True)
class FeatureStoreConfig:
    prefix: str = "sr"
    recent_cap: int = 100
    ttl_seconds: int = 30 * 86_400
    popularity_half_life: float = 7 * 86_400.0
    session_gap: float = SESSION_GAP  # seconds of event time without an event of a user that end their session
    cluster: bool = False  # the URL names a node of a Redis Cluster (streamrec.trainer.online.feature_cluster)

    @classmethod
    def from_settings(cls, settings: Settings, prefix: str | None = None) -> FeatureStoreConfig:
        """The store of `settings` (`feature_prefix`, `redis_cluster`), or another `prefix` on it."""
        return cls(prefix=settings.feature_prefix if prefix is None else prefix, cluster=settings.redis_cluster)


@dataclass(frozen=True)
class FeatureWrite:
    """The outcome of one batch's write: events `applied`, events `skipped` (written before, or
    held back), and `unmarked`: the batch's partitions that had no watermark (a first write, or a
    wiped store; with floors, only those with earlier events in the topic), each with the batch's
    first offset of it. `behind` (only with the batch's `ranges`): partitions whose watermark lies
    below the offset the batch was read from, each with that offset: the store lost writes (an
    older snapshot restored, a lagging replica promoted); with floors, only those whose missing
    offsets the topic still holds. `repaired`: keys (or "key field") that held what the script
    could not use, deleted or reset to 0 so that the batch was written in full (also logged and
    counted). `declared_keys`: the user, item and window keys the write declared (the cost of the
    batch's key set; not part of the outcome, so not compared)."""

    applied: int
    skipped: int
    unmarked: dict[str, int]
    behind: dict[str, int] = field(default_factory=dict)
    repaired: tuple[str, ...] = ()
    declared_keys: int = field(default=0, compare=False)

    @property
    def missing(self) -> dict[str, int]:
        """The partitions to rebuild before the batch is written again (`rebuild_features`): the
        unmarked and those behind, each up to the offset the batch starts at."""
        return {**self.unmarked, **self.behind}


ConsumedRanges = Mapping[str, tuple[int, int]]  # partition key -> [first offset read, end): what a batch was cut from


@dataclass(frozen=True)
class _Origin:
    """A time-ordered batch's partitions: `pkeys` (sorted), `index` (per event, 1-based into
    `pkeys`; 0 = no origin), each partition's `first` offset here (with ranges, the first offset
    read) and whether that is `beyond_floor` (the topic holds earlier events of it; always False
    without floors), and with ranges each partition's `last` offset read (None without)."""

    pkeys: np.ndarray
    index: np.ndarray
    first: np.ndarray
    beyond_floor: np.ndarray
    last: np.ndarray | None = None

    @classmethod
    def of(cls, partition: np.ndarray, offset: np.ndarray, floors: Mapping[str, int] | None,
           ranges: ConsumedRanges | None = None) -> _Origin:
        tagged = np.not_equal(partition, None) & (offset >= 0)
        if ranges is None:
            pkeys, inverse = np.unique(partition[tagged], return_inverse=True)
        else:  # every partition read, with or without an event to write
            pkeys = np.array(sorted(ranges), dtype=object)
            bounds = np.array([ranges[pkey] for pkey in pkeys], np.int64).reshape(-1, 2)
            named, at = partition[tagged], offset[tagged]
            inverse = np.searchsorted(pkeys, named)
            inside = inverse < len(pkeys)
            inside[inside] = pkeys[inverse[inside]] == named[inside]
            if not inside.all() or np.any((at < bounds[inverse, 0]) | (at >= bounds[inverse, 1])):
                raise ValueError("an event lies outside the ranges its batch was read from")
        index = np.zeros(len(partition), np.int64)
        index[tagged] = inverse + 1
        first = np.full(len(pkeys), np.iinfo(np.int64).max)
        np.minimum.at(first, inverse, offset[tagged])
        last = None
        if ranges is not None:
            first, last = bounds[:, 0].copy(), bounds[:, 1] - 1
        beyond = (first > np.array([floors.get(pkey, 0) for pkey in pkeys], np.int64) if floors is not None
                  else np.zeros(len(pkeys), bool))
        return cls(pkeys, index, first, beyond, last)

    def outcome(self, replies: list[list], floors: Mapping[str, int] | None, declared_keys: int) -> FeatureWrite:
        """The FeatureWrite of the script's replies to the batch (one per bucket):
        [applied, skipped, unmarked, behind, repaired], partitions as 1-based indexes into
        `pkeys`. With floors, only the partitions held back are reported (those beyond their floor)."""
        applied = skipped = 0
        unmarked: set[int] = set()
        behind: set[int] = set()
        repaired: list[str] = []
        for applied_here, skipped_here, unmarked_here, behind_here, repaired_here in replies:
            applied, skipped = applied + int(applied_here), skipped + int(skipped_here)
            unmarked.update(int(k) for k in unmarked_here)
            behind.update(int(k) for k in behind_here)
            repaired.extend(key.decode(errors="backslashreplace") for key in repaired_here)
        if repaired:
            log.error("feature store: %d keys held what the write script cannot use (a hand edit, another writer, a "
                      "bad restore); deleted or reset to 0 so that the batch was written in full: %s",
                      len(repaired), repaired[:20])
            FEATURE_REPAIRS.inc(len(repaired))

        def report(partitions: set[int]) -> dict[str, int]:
            return {str(self.pkeys[k - 1]): int(self.first[k - 1])
                    for k in sorted(partitions) if floors is None or self.beyond_floor[k - 1]}

        return FeatureWrite(applied, skipped, report(unmarked), report(behind - unmarked), tuple(repaired),
                            declared_keys)


def script_argument(fields: Mapping[str, object]) -> bytes:
    """The script's JSON argument (id columns are object arrays: orjson takes them as lists)."""
    return orjson.dumps({k: v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v
                         for k, v in fields.items()}, option=orjson.OPT_SERIALIZE_NUMPY)


def popularity_weights(batch: EventBatch, roles: EventRoles) -> np.ndarray:
    """Each event's weight in the popularity score: its positive weight, or 1 for events that are
    not positives (a skip still counts as attention)."""
    weights = roles.positive_weight(batch.event_type, batch.value)
    return np.where(weights > 0, weights, 1.0)


class SessionState(NamedTuple):
    """What a user's hash says of their current session (`session_items` reads it)."""

    events: int  # the user's events, every session
    session_events: int  # the events of the current session
    last_seen: float  # event time of the user's newest event
    # where the user's newest event is in the log (partition key, offset); None: written without one
    position: tuple[str, int] | None = None


class UserHistory(NamedTuple):
    """One read of a user's history (`FeatureStore.history_commands`)."""

    recent: list[str]  # newest first
    seen: set[str]
    session: SessionState | None = None  # None: not asked for, or the user has no hash

    def session_items(self, clock: float, gap: float, most: int) -> list[str]:
        """The user's current session, newest first (at most `most` items): the newest
        `session_events` of `recent`, none when the user's last event is more than `gap` seconds of
        event time older than `clock` (the session has ended, as the model's tracker ends it)."""
        state = self.session
        if state is None or clock - state.last_seen > gap:
            return []
        return self.recent[: min(state.session_events, most)]


def decode_history(replies: list[list[bytes | None]], recent: int, seen: bool, session: bool = False) -> UserHistory:
    """The replies to `FeatureStore.history_commands`, in the order it gives the commands."""
    newest = [v.decode() for v in replies[0]] if recent else []
    everything = {v.decode() for v in replies[1 if recent else 0]} if seen else set()
    state = None
    if session:
        events, session_events, last_seen, partition, offset = replies[-1]
        if events is not None and session_events is not None and last_seen is not None:
            position = (partition.decode(), int(offset)) if partition is not None and offset is not None else None
            state = SessionState(int(events), int(session_events), float(last_seen), position)
    return UserHistory(newest, everything, state)


def connect_on_first_use(connect: Callable[[], C]) -> C:
    """`connect()`, with a Redis Cluster that cannot be reached raised as redis.ConnectionError: a
    cluster client connects as it is built, and redis-py's RedisClusterException is no RedisError,
    the error every caller of a store handles (a trainer waits it out, serving degrades)."""
    try:
        return connect()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise redis.ConnectionError(f"Redis Cluster unreachable: {type(exc).__name__}: {exc}") from exc


class FeatureStore:
    def __init__(self, client: redis.Redis, config: FeatureStoreConfig | None = None) -> None:
        self.redis = client
        self.config = config or FeatureStoreConfig()
        self.keys = KeySchema(self.config.prefix)
        self._shared = self.keys.shared_keys()

    @classmethod
    def from_url(cls, url: str, config: FeatureStoreConfig | None = None, timeout_s: float = 2.0,
                 fail_fast: bool = False) -> FeatureStore:
        """A store on the Redis at `url`; with `config.cluster`, on the Redis Cluster that node
        belongs to (the bucketed layout of streamrec.trainer.online.feature_cluster). `fail_fast`:
        a cluster read retries once, at once, for a caller that answers without the store rather
        than wait (serving); the trainer, which waits out an outage, keeps redis-py's retries."""
        if config is not None and config.cluster:
            from streamrec.trainer.online.feature_cluster import (
                ClusterFeatureStore,  # it extends this class
            )

            return ClusterFeatureStore.from_url(url, config, timeout_s, fail_fast)
        return cls(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s), config)

    # ---- writing ------------------------------------------------------------------------------
    def _columns(self, batch: EventBatch, weights: np.ndarray | None, floors: Mapping[str, int] | None,
                 ranges: ConsumedRanges | None = None) -> tuple[dict[str, object], DeclaredKeys, _Origin]:
        """The script's fields: the batch's columns in time order (the script aggregates them inside
        Redis), the keys they touch, and where the events come from."""
        c = self.config
        order = np.argsort(batch.timestamp, kind="stable")
        times = batch.timestamp[order]
        keys = DeclaredKeys.of(self.keys, batch.user_id[order], batch.item_id[order], times)
        fields: dict[str, object] = {
            "ttl": c.ttl_seconds, "cap": c.recent_cap, "half_life": c.popularity_half_life, "gap": c.session_gap,
            "landmark_hint": float(times[-1]) if len(times) else 0.0, "renormalise_after": RENORMALISE_AFTER_HALF_LIVES, "wttl": WINDOW_TTLS,
            "now": time.time(),
            "i": batch.item_id[order], "t": times,
            "w": np.ones(len(batch)) if weights is None else np.asarray(weights, np.float64)[order],
            "uk": keys.user, "ik": keys.item, "uw": keys.user_windows, "iw": keys.item_windows,
        }
        origin = _Origin.of(batch.partition[order], batch.offset[order], floors, ranges)
        if len(origin.pkeys):
            fields |= {"pi": origin.index, "o": batch.offset[order], "pk": origin.pkeys.tolist(),
                       "hold": origin.beyond_floor.tolist()}
            if origin.last is not None:
                fields |= {"start": origin.first, "plast": origin.last}
        return fields, keys, origin

    def write(self, batch: EventBatch, weights: np.ndarray | None = None,
              floors: Mapping[str, int] | None = None, ranges: ConsumedRanges | None = None) -> FeatureWrite:
        """One round trip for the whole batch: its new events are written and its partitions'
        watermarks advanced atomically; events already below a watermark are skipped.

        `floors` (partition key -> the earliest offset the topic still holds, 0 where absent) lets
        the store tell a first write from a wiped store: a partition without a watermark whose
        first offset here is above its floor has earlier events that the store lacks. Its events
        are then held back (counted as skipped, no watermark set) and only such partitions are
        reported in `unmarked`: rebuild them up to those offsets (`rebuild_features(settings,
        store, result.missing)`), then write the batch again. Without `floors` every partition
        without a watermark is reported, and everything is written.

        `ranges` (partition key -> [first offset read, end)): the records the batch was made of,
        each range starting right after the one the caller wrote before (the consumer's position),
        so the records that wrote nothing (invalid, duplicate) count as read. The store then moves
        each watermark to its range's end, even for a batch without events, and compares it with
        the range's start: a watermark below it means the store lost writes it acknowledged (an
        older snapshot restored, a lagging replica promoted), which it reports in `behind` and,
        with `floors`, holds back as a wiped partition. Without `ranges` the watermark moves to the
        last event's offset + 1 and such a loss goes unnoticed.

        A key that holds what the script cannot use (another type, a counter that is no integer)
        is deleted or reset and reported in `repaired`; watermarks it cannot read make it refuse
        the batch, writing nothing: FeatureStoreCorrupt."""
        if not len(batch) and not ranges:
            return FeatureWrite(0, 0, {})
        fields, keys, origin = self._columns(batch, weights, floors, ranges)
        (reply,), = run_write_script([(self.redis, [(self._shared + keys.of_bucket(0), script_argument(fields))], 0)])
        if isinstance(reply, Exception):
            raise reply
        return origin.outcome([reply], floors, len(keys.keys))

    def clear(self) -> int:
        """Delete every key under this store's prefix (benchmark and test data); returns the count."""
        deleted = 0
        keys = list(self.redis.scan_iter(self.keys.pattern(), count=1000))
        for start in range(0, len(keys), 1000):
            deleted += self.redis.delete(*keys[start : start + 1000])
        return deleted

    # ---- reading (serving, rebuilds and tests) ------------------------------------------------
    def watermarks(self) -> dict[str, int]:
        """Partition key -> next offset to write, for every partition written with its origin."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.shared("wm")).items()}

    def item_event_counts(self) -> dict[str, int]:
        """Item -> exact number of events written for it (each event once, whatever was replayed)."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.shared("item_events")).items()}

    def clock(self) -> float:
        value = self.redis.get(self.keys.shared("clock"))
        return float(value) if value else 0.0

    def recent_items(self, user: str, n: int | None = None) -> list[str]:
        end = (n or self.config.recent_cap) - 1
        return [v.decode() for v in self.redis.lrange(self.keys.entity("u", user, RECENT), 0, end)]

    def history_commands(self, user: str, recent: int, seen: bool, session: bool = False,
                         ) -> list[tuple[str | int, ...]]:
        """The Redis commands that read a user's `recent` newest items, (if asked) every seen
        item and (`session`) their hash's session fields; `decode_history` decodes their replies.
        One definition for this store's blocking client and for serving's asynchronous one
        (`streamrec.serving.history`). Every key is in the user's slot: one node answers."""
        commands: list[tuple[str | int, ...]] = []
        if recent:
            commands.append(("LRANGE", self.keys.entity("u", user, RECENT), 0, recent - 1))
        if seen:
            commands.append(("SMEMBERS", self.keys.entity("u", user, SEEN)))
        if session:
            commands.append(("HMGET", self.keys.entity("u", user), "events", "session_events", "last_seen",
                             "log_partition", "log_offset"))
        return commands

    def user_history(self, user: str, recent: int, seen: bool, session: bool = False) -> UserHistory:
        """The user's `recent` newest items, (if asked) every seen item and their session's
        state, in one round trip."""
        commands = self.history_commands(user, recent, seen, session)
        if len(commands) == 1:  # a single command skips redis-py's pipeline machinery
            return decode_history([self.redis.execute_command(*commands[0])], recent, seen, session)
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return decode_history(pipe.execute() if commands else [], recent, seen, session)

    def seen_items(self, user: str) -> set[str]:
        return {v.decode() for v in self.redis.smembers(self.keys.entity("u", user, SEEN))}

    def entity(self, kind: EntityKind, entity_id: str) -> dict[str, float]:
        """The numbers of an entity's hash (counts, times, the newest event's offset); a user's
        partition key, the one text field, is read with the session (`user_history`)."""
        fields = self.redis.hgetall(self.keys.entity(kind, entity_id))
        return {k.decode(): float(v) for k, v in fields.items() if k != b"log_partition"}

    def popular(self, n: int) -> list[tuple[str, float]]:
        """Top-n items by decayed popularity, scores in units of the landmark time."""
        return [(item.decode(), score)
                for item, score in self.redis.zrevrange(self.keys.shared("pop"), 0, n - 1, withscores=True)]

    def window_count(self, kind: EntityKind, entity_id: str, window: int, now: float | None = None) -> int:
        """Events of a user ("u") or item ("i") in the last `window` seconds of event time."""
        bucket = WINDOWS[window]
        now = self.clock() if now is None else now
        last = int(now // bucket * bucket)
        starts = range(last - window + bucket, last + 1, bucket)
        values = self.redis.mget([self.keys.window(kind, entity_id, window, b) for b in starts])
        return sum(int(v) for v in values if v)
