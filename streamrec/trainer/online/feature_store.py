"""The Redis feature store: recent history, decayed popularity, sliding-window counts, last-seen.

Everything is written from event time, so replaying a log builds the same state as live traffic,
and one batch is written with ONE round trip: its columns go as a JSON argument to a Lua script
that aggregates them per user, item and window bucket and performs the Redis commands inside the
server (a client-side pipeline of ~10 commands per user capped ingest near 10k events/s here, and
the aggregation runs on the Redis core instead of the trainer's).

Exactly once. Events read from Kafka carry their partition key ("topic/partition") and offset.
The script keeps a watermark per partition (the next offset to write) and reads and advances it
in the same atomic execution as the batch's keys: an event below its partition's watermark was
written before and is skipped, so a replayed or partly overlapping batch (trainer crash between
write and commit, rewind, `streamrec features rebuild`) never counts anything twice. Events
without an origin (a file, a benchmark) are written unconditionally, as before. A partition with
no watermark although the topic holds earlier events (the store was wiped: Redis here keeps
nothing on disk) is held back and reported, so that the caller rebuilds it from the topic
(`feature_rebuild`) before writing on: a watermark only moves forward, so earlier events could
not be added after later ones.

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
| `sr:{u:<user>}` / `sr:{i:<item>}` | hash | `last_seen` (event time), `events` (total count) |
| `sr:{u or i:<id>}:w<window>:<bucket>` | string | events of one bucket of a sliding window (windows 300 s in 60 s buckets and 3600 s in 300 s buckets); a window's count is the sum of its buckets up to the clock |
| `sr:{g}:clock` | string | the largest event time written (the feature store's "now") |
| `sr:{g}:pop` | sorted set | item -> sum of weight * 2^((t - landmark) / half_life): popularity with exponential time decay (forward decay: ranking needs no rescaling) |
| `sr:{g}:pop:landmark` | string | the landmark time of `sr:{g}:pop` (first event time) |
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

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson
import redis

from streamrec.core.config import Settings
from streamrec.param_server.keys import as_keys, mix64
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.roles import EventRoles

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
    """Every key of the store (see the module docstring); the Lua writer builds the same keys from
    `script_layout`, so this class is the one definition of the layout. With `buckets` (Redis
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

    def script_layout(self, bucket: int | None = None) -> bytes:
        """What the write script needs to build exactly these keys: entity key heads and suffixes,
        the shared keys, and the id escapes (a Lua pattern and its replacement table); with
        `buckets`, the keys of one bucket."""
        return orjson.dumps({
            "user": self._head("u", bucket), "item": self._head("i", bucket), "close": "" if self.buckets else "}",
            "recent": ":" + RECENT, "seen": ":" + SEEN,
            "windows": [[w, b, f":{_window_part(w)}:"] for w, b in WINDOWS.items()],
            "clock": self.shared("clock", bucket=bucket), "pop": self.shared("pop", bucket=bucket),
            "landmark": self.shared("pop", "landmark", bucket=bucket),
            "item_events": self.shared("item_events", bucket=bucket), "watermarks": self.shared("wm", bucket=bucket),
            "pattern": "[" + "".join("%" + c for c in _ESCAPES) + "]", "esc": _ESCAPES,
        })


WRITE_SCRIPT = """
local p, L = cjson.decode(ARGV[1]), cjson.decode(ARGV[2])
local ttl, cap, half_life = p.ttl, p.cap, p.half_life
local U, I, T, W, PI, O, PK, HOLD = p.u, p.i, p.t, p.w, p.pi, p.o, p.pk or {}, p.hold
-- a bucket of a Cluster store (feature_cluster.py) gets each event's user side (1), item side (2)
-- or both (3), and every partition's last offset in the whole batch (its watermark moves even when
-- none of the partition's events falls in this bucket); one Redis gets neither: both sides, always
local SIDE, PLAST = p.side, p.plast
local function enc(id) return (string.gsub(id, L.pattern, L.esc)) end
-- the batch's partitions: an event below its partition's watermark was written before; a
-- partition without one is reported, and held back entirely (nothing written, no watermark set)
-- when the caller knows the topic holds earlier events of it
local marks, unmarked, last = {}, {}, {}
for k, pkey in ipairs(PK) do
  local v = redis.call('HGET', L.watermarks, pkey)
  marks[k] = v and tonumber(v) or -1
  if not v then
    unmarked[#unmarked + 1] = k
    if HOLD[k] then marks[k] = math.huge end
  end
end
-- aggregate the batch's new events (they arrive in time order)
local users, user_order, items, item_order, buckets, bucket_order = {}, {}, {}, {}, {}, {}
local applied, skipped, max_t, min_t = 0, 0, nil, nil
local function bump(key, ttl_seconds)
  local b = buckets[key]
  if b then b[1] = b[1] + 1 else buckets[key] = {1, ttl_seconds}; bucket_order[#bucket_order + 1] = key end
end
for k = 1, #U do
  local pk, fresh = PI and PI[k] or 0, true
  local side = SIDE and SIDE[k] or 3
  if pk > 0 then
    local o = O[k]
    if last[pk] == nil or o > last[pk] then last[pk] = o end
    fresh = o >= marks[pk]
  end
  -- events are counted on their user side: one per event in a Cluster store too
  if not fresh then
    if side % 2 == 1 then skipped = skipped + 1 end
  else
    if side % 2 == 1 then applied = applied + 1 end
    local u, i, t = U[k], I[k], T[k]
    if max_t == nil or t > max_t then max_t = t end
    if min_t == nil or t < min_t then min_t = t end
    local e, f
    if side % 2 == 1 then
      e = users[u]
      if not e then
        e = {key = L.user .. enc(u) .. L.close, items = {}, last = t, n = 0}
        users[u] = e; user_order[#user_order + 1] = u
      end
      e.items[#e.items + 1] = i; e.n = e.n + 1; if t > e.last then e.last = t end
    end
    if side >= 2 then
      f = items[i]
      if not f then
        f = {key = L.item .. enc(i) .. L.close, last = t, n = 0, pop = 0}
        items[i] = f; item_order[#item_order + 1] = i
      end
      f.n = f.n + 1; if t > f.last then f.last = t end
      f.pop = f.pop + W[k] * math.pow(2, (t - p.landmark_hint) / half_life)
    end
    for w = 1, #L.windows do
      local window, size, part = L.windows[w][1], L.windows[w][2], L.windows[w][3]
      local suffix = part .. string.format('%d', math.floor(t / size) * size)
      if e then bump(e.key .. suffix, window + size) end
      if f then bump(f.key .. suffix, window + size) end
    end
  end
end
if max_t ~= nil then
  local clock = tonumber(redis.call('GET', L.clock) or '0')
  if max_t > clock then redis.call('SET', L.clock, string.format('%.6f', max_t)) end
  redis.call('SETNX', L.landmark, string.format('%.6f', min_t))
  -- popularity was accumulated relative to landmark_hint; convert to the stored landmark
  local shift = math.pow(2, (p.landmark_hint - tonumber(redis.call('GET', L.landmark))) / half_life)
  for _, u in ipairs(user_order) do
    local e = users[u]
    redis.call('LPUSH', e.key .. L.recent, unpack(e.items))
    redis.call('LTRIM', e.key .. L.recent, 0, cap - 1)
    redis.call('EXPIRE', e.key .. L.recent, ttl)
    redis.call('SADD', e.key .. L.seen, unpack(e.items))
    redis.call('EXPIRE', e.key .. L.seen, ttl)
    redis.call('HSET', e.key, 'last_seen', string.format('%.6f', e.last))
    redis.call('HINCRBY', e.key, 'events', e.n)
    redis.call('EXPIRE', e.key, ttl)
  end
  for _, i in ipairs(item_order) do
    local f = items[i]
    local last_seen = tonumber(redis.call('HGET', f.key, 'last_seen') or '0')
    if f.last > last_seen then redis.call('HSET', f.key, 'last_seen', string.format('%.6f', f.last)) end
    redis.call('HINCRBY', f.key, 'events', f.n)
    redis.call('EXPIRE', f.key, ttl)
    redis.call('HINCRBY', L.item_events, i, f.n)
    redis.call('ZINCRBY', L.pop, f.pop * shift, i)
  end
  for _, key in ipairs(bucket_order) do
    local b = buckets[key]
    if redis.call('INCRBY', key, b[1]) == b[1] then redis.call('EXPIRE', key, b[2]) end
  end
end
for k, pkey in ipairs(PK) do
  local l = PLAST and PLAST[k] or last[k]
  if l + 1 > marks[k] then redis.call('HSET', L.watermarks, pkey, string.format('%d', l + 1)) end
end
return {applied, skipped, unpack(unmarked)}
"""


@dataclass(frozen=True)
class FeatureStoreConfig:
    prefix: str = "sr"
    recent_cap: int = 100
    ttl_seconds: int = 30 * 86_400
    popularity_half_life: float = 7 * 86_400.0
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
    first offset of it."""

    applied: int
    skipped: int
    unmarked: dict[str, int]


@dataclass(frozen=True)
class _Origin:
    """A time-ordered batch's partitions: `pkeys` (sorted), `index` (per event, 1-based into
    `pkeys`; 0 = no origin), each partition's `first` offset here and whether that is
    `beyond_floor` (the topic holds earlier events of it; always False without floors)."""

    pkeys: np.ndarray
    index: np.ndarray
    first: np.ndarray
    beyond_floor: np.ndarray

    @classmethod
    def of(cls, partition: np.ndarray, offset: np.ndarray, floors: Mapping[str, int] | None) -> _Origin:
        tagged = np.not_equal(partition, None) & (offset >= 0)
        pkeys, inverse = np.unique(partition[tagged], return_inverse=True)
        index = np.zeros(len(partition), np.int64)
        index[tagged] = inverse + 1
        first = np.full(len(pkeys), np.iinfo(np.int64).max)
        np.minimum.at(first, inverse, offset[tagged])
        beyond = (first > np.array([floors.get(pkey, 0) for pkey in pkeys], np.int64) if floors is not None
                  else np.zeros(len(pkeys), bool))
        return cls(pkeys, index, first, beyond)


def script_argument(fields: Mapping[str, object]) -> bytes:
    """The script's JSON argument (id columns are object arrays: orjson takes them as lists)."""
    return orjson.dumps({k: v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v
                         for k, v in fields.items()}, option=orjson.OPT_SERIALIZE_NUMPY)


def popularity_weights(batch: EventBatch, roles: EventRoles) -> np.ndarray:
    """Each event's weight in the popularity score: its positive weight, or 1 for events that are
    not positives (a skip still counts as attention)."""
    weights = roles.positive_weight(batch.event_type, batch.value)
    return np.where(weights > 0, weights, 1.0)


def decode_history(replies: list[list[bytes]], recent: int, seen: bool) -> tuple[list[str], set[str]]:
    """(newest items, seen items) from the replies to `FeatureStore.history_commands`."""
    newest = [v.decode() for v in replies[0]] if recent else []
    everything = {v.decode() for v in replies[-1]} if seen else set()
    return newest, everything


class FeatureStore:
    def __init__(self, client: redis.Redis, config: FeatureStoreConfig | None = None) -> None:
        self.redis = client
        self.config = config or FeatureStoreConfig()
        self.keys = KeySchema(self.config.prefix)
        self._layout = self.keys.script_layout()
        self._write = client.register_script(WRITE_SCRIPT)

    @classmethod
    def from_url(cls, url: str, config: FeatureStoreConfig | None = None, timeout_s: float = 2.0) -> FeatureStore:
        """A store on the Redis at `url`; with `config.cluster`, on the Redis Cluster that node
        belongs to (the bucketed layout of streamrec.trainer.online.feature_cluster)."""
        if config is not None and config.cluster:
            from streamrec.trainer.online.feature_cluster import ClusterFeatureStore  # it extends this class

            return ClusterFeatureStore.from_url(url, config, timeout_s)
        return cls(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s), config)

    # ---- writing ------------------------------------------------------------------------------
    def _columns(self, batch: EventBatch, weights: np.ndarray | None,
                 floors: Mapping[str, int] | None) -> tuple[dict[str, object], np.ndarray, _Origin]:
        """The script's fields: the batch's columns in time order (the script aggregates them inside
        Redis); the time order itself, and where the events come from."""
        c = self.config
        order = np.argsort(batch.timestamp, kind="stable")
        fields: dict[str, object] = {
            "ttl": c.ttl_seconds, "cap": c.recent_cap, "half_life": c.popularity_half_life,
            "landmark_hint": float(batch.timestamp[order[0]]),
            "u": batch.user_id[order], "i": batch.item_id[order], "t": batch.timestamp[order],
            "w": np.ones(len(batch)) if weights is None else np.asarray(weights, np.float64)[order],
        }
        origin = _Origin.of(batch.partition[order], batch.offset[order], floors)
        if len(origin.pkeys):
            fields |= {"pi": origin.index, "o": batch.offset[order], "pk": origin.pkeys.tolist(),
                       "hold": origin.beyond_floor.tolist()}
        return fields, order, origin

    def _payload(self, batch: EventBatch, weights: np.ndarray | None,
                 floors: Mapping[str, int] | None) -> tuple[bytes, _Origin]:
        fields, _, origin = self._columns(batch, weights, floors)
        return script_argument(fields), origin

    def write(self, batch: EventBatch, weights: np.ndarray | None = None,
              floors: Mapping[str, int] | None = None) -> FeatureWrite:
        """One round trip for the whole batch: its new events are written and its partitions'
        watermarks advanced atomically; events already below a watermark are skipped.

        `floors` (partition key -> the earliest offset the topic still holds, 0 where absent) lets
        the store tell a first write from a wiped store: a partition without a watermark whose
        first offset here is above its floor has earlier events that the store lacks. Its events
        are then held back (counted as skipped, no watermark set) and only such partitions are
        reported in `unmarked`: rebuild them up to those offsets (`rebuild_features(settings,
        store, result.unmarked)`), then write the batch again. Without `floors` every partition
        without a watermark is reported, and everything is written."""
        if not len(batch):
            return FeatureWrite(0, 0, {})
        payload, origin = self._payload(batch, weights, floors)
        applied, skipped, *unmarked = self._write(args=[payload, self._layout])
        return FeatureWrite(int(applied), int(skipped), {
            str(origin.pkeys[k - 1]): int(origin.first[k - 1])
            for k in unmarked if floors is None or origin.beyond_floor[k - 1]})

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

    def history_commands(self, user: str, recent: int, seen: bool) -> list[tuple[str | int, ...]]:
        """The Redis commands that read a user's `recent` newest items and (if asked) every seen
        item; `decode_history` turns their replies into lists. One definition for this store's
        blocking client and for serving's asynchronous one (`streamrec.serving.history`)."""
        commands: list[tuple[str | int, ...]] = []
        if recent:
            commands.append(("LRANGE", self.keys.entity("u", user, RECENT), 0, recent - 1))
        if seen:
            commands.append(("SMEMBERS", self.keys.entity("u", user, SEEN)))
        return commands

    def user_history(self, user: str, recent: int, seen: bool) -> tuple[list[str], set[str]]:
        """The user's `recent` newest items and (if asked) every seen item, in one round trip."""
        commands = self.history_commands(user, recent, seen)
        if len(commands) == 1:  # a single command skips redis-py's pipeline machinery
            return decode_history([self.redis.execute_command(*commands[0])], recent, seen)
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return decode_history(pipe.execute() if commands else [], recent, seen)

    def seen_items(self, user: str) -> set[str]:
        return {v.decode() for v in self.redis.smembers(self.keys.entity("u", user, SEEN))}

    def entity(self, kind: EntityKind, entity_id: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.keys.entity(kind, entity_id)).items()}

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
